"""Prefect task: per-layer metrics of one autoencoder on held-out text, into `layer_metrics`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypedDict

from prefect import task

from tasks.common import CACHE_POLICY, TRANSIENT_RETRIES, gpu_slot, progress_log, run_logger
from tasks.latents import LatentsManifest, eval_data, eval_memory
from tasks.lens import LensManifest, load_lens
from tasks.train import TrainManifest, flatten_trained, pick_trained

METRICS = ("fvu", "mse", "l0", "dead_fraction", "delta_ce", "kl")


class EvalManifest(TypedDict):
    sae_id: str
    layers: list[dict[str, Any]]
    """One dict per layer: layer (model block) and the METRICS."""
    mean: dict[str, float | None]
    metrics_path: str


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        raw = item
    elif dataclasses.is_dataclass(item):
        raw = dataclasses.asdict(item)
    elif hasattr(item, "_asdict"):
        raw = item._asdict()
    else:
        raw = vars(item)
    row = {"layer": int(raw["layer"])}
    for name in METRICS:
        value = raw.get(name)
        row[name] = None if value is None or not math.isfinite(float(value)) else float(value)
    return row


def _mean(rows: list[dict[str, Any]], name: str) -> float | None:
    values = [r[name] for r in rows if r[name] is not None]
    return sum(values) / len(values) if values else None


def _record(out: str, trained: TrainManifest, sae: Any, model_name: str, metrics: list
            ) -> EvalManifest:
    from mlsae.warehouse import (
        public_path,
        sae_record_from_config,
        working_dir,
        write_layer_metrics,
        write_sae_record,
    )

    rows = [_as_dict(m) for m in metrics]
    sae_id, local = trained["sae_id"], working_dir(out)
    path = write_layer_metrics(local, sae_id, rows)
    # Last: a `saes` row with metrics is what marks this autoencoder as done (rerun).
    write_sae_record(local, sae_record_from_config(sae_id, sae.cfg, model_name,
                                                 trained["train_tokens"]))
    mean = {name: _mean(rows, name) for name in METRICS}
    run_logger().info("%s: mean FVU %s, delta CE %s, L0 %s", sae_id,
                      *(f"{mean[m]:.4g}" if mean[m] is not None else "n/a"
                        for m in ("fvu", "delta_ce", "l0")))
    return EvalManifest(sae_id=sae_id, layers=rows, mean=mean,
                        metrics_path=public_path(out, path))


def _evaluate(chosen: list[TrainManifest], lens: LensManifest | None, lens_ids: list[str],
              settings: dict, out: str) -> list[EvalManifest]:
    from mlsae.models import load_model
    from mlsae.sae import MLSAE
    from mlsae.sae.evaluate import evaluate_saes
    from mlsae.warehouse import local_path
    from mlsae.warehouse.workspace import workspace

    loaded = load_model(settings["model"]["name"], device=settings["device"])
    device = next(loaded.model.parameters()).device
    with workspace(out, [t["sae_id"] for t in chosen], log=progress_log()):
        saes = [MLSAE.from_pretrained(local_path(out, t["sae_dir"])).to(device) for t in chosen]
        basis = load_lens(lens, loaded, out) if lens_ids else None
        with gpu_slot(settings["device"]):
            metrics = evaluate_saes(saes, loaded, eval_data(settings),
                                    [basis if t["sae_id"] in lens_ids else None for t in chosen],
                                    memory_bytes=eval_memory(settings),
                                    progress_log=progress_log())
        return [_record(out, t, sae, loaded.name, m)
                for t, sae, m in zip(chosen, saes, metrics, strict=True)]


@task(name="evaluate-autoencoders", cache_policy=CACHE_POLICY, **TRANSIENT_RETRIES)
def evaluate_autoencoders(trained: list[Any], sae_ids: list[str], logged: list[Any],
                          lens: LensManifest | None, lens_ids: list[str], settings: dict,
                          out: str) -> list[EvalManifest]:
    """FVU, MSE, L0, dead fraction, delta CE and KL per layer of every autoencoder of one
    model in one pass over the held-out text (one clean forward pass per batch, shared);
    writes `layer_metrics` (then the `saes` rows, if logging latents did not already).
    trained: manifests, or streaming groups' lists; lens_ids: those trained in the lens basis;
    logged: the latent tables (only a dependency: their `saes` rows come first)."""
    flat = flatten_trained(trained)
    return _evaluate([pick_trained(flat, sae_id) for sae_id in sae_ids], lens, lens_ids,
                     settings, out)


@task(name="evaluate-autoencoder", cache_policy=CACHE_POLICY, **TRANSIENT_RETRIES)
def evaluate_autoencoder(trained: TrainManifest | list[TrainManifest], sae_id: str,
                         logged: LatentsManifest | None, lens: LensManifest | None,
                         settings: dict, out: str) -> EvalManifest:
    """evaluate-autoencoders of one autoencoder (a flow with one, e.g. an imported one)."""
    (manifest,) = _evaluate([pick_trained(trained, sae_id)], lens,
                            [sae_id] if lens is not None else [], settings, out)
    return manifest
