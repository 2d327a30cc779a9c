"""`mlsae export`: one warehouse autoencoder, for one layer, in another tool's format.

A single-layer SAE exports for its layer; an MLSAE for any layer it was trained on (its
weights are shared across layers, so every layer's file holds the same weights; the
layer only names the hook point). Formats: SAELens (exact, standardisation included as
normalize_activations="layer_norm") and sparsify (exact; an SAE with standardisation only
as the SAE of standardised vectors, see mlsae.interop.sparsify).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mlsae.interop import saelens, sparsify
from mlsae.interop.errors import InteropError
from mlsae.interop.weights import from_mlsae

EXPORT_FORMATS = ("saelens", "sparsify")


@dataclass
class ExportRequest:
    """What to export and where (the options of `mlsae export`)."""

    sae_id: str
    """The autoencoder's id in the warehouse (`mlsae sql "SELECT sae_id FROM saes"`)."""
    format: str
    """saelens or sparsify."""
    layer: int | None = None
    """The block whose output the exported SAE reads; one of the autoencoder's layers.
    [default: its only layer, for a single-layer SAE]"""
    to: str = "."
    """Output directory: SAELens files go in it, sparsify's in its layers.<layer>/."""
    standardized_inputs: bool = False
    """sparsify only: export an SAE trained with standardisation as the SAE of the
    standardised vectors (sparsify cannot standardise; docs/interop.md)."""

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise InteropError(f"--format {self.format!r}: use one of {', '.join(EXPORT_FORMATS)}")


class ExportResult(NamedTuple):
    sae_id: str
    format: str
    layer: int
    files: list[Path]
    notes: list[str]
    """What a user of the files must know (e.g. standardise the inputs yourself)."""


def load_warehouse_sae(warehouse_dir: str | os.PathLike, sae_id: str):
    """The MLSAE saved as `sae_id` in the warehouse; InteropError naming how to find ids."""
    from mlsae.sae import MLSAE
    from mlsae.warehouse import check_sae_id, trained_weights_dir

    try:
        check_sae_id(sae_id)
    except ValueError as err:
        raise InteropError(str(err)) from err
    sae_dir = trained_weights_dir(warehouse_dir, sae_id)
    if not sae_dir.is_dir():
        raise InteropError(f"no autoencoder {sae_id!r} in warehouse {warehouse_dir} (no "
                           f"{sae_dir}): list them with `mlsae sql --out {warehouse_dir} "
                           "\"SELECT sae_id, layers FROM saes\"`, or pass --out")
    try:
        return MLSAE.from_pretrained(sae_dir)
    except (OSError, ValueError, KeyError) as err:
        raise InteropError(f"{sae_dir}: unreadable autoencoder ({err})") from err


def _layer(request: ExportRequest, cfg: Any) -> int:
    layers = list(cfg.layers)
    if request.layer is None:
        if len(layers) == 1:
            return layers[0]
        raise InteropError(f"{request.sae_id} reads layers {layers} (its weights are shared "
                           "across them): pass --layer L, the block the exported SAE is for")
    if request.layer not in layers:
        raise InteropError(f"--layer {request.layer}: {request.sae_id} was trained on layers "
                           f"{layers}; pass one of them")
    return int(request.layer)


def export_sae(request: ExportRequest, warehouse_dir: str | os.PathLike) -> ExportResult:
    """Check everything, then write the files (nothing is written on an InteropError)."""
    sae = load_warehouse_sae(warehouse_dir, request.sae_id)
    cfg = sae.cfg
    if cfg.lens:
        raise InteropError(f"{request.sae_id} was trained in the tuned-lens basis ({cfg.lens}): "
                           "its weights read translated vectors, which neither SAELens nor "
                           "sparsify can produce; export an autoencoder trained without --lens")
    layer = _layer(request, cfg)
    weights = from_mlsae(sae)
    record = {"sae_id": request.sae_id, "model": cfg.model, "layers": list(cfg.layers),
              "standardize": cfg.standardize, "exported_layer": layer}
    notes: list[str] = []
    if request.format == "saelens":
        files = saelens.write_saelens(weights, request.to, layer=layer, model_name=cfg.model,
                                      context_size=(cfg.data or {}).get("seq_len"),
                                      record=record)
        if len(cfg.layers) > 1:
            notes.append(f"an MLSAE: the same weights serve every layer {list(cfg.layers)}; "
                         f"this file is hooked at {saelens.hook_name(layer)}")
    else:
        files = sparsify.write_sparsify(weights, request.to, layer=layer, record=record,
                                        standardized_inputs=request.standardized_inputs)
        if weights.standardize:
            notes.append("sparsify cannot standardise: feed it z = (x - x.mean(-1, keepdim=True)) "
                         "/ (x.std(-1, keepdim=True) + 1e-5) and map its output y back with "
                         "y * x.std(-1, keepdim=True) + x.mean(-1, keepdim=True)")
    return ExportResult(request.sae_id, request.format, layer, files, notes)
