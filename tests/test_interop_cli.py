"""`mlsae import` and `mlsae export` as a user types them: a paper-format MLSAE for the
embedded model imported, evaluated, logged and analysed (a real flow run, then cached on
the rerun), exported for SAELens; bad input is one clear error and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mlsae.interop.paper import write_paper_sae
from mlsae.interop.weights import from_mlsae
from mlsae.sae import MLSAE, SAEConfig

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "paper-mlsae"
MLSAE_BIN = str(Path(sys.executable).with_name("mlsae"))
SMALL = ["--eval-tokens", "512", "--seq-len", "64"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory) -> Path:
    """An MLSAE for the embedded model (d_model 256, 6 blocks) in the paper's format."""
    sae = MLSAE(SAEConfig(d_model=256, n_layers=6, expansion_factor=2, k=8, k_aux=64), seed=3)
    with torch.no_grad():
        sae.b_D.normal_(generator=torch.Generator().manual_seed(0)).mul_(0.1)
    return write_paper_sae(from_mlsae(sae), tmp_path_factory.mktemp("src") / "mlsae-emb-x2-k8")


def cli(*args: str):
    from flows.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_import_runs_the_analysis_steps_and_export_opens_in_saelens(paper_dir, tmp_path):
    wh = tmp_path / "wh"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([MLSAE_BIN, "import", str(paper_dir), "--model", "embedded", *SMALL,
                            "--out", str(wh)], capture_output=True, text=True, env=env,
                           timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    sae_id = "paper-mlsae-emb-x2-k8"
    assert f"{sae_id} -> warehouse {wh}" in first.stdout
    assert "layer 5: FVU" in first.stdout and "live latents" in first.stdout

    result = cli("sql", "--out", str(wh), "--format", "json",
                 "SELECT s.sae_id, s.n_latents, s.k, s.train_tokens, "
                 "json_extract_string(s.config, '$.extra.imported_from.format') AS fmt, "
                 "(SELECT count(*) FROM layer_metrics m WHERE m.sae_id = s.sae_id) AS n_metrics, "
                 "(SELECT count(*) FROM latents t WHERE t.sae_id = s.sae_id) AS n_latent_rows, "
                 "(SELECT n_live FROM variance_summary v WHERE v.sae_id = s.sae_id) AS n_live "
                 "FROM saes s")
    rows = json.loads(result.output)
    assert len(rows) == 1 and rows[0]["sae_id"] == sae_id and rows[0]["fmt"] == "paper"
    assert (rows[0]["n_latents"], rows[0]["k"], rows[0]["train_tokens"]) == (512, 8, None)
    assert rows[0]["n_metrics"] == 6 and rows[0]["n_latent_rows"] > 0 and rows[0]["n_live"] > 0
    loaded = MLSAE.from_pretrained(wh / "autoencoders" / sae_id / "sae")
    assert loaded.cfg.extra["imported_from"]["source"] == str(paper_dir)

    again = subprocess.run([MLSAE_BIN, "import", str(paper_dir), "--model", "embedded", *SMALL,
                            "--out", str(wh)], capture_output=True, text=True, env=env,
                           timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("Cached(type=COMPLETED)") == 4  # import, log, evaluate, analyse

    exported = cli("export", sae_id, "--format", "saelens", "--layer", "3",
                   "--to", str(tmp_path / "sl"), "--out", str(wh))
    assert exported.exit_code == 0, exported.output
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["d_in"] == 256


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, paper_dir) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "wrong-files").mkdir()
    (root / "wrong-files" / "pytorch_model.bin").write_bytes(b"x")
    corrupt = root / "corrupt"
    shutil.copytree(paper_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return root


def test_bad_input_is_one_clear_error_and_writes_nothing(bad_sources, tmp_path):
    cases = [
        ([str(bad_sources / "wrong-files"), "--model", "embedded"],
         "not an autoencoder this version reads", "config.json + model.safetensors"),
        ([str(bad_sources / "corrupt"), "--model", "embedded"],
         "truncated", "Pass the directory of one of the paper's MLSAEs"),
        ([str(FIXTURE / "mlsae-x8-k8"), "--model", "embedded"],
         "reads 64-dimensional vectors but model 'embedded' has d_model = 256",
         "pass the --model it was trained on"),
        ([str(bad_sources / "no-such-dir/"), "--model", "embedded"], "does not exist",
         "check the path"),
        (["tim-lawson/mlsae-pythia-70m-deduped-x64-k32", "--model", "embedded"],
         "not reachable", "hf download tim-lawson/mlsae-pythia-70m-deduped-x64-k32 --local-dir"),
        ([str(FIXTURE / "mlsae-x8-k8"), "--model", "no/such/model/"], "does not exist",
         "--model embedded"),
    ]
    for args, cause, fix in cases:
        out = tmp_path / "wh"
        result = cli("import", *args, "--out", str(out))
        assert result.exit_code == 1, (args, result.output)
        assert cause in result.output and fix in result.output, result.output
        assert "Traceback" not in result.output
        assert not out.exists(), f"{args}: something was written"


def test_export_of_a_missing_autoencoder_names_the_query(tmp_path):
    from mlsae.warehouse import init_warehouse

    init_warehouse(tmp_path / "wh")
    result = cli("export", "nope", "--format", "sparsify", "--layer", "0", "--to",
                 str(tmp_path / "o"), "--out", str(tmp_path / "wh"))
    assert result.exit_code == 1 and "no autoencoder 'nope'" in result.output
    assert "SELECT sae_id, layers FROM saes" in result.output and not (tmp_path / "o").exists()
