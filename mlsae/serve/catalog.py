"""The explorer's read side of the warehouse: one locked-down DuckDB connection (the same
sandbox as `mlsae sql`: mlsae.warehouse.connect(read_only=True)), the panels' queries
(queries.py) with bound parameters, and the SAE records those queries need first."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from mlsae import warehouse as wh
from mlsae.serve import queries as q


class NotFound(LookupError):
    """An unknown sae_id or an out-of-range latent: the API answers 404 with the message."""


class Catalog:
    """Read-only queries over one warehouse. Thread-safe (one query at a time)."""

    def __init__(self, warehouse_dir: str | Path):
        self.root = wh.require_warehouse(warehouse_dir)
        self.where = warehouse_dir if wh.is_url(warehouse_dir) else self.root
        """The warehouse: its directory, or its URL (queried through a local mirror of its
        committed tables, synced when the explorer starts: mlsae.warehouse.mirror)."""
        self._con = wh.connect(self.where, read_only=True)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def panel(self, sql: str, **params: Any) -> q.Panel:
        with self._lock:
            return q.run(self._con, sql, params)

    def saes(self) -> list[dict[str, Any]]:
        return self.panel(q.SAES).rows

    def sae(self, sae_id: str) -> dict[str, Any]:
        """The saes row of `sae_id`; NotFound (naming the known ids) when absent."""
        found = {row["sae_id"]: row for row in self.saes()}
        if sae_id not in found:
            known = ", ".join(sorted(found)[:20]) or "none: run `mlsae run` first"
            raise NotFound(f"unknown sae_id {sae_id!r}: this warehouse has {known}")
        return found[sae_id]

    def check_latent(self, sae_id: str, latent: int) -> dict[str, Any]:
        """The saes row, after checking 0 <= latent < n_latents (NotFound otherwise)."""
        row = self.sae(sae_id)
        n = int(row["n_latents"])
        if not 0 <= latent < n:
            raise NotFound(f"latent {latent} is out of range: {sae_id} has {n} latents "
                           f"(0..{n - 1})")
        return row

    def sae_table(self, sae_id: str):
        """The saes row of `sae_id` as an Arrow table (every column, warehouse types)."""
        self.sae(sae_id)
        with self._lock:
            return self._con.sql("SELECT * FROM saes WHERE sae_id = $sae",
                                 params={"sae": sae_id}).to_arrow_table()

    def home(self) -> list[dict[str, Any]]:
        """Every SAE with its per-layer metrics and variance summary panels."""
        out = []
        for row in self.saes():
            sae = row["sae_id"]
            out.append({**row,
                        "layer_metrics": self.panel(q.LAYER_METRICS, sae=sae).as_json(),
                        "variance_summary": self.panel(q.VARIANCE_SUMMARY, sae=sae).as_json()})
        return out

    def latent(self, sae_id: str, latent: int) -> dict[str, Any]:
        """The warehouse panels of one latent: stats, layer distribution, contexts."""
        self.check_latent(sae_id, latent)
        params = {"sae": sae_id, "latent": latent}
        return {"stats": self.panel(q.LATENT_STATS, **params).as_json(),
                "distribution": self.panel(q.LATENT_LAYERS, **params).as_json(),
                "contexts": self.panel(q.LATENT_CONTEXTS, **params).as_json()}
