"""Where a step works on a warehouse: the directory itself, or for a URL its local working
copy, with the bucket brought in before and the step's outputs published after.

    with workspace(out, [sae_id]) as local:      # local: a Path, whatever `out` is
        ... the library writes under `local` as in any local warehouse ...

For a warehouse at a URL the block holds the autoencoders' leases (one writer per
autoencoder across machines; a second waits, then finds the first's outputs), pulls
their committed units (weights, checkpoints, logged parts) into the working copy,
and at the end publishes what the block finished, also when it failed (a finished
part or a checkpoint is worth keeping), then deletes the debris of killed uploads.
For a local warehouse it is only the directory.

A shared activation cache (Budget.shared_cache) is published by its extraction
(sharing_activation_cache: shard by shard, under a lease per cache) and pulled by the
steps that read it on another worker (pull_activation_cache).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mlsae.warehouse.layout import (
    AUTOENCODERS_DIR,
    LENSES_DIR,
    TRAINED_WEIGHTS_DIR,
    activation_cache_prefix,
    autoencoder_dir,
    init_warehouse,
    is_url,
    working_dir,
)
from mlsae.warehouse.lease import holding
from mlsae.warehouse.remote import clean_debris, publish, pull

_log = logging.getLogger("mlsae")


def prepare_warehouse(out: str | os.PathLike) -> Path:
    """Create the warehouse (its marker; for a URL the working copy, and the marker in the
    bucket so readers accept the prefix). Returns the local directory."""
    local = init_warehouse(working_dir(out))
    if is_url(out):
        publish(out)
    return local


@contextlib.contextmanager
def workspace(out: str | os.PathLike, sae_ids: Iterable[str] = (), *, write: bool = True,
              shared: Iterable[str] = (),
              log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """The local directory to work in (see the module's docstring). write=False: only pull
    (a step that reads the autoencoders and writes shared files, e.g. figures or a report).
    shared: more prefixes of shared files to pull besides the lenses (layout.report_prefix,
    layout.figures_prefix)."""
    local = working_dir(out)
    if not is_url(out):
        yield local
        return
    ids = sorted(set(sae_ids))
    say = log or _log.info
    init_warehouse(local)
    with contextlib.ExitStack() as leases:
        if write:
            for sae_id in ids:  # in one order everywhere: two steps never wait on each other
                leases.enter_context(holding(out, f"sae-{sae_id}", log=say))
        # a step that only reads the autoencoders needs their weights, not their tables
        pull(out, ids, shared_prefixes=(LENSES_DIR + "/", *shared),
             sae_prefix="" if write else AUTOENCODERS_DIR + "/")
        try:
            yield local
        except BaseException:
            try:
                publish(out, ids if write else (), log=say)
            except Exception as err:  # the step's own error is the one to report
                say(f"could not publish the finished outputs to {out}: {err}")
            raise
        publish(out, ids if write else (), log=say)
        if write:
            clean_debris(out, ids)


class CheckpointPublisher:
    """An on_step callback for training (mlsae.sae.train): publishes an autoencoder's
    checkpoint each time training writes it (TrainConfig.checkpoint_every /
    checkpoint_seconds), so a run killed on this machine resumes on another."""

    def __init__(self, out: str | os.PathLike, sae_ids: Iterable[str]):
        from mlsae.sae.train import CHECKPOINT  # training's own file name (torch is loaded)

        self.out = out
        self.checkpoints = {sae_id: autoencoder_dir(working_dir(out), sae_id) / CHECKPOINT
                            for sae_id in sae_ids}
        self.seen = {sae_id: self._mtime(path) for sae_id, path in self.checkpoints.items()}

    @staticmethod
    def _mtime(path: Path) -> int | None:
        return path.stat().st_mtime_ns if path.exists() else None

    def __call__(self, *_step) -> None:
        for sae_id, path in self.checkpoints.items():
            mtime = self._mtime(path)
            if mtime != self.seen[sae_id]:
                self.seen[sae_id] = mtime
                publish(self.out, [sae_id], shared=False)


def checkpoint_publisher(out: str | os.PathLike, sae_ids: Iterable[str]
                         ) -> CheckpointPublisher | None:
    """A CheckpointPublisher for a warehouse at a URL; None for a local one (nothing to do)."""
    return CheckpointPublisher(out, sae_ids) if is_url(out) else None


def part_publisher(out: str | os.PathLike, sae_ids: Iterable[str]
                   ) -> Callable[[int], None] | None:
    """An on_part callback for latent logging (mlsae.latents.write_latents) into a warehouse
    at a URL: publishes each part as soon as it is written, so a worker killed mid-step
    loses only the part in progress; None for a local warehouse (the part is already in
    place)."""
    if not is_url(out):
        return None
    ids = list(sae_ids)
    return lambda _part: publish(out, ids, shared=False)


def _cache_complete(cache_dir: Path) -> bool:
    from mlsae.cache import MANIFEST, CacheManifest

    try:
        return CacheManifest.from_json((cache_dir / MANIFEST).read_text()).complete
    except (OSError, ValueError, TypeError):
        return False


def pull_activation_cache(out: str | os.PathLike, cache_dir: Path) -> list[str]:
    """Before a step reads the activation cache at `cache_dir` (this worker's copy,
    layout.activation_cache_dir): for a warehouse at a URL whose copy here is missing or
    unfinished, download the cache's committed files (published by an extraction with
    Budget.shared_cache on another worker). Nothing is committed for an unshared cache,
    and a local warehouse holds its caches: both leave the directory as it is. Returns
    the units pulled."""
    if not is_url(out) or _cache_complete(cache_dir):
        return []
    return pull(out, shared_prefixes=(activation_cache_prefix(Path(cache_dir).name),))


@contextlib.contextmanager
def sharing_activation_cache(out: str | os.PathLike, cache_dir: Path,
                             log: Callable[[str], None] | None = None
                             ) -> Iterator[Callable[[object], None] | None]:
    """The block extracts the activation cache at `cache_dir` (this worker's copy) of a
    warehouse at a URL and shares it (Budget.shared_cache): holds the cache's lease (one
    extraction of it at a time across machines; a second waits, then finds it), pulls
    what is committed (a finished cache is then skipped, a partial one resumed), yields
    an on_shard callback (mlsae.extract.extract_to_cache) that publishes each finished
    shard and the manifest listing it, and publishes at the end (also when the block
    failed), then deletes the debris of killed uploads. Yields None for a local
    warehouse (the cache is in the warehouse already)."""
    if not is_url(out):
        yield None
        return
    say = log or _log.info
    prefix = activation_cache_prefix(Path(cache_dir).name)
    init_warehouse(working_dir(out))

    def publish_cache(_shard: object = None) -> None:
        publish(out, prefix=prefix, caches=True, log=say)

    with holding(out, f"cache-{Path(cache_dir).name}", log=say):
        pulled = pull(out, shared_prefixes=(prefix,))
        if pulled:
            say(f"activation cache: {len(pulled)} committed file(s) pulled from {out}")
        try:
            yield publish_cache
        except BaseException:
            try:
                publish_cache()
            except Exception as err:  # the step's own error is the one to report
                say(f"could not publish the activation cache to {out}: {err}")
            raise
        publish_cache()
        clean_debris(out, (), prefixes=(prefix,))


def pull_weights(where: str | os.PathLike, sae_id: str, *, lens: bool = False) -> None:
    """For a warehouse at a URL: download the committed weights of `sae_id` (and the trained
    lenses, when its basis is one) into this machine's working copy (layout.working_dir),
    where layout.trained_weights_dir finds them. Files already there are kept; nothing to
    do for a local warehouse."""
    if not is_url(where):
        return
    pull(where, [sae_id], shared_prefixes=(LENSES_DIR + "/",) if lens else (),
         sae_prefix=f"{AUTOENCODERS_DIR}/{sae_id}/{TRAINED_WEIGHTS_DIR}")
