"""The Kopf operator reconciling FinetuneRun and Experiment objects."""
