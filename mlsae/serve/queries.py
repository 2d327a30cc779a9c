"""The SQL behind every warehouse panel of the explorer: one read-only statement each over
the views and macros of sql/, with named parameters ($sae, $latent) that DuckDB binds (no
SQL is ever built from user text). `shown(sql, params)` writes the statement with its
parameters as literals, for the page to display and for `mlsae sql` to run as is."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from mlsae.warehouse.readonly import json_value

SAES = """SELECT sae_id, model, n_layers, d_model, n_latents, expansion_factor, k, layers, lens,
       train_tokens, created_at
FROM saes
ORDER BY sae_id"""

LAYER_METRICS = """SELECT layer, fvu, mse, l0, dead_fraction, delta_ce, kl
FROM layer_metrics
WHERE sae_id = $sae
ORDER BY layer"""

VARIANCE_SUMMARY = """SELECT *
FROM variance_summary
WHERE sae_id = $sae"""

LATENT_STATS = """SELECT latent, count, mass, n_layers_active, expected_layer, layer_var, layer_std,
       relative_std, token_var, prompt_var
FROM latent_stats
WHERE sae_id = $sae AND latent = $latent"""

LATENT_LAYERS = """SELECT s.layer, s.layer_idx, coalesce(l.count, 0) AS count,
       coalesce(l.mass, 0.0) AS mass, coalesce(l.p, 0.0) AS p
FROM sae_layers s
LEFT JOIN latent_layers l ON l.sae_id = s.sae_id AND l.layer = s.layer AND l.latent = $latent
WHERE s.sae_id = $sae
ORDER BY s.layer_idx"""

LATENT_CONTEXTS = """SELECT layer, rank, value, seq_id, pos, token, tokens, positions, context
FROM latent_contexts($sae, $latent, n := 5, width := 8)"""

PROMPT_HEATMAP = """SELECT rank, latent, max_value, mass, expected_layer, layer, layer_idx, p
FROM prompt_heatmap($sae, 0, threshold := 1e-3)"""
"""Run over the prompt's own activations (mlsae.warehouse.memory_connection), not the
warehouse: its `latents` table holds the typed-in prompt as sequence 0."""


class Panel(NamedTuple):
    """One panel's rows (column -> value dicts, JSON-ready) and the SQL that made them."""

    sql: str
    rows: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {"sql": self.sql, "rows": self.rows}


def literal(value: Any) -> str:
    """A SQL literal for a parameter value (strings quoted, quotes doubled)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def shown(sql: str, params: dict[str, Any]) -> str:
    """The statement with each $name replaced by its literal: what `mlsae sql` runs."""
    return re.sub(r"\$([a-z_]+)", lambda m: literal(params[m.group(1)]), sql)


def run(con, sql: str, params: dict[str, Any]) -> Panel:
    """Run one panel query with bound parameters; rows as JSON-ready dicts."""
    used = {name: params[name] for name in set(re.findall(r"\$([a-z_]+)", sql))}
    cursor = con.execute(sql, used)
    columns = [d[0] for d in cursor.description]
    rows = [{c: json_value(v) for c, v in zip(columns, row, strict=True)}
            for row in cursor.fetchall()]
    return Panel(shown(sql, used), rows)
