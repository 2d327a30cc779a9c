"""Prefect tasks: train autoencoders, from the activation cache (one task each) or from
one streaming pass of the model (one task for the plan's whole group). Both resume from
their checkpoints and stop at a step boundary when a stop is requested (Ctrl-C)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypedDict

from prefect import task

from tasks.common import CACHE_POLICY, gpu_slot, progress_log, run_logger
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
    """<out>/autoencoders/<sae_id> (mlsae.warehouse.autoencoder_dir) in the directory this
    worker writes (a URL warehouse's working copy)."""
    from mlsae.warehouse import autoencoder_dir as in_warehouse
    from mlsae.warehouse import working_dir

    return in_warehouse(working_dir(out), sae_id)


def flatten_trained(trained: list[Any]) -> list[TrainManifest]:
    """Manifests from a list of training results (one manifest, or a streaming group's list)."""
    return [m for item in trained for m in ([item] if isinstance(item, dict) else item)]


def pick_trained(trained: TrainManifest | list[TrainManifest], sae_id: str) -> TrainManifest:
    """The manifest of `sae_id` from one task's manifest or a streaming group's list."""
    found = [trained] if isinstance(trained, dict) else list(trained)
    for manifest in found:
        if manifest["sae_id"] == sae_id:
            return manifest
    raise KeyError(f"no trained autoencoder {sae_id!r} among {[m['sae_id'] for m in found]}")


def _manifest(spec: dict[str, Any], settings: dict, out: str, run_dir: Path, result,
              seconds: float) -> TrainManifest:
    from mlsae.warehouse import public_path

    last = result.history[-1] if result.history else {}
    return TrainManifest(
        sae_id=spec["sae_id"], sae_dir=public_path(out, result.sae_dir),
        run_dir=public_path(out, run_dir),
        role=spec["role"], layers=list(spec["layers"]), train_tokens=settings["train_tokens"],
        steps=result.steps, resumed_from_step=result.resumed_from_step,
        final_fvu=last.get("fvu"), seconds=round(seconds, 2))


@task(name="train-autoencoder", cache_policy=CACHE_POLICY)
def train_autoencoder(spec: dict[str, Any], settings: dict, cache: CacheManifest,
                      lens: LensManifest | None, out: str) -> TrainManifest:
    """Train (or finish training) one MLSAE / single-layer SAE of the plan from the cache."""
    from mlsae.cache import ActivationCache
    from mlsae.interrupt import stop_requested
    from mlsae.plan import train_config
    from mlsae.sae import train_sae
    from mlsae.warehouse import local_path
    from mlsae.warehouse.workspace import (
        checkpoint_publisher,
        pull_activation_cache,
        workspace,
    )

    cfg = train_config(settings, spec, lens["lens"] if lens else None)
    run_dir = autoencoder_dir(out, spec["sae_id"])
    basis = None
    if lens is not None:
        from mlsae.models import load_model

        basis = load_lens(lens, load_model(settings["model"]["name"], device="cpu"), out)
    run_logger().info("training %s: %s, R=%d (%d latents), k=%d, layers %s, %d tokens in %d "
                      "steps", spec["sae_id"], spec["role"], spec["expansion_factor"],
                      cfg.sae.n_latents, spec["k"], spec["layers"], cfg.train_tokens, cfg.n_steps)
    start = time.perf_counter()
    ids = [spec["sae_id"]]
    cache_dir = local_path(out, cache["cache_dir"])
    pull_activation_cache(out, cache_dir)  # extracted (and shared) on another worker
    with workspace(out, ids, log=progress_log()), gpu_slot(settings["device"]):
        result = train_sae(cfg, ActivationCache.open(cache_dir),
                           run_dir, basis=basis, on_step=checkpoint_publisher(out, ids),
                           progress_log=progress_log(), should_stop=stop_requested)
    return _manifest(spec, settings, out, run_dir, result, time.perf_counter() - start)


@task(name="train-autoencoders-streaming", cache_policy=CACHE_POLICY)
def train_autoencoders_streaming(specs: list[dict[str, Any]], settings: dict,
                                 lens: LensManifest | None, out: str) -> list[TrainManifest]:
    """Train every autoencoder of the plan in one pass of the model over the training text
    (nothing on disk but checkpoints); resumes at the checkpoints' window."""
    from mlsae.extract import ActivationStream
    from mlsae.interrupt import stop_requested
    from mlsae.models import load_model
    from mlsae.plan import extract_config, train_config
    from mlsae.sae import train_many
    from mlsae.warehouse.workspace import checkpoint_publisher, workspace

    stream_cfg = extract_config(settings, stream=True)
    loaded = load_model(settings["model"]["name"], device=settings["device"],
                        dtype=stream_cfg.model_dtype)
    basis = load_lens(lens, loaded, out) if lens is not None else None
    cfgs = [train_config(settings, spec, lens["lens"] if (lens and spec["lens"]) else None)
            for spec in specs]
    run_dirs = [autoencoder_dir(out, spec["sae_id"]) for spec in specs]
    run_logger().info("training %d autoencoders in one streaming pass: %d tokens per layer in "
                      "%d steps of %d tokens", len(specs), settings["train_tokens"],
                      cfgs[0].n_steps, cfgs[0].batch_tokens)
    start = time.perf_counter()
    ids = [spec["sae_id"] for spec in specs]
    with workspace(out, ids, log=progress_log()), gpu_slot(settings["device"]):
        results = train_many(cfgs, ActivationStream(stream_cfg, loaded), run_dirs,
                             bases=[basis if spec["lens"] else None for spec in specs],
                             source_layers=list(settings["layers"]),
                             on_step=checkpoint_publisher(out, ids),
                             progress_log=progress_log(), should_stop=stop_requested)
    seconds = time.perf_counter() - start
    if results and results[0].data_exhausted:
        run_logger().warning("the training text ran out after %d of %d steps: give more text "
                             "(--data) or a smaller --train-tokens", results[0].steps,
                             cfgs[0].n_steps)
    return [_manifest(spec, settings, out, run_dir, result, seconds)
            for spec, run_dir, result in zip(specs, run_dirs, results, strict=True)]
