"""Importing the paper's released MLSAE format (mlsae.interop.paper): the fixture saved by the
paper's own module must give that module's outputs (top-k as sets per row, reconstructions
to 1e-5), checked also against a dense float64 reference written here from the raw tensors;
the standardize flag is honoured; -tfm checkpoints (tensors under a prefix) read the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsae.interop import InteropError
from mlsae.interop.imports import ImportRequest, plan_import
from mlsae.interop.paper import read_paper_sae, write_paper_sae
from mlsae.interop.weights import Weights, from_mlsae, to_mlsae
from mlsae.sae import MLSAE, SAEConfig

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "paper-mlsae"
SAE_DIR = FIXTURE / "mlsae-x8-k8"
pytestmark = pytest.mark.skipif(not SAE_DIR.is_dir(), reason=f"fixture missing: {FIXTURE}")

D, N, K, L = 64, 512, 8, 3
MODEL = {"name": "test-model", "n_layers": L, "d_model": D}


def reference_forward(x_ND, enc_MD, dec_DM, b_D, k, standardize):
    """Dense float64 SPEC 2, from the paper's raw tensors (nothing from mlsae)."""
    x = x_ND.double()
    enc, dec, b = enc_MD.double(), dec_DM.double(), b_D.double()
    if standardize:
        mu = x.mean(-1, keepdim=True)
        sd = (x - mu).std(-1, keepdim=True)
        z = (x - mu) / (sd + 1e-5)
    else:
        mu, sd, z = torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1]), x
    pre = (z - b) @ enc.T
    vals, idx = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    return acts, (acts @ dec.T + b) * sd + mu


def dense(acts_NK, idx_NK, n):
    return torch.zeros(acts_NK.shape[0], n, dtype=torch.float64).scatter(
        1, idx_NK.long(), acts_NK.double())


@pytest.fixture(scope="module")
def expected():
    raw = load_file(str(FIXTURE / "expected.safetensors"))
    meta = json.loads((FIXTURE / "expected.json").read_text())["shapes"]
    assert (meta["d"], meta["n_latents"], meta["k"], meta["L"]) == (D, N, K, L)
    return {"x": raw["inputs_LBPD"].reshape(-1, D), "recons": raw["recons_LBPD"].reshape(-1, D),
            "idx": raw["topk_indices_LBPK"].reshape(-1, K),
            "vals": raw["topk_values_LBPK"].reshape(-1, K)}


def import_fixture(directory=SAE_DIR) -> MLSAE:
    return plan_import(ImportRequest(source=str(directory), model="test-model"),
                       model_info=MODEL).sae


def assert_topk_sets_equal(idx_a, vals_a, idx_b, vals_b, atol=1e-5):
    for row in range(idx_a.shape[0]):
        a = dict(zip(idx_a[row].tolist(), vals_a[row].tolist(), strict=True))
        b = dict(zip(idx_b[row].tolist(), vals_b[row].tolist(), strict=True))
        assert set(a) == set(b), f"row {row}: top-k sets differ: {sorted(a)} vs {sorted(b)}"
        for j in a:
            assert abs(a[j] - b[j]) <= atol, f"row {row}, latent {j}: {a[j]} vs {b[j]}"


def test_fixture_import_gives_the_paper_modules_outputs(expected):
    sae = import_fixture()
    assert (sae.cfg.d_model, sae.cfg.n_latents, sae.cfg.k, sae.cfg.standardize) == (D, N, K, True)
    assert sae.cfg.layers == list(range(L))
    with torch.no_grad():
        out = sae(expected["x"])
    assert_topk_sets_equal(out.top_idx_NK, out.top_acts_NK, expected["idx"], expected["vals"])
    err = (out.x_hat_ND - expected["recons"]).abs().max().item()
    assert err <= 1e-5, f"reconstructions differ by {err}"


def test_fixture_outputs_match_a_dense_float64_reference(expected):
    raw = load_file(str(SAE_DIR / "model.safetensors"))
    acts, recons = reference_forward(expected["x"], raw["encoder.weight"], raw["decoder.weight"],
                                     raw["pre_encoder_bias"], K, True)
    assert (dense(expected["vals"], expected["idx"], N) - acts).abs().max() <= 1e-5
    assert (expected["recons"].double() - recons).abs().max() <= 1e-5
    sae = import_fixture()
    with torch.no_grad():
        out = sae.double()(expected["x"].double())
    assert (dense(out.top_acts_NK, out.top_idx_NK, N) - acts).abs().max() <= 1e-12
    assert (out.x_hat_ND - recons).abs().max() <= 1e-12


def test_standardize_flag_is_honoured(tmp_path, expected):
    found = read_paper_sae(SAE_DIR)
    off = tmp_path / "no-standardize"
    write_paper_sae(found.weights._replace(standardize=False), off)
    assert json.loads((off / "config.json").read_text())["standardize"] is False
    sae = import_fixture(off)
    assert sae.cfg.standardize is False
    x = expected["x"] * 0.1
    with torch.no_grad():
        out = sae.double()(x.double())
    acts, recons = reference_forward(x, found.weights.W_enc_MD, found.weights.W_dec_MD.T,
                                     found.weights.b_D, K, False)
    assert (out.x_hat_ND - recons).abs().max() <= 1e-12
    assert (dense(out.top_acts_NK, out.top_idx_NK, N) - acts).abs().max() <= 1e-12
    with torch.no_grad():
        standardized = import_fixture().double()(x.double()).x_hat_ND
    assert (standardized - out.x_hat_ND).abs().max() > 1e-3  # the flag changes the model


def test_tfm_checkpoint_reads_the_autoencoder_under_its_prefix(tmp_path, expected):
    """A -tfm checkpoint: hyperparameters in config.json, tensors under `autoencoder.` beside
    the transformer's; its transformer's shape is checked against --model."""
    raw = load_file(str(SAE_DIR / "model.safetensors"))
    tensors = {f"autoencoder.{k}": v for k, v in raw.items() if k != "last_nonzero"}
    tensors["transformer.model.gpt_neox.embed_in.weight"] = torch.zeros(11, D)
    for block in range(L):
        tensors[f"transformer.model.gpt_neox.layers.{block}.attention.dense.bias"] = torch.zeros(D)
    tfm = tmp_path / "mlsae-x8-k8-tfm"
    tfm.mkdir()
    save_file(tensors, str(tfm / "model.safetensors"))
    (tfm / "config.json").write_text(json.dumps({
        "model_name": "EleutherAI/pythia-70m-deduped", "layers": None, "expansion_factor": 8,
        "k": K, "auxk": 256, "auxk_coef": 1 / 32, "dead_tokens_threshold": 10_000_000,
        "dead_threshold": 1e-3, "lr": 1e-4, "standardize": True, "tuned_lens": False}))
    found = read_paper_sae(tfm)
    assert found.kind == "tfm" and found.transformer == {"d_model": D, "n_layers": L}
    sae = plan_import(ImportRequest(source=str(tfm), model="m"), model_info=MODEL).sae
    with torch.no_grad():
        out = sae(expected["x"])
    assert_topk_sets_equal(out.top_idx_NK, out.top_acts_NK, expected["idx"], expected["vals"])
    assert (out.x_hat_ND - expected["recons"]).abs().max() <= 1e-5
    with pytest.raises(InteropError, match="holds a transformer with d_model 64 and 3 blocks"):
        plan_import(ImportRequest(source=str(tfm), model="m"),
                    model_info={**MODEL, "n_layers": 6})
    config = json.loads((tfm / "config.json").read_text())
    (tfm / "config.json").write_text(json.dumps({**config, "tuned_lens": True}))
    with pytest.raises(InteropError, match="tuned-lens basis"):
        plan_import(ImportRequest(source=str(tfm), model="m"), model_info=MODEL)


def test_paper_format_round_trip_and_the_import_record(tmp_path):
    sae = MLSAE(SAEConfig(d_model=D, n_layers=L, expansion_factor=2, k=4, k_aux=32), seed=5)
    with torch.no_grad():
        sae.b_D.normal_()
    write_paper_sae(from_mlsae(sae), tmp_path / "p")
    plan = plan_import(ImportRequest(source=str(tmp_path / "p"), model="m", sae_id="again"),
                       model_info=MODEL)
    for name in ("W_enc_MD", "W_dec_MD", "b_D"):
        assert torch.equal(getattr(plan.sae, name), getattr(sae, name))
    record = plan.sae.cfg.extra["imported_from"]
    assert record["format"] == "paper" and len(record["sha256"]) == 64
    assert plan.sae.cfg.dead_tokens == 1000 * 2048 * 64  # the reference's steps, in tokens
    assert plan.warnings == []


def test_decoder_columns_not_unit_norm_give_a_warning(tmp_path):
    found = read_paper_sae(SAE_DIR)
    write_paper_sae(found.weights._replace(W_dec_MD=found.weights.W_dec_MD * 1.5), tmp_path / "s")
    plan = plan_import(ImportRequest(source=str(tmp_path / "s"), model="m"), model_info=MODEL)
    assert len(plan.warnings) == 1 and "512 of 512 decoder columns are not unit norm" in \
        plan.warnings[0]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("garbage", "corrupt header"),
    ("no-weights", r"needs the files of the paper.s MLSAE \(config.json \+ model.safetensors\)"),
    ("bad-config", "not valid JSON"),
    ("config-disagrees", "the two files belong to different autoencoders"),
    ("transposed-decoder", r"'decoder.weight' has shape \[512, 64\], expected \[64, 512\]"),
    ("nan", "NaN or infinite"),
])
def test_damaged_sources_are_named_with_the_fix(tmp_path, damage, message):
    bad = tmp_path / "bad"
    shutil.copytree(SAE_DIR, bad)
    for f in bad.iterdir():
        f.chmod(0o644)
    weights, config = bad / "model.safetensors", bad / "config.json"
    raw = load_file(str(weights))
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "bad-config":
        config.write_text("{not json")
    elif damage == "config-disagrees":
        config.write_text(json.dumps({**json.loads(config.read_text()), "n_latents": 1024}))
    elif damage == "transposed-decoder":
        save_file({**raw, "decoder.weight": raw["decoder.weight"].T.contiguous()}, str(weights))
    elif damage == "nan":
        enc = raw["encoder.weight"].clone()
        enc[0, 0] = float("nan")
        save_file({**raw, "encoder.weight": enc}, str(weights))
    with pytest.raises(InteropError, match=message) as err:
        plan_import(ImportRequest(source=str(bad), model="m"), model_info=MODEL)
    assert "Pass" in str(err.value) or "pass" in str(err.value) or "needs" in str(err.value)


def test_dimensions_are_checked_against_the_model():
    with pytest.raises(InteropError, match="64-dimensional vectors but model 'test-model' has "
                                           "d_model = 256"):
        plan_import(ImportRequest(source=str(SAE_DIR), model="m"),
                    model_info={**MODEL, "d_model": 256})
    with pytest.raises(InteropError, match=r"block\(s\) \[5\] but model 'test-model' has 3"):
        plan_import(ImportRequest(source=str(SAE_DIR), model="m", layers=[0, 5]),
                    model_info=MODEL)


def test_weights_and_config_must_agree():
    found = read_paper_sae(SAE_DIR)
    cfg = SAEConfig(d_model=D, n_layers=L, n_latents=N, expansion_factor=8, k=K + 1)
    with pytest.raises(InteropError, match="SAEConfig.k = 9 but the weights have 8"):
        to_mlsae(found.weights, cfg)
    assert isinstance(found.weights, Weights)
