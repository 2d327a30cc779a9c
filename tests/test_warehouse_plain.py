"""The warehouse read without mlsae: plain Polars and plain duckdb over each table
directory, and the latents-tokens-saes join exactly as docs/warehouse.md shows it (the
code blocks are taken from the doc and run). sae_id has one type in every table; a
warehouse in the old layout (dictionary sae_id, _log.json and .lock in latents/) is
still read by mlsae, and upgrade_warehouse brings it to the current one."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from mlsae import analysis_polars as ap
from mlsae import warehouse as wh
from mlsae.latents import LatentLogConfig, logging_dir, upgrade_warehouse, write_layer_metrics
from tests.test_sql_views import random_activations, write_dense

DOC = Path(__file__).resolve().parent.parent / "docs" / "warehouse.md"
CONFIG = LatentLogConfig(sequences_per_part=2, batch_size=1)


def _build(root: Path) -> None:
    a, mask = random_activations(11, 5, 6, 2, 5)
    write_dense(root, "alpha", [0, 1], a, mask, CONFIG)
    b, mask_b = random_activations(12, 3, 6, 3, 4)
    write_dense(root, "beta", [1, 2, 3], b, mask_b, CONFIG)
    for sae_id, layers in (("alpha", [0, 1]), ("beta", [1, 2, 3])):
        write_layer_metrics(root, sae_id, [{"layer": x, "fvu": 0.1, "l0": 2.0} for x in layers])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain") / "mlsae-data"
    _build(root)
    return root


@pytest.fixture
def in_parent(built, monkeypatch):
    """The current directory holds the warehouse as mlsae-data/, as in the doc."""
    monkeypatch.chdir(built.parent)
    return built


def _doc_block(language: str, must_contain: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [b for b in blocks if must_contain in b]
    assert len(found) == 1, f"docs/warehouse.md: no single ```{language} block with {must_contain!r}"
    return found[0]


def _expected_top(root: Path) -> list[tuple]:
    con = wh.connect(root)
    try:
        return con.execute(
            "SELECT l.sae_id, s.model, s.k, l.layer, l.latent, l.value, t.token FROM latents l "
            "JOIN tokens t USING (sae_id, seq_id, pos) JOIN saes s USING (sae_id) "
            "ORDER BY l.value DESC, l.sae_id, l.seq_id, l.pos, l.layer, l.latent LIMIT 10"
        ).fetchall()
    finally:
        con.close()


def test_table_directories_hold_only_parquet(built):
    for table in wh.TABLES:
        files = [p for p in (built / table).rglob("*") if p.is_file()]
        assert files and all(p.suffix == ".parquet" for p in files), (table, files)


@pytest.mark.parametrize("table", wh.TABLES)
def test_plain_polars_scans_each_table_directory(in_parent, table):
    frame = pl.scan_parquet(f"mlsae-data/{table}/").collect()
    assert frame.schema["sae_id"] == pl.String
    assert sorted(frame["sae_id"].unique()) == ["alpha", "beta"]
    expected = wh.run_readonly_sql(in_parent, f"SELECT count(*) FROM {table}").rows[0][0]
    assert frame.height == expected > 0
    # plain duckdb over the same directory: one type, the same rows
    rows = duckdb.sql(f"SELECT typeof(sae_id), count(*) FROM "
                      f"read_parquet('mlsae-data/{table}/**/*.parquet') GROUP BY ALL").fetchall()
    assert rows == [("VARCHAR", expected)]


def test_plain_polars_join_as_the_doc_shows(in_parent):
    namespace: dict = {}
    exec(_doc_block("python", 'pl.scan_parquet("mlsae-data/latents/")'), namespace)
    top = namespace["top"]
    expected = _expected_top(in_parent)
    assert top.height == 10
    assert sorted(top.rows()) == sorted(expected)  # ties in value may come in any order


def test_plain_duckdb_join_as_the_doc_shows(in_parent):
    got = duckdb.sql(_doc_block("sql", "read_parquet('mlsae-data/latents/**/*.parquet')"))
    assert sorted(got.fetchall()) == sorted(_expected_top(in_parent))


def test_pyarrow_reads_a_table_directory_without_partition_discovery(in_parent):
    table = pq.read_table("mlsae-data/latents", partitioning=None)
    assert table.schema.field("sae_id").type == pa.string()


# --------------------------------------------------------------------------- old layout

def _make_old_layout(root: Path) -> None:
    """What an older mlsae wrote: sae_id as an Arrow dictionary in latents, tokens and the
    sums tables, the manifest and lock inside latents/sae_id=<id>/."""
    old_type = pa.dictionary(pa.int32(), pa.string())
    for table in ("tokens", "latents", *wh.PART_SUM_TABLES):
        for path in sorted((root / table).rglob("*.parquet")):
            data = pq.read_table(path)
            data = data.set_column(0, pa.field("sae_id", old_type),
                                   data["sae_id"].cast(old_type))
            pq.write_table(data, path, compression="zstd")
    for sae_id in ("alpha", "beta"):
        new = logging_dir(root, sae_id)
        old = wh.partition_dir(root, "latents", sae_id)
        (new / "_log.json").rename(old / "_log.json")
        (new / ".lock").rename(old / ".lock")
        shutil.rmtree(new)
    shutil.rmtree(root / "logging")


def _summary(root: Path) -> pl.DataFrame:
    """variance_summary in a fixed row order (Polars' group order and summation order over
    parts vary from run to run: compare to 1e-9, not bit for bit)."""
    return ap.variance_summary(root).collect().sort("sae_id")


def test_old_layout_is_read_by_mlsae_and_upgraded_in_place(built, tmp_path):
    root = tmp_path / "mlsae-data"
    shutil.copytree(built, root)
    _make_old_layout(root)
    expected = _expected_top(built)
    # the failures the upgrade is for (issue 16): _log.json in the table directory, and
    # Categorical latents.sae_id against String saes.sae_id
    with pytest.raises(Exception, match="different file extensions"):
        pl.scan_parquet(root / "latents").collect()
    with pytest.raises(Exception, match="(?i)categorical|datatypes of join keys"):
        pl.scan_parquet(f"{root}/latents/**/*.parquet").join(
            pl.scan_parquet(root / "saes"), on="sae_id").collect()
    # mlsae reads the old layout as it is, and a mix of old and new files
    assert _expected_top(root) == expected
    assert ap.scan_table(root, "latents").collect_schema()["sae_id"] == pl.String
    summary = _summary(root)
    new_file = root / "latents" / "sae_id=alpha" / "part-00000.parquet"
    data = pq.read_table(new_file)
    pq.write_table(data.set_column(0, "sae_id", data["sae_id"].cast(pa.string())), new_file)
    assert ap.latent_stats(root).collect().height > 0
    assert_frame_equal(_summary(root), summary, check_exact=False, rel_tol=1e-9)

    counts = upgrade_warehouse(root)
    assert counts["moved"] == 4 and counts["rewritten"] > 0
    assert (logging_dir(root, "alpha") / "_log.json").exists()
    assert upgrade_warehouse(root) == {"moved": 0, "rewritten": 0}  # idempotent
    assert not wh.dictionary_sae_id_files(root)
    for table in wh.TABLES:
        files = [p for p in (root / table).rglob("*") if p.is_file()]
        assert all(p.suffix == ".parquet" for p in files), files
        assert pl.scan_parquet(root / table).collect_schema()["sae_id"] == pl.String
    assert _expected_top(root) == expected
    assert_frame_equal(_summary(root), summary, check_exact=False, rel_tol=1e-9)
    # the upgraded warehouse still resumes: a rerun of a finished log touches nothing
    a, mask = random_activations(11, 5, 6, 2, 5)
    assert write_dense(root, "alpha", [0, 1], a, mask, CONFIG).parts_written == 0
