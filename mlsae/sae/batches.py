"""Training examples from the activation cache or a stream, shuffled, with a resumable position.

Examples are (token, layer) rows: every unmasked token of a sequence gives one row
per trained layer (masked special tokens give none). Shuffling is two-level so that
memory stays bounded at any data size:

1. sequences are read in WINDOWS: for the cache, consecutive slices of
   `window_sequences` of a fresh random permutation of all sequences each epoch (the
   cache order when shuffling is off); for a stream, sequences as they arrive (one epoch,
   unless the stream is a re-iterable collection);
2. all rows of a window (every token x every layer) are permuted together, with the
   seed of the SAE (`RowSampler`; not at all when shuffling is off).

One window serves every SAE trained in the same pass (mlsae.sae.train_many): it holds
the vectors of the layers any of them needs, and each SAE gathers its own rows from it
through its own permutation. SAEs that share batch_tokens consume the same tokens of
the window per step, whatever their number of layers, so they stay in lock-step.
Everything is a function of (seed, epoch, window), so a `DataPosition`
(epoch, window, offset) is all a checkpoint needs to continue with exactly the
same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mlsae.cache import ActivationCache, ShardArrays


class DataPosition(NamedTuple):
    epoch: int = 0
    window: int = 0
    offset: int = 0
    """Rows of the (permuted) window already consumed (tokens, in the shared WindowCursor)."""


class Window(NamedTuple):
    acts_ULD: Tensor
    """Every token's (U = sequences x T, masked ones included) vectors at the window's layers,
    storage dtype (float16 for the default cache), CPU."""
    tok_N: Tensor
    """Indices into U of the unmasked tokens, in order (int64)."""

    @property
    def n_tokens(self) -> int:
        return self.tok_N.shape[0]


class Piece(NamedTuple):
    """Tokens lo..hi (in the window's unmasked-token order) of window `window` of `epoch`."""
    epoch: int
    window: int
    data: Window
    lo: int
    hi: int


def window_from_arrays(parts: Iterable[tuple[np.ndarray, np.ndarray]],
                       layer_pos: list[int] | None = None) -> Window:
    """One Window from (acts [b, T, L, D], mask [b, T]) parts, keeping the L positions
    `layer_pos` (None: all)."""
    accs, toks, base = [], [], 0
    for acts, mask in parts:
        acts = np.asarray(acts)
        if layer_pos is not None and list(layer_pos) != list(range(acts.shape[2])):
            acts = acts[:, :, layer_pos, :]
        if not acts.flags.writeable or not acts.flags.c_contiguous:
            acts = np.array(acts, order="C")  # memory-mapped shards: read into RAM
        b, t, n_lay, d = acts.shape
        accs.append(torch.from_numpy(acts.reshape(b * t, n_lay, d)))
        toks.append(torch.from_numpy(np.flatnonzero(np.asarray(mask, dtype=bool))) + base)
        base += b * t
    if not accs:
        raise ValueError("a window needs at least one part")
    if len(accs) == 1:
        return Window(accs[0], toks[0])
    return Window(torch.cat(accs), torch.cat(toks))


def rows_from_arrays(acts_BTLD: np.ndarray, mask_BT: np.ndarray,
                     layer_pos: list[int]) -> tuple[Tensor, Tensor]:
    """Every unmasked token's vectors at the chosen layer positions, as (rows, layer slots)."""
    win = window_from_arrays([(acts_BTLD, mask_BT)], layer_pos)
    n_lay = win.acts_ULD.shape[1]
    x = win.acts_ULD[win.tok_N].reshape(-1, win.acts_ULD.shape[2])
    return x, torch.arange(n_lay).repeat(win.n_tokens)


def window_seed(seed: int, epoch: int, window: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, window]).generate_state(1)[0])


class CacheWindows:
    """Windows over an ActivationCache: a fresh permutation of its sequences each epoch
    (seeded with `seed`; the cache's own order with shuffle=False). `layer_pos`: the
    positions of the cache's L axis to load (None: all)."""

    repeatable = True

    def __init__(self, cache: ActivationCache, layer_pos: list[int] | None, window_sequences: int,
                 seed: int, shuffle: bool = True):
        self.cache, self.layer_pos, self.seed, self.shuffle = cache, layer_pos, seed, shuffle
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
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)
        else:
            perm = np.arange(self.n_sequences)
        for w in range(start, self.n_windows()):
            ids = np.sort(perm[w * self.window_sequences:(w + 1) * self.window_sequences])
            yield w, self._load(ids)

    def _load(self, ids: np.ndarray) -> Window:
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        parts = []
        for s in np.unique(shard_of):
            local = ids[shard_of == s] - self.starts[s]
            arrays = self.cache.shard_arrays(int(s))
            parts.append((arrays.acts_BTLD[local], arrays.mask_BT[local]))
        return window_from_arrays(parts, self.layer_pos)


class StreamWindows:
    """Windows over shards as they arrive (e.g. extract.stream_activations), whole shards
    until a window holds at least `window_tokens` tokens.

    An iterator is read once (one epoch); a re-iterable collection (a list of
    ShardArrays) is read again each epoch. Resuming re-reads and skips the windows
    before the checkpoint's, so the stream must yield the same shards again (an
    mlsae.extract.ActivationStream restarts without that: see SequenceWindows).
    """

    def __init__(self, source: Iterable[ShardArrays], layer_pos: list[int] | None,
                 window_tokens: int):
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
        return window_from_arrays([(s.acts_BTLD, s.mask_BT) for s in shards], self.layer_pos)


class SequenceWindows:
    """Windows of `window_sequences` consecutive sequences of a restartable stream (one pass).

    `stream` is an mlsae.extract.ActivationStream (anything with
    `shards(start, chunk_sequences, progress=False)`): window w is sequences
    w * window_sequences onwards, and starting at window w runs the model on nothing before.
    """

    repeatable = False

    def __init__(self, stream: Any, layer_pos: list[int] | None, window_sequences: int):
        self.stream, self.layer_pos = stream, layer_pos
        self.window_sequences = max(1, window_sequences)

    def windows(self, epoch: int, start: int) -> Iterator[tuple[int, Window]]:
        if epoch > 0:
            return
        chunks = self.stream.shards(start * self.window_sequences, self.window_sequences,
                                    progress=False)
        for w, shard in enumerate(chunks, start):
            yield w, window_from_arrays([(shard.acts_BTLD, shard.mask_BT)], self.layer_pos)


Windows = CacheWindows | StreamWindows | SequenceWindows


class WindowCursor:
    """Walks the windows of a source in order (epoch after epoch when it is repeatable),
    handing out `n` tokens at a time as Pieces; shared by every SAE of a pass.

    position: (epoch, window, tokens of that window consumed); a window used up exactly is
    reported as the start of the next one, so a restart never loads it again.
    """

    def __init__(self, windows: Windows, position: DataPosition = DataPosition()):
        self.windows = windows
        self.position = DataPosition(*position)
        self._iter: Iterator[tuple[int, Window]] | None = None
        self._win: Window | None = None
        self._off = 0
        self.exhausted = False

    def _advance(self) -> bool:
        epoch, window, offset = self.position
        resume_window = None
        if self._iter is None:
            self._iter = self.windows.windows(epoch, window)
            resume_window = window
        empty_epochs = 0
        while True:
            had_rows = False
            for w, win in self._iter:
                n = win.n_tokens
                had_rows = had_rows or n > 0
                start = offset if w == resume_window else 0
                if n == 0 or start >= n:
                    continue
                self._win, self._off = win, start
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

    def take(self, n: int) -> list[Piece] | None:
        """The next n tokens as pieces of consecutive windows; None when a one-pass source ran out
        (the tokens taken so far are lost, as a partial last batch is)."""
        pieces = []
        while n > 0:
            if self._win is None or self._off >= self._win.n_tokens:
                self._win = None
                if not self._advance():
                    self.exhausted = True
                    return None
            epoch, w, _ = self.position
            take = min(n, self._win.n_tokens - self._off)
            pieces.append(Piece(epoch, w, self._win, self._off, self._off + take))
            self._off += take
            n -= take
            self.position = DataPosition(epoch, w, self._off)
        if self._off >= self._win.n_tokens:  # used up: the next window is where to restart
            self.position = DataPosition(self.position.epoch, self.position.window + 1, 0)
        return pieces


class RowSampler:
    """One SAE's rows of each window: its layers' vectors of every unmasked token, permuted
    with a generator seeded by (seed, epoch, window); in order when shuffle is off.

    layer_pos: the SAE's layers as positions in the window's L axis. Row r of a window is
    (token r // n_layers, layer slot r % n_layers) before permutation.
    """

    def __init__(self, layer_pos: list[int], seed: int, shuffle: bool = True):
        self.layer_pos = torch.tensor(layer_pos, dtype=torch.int64)
        self.n_slots, self.seed, self.shuffle = len(layer_pos), seed, shuffle
        self._perm_key: tuple[int, int] | None = None
        self._perm: Tensor | None = None

    def _rows(self, piece: Piece) -> Tensor:
        lo, hi = piece.lo * self.n_slots, piece.hi * self.n_slots
        if not self.shuffle:
            return torch.arange(lo, hi)
        key = (piece.epoch, piece.window)
        if self._perm_key != key:
            gen = torch.Generator().manual_seed(window_seed(self.seed, *key))
            self._perm = torch.randperm(piece.data.n_tokens * self.n_slots, generator=gen)
            self._perm_key = key
        return self._perm[lo:hi]

    def rows(self, pieces: list[Piece]) -> tuple[Tensor, Tensor]:
        """(rows in the storage dtype, CPU; layer slot of each row)."""
        xs, slots = [], []
        for p in pieces:
            take = self._rows(p)
            tok, slot = take // self.n_slots, take % self.n_slots
            acts = p.data.acts_ULD
            flat = p.data.tok_N[tok] * acts.shape[1] + self.layer_pos[slot]
            xs.append(acts.view(-1, acts.shape[2])[flat])
            slots.append(slot)
        if len(xs) == 1:
            return xs[0], slots[0]
        return torch.cat(xs), torch.cat(slots)
