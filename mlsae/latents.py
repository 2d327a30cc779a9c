"""Log a trained MLSAE's latent activations on held-out text to the warehouse.

`log_latents` runs the model and the SAE over the test split and writes, for one
sae_id, the `latents` rows (every positive post-ReLU activation of every unmasked
token at every layer), the `tokens` rows and the `saes` row. It streams: memory is
bounded by one part's token ids, one batch and one row group whatever the token count.

Resumable: the sequences are cut into fixed parts; part i is written as
tokens/.../part-i.parquet, latents/.../part-i.parquet, then its per-part sums
(mlsae.part_sums: latent_layer_sums, latent_var_sums, seq_sums), each atomically.
Tokens + latents make a part's rows; its sums are computed from those two files, so a
part whose sums are missing (a kill between files, or a warehouse logged before the
sums existed) gets them on the next run without running the model again
(complete_part_sums does only that). A killed run redoes only the unfinished part
(no duplicate or missing rows); a rerun of a finished run touches nothing. The
settings are pinned in logging/sae_id=<id>/_log.json (beside the lock file, outside
the table directories, which hold only Parquet) so a rerun with different data or a
different SAE fails instead of mixing rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from mlsae import warehouse as wh
from mlsae.part_sums import part_index, write_part_sums
from mlsae.progress import Progress, to_stderr
from mlsae.warehouse.records import (  # noqa: F401  (re-exported: their old home)
    LAYER_METRIC_COLUMNS,
    SaeRecord,
    sae_record_from_config,
    write_layer_metrics,
    write_sae_record,
)

MANIFEST_NAME = "_log.json"
LOCK_NAME = ".lock"


def logging_dir(warehouse_dir: str | os.PathLike, sae_id: str) -> Path:
    """<warehouse>/logging/sae_id=<id>: the logging run's manifest (_log.json) and lock.
    (Warehouses logged before kept them in latents/sae_id=<id>/; upgrade_warehouse and
    the next logging run of that SAE move them here.)"""
    return wh.logging_dir(warehouse_dir, sae_id)

# encode(tokens_BT, mask_BT) -> (top_acts_NLK, top_idx_NLK) for the N unmasked tokens
# of the batch in row-major (b, t) order; L = the SAE's layers; acts post-ReLU.
Encoder = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class LatentLogConfig:
    """How latents are logged (the data and the SAE are arguments of log_latents)."""

    batch_tokens: int = 4096
    """Tokens per forward pass (bounds the [B, T, L, D] activations held at once)."""
    batch_size: int | None = None
    """Sequences per forward pass; None = max(1, batch_tokens // seq_len)."""
    memory_bytes: int | None = None
    """Working memory of one forward pass (mlsae.memory): a batch that would need more is
    cut to fit. None = the device's default budget."""
    sequences_per_part: int | None = None
    """Sequences per part file (the unit of resumption); None = about `part_rows` rows."""
    part_rows: int = 4_000_000
    """Target rows per part file when sequences_per_part is None."""
    value_mantissa_bits: int = 10
    """Mantissa bits kept in stored values: 10 = float16 precision in float32's range
    (~2 bytes/value instead of ~3.4); 23 = exact float32."""
    act_threshold: float = 1e-3
    """The firing threshold (SPEC 2): rounding never moves a value across it."""
    device: str = "auto"
    """Where the model and SAE run ("auto" = CUDA if available)."""

    def __post_init__(self) -> None:
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.sequences_per_part is not None and self.sequences_per_part < 1:
            raise ValueError(f"sequences_per_part must be >= 1 or None, got {self.sequences_per_part}")
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")
        if not 0 <= self.value_mantissa_bits <= 23:
            raise ValueError(f"value_mantissa_bits must be in 0..23 (23 = exact), got "
                             f"{self.value_mantissa_bits}")
        if self.act_threshold < 0:
            raise ValueError(f"act_threshold must be >= 0, got {self.act_threshold}")


class LogResult(NamedTuple):
    sae_id: str
    n_sequences: int
    n_tokens: int
    """Unmasked tokens logged."""
    n_rows: int
    """Rows in the latents table for this sae_id."""
    n_parts: int
    parts_written: int
    """Parts written by this call (0 when the run was already complete)."""
    bytes_latents: int
    seconds: float
    bytes_sums: int = 0
    """Bytes of this sae_id's per-part sum files (the views' materialised sums)."""
    seconds_sums: float = 0.0
    """Seconds this call spent computing and writing per-part sums."""


# --------------------------------------------------------------------------- saes / layer_metrics

# --------------------------------------------------------------------------- the resumable writer

@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_NAME, "a") as lock:  # "a": a no-op rerun changes no mtime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise wh.WarehouseError(
                f"another process is logging into {directory}; wait for it to finish") from e
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _parts_per(n_sequences: int, per_part: int) -> int:
    return (n_sequences + per_part - 1) // per_part


class _TokenText:
    """token id -> text as the tokenizer decodes it alone (so contexts concatenate)."""

    def __init__(self, decode: Callable[[int], str]):
        self.decode, self.cache = decode, {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        out = []
        for i in ids.tolist():
            text = self.cache.get(i)
            if text is None:
                text = self.cache[i] = self.decode(i)
            out.append(text)
        return out


def write_latents(
    warehouse_dir: str | os.PathLike,
    record: SaeRecord,
    sequences: Iterable[tuple[np.ndarray, np.ndarray]],
    encode: Encoder,
    decode_token: Callable[[int], str],
    fingerprint: Mapping[str, Any],
    config: LatentLogConfig | None = None,
    progress_log: Callable[[str], None] | None = None,
    total_tokens: int | None = None,
    on_part: Callable[[int], None] | None = None,
) -> LogResult:
    """The resumable, streaming core of log_latents, independent of torch.

    sequences: (tokens_T, mask_T) per sequence, in order, consumed lazily one part at
      a time (e.g. zip(tokens_BT, mask_BT)); seq_id = its index, pos = the position;
      masked tokens (mask False) get no tokens row and no latents rows.
    encode: a batch of token ids -> top-k activations (see Encoder).
    fingerprint: what the rows depend on (data, SAE, basis): logging an existing sae_id
      with a different one raises WarehouseError.
    total_tokens: unmasked tokens expected, for the progress ETA (None: unknown).
    on_part: called with the part's index once its files are written (e.g. to publish the
      part to a bucket, so a worker killed later loses nothing already finished).
    """
    config = config or LatentLogConfig()
    start = time.perf_counter()
    sae_id = record.sae_id
    stream = iter(sequences)
    first = next(stream, None)
    if first is None:
        raise ValueError("no sequences to log: check the data config (split, max_sequences)")
    seq_len = len(first[0])
    stream = itertools.chain([first], stream)
    if seq_len > np.iinfo(np.int16).max + 1:
        raise ValueError(f"sequences of {seq_len} tokens do not fit the pos column (int16)")
    if max(record.layers) > np.iinfo(np.int16).max:
        raise ValueError("layer indices must fit int16")
    rows_per_seq = max(1, seq_len * record.n_layers * record.k)
    per_part = config.sequences_per_part or max(1, config.part_rows // rows_per_seq)

    latents_dir = wh.partition_dir(warehouse_dir, "latents", sae_id)
    tokens_dir = wh.partition_dir(warehouse_dir, "tokens", sae_id)
    manifest_path = logging_dir(warehouse_dir, sae_id) / MANIFEST_NAME
    settings = {
        "sae_id": sae_id, "fingerprint": dict(fingerprint), "seq_len": int(seq_len),
        "sequences_per_part": int(per_part), "layers": list(record.layers),
        "value_mantissa_bits": config.value_mantissa_bits,
        "act_threshold": config.act_threshold,
    }
    with _exclusive(logging_dir(warehouse_dir, sae_id)):
        _upgrade_sae_unlocked(warehouse_dir, sae_id)
        manifest = _read_manifest(manifest_path)
        if manifest is not None:
            pinned = {k: manifest.get(k) for k in settings}
            if _normalised(pinned) != _normalised(settings):
                raise wh.WarehouseError(
                    f"sae_id {sae_id!r} was already logged with other settings "
                    f"({manifest_path}): {_diff(pinned, settings)}. Use a new sae_id, or delete "
                    f"{manifest_path.parent} and the sae_id={sae_id} directories of latents/, "
                    "tokens/, latent_layer_sums/, latent_var_sums/ and seq_sums/ to log it "
                    "again")
            if manifest.get("complete"):
                t_sums = time.perf_counter()
                if _complete_sums_unlocked(warehouse_dir, sae_id):
                    wh.write_setup_script(warehouse_dir)
                return LogResult(sae_id, manifest["n_sequences"], manifest["n_tokens"],
                                 manifest["n_rows"], manifest["n_parts"], 0,
                                 manifest["bytes_latents"], time.perf_counter() - start,
                                 _sums_bytes(warehouse_dir, sae_id),
                                 time.perf_counter() - t_sums)
        else:
            _write_manifest(manifest_path, {**settings, "complete": False})
        for directory in (latents_dir, tokens_dir, *(
                wh.partition_dir(warehouse_dir, t, sae_id) for t in wh.PART_SUM_TABLES)):
            wh.remove_stale_temp_files(directory)
        write_sae_record(warehouse_dir, record)

        text = _TokenText(decode_token)
        progress = Progress(f"log latents {sae_id}", total=total_tokens, unit="tokens",
                            log=progress_log)
        written = n_seq = n_tokens = 0
        seconds_sums = 0.0
        for part in itertools.count():
            chunk = list(itertools.islice(stream, per_part))
            if not chunk:
                break
            tokens_BT = np.stack([np.asarray(t) for t, _ in chunk])
            mask_BT = np.stack([np.asarray(m, bool) for _, m in chunk])
            if tokens_BT.shape[1] != seq_len or mask_BT.shape != tokens_BT.shape:
                raise ValueError(f"every sequence must have {seq_len} tokens and a mask of the "
                                 "same length")
            n_seq += len(chunk)
            n_tokens += int(mask_BT.sum())
            latents_path = wh.part_path(warehouse_dir, "latents", sae_id, part)
            tokens_path = wh.part_path(warehouse_dir, "tokens", sae_id, part)
            if latents_path.exists() and tokens_path.exists():
                t_sums = time.perf_counter()
                write_part_sums(warehouse_dir, sae_id, part)  # no-op unless some are missing
                seconds_sums += time.perf_counter() - t_sums
                progress.update(float(mask_BT.sum()), part=f"{part + 1} done")
                continue
            offset = part * per_part
            _write_tokens_part(tokens_path, sae_id, tokens_BT, mask_BT, offset, text)
            _write_latents_part(latents_path, record, tokens_BT, mask_BT, offset, encode,
                                config, progress, f"{part + 1}")
            t_sums = time.perf_counter()
            write_part_sums(warehouse_dir, sae_id, part)
            seconds_sums += time.perf_counter() - t_sums
            written += 1
            if on_part is not None:
                on_part(part)
        progress.close()

        n_rows, n_bytes = 0, 0
        for path in wh.table_files(warehouse_dir, "latents"):
            if path.parent == latents_dir:
                n_rows += _num_rows(path)
                n_bytes += path.stat().st_size
        n_parts = _parts_per(n_seq, per_part)
        _write_manifest(manifest_path, {**settings, "complete": True, "n_sequences": n_seq,
                                        "n_parts": n_parts, "n_tokens": n_tokens,
                                        "n_rows": n_rows, "bytes_latents": n_bytes})
        wh.write_setup_script(warehouse_dir)
    return LogResult(sae_id, n_seq, n_tokens, n_rows, n_parts, written, n_bytes,
                     time.perf_counter() - start, _sums_bytes(warehouse_dir, sae_id),
                     seconds_sums)


def complete_part_sums(warehouse_dir: str | os.PathLike, sae_id: str | None = None) -> int:
    """Compute the per-part sums (mlsae.part_sums) that logged latents parts lack, from the
    parts' files (no model needed): the fix for a warehouse logged before the sums existed,
    or a logging run stopped between a part's files. All SAEs, or one. Returns how many
    parts got sums. Takes each SAE's logging lock, so it never races a logging run."""
    ids = [sae_id] if sae_id else list(wh.iter_partitions(warehouse_dir, "latents"))
    completed = 0
    for one in ids:
        with _exclusive(logging_dir(warehouse_dir, one)):
            _upgrade_sae_unlocked(warehouse_dir, one)
            completed += _complete_sums_unlocked(warehouse_dir, one)
    if completed:
        wh.write_setup_script(warehouse_dir)
    return completed


def upgrade_warehouse(warehouse_dir: str | os.PathLike) -> dict[str, int]:
    """Bring a warehouse written by an older mlsae to the current layout, in place: move
    each SAE's logging manifest and lock out of latents/ (to logging/), delete writers'
    leftover temp files from the table directories, and rewrite files whose sae_id is an
    Arrow dictionary (Polars: Categorical) with a plain string sae_id. mlsae itself reads
    the old layout as it is (connect, `mlsae sql`, analysis_polars); this is for plain
    Polars / duckdb readers. Idempotent; takes each SAE's logging lock. Returns counts."""
    ids = sorted({one for table in wh.TABLES for one in wh.iter_partitions(warehouse_dir, table)})
    counts = {"moved": 0, "rewritten": 0}
    for one in ids:
        with _exclusive(logging_dir(warehouse_dir, one)):
            moved, rewritten = _upgrade_sae_unlocked(warehouse_dir, one)
        counts["moved"] += moved
        counts["rewritten"] += rewritten
    if counts["rewritten"]:
        wh.write_setup_script(warehouse_dir)
    return counts


def _upgrade_sae_unlocked(warehouse_dir: str | os.PathLike, sae_id: str) -> tuple[int, int]:
    """The old layout of one SAE -> the current one (see upgrade_warehouse); returns
    (non-Parquet files moved or deleted from table directories, files rewritten)."""
    moved = 0
    old_dir = wh.partition_dir(warehouse_dir, "latents", sae_id)
    old_manifest = old_dir / MANIFEST_NAME
    if old_manifest.exists():
        new_manifest = logging_dir(warehouse_dir, sae_id) / MANIFEST_NAME
        if new_manifest.exists():
            old_manifest.unlink()
        else:
            os.replace(old_manifest, new_manifest)
        moved += 1
    old_lock = old_dir / LOCK_NAME
    if old_lock.exists():
        old_lock.unlink(missing_ok=True)
        moved += 1
    for table in ("latents", "tokens", *wh.PART_SUM_TABLES):  # the tables the logger writes
        moved += wh.remove_stale_temp_files(wh.partition_dir(warehouse_dir, table, sae_id))
    return moved, wh.rewrite_dictionary_sae_ids(warehouse_dir, sae_id)


def _complete_sums_unlocked(warehouse_dir: str | os.PathLike, sae_id: str) -> int:
    for table in wh.PART_SUM_TABLES:
        wh.remove_stale_temp_files(wh.partition_dir(warehouse_dir, table, sae_id))
    completed = 0
    for path in sorted(wh.partition_dir(warehouse_dir, "latents", sae_id).glob("part-*.parquet")):
        completed += bool(write_part_sums(warehouse_dir, sae_id, part_index(path)))
    return completed


def _sums_bytes(warehouse_dir: str | os.PathLike, sae_id: str) -> int:
    return sum(p.stat().st_size for table in wh.PART_SUM_TABLES
               for p in wh.partition_dir(warehouse_dir, table, sae_id).glob("*.parquet"))


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _diff(old: Mapping, new: Mapping) -> str:
    keys = [k for k in new if json.dumps(old.get(k), default=str) != json.dumps(new[k], default=str)]
    return "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys) or "unknown"


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise wh.WarehouseError(f"{path}: unreadable logging manifest ({e}); delete it and "
                                "the part files beside it to log again") from e


def _write_manifest(path: Path, content: Mapping) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(content, indent=1, sort_keys=True, default=str))
    os.replace(temp, path)


def _write_tokens_part(path: Path, sae_id: str, tokens_BT: np.ndarray, mask_BT: np.ndarray,
                       offset: int, text: _TokenText) -> None:
    b, t = np.nonzero(mask_BT)
    ids = tokens_BT[b, t]
    rows = wh.token_rows(sae_id, b + offset, t, ids, text(ids))
    wh.write_table_atomic("tokens", rows, path)


def _write_latents_part(path: Path, record: SaeRecord, tokens_BT: np.ndarray,
                        mask_BT: np.ndarray, offset: int, encode: Encoder,
                        config: LatentLogConfig, progress: Progress, label: str) -> None:
    layers_L = np.asarray(record.layers, np.int16)
    batch = config.batch_size or max(1, config.batch_tokens // tokens_BT.shape[1])
    buffered: list[pa.Table] = []
    n_buffered = 0
    with wh.AtomicParquetWriter(path, "latents") as writer:
        for b0 in range(0, len(tokens_BT), batch):
            mask = mask_BT[b0:b0 + batch]
            if not mask.any():
                continue
            acts_NLK, idx_NLK = encode(tokens_BT[b0:b0 + batch], mask)
            rows = latent_batch_rows(record.sae_id, offset + b0, mask, layers_L, acts_NLK,
                                     idx_NLK, config)
            buffered.append(rows)
            n_buffered += rows.num_rows
            if n_buffered >= wh.ROW_GROUP_ROWS:  # ~1M-row row groups, bounded memory
                writer.write(pa.concat_tables(buffered))
                buffered, n_buffered = [], 0
            progress.update(float(mask.sum()), part=label, rows=writer.rows + n_buffered)
        if buffered or writer.rows == 0:
            writer.write(pa.concat_tables(buffered) if buffered else
                         wh.TABLE_SPECS["latents"].schema.empty_table())


def latent_batch_rows(sae_id: str, seq_offset: int, mask_BT: np.ndarray, layers_L: np.ndarray,
                      acts_NLK: np.ndarray, idx_NLK: np.ndarray,
                      config: LatentLogConfig) -> pa.Table:
    """Rows for one batch, sorted by (seq_id, pos, layer, latent); non-positive values dropped."""
    acts_NLK = np.asarray(acts_NLK, np.float32)
    idx_NLK = np.asarray(idx_NLK)
    n_tok = int(mask_BT.sum())
    if acts_NLK.shape != idx_NLK.shape or acts_NLK.shape[:2] != (n_tok, len(layers_L)):
        raise ValueError(f"encoder returned {acts_NLK.shape} / {idx_NLK.shape}, expected "
                         f"[{n_tok} unmasked tokens, {len(layers_L)} layers, k]")
    if not np.isfinite(acts_NLK).all():
        raise ValueError("the SAE produced non-finite activations; check the model and SAE dtype")
    order = np.argsort(idx_NLK, axis=-1, kind="stable")
    idx_NLK = np.take_along_axis(idx_NLK, order, -1)
    acts_NLK = np.take_along_axis(acts_NLK, order, -1)
    n, n_layers, k = acts_NLK.shape
    b, t = np.nonzero(mask_BT)  # row-major: the encoder's token order
    keep = (acts_NLK > 0).ravel()
    seq_id = np.repeat((b + seq_offset).astype(np.int32), n_layers * k)[keep]
    pos = np.repeat(t.astype(np.int16), n_layers * k)[keep]
    layer = np.broadcast_to(np.repeat(layers_L, k), (n, n_layers * k)).ravel()[keep]
    values = wh.quantize_values(acts_NLK.ravel()[keep], config.value_mantissa_bits,
                                config.act_threshold)
    return wh.latent_rows(sae_id, seq_id, pos, layer, idx_NLK.ravel()[keep], values)


# --------------------------------------------------------------------------- with a real SAE

def _sae_fingerprint(sae_dir: Path) -> str:
    """A content hash of the saved SAE (weights + config), so a retrained SAE under the
    same sae_id is caught and a copied one is not."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in sae_dir.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _fit_batch(config: LatentLogConfig, model: Any, seq_len: int, n_latents: int, device: Any,
               progress_log: Callable[[str], None] | None) -> LatentLogConfig:
    """The config with its batch cut to the memory budget (mlsae.memory), and logged."""
    from mlsae.memory import default_eval_memory, eval_sizing

    memory = config.memory_bytes or default_eval_memory(device)
    sizing = eval_sizing(model, seq_len, memory, splice=False, n_latents=n_latents)
    wanted = config.batch_size or max(1, config.batch_tokens // seq_len)
    batch = min(wanted, sizing.batch_sequences)
    (progress_log or to_stderr)(
        f"log latents: {batch} sequences of {seq_len} tokens per pass ({sizing.describe()})")
    return dataclasses.replace(config, batch_size=batch)


def encode_tokens(sae: Any, model: Any, layers: Sequence[int], ids_BT: Any, mask_BT: Any,
                  basis: Any = None) -> tuple[Any, Any]:
    """(top_acts [N, L, K] float32, top_idx [N, L, K]) of the N unmasked tokens of ids_BT:
    the block outputs of `layers` (in the SAE's basis when `basis` is given) through the
    SAE's encoder. What the latent tables store, and what the explorer shows a prompt."""
    import torch

    from mlsae.hooks import capture_residuals

    with torch.no_grad():
        x_BTLD = capture_residuals(model, ids_BT, layers)
        x_NLD = x_BTLD[mask_BT.to(x_BTLD.device)]
        n, n_layers, d = x_NLD.shape
        x_ND = x_NLD.reshape(n * n_layers, d)
        if basis is not None:
            layer_N = torch.tensor(list(layers), device=x_ND.device).repeat(n)
            x_ND = basis.to_sae(x_ND, layer_N)
        out = sae.encode(x_ND.to(sae.W_enc_MD.dtype))
    return (out.top_acts_NK.float().reshape(n, n_layers, -1),
            out.top_idx_NK.reshape(n, n_layers, -1))


def log_latents(sae_dir: str | os.PathLike, loaded: Any, data: Any,
                warehouse_dir: str | os.PathLike, sae_id: str, basis: Any = None,
                config: LatentLogConfig | None = None, train_tokens: int | None = None,
                progress_log: Callable[[str], None] | None = None,
                on_part: Callable[[int], None] | None = None) -> LogResult:
    """Log the latents of the SAE saved in `sae_dir` on `data` (a DataConfig, normally
    split="test") run through `loaded` (LoadedModel), into `warehouse_dir` as `sae_id`.

    basis: a ResidualBasis (tuned lens) the SAE was trained in; None = identity.
    on_part: see write_latents.
    Resumable and atomic (see the module docstring); returns a LogResult.
    """
    import torch

    from mlsae.data import iter_sequences, special_token_mask
    from mlsae.models import resolve_device
    from mlsae.sae.model import MLSAE

    config = config or LatentLogConfig()
    sae_dir = Path(sae_dir)
    device = resolve_device(config.device)
    sae = MLSAE.from_pretrained(sae_dir).to(device).eval()
    record = sae_record_from_config(sae_id, sae.cfg, loaded.name, train_tokens)
    model = loaded.model.to(device).eval()
    sequences = ((chunk.tokens_T, special_token_mask(chunk.tokens_T, loaded.tokenizer))
                 for chunk in iter_sequences(data, loaded.tokenizer))
    layers = list(record.layers)
    config = _fit_batch(config, model, data.seq_len, sae.cfg.n_latents, device, progress_log)

    def encode(batch_BT: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = torch.as_tensor(batch_BT, dtype=torch.long, device=device)
        acts, idx = encode_tokens(sae, model, layers, ids, torch.as_tensor(mask), basis)
        return acts.cpu().numpy(), idx.cpu().numpy()

    def decode(token_id: int) -> str:
        return loaded.tokenizer.decode([token_id])

    fingerprint = {
        "data": dataclasses.asdict(data) if dataclasses.is_dataclass(data) else repr(data),
        "model": loaded.name, "sae": _sae_fingerprint(sae_dir),
        "basis": "none" if basis is None else getattr(basis, "name", type(basis).__name__),
    }
    max_seq = getattr(data, "max_sequences", None)
    return write_latents(warehouse_dir, record, sequences, encode, decode, fingerprint, config,
                         progress_log, total_tokens=max_seq * data.seq_len if max_seq else None,
                         on_part=on_part)
