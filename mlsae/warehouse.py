"""The warehouse directory: where each table's Parquet files live and how they are
written, a DuckDB connection with every table and sql/ view registered, and the
read-only guard behind `mlsae sql`.

Layout (one directory per table and SAE, so two SAEs never share a file):

    <warehouse>/saes/sae_id=<id>/saes.parquet
    <warehouse>/layer_metrics/sae_id=<id>/layer_metrics.parquet
    <warehouse>/tokens/sae_id=<id>/part-00000.parquet
    <warehouse>/latents/sae_id=<id>/part-00000.parquet
    <warehouse>/setup.sql      (the same views for the plain duckdb CLI)
    <warehouse>/.tmp/<table>/sae_id=<id>/   files being written (then renamed into place)

Table directories hold only finished Parquet files, so plain Polars / duckdb can scan
them. Every file carries its own sae_id column (a plain string, dictionary-encoded in
Parquet: ~0 bytes), so a file is meaningful on its own; the directory name is only for
people and for pruning. docs/warehouse.md explains the types and encodings and their
measured cost.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlsae.paths import SQL_DIR

# --------------------------------------------------------------------------- tables

SAE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# sae_id is a plain string column in every table (so Polars reads String everywhere and
# joins need no cast), stored dictionary/RLE-encoded in Parquet: a file's one id repeated
# costs ~0.005 bytes per row (docs/warehouse.md). Files written before this change hold it
# as an Arrow dictionary (Polars: Categorical); every reader here accepts both, and
# upgrade_warehouse() rewrites them.
_SAE_ID = pa.string()


@dataclass(frozen=True)
class TableSpec:
    """One warehouse table: its Arrow schema (as written) and its sort order within a file."""

    name: str
    schema: pa.Schema
    sort_key: tuple[str, ...]
    doc: str


TABLE_SPECS: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "saes",
            pa.schema([
                ("sae_id", pa.string()), ("model", pa.string()), ("n_layers", pa.int16()),
                ("d_model", pa.int32()), ("n_latents", pa.int32()),
                ("expansion_factor", pa.int32()), ("k", pa.int32()),
                ("layers", pa.list_(pa.int16())), ("lens", pa.string()),
                ("train_tokens", pa.int64()), ("config", pa.string()),
                ("created_at", pa.timestamp("us", tz="UTC")),
            ]),
            ("sae_id",),
            "one row per trained autoencoder; layers = model block indices it reads",
        ),
        TableSpec(
            "layer_metrics",
            pa.schema([
                ("sae_id", pa.string()), ("layer", pa.int16()), ("fvu", pa.float64()),
                ("mse", pa.float64()), ("l0", pa.float64()), ("dead_fraction", pa.float64()),
                ("delta_ce", pa.float64()), ("kl", pa.float64()),
            ]),
            ("layer",),
            "evaluation metrics per (sae, model block)",
        ),
        TableSpec(
            "tokens",
            pa.schema([
                ("sae_id", _SAE_ID), ("seq_id", pa.int32()), ("pos", pa.int16()),
                ("token_id", pa.int32()), ("token", pa.string()),
            ]),
            ("seq_id", "pos"),
            "the logged (unmasked) evaluation tokens, scoped by sae_id",
        ),
        TableSpec(
            "latents",
            pa.schema([
                ("sae_id", _SAE_ID), ("seq_id", pa.int32()), ("pos", pa.int16()),
                ("layer", pa.int16()), ("latent", pa.int32()), ("value", pa.float32()),
            ]),
            ("seq_id", "pos", "layer", "latent"),
            "every positive post-ReLU activation; layer = model block index",
        ),
        # The per-part sums of sql/part_sums.sql, written by mlsae.part_sums beside each
        # latents part (same file name): the headline views read these, not `latents`.
        TableSpec(
            "latent_layer_sums",
            pa.schema([
                ("sae_id", _SAE_ID), ("latent", pa.int32()), ("layer", pa.int16()),
                ("count", pa.int64()), ("mass", pa.float64()),
            ]),
            ("latent", "layer"),
            "per (part, latent, layer): active rows and sum of values",
        ),
        TableSpec(
            "latent_var_sums",
            pa.schema([
                ("sae_id", _SAE_ID), ("latent", pa.int32()), ("token_mv", pa.float64()),
                ("prompt_mv", pa.float64()),
            ]),
            ("latent",),
            "per (part, latent): sum_t m_tj V_tj and sum_s m_sj V_sj",
        ),
        TableSpec(
            "seq_sums",
            pa.schema([
                ("sae_id", _SAE_ID), ("seq_id", pa.int32()), ("t", pa.int32()),
                ("a_sum_t", pa.float64()), ("b_sum_t", pa.float64()),
            ]),
            ("seq_id",),
            "per logged sequence: token count and the reference variant's sums",
        ),
    )
}
TABLES = tuple(TABLE_SPECS)
# Tables with one file per logged part, named like the latents part they summarise.
PART_SUM_TABLES = ("latent_layer_sums", "latent_var_sums", "seq_sums")

# Encodings chosen by measurement (docs/warehouse.md): runs of seq_id/pos/layer
# collapse to RLE dictionaries; latent ids are plain + zstd (delta was larger);
# values are byte-stream-split so the exponent bytes compress apart from the
# (mostly zero, see quantize_values) low mantissa bytes.
ROW_GROUP_ROWS = 1 << 20
_WRITE_OPTIONS: dict = dict(
    compression="zstd",
    compression_level=3,
    write_statistics=True,
    write_page_checksum=True,  # lets verify_warehouse(deep=True) find flipped bits
)
_DICTIONARY_COLUMNS = {
    "saes": True, "layer_metrics": True,
    "tokens": ["sae_id", "seq_id", "pos", "token_id", "token"],
    "latents": ["sae_id", "seq_id", "pos", "layer"],
    "latent_layer_sums": ["sae_id", "layer"],
    "latent_var_sums": ["sae_id"],
    "seq_sums": ["sae_id", "t"],
}
_COLUMN_ENCODING = {
    "latents": {"value": "BYTE_STREAM_SPLIT"},
    # sorted latent ids delta-encode well; float64 sums compress ~10% better split
    "latent_layer_sums": {"latent": "DELTA_BINARY_PACKED", "mass": "BYTE_STREAM_SPLIT"},
    "latent_var_sums": {"latent": "DELTA_BINARY_PACKED", "token_mv": "BYTE_STREAM_SPLIT",
                        "prompt_mv": "BYTE_STREAM_SPLIT"},
    "seq_sums": {"a_sum_t": "BYTE_STREAM_SPLIT", "b_sum_t": "BYTE_STREAM_SPLIT"},
}


class WarehouseError(ValueError):
    """Something in the warehouse directory is wrong; the message names the file and the fix."""


class ReadOnlyError(WarehouseError):
    """A statement given to the read-only SQL entry point would write or reach outside."""


def check_sae_id(sae_id: str) -> str:
    """sae_id is used in paths and SQL literals, so keep it to a safe alphabet."""
    if not isinstance(sae_id, str) or not SAE_ID_PATTERN.match(sae_id):
        raise ValueError(
            f"invalid sae_id {sae_id!r}: use 1-128 characters from letters, digits, '.', '_' "
            "and '-', starting with a letter or digit")
    return sae_id


def table_dir(warehouse_dir: str | os.PathLike, table: str) -> Path:
    if table not in TABLE_SPECS:
        raise ValueError(f"unknown table {table!r}: one of {TABLES}")
    return Path(warehouse_dir) / table


def partition_dir(warehouse_dir: str | os.PathLike, table: str, sae_id: str) -> Path:
    """<warehouse>/<table>/sae_id=<id>: the only directory that SAE's rows of `table` live in."""
    return table_dir(warehouse_dir, table) / f"sae_id={check_sae_id(sae_id)}"


def part_path(warehouse_dir: str | os.PathLike, table: str, sae_id: str, part: int) -> Path:
    return partition_dir(warehouse_dir, table, sae_id) / f"part-{part:05d}.parquet"


def table_glob(warehouse_dir: str | os.PathLike, table: str) -> str:
    return str(table_dir(warehouse_dir, table) / "*" / "*.parquet")


AUTOENCODERS_DIR = "autoencoders"


def activation_cache_dir(warehouse_dir: str | os.PathLike, key: str) -> Path:
    """Where the activation cache with this key (mlsae.extract.cache_key) lives."""
    return Path(warehouse_dir) / "activations" / key


def activation_caches(warehouse_dir: str | os.PathLike) -> list[Path]:
    """Every activation cache directory of the warehouse."""
    root = Path(warehouse_dir) / "activations"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def autoencoder_dirs(warehouse_dir: str | os.PathLike) -> list[Path]:
    """Every autoencoder (training run) directory of the warehouse."""
    root = Path(warehouse_dir) / "autoencoders"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def trash_dir(warehouse_dir: str | os.PathLike) -> Path:
    """Where directories go to be deleted: moved here first (one rename), so a kill
    mid-delete never leaves a half-deleted directory where a reader looks."""
    return Path(warehouse_dir) / ".tmp" / "trash"


def autoencoder_dir(warehouse_dir: str | os.PathLike, sae_id: str) -> Path:
    """<warehouse>/autoencoders/<id>: one autoencoder's training run (checkpoints) and its
    saved weights in sae/ (MLSAE.from_pretrained). Not <warehouse>/saes: that is the table."""
    return Path(warehouse_dir) / AUTOENCODERS_DIR / check_sae_id(sae_id)


# --------------------------------------------------------------------------- is it a warehouse?

WAREHOUSE_MARKER = ".mlsae-warehouse"
# What `mlsae run --out DIR` creates in DIR, first to last: the marker (init_warehouse),
# the task result cache, the activation cache, the trained autoencoders, the tables and
# setup.sql. A directory holding any of them is a warehouse (perhaps one whose first run
# was stopped before it logged anything: `mlsae sql` then sees empty tables).
_WAREHOUSE_ENTRIES = (WAREHOUSE_MARKER, "setup.sql", "logging", ".prefect/results",
                      "activations", "autoencoders")


def init_warehouse(warehouse_dir: str | os.PathLike) -> Path:
    """Create the warehouse directory (if needed) with its marker file, so that `mlsae sql`
    accepts it before any table is written. Returns the directory."""
    root = Path(warehouse_dir)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / WAREHOUSE_MARKER
    if not marker.exists():
        marker.write_text("mlsae warehouse: tables, views and caches written by `mlsae run` "
                          "(see docs/warehouse.md)\n")
    return root


def is_warehouse(warehouse_dir: str | os.PathLike) -> bool:
    """True if the directory was made by mlsae: its marker, setup.sql, a table directory
    or one of `mlsae run`'s caches is there."""
    root = Path(warehouse_dir)
    return root.is_dir() and any((root / name).exists()
                                 for name in (*_WAREHOUSE_ENTRIES, *TABLES))


def require_warehouse(warehouse_dir: str | os.PathLike) -> Path:
    """The resolved directory; WarehouseError (saying how to make or find one) unless it is
    an mlsae warehouse: a plain directory would otherwise answer every query with 0 rows."""
    root = Path(warehouse_dir).expanduser().resolve()
    if not root.is_dir():
        raise WarehouseError(f"warehouse {root} does not exist: pass --out DIR (or set "
                             "MLSAE_HOME) to a directory written by `mlsae run`, or make one "
                             f"with `mlsae run --out {warehouse_dir}`")
    if not is_warehouse(root):
        raise WarehouseError(
            f"{root} is not an mlsae warehouse (no saes/ or latents/ table, no setup.sql, no "
            f"{WAREHOUSE_MARKER}): make one with `mlsae run --out {warehouse_dir}`, or point "
            "--out (or $MLSAE_HOME) at a directory that `mlsae run` wrote")
    return root


# --------------------------------------------------------------------------- writing

def quantize_values(values: np.ndarray, mantissa_bits: int = 10,
                    threshold: float | None = 1e-3) -> np.ndarray:
    """Round float32 activations to `mantissa_bits` explicit mantissa bits (10 = float16
    precision, relative error <= 2**-11) while keeping float32's range.

    The dropped bits become zero bytes that BYTE_STREAM_SPLIT + zstd store almost for
    free (~2 instead of ~3.4 bytes per value). Rounding is monotone; values are then
    nudged so that `v > threshold` is unchanged for every value (L0 and dead-latent
    counts from the table equal the ones computed on the exact activations) and no
    positive value becomes zero. 23 keeps values exact.
    """
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"mantissa_bits must be in 0..23, got {mantissa_bits}")
    exact = np.ascontiguousarray(values, dtype=np.float32)
    if mantissa_bits == 23:
        return exact
    drop = 23 - mantissa_bits
    bits = exact.view(np.uint32)
    rounded = (((bits + np.uint32(1 << (drop - 1))) >> drop) << drop).view(np.float32)
    rounded = np.where(np.isfinite(exact), rounded, exact)  # never round into inf/nan
    rounded = np.where((rounded == 0) & (exact > 0), exact, rounded)
    if threshold is not None:
        thr = np.float32(threshold)
        thr_bits = np.array([thr], np.float32).view(np.uint32)[0]
        down = np.array([(thr_bits >> drop) << drop], np.uint32).view(np.float32)[0]
        up = np.array([((thr_bits >> drop) + 1) << drop], np.uint32).view(np.float32)[0]
        if down > thr:  # cannot happen for truncation, kept for clarity
            down = thr
        rounded = np.where((exact > thr) & (rounded <= thr), up, rounded)
        rounded = np.where((exact <= thr) & (rounded > thr), down, rounded)
    return rounded.astype(np.float32, copy=False)


TEMP_DIR = ".tmp"


def _temp_dir(directory: Path) -> Path:
    """Where files bound for `directory` are written before their rename: for a table's
    <warehouse>/<table>/sae_id=<id>/ that is <warehouse>/.tmp/<table>/sae_id=<id>/ (same
    file system, so os.replace stays atomic), which keeps table directories pure Parquet
    even while a file is being written (`pl.scan_parquet("<warehouse>/latents/")` refuses
    a directory holding other files); anywhere else, `directory` itself."""
    if directory.name.startswith("sae_id=") and directory.parent.name in TABLE_SPECS:
        return directory.parent.parent / TEMP_DIR / directory.parent.name / directory.name
    return directory


def _temp_path(path: Path) -> Path:
    # Dot-prefixed and not ending in .parquet: no glob of the warehouse ever sees it.
    directory = _temp_dir(path.parent)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def remove_stale_temp_files(directory: Path) -> int:
    """Delete leftovers of writers of files in `directory` that were killed mid-file (in
    its temp directory, and in `directory` itself where older versions wrote them).
    Returns how many."""
    removed = 0
    for place in {directory, _temp_dir(directory)}:
        if place.is_dir():
            for stale in place.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
                    removed += 1
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _writer_options(table: str) -> dict:
    return dict(_WRITE_OPTIONS, use_dictionary=_DICTIONARY_COLUMNS[table],
                column_encoding=_COLUMN_ENCODING.get(table))


class AtomicParquetWriter:
    """Stream row groups of one table into `path`: the file appears whole on close()
    (temp file + fsync + os.replace) or not at all (abort(), or an exception inside `with`)."""

    def __init__(self, path: str | os.PathLike, table: str):
        self.spec = TABLE_SPECS[table]
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = _temp_path(self.path)
        self.rows = 0
        self._writer = pq.ParquetWriter(self.temp, self.spec.schema, **_writer_options(table))

    def write(self, batch: pa.Table | pa.RecordBatch, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        if batch.schema != self.spec.schema:
            batch = batch.cast(self.spec.schema)
        self._writer.write(batch, row_group_size=row_group_rows)
        self.rows += batch.num_rows

    def close(self) -> Path:
        self._writer.close()
        with open(self.temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.temp, self.path)
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_table_atomic(table: str, data: pa.Table, path: str | os.PathLike,
                       row_group_rows: int = ROW_GROUP_ROWS) -> Path:
    """Write one whole file of `table` atomically."""
    with AtomicParquetWriter(path, table) as writer:
        writer.write(data, row_group_rows)
    return writer.path


def sae_id_column(sae_id: str, n: int) -> pa.Array:
    """A string column holding one sae_id n times (stored as a dictionary + one RLE run)."""
    return pa.repeat(pa.scalar(sae_id, pa.string()), n)


def latent_rows(sae_id: str, seq_id, pos, layer, latent, value) -> pa.Table:
    """Arrow table of latent rows in the warehouse schema (no sorting, no quantization).

    Every value must be positive and finite: the views count rows as activations
    (SPEC 5's C_j(l) = #{t : a > 0}) without filtering, so zeros are never stored."""
    value = np.asarray(value, np.float32)
    if value.size and not (np.isfinite(value).all() and value.min() > 0):
        raise ValueError("latent values must be positive and finite: drop zeros (inactive "
                         "latents) before writing, and check the SAE for NaN/inf")
    n = len(value)
    return pa.table({
        "sae_id": sae_id_column(sae_id, n),
        "seq_id": pa.array(np.asarray(seq_id, np.int32)),
        "pos": pa.array(_checked_int(pos, np.int16, "pos")),
        "layer": pa.array(_checked_int(layer, np.int16, "layer")),
        "latent": pa.array(np.asarray(latent, np.int32)),
        "value": pa.array(np.asarray(value, np.float32)),
    }, schema=TABLE_SPECS["latents"].schema)


def token_rows(sae_id: str, seq_id, pos, token_id, token: Iterable[str]) -> pa.Table:
    token = list(token)
    return pa.table({
        "sae_id": sae_id_column(sae_id, len(token)),
        "seq_id": pa.array(np.asarray(seq_id, np.int32)),
        "pos": pa.array(_checked_int(pos, np.int16, "pos")),
        "token_id": pa.array(np.asarray(token_id, np.int32)),
        "token": pa.array(token, pa.string()),
    }, schema=TABLE_SPECS["tokens"].schema)


def _checked_int(values, dtype, name: str) -> np.ndarray:
    values = np.asarray(values)
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ValueError(f"{name} out of range for {np.dtype(dtype).name} "
                         f"[{info.min}, {info.max}]: got {values.min()}..{values.max()}")
    return values.astype(dtype, copy=False)


# --------------------------------------------------------------------------- reading / checks

_FIX = ("move it out of the warehouse (or delete it); warehouse tables are written only by "
        "mlsae (see docs/warehouse.md)")
_validated: dict[tuple[str, int, int], None] = {}  # (path, size, mtime_ns) of files already checked


def _compatible(found: pa.Schema, expected: pa.Schema) -> str | None:
    """None if `found` (as read back from a file) matches `expected`, else what differs."""
    if found.names != expected.names:
        return f"columns {found.names}, expected {expected.names}"
    for field in expected:
        want, got = field.type, found.field(field.name).type
        if pa.types.is_dictionary(want):
            want = want.value_type
        if pa.types.is_dictionary(got):
            got = got.value_type
        if pa.types.is_large_string(got):
            got = pa.string()
        if got != want:
            return f"column {field.name!r} has type {got}, expected {want}"
    return None


def table_files(warehouse_dir: str | os.PathLike, table: str) -> list[Path]:
    """Every Parquet file under <warehouse>/<table>/, checked (see check_file)."""
    root = table_dir(warehouse_dir, table)
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))
    for path in files:
        check_file(path, table, root)
    return files


def check_file(path: Path, table: str, root: Path | None = None) -> None:
    """Raise WarehouseError naming `path` unless it is a readable Parquet file of `table`
    in its sae_id=<id> directory holding only that SAE's rows. Reads only the footer."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _validated:
        return
    spec = TABLE_SPECS[table]
    root = root or path.parent.parent
    if path.parent.parent != root or not path.parent.name.startswith("sae_id="):
        raise WarehouseError(f"{path}: unexpected file in the {table!r} table; files live at "
                             f"{root}/sae_id=<id>/*.parquet. Fix: {_FIX}")
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except Exception as e:  # pyarrow raises several types for damaged files
        raise WarehouseError(f"{path}: not a readable Parquet file ({e}). Fix: {_FIX}") from e
    problem = _compatible(schema, spec.schema)
    if problem:
        raise WarehouseError(f"{path}: not a {table!r} file: {problem}. Fix: {_FIX}")
    dir_sae_id = path.parent.name.removeprefix("sae_id=")
    col = schema.names.index("sae_id")
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(col).statistics
        if stats is not None and stats.has_min_max and (stats.min, stats.max) != (dir_sae_id, dir_sae_id):
            raise WarehouseError(
                f"{path}: holds sae_id {stats.min!r}..{stats.max!r} but sits in the directory "
                f"of sae_id {dir_sae_id!r}. Fix: {_FIX}")
    _validated[key] = None


def verify_warehouse(warehouse_dir: str | os.PathLike, deep: bool = False) -> dict[str, int]:
    """Check every table file (footer + schema); with deep=True also read every page and
    verify its checksum. Returns the row count per table; raises WarehouseError naming a bad file."""
    counts = {}
    for table in TABLES:
        rows = 0
        for path in table_files(warehouse_dir, table):
            if deep:
                try:
                    pq.ParquetFile(path, page_checksum_verification=True).read()
                except Exception as e:
                    raise WarehouseError(f"{path}: damaged Parquet data ({e}). Fix: {_FIX}") from e
            rows += pq.read_metadata(path).num_rows
        counts[table] = rows
    return counts


def dictionary_sae_id_files(warehouse_dir: str | os.PathLike,
                            sae_id: str | None = None) -> list[tuple[str, Path]]:
    """(table, file) of the files written before sae_id became a plain string column (it is
    an Arrow dictionary there, which Polars reads as Categorical). All SAEs, or one."""
    found = []
    for table in TABLES:
        for one in [sae_id] if sae_id else list(iter_partitions(warehouse_dir, table)):
            directory = partition_dir(warehouse_dir, table, one)
            for path in sorted(directory.glob("*.parquet")) if directory.is_dir() else ():
                if pa.types.is_dictionary(pq.read_schema(path).field("sae_id").type):
                    found.append((table, path))
    return found


def rewrite_dictionary_sae_ids(warehouse_dir: str | os.PathLike,
                               sae_id: str | None = None) -> int:
    """Rewrite (atomically, row group by row group, same encodings) the files that
    dictionary_sae_id_files lists, with sae_id as a plain string. Returns how many. Do
    not run it while that SAE is being logged: mlsae.latents.upgrade_warehouse takes the
    logging lock and also moves the logging files out of the table directories."""
    rewritten = 0
    for table, path in dictionary_sae_id_files(warehouse_dir, sae_id):
        check_file(path, table)
        source = pq.ParquetFile(path)
        with AtomicParquetWriter(path, table) as writer:
            for i in range(source.num_row_groups):
                writer.write(source.read_row_group(i))
        rewritten += 1
    return rewritten


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
            Path(warehouse_dir).resolve(), table)
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
    Tables with no files yet become empty typed views, so regenerate it after writing."""
    parts = ["-- mlsae warehouse: tables and views (generated from mlsae/warehouse.py and sql/)"]
    for table in TABLES:
        empty = not table_files(warehouse_dir, table)
        parts.append(table_view_sql(None if relative else warehouse_dir, table, empty=empty))
    parts += [f.text.strip() for f in sql_files()]
    return "\n\n".join(parts) + "\n"


def write_setup_script(warehouse_dir: str | os.PathLike) -> Path:
    """Write <warehouse>/setup.sql (relative paths) for `cd <warehouse> && duckdb -init setup.sql`."""
    path = Path(warehouse_dir) / "setup.sql"
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
    root = Path(warehouse_dir).resolve()
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


# --------------------------------------------------------------------------- read-only SQL

_WRITE_WORDS = {
    "INSERT": "writes", "UPDATE": "writes", "DELETE": "writes", "CREATE": "creates objects",
    "DROP": "drops objects", "ALTER": "alters objects", "COPY": "copies data to/from files",
    "EXPORT": "exports the database", "ATTACH": "attaches databases",
    "DETACH": "detaches databases", "LOAD": "loads extensions (INSTALL/LOAD)",
    "SET": "changes settings", "VARIABLE_SET": "changes settings", "PRAGMA": "runs pragmas",
    "CALL": "calls procedures", "TRANSACTION": "controls transactions",
    "UPDATE_EXTENSIONS": "updates extensions", "COPY_DATABASE": "copies databases",
    "VACUUM": "writes", "ANALYZE": "writes statistics", "PREPARE": "prepares statements",
    "EXECUTE": "executes prepared statements", "MULTI": "runs several statements",
}


def check_readonly_statement(con, query: str) -> str:
    """Return the single statement in `query` if it is a plain query (SELECT / WITH /
    VALUES / FROM / DESCRIBE / SHOW / SUMMARIZE); raise ReadOnlyError otherwise."""
    import duckdb

    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise ReadOnlyError(f"could not parse the query: {e}") from e
    if len(statements) != 1:
        raise ReadOnlyError(f"`mlsae sql` is read-only and runs exactly one statement (got "
                            f"{len(statements)}); send them one at a time")
    statement = statements[0]
    kind = statement.type.name
    if kind == "EXPLAIN":
        inner = re.sub(r"^\s*EXPLAIN\s+(ANALYZE\s+)?", "", statement.query, flags=re.I)
        check_readonly_statement(con, inner)
        return statement.query
    if kind != "SELECT":
        what = _WRITE_WORDS.get(kind, "is not a query")
        raise ReadOnlyError(
            f"`mlsae sql` is read-only: refused a {kind} statement ({what}). Only queries "
            "(SELECT/WITH/FROM/DESCRIBE/SHOW) over the warehouse tables and views are allowed; "
            "to write results use --format parquet --output FILE, or open the warehouse in "
            "Python with mlsae.warehouse.connect(dir, read_only=False)")
    return statement.query


def execute_readonly(con, query: str):
    """Run one checked, read-only statement on a (locked-down) connection; returns the cursor.
    File access outside the warehouse fails inside DuckDB with a PermissionException,
    which is re-raised as ReadOnlyError."""
    import duckdb

    statement = check_readonly_statement(con, query)
    try:
        return con.execute(statement)
    except duckdb.PermissionException as e:
        raise ReadOnlyError(f"`mlsae sql` is read-only and sees only the warehouse: {e}") from e


def arrow_readonly(con, query: str) -> pa.Table:
    """Like execute_readonly, but the whole result as an Arrow table."""
    import duckdb

    statement = check_readonly_statement(con, query)
    try:
        return con.sql(statement).to_arrow_table()
    except duckdb.PermissionException as e:
        raise ReadOnlyError(f"`mlsae sql` is read-only and sees only the warehouse: {e}") from e


class QueryResult(NamedTuple):
    columns: list[str]
    rows: list[tuple]


def run_readonly_sql(warehouse_dir: str | os.PathLike, query: str) -> QueryResult:
    """Run one read-only query over the warehouse; refuses anything that writes or reads
    outside it (ReadOnlyError)."""
    con = connect(warehouse_dir, read_only=True)
    try:
        cursor = execute_readonly(con, query)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return QueryResult(columns, cursor.fetchall())
    finally:
        con.close()


def iter_partitions(warehouse_dir: str | os.PathLike, table: str) -> Iterator[str]:
    """sae_ids that have a directory in `table`."""
    root = table_dir(warehouse_dir, table)
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name.startswith("sae_id="):
                yield d.name.removeprefix("sae_id=")
