"""Activation cache and extraction: round trip, resume after a kill, streaming, CLI, bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mlsae.cache import ActivationCache, CacheError
from mlsae.data import DataConfig, load_sequences, special_token_mask
from mlsae.extract import ExtractConfig, extract_to_cache, stream_activations
from mlsae.hooks import capture_residuals, splice_forward
from mlsae.models import load_model

TEXT = "in the beginning god created heaven and earth to be or not that is question"
WORDS = TEXT.split(" ")


def _tiny_tokenizer():
    """A BPE with fewer ids than the tiny models' 97-token vocabulary, and an EOT token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<|endoftext|>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<unk>")


def _save(model, path):
    model.save_pretrained(path)
    tokenizer = _tiny_tokenizer()
    assert len(tokenizer) <= model.config.vocab_size
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def neox_dir(tmp_path, tiny_neox):
    return _save(tiny_neox, tmp_path / "neox")


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "corpus.jsonl"
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for _ in range(120)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def _cfg(model_dir, corpus, **kw) -> ExtractConfig:
    base = dict(model=model_dir, data=DataConfig(source=corpus, seq_len=16), layers=[0, 2],
                batch_size=3, shard_sequences=8, max_sequences=30, device="cpu")
    return ExtractConfig(**{**base, **kw})


def _files(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_cache_round_trip_equals_in_memory_activations(tmp_path, neox_dir, corpus):
    cfg = _cfg(neox_dir, corpus)
    cache = extract_to_cache(cfg, tmp_path / "cache")
    m = cache.manifest
    assert (len(cache), cache.n_shards, m.layers, m.d_model, m.seq_len, m.dtype) == (
        30, 4, [0, 2], 32, 16, "float16")
    assert [s.n_sequences for s in m.shards] == [8, 8, 8, 6] and m.complete
    shards = list(cache.iter_shards())
    assert isinstance(shards[0].acts_BTLD, np.memmap)  # memory-mapped, not loaded
    acts_BTLD = np.concatenate([s.acts_BTLD for s in shards])
    tokens_BT = np.concatenate([s.tokens_BT for s in shards])
    mask_BT = np.concatenate([s.mask_BT for s in shards])
    assert acts_BTLD.dtype == np.float16 and acts_BTLD.shape == (30, 16, 2, 32)

    loaded = load_model(neox_dir, device="cpu")
    seqs = load_sequences(DataConfig(source=corpus, seq_len=16, max_sequences=30),
                          loaded.tokenizer)
    assert np.array_equal(tokens_BT, seqs.tokens_BT)
    assert np.array_equal(mask_BT, special_token_mask(seqs.tokens_BT, loaded.tokenizer))
    assert (~mask_BT).any() and mask_BT.sum() == m.n_tokens  # EOTs masked, and counted out
    expected_BTLD = capture_residuals(loaded.model, torch.from_numpy(seqs.tokens_BT).long(),
                                      [0, 2]).half().numpy()
    np.testing.assert_allclose(acts_BTLD.astype(np.float32), expected_BTLD.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    # special tokens keep their real activations (masked, not zeroed)
    assert np.abs(acts_BTLD[~mask_BT]).sum() > 0

    # the stream yields the very same shards, with nothing on disk
    streamed = list(stream_activations(cfg, loaded=loaded))
    assert len(streamed) == 4
    for a, b in zip(streamed, shards, strict=True):
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x, y)


class _Killed(Exception):
    pass


def test_killed_and_resumed_extraction_is_byte_identical(tmp_path, neox_dir, corpus):
    cfg = _cfg(neox_dir, corpus)
    whole = tmp_path / "whole"
    extract_to_cache(cfg, whole)

    resumed = tmp_path / "resumed"

    def kill_after_shard_1(info):
        if info.index == 1:
            raise _Killed

    with pytest.raises(_Killed):
        extract_to_cache(cfg, resumed, on_shard=kill_after_shard_1)
    with pytest.raises(CacheError, match="unfinished .*rerun the same extraction"):
        ActivationCache.open(resumed)
    partial = ActivationCache.open(resumed, allow_partial=True)
    assert partial.n_shards == 2 and len(partial) == 16
    # what a kill in the middle of writing shard 2 leaves behind: a torn file, a temp file
    (resumed / "shard-00002.acts.npy").write_bytes(b"\x93NUMPY torn")
    (resumed / ".shard-00002.tokens.npy.tmp-999").write_bytes(b"partial")
    (resumed / ".manifest.json.tmp-999").write_bytes(b"{")

    written = []
    extract_to_cache(cfg, resumed, on_shard=lambda info: written.append(info.index))
    assert written == [2, 3]  # continued where it stopped, nothing redone
    assert _files(resumed) == _files(whole)

    # rerunning a complete cache is a no-op
    before = {p.name: p.stat().st_mtime_ns for p in resumed.iterdir()}
    extract_to_cache(cfg, resumed, on_shard=lambda info: written.append(info.index))
    assert written == [2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in resumed.iterdir()} == before


def test_different_config_in_same_directory_is_refused(tmp_path, neox_dir, corpus):
    extract_to_cache(_cfg(neox_dir, corpus, max_sequences=8), tmp_path / "c")
    with pytest.raises(CacheError, match=r"different configuration \(layers: cache has \[0, 2\], "
                                         r"asked for \[1\]\).*another output directory"):
        extract_to_cache(_cfg(neox_dir, corpus, max_sequences=8, layers=[1]), tmp_path / "c")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty and holds no manifest.json"):
        extract_to_cache(_cfg(neox_dir, corpus, max_sequences=8), other)
    with pytest.raises(CacheError, match="not an activation cache"):
        ActivationCache.open(other)
    # a kill during the very first manifest write leaves only a temp file: not in the way
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".manifest.json.tmp-999").write_bytes(b"{")
    assert len(extract_to_cache(_cfg(neox_dir, corpus, max_sequences=8), killed)) == 8
    assert sorted(p.name for p in killed.iterdir())[0] == "manifest.json"


def test_same_source_spelled_differently_is_the_same_cache(tmp_path, neox_dir, corpus,
                                                          monkeypatch):
    first = extract_to_cache(_cfg(neox_dir, corpus, max_sequences=8), tmp_path / "c")
    assert first.manifest.data["source"] == corpus  # stored as an absolute path
    monkeypatch.chdir(tmp_path)
    relative = DataConfig(source="./corpus.jsonl", seq_len=16)
    again = extract_to_cache(_cfg(neox_dir, corpus, max_sequences=8, data=relative), "c")
    assert again.manifest == first.manifest


def test_bad_layer_and_seq_len_fail_before_any_work(tmp_path, neox_dir, corpus):
    with pytest.raises(ValueError, match=r"layer 3 is out of range.*valid layers are 0\.\.2"):
        extract_to_cache(_cfg(neox_dir, corpus, layers=[0, 3]), tmp_path / "a")
    data = DataConfig(source=corpus, seq_len=128)
    with pytest.raises(ValueError, match="seq_len 128 is above this model's maximum of 64"):
        extract_to_cache(_cfg(neox_dir, corpus, data=data), tmp_path / "b")
    with pytest.raises(ValueError, match="seq_len 128 .*maximum of 64"):
        stream_activations(_cfg(neox_dir, corpus, data=data))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="dtype 'int8' cannot be stored"):
        _cfg(neox_dir, corpus, dtype="int8")


def test_gpt2_bf16_all_layers(tmp_path, tiny_gpt2, corpus):
    cfg = _cfg(_save(tiny_gpt2, tmp_path / "gpt2"), corpus, layers=None, model_dtype="bfloat16",
               max_sequences=10)
    cache = extract_to_cache(cfg, tmp_path / "c")
    assert cache.manifest.layers == [0, 1, 2] and cache.manifest.model_dtype == "bfloat16"
    acts_BTLD = cache.shard_arrays(0).acts_BTLD
    assert acts_BTLD.shape == (8, 16, 3, 32) and np.isfinite(acts_BTLD).all()


def test_cli_extract(tmp_path, neox_dir, corpus):
    from click.testing import CliRunner

    from flows.cmd_extract import command

    args = ["--model", neox_dir, "--data", corpus, "--seq-len", "16", "--layers", "0,1",
            "--max-sequences", "12", "--shard-sequences", "5", "--device", "cpu",
            "--out", str(tmp_path / "wh")]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    assert "12 sequences" in result.output and "3 shards" in result.output
    (cache_dir,) = (tmp_path / "wh" / "activations").iterdir()
    assert ActivationCache.open(cache_dir).manifest.layers == [0, 1]
    bad = CliRunner().invoke(command, [*args[:-2], "--layers", "0,9", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "valid layers are 0..2" in bad.output


def test_embedded_model_extraction_matches_transformers():
    """The shipped model end to end: real text, all 6 blocks, masked EOTs, exact splice."""
    loaded = load_model(None, device="cpu")
    # 6 sequences: the 5th holds a document boundary (an EOT) in the default order
    cfg = ExtractConfig(data=DataConfig(split="test", max_sequences=6), batch_size=3,
                        shard_sequences=6, device="cpu")
    (shard,) = list(stream_activations(cfg, loaded=loaded))
    model = loaded.model
    L = model.config.num_hidden_layers
    assert shard.acts_BTLD.shape == (6, 256, L, model.config.hidden_size)
    ids_BT = torch.from_numpy(shard.tokens_BT).long()
    with torch.inference_mode():
        out = model(input_ids=ids_BT, output_hidden_states=True)
    acts_BTLD = torch.from_numpy(shard.acts_BTLD.astype(np.float32))
    for layer in range(L - 1):
        torch.testing.assert_close(acts_BTLD[:, :, layer], out.hidden_states[layer + 1],
                                   rtol=2e-3, atol=2e-2)
    # the last block's output is taken BEFORE the final norm
    with torch.inference_mode():
        normed = model.gpt_neox.final_layer_norm(capture_residuals(model, ids_BT, [L - 1])[:, :, 0])
    torch.testing.assert_close(normed, out.hidden_states[L])
    eot = loaded.tokenizer.eos_token_id
    assert np.array_equal(~shard.mask_BT, shard.tokens_BT == eot) and (~shard.mask_BT).any()
    assert torch.equal(splice_forward(model, ids_BT, 2, lambda h: h), out.logits)
