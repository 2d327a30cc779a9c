"""`mlsae sql` / run_readonly_sql is read-only: writes, ATTACH, INSTALL/LOAD, settings and
files outside the warehouse are refused with a clear message; queries work."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from flows.cli import main
from mlsae import warehouse as wh
from tests.test_sql_views import random_activations, write_dense


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wh")
    a, mask = random_activations(3, 3, 6, 2, 5)
    write_dense(root, "guarded", [0, 1], a, mask)
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory, root):
    """A readable Parquet file and a directory outside the warehouse."""
    d = tmp_path_factory.mktemp("outside")
    pq.write_table(pq.read_table(next(root.glob("saes/*/saes.parquet"))), d / "x.parquet")
    return d


REFUSED = [
    "INSERT INTO saes SELECT * FROM saes",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "DROP VIEW latent_stats",
    "COPY (SELECT 1) TO '{root}/leak.csv'",
    "COPY latents TO '{outside}/leak.parquet'",
    "EXPORT DATABASE '{outside}/db'",
    "ATTACH '{outside}/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA disable_profiling",
    "CALL pragma_version()",
    "SELECT 1; SELECT 2",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/leak.csv'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('{outside}/x.parquet')",
    "SELECT * FROM '{outside}/x.parquet'",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_text('/etc/hostname')",
]


@pytest.mark.parametrize("query", REFUSED)
def test_refused(root, outside, query):
    with pytest.raises(wh.ReadOnlyError, match="read-only"):
        wh.run_readonly_sql(root, query.format(root=root, outside=outside))
    assert not list(root.rglob("leak*")) and not list(outside.glob("leak*"))


@pytest.mark.parametrize("query", [
    "SELECT count(*) FROM latents",
    "WITH x AS (SELECT * FROM latent_stats) SELECT count(*) FROM x",
    "FROM variance_summary",
    "DESCRIBE latents",
    "SHOW TABLES",
    "EXPLAIN SELECT * FROM latent_layers",
    "SELECT count(*) FROM read_parquet('{root}/latents/*/*.parquet')",
])
def test_allowed(root, query):
    result = wh.run_readonly_sql(root, query.format(root=root))
    assert result.columns and result.rows


def test_connection_is_locked(root):
    con = wh.connect(root)
    with pytest.raises(Exception, match="locked"):
        con.execute("SET enable_external_access = true")
    assert wh.connect(root, read_only=False).execute("SELECT 42").fetchone() == (42,)


def test_cli_csv_is_header_then_rows(root):
    result = CliRunner().invoke(main, ["sql", "--out", str(root), "--format", "csv",
                                       "SELECT latent, layer, count FROM latent_layers "
                                       "ORDER BY latent, layer"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["latent", "layer", "count"]
    expected = wh.run_readonly_sql(root, "SELECT latent, layer, count FROM latent_layers "
                                         "ORDER BY latent, layer").rows
    assert [tuple(map(int, r)) for r in rows[1:]] == expected


def test_cli_json_table_parquet(root, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["sql", "--out", str(root), "--format", "json",
                                  "SELECT sae_id, layers, ratio_token FROM saes "
                                  "JOIN variance_summary USING (sae_id)"])
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.stdout)
    assert record["sae_id"] == "guarded" and record["layers"] == [0, 1]
    assert np.isfinite(record["ratio_token"])
    result = runner.invoke(main, ["sql", "--out", str(root), "SELECT * FROM layer_stats"])
    assert result.exit_code == 0 and "l0" in result.stdout.splitlines()[0]
    out = tmp_path / "stats.parquet"
    result = runner.invoke(main, ["sql", "--out", str(root), "--format", "parquet",
                                  "--output", str(out), "SELECT * FROM latent_stats"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == wh.run_readonly_sql(
        root, "SELECT count(*) FROM latent_stats").rows[0][0]


def test_cli_refusal_is_a_clear_error(root):
    result = CliRunner().invoke(main, ["sql", "--out", str(root), "DELETE FROM latents"])
    assert result.exit_code != 0
    assert "read-only" in result.output and "DELETE" in result.output
    result = CliRunner().invoke(main, ["sql", "--out", str(root / "missing"), "SELECT 1"])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_cli_setup_script_runs_in_plain_duckdb(root):
    import duckdb

    result = CliRunner().invoke(main, ["sql", "--out", str(root), "--setup"])
    assert result.exit_code == 0
    con = duckdb.connect()
    con.execute(result.stdout)
    assert con.execute("SELECT n_live FROM variance_summary").fetchone()[0] > 0


def test_setup_sql_in_the_warehouse_uses_relative_paths(root, tmp_path, monkeypatch):
    import shutil

    import duckdb

    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # a warehouse copied elsewhere still works
    monkeypatch.chdir(moved)
    con = duckdb.connect()
    con.execute((moved / "setup.sql").read_text())
    assert con.execute("SELECT count(*) FROM latent_stats").fetchone()[0] > 0


def test_lease_seconds_takes_an_explicit_value_and_refuses_zero(monkeypatch):
    from mlsae.warehouse.lease import DEFAULT_LEASE_SECONDS, LEASE_SECONDS_ENV, lease_seconds

    monkeypatch.delenv(LEASE_SECONDS_ENV, raising=False)
    assert lease_seconds() == DEFAULT_LEASE_SECONDS
    monkeypatch.setenv(LEASE_SECONDS_ENV, "7.5")
    assert lease_seconds() == 7.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(LEASE_SECONDS_ENV, bad)
        with pytest.raises(ValueError, match="positive number"):
            lease_seconds()
