"""Every SAE formula against a float64 numpy computation on random inputs (SPEC 2 and 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsae.sae.config import SAEConfig, TrainConfig
from mlsae.sae.evaluate import LayerAccumulator, mean_over_layers, next_token_ce_kl
from mlsae.sae.losses import auxk_loss, fvu_loss, layer_sums
from mlsae.sae.model import MLSAE, geometric_median, standardize
from mlsae.sae.step import DeadCounter, objective_fused, objective_reference


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_standardization_matches_numpy_unbiased_std():
    x = _rng().standard_normal((50, 12)) * 3 + 2
    z, mu, sigma = standardize(torch.tensor(x))
    mu_np = x.mean(1, keepdims=True)
    sigma_np = x.std(1, ddof=1, keepdims=True)  # unbiased
    np.testing.assert_allclose(mu.numpy(), mu_np, rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), sigma_np, rtol=1e-12)
    np.testing.assert_allclose(z.numpy(), (x - mu_np) / (sigma_np + 1e-5), rtol=1e-12)
    # off: the identity
    z_off, mu_off, s_off = standardize(torch.tensor(x), enabled=False)
    assert torch.equal(z_off, torch.tensor(x)) and mu_off.abs().max() == 0 and (s_off == 1).all()


def test_forward_matches_numpy_reference():
    cfg = SAEConfig(d_model=8, n_layers=1, n_latents=24, k=3, k_aux=4)
    sae = MLSAE(cfg, seed=1, dtype=torch.float64)
    with torch.no_grad():
        sae.b_D.copy_(torch.randn(8, dtype=torch.float64))
    x = _rng(1).standard_normal((20, 8)) * 2 + 1
    out = sae(torch.tensor(x))
    W_enc, W_dec, b = (p.detach().numpy() for p in (sae.W_enc_MD, sae.W_dec_MD, sae.b_D))
    mu, sd = x.mean(1, keepdims=True), x.std(1, ddof=1, keepdims=True)
    z = (x - mu) / (sd + 1e-5)
    pre = (z - b) @ W_enc.T
    a = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :3]
    np.put_along_axis(a, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    x_hat = (a @ W_dec + b) * sd + mu
    np.testing.assert_allclose(out.x_hat_ND.detach().numpy(), x_hat, rtol=1e-10, atol=1e-10)
    dense = np.zeros_like(pre)
    np.put_along_axis(dense, out.top_idx_NK.numpy(), out.top_acts_NK.detach().numpy(), 1)
    np.testing.assert_allclose(dense, a, atol=1e-12)


def _fvu_numpy(x, x_hat, slot, n_slots):
    out = []
    for s in range(n_slots):
        xs, hs = x[slot == s], x_hat[slot == s]
        out.append(((xs - hs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum())
    return np.array(out)


def test_fvu_uses_per_dimension_variance_per_layer():
    rng = _rng(2)
    # per-dimension means and scales differ: a scalar-variance FVU would disagree
    x = rng.standard_normal((300, 6)) * np.array([1, 5, 0.1, 2, 3, 1]) + np.arange(6) * 4
    x_hat = x + rng.standard_normal(x.shape) * 0.3
    slot = rng.integers(0, 3, 300)
    fvu_np = _fvu_numpy(x, x_hat, slot, 3)
    sums = layer_sums(torch.tensor(x), torch.tensor(x_hat), torch.tensor(slot), 3)
    mean, per = fvu_loss(sums)
    np.testing.assert_allclose(per.numpy(), fvu_np, rtol=1e-10)
    assert mean.item() == pytest.approx(fvu_np.mean(), rel=1e-10)
    scalar_var = ((x_hat - x) ** 2).sum() / (x.var() * x.size)
    assert abs(scalar_var - fvu_np.mean()) > 1e-3  # the reference's definition differs


def test_fused_objective_equals_reference_objective_and_numpy():
    cfg = SAEConfig(d_model=16, n_layers=3, n_latents=64, k=4, k_aux=8)
    sae = MLSAE(cfg, seed=0, dtype=torch.float64)
    rng = _rng(3)
    x = torch.tensor(rng.standard_normal((200, 16)) * 3 + 1)
    slot = torch.tensor(rng.integers(0, 3, 200))
    sae.init_bias(x)
    dead = torch.arange(0, 64, 4)
    grads = []
    for fn in (objective_reference, objective_fused):
        sae.zero_grad()
        obj = fn(sae, x, slot, 3, dead)
        obj.loss.backward()
        grads.append([p.grad.clone() for p in sae.parameters()] + [obj.loss.detach(),
                                                                    obj.fvu_L])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    x_hat = sae(x).x_hat_ND.detach().numpy()
    np.testing.assert_allclose(grads[1][-1].numpy(), _fvu_numpy(x.numpy(), x_hat, slot.numpy(), 3),
                               rtol=1e-9)


def test_auxk_matches_numpy_and_is_zero_when_nothing_dead():
    rng = _rng(4)
    e, e_hat = rng.standard_normal((40, 5)), rng.standard_normal((40, 5))
    want = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert auxk_loss(torch.tensor(e), torch.tensor(e_hat)).item() == pytest.approx(want, rel=1e-12)
    cfg = SAEConfig(d_model=16, n_layers=1, n_latents=64, k=4, k_aux=8)
    sae = MLSAE(cfg, dtype=torch.float64)
    x = torch.tensor(rng.standard_normal((50, 16)))
    for dead in (None, torch.empty(0, dtype=torch.long)):
        obj = objective_fused(sae, x, torch.zeros(50, dtype=torch.long), 1, dead)
        assert obj.auxk.item() == 0.0
        assert obj.loss.item() == obj.fvu.item()
    # with dead latents, AuxK uses only them, with W_dec and no bias
    dead = torch.tensor([1, 5, 9, 30, 31, 40])
    out = sae(x, dead_idx=dead)
    assert set(out.aux_idx_NA.unique().tolist()) <= set(dead.tolist())
    assert out.aux_idx_NA.shape == (50, 6)  # k_aux = 8 > 6 dead: all of them
    z, z_hat = out.z_ND.detach().numpy(), out.z_hat_ND.detach().numpy()
    W_enc, W_dec, b = (p.detach().numpy() for p in (sae.W_enc_MD, sae.W_dec_MD, sae.b_D))
    pre = (z - b) @ W_enc.T
    e_np = z - z_hat
    e_hat_np = np.maximum(pre[:, dead.numpy()], 0) @ W_dec[dead.numpy()]
    want = ((e_np - e_hat_np) ** 2).sum() / ((e_np - e_np.mean(0)) ** 2).sum()
    obj = objective_fused(sae, x, torch.zeros(50, dtype=torch.long), 1, dead)
    assert obj.auxk.item() == pytest.approx(want, rel=1e-9)
    assert obj.loss.item() == pytest.approx(obj.fvu.item() + want / 32, rel=1e-9)


def test_l0_mse_fvu_dead_fraction_accumulate_over_batches_like_numpy():
    rng = _rng(5)
    acc = LayerAccumulator(layer=2, d_model=4, n_latents=10, act_threshold=1e-3)
    xs, hs, acts, idxs = [], [], [], []
    for n in (7, 13, 5):  # sums across batches, then ratios
        x, h = rng.standard_normal((n, 4)) + 3, rng.standard_normal((n, 4)) + 3
        a = np.abs(rng.standard_normal((n, 3))) * (rng.random((n, 3)) > 0.3)
        a[0, 0] = 5e-4  # below the threshold: not active
        i = rng.integers(0, 6, (n, 3))  # latents 6..9 never fire
        acc.add_reconstruction(*(torch.tensor(v) for v in (x, h, a, i)))
        xs.append(x), hs.append(h), acts.append(a), idxs.append(i)
    x, h, a, i = (np.concatenate(v) for v in (xs, hs, acts, idxs))
    m = acc.result()
    sse = ((x - h) ** 2).sum()
    assert m.fvu == pytest.approx(sse / ((x - x.mean(0)) ** 2).sum(), rel=1e-10)
    assert m.mse == pytest.approx(sse / x.size, rel=1e-12)
    assert m.l0 == pytest.approx((a > 1e-3).sum() / len(x), rel=1e-12)
    fired = np.unique(i[a > 1e-3])
    assert m.dead_fraction == pytest.approx(1 - len(fired) / 10)
    assert np.isnan(m.delta_ce) and np.isnan(m.kl)
    mean = mean_over_layers([m, m._replace(layer=3, fvu=0.0)])
    assert mean.layer == -1 and mean.fvu == pytest.approx(m.fvu / 2)


def _log_softmax(v):
    v = v - v.max(-1, keepdims=True)
    return v - np.log(np.exp(v).sum(-1, keepdims=True))


def test_delta_ce_and_kl_match_numpy_on_counted_positions():
    rng = _rng(6)
    B, T, V = 3, 7, 11
    clean, spliced = rng.standard_normal((B, T, V)) * 2, rng.standard_normal((B, T, V)) * 2
    tokens = rng.integers(0, V, (B, T))
    count = rng.random((B, T)) > 0.3
    sums = next_token_ce_kl(torch.tensor(clean), torch.tensor(spliced), torch.tensor(tokens),
                            torch.tensor(count))
    lc, ls = _log_softmax(clean[:, :-1]), _log_softmax(spliced[:, :-1])
    tgt = tokens[:, 1:, None]
    w = count[:, :-1]
    ce_c = -np.take_along_axis(lc, tgt, -1)[..., 0]
    ce_s = -np.take_along_axis(ls, tgt, -1)[..., 0]
    kl = (np.exp(lc) * (lc - ls)).sum(-1)
    assert sums.count == w.sum()
    assert sums.ce_clean == pytest.approx(ce_c[w].sum(), rel=1e-5)
    assert sums.ce_spliced == pytest.approx(ce_s[w].sum(), rel=1e-5)
    assert sums.kl == pytest.approx(kl[w].sum(), rel=1e-5)
    acc = LayerAccumulator(0, 2, 2, 1e-3)
    acc.add_reconstruction(torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 1),
                           torch.zeros(2, 1, dtype=torch.long))
    acc.add_ce_kl(sums)
    m = acc.result()
    assert m.delta_ce == pytest.approx((ce_s[w].sum() - ce_c[w].sum()) / w.sum(), rel=1e-5)
    assert m.kl == pytest.approx(kl[w].sum() / w.sum(), rel=1e-5)
    same = next_token_ce_kl(torch.tensor(clean), torch.tensor(clean), torch.tensor(tokens),
                            torch.tensor(count))
    assert same.kl == pytest.approx(0.0, abs=1e-9) and same.ce_clean == same.ce_spliced


def test_geometric_median_weiszfeld_and_bias_init_on_standardized_vectors():
    rng = _rng(7)
    pts = rng.standard_normal((200, 3))
    pts[:20] += 50  # outliers pull the mean, not the median
    gm = geometric_median(torch.tensor(pts), iters=500).numpy()

    def total(y):
        return np.linalg.norm(pts - y, axis=1).sum()

    for delta in np.eye(3) * 1e-3:
        assert total(gm) <= total(gm + delta) and total(gm) <= total(gm - delta)
    assert np.linalg.norm(gm) < 2 < np.linalg.norm(pts.mean(0))
    cfg = SAEConfig(d_model=3, n_layers=1, n_latents=6, k=2, k_aux=2)
    sae = MLSAE(cfg, dtype=torch.float64)
    x = torch.tensor(pts * 100 + 7)
    sae.init_bias(x, iters=500)
    want = geometric_median(standardize(x).z_ND, iters=500)
    torch.testing.assert_close(sae.b_D.detach(), want)


def test_dead_counter_counts_tokens_not_calls():
    dead = DeadCounter(4)
    acts = torch.tensor([[1.0], [0.0]])  # latent 0 fires, latent 1 is selected but 0
    idx = torch.tensor([[0], [1]])
    for _ in range(3):
        dead.update(acts, idx, n_tokens=400, act_threshold=1e-3)
    assert dead.tokens_since_fired_M.tolist() == [0, 1200, 1200, 1200]
    assert dead.dead_mask(1000).tolist() == [False, True, True, True]
    assert dead.dead_mask(1300).tolist() == [False, False, False, False]
    # same tokens in more, smaller calls: same counts
    other = DeadCounter(4)
    for _ in range(12):
        other.update(acts, idx, n_tokens=100, act_threshold=1e-3)
    assert torch.equal(other.tokens_since_fired_M, dead.tokens_since_fired_M)


@pytest.mark.parametrize("kwargs, fix", [
    (dict(k=0), "positive integer"),
    (dict(k=100, n_latents=64), "lower k"),
    (dict(k_aux=65, n_latents=64), "k_aux <= n_latents"),
    (dict(layers=[3]), "0..2"),
    (dict(layers=[]), "None for every block"),
    (dict(layers=[1, 1]), "repeats"),
    (dict(d_model=0), "d_model"),
    (dict(expansion_factor=-1), "expansion_factor"),
    (dict(aux_coef=-1.0), "aux_coef"),
    (dict(dead_tokens=0), "dead_tokens"),
])
def test_sae_config_validation_names_the_fix(kwargs, fix):
    base = dict(d_model=8, n_layers=3, n_latents=64, k=4, k_aux=8)
    with pytest.raises(ValueError, match=fix):
        SAEConfig(**{**base, **kwargs})


def test_configs_resolve_defaults_and_validate_training():
    cfg = SAEConfig(d_model=8, n_layers=3, k=4, k_aux=8)
    assert cfg.layers == [0, 1, 2] and cfg.n_latents == 64 * 8
    single = SAEConfig(d_model=8, n_layers=3, layers=[1], k=4, k_aux=8)
    assert single.n_train_layers == 1
    tc = TrainConfig(cfg, train_tokens=1000, batch_tokens=100)
    assert tc.batch_examples == 300 and tc.n_steps == 10
    assert TrainConfig(**{**tc.to_dict(), "sae": cfg.to_dict()}).sae == cfg
    for bad, fix in [(dict(batch_tokens=2000), "lower the batch"), (dict(lr=0), "lr"),
                     (dict(autocast="int8"), "autocast"), (dict(betas=(0.9, 1.0)), "betas"),
                     (dict(checkpoint_every=-1), "checkpoint_every")]:
        with pytest.raises(ValueError, match=fix):
            TrainConfig(cfg, **{**dict(train_tokens=1000, batch_tokens=100), **bad})
