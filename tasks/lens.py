"""Prefect task: a tuned lens for the model (the committed one, a pretrained one, or train one)."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from prefect import task

from tasks.common import CACHE_POLICY, TRANSIENT_RETRIES, gpu_slot, run_logger


class LensManifest(TypedDict):
    lens: str
    """What `mlsae.lens.load_basis` takes to load this lens again ("embedded", a path, a hub id)."""
    condition_max: float
    """Largest condition number of I + A over blocks (how exactly reconstructions map back)."""


def lens_cache_dir(out: str) -> Path:
    """Where trained lenses are kept: in the warehouse (its working copy, for a URL)."""
    from mlsae import warehouse

    return warehouse.lenses_dir(warehouse.working_dir(out))


@task(name="prepare-lens", cache_policy=CACHE_POLICY, **TRANSIENT_RETRIES)
def prepare_lens(settings: dict, out: str) -> LensManifest:
    """Find or train the lens once per model; later tasks load it by name.

    A lens that has to be trained here learns on the pipeline's own text when that is a
    local file or directory (else the embedded corpus), in sequences of up to 256 tokens.
    """
    from mlsae.hooks import max_positions
    from mlsae.lens import load_basis
    from mlsae.lens_train import LensTrainConfig
    from mlsae.models import load_model

    model, data, device = settings["model"]["name"], settings["data"], settings["device"]
    loaded = load_model(model, device=device)
    local = data not in ("", "embedded") and Path(data).exists()
    train = LensTrainConfig(data=data if local else None,
                            seq_len=min(256, max_positions(loaded.model) or 256))
    from mlsae.warehouse.workspace import workspace

    with workspace(out), gpu_slot(device):  # a lens trained here is published
        basis = load_basis("auto", loaded, train=train, cache_dir=lens_cache_dir(out))
    run_logger().info("tuned lens for %s: %s", model, basis.name)
    return LensManifest(lens=str(basis.name), condition_max=float(basis.condition_L.max()))


def load_lens(lens: LensManifest | None, loaded, out: str):
    """The basis a manifest names, checked against `loaded` (None: no lens)."""
    if lens is None:
        return None
    from mlsae.lens import load_basis

    return load_basis(lens["lens"], loaded, cache_dir=lens_cache_dir(out))
