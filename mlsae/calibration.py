"""Calibration with known answers: synthetic latent tables whose share of single-layer
token-latent pairs is set by construction, and the three variance ratios the warehouse's
own views (sql/variance_ratios.sql) compute on them.

The generator: every token fires `latents_per_token` distinct latents; each such
token-latent pair sits at one home layer (uniform over the L layers) and, with probability
`spill`, spills to neighbouring layers: a contiguous window of 1..`spill_width` extra layers
(uniform) that contains the home layer, each extra layer carrying `spill_weight` times the
home activation. So 1 - spill is the expected share of single-layer pairs, and with
spill_width 1 every spilled pair has the per-token variance w / (1 + w)^2 (w = spill_weight).
The tables are written with the warehouse's own writer (mlsae.latents.write_latents: the
same Parquet, part sums and views as a logged MLSAE), so the curve is what the report's
queries measure, not a re-implementation of them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mlsae import warehouse as wh
from mlsae.latents import LatentLogConfig, LogResult, SaeRecord, write_latents

DEFAULT_SPILLS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)
"""Spill probabilities of the report's curve: single-layer shares from 0 to 0.995 (the
ratios grow like 1 / spill, so the high shares get the points)."""


@dataclass(frozen=True)
class SpillTables:
    """One synthetic latent table: its size and how pairs spill over layers."""

    n_layers: int = 6
    n_latents: int = 1024
    latents_per_token: int = 16
    """Distinct latents each token fires (the k of the table)."""
    n_sequences: int = 64
    seq_len: int = 128
    """Tokens per sequence; all logged (no special tokens), so T = n_sequences x seq_len."""
    spill: float = 0.5
    """Probability that a token-latent pair is active at more than its home layer."""
    spill_width: int = 1
    """Most extra layers a spilled pair covers (1 = one adjacent layer; L - 1 = up to all)."""
    spill_weight: float = 0.5
    """A spilled layer's activation relative to the home layer's (0.5 keeps it exact in
    the stored 10-bit mantissa)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_layers < 2:
            raise ValueError(f"n_layers must be >= 2 for pairs to spill, got {self.n_layers}")
        if not 1 <= self.latents_per_token <= self.n_latents:
            raise ValueError(f"latents_per_token must be in 1..n_latents ({self.n_latents}), "
                             f"got {self.latents_per_token}")
        if not 0.0 <= self.spill <= 1.0:
            raise ValueError(f"spill is a probability in [0, 1], got {self.spill}")
        if not 1 <= self.spill_width <= self.n_layers - 1:
            raise ValueError(f"spill_width must be in 1..n_layers - 1 ({self.n_layers - 1}), "
                             f"got {self.spill_width}")
        if not self.spill_weight > 0.0:  # also refuses NaN
            raise ValueError(f"spill_weight must be positive, got {self.spill_weight}")
        if self.n_sequences < 1 or self.seq_len < 1:
            raise ValueError("n_sequences and seq_len must be positive")


class SpillActivations(NamedTuple):
    """One drawn table, pair by pair (K = latents_per_token per token)."""

    latents_STK: np.ndarray
    """The distinct latents each token fires."""
    acts_STKL: np.ndarray
    """Their activation at each layer exactly as stored (the rounded float32); 0 = no row."""
    spilled_STK: np.ndarray
    """True where the pair spilled beyond its home layer."""

    def dense(self, n_latents: int) -> np.ndarray:
        """acts_STLJ (float64), sequence x token x layer x latent: for small tables (tests)."""
        S, T, K, L = self.acts_STKL.shape
        acts_STLJ = np.zeros((S, T, L, n_latents))
        s_idx, t_idx = np.meshgrid(np.arange(S), np.arange(T), indexing="ij")
        for k in range(K):  # latents are distinct within a token: no cell written twice
            acts_STLJ[s_idx, t_idx, :, self.latents_STK[:, :, k]] = self.acts_STKL[:, :, k, :]
        return acts_STLJ


def spill_activations(spec: SpillTables) -> SpillActivations:
    """Draw one synthetic table (deterministic for spec.seed)."""
    rng = np.random.default_rng(spec.seed)
    S, T, L, J, K = (spec.n_sequences, spec.seq_len, spec.n_layers, spec.n_latents,
                     spec.latents_per_token)
    # K distinct latents per token, drawn one token at a time would be slow: the K smallest
    # of J uniform keys per token are a uniform K-subset.
    latents_STK = np.argpartition(rng.random((S, T, J), dtype=np.float32), K - 1,
                                  axis=2)[:, :, :K].astype(np.int32)
    home_STK = rng.integers(0, L, (S, T, K))
    spilled_STK = rng.random((S, T, K)) < spec.spill
    extra_STK = np.where(spilled_STK, rng.integers(1, spec.spill_width + 1, (S, T, K)), 0)
    # The window [lo, lo + extra] holds the home layer and stays inside 0..L-1: lo uniform
    # over the starts that satisfy both.
    lo_min = np.maximum(home_STK - extra_STK, 0)
    lo_max = np.minimum(home_STK, L - 1 - extra_STK)
    lo_STK = lo_min + np.floor(rng.random((S, T, K)) * (lo_max - lo_min + 1)).astype(np.int64)
    value_STK = wh.quantize_values((0.1 + rng.exponential(1.0, (S, T, K))).astype(np.float32))
    spilled_value_STK = wh.quantize_values((value_STK * spec.spill_weight).astype(np.float32))

    layer_L = np.arange(L)
    in_window_STKL = ((layer_L >= lo_STK[..., None])
                      & (layer_L <= (lo_STK + extra_STK)[..., None]))
    acts_STKL = np.where(layer_L == home_STK[..., None], value_STK[..., None],
                         np.where(in_window_STKL, spilled_value_STK[..., None], 0.0))
    return SpillActivations(latents_STK, acts_STKL.astype(np.float32).astype(np.float64),
                            spilled_STK)


def write_spill_tables(warehouse_dir: str | os.PathLike, sae_id: str,
                       spec: SpillTables) -> tuple[SpillActivations, LogResult]:
    """Draw a table and log it as `sae_id` with the warehouse's writer; returns both."""
    drawn = spill_activations(spec)
    S, T = spec.n_sequences, spec.seq_len
    record = SaeRecord(sae_id=sae_id, model="synthetic-spill", d_model=spec.n_latents,
                       n_latents=spec.n_latents, expansion_factor=1, k=spec.latents_per_token,
                       layers=list(range(spec.n_layers)), config=dataclasses.asdict(spec))
    # A token's id names its place (s * T + t), so the encoder can look its latents up.
    tokens_ST = np.arange(S * T, dtype=np.int64).reshape(S, T)
    mask_ST = np.ones((S, T), dtype=bool)

    def encode(tokens_BT: np.ndarray, mask_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = tokens_BT[mask_BT]
        s, t = flat // T, flat % T
        acts_NLK = drawn.acts_STKL[s, t].transpose(0, 2, 1)
        idx_NLK = np.broadcast_to(drawn.latents_STK[s, t][:, None, :], acts_NLK.shape)
        return acts_NLK.astype(np.float32), idx_NLK

    result = write_latents(warehouse_dir, record, zip(tokens_ST, mask_ST, strict=True), encode,
                           lambda i: f" t{i}", {"calibration": dataclasses.asdict(spec)},
                           LatentLogConfig(batch_size=16), progress_log=lambda _: None)
    return drawn, result


class CalibrationPoint(NamedTuple):
    spill: float
    single_layer_share: float
    """Measured by the views on the table (1 - spill up to sampling)."""
    ref_ratio: float | None
    """The reference's A/B over 2048-token batches (the paper's statistic); None = B is 0."""
    ratio_mass: float
    """Ours, mass-weighted (inf when every pair sits at one layer)."""
    ratio_count: float
    """Ours, count-weighted."""


def calibration_curve(warehouse_dir: str | os.PathLike, spec: SpillTables,
                      spills: Sequence[float] = DEFAULT_SPILLS) -> list[CalibrationPoint]:
    """One synthetic table per spill probability (same spec otherwise, seed varied), each
    logged into `warehouse_dir` (a scratch warehouse: it gets sae_ids spill-00, ...), and
    the three ratios of sql/variance_ratios.sql on them, in the order of `spills`."""
    ids = []
    for i, spill in enumerate(spills):
        sae_id = f"spill-{i:02d}"
        write_spill_tables(warehouse_dir, sae_id,
                           dataclasses.replace(spec, spill=float(spill), seed=spec.seed + i))
        ids.append(sae_id)
    con = wh.connect(warehouse_dir)
    try:
        rows = {r["sae_id"]: r for r in wh.query_dicts(
            con, "SELECT sae_id, single_layer_share, ref_ratio, ratio_mass, ratio_count "
                 "FROM variance_ratios")}
    finally:
        con.close()
    return [CalibrationPoint(float(spill), rows[i]["single_layer_share"], rows[i]["ref_ratio"],
                             rows[i]["ratio_mass"], rows[i]["ratio_count"])
            for spill, i in zip(spills, ids, strict=True)]
