"""Backends behind the SDK: kubernetes (custom resources) and local (subprocess)."""
