"""A corrupt, foreign or misplaced Parquet file in the warehouse gives an error that
names it (DuckDB connection, Polars scans, deep verification)."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsae import analysis_polars as ap
from mlsae import warehouse as wh
from tests.test_sql_views import random_activations, write_dense


@pytest.fixture
def root(tmp_path):
    a, mask = random_activations(2, 4, 8, 3, 6)
    write_dense(tmp_path, "good", [0, 1, 2], a, mask)
    write_dense(tmp_path, "other", [0, 1, 2], a, mask)
    return tmp_path


def part(root, sae_id="good", table="latents"):
    return wh.partition_dir(root, table, sae_id) / "part-00000.parquet"


def assert_named(root, path, match):
    with pytest.raises(wh.WarehouseError, match=match) as err:
        wh.connect(root)
    assert str(path) in str(err.value)
    table = path.relative_to(root).parts[0]
    with pytest.raises(wh.WarehouseError) as err:
        ap.scan_table(root, table)
    assert str(path) in str(err.value)
    with pytest.raises(wh.WarehouseError) as err:
        wh.run_readonly_sql(root, "SELECT 1")
    assert str(path) in str(err.value)


def test_garbage_file(root):
    bad = wh.partition_dir(root, "latents", "good") / "part-00042.parquet"
    bad.write_bytes(b"this is not parquet" * 10)
    assert_named(root, bad, "not a readable Parquet file")


def test_truncated_file(root):
    path = part(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_named(root, path, "not a readable Parquet file")


def test_foreign_parquet(root):
    foreign = wh.partition_dir(root, "tokens", "good") / "part-00077.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), foreign)
    assert_named(root, foreign, "not a 'tokens' file: columns")


def test_wrong_column_type(root):
    path = part(root, table="layer_metrics")
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"sae_id": ["good"], "layer": ["zero"], "fvu": [0.1], "mse": [0.1],
                      "l0": [1.0], "dead_fraction": [0.0], "delta_ce": [0.1], "kl": [0.1]})
    pq.write_table(table, path)
    assert_named(root, path, "column 'layer' has type string")


def test_file_in_another_saes_directory(root):
    stray = wh.partition_dir(root, "latents", "other") / "part-00099.parquet"
    shutil.copy(part(root, "good"), stray)
    assert_named(root, stray, "holds sae_id 'good'.*directory of sae_id 'other'")


def test_file_outside_any_sae_directory(root):
    stray = wh.table_dir(root, "latents") / "loose.parquet"
    shutil.copy(part(root), stray)
    assert_named(root, stray, "unexpected file")


def test_damaged_page_found_by_deep_verify(root):
    path = part(root)
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle:middle + 16] = bytes(16)
    path.write_bytes(bytes(data))
    wh.connect(root).close()  # the footer is intact: the shallow check passes
    with pytest.raises(wh.WarehouseError, match="damaged") as err:
        wh.verify_warehouse(root, deep=True)
    assert str(path) in str(err.value)


def test_verify_counts_rows(root):
    counts = wh.verify_warehouse(root, deep=True)
    assert counts["saes"] == 2 and counts["latents"] > 0 and counts["layer_metrics"] == 0


def test_corrupt_sums_file(root):
    path = part(root, table="latent_var_sums")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_named(root, path, "not a readable Parquet file")


def test_missing_sums_file_names_it_and_the_fix(root):
    path = part(root, table="seq_sums")
    path.unlink()
    with pytest.raises(wh.WarehouseError, match="missing.*complete_part_sums") as err:
        wh.connect(root)
    assert str(path) in str(err.value)
    with pytest.raises(wh.WarehouseError, match="complete_part_sums"):
        ap.variance_summary(root)


def test_sums_file_without_its_latents_part(root):
    stray = wh.partition_dir(root, "latent_layer_sums", "good") / "part-00042.parquet"
    shutil.copy(part(root, table="latent_layer_sums"), stray)
    with pytest.raises(wh.WarehouseError, match="latents part that does not exist") as err:
        wh.connect(root)
    assert str(stray) in str(err.value)
