"""finetuner: fine-tune embedding models on Kubernetes or on this machine."""
