"""Benchmark: one MLSAE training step vs the bare encoder matmul of the same shape.

    .venv/bin/python benchmarks/bench_train.py [--threads 2] [--steps 10] [--json out.json]
        [--device cuda] [--dtype bfloat16]

For each shape (d, n, k, examples per step), fp32, it times the full optimizer step
(mlsae.sae.step.train_step: encoder matmul + top-k, sparse decode, FVU loss, sparse
backward, decoder-gradient projection, Adam, renormalization) and the bare matmul
x[N, d] @ W_enc[n, d]^T in the SAME run, interleaved, and reports the ratio of their
medians (the floor is 1.0; the matmul writes into a preallocated output, the strict
floor, and the ratio to a matmul allocating its output is reported beside it), examples/s, and peak memory above the setup baseline
(RSS high-water mark on CPU, max allocated on CUDA). Targets (issue 3): <= 2.0x at
(256, 4096, 32, 8192) and <= 1.5x at (512, 16384, 32, 4096).
`--dtype bfloat16|float16` runs the step's encoder matmul under that compute dtype
(train_step's compute_dtype, as `mlsae run --precision`) and the floor matmul in it
(default float32, unchanged). `--breakdown` also times the step's parts; `--torch-topk` disables the compiled C
kernels (top-k, counting sort): the pure-torch fallback path, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"small": (256, 4096, 32, 8192), "large": (512, 16384, 32, 4096)}
TARGETS = {"small": 2.0, "large": 1.5}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def bench_shape(name: str, steps: int, device: str, breakdown: bool,
                dtype: str = "float32") -> dict:
    import torch

    from mlsae.sae.config import SAEConfig
    from mlsae.sae.model import MLSAE
    from mlsae.sae.step import DeadCounter, make_optimizer, train_step

    d, n, k, n_examples = SHAPES[name]
    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    n_pos = 4  # rows spread over 4 layer slots, as in a multi-layer batch
    cfg = SAEConfig(d_model=d, n_layers=n_pos, n_latents=n, k=k)
    sae = MLSAE(cfg, seed=0, device=device)
    opt = make_optimizer(sae)
    gen = torch.Generator().manual_seed(0)
    # anisotropic inputs with a mean offset, like residual-stream vectors
    scale_D = torch.rand(d, generator=gen) * 2 + 0.1
    x_ND = (torch.randn(n_examples, d, generator=gen) * scale_D + 0.5).to(device)
    pos_N = (torch.arange(n_examples) % n_pos).to(device)
    dead = DeadCounter(n, device)
    sae.init_bias(x_ND[:2048])
    W = sae.W_enc_MD.detach().clone().to(compute or torch.float32)
    x_in = x_ND.clone().to(compute or torch.float32)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        train_step(sae, opt, x_ND, pos_N, n_pos, dead=dead, compute_dtype=compute)
        sync()

    out = torch.empty(n_examples, n, device=device, dtype=x_in.dtype)

    def matmul() -> None:  # the floor: output preallocated, as the step's own buffer is
        torch.mm(x_in, W.t(), out=out)
        sync()

    def matmul_fresh() -> None:  # plain x @ W^T, allocating its output every call
        torch.mm(x_in, W.t())
        sync()

    for _ in range(2):  # warm-up: allocator, kernel build, Adam state
        step()
        matmul()
        matmul_fresh()
    base_kib = _rss_kib("VmRSS")
    peak_ok = _reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t_step, t_mm, t_fresh = [], [], []
    for _ in range(steps):  # interleaved, so load from other processes hits all alike
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        matmul()
        t2 = time.perf_counter()
        matmul_fresh()
        t3 = time.perf_counter()
        t_step.append(t1 - t0)
        t_mm.append(t2 - t1)
        t_fresh.append(t3 - t2)
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak_mib = (_rss_kib("VmHWM") - base_kib) / 1024 if peak_ok else float("nan")
    step_s, mm_s = statistics.median(t_step), statistics.median(t_mm)
    fresh_s = statistics.median(t_fresh)
    result = {
        "shape": name, "d": d, "n": n, "k": k, "examples_per_step": n_examples,
        "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
        "step_ms": round(step_s * 1e3, 1), "matmul_ms": round(mm_s * 1e3, 1),
        "ratio": round(step_s / mm_s, 3), "ratio_of_mins": round(min(t_step) / min(t_mm), 3),
        "matmul_fresh_ms": round(fresh_s * 1e3, 1), "ratio_vs_fresh_matmul": round(step_s / fresh_s, 3),
        "target": TARGETS[name], "examples_per_s": round(n_examples / step_s),
        "peak_mem_above_setup_mib": round(peak_mib, 1),
        "matmul_gflops": round(2 * n_examples * d * n / mm_s / 1e9, 1),
    }
    if breakdown:
        result["breakdown_ms"] = _breakdown(sae, x_ND, k, n, sync)
    return result


def _breakdown(sae, x_ND, k, n, sync) -> dict:
    import torch

    from mlsae.sae import kernels

    def timed(fn, reps=5) -> float:
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return round(statistics.median(ts) * 1e3, 1)

    z = sae.standardize(x_ND).z_ND
    xin = (z - sae.b_D).detach()
    W = sae.W_enc_MD.detach()
    pre = xin @ W.t()
    vals, idx = kernels.topk_select(pre, k)
    acts = vals.relu()
    g = torch.randn_like(x_ND)
    return {
        "matmul": timed(lambda: xin @ W.t()),
        "topk_select": timed(lambda: kernels.topk_select(pre, k)),
        "torch_topk": timed(lambda: pre.topk(k, dim=1, sorted=False)),
        "decode_fwd": timed(lambda: kernels.sparse_decode(idx, acts, sae.W_dec_MD.detach())),
        "gather_dot": timed(lambda: kernels.gather_dot(idx, sae.W_dec_MD.detach(), g)),
        "sparse_t_matmul": timed(lambda: kernels.sparse_t_matmul(idx, acts, g, n)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shapes", default="small,large")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute dtype of the step's encoder matmul and of the floor")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--torch-topk", action="store_true",
                        help="disable the compiled C kernels (pure-torch fallback path)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.torch_topk:
        os.environ["MLSAE_C_KERNELS"] = "0"
    import torch

    torch.set_num_threads(args.threads)
    from mlsae.sae import ckernels

    results = []
    for name in args.shapes.split(","):
        r = bench_shape(name, args.steps, args.device, args.breakdown, args.dtype)
        r["compiled_kernels"] = ckernels.available()
        results.append(r)
        ok = "OK" if r["ratio"] <= r["target"] else "ABOVE TARGET"
        print(f"{name} ({r['dtype']}, {r['device']}): d={r['d']} n={r['n']} k={r['k']} N={r['examples_per_step']}: "
              f"step {r['step_ms']} ms = {r['ratio']}x matmul {r['matmul_ms']} ms "
              f"(target <= {r['target']}x, {ok}; {r['ratio_vs_fresh_matmul']}x a matmul that "
              f"allocates its output); {r['examples_per_s']:,} examples/s; "
              f"peak +{r['peak_mem_above_setup_mib']} MiB", flush=True)
        if "breakdown_ms" in r:
            print(f"  breakdown (ms): {r['breakdown_ms']}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average during the run: {load:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "loadavg": load}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
