"""The on-disk activation cache: sharded .npy arrays plus a manifest (docs/activation-cache.md).

    DIR/manifest.json
    DIR/shard-00000.acts.npy     [b, T, L, D]  float16 (the manifest's dtype)
    DIR/shard-00000.tokens.npy   [b, T]        int32
    DIR/shard-00000.mask.npy     [b, T]        bool, True = token counts

A shard exists for readers only once the manifest lists it. Each array is
written to a temporary name and renamed into place, then the manifest is
replaced atomically, so a kill at any moment leaves every listed shard whole;
files of an unlisted shard are leftovers that the next run overwrites.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "mlsae-activation-cache"
VERSION = 1
ARRAYS = ("acts", "tokens", "mask")
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}
"""Storage dtypes (numpy has no bfloat16)."""


class CacheError(ValueError):
    """A cache directory is missing, incomplete or holds a different configuration."""


class ShardArrays(NamedTuple):
    acts_BTLD: np.ndarray
    """Block outputs [b, T, L, D] in the cache dtype (memory-mapped when read from disk)."""
    tokens_BT: np.ndarray
    """int32 token ids [b, T]."""
    mask_BT: np.ndarray
    """bool [b, T]: True for tokens that count, False for special tokens (masked, not zeroed)."""


@dataclass
class ShardInfo:
    index: int
    n_sequences: int
    n_tokens: int
    """Unmasked tokens in the shard."""


@dataclass
class CacheManifest:
    model: str
    """The model name as loaded ("embedded", a resolved local path or a hub id)."""
    layers: list[int]
    """Block indices stored, in the order of the L axis."""
    d_model: int
    seq_len: int
    dtype: str
    """Storage dtype of the activations ("float16" by default)."""
    model_dtype: str
    """Dtype the model ran in (changes the numbers, so part of the identity)."""
    shard_sequences: int
    """Sequences per shard (the last one may hold fewer)."""
    max_sequences: int | None
    data: dict
    """The DataConfig as a dict."""
    n_sequences: int = 0
    """Sequences in completed shards."""
    n_tokens: int = 0
    """Unmasked tokens in completed shards."""
    shards: list[ShardInfo] = field(default_factory=list)
    """Completed shards only, in order."""
    complete: bool = False
    """True once the whole data set (up to max_sequences) is in the cache."""
    format: str = FORMAT
    version: int = VERSION

    IDENTITY = ("model", "layers", "d_model", "seq_len", "dtype", "model_dtype",
                "shard_sequences", "max_sequences", "data", "format", "version")

    def identity(self) -> dict:
        return {key: getattr(self, key) for key in self.IDENTITY}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CacheManifest:
        raw = json.loads(text)
        raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
        return cls(**raw)


def shard_path(root: Path, index: int, array: str) -> Path:
    return Path(root) / f"shard-{index:05d}.{array}.npy"


def _atomic_write(path: Path, write) -> None:
    """Write through `write(file)` to a temporary name, fsync, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_temp(name: str) -> bool:
    """A temporary file of _atomic_write that a kill left behind."""
    return name.startswith(".") and ".tmp-" in name and name[1:].startswith(("shard-", MANIFEST))


def _write_manifest(root: Path, manifest: CacheManifest) -> None:
    _atomic_write(root / MANIFEST, lambda f: f.write(manifest.to_json().encode()))


def _diff(a: dict, b: dict) -> str:
    keys = [k for k in a if a[k] != b.get(k)]
    return "; ".join(f"{k}: cache has {a[k]!r}, asked for {b.get(k)!r}" for k in keys)


class CacheWriter:
    """Creates a cache directory or reopens one with the same configuration to resume it."""

    def __init__(self, root: str | Path, manifest: CacheManifest):
        self.root = Path(root)
        path = self.root / MANIFEST
        if path.exists():
            existing = CacheManifest.from_json(path.read_text())
            if existing.identity() != manifest.identity():
                raise CacheError(
                    f"{self.root} already holds an activation cache with a different "
                    f"configuration ({_diff(existing.identity(), manifest.identity())}): "
                    "choose another output directory, or delete this one to start over"
                )
            self.manifest = existing
        else:
            if self.root.exists() and any(not _is_temp(p.name) for p in self.root.iterdir()):
                raise CacheError(f"{self.root} is not empty and holds no {MANIFEST}: "
                                 "choose an empty or new directory for the activation cache")
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = manifest
            _write_manifest(self.root, manifest)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete temporary files and shards the manifest does not list (a killed run's)."""
        listed = {shard_path(self.root, s.index, a).name
                  for s in self.manifest.shards for a in ARRAYS}
        for p in self.root.iterdir():
            if _is_temp(p.name) or (p.name.startswith("shard-") and p.name not in listed):
                p.unlink()

    @property
    def next_index(self) -> int:
        return len(self.manifest.shards)

    def write_shard(self, shard: ShardArrays) -> ShardInfo:
        """Write the next shard atomically, then list it in the manifest."""
        index = self.next_index
        b = shard.tokens_BT.shape[0]
        if shard.acts_BTLD.shape[:2] != shard.tokens_BT.shape or shard.mask_BT.shape != (
                shard.tokens_BT.shape):
            raise ValueError("shard arrays disagree on [b, T]")
        for name, arr in zip(ARRAYS, shard, strict=True):
            _atomic_write(shard_path(self.root, index, name),
                          lambda f, arr=arr: np.save(f, np.ascontiguousarray(arr)))
        info = ShardInfo(index=index, n_sequences=b, n_tokens=int(shard.mask_BT.sum()))
        m = self.manifest
        m.shards.append(info)
        m.n_sequences += info.n_sequences
        m.n_tokens += info.n_tokens
        _write_manifest(self.root, m)
        return info

    def finish(self) -> None:
        self.manifest.complete = True
        _write_manifest(self.root, self.manifest)


class ActivationCache:
    """Read side: memory-mapped shards of a cache directory."""

    def __init__(self, root: Path, manifest: CacheManifest):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, *, allow_partial: bool = False) -> ActivationCache:
        """Open a cache; an unfinished one only with allow_partial=True (its completed shards)."""
        root = Path(path)
        if not (root / MANIFEST).exists():
            raise CacheError(f"{root} is not an activation cache (no {MANIFEST}): run "
                             "`mlsae extract` to create one, or check the path")
        manifest = CacheManifest.from_json((root / MANIFEST).read_text())
        if not manifest.complete and not allow_partial:
            raise CacheError(f"the activation cache in {root} is unfinished "
                             f"({manifest.n_sequences} sequences so far): rerun the same "
                             "extraction to resume it")
        return cls(root, manifest)

    @property
    def layers(self) -> list[int]:
        return self.manifest.layers

    @property
    def n_tokens(self) -> int:
        """Unmasked tokens."""
        return self.manifest.n_tokens

    def __len__(self) -> int:
        return self.manifest.n_sequences

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    def shard_arrays(self, i: int) -> ShardArrays:
        if not 0 <= i < self.n_shards:
            raise IndexError(f"shard {i} out of range: the cache has {self.n_shards} shards")
        return ShardArrays(*(np.load(shard_path(self.root, i, a), mmap_mode="r") for a in ARRAYS))

    def iter_shards(self) -> Iterator[ShardArrays]:
        for i in range(self.n_shards):
            yield self.shard_arrays(i)
