"""Bad input through the real CLI, as a new user types it: a non-zero exit, one message that
names the cause and the fix, no traceback, under 3 s (everything is checked before Prefect
starts), and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlsae.paths import EMBEDDED_MODEL_DIR

MLSAE = str(Path(sys.executable).with_name("mlsae"))


def run_cli(*args: str, cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([MLSAE, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**__import__("os").environ,
                                                  "HF_HUB_OFFLINE": "1"})
    return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    truncated = root / "truncated-model"
    shutil.copytree(EMBEDDED_MODEL_DIR, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "empty").mkdir()
    (root / "empty" / "nothing.txt").write_text("")
    rows = [{"body": f"Document number {i}. " * 40} for i in range(60)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "plain-dir").mkdir()
    return root


CASES = [
    (["run", "--model", "no/such/model/dir/"], "does not exist", "--model embedded"),
    (["run", "--model", "EleutherAI/pythia-70m-deduped"], "not reachable", "hf download"),
    (["run", "-k", "100000"], "-k 100000 > n_latents 1024", "lower k"),
    (["run", "--layers", "0,9"], "layers [9] do not exist", "0..5"),
    (["run", "--layers", "a,b"], "--layers 'a,b'", "comma-separated"),
    (["run", "--train-tokens", "0"], "--train-tokens 0", "must be > 0"),
    (["run", "--eval-tokens", "-1"], "--eval-tokens -1", "must be > 0"),
    (["run", "--lr", "0"], "--lr 0.0", "must be > 0"),
    (["run", "--seq-len", "5000"], "--seq-len 5000 exceeds the model's 1024", "--seq-len 1024"),
    (["report", "--base-k", "0"], "--base-k 0", "must be > 0"),
    (["sweep", "-R", "-2"], "--expansion-factor -2", "must be > 0"),
    (["run", "--preset", "paper", "--seq-len", "4096"], "exceeds the model's", "--seq-len"),
]


@pytest.mark.parametrize("args, cause, fix", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_parameters_fail_fast_with_one_message(bad_inputs, args, cause, fix):
    out = bad_inputs / "wh"
    result, seconds = run_cli(*args, "--out", str(out), cwd=bad_inputs)
    assert result.returncode != 0, result.stdout
    assert cause in result.stderr and fix in result.stderr, result.stderr
    assert "Error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert seconds < 3, seconds
    assert not out.exists()


def test_data_problems_are_named_with_their_fix(bad_inputs):
    out = bad_inputs / "wh"
    result, seconds = run_cli("run", "--data", str(bad_inputs / "empty"), "--out", str(out),
                              cwd=bad_inputs)
    assert result.returncode != 0 and "no documents" in result.stderr, result.stderr
    assert seconds < 3 and not out.exists()
    result, seconds = run_cli("run", "--data", str(bad_inputs / "docs.jsonl"), "--out", str(out),
                              cwd=bad_inputs)
    assert result.returncode != 0 and "--text-column" in result.stderr, result.stderr
    assert "body" in result.stderr  # the fields the file does have
    assert seconds < 3 and not out.exists()
    # The option the message names fixes it (checked by a dry run, which writes nothing).
    result, _ = run_cli("run", "--data", str(bad_inputs / "docs.jsonl"), "--text-column", "body",
                        "--train-tokens", "1024", "--dry-run", "--out", str(out), cwd=bad_inputs)
    assert result.returncode == 0, result.stderr
    assert "Nothing was written" in result.stdout and not out.exists()


def test_truncated_weights_are_named_before_any_compute(bad_inputs):
    out = bad_inputs / "wh"
    result, seconds = run_cli("run", "--model", str(bad_inputs / "truncated-model"), "--out",
                              str(out), cwd=bad_inputs)
    assert result.returncode != 0
    assert "model.safetensors" in result.stderr and "truncated" in result.stderr, result.stderr
    assert "save_pretrained" in result.stderr and "Traceback" not in result.stderr
    assert seconds < 3 and not out.exists()


def test_sql_refuses_a_directory_that_is_not_a_warehouse(bad_inputs):
    result, seconds = run_cli("sql", "--out", str(bad_inputs / "plain-dir"),
                              "SELECT count(*) FROM saes", cwd=bad_inputs)
    assert result.returncode != 0 and "not an mlsae warehouse" in result.stderr, result.stderr
    assert "mlsae run --out" in result.stderr and seconds < 3


@pytest.mark.parametrize("args, env, message", [
    # sql, serve and gc take a bucket URL (tests/test_warehouse_s3.py,
    # tests/test_serve_gc_s3.py), given the store's package: without it, that is named
    (("sql", "SELECT 1"), {"MLSAE_HOME": "gs://bucket/wh"}, "gcsfs"),
    (("gc",), {"MLSAE_HOME": "gs://bucket/wh"}, "gcsfs"),
    (("gc", "--out", "gs://bucket/wh"), {}, "gcsfs"),
    (("serve", "--out", "gs://bucket/wh"), {}, "gcsfs"),
])
def test_a_warehouse_url_without_its_store_is_one_error_and_nothing_is_written(
        tmp_path, args, env, message):
    """A URL whose store cannot be reached is one Error: line naming the fix, not a local
    directory named `gs:` and a command that writes into it."""
    import os

    result = subprocess.run([MLSAE, *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert result.returncode != 0, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
