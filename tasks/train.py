"""Prefect task: train one autoencoder on the activation cache (resumes from its checkpoint)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypedDict

from prefect import task

from tasks.common import CACHE_POLICY, gpu_slot, progress_log, run_logger
from tasks.configs import BATCH_TOKENS, train_config
from tasks.extract import CacheManifest
from tasks.lens import LensManifest, load_lens


class TrainManifest(TypedDict):
    sae_id: str
    sae_dir: str
    """The saved autoencoder (safetensors + config.json): MLSAE.from_pretrained(sae_dir)."""
    run_dir: str
    """Training directory: checkpoints (what a killed run resumes from) and the final SAE."""
    role: str
    layers: list[int]
    train_tokens: int
    steps: int
    resumed_from_step: int
    """0 for a fresh run; the checkpoint's step when a killed run was continued."""
    final_fvu: float | None
    seconds: float


def autoencoder_dir(out: str, sae_id: str) -> Path:
    # Not <out>/saes: that directory is the `saes` table.
    return Path(out) / "autoencoders" / sae_id


@task(name="train-autoencoder", cache_policy=CACHE_POLICY)
def train_autoencoder(spec: dict[str, Any], model: dict[str, Any], data: str,
                      cache: CacheManifest, lens: LensManifest | None, train_tokens: int,
                      seed: int, lr: float, device: str, out: str,
                      batch_tokens: int = BATCH_TOKENS) -> TrainManifest:
    """Train (or finish training) one MLSAE / single-layer SAE of the plan."""
    from mlsae.cache import ActivationCache
    from mlsae.sae import train_sae

    cfg = train_config(spec, model, data, lens["lens"] if lens else None, train_tokens, seed, lr,
                       device, batch_tokens)
    run_dir = autoencoder_dir(out, spec["sae_id"])
    basis = None
    if lens is not None:
        from mlsae.models import load_model

        basis = load_lens(lens, load_model(model["name"], device="cpu"), out)
    logger = run_logger()
    logger.info("training %s: %s, R=%d (%d latents), k=%d, layers %s, %d tokens in %d steps",
                spec["sae_id"], spec["role"], spec["expansion_factor"], cfg.sae.n_latents,
                spec["k"], spec["layers"], train_tokens, cfg.n_steps)
    start = time.perf_counter()
    with gpu_slot(device):
        result = train_sae(cfg, ActivationCache.open(cache["cache_dir"]), run_dir, basis=basis,
                           progress_log=progress_log())
    if result.resumed_from_step:
        logger.info("%s: continued from the checkpoint at step %d of %d", spec["sae_id"],
                    result.resumed_from_step, cfg.n_steps)
    last = result.history[-1] if result.history else {}
    return TrainManifest(
        sae_id=spec["sae_id"], sae_dir=str(result.sae_dir), run_dir=str(run_dir),
        role=spec["role"], layers=list(spec["layers"]), train_tokens=train_tokens,
        steps=result.steps, resumed_from_step=result.resumed_from_step,
        final_fvu=last.get("fvu"), seconds=round(time.perf_counter() - start, 2))
