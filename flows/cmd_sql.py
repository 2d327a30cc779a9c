"""`mlsae sql "QUERY"`: read-only SQL over the warehouse, every table and view registered.

Runs DuckDB directly (no Prefect). Anything that would write, attach, install or
load extensions, change settings, or touch files outside the warehouse is refused
with a message saying what to do instead.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click

from mlsae.paths import default_warehouse_location

FORMATS = ("table", "csv", "json", "parquet")


def _cell(value: object) -> object:
    """CSV-safe scalar: NaN/inf become null, nested values their JSON text."""
    from mlsae.warehouse.readonly import json_value

    value = json_value(value)
    return json.dumps(value) if isinstance(value, list | dict) else value


# Control characters (C0, DEL, C1) and the Unicode line/paragraph separators would break
# a table row (a "\n" token printed a blank row): shown escaped, as Python writes them.
_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r",
                 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_control(text: str) -> str:
    """`text` with control characters escaped (\\n, \\t, \\r, \\xNN) for one-line display."""
    return text.translate(_ESCAPES)


def _text(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return escape_control(str(value))


def _print_table(columns: list[str], rows: list[tuple], total: int) -> None:
    columns = [escape_control(c) for c in columns]
    cells = [[_text(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    click.echo(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    click.echo("-+-".join("-" * w for w in widths))
    for row in cells:
        click.echo(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    shown = f"{len(rows)} of {total} rows" if total > len(rows) else f"{total} row(s)"
    click.echo(f"({shown})", err=total > len(rows))


@click.command("sql")
@click.argument("query", required=False)
@click.option("--out", "warehouse", default=None,
              help="Warehouse directory, or a URL of one copied to object storage "
                   "(s3://bucket/prefix; needs mlsae[s3]) (default: $MLSAE_HOME, else "
                   "./mlsae-data).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table: aligned text, control characters in text shown escaped (\\n, "
                   "\\t); csv: a header line then rows; json: an array of "
                   "objects; parquet: write --output FILE.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write with --format parquet.")
@click.option("--max-rows", type=int, default=100, show_default=True,
              help="Rows printed by --format table (0 = all).")
@click.option("--setup", is_flag=True,
              help="Print the SQL that registers every table and view (absolute paths; for "
                   "a bucket the committed objects' URLs after the httpfs setup), for the "
                   "plain duckdb CLI, and exit.")
def command(query: str | None, warehouse: str | None, fmt: str, output: Path | None,
            max_rows: int, setup: bool) -> None:
    """Run one read-only SQL QUERY over the warehouse.

    Tables: saes, layer_metrics, tokens, latents, and the per-part sums the views add
    up (latent_layer_sums, latent_var_sums, seq_sums). Views: latent_layers,
    latent_stats, variance_summary, latent_heatmap, layer_stats, token_layer_spread,
    latent_seq_moments, sae_layers. Table macros: prompt_heatmap(sae, seq),
    top_contexts(n := 10, width := 8), dead_latents(max_frequency := 0.0), and the
    *_of macros for an analysis of a subset of the rows. See docs/warehouse.md.

    \b
    Examples:
      mlsae sql "SELECT * FROM variance_summary"
      mlsae sql --format csv "SELECT * FROM latent_stats ORDER BY layer_std DESC LIMIT 20"
      mlsae sql --format parquet --output stats.parquet "SELECT * FROM latent_stats"
    """
    import duckdb

    from mlsae import warehouse as wh

    try:
        root = wh.require_warehouse(warehouse or default_warehouse_location())
    except wh.WarehouseError as e:
        raise click.ClickException(str(e)) from e
    if setup:
        click.echo(wh.setup_sql(root), nl=False)
        return
    if not query:
        raise click.UsageError('give a QUERY, e.g. mlsae sql "SELECT * FROM variance_summary"')
    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet needs --output FILE")
    if output is not None and fmt != "parquet":
        raise click.UsageError("--output is only for --format parquet (other formats print "
                               "to stdout; redirect it)")
    try:
        con = wh.connect(root, read_only=True)
        try:
            if fmt == "parquet":
                _write_parquet(wh.arrow_readonly(con, query), output)
                return
            cursor = wh.execute_readonly(con, query)
            columns = [d[0] for d in cursor.description or []]
            rows = cursor.fetchall()
        finally:
            con.close()
    except wh.WarehouseError as e:
        raise click.ClickException(str(e)) from e
    except duckdb.Error as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from e

    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        # csv quotes a field holding "\n" but not one holding only "\r", which readers then
        # take for a line end: such rows get their text fields quoted.
        quoted = csv.writer(sys.stdout, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(columns)
        for row in rows:
            cells = ["" if (c := _cell(v)) is None else c for v in row]
            (quoted if any(isinstance(c, str) and "\r" in c for c in cells)
             else writer).writerow(cells)
    elif fmt == "json":
        from mlsae.warehouse.readonly import json_value

        records = [{c: json_value(v) for c, v in zip(columns, row, strict=True)} for row in rows]
        click.echo(json.dumps(records))
    else:
        _print_table(columns, rows[:max_rows] if max_rows > 0 else rows, len(rows))


def _write_parquet(table, output: Path) -> None:
    """Write the result atomically (temp file + rename), outside DuckDB's locked-down sandbox."""
    import os

    import pyarrow.parquet as pq

    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, temp, compression="zstd")
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)
    click.echo(f"wrote {table.num_rows} rows to {output}", err=True)
