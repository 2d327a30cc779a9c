"""Prefect tasks: read the analyses of one SAE from the warehouse views, and report a run.

The numbers come from the sql/ views (the single source of truth); these tasks
only select them for one sae_id and turn them into artifacts a person checks in
the UI: the per-layer metric table and the variance summary.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import CACHE_POLICY, run_logger
from tasks.latents import LatentsManifest

LAYER_METRIC_COLUMNS = ["layer", "fvu", "mse", "l0", "dead_fraction", "delta_ce", "kl"]
VARIANCE_COLUMNS = ["sae_id", "n_latents", "n_live", "mean_layer_var", "mean_prompt_var",
                    "mean_token_var", "ratio_token", "ratio_prompt", "mean_layer_std",
                    "std_layer_std", "ref_rel_var"]

EXAMPLE_QUERIES = [
    ("headline variance ratios per SAE",
     "SELECT sae_id, n_live, ratio_token, ratio_prompt FROM variance_summary"),
    ("per-layer reconstruction and downstream loss",
     "SELECT sae_id, layer, fvu, delta_ce, l0 FROM layer_metrics ORDER BY sae_id, layer"),
    ("latents that live at several layers",
     "SELECT sae_id, latent, expected_layer, layer_std, count FROM latent_stats "
     "ORDER BY layer_std DESC LIMIT 10"),
]


class AnalysisManifest(TypedDict):
    sae_id: str
    layer_metrics: list[dict[str, Any]]
    variance_summary: list[dict[str, Any]]


def _clean(value: Any) -> Any:
    """JSON-safe scalars (NaN/inf -> None) for cached results and artifacts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def query_rows(out: str, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """Rows of one query over the warehouse (tables + sql/ views), as dicts."""
    from mlsae.warehouse import connect, query_dicts

    con = connect(out, read_only=True)
    try:
        return [{c: _clean(v) for c, v in row.items()} for row in query_dicts(con, sql, params)]
    finally:
        con.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n"
                          for r in rows)


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100]


@task(name="analyse-autoencoder", cache_policy=CACHE_POLICY)
def analyse_autoencoder(sae_id: str, logged: LatentsManifest | None, evaluated: Any,
                        out: str) -> AnalysisManifest:
    """Per-layer metrics + variance summary of one SAE, published as artifacts."""
    metrics = query_rows(out, f"SELECT {', '.join(LAYER_METRIC_COLUMNS)} FROM layer_metrics "
                              "WHERE sae_id = ? ORDER BY layer", [sae_id])
    summary = query_rows(out, "SELECT * FROM variance_summary WHERE sae_id = ?", [sae_id])
    key = artifact_key(sae_id)
    create_table_artifact(key=f"layer-metrics-{key}", table=metrics,
                          description=f"Per-layer evaluation metrics of {sae_id}")
    if summary:
        create_table_artifact(key=f"variance-summary-{key}",
                              table=[{c: summary[0].get(c) for c in VARIANCE_COLUMNS}],
                              description=f"How spread over layers the latents of {sae_id} are "
                                          "(aggregate vs per token / prompt)")
        s = summary[0]
        run_logger().info("%s: %s live latents, layer variance %.3g = %.3gx per-token, "
                          "%.3gx per-prompt", sae_id, s.get("n_live"),
                          s.get("mean_layer_var") or float("nan"),
                          s.get("ratio_token") or float("nan"),
                          s.get("ratio_prompt") or float("nan"))
    return AnalysisManifest(sae_id=sae_id, layer_metrics=metrics, variance_summary=summary)


def report_run(result: dict[str, Any]) -> str:
    """A markdown artifact for the whole run: where things are, what to query."""
    lines = [f"# mlsae pipeline: {result['model']}", "",
             f"Warehouse: `{result['out']}`", "", "## Autoencoders", ""]
    lines += [f"- `{sae_id}`" for sae_id in result["sae_ids"]]
    lines += ["", "## Figures", ""]
    lines += [f"- [{path.rsplit('/', 1)[-1]}](file://{path})" for path in result["figures"]]
    if result.get("variance_summary"):
        lines += ["", "## Variance summary", "",
                  markdown_table(result["variance_summary"], VARIANCE_COLUMNS)]
    lines += ["", "## Query it", ""]
    lines += [f"- {what}: `mlsae sql --out {result['out']} \"{sql}\"`"
              for what, sql in EXAMPLE_QUERIES]
    text = "\n".join(lines) + "\n"
    try:
        create_markdown_artifact(markdown=text, key=artifact_key(f"run-{result['model']}")[:100],
                                 description="Where the tables and figures of this run are")
    except Exception as err:  # artifacts are a convenience; never fail a finished run on them
        run_logger().warning("could not create the run artifact: %s", err)
    return text
