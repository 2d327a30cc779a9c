"""Prefect task: log an MLSAE's latent activations on held-out text into the warehouse."""

from __future__ import annotations

from typing import TypedDict

from prefect import task

from tasks.common import CACHE_POLICY, TRANSIENT_RETRIES, gpu_slot, progress_log, run_logger
from tasks.lens import LensManifest, load_lens
from tasks.train import TrainManifest, pick_trained


class LatentsManifest(TypedDict):
    sae_id: str
    n_sequences: int
    n_tokens: int
    n_rows: int
    bytes_latents: int
    latents_dir: str
    tokens_dir: str


def eval_memory(settings: dict) -> int | None:
    """The run's --eval-memory in bytes (None: the device's default)."""
    from mlsae.plan import parse_size

    memory = settings["budget"].get("eval_memory")
    return parse_size(memory) if memory is not None else None


def eval_data(settings: dict):
    """The held-out text every metric and latent table uses: the test split, same budget."""
    from mlsae.plan import data_config

    return data_config(settings, "test",
                       max_sequences=max(1, -(-settings["eval_tokens"] // settings["seq_len"])))


@task(name="log-latent-tables", cache_policy=CACHE_POLICY, **TRANSIENT_RETRIES)
def log_latent_tables(trained: TrainManifest | list[TrainManifest], sae_id: str,
                      lens: LensManifest | None, settings: dict, out: str) -> LatentsManifest:
    """Write the `saes`, `tokens` and `latents` rows of one MLSAE (resumes a killed run)."""
    from mlsae import warehouse
    from mlsae.latents import LatentLogConfig, log_latents
    from mlsae.models import load_model
    from mlsae.warehouse.workspace import part_publisher, workspace

    trained = pick_trained(trained, sae_id)
    model, device = settings["model"]["name"], settings["device"]
    loaded = load_model(model, device=device)
    with workspace(out, [sae_id], log=progress_log()) as local, gpu_slot(device):
        basis = load_lens(lens, loaded, out)
        result = log_latents(
            warehouse.local_path(out, trained["sae_dir"]), loaded, eval_data(settings), local,
            trained["sae_id"], basis=basis, config=LatentLogConfig(device=device, memory_bytes=eval_memory(settings)),
            train_tokens=trained["train_tokens"], progress_log=progress_log(),
            on_part=part_publisher(out, [sae_id]))
    run_logger().info("%s: %d latent rows over %d tokens (%.1f bytes/row), %d part(s) written; "
                      "per-part sums for the views: %.2f bytes/row, %.1fs",
                      result.sae_id, result.n_rows, result.n_tokens,
                      result.bytes_latents / max(result.n_rows, 1), result.parts_written,
                      result.bytes_sums / max(result.n_rows, 1), result.seconds_sums)
    return LatentsManifest(
        sae_id=result.sae_id, n_sequences=result.n_sequences, n_tokens=result.n_tokens,
        n_rows=result.n_rows, bytes_latents=result.bytes_latents,
        latents_dir=warehouse.public_path(out, warehouse.partition_dir(local, "latents", sae_id)),
        tokens_dir=warehouse.public_path(out, warehouse.partition_dir(local, "tokens", sae_id)))
