"""Interrupted runs on a real temporary Prefect server (embedded model): a run SIGKILLed
mid-training resumes from its checkpoint (cache or stream) and a Ctrl-C stops at a step
boundary; each rerun ends with the tables of an uninterrupted run. (Apart from
tests/test_flows.py so that pytest-xdist can run the two files on different workers.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_flows_support import table_rows

pytestmark = pytest.mark.timeout(300)


# -- a run killed in the middle of training --------------------------------------------------

# A dictionary big enough that a training step takes a while, and a resume checkpoint
# after every step (4 steps of 4096 tokens).
# Checkpoints every ~0.1 s of training, so the kill lands between two of them.
RESUME = ["-R", "16", "-k", "16", "--train-tokens", "16384", "--eval-tokens", "256",
          "--seq-len", "64", "--no-baselines", "--checkpoint-minutes", "0.002"]
RESUME_PARAMS = dict(expansion_factors=[16], ks=[16], train_tokens=16384, eval_tokens=256,
                     seq_len=64, baselines=False, checkpoint_minutes=0.002)


def _mlsae_run(out: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("mlsae")), "run", *RESUME,
                             *extra, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _checkpoints(out: Path) -> list[Path]:
    root = out / "autoencoders"
    return list(root.rglob("checkpoint.pt")) if root.exists() else []


@pytest.mark.parametrize("source", ["cache", "stream"])
def test_run_killed_mid_training_resumes_and_matches_an_uninterrupted_run(prefect_api, tmp_path,
                                                                          source):
    """SIGKILL mid-training, rerun: the same tables as an uninterrupted run, whether training
    reads the activation cache or streams from the model (--cache-limit 0)."""
    import torch

    from flows.pipeline import pipeline
    from mlsae.plan import nest_fields

    # One thread everywhere, so the killed, resumed and clean runs do the same
    # floating-point work and must agree bit for bit.
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    limit = "10GB" if source == "cache" else "0"
    proc = _mlsae_run(killed_out, env, "--cache-limit", limit)
    deadline = time.monotonic() + 180
    while not _checkpoints(killed_out):
        assert proc.poll() is None, f"run ended before a checkpoint:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no training checkpoint within 180 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # like `kill -9` or a lost machine, mid-training
    proc.wait(timeout=30)
    (checkpoint,) = _checkpoints(killed_out)
    assert not (checkpoint.parent / "sae").exists(), "killed too late: training had finished"
    assert not (killed_out / "latents").exists()

    resumed = _mlsae_run(killed_out, env, "--cache-limit", limit)
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output
    assert "continued from the checkpoint at step" in output, output

    # The uninterrupted run; extraction is deterministic, so it may start from a copy of
    # the activation cache (saves the forward passes, changes nothing).
    clean_out.mkdir()
    if source == "cache":
        shutil.copytree(killed_out / "activations", clean_out / "activations")
    else:
        assert not (killed_out / "activations").exists()  # nothing extracted to disk
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same floating-point work as the subprocesses
    try:
        pipeline(**nest_fields({**RESUME_PARAMS, "cache_limit": limit}), out=str(clean_out))
    finally:
        torch.set_num_threads(threads)
    for query in ("SELECT sae_id, seq_id, pos, layer, latent, value FROM latents ORDER BY ALL",
                  "SELECT * FROM tokens ORDER BY ALL",
                  "SELECT * EXCLUDE (created_at, config) FROM saes ORDER BY ALL",
                  "SELECT * FROM layer_metrics ORDER BY ALL"):
        assert table_rows(killed_out, query) == table_rows(clean_out, query), query
    # Views over equal tables agree up to DuckDB's parallel summation order.
    (killed,), (clean,) = (table_rows(out, "SELECT * EXCLUDE (sae_id) FROM variance_summary")
                           for out in (killed_out, clean_out))
    assert killed == pytest.approx(clean, rel=1e-9)


def test_ctrl_c_stops_at_a_step_boundary_and_the_rerun_continues(prefect_api, tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the run stops within
    seconds after a checkpoint, with one line and no traceback; its own temporary Prefect
    server (in its own session) is shut down cleanly; the rerun continues and ends with the
    same tables as an uninterrupted run."""
    from flows.pipeline import pipeline
    from mlsae.plan import nest_fields

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(OMP_NUM_THREADS="1", PREFECT_HOME=str(tmp_path / "prefect-home"),
               HF_HUB_OFFLINE="1")
    out, clean_out = tmp_path / "interrupted", tmp_path / "clean"
    proc = _mlsae_run(out, env)
    deadline = time.monotonic() + 240
    while not _checkpoints(out):
        assert proc.poll() is None, f"run ended before a checkpoint:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no training checkpoint within 240 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    start = time.monotonic()
    output, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 15, output
    assert proc.returncode not in (0, None), output
    assert "Error: interrupted: run the same command again" in output, output
    assert "Traceback" not in output.split("Ctrl-C: stopping")[-1], output
    (checkpoint,) = _checkpoints(out)
    assert not (checkpoint.parent / "sae").exists(), "stopped too late: training had finished"

    resumed = _mlsae_run(out, {**env, "PREFECT_API_URL": prefect_api})
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output
    assert "continued from the checkpoint at step" in output, output

    clean_out.mkdir()
    shutil.copytree(out / "activations", clean_out / "activations")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline(**nest_fields(RESUME_PARAMS), out=str(clean_out))
    finally:
        torch.set_num_threads(threads)
    for query in ("SELECT sae_id, seq_id, pos, layer, latent, value FROM latents ORDER BY ALL",
                  "SELECT * FROM layer_metrics ORDER BY ALL"):
        assert table_rows(out, query) == table_rows(clean_out, query), query
