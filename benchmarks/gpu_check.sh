#!/usr/bin/env bash
# One-shot GPU check for mlsae (issue 11, section 4). Run on a CUDA machine from the repo root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. nvidia-smi and torch.cuda (device name, capability, bf16 support);
# 2. benchmarks/bench_train.py on cuda, fp32 and bf16: the training step vs the bare encoder
#    matmul of the same shape;
# 3. benchmarks/bench_extract.py on cuda: extraction tokens/s vs the plain forward pass (the
#    embedded 6 x 256 model, sequences of 1024, its maximum);
# 4. benchmarks/bench_scale.py --models 70m --device cuda --precision bfloat16: the real
#    `mlsae run --preset paper --cache-limit 0` (streaming) on a random model of Pythia-70m's
#    exact architecture for a few minutes, printing tokens/s and the projected hours for the
#    full 1B training tokens.
# Everything is written under OUT_DIR (default ./gpu-check-<date>): logs + JSON. Exits 2 with
# a message when no CUDA GPU is visible to torch. Budget of step 4 (env overrides):
# GPU_TRAIN_TOKENS (default 16,777,216 = 128 steps of 131,072), GPU_EVAL_TOKENS (262,144),
# GPU_BATCH_TOKENS (131,072: the paper's), GPU_RUN_TIMEOUT (1800 s).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false

if [ ! -x "$PY" ]; then
  echo "gpu_check: no Python at $PY (set PYTHON=...)" >&2
  exit 2
fi

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi || echo "(nvidia-smi failed)"
else
  echo "(nvidia-smi not found)"
fi

echo "== torch.cuda"
if ! "$PY" - <<'PY'
import sys
import torch
print("torch", torch.__version__, "cuda build", torch.version.cuda)
if not torch.cuda.is_available():
    print("torch.cuda.is_available() is False", file=sys.stderr)
    sys.exit(2)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
print("bf16 supported:", torch.cuda.is_bf16_supported())
PY
then
  echo "gpu_check: no CUDA GPU visible to torch ($PY): nothing to check here. Run this on a" \
       "machine with an NVIDIA GPU and a CUDA build of torch." >&2
  exit 2
fi

mkdir -p "$OUT"
echo "== results in $OUT"
status=0

echo "== bench_train.py, cuda, float32"
"$PY" benchmarks/bench_train.py --device cuda --dtype float32 --json "$OUT/train_fp32.json" \
  2>&1 | tee "$OUT/train_fp32.log" || status=1
echo "== bench_train.py, cuda, bfloat16"
"$PY" benchmarks/bench_train.py --device cuda --dtype bfloat16 --json "$OUT/train_bf16.json" \
  2>&1 | tee "$OUT/train_bf16.log" || status=1

echo "== bench_extract.py, cuda"
"$PY" benchmarks/bench_extract.py --device cuda --sequences 256 --seq-len 1024 --batch-size 16 \
  2>&1 | tee "$OUT/extract.log" || status=1

echo "== bench_scale.py: streaming --preset paper on a Pythia-70m-shaped model, cuda, bf16"
"$PY" benchmarks/bench_scale.py --models 70m --device cuda --precision bfloat16 \
  --train-tokens "${GPU_TRAIN_TOKENS:-16777216}" --eval-tokens "${GPU_EVAL_TOKENS:-262144}" \
  --batch-tokens "${GPU_BATCH_TOKENS:-131072}" --seq-len 2048 \
  --timeout "${GPU_RUN_TIMEOUT:-1800}" --logs "$OUT" --json-out "$OUT/scale.json" \
  2>&1 | tee "$OUT/scale.log" || status=1

echo "== done (status $status); figures in $OUT: paste them into docs/scale.md"
exit $status
