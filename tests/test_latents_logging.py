"""Latent logging: resumable after an exception or a kill (no duplicate or missing
rows), a finished run is a no-op, settings are pinned, SAEs never share files, masked
tokens are excluded, files are sorted, and the layout stays small."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from mlsae import warehouse as wh
from mlsae.latents import (
    LatentLogConfig,
    SaeRecord,
    complete_part_sums,
    logging_dir,
    write_latents,
)
from tests.test_sql_views import random_activations, write_dense

REPO = Path(__file__).resolve().parent.parent
SHAPE = (7, 8, 3, 6)  # sequences, positions, layers, latents
CONFIG = LatentLogConfig(sequences_per_part=2, batch_size=1)


def table(root: Path, name: str, sae_id: str):
    files = sorted(wh.partition_dir(root, name, sae_id).glob("*.parquet"))
    return pq.ParquetDataset(files, partitioning=None).read().to_pandas() if files else None


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The same data logged in one uninterrupted run."""
    root = tmp_path_factory.mktemp("clean")
    a, mask = random_activations(5, *SHAPE)
    result = write_dense(root, "s", [0, 1, 2], a, mask, CONFIG)
    return root, a, mask, result


KEYS = {"latents": ["seq_id", "pos", "layer", "latent"], "tokens": ["seq_id", "pos"],
        "latent_layer_sums": None, "latent_var_sums": None, "seq_sums": ["seq_id"]}


def assert_same_tables(root: Path, clean_root: Path) -> None:
    for name, key in KEYS.items():
        got, want = table(root, name, "s"), table(clean_root, name, "s")
        assert len(got) == len(want)
        assert got.equals(want), name
        if key:
            assert not got.duplicated(key).any()
    parts = {name: sorted(p.name for p in wh.partition_dir(root, name, "s").glob("*.parquet"))
             for name in KEYS}
    assert len({tuple(names) for names in parts.values()}) == 1, parts  # one file per part each


def test_resume_after_exception(tmp_path, clean):
    clean_root, a, mask, _ = clean
    calls = []

    def fail_in_part_two(tokens_BT):
        calls.append(1)
        if len(calls) == 4:  # first sequence of part 2 (parts hold 2 sequences)
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG, encoder_hook=fail_in_part_two)
    parts = sorted(p.name for p in wh.partition_dir(tmp_path, "latents", "s").glob("*.parquet"))
    assert parts == ["part-00000.parquet"]  # part 1 never appeared half-written
    result = write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG)
    assert result.parts_written == 3 and result.n_parts == 4
    assert_same_tables(tmp_path, clean_root)


KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from tests.test_sql_views import random_activations, write_dense
from tests.test_latents_logging import CONFIG, SHAPE
a, mask = random_activations(5, *SHAPE)
calls = []
def die(tokens_BT):
    calls.append(1)
    if len(calls) == 6:
        os._exit(9)  # like SIGKILL: no cleanup, no exception handlers
write_dense({root!r}, "s", [0, 1, 2], a, mask, CONFIG, encoder_hook=die)
"""


def test_resume_after_kill(tmp_path, clean):
    clean_root, a, mask, _ = clean
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(repo=str(REPO),
                                                                    root=str(tmp_path))],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    latents_dir = wh.partition_dir(tmp_path, "latents", "s")
    temp_dir = tmp_path / wh.TEMP_DIR / "latents" / "sae_id=s"
    assert list(temp_dir.glob(".*.tmp"))  # the killed writer's temp file is left behind...
    wh.connect(tmp_path).close()  # ...and invisible to readers, outside the table directory
    assert all(p.suffix == ".parquet" for p in latents_dir.iterdir())
    pl.scan_parquet(latents_dir.parent).collect()
    result = write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG)
    assert result.parts_written == 2
    assert not list(temp_dir.glob(".*.tmp"))
    assert_same_tables(tmp_path, clean_root)


SUMS_KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
import mlsae.latents
from tests.test_sql_views import random_activations, write_dense
from tests.test_latents_logging import CONFIG, SHAPE
a, mask = random_activations(5, *SHAPE)
write_part_sums = mlsae.latents.write_part_sums
def die_after_one_file(root, sae_id, part, *args):
    if part == 1:  # part 1's tokens and latents are written; it dies inside its sums
        import mlsae.warehouse as wh
        real = wh.write_table_atomic
        def write_then_die(*a):
            real(*a)
            os._exit(9)
        wh.write_table_atomic = write_then_die
    return write_part_sums(root, sae_id, part, *args)
mlsae.latents.write_part_sums = die_after_one_file
write_dense({root!r}, "s", [0, 1, 2], a, mask, CONFIG)
"""


def test_resume_after_kill_between_latents_and_sums(tmp_path, clean):
    """Killed after a part's latents file and its first sums file: readers are told how to
    fix it, and the next run computes the missing sums from the part's files (the encoder
    never sees that part again)."""
    clean_root, a, mask, _ = clean
    proc = subprocess.run([sys.executable, "-c", SUMS_KILL_SCRIPT.format(repo=str(REPO),
                                                                         root=str(tmp_path))],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert wh.part_path(tmp_path, "latents", "s", 1).exists()
    assert wh.part_path(tmp_path, "latent_layer_sums", "s", 1).exists()
    missing = wh.part_path(tmp_path, "latent_var_sums", "s", 1)
    assert not missing.exists()
    with pytest.raises(wh.WarehouseError, match="complete_part_sums") as err:
        wh.connect(tmp_path)
    assert str(missing) in str(err.value)
    encoded = []
    result = write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG,
                         encoder_hook=lambda tokens_BT: encoded.append(int(tokens_BT[0, 0])))
    assert result.parts_written == 2 and sorted(encoded) == [1004, 1005, 1006]  # parts 2, 3
    assert_same_tables(tmp_path, clean_root)


def test_sums_are_added_to_a_warehouse_logged_without_them(tmp_path, clean):
    """An older warehouse (latents parts, no sums): rerunning the finished log, or
    complete_part_sums, computes them without the model; views then equal a fresh log."""
    clean_root, a, mask, _ = clean
    shutil.copytree(clean_root, tmp_path, dirs_exist_ok=True)
    for name in wh.PART_SUM_TABLES:
        shutil.rmtree(wh.table_dir(tmp_path, name))
    with pytest.raises(wh.WarehouseError, match="missing"):
        wh.connect(tmp_path)
    result = write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG,
                         encoder_hook=lambda _: pytest.fail("the encoder ran again"))
    assert result.parts_written == 0 and result.bytes_sums > 0
    assert_same_tables(tmp_path, clean_root)
    wh.part_path(tmp_path, "seq_sums", "s", 2).unlink()
    assert complete_part_sums(tmp_path) == 1
    assert complete_part_sums(tmp_path) == 0
    assert_same_tables(tmp_path, clean_root)
    query = "SELECT * FROM variance_summary"
    got, want = wh.run_readonly_sql(tmp_path, query), wh.run_readonly_sql(clean_root, query)
    # Equal up to DuckDB's summation order, which varies between runs (parallel aggregation).
    assert got.columns == want.columns and len(got.rows) == len(want.rows) == 1
    for g, w in zip(got.rows[0], want.rows[0], strict=True):
        assert g == (pytest.approx(w, rel=1e-12, abs=1e-15) if isinstance(w, float) else w)


def test_rerun_of_finished_run_is_a_noop(tmp_path):
    a, mask = random_activations(6, *SHAPE)
    write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    result = write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG)
    assert result.parts_written == 0 and result.n_rows == int((a > 0).sum())
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files


def test_other_settings_are_refused(tmp_path):
    a, mask = random_activations(6, *SHAPE)
    write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG)
    with pytest.raises(wh.WarehouseError, match="other settings.*sequences_per_part"):
        write_dense(tmp_path, "s", [0, 1, 2], a, mask, LatentLogConfig(sequences_per_part=3))


def test_saes_never_share_files_and_masked_tokens_are_excluded(tmp_path):
    a, mask = random_activations(7, *SHAPE)
    write_dense(tmp_path, "first", [0, 1, 2], a, mask, CONFIG)
    write_dense(tmp_path, "second", [3, 4, 5], a, mask, CONFIG)
    for sae_id, layers in (("first", [0, 1, 2]), ("second", [3, 4, 5])):
        latents, tokens = table(tmp_path, "latents", sae_id), table(tmp_path, "tokens", sae_id)
        assert set(latents["sae_id"]) == {sae_id} and set(tokens["sae_id"]) == {sae_id}
        assert sorted(set(latents["layer"])) == layers
        logged = set(zip(tokens["seq_id"], tokens["pos"], strict=True))
        assert logged == {tuple(x) for x in np.argwhere(mask)}
        assert set(zip(latents["seq_id"], latents["pos"], strict=True)) <= logged
        assert len(latents) == (a > 0).sum()
    assert wh.run_readonly_sql(tmp_path, "SELECT count(*) FROM saes").rows == [(2,)]


def test_files_are_sorted_and_parts_split_by_sequence(clean):
    root = clean[0]
    seen: set[int] = set()
    for path in sorted(wh.partition_dir(root, "latents", "s").glob("*.parquet")):
        df = pq.read_table(path).to_pandas()
        key = df[["seq_id", "pos", "layer", "latent"]].to_numpy()
        assert (np.diff(np.lexsort(key.T[::-1])) == 1).all()  # already in lexicographic order
        assert not seen & set(df["seq_id"])
        seen |= set(df["seq_id"])


def test_quantize_values_keeps_threshold_sign_and_precision():
    rng = np.random.default_rng(0)
    thr = np.float32(1e-3)
    near = np.nextafter(thr, np.float32([0, 1]).repeat(50)) * (1 + rng.normal(0, 1e-3, 100))
    values = np.concatenate([rng.lognormal(-2, 3, 100_000), near, [1e-40, 7e-39, 0.0]])
    values = values.astype(np.float32)
    q = wh.quantize_values(values)
    assert ((q > thr) == (values > thr)).all()
    assert ((q > 0) == (values > 0)).all()
    rel = np.abs(q - values) / np.where(values > 0, values, 1)
    normal = values > 1e-30
    assert rel[normal].max() <= 2.0**-10  # one step of 10 mantissa bits, at the threshold
    assert rel[normal][:100_000].max() <= 2.0**-11 * 1.0001  # half a step elsewhere
    assert (wh.quantize_values(values, 23) == values).all()
    assert (q.view(np.uint32)[values > 1e-30] & 0x1FFF == 0).mean() > 0.99  # 13 zero bits


def test_bytes_per_activation(tmp_path):
    """The measured layout (docs/warehouse.md) stays at <= 4 bytes per stored activation."""
    n_seq, seq_len, n_layers, k, n = 32, 64, 6, 32, 16384
    rng = np.random.default_rng(0)
    record = SaeRecord(sae_id="size", model="synthetic", d_model=256, n_latents=n,
                       expansion_factor=64, k=k, layers=list(range(n_layers)))

    def encode(tokens_BT, mask_BT):
        count = int(mask_BT.sum())
        pool = rng.integers(0, n, (count, 1, 48))
        pick = np.argsort(rng.random((count, n_layers, 48)), -1)[..., :k]
        idx = np.take_along_axis(np.broadcast_to(pool, (count, n_layers, 48)), pick, -1)
        return rng.lognormal(-0.5, 1, idx.shape).astype(np.float32), idx

    tokens = rng.integers(0, 8192, (n_seq, seq_len))
    result = write_latents(tmp_path, record, zip(tokens, np.ones_like(tokens, bool), strict=True),
                           encode,
                           str, {}, LatentLogConfig(batch_size=8), progress_log=lambda _: None)
    assert result.n_rows > 350_000
    assert result.bytes_latents / result.n_rows <= 4.0


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        LatentLogConfig(batch_size=0)
    with pytest.raises(ValueError, match="0..23"):
        LatentLogConfig(value_mantissa_bits=30)
    with pytest.raises(ValueError, match="sae_id"):
        SaeRecord(sae_id="../evil", model="m", d_model=1, n_latents=1, expansion_factor=1, k=1,
                  layers=[0])


def test_concurrent_logging_of_one_sae_is_refused(tmp_path):
    import fcntl

    directory = logging_dir(tmp_path, "s")
    directory.mkdir(parents=True)
    with open(directory / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        a, mask = random_activations(6, *SHAPE)
        with pytest.raises(wh.WarehouseError, match="another process"):
            write_dense(tmp_path, "s", [0, 1, 2], a, mask, CONFIG)
    assert os.listdir(directory) == [".lock"]
