#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv with mlsae installed
# in editable mode plus the dev tools, the interop extra (SAELens, sparsify: the export
# tests load files with them), s3 (warehouses on object storage) and dask (the sweep's
# Dask task runner, tested on a LocalCluster). Idempotent: does nothing when .venv is up
# to date with pyproject.toml. Used by `make run` / `make test` (and so by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.installed"
PY=${PYTHON:-python3}

# The explorer's browser tests (tests/test_serve_browser.py) drive the system's headless
# Chromium: Debian's chromium + chromium-driver, installed here when missing (as root, or
# with password-less sudo); otherwise a message says how, and those tests are skipped.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: no chromium/chromedriver and no apt-get: install Chromium and its" \
         "driver to run the explorer's browser tests (they are skipped until then)" >&2
  else
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
      if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n); fi
    fi
    if [ "$(id -u)" -eq 0 ] || [ ${#SUDO[@]} -gt 0 ]; then
      echo "bootstrap: installing chromium + chromium-driver for the browser tests..." >&2
      if ! { "${SUDO[@]}" apt-get update -qq &&
             DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq \
               chromium chromium-driver >/dev/null; }; then
        echo "bootstrap: apt-get could not install chromium chromium-driver; the browser" \
             "tests will be skipped" >&2
      fi
    else
      echo "bootstrap: chromium/chromedriver missing and not root: run" \
           "'sudo apt-get install -y chromium chromium-driver' to run the explorer's" \
           "browser tests (they are skipped until then)" >&2
    fi
  fi
fi

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

"${PIP[@]}" -e ".[dev,interop,s3,dask]"
touch "$STAMP"
echo "bootstrap: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
