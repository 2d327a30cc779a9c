"""The one-row-per-autoencoder tables: `saes` (what it is, where it came from) and
`layer_metrics` (its evaluation per layer), each written atomically to its partition."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from mlsae.warehouse.duck import write_setup_script
from mlsae.warehouse.layout import partition_dir
from mlsae.warehouse.parquet import write_table_atomic
from mlsae.warehouse.tables import TABLE_SPECS, check_sae_id


@dataclass
class SaeRecord:
    """One row of the `saes` table."""

    sae_id: str
    model: str
    d_model: int
    n_latents: int
    expansion_factor: int
    k: int
    layers: list[int]
    """Model block indices the SAE reads; the analyses use their positions 0..L-1."""
    lens: str | None = None
    train_tokens: int | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    created_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        check_sae_id(self.sae_id)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be a non-empty list of distinct block indices, "
                             f"got {self.layers}")
        if self.n_latents < 1 or self.k < 1 or self.d_model < 1:
            raise ValueError("d_model, n_latents and k must be positive")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def to_arrow(self) -> pa.Table:
        created = self.created_at or dt.datetime.now(dt.UTC)
        row = {
            "sae_id": [self.sae_id], "model": [self.model], "n_layers": [self.n_layers],
            "d_model": [self.d_model], "n_latents": [self.n_latents],
            "expansion_factor": [self.expansion_factor], "k": [self.k],
            "layers": [list(self.layers)], "lens": [self.lens],
            "train_tokens": [self.train_tokens],
            "config": [json.dumps(dict(self.config), sort_keys=True, default=str)],
            "created_at": [created],
        }
        return pa.table(row, schema=TABLE_SPECS["saes"].schema)


def write_sae_record(warehouse_dir: str | os.PathLike, record: SaeRecord,
                     overwrite: bool = False) -> Path:
    """Write saes/sae_id=<id>/saes.parquet (atomically). Keeps an existing one unless overwrite."""
    path = partition_dir(warehouse_dir, "saes", record.sae_id) / "saes.parquet"
    if path.exists() and not overwrite:
        return path
    return write_table_atomic("saes", record.to_arrow(), path)


LAYER_METRIC_COLUMNS = ("fvu", "mse", "l0", "dead_fraction", "delta_ce", "kl")


def write_layer_metrics(warehouse_dir: str | os.PathLike, sae_id: str,
                        metrics: Sequence[Any]) -> Path:
    """Write layer_metrics/sae_id=<id>/layer_metrics.parquet (atomically, replacing it).

    `metrics`: one item per layer, a mapping or an object with attributes `layer`
    (model block index) and fvu, mse, l0, dead_fraction, delta_ce, kl (missing = null).
    """
    def get(item: Any, name: str) -> Any:
        value = item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)
        return None if value is None else float(value) if name != "layer" else int(value)

    columns: dict[str, list] = {"sae_id": [], "layer": []}
    columns.update({name: [] for name in LAYER_METRIC_COLUMNS})
    for item in sorted(metrics, key=lambda m: get(m, "layer")):
        columns["sae_id"].append(check_sae_id(sae_id))
        for name in ("layer", *LAYER_METRIC_COLUMNS):
            columns[name].append(get(item, name))
    table = pa.table(columns, schema=TABLE_SPECS["layer_metrics"].schema)
    path = partition_dir(warehouse_dir, "layer_metrics", sae_id) / "layer_metrics.parquet"
    write_table_atomic("layer_metrics", table, path)
    write_setup_script(warehouse_dir)
    return path


def sae_record_from_config(sae_id: str, sae_config: Any, model_name: str,
                           train_tokens: int | None = None) -> SaeRecord:
    """A saes row from an SAEConfig (mlsae.sae.config)."""
    cfg = dataclasses.asdict(sae_config) if dataclasses.is_dataclass(sae_config) else dict(
        vars(sae_config))
    d_model = int(cfg["d_model"])
    expansion = int(cfg.get("expansion_factor") or 0)
    n_latents = int(cfg.get("n_latents") or d_model * expansion)
    layers = cfg.get("layers")
    if layers is None:
        layers = list(range(int(cfg["n_layers"])))
    return SaeRecord(
        sae_id=sae_id, model=str(cfg.get("model") or model_name), d_model=d_model,
        n_latents=n_latents, expansion_factor=expansion or n_latents // d_model,
        k=int(cfg["k"]), layers=[int(x) for x in layers], lens=cfg.get("lens"),
        train_tokens=train_tokens, config=cfg)
