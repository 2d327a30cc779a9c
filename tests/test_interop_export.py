"""Exporting to SAELens and sparsify, loaded with the real packages (sae-lens, eai-sparsify:
the `interop` extra): their encode/decode must give our latents and reconstructions; and
the round trips export -> import give the same autoencoder."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mlsae.interop import InteropError
from mlsae.interop.exports import ExportRequest, export_sae
from mlsae.interop.imports import ImportRequest, plan_import
from mlsae.sae import MLSAE, SAEConfig
from mlsae.warehouse import autoencoder_dir

D, L, R, K = 32, 3, 4, 6
MODEL = {"name": "test-model", "n_layers": L, "d_model": D}


def make_sae(warehouse, sae_id, *, standardize=True, layers=None, lens=None, seed=0) -> MLSAE:
    cfg = SAEConfig(d_model=D, n_layers=L, layers=layers, expansion_factor=R, k=K, k_aux=16,
                    standardize=standardize, model="test-model", lens=lens)
    sae = MLSAE(cfg, seed=seed)
    with torch.no_grad():
        sae.b_D.copy_(torch.randn(D, generator=torch.Generator().manual_seed(seed)) * 0.3)
    sae.save_pretrained(autoencoder_dir(warehouse, sae_id) / "sae")
    return sae.eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, D, generator=g) * 3 + torch.randn(D, generator=g)


def ours(sae, x):
    with torch.no_grad():
        out = sae(x)
    dense = torch.zeros(x.shape[0], sae.n_latents).scatter(1, out.top_idx_NK, out.top_acts_NK)
    return dense, out.x_hat_ND


def nonzero_pairs(dense_NM):
    return [{(int(j), round(float(v), 4)) for j, v in zip(row.nonzero().flatten(),
                                                           row[row != 0], strict=True)}
            for row in dense_NM]


@pytest.mark.parametrize("standardize", [True, False])
def test_saelens_loads_the_export_and_computes_our_latents(tmp_path, inputs, standardize):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install "
                                                     "-e '.[interop]')")
    sae = make_sae(tmp_path, "mlsae-a", standardize=standardize)
    result = export_sae(ExportRequest("mlsae-a", "saelens", layer=2, to=str(tmp_path / "sl")),
                        tmp_path)
    assert [p.name for p in result.files] == ["cfg.json", "sae_weights.safetensors"]
    assert result.notes and "same weights serve every layer" in result.notes[0]
    with warnings.catch_warnings():  # it suggests loading the model without processing
        warnings.simplefilter("ignore")
        loaded = sae_lens.SAE.load_from_disk(tmp_path / "sl")
    assert type(loaded).__name__ == "TopKSAE"
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert loaded.cfg.normalize_activations == ("layer_norm" if standardize else "none")
    dense, x_hat = ours(sae, inputs)
    with torch.no_grad():
        acts = loaded.encode(inputs)
        recons = loaded.decode(acts)
        forward = loaded(inputs)
    assert (acts - dense).abs().max() <= 1e-5
    assert (recons - x_hat).abs().max() <= 1e-5
    assert (forward - x_hat).abs().max() <= 1e-5


def test_sparsify_loads_the_export_and_computes_our_latents(tmp_path, inputs):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip "
                                                      "install -e '.[interop]')")
    assert hasattr(sparsify, "SparseCoder"), "the 'sparsify' module is not EleutherAI's"
    sae = make_sae(tmp_path, "plain", standardize=False, layers=[1])
    result = export_sae(ExportRequest("plain", "sparsify", to=str(tmp_path / "sp")), tmp_path)
    assert result.layer == 1 and result.files[0].parent.name == "layers.1"
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "sp" / "layers.1")
    dense, x_hat = ours(sae, inputs)
    with torch.no_grad():
        enc = coder.encode(inputs)
        recons = coder.decode(enc.top_acts, enc.top_indices)
    theirs = torch.zeros_like(dense).scatter(1, enc.top_indices, enc.top_acts)
    assert (theirs - dense).abs().max() <= 1e-5
    assert nonzero_pairs(theirs) == nonzero_pairs(dense)
    assert (recons - x_hat).abs().max() <= 1e-5


def test_sparsify_export_of_a_standardising_sae_needs_the_flag_and_is_exact_on_z(tmp_path,
                                                                                 inputs):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    sae = make_sae(tmp_path, "std")
    request = ExportRequest("std", "sparsify", layer=0, to=str(tmp_path / "sp"))
    with pytest.raises(InteropError, match="cannot be folded into its weights.*"
                                           "--standardized-inputs"):
        export_sae(request, tmp_path)
    assert not (tmp_path / "sp").exists()  # nothing written
    request.standardized_inputs = True
    result = export_sae(request, tmp_path)
    assert any("sparsify cannot standardise" in note for note in result.notes)
    cfg = json.loads(result.files[0].read_text())
    assert cfg["mlsae_standardize"] is True
    coder = sparsify.SparseCoder.load_from_disk(result.files[0].parent)
    mu, sd = inputs.mean(-1, keepdim=True), inputs.std(-1, keepdim=True)
    with torch.no_grad():
        enc = coder.encode((inputs - mu) / (sd + 1e-5))
        recons = coder.decode(enc.top_acts, enc.top_indices) * sd + mu
    dense, x_hat = ours(sae, inputs)
    theirs = torch.zeros_like(dense).scatter(1, enc.top_indices, enc.top_acts)
    assert (theirs - dense).abs().max() <= 1e-5
    assert (recons - x_hat).abs().max() <= 1e-5


@pytest.mark.parametrize("fmt, standardize", [("saelens", True), ("saelens", False),
                                              ("sparsify", False), ("sparsify", True)])
def test_export_then_import_gives_the_same_autoencoder(tmp_path, inputs, fmt, standardize):
    sae = make_sae(tmp_path, "orig", standardize=standardize)
    result = export_sae(ExportRequest("orig", fmt, layer=1, to=str(tmp_path / "x"),
                                      standardized_inputs=True), tmp_path)
    plan = plan_import(ImportRequest(source=str(result.files[0].parent), model="m"),
                       model_info=MODEL)
    assert plan.format == fmt and plan.sae.cfg.layers == [1]
    assert plan.sae.cfg.standardize is standardize
    for name in ("W_enc_MD", "W_dec_MD", "b_D"):
        assert torch.equal(getattr(plan.sae, name), getattr(sae, name))
    dense, x_hat = ours(sae, inputs)
    dense2, x_hat2 = ours(plan.sae, inputs)
    assert torch.equal(dense, dense2) and torch.equal(x_hat, x_hat2)


def test_export_errors_name_the_fix(tmp_path):
    make_sae(tmp_path, "multi")
    make_sae(tmp_path, "lensed", lens="tuned-lens:embedded")
    cases = [
        (ExportRequest("nope", "saelens", layer=0, to=str(tmp_path / "o")),
         "no autoencoder 'nope'.*SELECT sae_id"),
        (ExportRequest("multi", "saelens", to=str(tmp_path / "o")), "pass --layer L"),
        (ExportRequest("multi", "saelens", layer=7, to=str(tmp_path / "o")),
         r"--layer 7: multi was trained on layers \[0, 1, 2\]"),
        (ExportRequest("lensed", "saelens", layer=0, to=str(tmp_path / "o")),
         "tuned-lens basis"),
    ]
    for request, message in cases:
        with pytest.raises(InteropError, match=message):
            export_sae(request, tmp_path)
    assert not (tmp_path / "o").exists()
    with pytest.raises(InteropError, match="--format 'onnx'"):
        ExportRequest("multi", "onnx")


def test_imports_refuse_what_mlsae_cannot_represent(tmp_path):
    from safetensors.torch import load_file, save_file

    make_sae(tmp_path, "orig")
    out = export_sae(ExportRequest("orig", "saelens", layer=0, to=str(tmp_path / "sl")),
                     tmp_path).files
    weights = load_file(str(out[1]))
    save_file({**weights, "b_enc": torch.ones_like(weights["b_enc"])}, str(out[1]))
    with pytest.raises(InteropError, match="b_enc is not zero"):
        plan_import(ImportRequest(source=str(out[0].parent), model="m"), model_info=MODEL)
    cfg = json.loads(out[0].read_text())
    out[0].write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(InteropError, match="only TopK SAEs"):
        plan_import(ImportRequest(source=str(out[0].parent), model="m"), model_info=MODEL)
