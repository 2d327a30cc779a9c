"""What a planned run will cost, before it starts: disk, RAM and an estimated wall time.

Sizes come from the plan (cache bytes, latent rows x the measured bytes per row).
Time comes from a short probe on the plan's device: a timed forward pass of the
model over one batch of sequences (block outputs captured, as extraction does)
and a few timed optimizer steps of each distinct autoencoder shape on a small
batch, scaled to the budget. Evaluation is modelled as the forward passes it
runs (clean + one splice per layer for an MLSAE) plus encoding; a fixed
orchestration cost per task covers Prefect and model loading.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from mlsae.plan import (
    CACHE_BYTES_PER_VALUE,
    Plan,
    run_settings,
    train_config,
)

SERVER_START_S = 12.0
"""A temporary Prefect server becoming healthy (ENV.md: ~10 s)."""
PER_TASK_S = 0.3
"""Prefect's own cost per task run (the model load is measured by the probe)."""
FIGURES_PER_MLSAE_S = 2.0
PROBE_EXAMPLES = 4096


def _probe_forward(plan: Plan) -> tuple[float, float]:
    """(seconds to load the model, seconds per token of its forward pass with the block
    outputs captured)."""
    import torch

    from mlsae.hooks import capture_residuals
    from mlsae.models import load_model
    from mlsae.plan import extract_config

    try:  # the dry run prints the plan, not transformers' weight-loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    cfg = extract_config(run_settings(plan))
    load_model(plan["model"]["name"], device=plan["device"], dtype=cfg.model_dtype)
    start = time.perf_counter()  # a second load: what each task pays (imports done)
    loaded = load_model(plan["model"]["name"], device=plan["device"], dtype=cfg.model_dtype)
    device = next(loaded.model.parameters()).device
    load_s = time.perf_counter() - start
    vocab = plan["model"].get("vocab_size") or 1000
    seq_len = plan["seq_len"]
    batch = max(1, min(cfg.batch_size, 8192 // seq_len))
    ids_BT = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        capture_residuals(loaded.model, ids_BT.to(device), plan["layers"]).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return load_s, min(times) / (batch * seq_len)


def _probe_sae_step(plan: Plan, spec: dict[str, Any]) -> float:
    """Seconds per training example of one autoencoder shape (a few steps on a small batch)."""
    import torch

    from mlsae.models import resolve_device
    from mlsae.sae.model import MLSAE
    from mlsae.sae.step import DeadCounter, make_optimizer, train_step

    cfg = train_config(plan, spec)
    device = resolve_device(plan["device"])
    sae = MLSAE(cfg.sae, seed=0, device=device)
    optimizer = make_optimizer(sae, cfg.lr, cfg.betas, cfg.adam_eps)
    dead = DeadCounter(cfg.sae.n_latents, device)
    n_pos = len(spec["layers"])
    rows = PROBE_EXAMPLES - PROBE_EXAMPLES % n_pos
    x_ND = torch.randn(rows, cfg.sae.d_model, generator=torch.Generator().manual_seed(0)
                       ).to(device)
    slot_N = torch.arange(n_pos, device=device).repeat(rows // n_pos)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.autocast or "")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        train_step(sae, optimizer, x_ND, slot_N, n_pos, dead=dead, compute_dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:]) / rows


def estimate_plan(plan: Plan, probe: bool = True, trained: Iterable[str] = ()) -> dict[str, Any]:
    """The plan's cost as one JSON-able dict (what `--dry-run --json` prints). trained: the
    plan's autoencoders already trained in the warehouse (warehouse.trained_autoencoders):
    a rerun does not train them again, so their training is not counted."""
    model = plan["model"]
    n_layers, d_model = len(plan["layers"]), model["d_model"]
    eval_seqs = -(-plan["eval_tokens"] // plan["seq_len"])
    eval_tokens = eval_seqs * plan["seq_len"]
    mlsaes = [s for s in plan["specs"] if s["role"] == "mlsae"]
    disk = plan.get("disk") or {}
    latents_rows = disk.get("latents_rows", 0)
    shuffle_tokens = train_config(plan, plan["specs"][0]).shuffle_tokens
    shuffle_bytes = shuffle_tokens * n_layers * d_model * CACHE_BYTES_PER_VALUE
    checkpoint_bytes = disk.get("checkpoints", 0)
    estimate: dict[str, Any] = {
        "model": model["name"], "n_layers": model["n_layers"], "d_model": d_model,
        "preset": plan["request"]["preset"], "device": plan["device"],
        "layers": plan["layers"], "train_tokens": plan["train_tokens"],
        "batch_tokens": plan["batch_tokens"],
        "steps": max(1, plan["train_tokens"] // plan["batch_tokens"]),
        "eval_tokens": eval_tokens, "seq_len": plan["seq_len"],
        "training_source": plan["training_source"],
        "cache_bytes": plan["cache_bytes"], "cache_limit_bytes": plan["cache_limit_bytes"],
        "cache_bytes_written": plan["cache_bytes"] if plan["training_source"] == "cache" else 0,
        "cache_shared": bool(plan["budget"].get("shared_cache"))
        and plan["training_source"] == "cache",
        "shuffle_buffer_bytes": shuffle_bytes, "checkpoint_bytes": checkpoint_bytes,
        "latents_rows": latents_rows,
        "latents_bytes": disk.get("latents", 0), "disk_free_bytes": disk.get("free"),
        "corpus_tokens": plan.get("corpus_tokens") or {}, "notes": list(plan.get("notes") or []),
        "saes": [dict(s) for s in plan["specs"]],
        "already_trained": sorted(set(trained) & {s["sae_id"] for s in plan["specs"]}),
        "estimated_seconds": None, "stages_seconds": None, "probe": None,
    }
    if not probe:
        return estimate
    load_s, s_per_token = _probe_forward(plan)
    s_per_example: dict[tuple[int, int, int], float] = {}
    for spec in plan["specs"]:
        key = (spec["n_latents"], spec["k"], len(spec["layers"]))
        if key not in s_per_example:
            s_per_example[key] = _probe_sae_step(plan, spec)
    # the model runs for training only while some autoencoder still trains
    all_trained = len(estimate["already_trained"]) == len(plan["specs"])
    forward_s = 0.0 if all_trained else forward_tokens(plan) * s_per_token
    train_s = sum(plan["train_tokens"] * len(s["layers"])
                  * s_per_example[(s["n_latents"], s["k"], len(s["layers"]))]
                  for s in plan["specs"] if s["sae_id"] not in estimate["already_trained"])
    # Evaluation: one clean pass to the logits, shared by every autoencoder, then each
    # autoencoder's splices (splice_flops), timed at the capture pass's seconds per flop.
    d, blocks = model["d_model"], model["n_layers"]
    vocab = model.get("vocab_size") or 50_000
    used = max(plan["layers"]) + 1
    s_per_flop = s_per_token / (24 * d * d * used)
    full = s_per_flop * (24 * d * d * blocks + 2 * d * vocab + 20 * vocab)
    eval_s = eval_tokens * full
    for s in plan["specs"]:
        encode = eval_tokens * len(s["layers"]) * s_per_example[
            (s["n_latents"], s["k"], len(s["layers"]))] / 3
        eval_s += eval_tokens * s_per_flop * splice_flops(d, blocks, vocab, s["layers"]) + encode
        if s["role"] == "mlsae":  # logging the latents: one more capture pass + encode
            eval_s += eval_tokens * s_per_token + encode
    # Figures: MMCS compares every decoder column with every other (and with the
    # baselines'): ~2 n^2 d flops each, at the SAE probe's flop rate (~6 n d per example).
    figures_s = 0.0
    for s in mlsaes:
        key = (s["n_latents"], s["k"], len(s["layers"]))
        flop_rate = 6 * s["n_latents"] * d / s_per_example[key]
        peers = sum(b["role"] == "baseline" and (b["expansion_factor"], b["k"], b["lens"])
                    == (s["expansion_factor"], s["k"], s["lens"]) for b in plan["specs"])
        figures_s += FIGURES_PER_MLSAE_S + 2 * s["n_latents"] ** 2 * d * (1 + 2 * peers) \
            / flop_rate + 4 * full * 16  # + the Fig. 3 prompt
    n_train_tasks = 1 if plan["training_source"] == "stream" else 1 + len(plan["specs"])
    # Tasks that load the model: training (one streaming task, or extraction + each SAE),
    # the evaluation, each latent logging, the figures.
    loading = n_train_tasks + 1 + len(mlsaes) + 1
    n_tasks = loading + 1 + len(mlsaes)  # + validation and each analysis
    overhead = SERVER_START_S + PER_TASK_S * n_tasks + load_s * loading + figures_s
    stages = {"extract_or_stream_forward": forward_s, "train_sae_steps": train_s,
              "evaluate_and_log": eval_s, "orchestration": overhead}
    estimate.update(
        estimated_seconds=round(sum(stages.values()), 1),
        stages_seconds={k: round(v, 1) for k, v in stages.items()},
        probe={"forward_tokens_per_s": round(1 / s_per_token, 1),
               "model_load_s": round(load_s, 2),
               "sae_examples_per_s": {f"n{n}-k{k}-L{layers}": round(1 / v, 1)
                                      for (n, k, layers), v in s_per_example.items()}})
    return estimate


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1000
    return f"{n:,.1f} PB"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(e: dict[str, Any], dry_run: bool = True) -> str:
    """The plan as a few readable lines (what `--dry-run` prints)."""
    lines = [
        f"Plan for {e['model']} ({e['n_layers']} blocks x d_model {e['d_model']}), preset "
        f"{e['preset']}, device {e['device']}:",
        f"  {e['train_tokens']:,} training tokens per layer on layers {e['layers']}, "
        f"{e['steps']:,} steps of {e['batch_tokens']:,} tokens; {e['eval_tokens']:,} held-out "
        f"tokens; sequences of {e['seq_len']}",
        f"  training source: {e['training_source']} (cache would be {format_bytes(e['cache_bytes'])}; "
        f"limit {format_bytes(e['cache_limit_bytes'])}; written: {format_bytes(e['cache_bytes_written'])})",
        *([f"  shared cache (--shared-cache): for a warehouse at a URL the cache's "
           f"{format_bytes(e['cache_bytes_written'])} also go to the bucket (uploaded once, "
           "stored there, downloaded by each other worker instead of running the model); a "
           "local warehouse holds it already"] if e.get("cache_shared") else []),
        f"  shuffle buffer RAM ~{format_bytes(e['shuffle_buffer_bytes'])}; checkpoints "
        f"~{format_bytes(e['checkpoint_bytes'])}",
        f"  latent table ~{e['latents_rows']:,} rows, ~{format_bytes(e['latents_bytes'])}"
        + (f"; the warehouse's disk has {format_bytes(e['disk_free_bytes'])} free"
           if e.get("disk_free_bytes") is not None else ""),
    ]
    if e.get("corpus_tokens"):
        corpus = e["corpus_tokens"]
        lines.append(f"  data: ~{corpus['train']:,} training and ~{corpus['test']:,} held-out "
                     "tokens")
    lines += [f"  note: {note}" for note in e.get("notes") or []]
    done = set(e.get("already_trained") or [])
    lines.append(f"  {len(e['saes'])} autoencoder(s)"
                 + (f", {len(done)} already trained in this warehouse (their training is not "
                    "counted below)" if done else "") + ":")
    for s in e["saes"]:
        lines.append(f"    {s['sae_id']}: {s['role']}, R {s['expansion_factor']} "
                     f"({s['n_latents']:,} latents), k {s['k']}, layers {s['layers']}"
                     f"{', tuned lens' if s['lens'] else ''}"
                     f"{' (trained)' if s['sae_id'] in done else ''}")
    if e["estimated_seconds"] is not None:
        stages = ", ".join(f"{k.replace('_', ' ')} {format_duration(v)}"
                           for k, v in e["stages_seconds"].items())
        lines.append(f"  estimated wall time: {format_duration(e['estimated_seconds'])} ({stages})")
        lines.append(f"  probe: forward {e['probe']['forward_tokens_per_s']:,.0f} tokens/s; SAE "
                     + ", ".join(f"{k} {v:,.0f} examples/s"
                                 for k, v in e["probe"]["sae_examples_per_s"].items()))
    if dry_run:
        lines.append("Nothing was written (--dry-run).")
    return "\n".join(lines)


def forward_tokens(plan: Plan) -> int:
    """Tokens the model runs on for training: the budget, but a cache holds at most the
    training split (epochs reread it)."""
    tokens = -(-plan["train_tokens"] // plan["seq_len"]) * plan["seq_len"]
    corpus = (plan.get("corpus_tokens") or {}).get("train")
    if plan["training_source"] == "cache" and corpus:
        tokens = min(tokens, corpus)
    return tokens


def splice_flops(d: int, blocks: int, vocab: int, layers: list[int]) -> float:
    """Flops per token of splicing each of `layers` after the shared clean pass: the blocks
    after the spliced one (mlsae.hooks.tail_forward), the unembedding, and the softmax /
    CE / KL over the vocabulary (about 20 operations per logit)."""
    return sum(24 * d * d * (blocks - 1 - layer) + 2 * d * vocab + 20 * vocab
               for layer in layers)


def step_flops(plan: Plan) -> dict[str, float]:
    """Approximate floating-point work of each step of the run (for the whole run's ETA):
    a transformer forward pass ~ 24 d^2 per block per token (+ 2 d V for the unembedding),
    an SAE training step ~ 6 n d per example (encoder forward and backward dominate),
    encoding ~ 2 n d. Keys: "extract", "stream", "train:<id>", "log:<id>", "evaluate",
    "analyse:<id>", "figures"."""
    model = plan["model"]
    d, blocks = model["d_model"], model["n_layers"]
    vocab = model.get("vocab_size") or 50_000
    used = max(plan["layers"]) + 1
    capture = 24 * d * d * used
    full = 24 * d * d * blocks + 2 * d * vocab
    train_tokens, eval_tokens = plan["train_tokens"], plan["eval_tokens"]
    flops: dict[str, float] = {}
    train = {s["sae_id"]: 6 * s["n_latents"] * d * train_tokens * len(s["layers"])
             for s in plan["specs"]}
    if plan["training_source"] == "stream":
        flops["stream"] = capture * train_tokens + sum(train.values())
    else:
        flops["extract"] = capture * forward_tokens(plan)
        flops.update({f"train:{k}": v for k, v in train.items()})
    flops["evaluate"] = full * eval_tokens
    for s in plan["specs"]:
        encode = 2 * s["n_latents"] * d * eval_tokens * len(s["layers"])
        flops["evaluate"] += splice_flops(d, blocks, vocab, s["layers"]) * eval_tokens + encode
        if s["role"] == "mlsae":
            flops[f"log:{s['sae_id']}"] = capture * eval_tokens + encode
            flops[f"analyse:{s['sae_id']}"] = 0.01 * encode
    flops["figures"] = 0.05 * sum(flops.values()) / max(1, len(flops))
    return flops
