"""DuckDB over the warehouse: every table and sql/ view registered, per-part connections, and
the locked-down connection `mlsae sql` uses."""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from mlsae.paths import SQL_DIR
from mlsae.warehouse.errors import WarehouseError
from mlsae.warehouse.layout import (
    is_url,
    part_path,
    partition_dir,
    setup_sql_path,
    table_glob,
    warehouse_location,
)
from mlsae.warehouse.parquet import _temp_path, check_file, iter_partitions, table_files
from mlsae.warehouse.tables import PART_SUM_TABLES, TABLE_SPECS, TABLES

# --------------------------------------------------------------------------- DuckDB

_DUCKDB_TYPES = {
    pa.string(): "VARCHAR", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
    pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.list_(pa.int16()): "SMALLINT[]",
}


def _empty_table_sql(table: str) -> str:
    """A typed, empty relation for a table with no files yet (read_parquet of an empty glob fails)."""
    cols = ", ".join(f"CAST(NULL AS {_DUCKDB_TYPES[f.type]}) AS {f.name}"
                     for f in TABLE_SPECS[table].schema)
    return f"SELECT {cols} WHERE false"


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_view_sql(warehouse_dir: str | os.PathLike | None, table: str,
                   empty: bool = False) -> str:
    """CREATE VIEW for one table over its Parquet files. warehouse_dir=None writes a path
    relative to the warehouse (for setup.sql, run from inside the warehouse)."""
    if empty:
        body = _empty_table_sql(table)
    else:
        glob = f"{table}/*/*.parquet" if warehouse_dir is None else table_glob(
            warehouse_location(warehouse_dir), table)
        # hive_partitioning=false: sae_id is a column of every file already.
        body = f"SELECT * FROM read_parquet({_sql_literal(glob)}, hive_partitioning = false)"
    return f"CREATE OR REPLACE VIEW {table} AS {body};"


class SqlFile(NamedTuple):
    name: str
    path: Path
    depends: tuple[str, ...]
    text: str


def sql_files(sql_dir: Path = SQL_DIR) -> list[SqlFile]:
    """The sql/ files in dependency order (header line `-- depends: a, b`)."""
    found = {}
    for path in sorted(sql_dir.glob("*.sql")):
        text = path.read_text()
        depends: tuple[str, ...] = ()
        for line in text.splitlines():
            m = re.match(r"^--\s*depends:\s*(.*)$", line.strip())
            if m:
                depends = tuple(d.strip() for d in m.group(1).split(",") if d.strip())
        found[path.stem] = SqlFile(path.stem, path, depends, text)
    ordered: list[SqlFile] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done" or name in TABLE_SPECS:
            return
        if name not in found:
            raise ValueError(f"sql/{chain[-1]}.sql depends on unknown {name!r}")
        if state.get(name) == "visiting":
            raise ValueError(f"cyclic sql/ dependencies: {' -> '.join(chain + (name,))}")
        state[name] = "visiting"
        for dep in found[name].depends:
            visit(dep, chain + (name,))
        state[name] = "done"
        ordered.append(found[name])

    for name in found:
        visit(name, (name,))
    return ordered


def setup_sql(warehouse_dir: str | os.PathLike, relative: bool = False) -> str:
    """The whole SQL script that registers every table and view of `warehouse_dir`.
    relative=True writes table paths relative to the warehouse (run it from there).
    Tables with no files yet become empty typed views, so regenerate it after writing.
    For a warehouse at a URL: see bucket_setup_sql."""
    if is_url(warehouse_dir):
        return bucket_setup_sql(warehouse_dir)
    parts = ["-- mlsae warehouse: tables and views (generated from mlsae/warehouse/ and sql/)"]
    for table in TABLES:
        empty = not table_files(warehouse_dir, table)
        parts.append(table_view_sql(None if relative else warehouse_dir, table, empty=empty))
    parts += [f.text.strip() for f in sql_files()]
    return "\n\n".join(parts) + "\n"


def _s3_secret_sql(url: str) -> list[str]:
    """Plain DuckDB's S3 access for the bucket of `url`: httpfs + aws, credentials from the
    standard AWS chain (environment, ~/.aws, instance role), the endpoint of
    AWS_ENDPOINT_URL (MinIO, Ceph, R2, a test server) when one is set."""
    from urllib.parse import urlparse

    options = ["TYPE s3", "PROVIDER credential_chain", f"SCOPE {_sql_literal(url)}"]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        options += [f"ENDPOINT {_sql_literal(parsed.netloc or parsed.path)}",
                    "URL_STYLE 'path'", f"USE_SSL {str(parsed.scheme != 'http').lower()}"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options.append(f"REGION {_sql_literal(region)}")
    return ["INSTALL httpfs;", "LOAD httpfs;", "INSTALL aws;", "LOAD aws;",
            "CREATE OR REPLACE SECRET mlsae_s3 (" + ", ".join(options) + ");"]


def bucket_setup_sql(url: str | os.PathLike) -> str:
    """The setup script for plain DuckDB reading a warehouse at a URL in place: every
    table a view over the explicit list of its COMMITTED files (a glob would also take an
    interrupted upload's debris), read from the commit objects (remote.committed_files:
    nothing is downloaded), then the sql/ views. For s3:// it starts with the httpfs/aws
    setup (_s3_secret_sql); other schemes need DuckDB's own setup for that store.
    Regenerate it after new runs."""
    from mlsae.warehouse.layout import warehouse_url
    from mlsae.warehouse.remote import committed_files

    base = warehouse_url(url)
    committed = committed_files(base)
    parts = [f"-- mlsae warehouse at {base}: tables and views for plain DuckDB, reading the "
             "bucket in place (generated by `mlsae sql --setup`; lists the committed files, "
             "so regenerate it after new runs)"]
    if base.startswith("s3://"):
        parts.append("-- DuckDB's httpfs and aws extensions: INSTALL downloads them once "
                     "(where DuckDB's extension site is reachable)\n"
                     + "\n".join(_s3_secret_sql(base)))
    else:
        parts.append(f"-- register DuckDB's filesystem for {base.split('://')[0]}:// before "
                     "the views below")
    for table in TABLES:
        files = [rel for rel in committed if rel.startswith(f"{table}/")
                 and rel.endswith(".parquet") and not rel.rsplit("/", 1)[-1].startswith(".")]
        if not files:
            parts.append(f"CREATE OR REPLACE VIEW {table} AS {_empty_table_sql(table)};")
            continue
        urls = ", ".join(_sql_literal(f"{base}/{rel}") for rel in files)
        parts.append(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet([{urls}], "
                     "hive_partitioning = false);")
    parts += [f.text.strip() for f in sql_files()]
    return "\n\n".join(parts) + "\n"


def write_setup_script(warehouse_dir: str | os.PathLike) -> Path:
    """Write <warehouse>/setup.sql (relative paths) for `cd <warehouse> && duckdb -init setup.sql`."""
    path = setup_sql_path(warehouse_dir)
    temp = _temp_path(path)
    temp.write_text(setup_sql(warehouse_dir, relative=True))
    os.replace(temp, path)
    return path


def connect(warehouse_dir: str | os.PathLike, read_only: bool = True,
            threads: int | None = None, memory_limit: str | None = None):
    """An in-memory DuckDB connection with every table (over the warehouse's Parquet files)
    and every sql/ view and macro registered.

    read_only=True then locks it down: no file access outside the warehouse, no
    extension install/load, configuration locked. Raises WarehouseError naming any
    corrupt or foreign Parquet file in the warehouse.
    """
    if is_url(warehouse_dir):  # queries run on a local mirror of its tables (mirror.py)
        from mlsae.warehouse.mirror import local_mirror

        root = local_mirror(warehouse_dir)
    else:
        root = warehouse_location(warehouse_dir)
    if not root.is_dir():
        raise WarehouseError(f"warehouse {root} does not exist: pass --out DIR (or set "
                             "MLSAE_HOME) to a directory written by `mlsae run`")
    con = _open_duckdb(threads, memory_limit)
    try:
        for table in TABLES:
            con.execute(table_view_sql(root, table, empty=not table_files(root, table)))
        check_part_sums(root)
        _register_sql(con)
        _check_sae_id_hashes(con, root)
        if read_only:
            _lock_down(con, root)
    except Exception:
        con.close()
        raise
    return con


def _open_duckdb(threads: int | None = None, memory_limit: str | None = None):
    """An in-memory DuckDB connection with mlsae's session settings."""
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")  # it would print on stdout (csv output!)
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = {_sql_literal(memory_limit)}")
    return con


def _register_sql(con) -> None:
    """Every sql/ view and macro, in dependency order, over the tables `con` already has."""
    for f in sql_files():
        con.execute(f.text)


def query_dicts(con, sql: str, params: list | None = None) -> list[dict]:
    """The rows of one query on a connection, each as {column: value}."""
    cursor = con.execute(sql, params or [])
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def missing_part_sums(warehouse_dir: str | os.PathLike) -> list[Path]:
    """The per-part sum files (PART_SUM_TABLES) that a logged latents part lacks."""
    missing = []
    for path in table_files(warehouse_dir, "latents"):
        sae_id = path.parent.name.removeprefix("sae_id=")
        for table in PART_SUM_TABLES:
            expected = partition_dir(warehouse_dir, table, sae_id) / path.name
            if not expected.exists():
                missing.append(expected)
    return missing


def check_part_sums(warehouse_dir: str | os.PathLike) -> None:
    """Raise WarehouseError unless every latents part has its per-part sums and every
    sums file has its latents part (the headline views read the sums, so a mismatch would
    silently drop or double rows)."""
    missing = missing_part_sums(warehouse_dir)
    if missing:
        raise WarehouseError(
            f"{missing[0]}: missing ({len(missing)} per-part sum file(s) missing in all): "
            "latents parts were logged without the sums the views read (an older "
            "warehouse, or a logging run stopped between files; if a run is logging this "
            "SAE now, wait for it). Fix: compute them from the logged parts, without the "
            "model: python -c \"from mlsae.latents import complete_part_sums; "
            f"complete_part_sums('{Path(warehouse_dir)}')\" (or rerun "
            "mlsae.latents.log_latents for that SAE, which adds them)")
    for table in PART_SUM_TABLES:
        for path in table_files(warehouse_dir, table):
            sae_id = path.parent.name.removeprefix("sae_id=")
            if not (partition_dir(warehouse_dir, "latents", sae_id) / path.name).exists():
                raise WarehouseError(
                    f"{path}: sums of a latents part that does not exist ("
                    f"{partition_dir(warehouse_dir, 'latents', sae_id) / path.name}). Fix: "
                    f"delete it, or restore the latents part")


def part_connection(warehouse_dir: str | os.PathLike, sae_id: str, part: int,
                    threads: int | None = None):
    """A DuckDB connection whose `saes`, `latents` and `tokens` are that SAE's row and the
    files of ONE logged part (other tables empty), with every sql/ macro and view
    registered: mlsae.part_sums runs sql/part_sums.sql's macros on it."""
    files = {"saes": [partition_dir(warehouse_dir, "saes", sae_id) / "saes.parquet"],
             "latents": [part_path(warehouse_dir, "latents", sae_id, part)],
             "tokens": [part_path(warehouse_dir, "tokens", sae_id, part)]}
    con = _open_duckdb(threads)
    try:
        for table in TABLES:
            paths = files.get(table)
            for path in paths or ():
                if not path.exists():
                    raise WarehouseError(f"{path}: missing; it is needed to compute the sums "
                                         f"of part {part} of sae_id {sae_id!r}")
                check_file(path, table)
            if paths:
                listed = ", ".join(_sql_literal(str(p.resolve())) for p in paths)
                body = f"SELECT * FROM read_parquet([{listed}], hive_partitioning = false)"
            else:
                body = _empty_table_sql(table)
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {body};")
        _register_sql(con)
    except Exception:
        con.close()
        raise
    return con


def memory_connection(tables: dict[str, pa.Table], threads: int | None = None):
    """A DuckDB connection whose tables are the given in-memory Arrow tables (by table
    name; every other table empty), with every sql/ macro and view registered and no
    file access: the sql/ analyses over rows that are not in a warehouse (the explorer
    runs prompt_heatmap over one typed-in prompt's activations this way). Replace a
    table's rows later with `con.register(f"_{name}_rows", new_table)`."""
    con = _open_duckdb(threads)
    try:
        for table in TABLES:
            if table in tables:
                con.register(f"_{table}_rows", tables[table])
                body = f"SELECT * FROM _{table}_rows"
            else:
                body = _empty_table_sql(table)
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {body};")
        _register_sql(con)
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
    except Exception:
        con.close()
        raise
    return con


def _check_sae_id_hashes(con, root: Path) -> None:
    # Views group by hash(sae_id) (~2x faster than by the string); make sure no two of
    # this warehouse's ids collide (check_file ties every file's sae_id to its directory).
    ids = sorted({sae_id for table in TABLES for sae_id in iter_partitions(root, table)})
    if len(ids) > 1:
        values = ", ".join(f"({_sql_literal(i)})" for i in ids)
        (n_hashes,) = con.execute(
            f"SELECT count(DISTINCT hash(x)) FROM (VALUES {values}) v(x)").fetchone()
        if n_hashes != len(ids):
            raise WarehouseError("two sae_ids in this warehouse have the same 64-bit hash; "
                                 "rename one of them")


@functools.cache
def _spill_dir() -> Path:
    """One private directory per process for DuckDB to spill big aggregations to."""
    path = Path(tempfile.mkdtemp(prefix="mlsae-duckdb-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _lock_down(con, root: Path) -> None:
    spill = _spill_dir()
    con.execute(f"SET temp_directory = {_sql_literal(str(spill))}")
    allowed = ", ".join(_sql_literal(str(p) + os.sep) for p in (root, spill))
    con.execute(f"SET allowed_directories = [{allowed}]")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
