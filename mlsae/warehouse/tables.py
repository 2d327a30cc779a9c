"""The tables: their schemas, Parquet encodings and row builders (what a file holds)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SAE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# sae_id is a plain string column in every table (so Polars reads String everywhere and
# joins need no cast), stored dictionary/RLE-encoded in Parquet: a file's one id repeated
# costs ~0.005 bytes per row (docs/warehouse.md). Files written before this change hold it
# as an Arrow dictionary (Polars: Categorical); every reader here accepts both, and
# upgrade_warehouse() rewrites them.
_SAE_ID = pa.string()


@dataclass(frozen=True)
class TableSpec:
    """One warehouse table: its Arrow schema (as written) and its sort order within a file."""

    name: str
    schema: pa.Schema
    sort_key: tuple[str, ...]
    doc: str


TABLE_SPECS: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "saes",
            pa.schema([
                ("sae_id", pa.string()), ("model", pa.string()), ("n_layers", pa.int16()),
                ("d_model", pa.int32()), ("n_latents", pa.int32()),
                ("expansion_factor", pa.int32()), ("k", pa.int32()),
                ("layers", pa.list_(pa.int16())), ("lens", pa.string()),
                ("train_tokens", pa.int64()), ("config", pa.string()),
                ("created_at", pa.timestamp("us", tz="UTC")),
            ]),
            ("sae_id",),
            "one row per trained autoencoder; layers = model block indices it reads",
        ),
        TableSpec(
            "layer_metrics",
            pa.schema([
                ("sae_id", pa.string()), ("layer", pa.int16()), ("fvu", pa.float64()),
                ("mse", pa.float64()), ("l0", pa.float64()), ("dead_fraction", pa.float64()),
                ("delta_ce", pa.float64()), ("kl", pa.float64()),
            ]),
            ("layer",),
            "evaluation metrics per (sae, model block)",
        ),
        TableSpec(
            "tokens",
            pa.schema([
                ("sae_id", _SAE_ID), ("seq_id", pa.int32()), ("pos", pa.int16()),
                ("token_id", pa.int32()), ("token", pa.string()),
            ]),
            ("seq_id", "pos"),
            "the logged (unmasked) evaluation tokens, scoped by sae_id",
        ),
        TableSpec(
            "latents",
            pa.schema([
                ("sae_id", _SAE_ID), ("seq_id", pa.int32()), ("pos", pa.int16()),
                ("layer", pa.int16()), ("latent", pa.int32()), ("value", pa.float32()),
            ]),
            ("seq_id", "pos", "layer", "latent"),
            "every positive post-ReLU activation; layer = model block index",
        ),
        # The per-part sums of sql/part_sums.sql, written by mlsae.part_sums beside each
        # latents part (same file name): the headline views read these, not `latents`.
        TableSpec(
            "latent_layer_sums",
            pa.schema([
                ("sae_id", _SAE_ID), ("latent", pa.int32()), ("layer", pa.int16()),
                ("count", pa.int64()), ("mass", pa.float64()),
            ]),
            ("latent", "layer"),
            "per (part, latent, layer): active rows and sum of values",
        ),
        TableSpec(
            "latent_var_sums",
            pa.schema([
                ("sae_id", _SAE_ID), ("latent", pa.int32()), ("token_mv", pa.float64()),
                ("prompt_mv", pa.float64()),
            ]),
            ("latent",),
            "per (part, latent): sum_t m_tj V_tj and sum_s m_sj V_sj",
        ),
        TableSpec(
            "seq_sums",
            pa.schema([
                ("sae_id", _SAE_ID), ("seq_id", pa.int32()), ("t", pa.int32()),
                ("a_sum_t", pa.float64()), ("b_sum_t", pa.float64()),
            ]),
            ("seq_id",),
            "per logged sequence: token count and the reference variant's sums",
        ),
    )
}
TABLES = tuple(TABLE_SPECS)
# Tables with one file per logged part, named like the latents part they summarise.
PART_SUM_TABLES = ("latent_layer_sums", "latent_var_sums", "seq_sums")

# Encodings chosen by measurement (docs/warehouse.md): runs of seq_id/pos/layer
# collapse to RLE dictionaries; latent ids are plain + zstd (delta was larger);
# values are byte-stream-split so the exponent bytes compress apart from the
# (mostly zero, see quantize_values) low mantissa bytes.
ROW_GROUP_ROWS = 1 << 20
_WRITE_OPTIONS: dict = dict(
    compression="zstd",
    compression_level=3,
    write_statistics=True,
    write_page_checksum=True,  # lets verify_warehouse(deep=True) find flipped bits
)
_DICTIONARY_COLUMNS = {
    "saes": True, "layer_metrics": True,
    "tokens": ["sae_id", "seq_id", "pos", "token_id", "token"],
    "latents": ["sae_id", "seq_id", "pos", "layer"],
    "latent_layer_sums": ["sae_id", "layer"],
    "latent_var_sums": ["sae_id"],
    "seq_sums": ["sae_id", "t"],
}
_COLUMN_ENCODING = {
    "latents": {"value": "BYTE_STREAM_SPLIT"},
    # sorted latent ids delta-encode well; float64 sums compress ~10% better split
    "latent_layer_sums": {"latent": "DELTA_BINARY_PACKED", "mass": "BYTE_STREAM_SPLIT"},
    "latent_var_sums": {"latent": "DELTA_BINARY_PACKED", "token_mv": "BYTE_STREAM_SPLIT",
                        "prompt_mv": "BYTE_STREAM_SPLIT"},
    "seq_sums": {"a_sum_t": "BYTE_STREAM_SPLIT", "b_sum_t": "BYTE_STREAM_SPLIT"},
}


def check_sae_id(sae_id: str) -> str:
    """sae_id is used in paths and SQL literals, so keep it to a safe alphabet."""
    if not isinstance(sae_id, str) or not SAE_ID_PATTERN.match(sae_id):
        raise ValueError(
            f"invalid sae_id {sae_id!r}: use 1-128 characters from letters, digits, '.', '_' "
            "and '-', starting with a letter or digit")
    return sae_id


def quantize_values(values: np.ndarray, mantissa_bits: int = 10,
                    threshold: float | None = 1e-3) -> np.ndarray:
    """Round float32 activations to `mantissa_bits` explicit mantissa bits (10 = float16
    precision, relative error <= 2**-11) while keeping float32's range.

    The dropped bits become zero bytes that BYTE_STREAM_SPLIT + zstd store almost for
    free (~2 instead of ~3.4 bytes per value). Rounding is monotone; values are then
    nudged so that `v > threshold` is unchanged for every value (L0 and dead-latent
    counts from the table equal the ones computed on the exact activations) and no
    positive value becomes zero. 23 keeps values exact.
    """
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"mantissa_bits must be in 0..23, got {mantissa_bits}")
    exact = np.ascontiguousarray(values, dtype=np.float32)
    if mantissa_bits == 23:
        return exact
    drop = 23 - mantissa_bits
    bits = exact.view(np.uint32)
    rounded = (((bits + np.uint32(1 << (drop - 1))) >> drop) << drop).view(np.float32)
    rounded = np.where(np.isfinite(exact), rounded, exact)  # never round into inf/nan
    rounded = np.where((rounded == 0) & (exact > 0), exact, rounded)
    if threshold is not None:
        thr = np.float32(threshold)
        thr_bits = np.array([thr], np.float32).view(np.uint32)[0]
        down = np.array([(thr_bits >> drop) << drop], np.uint32).view(np.float32)[0]
        up = np.array([((thr_bits >> drop) + 1) << drop], np.uint32).view(np.float32)[0]
        if down > thr:  # cannot happen for truncation, kept for clarity
            down = thr
        rounded = np.where((exact > thr) & (rounded <= thr), up, rounded)
        rounded = np.where((exact <= thr) & (rounded > thr), down, rounded)
    return rounded.astype(np.float32, copy=False)


def sae_id_column(sae_id: str, n: int) -> pa.Array:
    """A string column holding one sae_id n times (stored as a dictionary + one RLE run)."""
    return pa.repeat(pa.scalar(sae_id, pa.string()), n)


def latent_rows(sae_id: str, seq_id, pos, layer, latent, value) -> pa.Table:
    """Arrow table of latent rows in the warehouse schema (no sorting, no quantization).

    Every value must be positive and finite: the views count rows as activations
    (SPEC 5's C_j(l) = #{t : a > 0}) without filtering, so zeros are never stored."""
    value = np.asarray(value, np.float32)
    if value.size and not (np.isfinite(value).all() and value.min() > 0):
        raise ValueError("latent values must be positive and finite: drop zeros (inactive "
                         "latents) before writing, and check the SAE for NaN/inf")
    n = len(value)
    return pa.table({
        "sae_id": sae_id_column(sae_id, n),
        "seq_id": pa.array(np.asarray(seq_id, np.int32)),
        "pos": pa.array(_checked_int(pos, np.int16, "pos")),
        "layer": pa.array(_checked_int(layer, np.int16, "layer")),
        "latent": pa.array(np.asarray(latent, np.int32)),
        "value": pa.array(np.asarray(value, np.float32)),
    }, schema=TABLE_SPECS["latents"].schema)


def token_rows(sae_id: str, seq_id, pos, token_id, token: Iterable[str]) -> pa.Table:
    token = list(token)
    return pa.table({
        "sae_id": sae_id_column(sae_id, len(token)),
        "seq_id": pa.array(np.asarray(seq_id, np.int32)),
        "pos": pa.array(_checked_int(pos, np.int16, "pos")),
        "token_id": pa.array(np.asarray(token_id, np.int32)),
        "token": pa.array(token, pa.string()),
    }, schema=TABLE_SPECS["tokens"].schema)


def _checked_int(values, dtype, name: str) -> np.ndarray:
    values = np.asarray(values)
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ValueError(f"{name} out of range for {np.dtype(dtype).name} "
                         f"[{info.min}, {info.max}]: got {values.min()}..{values.max()}")
    return values.astype(dtype, copy=False)
