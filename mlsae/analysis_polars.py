"""Polars LazyFrame versions of the headline views (latent_layers, latent_stats,
variance_summary), over the same Parquet files.

sql/ stays the single source of truth; these mirror it step for step (same helper
stages, same formulas) for people who prefer dataframes, and tests cross-check the
two. Collect with `.collect(engine="streaming")` for bounded memory on big tables.

    from mlsae import analysis_polars as ap
    ap.variance_summary("mlsae-data").collect()
"""

from __future__ import annotations

import os

import polars as pl
import pyarrow.parquet as pq

from mlsae import warehouse as wh


def scan_table(warehouse_dir: str | os.PathLike, table: str) -> pl.LazyFrame:
    """A LazyFrame over one warehouse table (files checked like connect() does);
    sae_id is a plain String column."""
    files = wh.table_files(warehouse_dir, table)
    if not files:
        frame = pl.from_arrow(wh.TABLE_SPECS[table].schema.empty_table()).lazy()
    else:
        frame = pl.scan_parquet([str(f) for f in files], hive_partitioning=False)
    return frame.with_columns(pl.col("sae_id").cast(pl.String))


def sae_layers(warehouse_dir: str | os.PathLike) -> pl.LazyFrame:
    """sql/sae_layers.sql: sae_id, layer (block), layer_idx (0..L-1), n_layers."""
    return (
        scan_table(warehouse_dir, "saes")
        .select(
            "sae_id",
            pl.col("layers").alias("layer"),
            pl.int_ranges(0, pl.col("layers").list.len(), dtype=pl.Int16).alias("layer_idx"),
            pl.col("layers").list.len().alias("n_layers"),
        )
        .explode("layer", "layer_idx")
    )


def _active(warehouse_dir: str | os.PathLike) -> pl.LazyFrame:
    return scan_table(warehouse_dir, "latents").filter(pl.col("value") > 0)


def latent_layers(warehouse_dir: str | os.PathLike) -> pl.LazyFrame:
    """sql/latent_layers.sql: sae_id, latent, layer, layer_idx, count, mass, p."""
    per_layer = _active(warehouse_dir).group_by("sae_id", "latent", "layer").agg(
        count=pl.len(), mass=pl.col("value").cast(pl.Float64).sum())
    return (
        per_layer.join(sae_layers(warehouse_dir).select("sae_id", "layer", "layer_idx"),
                       on=["sae_id", "layer"])
        .with_columns(p=pl.col("mass") / pl.col("mass").sum().over("sae_id", "latent"))
        .select("sae_id", "latent", "layer", "layer_idx", "count", "mass", "p")
    )


def _sequence_groups(warehouse_dir: str | os.PathLike) -> list[list[str]]:
    """The latents files in groups that no sequence spans (one group per file when each
    SAE's files hold disjoint seq_id ranges, as the logger writes them; else one group
    per SAE), read from the Parquet statistics."""
    groups: list[list[str]] = []
    by_sae: dict[str, list] = {}
    for path in wh.table_files(warehouse_dir, "latents"):
        meta = pq.read_metadata(path)
        col = meta.schema.to_arrow_schema().names.index("seq_id")
        stats = [meta.row_group(i).column(col).statistics for i in range(meta.num_row_groups)]
        known = all(s is not None and s.has_min_max for s in stats) and stats
        span = (min(s.min for s in stats), max(s.max for s in stats)) if known else None
        by_sae.setdefault(path.parent.name, []).append((span, str(path)))
    for files in by_sae.values():
        spans = sorted(span for span, _ in files if span is not None)
        disjoint = len(spans) == len(files) and all(
            a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
        groups += [[f] for _, f in files] if disjoint else [[f for _, f in files]]
    return groups


def _seq_moments_of(latents: pl.LazyFrame, layer_map: pl.LazyFrame) -> pl.LazyFrame:
    a = pl.col("value").cast(pl.Float64)
    i = pl.col("layer_idx").cast(pl.Float64)
    bit = pl.lit(2, dtype=pl.UInt64).pow(pl.col("layer_idx").cast(pl.UInt64))
    per_token = (
        latents.join(layer_map, on=["sae_id", "layer"])
        .group_by("sae_id", "seq_id", "pos", "latent")
        .agg(count=pl.len(), m=a.sum(), s1=(a * i).sum(), s2=(a * i * i).sum(),
             layer_mask=bit.bitwise_or())
        .with_columns(mv=pl.when(pl.col("count") == 1).then(0.0).otherwise(
            (pl.col("s2") - pl.col("s1") ** 2 / pl.col("m")).clip(lower_bound=0.0)))
    )
    m, s1, s2 = pl.col("m"), pl.col("s1"), pl.col("s2")
    return (
        per_token.group_by("sae_id", "seq_id", "latent")
        .agg(count=pl.col("count").sum(), n_tokens=pl.len(), mass=m.sum(), s1=s1.sum(),
             s2=s2.sum(), layer_mask=pl.col("layer_mask").bitwise_or(),
             token_mv=pl.col("mv").sum(),
             prompt_mv=pl.when(pl.col("layer_mask").bitwise_or().bitwise_count_ones() == 1)
             .then(0.0).otherwise((s2.sum() - s1.sum() ** 2 / m.sum()).clip(lower_bound=0.0)),
             sum_e=(s1 / m).sum(), sum_e2=(s2 / m).sum(), sum_v=(pl.col("mv") / m).sum())
    )


def latent_seq_moments(warehouse_dir: str | os.PathLike) -> pl.LazyFrame:
    """sql/latent_seq_moments.sql: per (sae, seq, latent) count, n_tokens, mass, s1, s2,
    token_mv, prompt_mv, sum_e, sum_e2, sum_v.

    Unlike the SQL it aggregates file by file when no sequence spans two files (the
    logger's parts), which keeps Polars' hash tables small; the result is the same."""
    layer_map = sae_layers(warehouse_dir).select("sae_id", "layer", "layer_idx")
    widest = scan_table(warehouse_dir, "saes").select(pl.col("layers").list.len().max()).collect()
    if (widest.item() or 0) > 64:
        raise ValueError("the Polars versions handle SAEs over at most 64 layers (a UInt64 "
                         "layer mask); use the SQL views (up to 127 layers)")
    groups = _sequence_groups(warehouse_dir)
    if not groups:
        return _seq_moments_of(scan_table(warehouse_dir, "latents"), layer_map)
    return pl.concat([
        _seq_moments_of(pl.scan_parquet(files, hive_partitioning=False)
                        .with_columns(pl.col("sae_id").cast(pl.String)), layer_map)
        for files in groups])


def latent_stats(warehouse_dir: str | os.PathLike) -> pl.LazyFrame:
    """sql/latent_stats.sql: sae_id, latent, count, mass, n_layers_active, expected_layer,
    layer_var, layer_std, relative_std, token_var, prompt_var."""
    return _latent_stats_of(latent_seq_moments(warehouse_dir), warehouse_dir)


def _latent_stats_of(seq_moments: pl.LazyFrame, warehouse_dir) -> pl.LazyFrame:
    mass, s1, s2 = pl.col("mass"), pl.col("s1"), pl.col("s2")
    n_layers = scan_table(warehouse_dir, "saes").select(
        "sae_id", n_layers=pl.col("layers").list.len())
    return (
        seq_moments.group_by("sae_id", "latent")
        .agg(count=pl.col("count").sum(), mass=mass.sum(), s1=s1.sum(), s2=s2.sum(),
             n_layers_active=pl.col("layer_mask").bitwise_or().bitwise_count_ones(),
             token_mv=pl.col("token_mv").sum(), prompt_mv=pl.col("prompt_mv").sum())
        .join(n_layers, on="sae_id")
        .with_columns(
            expected_layer=s1 / mass,
            layer_var=pl.when(pl.col("n_layers_active") == 1).then(0.0).otherwise(
                (s2 - s1 ** 2 / mass).clip(lower_bound=0.0) / mass),
            token_var=pl.col("token_mv") / mass, prompt_var=pl.col("prompt_mv") / mass)
        .with_columns(layer_std=pl.col("layer_var").sqrt())
        .with_columns(relative_std=pl.col("layer_std") / pl.col("n_layers"))
        .select("sae_id", "latent", "count", "mass", "n_layers_active", "expected_layer",
                "layer_var", "layer_std", "relative_std", "token_var", "prompt_var")
    )


def variance_summary(warehouse_dir: str | os.PathLike) -> pl.LazyFrame:
    """sql/variance_summary.sql: one row per SAE (see there for the columns)."""
    seq_moments = latent_seq_moments(warehouse_dir)
    live = _latent_stats_of(seq_moments, warehouse_dir).group_by("sae_id").agg(
        n_live=pl.len(), mean_layer_var=pl.col("layer_var").mean(),
        mean_prompt_var=pl.col("prompt_var").mean(), mean_token_var=pl.col("token_var").mean(),
        mean_layer_std=pl.col("layer_std").mean(),
        std_layer_std=pl.col("layer_std").std(ddof=0),
        mean_relative_std=pl.col("relative_std").mean())
    seq_len = scan_table(warehouse_dir, "tokens").group_by("sae_id", "seq_id").agg(t=pl.len())
    per_seq = (
        seq_moments.join(seq_len, on=["sae_id", "seq_id"])
        .group_by("sae_id", "seq_id")
        .agg(a_sum_t=(pl.col("sum_e2") - pl.col("sum_e") ** 2 / pl.col("t")).sum(),
             b_sum_t=pl.col("sum_v").sum())
    )
    saes = scan_table(warehouse_dir, "saes").select("sae_id", "n_latents")
    a_sum = pl.col("a_sum_t").fill_null(0.0)
    b_sum = pl.col("b_sum_t").fill_null(0.0)
    scale = pl.col("t") * pl.col("n_latents")
    ref = (
        seq_len.join(per_seq, on=["sae_id", "seq_id"], how="left").join(saes, on="sae_id")
        .group_by("sae_id")
        .agg(ref_n_sequences=pl.len(), ref_var_aggregated=(a_sum / scale).mean(),
             ref_var_token=(b_sum / scale).mean(),
             ref_rel_var=(b_sum / pl.when(a_sum != 0).then(a_sum)).mean())
    )
    return (
        saes.join(live, on="sae_id", how="left").join(ref, on="sae_id", how="left")
        .with_columns(
            n_live=pl.col("n_live").fill_null(0),
            ref_n_sequences=pl.col("ref_n_sequences").fill_null(0),
            ratio_token=pl.col("mean_layer_var") / pl.col("mean_token_var"),
            ratio_prompt=pl.col("mean_layer_var") / pl.col("mean_prompt_var"))
        .select("sae_id", "n_latents", "n_live", "mean_layer_var", "mean_prompt_var",
                "mean_token_var", "ratio_token", "ratio_prompt", "mean_layer_std",
                "std_layer_std", "mean_relative_std", "ref_n_sequences",
                "ref_var_aggregated", "ref_var_token", "ref_rel_var")
    )
