"""The trainer that runs in the GPU pod (and as a subprocess on the local backend)."""
