"""Batched residual-stream extraction: into the on-disk cache (resumable) or as a stream.

Both paths produce the same shards: `shard_sequences` sequences each, block
outputs of the requested layers in the storage dtype, token ids, and the mask
(False on special tokens). Extraction into a directory that already holds part
of the same cache continues after its last complete shard; a complete cache
is returned as is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mlsae.cache import (
    CACHE_DTYPES,
    ActivationCache,
    CacheError,
    CacheManifest,
    CacheWriter,
    ShardArrays,
    ShardInfo,
)
from mlsae.data import DataConfig, iter_sequences, normalized_source, special_token_mask
from mlsae.hooks import capture_residuals, check_layers, check_seq_len, d_model
from mlsae.models import LoadedModel, load_model, resolve_dtype
from mlsae.paths import EMBEDDED_MODEL_NAME
from mlsae.progress import Progress


@dataclass
class ExtractConfig:
    model: str | None = None
    """None/"embedded", a local model directory or a hub id (ignored when a LoadedModel is passed)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Which text, which split, sequence length."""
    layers: list[int] | None = None
    """Block indices to store (None: every block)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    shard_sequences: int = 64
    """Sequences per cache shard: the unit of atomic writing and of resuming."""
    dtype: str = "float16"
    """Storage dtype of the activations: "float16" (default) or "float32"."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ..."""
    max_sequences: int | None = None
    """Stop after this many sequences (None: the whole split, or data.max_sequences)."""
    model_dtype: str = "float32"
    """Dtype to run the model in: "float32", "bfloat16" or "float16" (GPU)."""

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):  # from JSON / Prefect parameters
            self.data = DataConfig(**self.data)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shard_sequences < 1:
            raise ValueError(f"shard_sequences must be >= 1, got {self.shard_sequences}")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} cannot be stored: use one of "
                             f"{sorted(CACHE_DTYPES)} (float16 halves the disk space)")
        resolve_dtype(self.model_dtype)  # raises with the valid names
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1 or None, got {self.max_sequences}")
        if self.layers is not None:
            self.layers = [int(layer) for layer in self.layers]
            if not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers {self.layers} must be distinct block indices >= 0, "
                                 "or None for every block")

    def data_config(self) -> DataConfig:
        """The data config with the tighter of the two sequence limits."""
        limits = [m for m in (self.max_sequences, self.data.max_sequences) if m is not None]
        return replace(self.data, max_sequences=min(limits) if limits else None)


def _data_identity(cfg: ExtractConfig) -> dict:
    """The DataConfig as stored in the manifest: the source normalised ("embedded", abs path)."""
    return {**asdict(cfg.data), "source": normalized_source(cfg.data.source)}


def cache_key(cfg: ExtractConfig) -> str:
    """A readable directory name for the cache of `cfg`: model-split-hash of what shapes the numbers."""
    model = str(cfg.model or EMBEDDED_MODEL_NAME)
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    identity = {**{k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "device")},
                "model": model, "data": _data_identity(cfg)}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name)
    return f"{slug}-{cfg.data.split}-{digest}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _prepare(cfg: ExtractConfig, loaded: LoadedModel | None) -> tuple[LoadedModel, list[int]]:
    """Load (or take) the model; validate layers and seq_len against it before any work."""
    if loaded is None:
        loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    layers = check_layers(loaded.model, cfg.layers)
    check_seq_len(loaded.model, cfg.data.seq_len)
    return loaded, layers


def _manifest(cfg: ExtractConfig, loaded: LoadedModel, layers: list[int]) -> CacheManifest:
    model_dtype = next(loaded.model.parameters()).dtype
    return CacheManifest(
        model=loaded.name, layers=layers, d_model=d_model(loaded.model),
        seq_len=cfg.data.seq_len, dtype=cfg.dtype, model_dtype=_dtype_name(model_dtype),
        shard_sequences=cfg.shard_sequences, max_sequences=cfg.data_config().max_sequences,
        data=_data_identity(cfg),
    )


def _batches(cfg: ExtractConfig, loaded: LoadedModel, layers: list[int], start: int,
             stream: ActivationStream | None = None
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens [b, T], acts [b, T, L, D] storage dtype) of forward batches of sequences.

    Batches are aligned on multiples of batch_size counted from sequence 0, whatever `start`
    (the first batch begins at the multiple at or below it): every path (cache, stream,
    restart) runs the same batches and so gets the same numbers. Skipped sequences are
    tokenized, never run. On CUDA the result goes to pinned host memory asynchronously; it
    is read one batch later, so the copy overlaps the next forward pass (on CPU, at once).
    """
    data = cfg.data_config()
    store = {"float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    sequences = iter_sequences(data, loaded.tokenizer)
    first = start - start % cfg.batch_size
    next(itertools.islice(sequences, first, first), None)
    cuda = next(loaded.model.parameters()).device.type == "cuda"
    pending = None

    def finish(item):
        tokens_bT, host, finite, event = item
        if event is not None:
            event.synchronize()
        if not bool(finite):
            raise CacheError(f"activations overflow {cfg.dtype} (inf/nan in layers "
                             f"{layers}): extract with dtype float32")
        return tokens_bT, host.numpy()

    while True:
        chunks = list(itertools.islice(sequences, cfg.batch_size))
        if not chunks:
            break
        tokens_bT = np.stack([c.tokens_T for c in chunks])
        acts = capture_residuals(loaded.model, torch.from_numpy(tokens_bT).long(), layers)
        acts = acts.to(store)
        finite = torch.isfinite(acts).all()
        event = None
        if cuda:
            host = torch.empty(acts.shape, dtype=store, pin_memory=True)
            host.copy_(acts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = acts
        if stream is not None:
            stream.forward_batches += 1
            stream.sequences_run += len(chunks)
        if not cuda:  # nothing to overlap: hand it over now
            yield finish((tokens_bT, host, finite, event))
            continue
        if pending is not None:
            yield finish(pending)
        pending = (tokens_bT, host, finite, event)
    if pending is not None:
        yield finish(pending)


def _chunks(cfg: ExtractConfig, loaded: LoadedModel, layers: list[int], start: int,
            chunk_sequences: int, progress: Progress | None = None,
            stream: ActivationStream | None = None) -> Iterator[ShardArrays]:
    """Sequences start, start+1, ... as ShardArrays of `chunk_sequences` (the last may be
    shorter), with the special-token mask."""
    data = cfg.data_config()
    limit = data.max_sequences
    skip = start % cfg.batch_size
    shape = (data.seq_len, len(layers), d_model(loaded.model))
    buf_acts = buf_tok = None
    n = 0
    emitted = start

    def emit(acts, toks):
        return ShardArrays(acts, toks, special_token_mask(toks, loaded.tokenizer))

    for tokens_bT, acts_bTLD in _batches(cfg, loaded, layers, start, stream):
        if skip:
            tokens_bT, acts_bTLD, skip = tokens_bT[skip:], acts_bTLD[skip:], 0
        if progress is not None:
            progress.update(tokens_bT.size)
        while len(tokens_bT):
            if buf_acts is None:
                size = chunk_sequences if limit is None else min(chunk_sequences,
                                                                 limit - emitted)
                buf_acts = np.empty((size, *shape), dtype=CACHE_DTYPES[cfg.dtype])
                buf_tok = np.empty((size, shape[0]), dtype=tokens_bT.dtype)
                n = 0
            take = min(len(buf_acts) - n, len(tokens_bT))
            buf_acts[n:n + take] = acts_bTLD[:take]
            buf_tok[n:n + take] = tokens_bT[:take]
            tokens_bT, acts_bTLD, n = tokens_bT[take:], acts_bTLD[take:], n + take
            if n == len(buf_acts):
                emitted += n
                yield emit(buf_acts, buf_tok)
                buf_acts = buf_tok = None
    if buf_acts is not None and n:
        yield emit(buf_acts[:n], buf_tok[:n])


def _iter_shards(cfg: ExtractConfig, loaded: LoadedModel, layers: list[int],
                 skip_shards: int = 0, log: Callable[[str], None] | None = None
                 ) -> Iterator[ShardArrays]:
    data = cfg.data_config()
    skip = skip_shards * cfg.shard_sequences
    total = (data.max_sequences - skip) * data.seq_len if data.max_sequences else None
    progress = Progress("extract", total=total, unit="tokens", log=log)
    yield from _chunks(cfg, loaded, layers, skip, cfg.shard_sequences, progress)
    progress.close()


def extract_to_cache(cfg: ExtractConfig, out_dir: str | Path, *,
                     loaded: LoadedModel | None = None,
                     on_shard: Callable[[ShardInfo], None] | None = None,
                     log: Callable[[str], None] | None = None) -> ActivationCache:
    """Extract block outputs into the cache at `out_dir`, resuming a partial one.

    `on_shard` is called after each shard is committed (progress hooks, tests);
    `log` routes the progress lines (default stderr).
    """
    loaded, layers = _prepare(cfg, loaded)
    writer = CacheWriter(out_dir, _manifest(cfg, loaded, layers))
    if not writer.manifest.complete:
        for shard in _iter_shards(cfg, loaded, layers, writer.next_index, log):
            info = writer.write_shard(shard)
            if on_shard is not None:
                on_shard(info)
        writer.finish()
    return ActivationCache.open(out_dir)


class ActivationStream:
    """Block outputs computed on the fly, restartable at any sequence without replaying the model.

        stream = ActivationStream(ExtractConfig(max_sequences=4096), loaded)
        for shard in stream: ...                       # the shards extract_to_cache would store
        for window in stream.shards(start=1024, chunk_sequences=256, progress=None): ...

    Sequences are numbered from 0 in data order. `shards(start)` tokenizes and drops the
    sequences before `start` and runs the model only from there (from the batch_size multiple
    at or below `start`: forward batches are aligned from sequence 0, so every start gives the
    same numbers). Batches run on the model's device; on CUDA results come back through
    pinned memory. `forward_batches` and `sequences_run` count the model's work (tests,
    logs). Training reads it with mlsae.sae.train_many, which restarts it at the window of
    its checkpoint.
    """

    def __init__(self, cfg: ExtractConfig, loaded: LoadedModel | None = None, *,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.loaded, self.layers = _prepare(cfg, loaded)
        self.d_model = d_model(self.loaded.model)
        self.seq_len = cfg.data.seq_len
        self.log = log
        self.forward_batches = 0
        self.sequences_run = 0

    @property
    def n_sequences(self) -> int | None:
        """Sequences in one pass when max_sequences is set (the data may hold fewer), else None."""
        return self.cfg.data_config().max_sequences

    @property
    def model_name(self) -> str:
        return self.loaded.name

    def data_record(self) -> dict:
        """The DataConfig as stored in a cache manifest (source normalised)."""
        return _data_identity(self.cfg)

    def shards(self, start: int = 0, chunk_sequences: int | None = None,
               progress: bool = True) -> Iterator[ShardArrays]:
        """ShardArrays of `chunk_sequences` sequences (default shard_sequences) from sequence
        `start` on; progress=False reports nothing (the caller has its own progress line)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        chunk = chunk_sequences or self.cfg.shard_sequences
        if not progress:
            return _chunks(self.cfg, self.loaded, self.layers, start, chunk, None, self)

        def run() -> Iterator[ShardArrays]:
            n = self.n_sequences
            total = max(0, n - start) * self.seq_len if n is not None else None
            bar = Progress("extract", total=total, unit="tokens", log=self.log)
            yield from _chunks(self.cfg, self.loaded, self.layers, start, chunk, bar, self)
            bar.close()
        return run()

    def __iter__(self) -> Iterator[ShardArrays]:
        return self.shards()


def stream_activations(cfg: ExtractConfig, loaded: LoadedModel | None = None,
                       log: Callable[[str], None] | None = None) -> Iterator[ShardArrays]:
    """The same shards as extract_to_cache, computed on the fly with nothing on disk."""
    return iter(ActivationStream(cfg, loaded, log=log))
