"""Helpers shared by the flow tests and the deployment integration test (no tests here).

Small budgets: every pipeline run in the tests trains on a few thousand tokens
with a tiny dictionary, so a whole run takes seconds of compute; what they
check is the orchestration, caching and resuming, not the science.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlsae.paths import EMBEDDED_MODEL_DIR

# Pipeline parameters for the tests: R=2 (512 latents on d_model 256), k=4, 32
# training sequences of 64 tokens, 8 held-out sequences.
SMALL = dict(expansion_factors=[2], ks=[4], train_tokens=2048, eval_tokens=512, seq_len=64)


def request(**flat) -> dict:
    """Flow parameters (preset/target/grid/budget) of SMALL updated with `flat` fields."""
    from mlsae.plan import nest_fields

    return nest_fields({**SMALL, **flat})

EXPECTED_TABLES = ("saes", "layer_metrics", "tokens", "latents")
EXPECTED_VIEWS = ("latent_layers", "latent_stats", "variance_summary")
MLSAE_FIGURES = ("fig2_layer_heatmap.png", "fig3_prompt_heatmap.png",
                 "expected_layer_histogram.png", "metrics_vs_baselines.png", "mmcs.png")
MODEL_FIGURES = ("fig1_residual_similarity.png", "layer_std_by_config.png")


def save_tiny_model(directory: Path, n_layers: int = 2, d_model: int = 32) -> Path:
    """A random GPT-NeoX with the embedded tokenizer (same vocab), saved like a user's model."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=d_model,
                           num_hidden_layers=n_layers, num_attention_heads=4,
                           intermediate_size=2 * d_model, max_position_embeddings=256,
                           rotary_pct=0.25, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root: equal snapshots = nothing written."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel.startswith(skip):
                continue
            stat = path.stat()
            found[rel] = (stat.st_size, stat.st_mtime_ns)
    return found


def table_rows(out: Path, query: str) -> list[tuple]:
    from mlsae.warehouse import connect

    con = connect(out, read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def same_values(a, b, rel_tol: float = 1e-12) -> bool:
    """Rows or values equal, floats to rel_tol (NaN equals NaN): what two warehouses built
    from the same configuration compare by."""
    import math

    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel_tol,
                                                                  abs_tol=rel_tol)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_values(x, y, rel_tol)
                                        for x, y in zip(a, b, strict=True))
    return a == b


def _without_cache_path(config: str) -> dict:
    """saes.config records the activation cache's local path (a scratch directory on one
    worker, the warehouse on another): the one field that names where the run happened."""
    import json

    parsed = json.loads(config)
    parsed.get("extra", {}).pop("cache", None)
    return parsed


def assert_same_warehouse(want_where, got_where, rel_tol: float = 1e-12) -> None:
    """Every table and view of two warehouses (directories or URLs) built from the same
    configuration equal, floats to rel_tol; `saes` without what names where and when it was
    written (created_at, the activation cache's path in config)."""
    from mlsae.warehouse import connect

    want_con, got_con = connect(want_where, read_only=True), connect(got_where, read_only=True)
    try:
        views = [name for (name,) in want_con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]
        tables = {"latents", "tokens", "saes", "layer_metrics", "variance_summary"}
        assert tables <= set(views)
        for name in views:
            query = (f"SELECT * EXCLUDE (created_at, config), config FROM {name} ORDER BY sae_id"
                     if name == "saes" else f"SELECT * FROM {name} ORDER BY ALL")
            want, got = want_con.execute(query).fetchall(), got_con.execute(query).fetchall()
            if name == "saes":
                want = [(*r[:-1], _without_cache_path(r[-1])) for r in want]
                got = [(*r[:-1], _without_cache_path(r[-1])) for r in got]
            assert len(got) == len(want), name
            assert want or name not in tables, name
            for want_row, got_row in zip(want, got, strict=True):
                assert same_values(list(want_row), list(got_row), rel_tol), (name, want_row,
                                                                             got_row)
    finally:
        want_con.close()
        got_con.close()
