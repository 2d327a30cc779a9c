"""`mlsae serve` and `mlsae gc` over a warehouse at a URL, against a real S3-compatible server
(moto's, on a free loopback port):

- the explorer over the bucket (a published copy of tests/serve_warehouse.py's warehouse,
  read by a machine with an empty working copy) answers /api/saes, a latent and a prompt
  exactly as the explorer over the local warehouse, pulling the weights on first use; the
  `mlsae serve --out s3://...` command serves it;
- gc over the bucket keeps this machine's scratch cache and the bucket's shared cache
  while a training checkpointed in the bucket is unfinished, then (its weights committed)
  lists both with --dry-run, and removes them: the shared cache's commit objects before
  its data objects, nothing of it left in the bucket.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.s3_server import moto_s3
from tests.serve_warehouse import LENS_SAE_ID, SAE_ID, build_serve_warehouse

pytestmark = pytest.mark.timeout(300)

BUCKET = "mlsae-serve-gc"
PROMPT = "When John and Mary went to the store, John gave a drink to"
MLSAE = str(Path(sys.executable).with_name("mlsae"))


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with moto_s3(tmp_path_factory, BUCKET) as env:
        yield env


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """This test's own working copy ($MLSAE_SCRATCH)."""
    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "scratch"))
    return tmp_path / "scratch"


@pytest.fixture(scope="module")
def local_warehouse(tmp_path_factory):
    return build_serve_warehouse(tmp_path_factory)


@pytest.fixture(scope="module")
def bucket_warehouse(s3_env, local_warehouse, tmp_path_factory):
    """The serve warehouse published to the bucket by a worker (its working copy a copy of
    the local warehouse): the URL."""
    from mlsae.warehouse import scratch_dir
    from mlsae.warehouse.remote import open_store, publish

    url = f"s3://{BUCKET}/serve"
    saved = os.environ["MLSAE_SCRATCH"]
    os.environ["MLSAE_SCRATCH"] = str(tmp_path_factory.mktemp("publisher"))
    try:
        shutil.copytree(local_warehouse, scratch_dir(url),
                        ignore=shutil.ignore_patterns(".prefect", ".tmp"))
        assert publish(url, [SAE_ID, LENS_SAE_ID])
    finally:
        os.environ["MLSAE_SCRATCH"] = saved
    listing = open_store(url).listing()
    assert f"autoencoders/{SAE_ID}/sae/model.safetensors" in listing
    return url


def _client(where):
    from fastapi.testclient import TestClient

    from mlsae.serve.app import create_app

    return TestClient(create_app(where, device="cpu"), raise_server_exceptions=False)


def _answers(client) -> dict:
    out = {"saes": client.get("/api/saes")}
    for sae_id in (SAE_ID, LENS_SAE_ID):
        out[f"latent {sae_id}"] = client.get(f"/api/latent/{sae_id}/3")
        out[f"prompt {sae_id}"] = client.post("/api/prompt", json={
            "sae_id": sae_id, "text": PROMPT, "layer": 2,
            "steer": {"latent": 3, "layer": 1, "factor": 0.0}})
    for name, reply in out.items():
        assert reply.status_code == 200, (name, reply.text)
    return {name: reply.json() for name, reply in out.items()}


def _differences(a, b, path: str = "") -> list[str]:
    """Where two JSON answers differ (floats to 1e-12: the views' sums run in parallel)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_the_explorer_over_the_bucket_equals_the_local_one(local_warehouse, bucket_warehouse,
                                                           scratch):
    from mlsae.warehouse.layout import trained_weights_dir, working_dir

    with _client(local_warehouse) as client:
        local = _answers(client)
    with _client(bucket_warehouse) as client:
        assert not scratch.exists()  # nothing pulled before a page needs it
        remote = _answers(client)
    assert _differences(remote, local) == []
    for sae_id in (SAE_ID, LENS_SAE_ID):  # pulled into this machine's working copy
        assert remote[f"latent {sae_id}"]["weights_note"] is None
        assert (trained_weights_dir(working_dir(bucket_warehouse), sae_id)
                / "model.safetensors").exists()


def test_a_bucket_sae_without_committed_weights_names_them(bucket_warehouse, scratch):
    from mlsae.serve.catalog import NotFound
    from mlsae.serve.loaded import Loader

    loader = Loader(bucket_warehouse, device="cpu")
    with pytest.raises(NotFound, match=f"{bucket_warehouse}/autoencoders/missing-sae/sae/"):
        loader.get({"sae_id": "missing-sae", "model": "embedded", "lens": None,
                    "layers": [0]})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mlsae_serve_takes_a_bucket_url(bucket_warehouse, scratch, tmp_path):
    port, cwd = _free_port(), tmp_path / "cwd"
    cwd.mkdir()
    server = subprocess.Popen([MLSAE, "serve", "--out", bucket_warehouse, "--port", str(port),
                               "--device", "cpu"], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline, saes = time.monotonic() + 60, None
        while saes is None:
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "the explorer did not answer within 60 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/saes",
                                            timeout=5) as reply:
                    saes = json.loads(reply.read())
            except OSError:
                time.sleep(0.3)
        assert [s["sae_id"] for s in saes] == [SAE_ID, LENS_SAE_ID]
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert f"(warehouse {bucket_warehouse})" in err, err
    assert list(cwd.iterdir()) == []  # no local directory named `s3:`


# --------------------------------------------------------------------------- gc


def _extract_cache(url: str) -> Path:
    """A small finished activation cache in this machine's working copy of `url`."""
    from mlsae.data import DataConfig
    from mlsae.extract import ExtractConfig, cache_key, extract_to_cache
    from mlsae.warehouse import activation_cache_dir

    cfg = ExtractConfig(data=DataConfig(split="train", seq_len=32), max_sequences=4,
                        device="cpu")
    path = activation_cache_dir(url, cache_key(cfg))
    extract_to_cache(cfg, path, log=lambda line: None)
    return path


def _commit_file(url: str, relative: str, data: bytes, sae_id: str) -> None:
    """Write a file of autoencoder `sae_id` into the working copy and publish (commit) its
    unit, then remove the autoencoder's local files: gc must judge it from the bucket."""
    from mlsae.warehouse import working_dir
    from mlsae.warehouse.remote import publish

    path = working_dir(url) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    assert publish(url, [sae_id], shared=False)
    shutil.rmtree(working_dir(url) / "autoencoders" / sae_id)


def _gc(url: str, *args: str):
    from click.testing import CliRunner

    from flows.cmd_gc import command

    result = CliRunner().invoke(command, ["--out", url, *args])
    assert result.exit_code == 0, result.output
    return result.output


class _RecordingFS:
    """An fsspec filesystem that records what is deleted, in order."""

    def __init__(self, fs, deleted: list[str]):
        self._fs, self._deleted = fs, deleted

    def rm_file(self, path, *args, **kwargs):
        self._deleted.append(path)
        return self._fs.rm_file(path, *args, **kwargs)

    def rm(self, path, *args, **kwargs):
        self._deleted.extend([path] if isinstance(path, str) else path)
        return self._fs.rm(path, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_export_and_extract_take_a_bucket_url(local_warehouse, bucket_warehouse, scratch,
                                             tmp_path):
    """`mlsae export --out s3://...` pulls the committed weights and writes the same files as
    the export from the local warehouse; `mlsae extract --out s3://...` puts its cache in
    this machine's working copy (no local `s3:` directory)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exported = {}
    for name, where in (("local", str(local_warehouse)), ("bucket", bucket_warehouse)):
        done = subprocess.run([MLSAE, "export", SAE_ID, "--format", "saelens", "--layer", "1",
                               "--to", str(tmp_path / name), "--out", where],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        exported[name] = {p.relative_to(tmp_path / name): p.read_bytes()
                          for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}
    assert exported["bucket"] == exported["local"] and exported["local"]

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run([MLSAE, "extract", "--max-sequences", "4", "--seq-len", "32",
                           "--layers", "1", "--out", bucket_warehouse], capture_output=True,
                          text=True, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert list(cwd.iterdir()) == []
    assert str(scratch) in done.stdout, done.stdout


def test_gc_over_the_bucket_keeps_what_an_unfinished_training_needs(
        s3_env, scratch, monkeypatch):
    from mlsae.warehouse import remote
    from mlsae.warehouse.layout import activation_cache_prefix, trained_weights_dir, working_dir
    from mlsae.warehouse.workspace import prepare_warehouse

    url = f"s3://{BUCKET}/gc"
    prepare_warehouse(url)
    cache = _extract_cache(url)
    key = cache.name
    assert scratch in cache.parents  # this machine's working copy
    # shared through the bucket (--shared-cache), as the extraction would have
    assert remote.publish(url, prefix=activation_cache_prefix(key), caches=True)
    store = remote.open_store(url)
    shared = {rel for rel in store.listing(activation_cache_prefix(key))}
    assert f"activations/{key}/manifest.json" in shared

    # a training with a committed checkpoint and no committed weights is unfinished
    _commit_file(url, "autoencoders/sae-a/checkpoint.pt", b"state", "sae-a")
    output = _gc(url)
    assert output.count("needed by sae-a") == 2, output
    assert "removed 0 cache(s)" in output and cache.is_dir()
    assert store.listing(activation_cache_prefix(key)).keys() == shared

    # its weights committed: both caches go (a dry run first lists them)
    weights = trained_weights_dir(working_dir(url), "sae-a")
    weights.mkdir(parents=True)
    (weights / "config.json").write_text("{}")
    _commit_file(url, "autoencoders/sae-a/sae/model.safetensors", b"weights", "sae-a")
    output = _gc(url, "--dry-run")
    assert f"would remove {cache}" in output, output
    assert f"would remove {url}/activations/{key}/" in output, output
    assert cache.is_dir() and store.listing(activation_cache_prefix(key)).keys() == shared

    deleted: list[str] = []
    real_open_store = remote.open_store
    monkeypatch.setattr(remote, "open_store", lambda where: remote.Store(
        _RecordingFS(real_open_store(where).fs, deleted), real_open_store(where).prefix))
    output = _gc(url)
    assert "removed 2 cache(s)" in output and "kept 0" in output, output
    assert not cache.exists()
    assert store.listing(activation_cache_prefix(key)) == {}
    assert not [rel for rel in store.listing(".commits/activations/")]
    # commit objects first (the manifest's first), then the data objects
    kinds = ["commit" if "/.commits/" in key_ else "data" for key_ in deleted]
    assert kinds == sorted(kinds) and "data" in kinds, deleted
    assert deleted[0].endswith(f".commits/activations/{key}/manifest.json.json"), deleted
    # the autoencoders' units are untouched
    assert remote.is_committed(url, "autoencoders/sae-a/sae/model.safetensors")


def test_gc_over_the_bucket_keeps_a_shared_cache_whose_extraction_is_unfinished(
        s3_env, scratch):
    from mlsae.cache import MANIFEST
    from mlsae.gc import cache_uses
    from mlsae.warehouse import remote
    from mlsae.warehouse.layout import activation_cache_prefix
    from mlsae.warehouse.workspace import prepare_warehouse

    url = f"s3://{BUCKET}/gc-partial"
    prepare_warehouse(url)
    cache = _extract_cache(url)
    manifest = cache / MANIFEST
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    assert remote.publish(url, prefix=activation_cache_prefix(cache.name), caches=True)
    uses = cache_uses(url)
    assert [u.needed_by for u in uses] == [["extraction not finished"]] * 2, uses
    assert "removed 0 cache(s)" in _gc(url)
    assert remote.is_committed(url, activation_cache_prefix(cache.name) + MANIFEST)
