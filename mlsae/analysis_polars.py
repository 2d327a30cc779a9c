"""Polars LazyFrame versions of the headline views (latent_layers, latent_stats,
variance_summary), over the same Parquet files.

sql/ stays the single source of truth; these mirror the views step for step (same
stages, same formulas) for people who prefer dataframes, and tests cross-check the
two. Like the views they read the per-part sums the logger stores (sql/part_sums.sql),
not the raw latents; for per-token work on a subset use the SQL macros.

    from mlsae import analysis_polars as ap
    ap.variance_summary("mlsae-data").collect()
"""

from __future__ import annotations

import os

import polars as pl

from mlsae import warehouse as wh


def scan_table(warehouse_dir: str | os.PathLike, table: str) -> pl.LazyFrame:
    """A LazyFrame over one warehouse table (files checked like connect() does);
    sae_id is a plain String column. A bucket URL is read from its local mirror."""
    if wh.is_url(warehouse_dir):
        from mlsae.warehouse.mirror import local_mirror

        warehouse_dir = local_mirror(warehouse_dir)
    files = wh.table_files(warehouse_dir, table)
    schema = pl.from_arrow(wh.TABLE_SPECS[table].schema.empty_table()).schema
    if not files:
        return pl.LazyFrame(schema=schema)
    # The table's own schema: files written before sae_id became a plain string hold it
    # as a dictionary (Categorical), and a warehouse may mix both.
    return pl.scan_parquet([str(f) for f in files], hive_partitioning=False, schema=schema,
                           cast_options=pl.ScanCastOptions(categorical_to_string="allow"))


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


def _checked(warehouse_dir: str | os.PathLike) -> str | os.PathLike:
    if wh.is_url(warehouse_dir):  # a bucket: its local mirror, synced once per view
        from mlsae.warehouse.mirror import local_mirror

        warehouse_dir = local_mirror(warehouse_dir)
    wh.check_part_sums(warehouse_dir)  # as connect(): a latents part without its sums fails
    return warehouse_dir


def latent_layers(warehouse_dir: str | os.PathLike) -> pl.LazyFrame:
    """sql/latent_layers.sql: sae_id, latent, layer, layer_idx, count, mass, p (from the
    stored per-part sums, table latent_layer_sums)."""
    per_layer = scan_table(_checked(warehouse_dir), "latent_layer_sums").group_by(
        "sae_id", "latent", "layer").agg(pl.col("count").sum(), pl.col("mass").sum())
    return (
        per_layer.join(sae_layers(warehouse_dir).select("sae_id", "layer", "layer_idx"),
                       on=["sae_id", "layer"])
        .with_columns(p=pl.col("mass") / pl.col("mass").sum().over("sae_id", "latent"))
        .select("sae_id", "latent", "layer", "layer_idx", "count", "mass", "p")
    )


def latent_stats(warehouse_dir: str | os.PathLike) -> pl.LazyFrame:
    """sql/latent_stats.sql (the view, latent_stats_from_sums): sae_id, latent, count, mass,
    n_layers_active, expected_layer, layer_var, layer_std, relative_std, token_var,
    prompt_var."""
    mass, s1, s2 = pl.col("mass"), pl.col("s1"), pl.col("s2")
    idx = pl.col("layer_idx").cast(pl.Float64)
    per_latent_layers = (
        latent_layers(warehouse_dir)
        .group_by("sae_id", "latent")
        .agg(count=pl.col("count").sum(), mass=mass.sum(), s1=(mass * idx).sum(),
             s2=(mass * idx * idx).sum(), n_layers_active=pl.len().cast(pl.Int16))
    )
    per_latent_var = scan_table(warehouse_dir, "latent_var_sums").group_by(
        "sae_id", "latent").agg(pl.col("token_mv").sum(), pl.col("prompt_mv").sum())
    n_layers = scan_table(warehouse_dir, "saes").select(
        "sae_id", n_layers=pl.col("layers").list.len())
    return (
        per_latent_layers.join(per_latent_var, on=["sae_id", "latent"])
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
    """sql/variance_summary.sql: one row per SAE (see there for the columns), from
    latent_stats and the stored per-sequence sums (table seq_sums)."""
    live = latent_stats(warehouse_dir).group_by("sae_id").agg(
        n_live=pl.len(), mean_layer_var=pl.col("layer_var").mean(),
        mean_prompt_var=pl.col("prompt_var").mean(), mean_token_var=pl.col("token_var").mean(),
        mean_layer_std=pl.col("layer_std").mean(),
        std_layer_std=pl.col("layer_std").std(ddof=0),
        mean_relative_std=pl.col("relative_std").mean())
    saes = scan_table(warehouse_dir, "saes").select("sae_id", "n_latents")
    a_sum, b_sum = pl.col("a_sum_t"), pl.col("b_sum_t")
    scale = pl.col("t") * pl.col("n_latents")
    ref = (
        scan_table(warehouse_dir, "seq_sums").join(saes, on="sae_id")
        .group_by("sae_id")
        .agg(ref_n_sequences=pl.len(), n_tokens=pl.col("t").cast(pl.Int64).sum(),
             ref_var_aggregated=(a_sum / scale).mean(),
             ref_var_token=(b_sum / scale).mean(),
             ref_rel_var=(b_sum / pl.when(a_sum != 0).then(a_sum)).mean())
    )
    return (
        saes.join(live, on="sae_id", how="left").join(ref, on="sae_id", how="left")
        .with_columns(
            # No seq_sums rows = latents not logged: NULL ("not logged"), not 0 live.
            n_live=pl.when(pl.col("ref_n_sequences").is_not_null())
            .then(pl.col("n_live").fill_null(0)),
            n_tokens=pl.col("n_tokens").fill_null(0),
            ratio_token=pl.col("mean_layer_var") / pl.col("mean_token_var"),
            ratio_prompt=pl.col("mean_layer_var") / pl.col("mean_prompt_var"))
        .select("sae_id", "n_latents", "n_tokens", "n_live", "mean_layer_var", "mean_prompt_var",
                "mean_token_var", "ratio_token", "ratio_prompt", "mean_layer_std",
                "std_layer_std", "mean_relative_std", "ref_n_sequences",
                "ref_var_aggregated", "ref_var_token", "ref_rel_var")
    )
