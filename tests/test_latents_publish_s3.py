"""Latent logging into a bucket publishes each part as soon as it is written: a worker
SIGKILLed in the middle of the step loses only the part in progress, and the step rerun on
another machine (another scratch directory) logs only the parts the bucket lacks, with no
duplicate or missing row. Real moto S3 server on loopback, real Parquet, real DuckDB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.s3_server import moto_s3
from tests.test_flows_support import same_values, table_rows

pytestmark = pytest.mark.timeout(300)

BUCKET = "mlsae-parts"
N_SEQ, SEQ_LEN, N_LAYERS, N_LATENTS = 8, 12, 3, 16
PER_PART = 2  # four parts
ROOT = Path(__file__).resolve().parents[1]


def log_synthetic(root, sae_id: str, on_part=None):
    """Log fixed random activations (tests/test_sql_views.py's generator) as `sae_id`."""
    import numpy as np

    from mlsae.latents import LatentLogConfig, SaeRecord, write_latents
    from tests.test_sql_views import random_activations

    a, mask = random_activations(0, N_SEQ, SEQ_LEN, N_LAYERS, N_LATENTS)
    record = SaeRecord(sae_id=sae_id, model="synthetic", d_model=4, n_latents=N_LATENTS,
                       expansion_factor=N_LATENTS // 4, k=N_LATENTS,
                       layers=list(range(N_LAYERS)))
    tokens = (np.arange(N_SEQ * SEQ_LEN).reshape(N_SEQ, SEQ_LEN) * 7 + 3) % 50
    tokens[:, 0] = 1000 + np.arange(N_SEQ)  # names the sequence (masked: never logged)

    def encode(tokens_BT, mask_BT):
        acts = a[tokens_BT[:, 0] - 1000][mask_BT].astype(np.float32)
        return acts, np.broadcast_to(np.arange(N_LATENTS), acts.shape)

    return write_latents(root, record, zip(tokens, mask, strict=True), encode,
                         lambda i: f" t{i}", {"test": sae_id},
                         LatentLogConfig(sequences_per_part=PER_PART, batch_size=1),
                         progress_log=lambda _: None, on_part=on_part)


KILLED_WORKER = textwrap.dedent("""
    import os, signal, sys
    from mlsae.warehouse.workspace import part_publisher, workspace
    from tests.test_latents_publish_s3 import log_synthetic
    url, sae_id, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    publish = part_publisher(url, [sae_id])

    def on_part(part):
        publish(part)
        if part + 1 == kill_after:  # the machine dies: no exit handler publishes anything
            os.kill(os.getpid(), signal.SIGKILL)

    with workspace(url, [sae_id]) as local:
        log_synthetic(local, sae_id, on_part)
""")


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with moto_s3(tmp_path_factory, BUCKET, scratch=False) as env:
        yield env


def visible(url: str, sae_id: str) -> list[str]:
    """The latents part files of `sae_id` that readers take: listed by an intact commit."""
    from mlsae.warehouse.remote import is_intact, open_store, read_commits

    store = open_store(url)
    listing = store.listing()
    return sorted(rel for commit in read_commits(store).values() if is_intact(commit, listing)
                  for rel in commit.files if rel.startswith(f"latents/sae_id={sae_id}/"))


def test_a_killed_worker_keeps_its_finished_parts_and_the_rerun_logs_only_the_rest(
        s3_env, tmp_path, monkeypatch):
    from mlsae.warehouse.remote import is_committed
    from mlsae.warehouse.workspace import part_publisher, workspace

    url, sae_id = f"s3://{BUCKET}/killed", "synthetic-parts"
    worker = subprocess.run(
        [sys.executable, "-c", KILLED_WORKER, url, sae_id, "2"], cwd=ROOT,
        env={**os.environ, "MLSAE_SCRATCH": str(tmp_path / "machine-a")},
        capture_output=True, text=True, timeout=240)
    assert worker.returncode == -signal.SIGKILL, worker.stderr[-3000:]
    parts = [f"latents/sae_id={sae_id}/part-{i:05d}.parquet" for i in range(4)]
    assert visible(url, sae_id) == parts[:2]
    assert [is_committed(url, part) for part in parts] == [True, True, False, False]

    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "machine-b"))
    with workspace(url, [sae_id]) as local:
        result = log_synthetic(local, sae_id, part_publisher(url, [sae_id]))
    assert (result.n_parts, result.parts_written) == (4, 2)  # parts 0 and 1 came from a
    assert visible(url, sae_id) == parts

    log_synthetic(tmp_path / "local", sae_id)  # the same step, never interrupted
    for table in ("latents", "tokens", "latent_layer_sums"):
        query = f"SELECT * FROM {table} ORDER BY ALL"
        got, want = table_rows(url, query), table_rows(tmp_path / "local", query)
        assert got == want and len(got) > 0, table
    (n, distinct), = table_rows(url, "SELECT count(*), count(DISTINCT (seq_id, pos, layer, latent)) "
                                "FROM latents")
    assert n == distinct


def test_a_local_warehouse_needs_no_publisher(tmp_path):
    from mlsae.warehouse.workspace import part_publisher

    assert part_publisher(tmp_path, ["x"]) is None


def test_the_plain_duckdb_setup_script_reads_only_committed_files(s3_env, tmp_path,
                                                                  monkeypatch):
    """`mlsae sql --out s3://... --setup`: every table a view over its committed objects'
    URLs (not a glob: an uncommitted upload is left out), after the httpfs/aws setup for
    the endpoint in AWS_ENDPOINT_URL. httpfs cannot be downloaded here, so the script is
    run with the bucket's URLs pointed at the mirror holding the same committed files."""
    import duckdb
    import s3fs

    from mlsae.warehouse import setup_sql
    from mlsae.warehouse.mirror import local_mirror
    from mlsae.warehouse.workspace import part_publisher, workspace

    url, sae_id = f"s3://{BUCKET}/plain", "synthetic-plain"
    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "scratch"))
    with workspace(url, [sae_id]) as local:
        log_synthetic(local, sae_id, part_publisher(url, [sae_id]))
    debris = f"latents/sae_id={sae_id}/part-00009.parquet"  # an upload killed before its commit
    s3fs.S3FileSystem().pipe_file(f"{BUCKET}/plain/{debris}", b"not parquet")

    script = setup_sql(url)
    endpoint = s3_env["AWS_ENDPOINT_URL"].removeprefix("http://")
    assert f"ENDPOINT '{endpoint}'" in script and "USE_SSL false" in script
    assert "PROVIDER credential_chain" in script and "URL_STYLE 'path'" in script
    assert debris not in script and f"{url}/latents/*" not in script
    assert f"'{url}/latents/sae_id={sae_id}/part-00003.parquet'" in script

    views = script.split("LOAD aws;", 1)[1].split(";", 1)[1]  # after the secret
    mirror = local_mirror(url).resolve()  # the same committed files, on this machine
    con = duckdb.connect()
    con.execute(views.replace(f"'{url}/", f"'{mirror}/"))
    for query in ("SELECT count(*) FROM latents", "SELECT * FROM latent_stats ORDER BY ALL"):
        got, want = con.execute(query).fetchall(), table_rows(url, query)
        # the same files; DuckDB's parallel sums may differ in the last bit
        assert got and same_values(got, want), query
