"""A warehouse copied to object storage is read by `mlsae sql` with the same sandbox:
a real S3-compatible server (moto's, on a free loopback port) over HTTP, s3fs as the
client, the explorer tests' warehouse (pipeline steps on the embedded model) uploaded
as `aws s3 sync` would (no commit objects: every file is taken). Writing a warehouse to
the bucket: tests/test_warehouse_s3_write.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.s3_server import moto_s3
from tests.serve_warehouse import build_serve_warehouse

MLSAE = str(Path(sys.executable).with_name("mlsae"))
BUCKET, OTHER = "mlsae-test", "mlsae-other"
QUERIES = (
    "SELECT * FROM variance_summary ORDER BY sae_id",
    "SELECT * FROM latent_stats ORDER BY sae_id, latent",
    "SELECT layer, count(*) AS n, sum(value) AS mass FROM latents GROUP BY ALL ORDER BY ALL",
    "SELECT * FROM layer_metrics ORDER BY sae_id, layer",
)


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with moto_s3(tmp_path_factory, scratch=False) as env:
        yield env


@pytest.fixture(scope="module")
def uploaded(s3_env, tmp_path_factory):
    import s3fs

    local = build_serve_warehouse(tmp_path_factory)
    fs = s3fs.S3FileSystem()
    for bucket in (BUCKET, OTHER):
        fs.mkdir(bucket)
    fs.put(str(local) + "/", f"{BUCKET}/wh/", recursive=True)
    # the same tables under another prefix and in another bucket: outside the sandbox
    fs.put(str(local / "latents") + "/", f"{BUCKET}/elsewhere/latents/", recursive=True)
    fs.put(str(local / "latents") + "/", f"{OTHER}/latents/", recursive=True)
    return local


def _sql(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([MLSAE, "sql", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_views_over_the_bucket_equal_the_local_warehouse(uploaded, s3_env):
    for query in QUERIES:
        local = _sql("--out", str(uploaded), "--format", "json", query, env={})
        remote = _sql("--out", f"s3://{BUCKET}/wh", "--format", "json", query, env=s3_env)
        assert local.returncode == 0 and remote.returncode == 0, remote.stderr[-2000:]
        rows_local, rows_remote = json.loads(local.stdout), json.loads(remote.stdout)
        assert rows_local and len(rows_remote) == len(rows_local), query
        for a, b in zip(rows_local, rows_remote, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-12), (query, key)
                else:
                    assert b[key] == a[key], (query, key)
    # $MLSAE_HOME may name the bucket too
    home = _sql("SELECT count(*) AS n FROM saes", "--format", "json",
                env={**s3_env, "MLSAE_HOME": f"s3://{BUCKET}/wh"})
    assert home.returncode == 0 and json.loads(home.stdout)[0]["n"] >= 1, home.stderr


def test_polars_over_the_bucket_equals_the_local_warehouse(uploaded, s3_env):
    from polars.testing import assert_frame_equal

    from mlsae import analysis_polars as ap

    for view, keys in ((ap.variance_summary, ["sae_id"]), (ap.latent_stats, ["sae_id", "latent"])):
        local = view(uploaded).collect().sort(keys)
        remote = view(f"s3://{BUCKET}/wh").collect().sort(keys)
        assert local.height > 0
        assert_frame_equal(remote, local, check_exact=False, rel_tol=1e-12, abs_tol=1e-12)


def test_the_local_mirror_follows_the_bucket(uploaded, s3_env):
    """Queries run on a local mirror of the tables; a file changed or removed in the
    bucket is changed or removed in the mirror at the next query."""
    import s3fs

    from tests.serve_warehouse import LENS_SAE_ID

    fs = s3fs.S3FileSystem()
    fs.put(str(uploaded) + "/", f"{BUCKET}/wh2/", recursive=True)
    count = "SELECT count(*) AS n FROM saes"
    first = _sql("--out", f"s3://{BUCKET}/wh2", "--format", "json", count, env=s3_env)
    assert json.loads(first.stdout)[0]["n"] == 2, first.stderr
    fs.rm(f"{BUCKET}/wh2/saes/sae_id={LENS_SAE_ID}", recursive=True)
    again = _sql("--out", f"s3://{BUCKET}/wh2", "--format", "json", count, env=s3_env)
    assert json.loads(again.stdout)[0]["n"] == 1, again.stderr
    from mlsae.warehouse.mirror import mirror_dir

    mirror = mirror_dir(f"s3://{BUCKET}/wh2")
    assert mirror.is_dir() and not (mirror / "saes" / f"sae_id={LENS_SAE_ID}").exists()
    assert not (mirror / "autoencoders").exists()  # only what queries read is copied


@pytest.mark.parametrize("target", [
    f"s3://{OTHER}/latents/*/*.parquet",
    f"s3://{BUCKET}/elsewhere/latents/*/*.parquet",
    "/etc/hostname",
])
def test_the_sandbox_holds_on_the_bucket(uploaded, s3_env, target):
    result = _sql("--out", f"s3://{BUCKET}/wh", f"SELECT count(*) FROM read_parquet('{target}')",
                  env=s3_env)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and "Error" in result.stderr, result.stderr


def test_a_bucket_prefix_that_is_not_a_warehouse_is_refused(uploaded, s3_env):
    result = _sql("--out", f"s3://{BUCKET}/nothing-here", "SELECT 1", env=s3_env)
    assert result.returncode != 0 and "does not exist" in result.stderr, result.stderr


def test_a_dry_run_into_the_bucket_writes_nothing(s3_env, tmp_path):
    """`mlsae run --out s3://...` is accepted (tests/test_warehouse_s3_write.py runs it); its
    dry run plans against the local working copy and writes neither there nor in the bucket."""
    import s3fs

    scratch = tmp_path / "scratch"
    result = subprocess.run([MLSAE, "run", "--out", f"s3://{BUCKET}/dry", "--dry-run",
                             "--scratch", str(scratch), "-R", "2", "-k", "4", "--layers", "1,3",
                             "--no-baselines", "--train-tokens", "2048", "--eval-tokens", "512"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **s3_env})
    assert result.returncode == 0, result.stderr[-2000:]
    assert not scratch.exists() and not (tmp_path / "s3:").exists()
    assert not s3fs.S3FileSystem().exists(f"{BUCKET}/dry")
