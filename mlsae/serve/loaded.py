"""Each SAE of the warehouse with what running it needs (its weights, its language model,
its basis), loaded on first use and then kept: one model per model name, shared by the
SAEs trained on it."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, NamedTuple

from mlsae.serve.catalog import NotFound


class SaeHandle(NamedTuple):
    sae_id: str
    sae: Any
    """The MLSAE (mlsae.sae.model), in eval mode on the model's device."""
    loaded: Any
    """The LoadedModel (mlsae.models): model, tokenizer, name."""
    basis: Any
    """The ResidualBasis the SAE reads (None: the model's own residual stream)."""
    layers: list[int]
    """The model blocks the SAE reads, in order (layer index l = position here)."""


def sae_dir(warehouse_dir: Path, sae_id: str) -> Path | None:
    """Where the saved autoencoder of `sae_id` is (`mlsae run` and `mlsae import` write
    <warehouse>/autoencoders/<sae_id>/sae), or None."""
    from mlsae.warehouse import autoencoder_dir

    base = autoencoder_dir(warehouse_dir, sae_id)
    for path in (base / "sae", base):
        if (path / "config.json").exists() and (path / "model.safetensors").exists():
            return path
    return None


@contextlib.contextmanager
def one_torch_thread():
    """Run the block on one torch thread. The lens' batched float64 inverse
    (torch.linalg.inv in mlsae.lens.TunedLensBasis) fails inside oneMKL ("Parameter 6 was
    incorrect on entry to DLASWP", then hangs) after an explicit torch.set_num_threads(2)
    with the CPU build of torch 2.13.0; on one thread it is fine (and takes milliseconds)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Loader:
    """Loads SAEs and models once; thread-safe."""

    def __init__(self, warehouse_dir: Path, device: str = "auto"):
        self.root = Path(warehouse_dir)
        self.device = device
        self._models: dict[str, Any] = {}
        self._saes: dict[str, SaeHandle] = {}
        self._lock = threading.Lock()

    def get(self, record: dict[str, Any]) -> SaeHandle:
        """The handle of the SAE whose saes row is `record` (NotFound without weights)."""
        sae_id = record["sae_id"]
        with self._lock:
            if sae_id not in self._saes:
                self._saes[sae_id] = self._load(record)
            return self._saes[sae_id]

    def _model(self, name: str) -> Any:
        from mlsae.models import load_model

        if name not in self._models:
            self._models[name] = load_model(name, device=self.device)
        return self._models[name]

    def _load(self, record: dict[str, Any]) -> SaeHandle:
        from mlsae.lens import load_basis
        from mlsae.sae.model import MLSAE

        sae_id = record["sae_id"]
        path = sae_dir(self.root, sae_id)
        if path is None:
            raise NotFound(f"the weights of {sae_id} are not in this warehouse (expected "
                           f"{self.root / 'autoencoders' / sae_id / 'sae'}/model.safetensors): "
                           "its tables can be browsed, but prompts need the autoencoder")
        loaded = self._model(record["model"])
        device = next(loaded.model.parameters()).device
        sae = MLSAE.from_pretrained(path).to(device).eval()
        lens = record.get("lens")
        basis = None
        if lens not in (None, "", "none"):
            with one_torch_thread():
                basis = load_basis(lens, loaded, cache_dir=self.root / "lenses")
        return SaeHandle(sae_id, sae, loaded, basis, [int(x) for x in record["layers"]])
