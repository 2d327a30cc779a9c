"""Text in, fixed-length token sequences out: read, split, tokenize, join, chunk.

Sources: the embedded corpus (`None`/"embedded"), a local .txt / .jsonl /
.parquet file or a directory of them, or a Hugging Face data set name
(streamed with `datasets`). Documents are joined as `doc EOT doc EOT ...` and
cut into `seq_len`-token sequences; the ragged tail is dropped. Everything is
deterministic: the same config and tokenizer give the same sequences.

Splits: a source with its own train/test files (the embedded corpus, a
directory holding `train.*`/`test.*` files or `train/`/`test/` folders, a hub
data set with a test split) uses them; any other source is split by DOCUMENT
with a content hash (about 90/10), so no document is in both splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mlsae.paths import EMBEDDED_CORPUS_DIR, EMBEDDED_CORPUS_NAME

SPLITS = ("train", "test")
SUFFIXES = (".txt", ".jsonl", ".parquet")
TEST_PER_MILLE = 100
"""Hash-split share of the test split, per mille (about 10%)."""
TXT_DOC_CHARS = 16_000
"""A .txt file is cut at blank lines into documents of at most about this many characters."""
TOKENIZE_BATCH_DOCS = 64
HUB_SHUFFLE_BUFFER = 10_000


class DataError(ValueError):
    """Bad data input (missing path, empty corpus, unreachable hub, ...); the message says the fix."""


@dataclass
class DataConfig:
    source: str | None = None
    """None or "embedded": the corpus shipped with mlsae; else a local file/directory
    (.txt, .jsonl, .parquet) or a Hugging Face data set name (streamed; needs network)."""
    split: str = "train"
    """"train" or "test". Held-out analyses and metrics use "test"."""
    seq_len: int = 256
    """Tokens per sequence (256 for the embedded model, 2048 for Pythia). Must not exceed the
    model's maximum positions (checked where the model is known)."""
    text_column: str = "text"
    """Field holding the text in JSONL / Parquet / hub rows."""
    max_sequences: int | None = None
    """Stop after this many sequences (None: the whole split)."""
    shuffle_seed: int | None = 0
    """Seed of the deterministic document shuffle, so a prefix of the sequences mixes the
    corpus's parts. Local sources are read whole to shuffle them; None keeps source order and
    streams them instead. Hub data sets use a streaming shuffle buffer."""
    hub_config: str | None = None
    """Configuration (subset) name of a hub data set, e.g. "wikitext-103-raw-v1"."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2 (e.g. 256), got {self.seq_len!r}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(
                f"max_sequences must be >= 1 or None (the whole split), got {self.max_sequences!r}"
            )
        if not self.text_column:
            raise ValueError("text_column must name the column that holds the text, e.g. 'text'")
        if self.source == "":
            self.source = None


class TokenSequences(NamedTuple):
    tokens_BT: np.ndarray
    """int32 token ids, [n_sequences, seq_len]."""
    doc_ids_BT: np.ndarray
    """int64 index (in read order of the split) of the document each token belongs to;
    the EOT after a document belongs to that document."""


class SequenceChunk(NamedTuple):
    tokens_T: np.ndarray
    doc_ids_T: np.ndarray


# ---------------------------------------------------------------------------
# Reading documents


def is_test_document(text: str) -> bool:
    """The hash split: True for about 10% of documents, decided by content alone."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < TEST_PER_MILLE


def _looks_local(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or text.endswith(SUFFIXES)
            or text.count("/") > 1 or os.sep + os.sep in text)


def _txt_documents(path: Path) -> Iterator[str]:
    """Blank-line-separated blocks packed into documents of up to ~TXT_DOC_CHARS characters."""
    text = path.read_text(encoding="utf-8", errors="replace")
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    current: list[str] = []
    size = 0
    for block in blocks:
        if current and size + len(block) > TXT_DOC_CHARS:
            yield "\n\n".join(current)
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    if current:
        yield "\n\n".join(current)


def _jsonl_documents(path: Path, column: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno} is not valid JSON ({err}); "
                                "JSONL files need one JSON object per line") from err
            if not isinstance(row, dict) or column not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{lineno} has no {column!r} field (its fields: {keys}); "
                                "pass --text-column FIELD naming the field that holds the text "
                                "(DataConfig.text_column)")
            if row[column]:
                yield str(row[column])


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {column!r} (its columns: {pf.schema_arrow.names}); "
                        "pass --text-column COLUMN naming the column that holds the text "
                        "(DataConfig.text_column)")
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _file_documents(path: Path, column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        return _txt_documents(path)
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, column)
    if path.suffix == ".parquet":
        return _parquet_documents(path, column)
    raise DataError(f"unsupported file type {path.name!r}: use .txt, .jsonl or .parquet files")


def _data_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"no .txt, .jsonl or .parquet files under {root}: point --data at a "
                        "directory or file holding text")
    return files


def _split_files(root: Path, split: str) -> list[Path] | None:
    """The files of `split` when the directory ships its own splits, else None."""
    named = [p for p in sorted(root.iterdir()) if p.is_file() and p.suffix in SUFFIXES]
    if any(p.stem in SPLITS for p in named) or any((root / s).is_dir() for s in SPLITS):
        files = [p for p in named if p.stem == split]
        if (root / split).is_dir():
            files += _data_files(root / split)
        if not files:
            raise DataError(f"{root} has split files but none for split {split!r}: add "
                            f"{split}.parquet (or .jsonl/.txt) or a {split}/ directory")
        return files
    return None


def _local_documents(path: Path, cfg: DataConfig) -> Iterator[str]:
    if path.is_dir():
        split_files = _split_files(path, cfg.split)
        if split_files is not None:
            for f in split_files:
                yield from _file_documents(f, cfg.text_column)
            return
        files = _data_files(path)
    else:
        files = [path]
    want_test = cfg.split == "test"
    for f in files:
        for doc in _file_documents(f, cfg.text_column):
            if is_test_document(doc) == want_test:
                yield doc


def _hub_documents(name: str, cfg: DataConfig) -> Iterator[str]:
    """Open the hub data set now (so offline fails at once), stream its rows lazily."""
    from mlsae.models import _hub_reachable, hub_download_command  # as model loading

    fix = (f"On a machine with network run `{hub_download_command(name, 'dataset')}`, copy DIR "
           "here and pass --data DIR (its Parquet/JSONL files), or use --data embedded")
    if not _hub_reachable():
        offline = os.environ.get("HF_HUB_OFFLINE", "")
        why = f"HF_HUB_OFFLINE={offline} is set" if offline else "the hub is not reachable"
        raise DataError(f"cannot stream hub data set {name!r}: {why} (and no local file or "
                        f"directory of that name exists). {fix}")
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"streaming hub data set {name!r} needs the `datasets` package: "
                        "`pip install datasets`, or download it and pass --data DIR") from err
    try:
        ds = datasets.load_dataset(name, cfg.hub_config, split=cfg.split, streaming=True)
        hash_split = False
    except ValueError:
        # No such split (many corpora ship "train" only): hash-split the train split.
        try:
            ds = datasets.load_dataset(name, cfg.hub_config, split="train", streaming=True)
        except Exception as err:
            raise DataError(f"could not open hub data set {name!r}: {err}. {fix}") from err
        hash_split = True
    except Exception as err:
        raise DataError(f"could not open hub data set {name!r}: {err}. {fix}") from err
    if cfg.shuffle_seed is not None:
        ds = ds.shuffle(seed=cfg.shuffle_seed, buffer_size=HUB_SHUFFLE_BUFFER)
    want_test = cfg.split == "test"

    def rows() -> Iterator[str]:
        for row in ds:
            if cfg.text_column not in row:
                raise DataError(f"hub data set {name!r} has no {cfg.text_column!r} column "
                                f"(its columns: {sorted(row)}); pass --text-column COLUMN "
                                "naming the column that holds the text (DataConfig.text_column)")
            text = row[cfg.text_column]
            if text and (not hash_split or is_test_document(text) == want_test):
                yield text

    return rows()


def normalized_source(source: str | None) -> str:
    """"embedded" for the embedded corpus, an absolute path for a local source, else the hub name."""
    if source is None or source == EMBEDDED_CORPUS_NAME:
        return EMBEDDED_CORPUS_NAME
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The documents of `cfg.split`, in their deterministic order (shuffled for local sources)."""
    source = cfg.source
    if source is None or source == EMBEDDED_CORPUS_NAME:
        docs: Iterable[str] = _local_documents(EMBEDDED_CORPUS_DIR, cfg)
    else:
        path = Path(source).expanduser()
        if path.exists():
            docs = _local_documents(path, cfg)
        elif _looks_local(source):
            raise DataError(f"data path {source!r} does not exist: check the path, or use "
                            "--data embedded for the corpus shipped with mlsae")
        else:
            return _hub_documents(source, cfg)
    if cfg.shuffle_seed is None:
        return iter(docs)
    # Local sources are read whole and permuted with a seeded RNG (hub: shuffle buffer).
    docs = list(docs)
    random.Random(cfg.shuffle_seed).shuffle(docs)
    return iter(docs)


class SplitSize(NamedTuple):
    tokens: int
    """Tokens of the split as the sequences are cut from it (one EOT per document)."""
    exact: bool
    """False: estimated from the characters, at the tokens per character of a sample."""

    def sequences(self, seq_len: int) -> int:
        return self.tokens // seq_len


def split_size(cfg: DataConfig, tokenizer, exact_chars: int = 4_000_000,
               sample_docs: int = 200) -> SplitSize | None:
    """How many tokens the split of a local source holds (None for a hub data set, which
    would have to be streamed whole). Counted exactly up to `exact_chars` characters;
    larger splits are estimated from a sample of documents (within ~1% on the embedded
    corpus), so planning stays a matter of seconds."""
    if not (cfg.source is None or cfg.source == EMBEDDED_CORPUS_NAME
            or Path(cfg.source).expanduser().exists()):
        return None
    docs = list(iter_documents(cfg))
    chars = sum(map(len, docs))
    exact = chars <= exact_chars
    counted = docs if exact else docs[:sample_docs]
    ids = tokenizer(counted, add_special_tokens=False, verbose=False)["input_ids"] if counted else []
    tokens = sum(len(one) + 1 for one in ids)
    if not exact:
        tokens = round(tokens * chars / max(1, sum(map(len, counted))))
    return SplitSize(int(tokens), exact)


# ---------------------------------------------------------------------------
# Tokenizing and chunking


def eot_token_id(tokenizer) -> int:
    """The token that ends a document: EOS, else `<|endoftext|>`."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        return eot
    raise DataError("the tokenizer has no EOS / <|endoftext|> token to join documents with: "
                    "set tokenizer.eos_token")


def _batched(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_sequences(cfg: DataConfig, tokenizer) -> Iterator[SequenceChunk]:
    """Yield `seq_len`-token chunks of `doc EOT doc EOT ...`, lazily (stops at max_sequences)."""
    eot = eot_token_id(tokenizer)
    T = cfg.seq_len
    buf_tokens: list[int] = []
    buf_docs: list[int] = []
    n_docs = n_out = 0
    for texts in _batched(iter_documents(cfg), TOKENIZE_BATCH_DOCS):
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            buf_tokens.extend(ids)
            buf_tokens.append(eot)
            buf_docs.extend([n_docs] * (len(ids) + 1))
            n_docs += 1
        n_full = len(buf_tokens) // T
        if n_full:
            toks = np.asarray(buf_tokens[: n_full * T], dtype=np.int32).reshape(n_full, T)
            docs = np.asarray(buf_docs[: n_full * T], dtype=np.int64).reshape(n_full, T)
            del buf_tokens[: n_full * T], buf_docs[: n_full * T]
            for i in range(n_full):
                yield SequenceChunk(toks[i], docs[i])
                n_out += 1
                if cfg.max_sequences is not None and n_out >= cfg.max_sequences:
                    return
    if n_out == 0:
        what = "no documents" if n_docs == 0 else f"only {len(buf_tokens)} tokens"
        raise DataError(
            f"the {cfg.split} split of {cfg.source or EMBEDDED_CORPUS_NAME!r} yields no "
            f"{cfg.seq_len}-token sequence (it has {what}; a source without train/test files "
            "sends ~10% of its documents to test): add text, or lower seq_len"
        )


def load_sequences(cfg: DataConfig, tokenizer) -> TokenSequences:
    """All sequences of the split (up to max_sequences) as arrays."""
    chunks = list(iter_sequences(cfg, tokenizer))
    return TokenSequences(
        tokens_BT=np.stack([c.tokens_T for c in chunks]),
        doc_ids_BT=np.stack([c.doc_ids_T for c in chunks]),
    )


def special_token_mask(tokens_BT, tokenizer) -> np.ndarray:
    """True for tokens that count; False for special tokens (BOS/EOS/PAD/EOT), which are masked."""
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    return ~np.isin(np.asarray(tokens_BT), special)
