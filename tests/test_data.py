"""Data: readers, deterministic tokenization/chunking, document split, special-token mask, bad input."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsae.data import (
    DataConfig,
    DataError,
    is_test_document,
    iter_documents,
    load_sequences,
    special_token_mask,
)
from mlsae.paths import EMBEDDED_CORPUS_DIR, EMBEDDED_MODEL_DIR

TEXT = ("the lord said unto moses and aaron speak to all the congregation of israel "
        "to be or not to be that is the question whether tis nobler in the mind")
WORDS = TEXT.split(" ")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for i in range(n)]


def _write_jsonl(path, docs, column="text"):
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="split must be one of"):
        DataConfig(split="valid")
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        DataConfig(seq_len=1)
    with pytest.raises(ValueError, match="max_sequences must be >= 1"):
        DataConfig(max_sequences=0)


def test_chunking_joins_documents_with_eot_in_order(tmp_path, tokenizer):
    docs = _docs(30)
    src = _write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = DataConfig(source=str(src), seq_len=16, shuffle_seed=None)
    train_docs = list(iter_documents(cfg))
    assert train_docs == [d for d in docs if not is_test_document(d)]
    eot = tokenizer.eos_token_id
    flat: list[int] = []
    doc_of: list[int] = []
    for i, d in enumerate(train_docs):
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        flat += [*ids, eot]
        doc_of += [i] * (len(ids) + 1)
    seqs = load_sequences(cfg, tokenizer)
    n = len(flat) // 16
    assert seqs.tokens_BT.dtype == np.int32 and seqs.tokens_BT.shape == (n, 16)
    assert seqs.tokens_BT.ravel().tolist() == flat[: n * 16]  # ragged tail dropped
    assert seqs.doc_ids_BT.ravel().tolist() == doc_of[: n * 16]
    capped = load_sequences(DataConfig(source=str(src), seq_len=16, shuffle_seed=None,
                                       max_sequences=3), tokenizer)
    assert np.array_equal(capped.tokens_BT, seqs.tokens_BT[:3])


def test_sequences_are_deterministic_and_shuffle_is_seeded(tokenizer):
    cfg = DataConfig(split="test", seq_len=64, max_sequences=20)
    a = load_sequences(cfg, tokenizer)
    b = load_sequences(DataConfig(split="test", seq_len=64, max_sequences=20), tokenizer)
    assert np.array_equal(a.tokens_BT, b.tokens_BT)
    c = load_sequences(DataConfig(split="test", seq_len=64, max_sequences=20, shuffle_seed=1),
                       tokenizer)
    assert not np.array_equal(a.tokens_BT, c.tokens_BT)
    ordered = load_sequences(DataConfig(split="test", seq_len=64, max_sequences=1,
                                        shuffle_seed=None), tokenizer)
    first_doc = pq.read_table(EMBEDDED_CORPUS_DIR / "test.parquet")["text"][0].as_py()
    assert tokenizer.decode(ordered.tokens_BT[0]) == first_doc[: len(tokenizer.decode(
        ordered.tokens_BT[0]))]


def test_hash_split_shares_no_document(tmp_path):
    docs = _docs(400, seed=3)
    src = _write_jsonl(tmp_path / "d.jsonl", docs)
    train = list(iter_documents(DataConfig(source=str(src), split="train")))
    test = list(iter_documents(DataConfig(source=str(src), split="test")))
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(docs)
    assert 0.05 < len(test) / len(docs) < 0.16  # about 10%
    # the split depends on content, not on position: reordering the file keeps it
    src2 = _write_jsonl(tmp_path / "r.jsonl", docs[::-1])
    assert set(iter_documents(DataConfig(source=str(src2), split="test"))) == set(test)


def test_embedded_corpus_splits_are_disjoint():
    train = set(pq.read_table(EMBEDDED_CORPUS_DIR / "train.parquet")["text"].to_pylist())
    test = set(iter_documents(DataConfig(split="test")))
    assert test and train and not train & test


def test_readers_txt_jsonl_parquet_and_directories(tmp_path, tokenizer):
    docs = _docs(60, seed=5)
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("\n\n".join(docs[:20]))  # small: one document
    _write_jsonl(root / "sub" / "b.jsonl", docs[20:40])
    pq.write_table(pa.table({"text": docs[40:]}), root / "c.parquet")
    (root / "notes.md").write_text("ignored")
    everything = [*iter_documents(DataConfig(source=str(root), split="train", shuffle_seed=None)),
                  *iter_documents(DataConfig(source=str(root), split="test", shuffle_seed=None))]
    assert sorted(everything) == sorted(["\n\n".join(docs[:20]), *docs[20:]])
    # a long .txt file is cut at blank lines into several documents
    long_txt = tmp_path / "long.txt"
    long_txt.write_text("\n\n".join(d * 40 for d in docs))
    parts = [*iter_documents(DataConfig(source=str(long_txt), shuffle_seed=None)),
             *iter_documents(DataConfig(source=str(long_txt), split="test", shuffle_seed=None))]
    assert len(parts) > 5 and all(len(p) < 20_000 for p in parts)


def test_directory_with_own_splits_uses_them(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ["train doc one", "train doc two"])
    _write_jsonl(tmp_path / "test.jsonl", ["held out doc"])
    assert list(iter_documents(DataConfig(source=str(tmp_path), split="test"))) == ["held out doc"]
    assert sorted(iter_documents(DataConfig(source=str(tmp_path)))) == ["train doc one",
                                                                        "train doc two"]


def test_special_tokens_are_masked_not_zeroed(tokenizer):
    seqs = load_sequences(DataConfig(split="test", seq_len=256, max_sequences=8), tokenizer)
    mask_BT = special_token_mask(seqs.tokens_BT, tokenizer)
    eot = tokenizer.eos_token_id
    assert mask_BT.dtype == bool and mask_BT.shape == seqs.tokens_BT.shape
    assert (seqs.tokens_BT == eot).any()  # the test needs EOTs present
    assert np.array_equal(~mask_BT, seqs.tokens_BT == eot)


# --- bad input ---------------------------------------------------------------


def test_unknown_local_path(tmp_path, tokenizer):
    for source in (str(tmp_path / "nope" / "data.jsonl"), "./missing-dir", "corpus.parquet"):
        with pytest.raises(DataError, match="does not exist.*--data embedded"):
            load_sequences(DataConfig(source=source), tokenizer)


@pytest.mark.parametrize("offline", ["1", ""])
def test_unreachable_hub_dataset_fails_fast(monkeypatch, tokenizer, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.perf_counter()
    with pytest.raises(DataError, match="hub data set 'someone/corpus'.*--data DIR"):
        load_sequences(DataConfig(source="someone/corpus"), tokenizer)
    assert time.perf_counter() - start < 10


def test_empty_corpus(tmp_path, tokenizer):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no .txt, .jsonl or .parquet files"):
        load_sequences(DataConfig(source=str(empty_dir)), tokenizer)
    empty_file = tmp_path / "empty.jsonl"
    empty_file.write_text("")
    with pytest.raises(DataError, match="yields no 256-token sequence .*no documents"):
        load_sequences(DataConfig(source=str(empty_file)), tokenizer)
    short = _write_jsonl(tmp_path / "short.jsonl", ["just a few words"] * 3)
    with pytest.raises(DataError, match="only .* tokens.*lower seq_len"):
        load_sequences(DataConfig(source=str(short)), tokenizer)


def test_missing_text_column_names_the_option(tmp_path, tokenizer):
    src = _write_jsonl(tmp_path / "d.jsonl", ["a b c"], column="body")
    with pytest.raises(DataError, match=r"no 'text' field \(its fields: \['body', 'id'\]\).*"
                                        r"--text-column"):
        load_sequences(DataConfig(source=str(src)), tokenizer)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(its columns: \['body'\]\).*"
                                        r"--text-column"):
        load_sequences(DataConfig(source=str(tmp_path / "d.parquet")), tokenizer)
    assert load_sequences(DataConfig(source=str(src), text_column="body", seq_len=2),
                          tokenizer).tokens_BT.shape[1] == 2
