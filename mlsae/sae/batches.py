"""Training examples from the activation cache or a stream, shuffled, with a resumable position.

Examples are (token, layer) rows: every unmasked token of a sequence gives one row
per trained layer (masked special tokens give none). Shuffling is two-level so that
memory stays bounded at any data size:

1. sequences are read in WINDOWS of `window_sequences`: for the cache, windows are
   consecutive slices of a fresh random permutation of all sequences each epoch;
   for a stream, windows are consecutive shards as they arrive (one epoch, unless
   the stream is a re-iterable collection);
2. all rows of a window (every token x every layer) are permuted together.

Everything is a function of (seed, epoch, window), so a `DataPosition`
(epoch, window, offset) is all a checkpoint needs to continue with exactly the
same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mlsae.cache import ActivationCache, ShardArrays


class DataPosition(NamedTuple):
    epoch: int = 0
    window: int = 0
    offset: int = 0
    """Rows of the (permuted) window already consumed."""


class Window(NamedTuple):
    x_ND: Tensor
    """Rows in the storage dtype (float16 for the default cache), unpermuted, CPU."""
    slot_N: Tensor
    """Layer slot (index into the trained layers) of each row, int64."""


class Batch(NamedTuple):
    x_ND: Tensor
    """float32 rows (model basis)."""
    slot_N: Tensor
    position: DataPosition
    """Where the next batch starts."""


def rows_from_arrays(acts_BTLD: np.ndarray, mask_BT: np.ndarray,
                     layer_pos: list[int]) -> Window:
    """Every unmasked token's vectors at the chosen layer positions of the L axis, as rows."""
    mask_BT = np.asarray(mask_BT, dtype=bool)
    acts = np.asarray(acts_BTLD)
    if list(layer_pos) != list(range(acts.shape[2])):
        acts = acts[:, :, layer_pos, :]
    x_TLD = acts[mask_BT]  # [tokens, L, D]
    n_tok, n_lay, d = x_TLD.shape
    x_ND = torch.from_numpy(np.ascontiguousarray(x_TLD).reshape(n_tok * n_lay, d))
    slot_N = torch.arange(n_lay).repeat(n_tok)
    return Window(x_ND, slot_N)


def window_seed(seed: int, epoch: int, window: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, window]).generate_state(1)[0])


class CacheWindows:
    """Windows over an ActivationCache: a fresh permutation of its sequences each epoch."""

    repeatable = True

    def __init__(self, cache: ActivationCache, layer_pos: list[int], window_sequences: int,
                 seed: int):
        self.cache, self.layer_pos, self.seed = cache, layer_pos, seed
        self.window_sequences = max(1, window_sequences)
        sizes = [s.n_sequences for s in cache.manifest.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_sequences = int(self.starts[-1])
        if self.n_sequences == 0:
            raise ValueError(f"the activation cache in {cache.root} holds no sequences: "
                             "extract some first (`mlsae extract`)")

    def n_windows(self) -> int:
        return math.ceil(self.n_sequences / self.window_sequences)

    def windows(self, epoch: int, start: int) -> Iterator[tuple[int, Window]]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)
        for w in range(start, self.n_windows()):
            ids = np.sort(perm[w * self.window_sequences:(w + 1) * self.window_sequences])
            yield w, self._load(ids)

    def _load(self, ids: np.ndarray) -> Window:
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        parts = []
        for s in np.unique(shard_of):
            local = ids[shard_of == s] - self.starts[s]
            arrays = self.cache.shard_arrays(int(s))
            parts.append(rows_from_arrays(arrays.acts_BTLD[local], arrays.mask_BT[local],
                                          self.layer_pos))
        return Window(torch.cat([p.x_ND for p in parts]), torch.cat([p.slot_N for p in parts]))


class StreamWindows:
    """Windows over shards as they arrive (e.g. extract.stream_activations).

    An iterator is read once (one epoch); a re-iterable collection (a list of
    ShardArrays) is read again each epoch. Resuming re-reads and skips the windows
    before the checkpoint's, so the stream must yield the same shards again.
    """

    def __init__(self, source: Iterable[ShardArrays], layer_pos: list[int], window_tokens: int):
        self.source, self.layer_pos, self.window_tokens = source, layer_pos, window_tokens
        self.repeatable = not isinstance(source, Iterator)
        self._used = False

    def windows(self, epoch: int, start: int) -> Iterator[tuple[int, Window]]:
        if not self.repeatable and self._used:
            return
        self._used = True
        pending: list[ShardArrays] = []
        n_seq, w = 0, 0
        for shard in self.source:
            pending.append(shard)
            n_seq += shard.tokens_BT.shape[0]
            if n_seq * shard.tokens_BT.shape[1] >= self.window_tokens:
                if w >= start:
                    yield w, self._load(pending)
                pending, n_seq, w = [], 0, w + 1
        if pending and w >= start:
            yield w, self._load(pending)

    def _load(self, shards: list[ShardArrays]) -> Window:
        parts = [rows_from_arrays(s.acts_BTLD, s.mask_BT, self.layer_pos) for s in shards]
        return Window(torch.cat([p.x_ND for p in parts]), torch.cat([p.slot_N for p in parts]))


class BatchStream:
    """Fixed-size batches of shuffled rows, starting at a DataPosition."""

    def __init__(self, windows: CacheWindows | StreamWindows, batch_rows: int, seed: int,
                 position: DataPosition = DataPosition(), device: torch.device | str = "cpu"):
        self.windows, self.batch_rows, self.seed = windows, batch_rows, seed
        self.device = torch.device(device)
        self.position = DataPosition(*position)
        self._iter: Iterator[tuple[int, Window]] | None = None
        self._rows: Tensor | None = None
        self._slots: Tensor | None = None
        self._perm: Tensor | None = None
        self.exhausted = False

    def _load_next(self) -> bool:
        """Load the next non-empty window with rows left; False when a one-pass stream ends.

        The first call (re)starts at the position's window and offset (resume); later
        calls continue with the following window, wrapping to a new epoch when the
        source is repeatable.
        """
        epoch, window, offset = self.position
        resume_window = None
        if self._iter is None:
            self._iter = self.windows.windows(epoch, window)
            resume_window = window
        empty_epochs = 0
        while True:
            had_rows = False
            for w, win in self._iter:
                n_rows = win.x_ND.shape[0]
                had_rows = had_rows or n_rows > 0
                start = offset if w == resume_window else 0
                if n_rows == 0 or start >= n_rows:
                    continue
                gen = torch.Generator().manual_seed(window_seed(self.seed, epoch, w))
                self._perm = torch.randperm(n_rows, generator=gen)
                self._rows, self._slots = win.x_ND, win.slot_N
                self.position = DataPosition(epoch, w, start)
                return True
            if not self.windows.repeatable:
                return False
            empty_epochs = 0 if had_rows else empty_epochs + 1
            if empty_epochs > 1:
                raise ValueError("the training data has no unmasked tokens: check the source "
                                 "(every token masked, or no sequences)")
            epoch, resume_window = epoch + 1, None
            self._iter = self.windows.windows(epoch, 0)

    def next_batch(self) -> Batch | None:
        """The next batch_rows rows, or None when a one-pass stream has run out."""
        xs, slots = [], []
        need = self.batch_rows
        while need > 0:
            window_done = self._rows is None or self.position.offset >= self._rows.shape[0]
            if window_done and not self._load_next():
                self.exhausted = True
                return None
            lo = self.position.offset
            take = self._perm[lo:lo + need]
            xs.append(self._rows[take])
            slots.append(self._slots[take])
            need -= take.numel()
            self.position = self.position._replace(offset=lo + take.numel())
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        slot = slots[0] if len(slots) == 1 else torch.cat(slots)
        return Batch(x.to(self.device, torch.float32), slot.to(self.device), self.position)
