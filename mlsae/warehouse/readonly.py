"""The read-only guard behind `mlsae sql`: statements that would write or reach outside
the warehouse are refused before they run."""

from __future__ import annotations

import math
import os
import re
from typing import Any, NamedTuple

import pyarrow as pa

from mlsae.warehouse.duck import connect
from mlsae.warehouse.errors import ReadOnlyError

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


def json_value(value: Any) -> Any:
    """A query result's value as JSON: NaN/inf become null, lists and structs stay nested,
    dates become ISO text, Decimals floats, anything else its text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    try:
        return float(value)  # Decimal
    except (TypeError, ValueError):
        return str(value)
