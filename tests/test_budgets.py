"""Budgets checked before compute: disk, corpus and held-out split; the corpus count;
`mlsae gc` removes only the caches no unfinished run needs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mlsae import plan as plan_module
from mlsae.plan import InvalidRequest, RunRequest, make_plan


def test_a_cache_larger_than_the_free_space_is_refused_before_anything_is_written(
        monkeypatch, tmp_path):
    out = tmp_path / "wh"
    monkeypatch.setattr(plan_module, "free_bytes", lambda where: 100_000_000)  # 100 MB free
    with pytest.raises(InvalidRequest) as err:
        make_plan(RunRequest(budget={"cache_limit": "100GB"}), out)
    message = str(err.value)
    # both numbers, and the fix
    assert "615.6 MB" in message and "100.0 MB free" in message and "--cache-limit 0" in message
    assert not out.exists()
    # without an explicit limit the default (half the free space) streams instead; the
    # tables and checkpoints still fit
    plan = make_plan(RunRequest(), out)
    assert plan["training_source"] == "stream" and plan["disk"]["cache"] == 0


def test_tables_and_checkpoints_are_counted_too(monkeypatch, tmp_path):
    monkeypatch.setattr(plan_module, "free_bytes", lambda where: 1_000_000)
    with pytest.raises(InvalidRequest, match=r"checkpoints .* but the warehouse's disk has "
                                             r"1\.0 MB free"):
        make_plan(RunRequest(budget={"cache_limit": "0"}), tmp_path / "wh")


def test_a_training_budget_above_the_corpus_says_how_many_epochs():
    plan = make_plan(RunRequest(budget={"train_tokens": 10_000_000, "cache_limit": "100GB"}))
    assert plan["training_source"] == "cache"
    (note,) = plan["notes"]
    assert "~3.8 epochs over the ~2,6" in note and "training tokens of 'embedded'" in note
    # a cache holds the split once; epochs reread it
    assert plan["cache_bytes"] < 2_700_000 * 6 * 256 * 2
    # a stream reads the text once: that budget cannot be reached
    with pytest.raises(InvalidRequest, match="exceeds the ~2,6.* training tokens of 'embedded'"):
        make_plan(RunRequest(budget={"train_tokens": 10_000_000, "cache_limit": "0"}))


def test_a_held_out_budget_above_the_split_is_refused_and_a_presets_is_cut():
    with pytest.raises(InvalidRequest, match=r"--eval-tokens 1,000,000 exceeds the held-out "
                                             r"split of 'embedded' \(~335,166 tokens\)"):
        make_plan(RunRequest(budget={"eval_tokens": 1_000_000}))
    plan = make_plan(RunRequest(preset="paper", budget={"seq_len": 1024,
                                                        "train_tokens": 1_000_000}))
    assert plan["eval_tokens"] == 335_166 // 1024 * 1024
    assert any("held-out tokens cut from the preset's 10,000,000" in n for n in plan["notes"])


def test_split_size_estimate_is_close_to_the_exact_count():
    from transformers import AutoTokenizer

    from mlsae.data import DataConfig, split_size
    from mlsae.paths import EMBEDDED_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    exact = split_size(DataConfig(split="test"), tokenizer)
    assert exact.exact and exact.tokens == 335_166
    # the training split (9.4M characters) is estimated from 200 documents; its exact
    # count (2,628,572 tokens, tokenizing all of it) takes ~10 s
    estimate = split_size(DataConfig(split="train"), tokenizer)
    assert not estimate.exact and abs(estimate.tokens - 2_628_572) < 0.01 * 2_628_572
    assert split_size(DataConfig(source="some/hub-dataset"), tokenizer) is None


def _warehouse_with_cache(tmp_path):
    from mlsae import warehouse
    from mlsae.data import DataConfig
    from mlsae.extract import ExtractConfig, cache_key, extract_to_cache

    out = tmp_path / "wh"
    warehouse.init_warehouse(out)
    cfg = ExtractConfig(data=DataConfig(split="train", seq_len=32), max_sequences=4,
                        device="cpu")
    path = warehouse.activation_cache_dir(out, cache_key(cfg))
    extract_to_cache(cfg, path, log=lambda line: None)
    return out, path


def test_gc_keeps_caches_an_unfinished_run_needs_and_removes_the_others(tmp_path):
    from flows.cmd_gc import command
    from mlsae import warehouse
    from mlsae.gc import cache_uses, total_cache_bytes

    out, cache = _warehouse_with_cache(tmp_path)
    held = total_cache_bytes(out)
    assert held > 0 and [u.complete for u in cache_uses(out)] == [True]
    # an unfinished training (a checkpoint, no saved autoencoder) resumes from the cache
    run_dir = warehouse.autoencoder_dir(out, "sae-a")
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"x")
    result = CliRunner().invoke(command, ["--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "needed by sae-a" in result.output and cache.exists()
    # finished: the cache goes (dry run first)
    (run_dir / "sae").mkdir()
    (run_dir / "sae" / "config.json").write_text("{}")
    result = CliRunner().invoke(command, ["--out", str(out), "--dry-run"])
    assert "would remove" in result.output and cache.exists()
    result = CliRunner().invoke(command, ["--out", str(out)])
    assert result.exit_code == 0 and "removed 1 cache(s)" in result.output
    assert not cache.exists() and total_cache_bytes(out) == 0
    assert not any(warehouse.trash_dir(out).iterdir())


def test_gc_keeps_a_cache_whose_extraction_is_unfinished(tmp_path):
    from mlsae.cache import MANIFEST
    from mlsae.gc import remove_unneeded_caches

    out, cache = _warehouse_with_cache(tmp_path)
    manifest = cache / MANIFEST
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    removed, kept = remove_unneeded_caches(out)
    assert not removed and kept[0].needed_by == ["extraction not finished"] and cache.exists()


def test_gc_refuses_a_directory_that_is_not_a_warehouse(tmp_path):
    from flows.cmd_gc import command

    result = CliRunner().invoke(command, ["--out", str(tmp_path)])
    assert result.exit_code != 0 and "warehouse" in result.output
