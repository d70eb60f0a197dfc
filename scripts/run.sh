#!/usr/bin/env bash
# Set up (or reuse) a local venv with torch 2.14.1 + torchvision 0.29.1 and this package, then run:
#   bash scripts/run.sh demo [demo flags]   the whole path on the embedded digits dataset
#   bash scripts/run.sh test [pytest flags] the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 and diffusion-unlearn into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi

cmd=${1:-}
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/diffusion-unlearn" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [args]" >&2; exit 2 ;;
esac
