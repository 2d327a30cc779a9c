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


def _iter_shards(cfg: ExtractConfig, loaded: LoadedModel, layers: list[int],
                 skip_shards: int = 0, log: Callable[[str], None] | None = None
                 ) -> Iterator[ShardArrays]:
    data = cfg.data_config()
    store = {"float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    sequences = iter_sequences(data, loaded.tokenizer)
    # Resuming: regenerate (deterministically) and drop the sequences already stored.
    skip = skip_shards * cfg.shard_sequences
    next(itertools.islice(sequences, skip, skip), None)
    total = (data.max_sequences - skip) * data.seq_len if data.max_sequences else None
    progress = Progress("extract", total=total, unit="tokens", log=log)
    while True:
        chunks = list(itertools.islice(sequences, cfg.shard_sequences))
        if not chunks:
            break
        tokens_BT = np.stack([c.tokens_T for c in chunks])
        acts_BTLD = np.empty((*tokens_BT.shape, len(layers), d_model(loaded.model)),
                             dtype=CACHE_DTYPES[cfg.dtype])
        for start in range(0, len(tokens_BT), cfg.batch_size):
            ids_BT = torch.from_numpy(tokens_BT[start:start + cfg.batch_size]).long()
            acts = capture_residuals(loaded.model, ids_BT, layers).to(store)
            if not torch.isfinite(acts).all():
                raise CacheError(f"activations overflow {cfg.dtype} (inf/nan in layers "
                                 f"{layers}): extract with dtype float32")
            acts_BTLD[start:start + len(ids_BT)] = acts.cpu().numpy()
            progress.update(ids_BT.numel())
        yield ShardArrays(acts_BTLD, tokens_BT, special_token_mask(tokens_BT, loaded.tokenizer))
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


def stream_activations(cfg: ExtractConfig, loaded: LoadedModel | None = None,
                       log: Callable[[str], None] | None = None) -> Iterator[ShardArrays]:
    """The same shards as extract_to_cache, computed on the fly with nothing on disk."""
    loaded, layers = _prepare(cfg, loaded)
    return _iter_shards(cfg, loaded, layers, 0, log)
