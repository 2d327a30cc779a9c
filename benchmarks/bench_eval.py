"""Evaluation and latent logging at real shape: Pythia-70m-shaped random model, 2048-token
sequences, an R 64 / k 32 MLSAE, beside the bare forward passes in the same run.

    .venv/bin/python benchmarks/bench_eval.py [--model 70m] [--sequences 4] [--threads 2]
        [--json-out eval.json]

Each measurement runs in its own process (its peak RSS is its own), on the same
held-out sequences of the embedded corpus (tokens < 8192 < the model's 50,304):

- forward:  model(input_ids).logits, the clean forward pass (the floor), one sequence a pass;
- capture:  the extraction pass (every block output, mlsae.hooks.capture_residuals);
- evaluate: mlsae.sae.evaluate.evaluate_saes at the default memory budget (the clean pass
            once per batch, each layer spliced from the clean pass's block output);
- before:   the previous algorithm (every spliced pass recomputes the prefix; CE/KL from
            chunked logits, as in 723bfcb), one sequence a pass;
- log:      mlsae.latents.log_latents (capture + encode + Parquet) into a fresh warehouse.

Goals (issue 17): evaluation peak RSS under 4 GiB at the default budget; all L layers
evaluated in no more than (1 + L/2) clean forward passes' time; latent logging within
1.5x of the extraction pass's tokens/s. Prints a Markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

R, K = 64, 32
MODES = ("forward", "capture", "evaluate", "before", "log")


def _measure(mode: str, model_dir: Path, sequences: int, threads: int, work: Path) -> dict:
    """One measurement in this process: tokens, seconds, peak RSS."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from mlsae.data import DataConfig, load_sequences
    from mlsae.hooks import capture_residuals, final_hidden_states, unembedding
    from mlsae.models import load_model
    from mlsae.sae import MLSAE, SAEConfig
    from mlsae.sae.evaluate import chunked_ce_kl, evaluate_saes, reconstruct

    loaded = load_model(str(model_dir), device="cpu")
    model = loaded.model
    cfg = model.config
    data = DataConfig(split="test", seq_len=2048, max_sequences=sequences)
    tokens_BT = torch.as_tensor(np.asarray(load_sequences(data, loaded.tokenizer).tokens_BT),
                                dtype=torch.long)
    sae = MLSAE(SAEConfig(d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
                          expansion_factor=R, k=K, k_aux=256), seed=0)
    lines: list[str] = []
    n_tokens = tokens_BT.numel()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    if mode == "forward":
        with torch.inference_mode():
            for ids in tokens_BT.split(1):
                model(input_ids=ids, use_cache=False).logits.sum()
    elif mode == "capture":
        for ids in tokens_BT.split(1):
            capture_residuals(model, ids, None)
    elif mode == "evaluate":
        evaluate_saes([sae], loaded, data, progress_log=lines.append)
    elif mode == "before":
        unembed = unembedding(model)
        vocab = model.get_output_embeddings().weight.shape[0]
        for ids in tokens_BT.split(1):
            mask = torch.ones_like(ids, dtype=torch.bool)
            h_clean = final_hidden_states(model, ids)
            spliced = {}
            for layer in range(cfg.num_hidden_layers):
                def replace(h, layer=layer, mask=mask):
                    out = h.clone()
                    out[mask] = reconstruct(sae, h[mask].float(), layer)[0]
                    return out
                spliced[layer] = final_hidden_states(model, ids, layer, replace)
            chunked_ce_kl(unembed, h_clean, spliced, ids, mask, vocab)
    elif mode == "log":
        from mlsae import warehouse
        from mlsae.latents import LatentLogConfig, log_latents

        sae_dir = work / "sae"
        sae.save_pretrained(sae_dir)
        out = work / "wh"
        warehouse.init_warehouse(out)
        log_latents(sae_dir, loaded, data, out, "bench", config=LatentLogConfig(device="cpu"),
                    progress_log=lines.append)
    seconds = time.perf_counter() - start
    return {"mode": mode, "tokens": n_tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(n_tokens / seconds, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "batch_line": next((line for line in lines if "per pass" in line), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="70m", choices=("70m", "160m"))
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_model-dir", dest="model_dir", type=Path, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(_measure(args._one, args.model_dir, args.sequences, args.threads,
                                      Path(work))))
        return

    from bench_scale import build_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.model, Path(tmp) / "model")
        results = {}
        for mode in args.modes.split(","):
            done = subprocess.run(
                [sys.executable, __file__, "--_one", mode, "--_model-dir", str(model_dir),
                 "--sequences", str(args.sequences), "--threads", str(args.threads)],
                capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode}: {results[mode]}", file=sys.stderr, flush=True)
    n_layers = {"70m": 6, "160m": 12}[args.model]
    forward_s = results.get("forward", {}).get("seconds")
    print(f"\nPythia-{args.model} shape, R {R} k {K}, {args.sequences} x 2048 tokens, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.2f}\n")
    print("| pass | tokens/s | x clean forward time | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for mode, r in results.items():
        ratio = f"{r['seconds'] / forward_s:.2f}" if forward_s else "-"
        print(f"| {mode} | {r['tokens_per_s']:,.1f} | {ratio} | {r['peak_rss_gib']} |")
    if forward_s and "evaluate" in results:
        print(f"\nevaluation: {results['evaluate']['seconds'] / forward_s:.2f} clean forward "
              f"passes' time (goal <= 1 + L/2 = {1 + n_layers / 2:g}); "
              f"{results['evaluate']['batch_line']}")
    if "before" in results and "evaluate" in results:
        print(f"before -> now: {results['before']['seconds'] / results['evaluate']['seconds']:.2f}x"
              " faster")
    if "log" in results and "capture" in results:
        print(f"latent logging: {results['capture']['tokens_per_s'] / results['log']['tokens_per_s']:.2f}x"
              " the extraction pass's time per token (goal <= 1.5)")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
