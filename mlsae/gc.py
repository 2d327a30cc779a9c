"""Activation caches: what they hold on disk, which unfinished run still needs them, and
removing the others (`mlsae gc`).

A finished run keeps its cache so a rerun with another grid or budget on the same data
trains without a forward pass; the cost is disk (6 GB for 1M tokens of Pythia-70m at
2048-token sequences). A cache is needed while it is incomplete (an extraction resumes
into it) or while any training of the warehouse is unfinished (it has a checkpoint but
no saved autoencoder yet), since that run resumes from the cache.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import NamedTuple

from mlsae import warehouse


class CacheUse(NamedTuple):
    path: Path
    bytes: int
    complete: bool
    needed_by: list[str]
    """Why it is kept: "extraction not finished" or the sae_ids of unfinished trainings."""


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def unfinished_trainings(warehouse_dir: str | os.PathLike) -> list[str]:
    """sae_ids whose training has a checkpoint but no saved autoencoder yet."""
    from mlsae.sae.train import CHECKPOINT

    return [d.name for d in warehouse.autoencoder_dirs(warehouse_dir)
            if (d / CHECKPOINT).exists() and not (d / "sae" / "config.json").exists()]


def cache_uses(warehouse_dir: str | os.PathLike) -> list[CacheUse]:
    """Every activation cache of the warehouse with its size and who needs it."""
    from mlsae.cache import ActivationCache, CacheError

    unfinished = unfinished_trainings(warehouse_dir)
    uses = []
    for path in warehouse.activation_caches(warehouse_dir):
        try:
            complete = ActivationCache.open(path, allow_partial=True).manifest.complete
        except (CacheError, OSError, ValueError):
            complete = False
        needed = unfinished if complete else ["extraction not finished"]
        uses.append(CacheUse(path, directory_bytes(path), complete, list(needed)))
    return uses


def total_cache_bytes(warehouse_dir: str | os.PathLike) -> int:
    return sum(directory_bytes(path) for path in warehouse.activation_caches(warehouse_dir))


def remove_unneeded_caches(warehouse_dir: str | os.PathLike, dry_run: bool = False
                           ) -> tuple[list[CacheUse], list[CacheUse]]:
    """(removed, kept): remove every cache no unfinished run needs (nothing with dry_run).
    Each is first renamed into the warehouse's trash, then deleted."""
    removed, kept = [], []
    for use in cache_uses(warehouse_dir):
        if use.needed_by:
            kept.append(use)
            continue
        removed.append(use)
        if not dry_run:
            trash = warehouse.trash_dir(warehouse_dir)
            trash.mkdir(parents=True, exist_ok=True)
            target = trash / f"{use.path.name}-{uuid.uuid4().hex[:8]}"
            use.path.rename(target)
            shutil.rmtree(target)
    if not dry_run:  # debris of an earlier gc killed mid-delete
        trash = warehouse.trash_dir(warehouse_dir)
        if trash.is_dir():
            for leftover in trash.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
    return removed, kept
