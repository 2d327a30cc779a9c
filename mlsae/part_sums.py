"""The per-part sums behind the headline views: for one logged part of `latents` (and
`tokens`), DuckDB runs sql/part_sums.sql's macros over that part's files and the results
are written beside it, atomically, as the tables latent_layer_sums, latent_var_sums and
seq_sums (part-i.parquet, like the latents part).

The formulas live in sql/ only; this module names which macro fills which table and
does the file work. Parts split the data by sequence, so the views' sums over parts
equal the on-the-fly sums over the whole table (tests/test_sql_views.py checks it).
"""

from __future__ import annotations

import os
from pathlib import Path

from mlsae import warehouse as wh

# table -> the macro call that fills it, over the relations of wh.part_connection
# (`latents`, `tokens`) and the part's seq moments (materialised once, below).
PART_SUM_QUERIES = {
    "latent_layer_sums": "latent_layer_sums_of(latents)",
    "latent_var_sums": "latent_var_sums_of(part_seq_moments)",
    "seq_sums": "seq_sums_of(part_seq_moments, tokens)",
}
assert tuple(PART_SUM_QUERIES) == wh.PART_SUM_TABLES

# The headline views computed from the raw latents rows instead of the stored sums (the
# same sql/ macros): what tests compare the views with, and what the benchmark times
# as the ad-hoc (filtered-subset) path.
ON_THE_FLY = {
    "latent_layers": "WITH sums AS (FROM latent_layer_sums_of(latents)) "
                     "FROM latent_layers_of(sums)",
    "latent_stats": "FROM latent_stats_of(latent_seq_moments)",
    "variance_summary": "WITH m AS MATERIALIZED (FROM latent_seq_moments), "
                        "st AS (FROM latent_stats_of(m)), ss AS (FROM seq_sums_of(m, tokens)) "
                        "FROM variance_summary_of(st, ss)",
}


def part_sum_paths(warehouse_dir: str | os.PathLike, sae_id: str, part: int) -> dict[str, Path]:
    """Where the sums of latents part `part` of `sae_id` live, per table."""
    return {table: wh.part_path(warehouse_dir, table, sae_id, part) for table in PART_SUM_QUERIES}


def part_index(path: Path) -> int:
    """part-00012.parquet -> 12."""
    return int(path.stem.removeprefix("part-"))


def write_part_sums(warehouse_dir: str | os.PathLike, sae_id: str, part: int,
                    threads: int | None = None) -> int:
    """Compute and write (each atomically) the sums files of one logged part that do not
    exist yet, from its latents and tokens files. Returns how many files were written."""
    todo = {t: p for t, p in part_sum_paths(warehouse_dir, sae_id, part).items()
            if not p.exists()}
    if not todo:
        return 0
    con = wh.part_connection(warehouse_dir, sae_id, part, threads)
    try:
        if any("part_seq_moments" in PART_SUM_QUERIES[t] for t in todo):
            # the one per-(token, latent) GROUP BY, shared by the two tables that need it
            con.execute("CREATE TEMP TABLE part_seq_moments AS "
                        "SELECT * FROM latent_seq_moments")
        for table, path in todo.items():
            order = ", ".join(wh.TABLE_SPECS[table].sort_key)
            data = con.sql(f"SELECT * FROM {PART_SUM_QUERIES[table]} ORDER BY {order}"
                           ).to_arrow_table()
            wh.write_table_atomic(table, data, path)
    finally:
        con.close()
    return len(todo)
