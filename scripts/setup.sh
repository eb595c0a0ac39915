#!/usr/bin/env bash
# Create .venv in the checkout and install everything the project needs (idempotent).
# Torch goes in first, pinned, so no resolver pulls another build; then the project with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
EXTRAS="${FINETUNER_EXTRAS:-operator,trainer,docarray,demo,loggers,bench,console,test}"
stamp_of() { cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1; echo "$EXTRAS"; }

# The console's browser tests drive Debian's Chromium (Playwright's own browser download cannot work
# offline). Installed when absent and apt-get can (root); otherwise those tests skip and say why.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing chromium and chromium-driver (the console's browser tests)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >/dev/null \
      || echo "==> could not install chromium; the console's browser tests will be skipped"
  else
    echo "==> chromium is missing and this is not root: the console's browser tests will be skipped"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$(stamp_of)" ]; then
  echo "==> $VENV is up to date"
  exit 0
fi
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
echo "==> installing $TORCH"
"$VENV/bin/python" -m pip install -q $TORCH
echo "==> installing the project with extras [$EXTRAS]"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
"$VENV/bin/python" -m pip check
stamp_of > "$VENV/.setup-stamp"
echo "==> ready: $VENV"
