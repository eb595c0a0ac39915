#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine that may have no network:
#   scripts/gpu-check.sh [--dry-run] [--out DIR] [--budget SECONDS]
#
# 1. installs the wheels carried in .whl/ (packages the machine lacks: pydantic, pytorch-metric-learning,
#    datasets, chatterbot-corpus, ...; made by `python -m bench.gpu_prepare`) into a folder of its own;
# 2. runs the project from its source folders (no install), records nvidia-smi;
# 3. runs `python -m bench --gpu`: tier by tier (GPU facts and the GPU tests, text throughput against
#    sentence-transformers, MFU, image throughput against a plain timm loop, time to a fine-tuned model),
#    each with its own timeout inside --budget (default 480 s), each writing its JSON into --out as soon
#    as it has a number, plus gpu.md (the Markdown of all tiers) and gpu-check.log (this output).
# --dry-run runs the same code on the CPU with tiny models (about a minute): the test suite does that.
# Publish a GPU run's files with `python -m bench.gpu_report --from DIR`.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=bench/results/gpu-run
BUDGET=480
DRY_RUN=0
PYTHON="${PYTHON:-python3}"
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    --budget) BUDGET="${2:?--budget needs a number of seconds}"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument '$1' (use --dry-run, --out DIR, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in
  ''|*[!0-9]*) echo "gpu-check.sh: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

run() {
  echo "==> gpu-check $(date -u '+%Y-%m-%d %H:%M:%S UTC'): budget ${BUDGET} s, results in $OUT$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN on the CPU')"
  if { [ "$DRY_RUN" = 0 ] || [ "${GPU_CHECK_INSTALL_WHEELS:-0}" = 1 ]; } && ls .whl/*.whl >/dev/null 2>&1; then
    SITE="${GPU_CHECK_SITE:-/tmp/site}"
    echo "==> installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
      echo "==> installing the carried wheels failed: the tiers below will say what is missing"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  elif [ "$DRY_RUN" = 0 ]; then
    echo "==> no .whl/ folder: using the packages installed here (make one with: python -m bench.gpu_prepare)"
  fi
  export PYTHONPATH="$PWD/sdk:$PWD/trainer:$PWD/operator:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || echo "==> nvidia-smi failed"
  else
    echo "==> nvidia-smi: not found"
  fi
  "$PYTHON" - <<'EOF' || echo "==> an import failed: the tiers that need it will fail and say so"
import importlib, sys
missing = []
for name in ('torch', 'transformers', 'sentence_transformers', 'timm', 'pydantic', 'pytorch_metric_learning',
             'datasets', 'onnxruntime', 'chatterbot_corpus', 'finetuner', 'finetuner_trainer.runner'):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f'{name} ({type(e).__name__}: {e})')
import torch
print(f'==> python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')
if missing:
    print('==> cannot import: ' + '; '.join(missing))
    sys.exit(1)
EOF
  local args=(--gpu --out "$OUT" --budget "$BUDGET")
  [ "$DRY_RUN" = 1 ] && args+=(--dry-run)
  local limit=$((BUDGET + 45))
  if command -v timeout >/dev/null 2>&1; then
    timeout --kill-after=15 "$limit" "$PYTHON" -m bench "${args[@]}"
  else
    "$PYTHON" -m bench "${args[@]}"
  fi
  local code=$?
  echo "==> gpu-check finished with exit code $code; files in $OUT:"
  ls -la "$OUT"
  return "$code"
}

run 2>&1 | tee -a "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
