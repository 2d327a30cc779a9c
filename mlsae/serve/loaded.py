"""Each SAE of the warehouse with what running it needs (its weights, its language model,
its basis), loaded on first use and then kept: one model per model name, shared by the
SAEs trained on it."""

from __future__ import annotations

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
    """Where the saved autoencoder of `sae_id` is in the local warehouse (or working copy)
    `warehouse_dir` (`mlsae run` and `mlsae import` write layout.trained_weights_dir:
    <warehouse>/autoencoders/<sae_id>/sae), or None."""
    from mlsae.warehouse.layout import autoencoder_dir, trained_weights_dir

    for path in (trained_weights_dir(warehouse_dir, sae_id), autoencoder_dir(warehouse_dir, sae_id)):
        if (path / "config.json").exists() and (path / "model.safetensors").exists():
            return path
    return None


class Loader:
    """Loads SAEs and models once; thread-safe."""

    def __init__(self, warehouse_dir: str | Path, device: str = "auto"):
        from mlsae.warehouse.layout import is_url, warehouse_url, working_dir

        self.url = warehouse_url(warehouse_dir) if is_url(warehouse_dir) else None
        """The warehouse's URL when it is in a bucket (weights are pulled from it)."""
        self.root = working_dir(warehouse_dir)
        """Where the weights and lenses are read: the warehouse, or its working copy."""
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
        from mlsae import warehouse
        from mlsae.lens import load_basis
        from mlsae.sae.model import MLSAE
        from mlsae.warehouse.layout import (
            AUTOENCODERS_DIR,
            TRAINED_WEIGHTS_DIR,
            trained_weights_dir,
        )
        from mlsae.warehouse.workspace import pull_weights

        sae_id = record["sae_id"]
        lens = record.get("lens")
        has_lens = lens not in (None, "", "none")
        if self.url is not None:  # first use of this SAE here: bring its weights in
            pull_weights(self.url, sae_id, lens=has_lens)
        path = sae_dir(self.root, sae_id)
        if path is None:
            expected = (f"committed objects under {self.url}/{AUTOENCODERS_DIR}/{sae_id}/"
                        f"{TRAINED_WEIGHTS_DIR}/" if self.url is not None
                        else f"{trained_weights_dir(self.root, sae_id)}/model.safetensors")
            raise NotFound(f"the weights of {sae_id} are not in this warehouse (expected "
                           f"{expected}): its tables can be browsed, but prompts need the "
                           "autoencoder")
        loaded = self._model(record["model"])
        device = next(loaded.model.parameters()).device
        sae = MLSAE.from_pretrained(path).to(device).eval()
        basis = None
        if has_lens:
            basis = load_basis(lens, loaded, cache_dir=warehouse.lenses_dir(self.root))
        return SaeHandle(sae_id, sae, loaded, basis, [int(x) for x in record["layers"]])
