"""Activation caches: what they hold on disk, which unfinished run still needs them, and
removing the others (`mlsae gc`).

A finished run keeps its cache so a rerun with another grid or budget on the same data
trains without a forward pass; the cost is disk (6 GB for 1M tokens of Pythia-70m at
2048-token sequences). A cache is needed while it is incomplete (an extraction resumes
into it) or while any training of the warehouse is unfinished (it has a checkpoint but
no saved autoencoder yet), since that run resumes from the cache.

For a warehouse at a URL (s3://bucket/prefix) the same rule covers the activation caches
of this machine's working copy (layout.activation_cache_dir: they live in scratch) and
the caches shared through the bucket (Budget.shared_cache: committed units under
activations/<key>/), and a training is unfinished when the bucket (or the working copy,
not yet published) has its checkpoint and neither has its weights. A shared cache is
deleted commit objects first (its manifest's first), so a reader never pulls half of one;
one whose extraction holds its lease is kept.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from mlsae import warehouse
from mlsae.warehouse.layout import (
    ACTIVATIONS_DIR,
    AUTOENCODERS_DIR,
    TRAINED_WEIGHTS_DIR,
    activation_cache_prefix,
    commit_key,
)


class CacheUse(NamedTuple):
    path: Path | str
    """The cache's directory, or for a cache shared through a bucket its URL."""
    bytes: int
    complete: bool
    needed_by: list[str]
    """Why it is kept: "extraction not finished" or the sae_ids of unfinished trainings."""


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def unfinished_trainings(warehouse_dir: str | os.PathLike) -> list[str]:
    """sae_ids whose training has a checkpoint but no saved autoencoder yet (for a URL: in
    the bucket's committed units or in this machine's working copy)."""
    from mlsae.sae.train import CHECKPOINT

    dirs = warehouse.autoencoder_dirs(warehouse.working_dir(warehouse_dir))
    checkpointed = {d.name for d in dirs if (d / CHECKPOINT).exists()}
    trained = {d.name for d in dirs if (d / TRAINED_WEIGHTS_DIR / "config.json").exists()}
    if warehouse.is_url(warehouse_dir):
        committed = _committed_autoencoder_units(warehouse_dir)
        checkpointed |= {sae_id for sae_id, name in committed if name == CHECKPOINT}
        trained |= {sae_id for sae_id, name in committed if name == TRAINED_WEIGHTS_DIR}
    return sorted(checkpointed - trained)


def _committed_autoencoder_units(url: str | os.PathLike) -> set[tuple[str, str]]:
    """(sae_id, unit name below autoencoders/<sae_id>/) of the bucket's committed units:
    ("x", "checkpoint.pt"), ("x", "sae") for finished weights."""
    from mlsae.warehouse.remote import open_store, read_commits

    prefix = AUTOENCODERS_DIR + "/"
    units = read_commits(open_store(url), lambda unit: unit.startswith(prefix), under=(prefix,))
    return {tuple(unit[len(prefix):].split("/", 1)) for unit in units if unit.count("/") == 2}


def _shared_caches(url: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{key: {"commits": its commits by unit, "bytes": committed bytes}} of the activation
    caches shared through the bucket at `url` (committed units under activations/<key>/)."""
    from mlsae.warehouse.remote import open_store, read_commits

    prefix = ACTIVATIONS_DIR + "/"
    caches: dict[str, dict[str, Any]] = {}
    for unit, commit in read_commits(open_store(url), lambda u: u.startswith(prefix),
                                     under=(prefix,)).items():
        key = unit[len(prefix):].split("/", 1)[0]
        entry = caches.setdefault(key, {"commits": {}, "bytes": 0})
        entry["commits"][unit] = commit
        entry["bytes"] += sum(v.size for v in commit.files.values())
    return caches


def _shared_cache_complete(url: str | os.PathLike, key: str, commits: dict) -> bool:
    """Whether the shared cache's committed manifest says its extraction finished."""
    from mlsae.cache import MANIFEST, CacheManifest
    from mlsae.warehouse.remote import open_store

    manifest = activation_cache_prefix(key) + MANIFEST  # a unit of its own, by that name
    if manifest not in commits:
        return False
    store = open_store(url)
    try:
        return CacheManifest.from_json(store.fs.cat_file(store.key(manifest)).decode()).complete
    except (OSError, ValueError, TypeError):
        return False


def cache_uses(warehouse_dir: str | os.PathLike) -> list[CacheUse]:
    """Every activation cache of the warehouse with its size and who needs it (for a URL:
    those of this machine's working copy, then those shared through the bucket)."""
    return [use for use, _ in _cache_uses(warehouse_dir)]


def _cache_uses(warehouse_dir: str | os.PathLike
                ) -> list[tuple[CacheUse, tuple[str, dict] | None]]:
    """cache_uses, each with (key, commits by unit) of a shared cache (None: a local one)."""
    from mlsae.cache import ActivationCache, CacheError

    unfinished = unfinished_trainings(warehouse_dir)
    uses: list[tuple[CacheUse, tuple[str, dict] | None]] = []
    for path in warehouse.activation_caches(warehouse_dir):
        try:
            complete = ActivationCache.open(path, allow_partial=True).manifest.complete
        except (CacheError, OSError, ValueError):
            complete = False
        needed = unfinished if complete else ["extraction not finished"]
        uses.append((CacheUse(path, directory_bytes(path), complete, list(needed)), None))
    if warehouse.is_url(warehouse_dir):
        from mlsae.warehouse.lease import holder

        base = warehouse.warehouse_url(warehouse_dir)
        for key, entry in sorted(_shared_caches(warehouse_dir).items()):
            complete = _shared_cache_complete(warehouse_dir, key, entry["commits"])
            owner = holder(warehouse_dir, f"cache-{key}")
            if owner is not None:
                needed = [f"extraction in progress ({owner})"]
            else:
                needed = list(unfinished) if complete else ["extraction not finished"]
            use = CacheUse(f"{base}/{activation_cache_prefix(key)}", entry["bytes"], complete,
                           needed)
            uses.append((use, (key, entry["commits"])))
    return uses


def total_cache_bytes(warehouse_dir: str | os.PathLike) -> int:
    """Bytes of the activation caches on this machine (the warehouse's, or for a URL its
    working copy's)."""
    return sum(directory_bytes(path) for path in warehouse.activation_caches(warehouse_dir))


def remove_unneeded_caches(warehouse_dir: str | os.PathLike, dry_run: bool = False
                           ) -> tuple[list[CacheUse], list[CacheUse]]:
    """(removed, kept): remove every cache no unfinished run needs (nothing with dry_run).
    A local one (of the warehouse, or of the working copy for a URL) is first renamed
    into the trash, then deleted; a shared one loses its commit objects, then its data
    objects (remove_shared_cache)."""
    trash = warehouse.trash_dir(warehouse.working_dir(warehouse_dir))
    removed, kept = [], []
    for use, shared in _cache_uses(warehouse_dir):
        if use.needed_by:
            kept.append(use)
            continue
        removed.append(use)
        if dry_run:
            continue
        if shared is not None:
            remove_shared_cache(warehouse_dir, *shared)
            continue
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{use.path.name}-{uuid.uuid4().hex[:8]}"
        use.path.rename(target)
        shutil.rmtree(target)
    if not dry_run and trash.is_dir():  # debris of an earlier gc killed mid-delete
        for leftover in trash.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
    return removed, kept


def remove_shared_cache(url: str | os.PathLike, key: str, commits: dict[str, Any]) -> None:
    """Delete the activation cache `key` shared through the bucket at `url`: its commit
    objects first (the manifest's before the shards'), so a reader never pulls a cache with
    shards missing (a worker without the manifest extracts the cache again), then every
    object under activations/<key>/ (an interrupted upload's debris too)."""
    from mlsae.cache import MANIFEST
    from mlsae.warehouse.remote import open_store

    store = open_store(url)
    prefix = activation_cache_prefix(key)
    manifest = prefix + MANIFEST
    if manifest in commits:
        store.fs.rm_file(store.key(commit_key(manifest)))
    rest = [store.key(commit_key(unit)) for unit in sorted(commits) if unit != manifest]
    if rest:
        store.fs.rm(rest)
    objects = [store.key(rel) for rel in store.listing(prefix)]
    if objects:
        store.fs.rm(objects)
