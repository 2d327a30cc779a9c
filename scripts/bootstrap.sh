#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv with mlsae installed
# in editable mode plus the dev tools. Idempotent: does nothing when .venv is up to
# date with pyproject.toml. Used by `make run` / `make test` (and so by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.installed"
PY=${PYTHON:-python3}

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ -x "$VENV/bin/mlsae" ]; then
  exit 0
fi

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "mlsae needs Python >= 3.11 (found $("$PY" --version)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

echo "bootstrap: creating $VENV and installing mlsae (about a minute)..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch: on a machine without an NVIDIA GPU take the CPU build 2.13.0 (a local wheel
# on our build machines); an unpinned torch would pull several GB of CUDA packages.
# With a GPU, install the CUDA build you want into .venv first: an installed torch
# that satisfies pyproject's range is kept as is.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

"${PIP[@]}" -e ".[dev]"
touch "$STAMP"
echo "bootstrap: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
