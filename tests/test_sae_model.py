"""MLSAE model: init, decoder constraint, persistence."""

from __future__ import annotations

import json

import pytest
import torch

from mlsae.sae import MLSAE, SAEConfig
from mlsae.sae.step import DeadCounter, make_optimizer, train_step


def _cfg(**kw):
    return SAEConfig(**{**dict(d_model=16, n_layers=3, n_latents=64, k=4, k_aux=8), **kw})


def test_init_decoder_is_normalized_encoder_transpose():
    sae = MLSAE(_cfg(), seed=3)
    W_enc, W_dec = sae.W_enc_MD.detach(), sae.W_dec_MD.detach()
    torch.testing.assert_close(W_dec, W_enc / W_enc.norm(dim=1, keepdim=True))
    assert W_enc.abs().max() <= 1 / 16 ** 0.5  # nn.Linear's default bound 1/sqrt(d)
    assert torch.equal(MLSAE(_cfg(), seed=3).W_enc_MD, sae.W_enc_MD)
    assert not torch.equal(MLSAE(_cfg(), seed=4).W_enc_MD, sae.W_enc_MD)


def test_gradient_projection_removes_the_parallel_component():
    sae = MLSAE(_cfg(), dtype=torch.float64)
    g = torch.randn_like(sae.W_dec_MD)
    sae.W_dec_MD.grad = g.clone()
    sae.remove_parallel_grad()
    W = sae.W_dec_MD.detach()
    g_new = sae.W_dec_MD.grad
    assert (g_new * W).sum(1).abs().max() < 1e-12  # no component along any column
    parallel = (g * W).sum(1, keepdim=True) * W
    torch.testing.assert_close(g_new, g - parallel)


def test_decoder_columns_stay_unit_norm_through_training_steps():
    sae = MLSAE(_cfg())
    opt = make_optimizer(sae, lr=1e-2)
    dead = DeadCounter(64)
    x = torch.randn(256, 16) * 4 + 1
    slot = torch.arange(256) % 3
    sae.init_bias(x)
    before = sae.W_dec_MD.detach().clone()
    for _ in range(5):
        train_step(sae, opt, x, slot, 3, dead=dead)
        norms = sae.W_dec_MD.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(64), rtol=0, atol=1e-6)
    assert not torch.allclose(before, sae.W_dec_MD.detach())  # it did train
    assert dead.tokens_since_fired_M.max() <= 5 * 256 // 3


def test_unfused_and_fused_steps_give_the_same_parameters():
    x = torch.randn(60, 16, dtype=torch.float64) * 2
    slot = torch.arange(60) % 3
    params = []
    for fused in (True, False):  # 60 rows x k=4 < 256 latents: some never fire
        sae = MLSAE(_cfg(n_latents=256, dead_tokens=30), dtype=torch.float64)
        opt = make_optimizer(sae, lr=1e-2)
        dead = DeadCounter(256)
        sae.init_bias(x)
        for _ in range(5):  # 20 tokens per step: dead from step 3 on, AuxK active
            out = train_step(sae, opt, x, slot, 3, dead=dead, fused=fused)
        assert out.dead_fraction > 0 and out.auxk > 0
        params.append([p.detach() for p in sae.parameters()])
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    cfg = _cfg(layers=[0, 2], model="embedded", lens="tuned-lens:test",
               data={"source": "embedded", "split": "train"})
    sae = MLSAE(cfg, seed=1)
    with torch.no_grad():
        sae.b_D.normal_()
    path = sae.save_pretrained(tmp_path / "sae")
    record = json.loads((path / "config.json").read_text())
    assert record["config"]["layers"] == [0, 2] and record["config"]["lens"] == "tuned-lens:test"
    assert record["config"]["model"] == "embedded" and record["config"]["data"]["split"] == "train"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = MLSAE.from_pretrained(path)
    assert loaded.cfg == cfg and not loaded.training
    x = torch.randn(50, 16)
    a, b = sae(x), loaded(x)
    for t_a, t_b in zip(a, b, strict=True):
        assert torch.equal(t_a, t_b)
    # overwrite in place: atomic replace, nothing left behind
    sae.save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        MLSAE.from_pretrained(tmp_path / "missing")


def test_encode_returns_post_relu_topk_for_latent_logging():
    sae = MLSAE(_cfg())
    with torch.no_grad():
        out = sae.encode(torch.randn(20, 16))
    assert out.top_acts_NK.shape == out.top_idx_NK.shape == (20, 4)
    assert (out.top_acts_NK >= 0).all() and out.aux_idx_NA.shape == (20, 0)


def test_bfloat16_encoder_matmul_option_trains():
    sae = MLSAE(_cfg())
    opt = make_optimizer(sae, lr=1e-2)
    x = torch.randn(128, 16) * 3
    slot = torch.arange(128) % 3
    sae.init_bias(x)
    first = train_step(sae, opt, x, slot, 3, compute_dtype=torch.bfloat16)
    for _ in range(20):
        last = train_step(sae, opt, x, slot, 3, compute_dtype=torch.bfloat16)
    assert 0 < last.fvu < first.fvu and sae.W_enc_MD.dtype == torch.float32
