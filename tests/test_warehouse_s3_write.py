"""Writing a warehouse to object storage: `mlsae run --out s3://...` against a real
S3-compatible server (moto's, on a free loopback port; s3fs over HTTP, no patched client)
and a real temporary Prefect server.

- the pipeline into the bucket equals the same run into a local directory (every table
  and view, to 1e-12), and a second worker (another scratch directory) finds every step
  but the worker-local extraction in the shared cache;
- a run SIGKILLed while it uploads a part leaves nothing visible, and its rerun leaves no
  debris and no duplicate or missing rows;
- two processes writing the same autoencoder at once: one writes, the other waits on the
  lease and reuses its outputs;
- training stopped on one worker resumes from the checkpoint it published on another;
- two `mlsae sweep` worker processes (own scratch, one Prefect server) writing one grid
  into one bucket at once: each autoencoder once, the tables equal the local run's, and a
  rerun on one of them finds every step in the bucket's task cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.s3_server import moto_s3
from tests.test_flows_support import assert_same_warehouse, request, table_rows

pytestmark = pytest.mark.timeout(300)

MLSAE = str(Path(sys.executable).with_name("mlsae"))
BUCKET = "mlsae-write"
# The demo preset at a tiny budget: one MLSAE on two blocks, no baselines, no lens.
FIELDS = dict(model="embedded", data="embedded", layers=[1, 3], baselines=False, lens="off")
CLI_ARGS = ["-R", "2", "-k", "4", "--train-tokens", "2048", "--eval-tokens", "512",
            "--seq-len", "64", "--layers", "1,3", "--no-baselines", "--lens", "off"]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with moto_s3(tmp_path_factory, BUCKET) as env:
        yield env


@pytest.fixture(scope="module")
def local_run(prefect_api, tmp_path_factory):
    from flows.pipeline import pipeline

    out = tmp_path_factory.mktemp("local-warehouse")
    pipeline(**request(**FIELDS), out=str(out))
    return out


def _fs():
    import s3fs

    return s3fs.S3FileSystem()


def _sae_objects(url: str, sae_id: str) -> dict[str, dict]:
    from mlsae.warehouse.layout import sae_prefixes
    from mlsae.warehouse.remote import open_store

    store = open_store(url)
    return {rel: info for prefix in sae_prefixes(sae_id)
            for rel, info in store.listing(prefix).items()}


def _uncommitted(url: str) -> list[str]:
    """Objects of the warehouse that no commit lists (debris), besides the commits, leases
    and Prefect's results."""
    from mlsae.warehouse.remote import open_store, read_commits

    store = open_store(url)
    listed = {rel for c in read_commits(store).values() for rel in c.files}
    return sorted(rel for rel in store.listing()
                  if rel not in listed and not rel.startswith((".commits/", ".leases/",
                                                               ".prefect/")))


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def test_pipeline_into_the_bucket_equals_a_local_run(local_run, s3_env, tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    url = f"s3://{BUCKET}/e2e"
    result = pipeline(**request(**FIELDS), out=url)
    assert result["out"] == url
    assert all(path.startswith(url + "/") for path in result["figures"]), result["figures"]
    assert_same_warehouse(local_run, url)
    assert _uncommitted(url) == []
    (sae_id,) = result["mlsae_ids"]
    assert (f"autoencoders/{sae_id}/sae/model.safetensors" in _sae_objects(url, sae_id))

    # A second worker (its own scratch directory) skips every step the first finished:
    # the cache lives in the bucket and its keys do not name a scratch path. Only the
    # extraction runs again, its activation cache being local to each worker.
    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "other-worker"))
    state = pipeline(**request(**FIELDS), out=url, return_state=True)
    states = _task_states(state.state_details.flow_run_id)
    assert states.pop("extract-activations") == "Completed"
    states.pop("validate-parameters")
    assert set(states.values()) == {"Cached"}, states
    assert_same_warehouse(local_run, url)


PUBLISH_SCRIPT = textwrap.dedent("""
    import sys
    from mlsae.warehouse.remote import publish
    publish(sys.argv[1], [sys.argv[2]])
""")


def test_a_kill_mid_upload_leaves_nothing_visible_and_the_rerun_no_debris(
        local_run, s3_env, tmp_path, monkeypatch):
    """A worker's working copy holding a finished run (the local run's files) is published
    by a process SIGKILLed while it uploads the logged part; a rerun publishes the rest."""
    import shutil

    from mlsae.warehouse import scratch_dir
    from mlsae.warehouse.workspace import workspace

    url = f"s3://{BUCKET}/killed"
    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "scratch"))
    shutil.copytree(local_run, scratch_dir(url), ignore=shutil.ignore_patterns(".prefect"))
    (sae_id,) = [p.name.removeprefix("sae_id=") for p in (local_run / "latents").iterdir()]
    fs, prefix = _fs(), f"{BUCKET}/killed"
    slow = subprocess.Popen([sys.executable, "-c", PUBLISH_SCRIPT, url, sae_id],
                            env={**os.environ, "MLSAE_PUBLISH_DELAY_S": "0.5"},
                            stderr=subprocess.PIPE, start_new_session=True)
    # the part's five files go up in name order, each followed by the delay: kill when
    # the first is in the bucket (its commit comes after the fifth)
    first = f"{prefix}/latent_layer_sums/sae_id={sae_id}/part-00000.parquet"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and slow.poll() is None:
        fs.invalidate_cache()
        if fs.exists(first):
            break
        time.sleep(0.05)
    assert slow.poll() is None, slow.stderr.read().decode()[-3000:]
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait()
    fs.invalidate_cache()
    assert not fs.exists(f"{prefix}/.commits/parts/sae_id={sae_id}/part-00000.json")
    assert f"latent_layer_sums/sae_id={sae_id}/part-00000.parquet" in _uncommitted(url)
    # readers see no row of the uncommitted part (and no part without its sums)
    assert table_rows(url, "SELECT count(*) FROM latents") == [(0,)]
    assert table_rows(url, "SELECT count(*) FROM latent_layer_sums") == [(0,)]

    # the rerun publishes what is missing, over the same keys, and deletes the debris
    with workspace(url, [sae_id]):
        pass
    assert _uncommitted(url) == []
    assert_same_warehouse(local_run, url)


LEASE_SCRIPT = textwrap.dedent("""
    import sys, time
    from mlsae.warehouse.workspace import workspace
    url, sae_id = sys.argv[1], sys.argv[2]
    with workspace(url, [sae_id], log=lambda line: print("log:", line, flush=True)) as local:
        weights = local / "autoencoders" / sae_id / "sae"
        if (weights / "config.json").exists():
            print("reused", flush=True)
        else:
            print("writing", flush=True)
            weights.mkdir(parents=True)
            (weights / "model.safetensors").write_bytes(sys.argv[3].encode() * 1000)
            time.sleep(3)  # the other process starts meanwhile and must wait
            (weights / "config.json").write_text("{}")
""")


def test_the_same_autoencoder_twice_at_once_is_written_once(s3_env, tmp_path):
    from mlsae.warehouse.lease import holder

    url, sae_id = f"s3://{BUCKET}/lease", "embedded-R2-k4-twice"
    procs = []
    for name in ("a", "b"):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", LEASE_SCRIPT, url, sae_id, name],
            env={**os.environ, "MLSAE_SCRATCH": str(tmp_path / name)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)  # a starts first
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    first, second = (out for out, _ in outputs)
    assert "writing" in first and "reused" not in first, first
    assert "reused" in second and "writing" not in second, second
    assert "waiting" in second, second
    objects = _sae_objects(url, sae_id)
    weights = f"autoencoders/{sae_id}/sae/model.safetensors"
    assert _fs().cat_file(f"{BUCKET}/lease/{weights}") == b"a" * 1000
    assert sorted(objects) == [f"autoencoders/{sae_id}/sae/config.json", weights]
    assert holder(url, f"sae-{sae_id}") is None  # released
    assert _uncommitted(url) == []


def test_training_resumes_from_a_checkpoint_another_worker_published(s3_env, tmp_path,
                                                                     monkeypatch):
    from mlsae.data import DataConfig
    from mlsae.extract import ExtractConfig, cache_key, extract_to_cache
    from mlsae.models import load_model
    from mlsae.sae.config import SAEConfig, TrainConfig
    from mlsae.sae.train import TrainingInterrupted, train_sae
    from mlsae.warehouse import activation_cache_dir, autoencoder_dir
    from mlsae.warehouse.workspace import checkpoint_publisher, workspace

    url, sae_id = f"s3://{BUCKET}/resume", "embedded-R2-k4-resume"
    loaded = load_model("embedded", device="cpu")
    cfg = TrainConfig(sae=SAEConfig(d_model=loaded.model.config.hidden_size, n_layers=6,
                                    expansion_factor=2, k=4, k_aux=8, layers=[1, 3],
                                    model=loaded.name),
                      train_tokens=1024, batch_tokens=128, lr=1e-3, device="cpu",
                      checkpoint_every=1)

    extract = ExtractConfig(model="embedded", device="cpu", dtype="float32", shard_sequences=16,
                            data=DataConfig(split="train", seq_len=64, max_sequences=32),
                            layers=[1, 3])

    def cache():
        """This machine's activation cache (in its scratch: each worker extracts its own,
        so the checkpoint records another cache path than the one it resumes with)."""
        return extract_to_cache(extract, activation_cache_dir(url, cache_key(extract)),
                                loaded=loaded, log=lambda _: None)

    steps = []

    def stop_after_three() -> bool:
        steps.append(1)
        return len(steps) >= 3

    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "machine-a"))
    with pytest.raises(TrainingInterrupted), workspace(url, [sae_id]) as local:
        train_sae(cfg, cache(), autoencoder_dir(local, sae_id),
                  on_step=checkpoint_publisher(url, [sae_id]), should_stop=stop_after_three,
                  progress_log=lambda _: None)
    assert f"autoencoders/{sae_id}/checkpoint.pt" in _sae_objects(url, sae_id)

    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "machine-b"))
    with workspace(url, [sae_id]) as local:
        assert local.is_relative_to(tmp_path / "machine-b")
        result = train_sae(cfg, cache(), autoencoder_dir(local, sae_id),
                           progress_log=lambda _: None)
    assert result.resumed_from_step == 3 and result.steps == cfg.n_steps == 8
    assert f"autoencoders/{sae_id}/sae/model.safetensors" in _sae_objects(url, sae_id)


@pytest.mark.timeout(600)
def test_two_workers_write_one_sweep_into_one_bucket_at_once(local_run, s3_env, prefect_api,
                                                             tmp_path):
    """Two `mlsae sweep` processes (own scratch directories, one Prefect server) start the
    same run into one bucket together: the autoencoder is written once (the second waits
    on its lease, or finds the step cached), and the tables equal the local run's (floats
    to 1e-9: once, the workers' evaluation differed from this process's by 5e-11 relative,
    cause not found; a torn or duplicated part would differ by far more)."""
    import torch

    url = f"s3://{BUCKET}/two-workers"
    # the workers' torch uses as many threads as this process's (the local run's)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_API_URL": prefect_api,
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    def worker(name: str) -> subprocess.Popen:
        return subprocess.Popen([MLSAE, "sweep", "--out", url, "--scratch",
                                 str(tmp_path / name), *CLI_ARGS], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    workers = [worker("worker-a"), worker("worker-b")]
    logs = [w.communicate(timeout=600)[1] for w in workers]
    for process, log in zip(workers, logs, strict=True):
        errors = [line for line in log.splitlines() if "Error" in line or "ERROR" in line]
        assert process.returncode == 0, "\n".join(errors[-20:]) or log[-3000:]
    assert any("another worker holds it" in log or "Cached" in log for log in logs), logs
    assert _uncommitted(url) == []
    assert_same_warehouse(local_run, url, rel_tol=1e-9)
    # a rerun on worker b finds every step but its worker-local extraction in the bucket's
    # task cache (worker b's scratch already holds the cache: nothing runs)
    again = worker("worker-b")
    log = again.communicate(timeout=600)[1]
    assert again.returncode == 0, log[-3000:]
    finished = [line for line in log.splitlines() if "Finished in state" in line
                and "Task run" in line]
    ran = [line for line in finished if "Cached" not in line]
    assert finished and all("extract-activations" in line for line in ran), ran
