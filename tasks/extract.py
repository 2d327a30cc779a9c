"""Prefect task: the model's block outputs on the training text, into the activation cache."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TypedDict

from prefect import task

from tasks.common import CACHE_POLICY, TRANSIENT_RETRIES, gpu_slot, progress_log, run_logger


class CacheManifest(TypedDict):
    cache_dir: str
    """The cache's directory (for a warehouse at a URL, as mlsae.warehouse.public_path names
    it: the same on every worker; mlsae.warehouse.local_path gives this worker's copy)."""
    model: str
    layers: list[int]
    d_model: int
    seq_len: int
    n_sequences: int
    n_tokens: int
    """Unmasked (non-special) tokens: the training examples per layer."""
    n_shards: int


def cache_dir_for(out: str, cfg) -> Path:
    from mlsae import warehouse
    from mlsae.extract import cache_key

    return warehouse.activation_cache_dir(out, cache_key(cfg))


@task(name="extract-activations", cache_policy=CACHE_POLICY, **TRANSIENT_RETRIES)
def extract_activations(settings: dict, out: str, shared_cache: bool = False) -> CacheManifest:
    """Extract once per (model, data, layers, budget); a partial cache is resumed.

    shared_cache (Budget.shared_cache, a warehouse at a URL): the cache is published to the
    bucket shard by shard, and what another worker committed is pulled first (a finished
    cache is not extracted again; a partial one is resumed). Bind the task then with its
    results in the bucket (flows.pipeline.bind_tasks), so other workers skip it."""
    from mlsae.extract import extract_to_cache
    from mlsae.plan import extract_config
    from mlsae.warehouse.workspace import sharing_activation_cache

    cfg = extract_config(settings)
    model, data, layers, seq_len = (settings["model"]["name"], settings["data"],
                                    settings["layers"], settings["seq_len"])
    device = settings["device"]
    target = cache_dir_for(out, cfg)
    logger = run_logger()
    logger.info("extracting block outputs %s of %s on %s (%d sequences x %d tokens) into %s",
                layers, model, data, cfg.max_sequences, seq_len, target)
    sharing = sharing_activation_cache(out, target, log=progress_log()) if shared_cache \
        else contextlib.nullcontext()
    with sharing as on_shard, gpu_slot(device):
        cache = extract_to_cache(cfg, target, on_shard=on_shard, log=progress_log())
    m = cache.manifest
    logger.info("activation cache: %d sequences, %d unmasked tokens, %d shards",
                m.n_sequences, m.n_tokens, len(m.shards))
    from mlsae.warehouse import public_path

    return CacheManifest(cache_dir=public_path(out, target), model=m.model, layers=list(m.layers),
                         d_model=m.d_model, seq_len=m.seq_len, n_sequences=m.n_sequences,
                         n_tokens=m.n_tokens, n_shards=len(m.shards))
