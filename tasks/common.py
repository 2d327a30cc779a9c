"""What every mlsae task shares: caching in the warehouse, transient-only retries,
GPU slots and the run logger.

Caching: a task's key is its inputs + its own source + the mlsae version, and
its (small, JSON) result is persisted under <warehouse>/.prefect/results, so a
second run with the same configuration into the same warehouse finds every
finished step there and skips it. Deleting the warehouse deletes the cache too.
For a warehouse at a URL the results are in the bucket (shared by every worker; the
inputs name the URL, never a worker's scratch path), except the extraction's, which
stay with the activation cache on the worker.
The library steps are idempotent on their own as well (a complete activation
cache, trained autoencoder or latent table is reused), which is what lets a
run killed half-way continue where it stopped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError


def _quiet_progress_bars() -> None:
    """transformers' weight-loading bars would interleave with the run log, which already
    carries mlsae's own progress lines (tokens/s, ETA)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


_quiet_progress_bars()

GPU_LIMIT = "mlsae-gpu"
"""Global concurrency limit every GPU-bound task takes one slot of (see ensure_gpu_limit)."""


def result_storage(out: str | Path, on_worker: bool = False) -> Any:
    """Where the persisted task results (the cache) of warehouse `out` live: its directory,
    or for a URL a RemoteFileSystem block over the bucket's prefix, so a step finished on
    one worker is skipped on every other. on_worker: the results of steps whose output
    stays on the worker (the activation cache) stay in its working copy too."""
    from mlsae import warehouse

    where = warehouse.scratch_results_dir(out) if on_worker else warehouse.results_dir(out)
    if isinstance(where, Path):
        return where
    from prefect.settings import PREFECT_API_URL

    return _saved_results_block(where, PREFECT_API_URL.value())


@cache
def _saved_results_block(url: str, api_url: str | None) -> Any:
    """A RemoteFileSystem block over `url`, saved on the server at `api_url` (Prefect takes
    only saved blocks as task result storage) under a name derived from the URL, the same
    on every worker; saved once per process and server."""
    import hashlib

    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem(basepath=url)
    block.save(f"mlsae-results-{hashlib.sha1(url.encode()).hexdigest()[:12]}", overwrite=True)
    return block


@cache
def mlsae_version() -> str:
    try:
        return version("mlsae")
    except PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


@dataclass
class LibraryVersion(CachePolicy):
    """Cache key component: the installed mlsae version, so upgrading the library
    (not just editing a task) invalidates cached results."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        return f"mlsae=={mlsae_version()}"


CACHE_POLICY = INPUTS + TASK_SOURCE + LibraryVersion()

# Failures worth retrying: the network and the file system blinking. Everything
# else (bad input, a bug, out of memory) fails the same way on a retry.
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EAGAIN,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY}
_TRANSIENT_NAMES = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout",
                    "HTTPError", "RemoteDisconnected", "IncompleteRead", "ChunkedEncodingError",
                    "ProtocolError", "ConnectError", "RemoteProtocolError"}


def is_transient(exc: BaseException | None) -> bool:
    """True for network hiccups and temporary OS errors, anywhere in the cause chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only when the failure is transient."""
    try:
        state.result(raise_on_failure=True)
    except Exception as exc:  # the task's own exception
        return is_transient(exc)
    return False


TRANSIENT_RETRIES: dict[str, Any] = dict(retries=2, retry_delay_seconds=[10, 60],
                                         retry_condition_fn=retry_if_transient)
"""Task options for steps that touch the network (hub models / data sets)."""


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run; a plain logger outside (library use, tests)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mlsae")


def progress_log() -> Callable[[str], None]:
    """A `log=` callback for mlsae.progress.Progress that writes to the run log."""
    return run_logger().info


@contextlib.contextmanager
def gpu_slot(device: str) -> Iterator[None]:
    """Hold one slot of the `mlsae-gpu` limit while GPU work runs, so two runs never
    share one GPU's memory by accident. No-op on CPU."""
    from mlsae.models import resolve_device

    if resolve_device(device).type != "cuda":
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        yield


def ensure_gpu_limit(slots: int | None = None) -> int | None:
    """Make sure the `mlsae-gpu` global concurrency limit exists.

    With `slots`, create it with that many slots or resize it (`mlsae deploy --gpu-slots`).
    Without, create it with one slot per visible GPU if it is missing and leave an existing
    one alone (an operator may have sized it). Returns the slot count, or None when no
    GPU is visible and no size was given.
    """
    import torch

    if slots is None and not torch.cuda.is_available():
        return None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            size = slots or torch.cuda.device_count()
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=size, active=True))
            return size
        if slots is not None and (limit.limit != slots or not limit.active):
            client.update_global_concurrency_limit(
                GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
            return slots
        return limit.limit
