"""Writing and checking Parquet files: atomic writers (temp file, fsync, rename), stale temp
files, schema checks of what a table directory holds, and dictionary sae_id repair."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mlsae.warehouse.errors import WarehouseError
from mlsae.warehouse.layout import TEMP_DIR, is_url, partition_dir, table_dir
from mlsae.warehouse.tables import (
    _COLUMN_ENCODING,
    _DICTIONARY_COLUMNS,
    _WRITE_OPTIONS,
    ROW_GROUP_ROWS,
    TABLE_SPECS,
    TABLES,
)


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
    key = (str(path if is_url(path) else path.resolve()), stat.st_size,
           getattr(stat, "st_mtime_ns", None) or getattr(stat, "st_mtime", None))
    if key in _validated:
        return
    spec = TABLE_SPECS[table]
    root = root or path.parent.parent
    if str(path.parent.parent) != str(root) or not path.parent.name.startswith("sae_id="):
        raise WarehouseError(f"{path}: unexpected file in the {table!r} table; files live at "
                             f"{root}/sae_id=<id>/*.parquet. Fix: {_FIX}")
    try:
        if is_url(path):
            with path.open("rb") as f:
                meta = pq.read_metadata(f)
        else:
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


def iter_partitions(warehouse_dir: str | os.PathLike, table: str) -> Iterator[str]:
    """sae_ids that have a directory in `table`."""
    root = table_dir(warehouse_dir, table)
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name.startswith("sae_id="):
                yield d.name.removeprefix("sae_id=")
