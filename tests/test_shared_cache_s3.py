"""A shared activation cache (Budget.shared_cache, `--shared-cache`) in a warehouse at a URL,
against a real S3-compatible server (moto's, on a free loopback port) and a real temporary
Prefect server:

- with the option, worker A's extraction publishes the cache (committed shards and
  manifest); worker B (an empty scratch directory) finds the extraction in the shared step
  cache (the model is not run for it), pulls the cache when its training needs it, and its
  tables equal those of a worker that extracted its own cache;
- without it, nothing under activations/ reaches the bucket (each worker extracts its own);
- an extraction stopped on one worker is resumed on another from the committed shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.s3_server import moto_s3
from tests.test_flows_support import assert_same_warehouse, request
from tests.test_warehouse_s3_write import FIELDS, _task_states, _uncommitted

pytestmark = pytest.mark.timeout(300)

BUCKET = "mlsae-shared-cache"


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with moto_s3(tmp_path_factory, BUCKET) as env:
        yield env


def _cache_objects(url: str) -> dict[str, dict]:
    from mlsae.warehouse.remote import open_store

    return open_store(url).listing("activations/")


def _md5s(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def _cache_dir(scratch: Path, url: str) -> Path:
    """The one activation cache of the working copy of `url` in the scratch directory."""
    (cache,) = [p for p in (scratch / _digest(url) / "activations").iterdir() if p.is_dir()]
    return cache


def _digest(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def test_a_second_worker_pulls_the_shared_cache_instead_of_extracting(
        s3_env, prefect_api, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from mlsae.warehouse.remote import is_committed, open_store

    shared, own = f"s3://{BUCKET}/shared", f"s3://{BUCKET}/own"

    # worker A extracts, trains k 4, and publishes the cache
    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "a"))
    pipeline(**request(**FIELDS, shared_cache=True), out=shared)
    objects = _cache_objects(shared)
    (key,) = {rel.split("/")[1] for rel in objects}
    names = {rel.rsplit("/", 1)[-1] for rel in objects}
    assert {"manifest.json", "shard-00000.acts.npy", "shard-00000.tokens.npy",
            "shard-00000.mask.npy"} <= names, names
    assert all(is_committed(shared, rel) for rel in objects), objects
    manifest = json.loads(open_store(shared).fs.cat_file(
        open_store(shared).key(f"activations/{key}/manifest.json")))
    assert manifest["complete"] and manifest["n_sequences"] == 32
    assert _uncommitted(shared) == []
    a_cache = _cache_dir(tmp_path / "a", shared)
    assert a_cache.name == key

    # worker B (empty scratch) adds k 8: the extraction is a cache hit (the model is not
    # run for it), and training k 8 pulls the committed cache into B's scratch
    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "b"))
    state = pipeline(**request(**FIELDS, ks=[4, 8], shared_cache=True), out=shared,
                     return_state=True)
    states = _task_states(state.state_details.flow_run_id)
    assert states["extract-activations"] == "Cached", states
    b_cache = _cache_dir(tmp_path / "b", shared)
    assert b_cache.name == key
    assert _md5s(b_cache) == _md5s(a_cache)
    assert _cache_objects(shared).keys() == objects.keys()  # nothing extracted again
    assert _uncommitted(shared) == []

    # worker C, without the option, into another prefix: its own cache, nothing of it in
    # the bucket, and the same tables as B's (trained from the pulled cache)
    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "c"))
    pipeline(**request(**FIELDS, ks=[4, 8]), out=own)
    assert _cache_objects(own) == {}
    assert not [rel for rel in open_store(own).listing(".commits/") if "activations" in rel]
    assert _md5s(_cache_dir(tmp_path / "c", own)) == _md5s(a_cache)
    assert_same_warehouse(own, shared)


def test_an_extraction_stopped_on_one_worker_resumes_on_another(s3_env, tmp_path, monkeypatch):
    from mlsae.data import DataConfig
    from mlsae.extract import ExtractConfig, cache_key, extract_to_cache
    from mlsae.models import load_model
    from mlsae.warehouse import activation_cache_dir
    from mlsae.warehouse.remote import is_committed, open_store
    from mlsae.warehouse.workspace import sharing_activation_cache

    url = f"s3://{BUCKET}/resume"
    loaded = load_model("embedded", device="cpu")
    cfg = ExtractConfig(model="embedded", device="cpu", shard_sequences=16, layers=[1, 3],
                        data=DataConfig(split="train", seq_len=64, max_sequences=32))
    key = cache_key(cfg)

    class Stop(Exception):
        pass

    def stop_after_first(publish):
        def on_shard(info):
            publish(info)
            raise Stop

        return on_shard

    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "a"))
    a_dir = activation_cache_dir(url, key)
    with pytest.raises(Stop), sharing_activation_cache(url, a_dir) as publish:
        extract_to_cache(cfg, a_dir, loaded=loaded, on_shard=stop_after_first(publish),
                         log=lambda _: None)
    shard0 = f"activations/{key}/shard-00000.acts.npy"
    assert is_committed(url, shard0)
    assert not open_store(url).listing(f"activations/{key}/shard-00001")

    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "b"))
    b_dir = activation_cache_dir(url, key)
    written = []
    with sharing_activation_cache(url, b_dir) as publish:
        cache = extract_to_cache(cfg, b_dir, loaded=loaded, log=lambda _: None,
                                 on_shard=lambda info: (written.append(info.index),
                                                        publish(info)))
    assert written == [1]  # shard 0 came from the bucket
    assert cache.manifest.complete and cache.manifest.n_sequences == 32
    assert _md5s(b_dir)["shard-00000.acts.npy"] == _md5s(a_dir)["shard-00000.acts.npy"]
    assert all(is_committed(url, f"activations/{key}/{name}") for name in _md5s(b_dir))
    assert _uncommitted(url) == []

    # the default publish leaves caches alone (a working copy holding one uploads nothing)
    from mlsae.warehouse.remote import publish as publish_default

    monkeypatch.setenv("MLSAE_SCRATCH", str(tmp_path / "a"))
    assert not [u for u in publish_default(url) if u.startswith("activations/")]


def test_the_option_is_checked_keeps_the_steps_keys_and_is_priced_by_the_dry_run():
    from mlsae.estimate import estimate_plan, format_estimate
    from mlsae.plan import Budget, InvalidRequest, RunRequest, make_plan, run_settings

    with pytest.raises(InvalidRequest, match="--shared-cache"):
        Budget(shared_cache="yes")
    small = dict(train_tokens=2048, eval_tokens=512, seq_len=64)
    on, off = (make_plan(RunRequest(grid=dict(expansion_factors=[2], ks=[4], layers=[1, 3]),
                                    budget=dict(small, shared_cache=flag)))
               for flag in (True, False))
    # where the cache goes changes no result: the steps' settings (cache keys) are the same
    assert run_settings(on) == run_settings(off)
    assert [s["sae_id"] for s in on["specs"]] == [s["sae_id"] for s in off["specs"]]
    text_on, text_off = (format_estimate(estimate_plan(p, probe=False)) for p in (on, off))
    assert "go to the bucket" in text_on and "bucket" not in text_off
    assert estimate_plan(on, probe=False)["cache_shared"] is True
