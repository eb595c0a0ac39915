"""Benchmarks of kube-finetuner against what users would use instead; ``python -m bench``."""
