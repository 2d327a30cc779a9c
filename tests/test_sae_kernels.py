"""The sparse hot path equals dense references: top-k, decode, encoder backward (gradcheck)."""

from __future__ import annotations

import pytest
import torch

from mlsae.sae import ckernels, kernels


def _same_topk(pre, vals, idx, k):
    ref = pre.topk(k, dim=1).values.sort(1).values
    torch.testing.assert_close(vals.sort(1).values, ref, rtol=0, atol=0)
    torch.testing.assert_close(pre.gather(1, idx), vals, rtol=0, atol=0)
    assert (idx.sort(1).values.diff(dim=1) > 0).all()  # distinct latents


@pytest.mark.parametrize("n, m, k", [(64, 4096, 32), (33, 1000, 7), (5, 40, 40), (9, 17, 1)])
def test_topk_select_equals_torch_topk(n, m, k):
    gen = torch.Generator().manual_seed(n * m + k)
    pre = torch.randn(n, m, generator=gen)
    pre[0, :] = 0.0  # all ties
    pre[1, ::3] = 5.0  # many ties at the top
    pre[2] = torch.linspace(-1, 1, m)  # sorted row
    vals, idx = kernels.topk_select(pre, k)
    assert vals.shape == idx.shape == (n, k) and idx.dtype == torch.int64
    assert (pre.gather(1, idx) == vals).all()
    _same_topk(pre[1:] if n > 1 else pre, vals[1:] if n > 1 else vals,
               idx[1:] if n > 1 else idx, k)
    assert (vals[0] == 0).all() and len(set(idx[0].tolist())) == k


def test_compiled_topk_kernel_builds_here_and_matches_with_strided_rows():
    assert ckernels.available(), "the C kernels should build on this machine (gcc present)"
    big = torch.randn(50, 700)
    pre = big[:, 100:612]  # row stride 700, unit column stride
    vals, idx = ckernels.topk(pre, 16, threads=2)
    _same_topk(pre, vals, idx, 16)
    with_nan = torch.randn(4, 300)
    with_nan[0, 5] = float("nan")
    with_nan[1, :] = float("nan")
    vals, idx = ckernels.topk(with_nan, 8)
    assert torch.isfinite(vals[2:]).all() and len(set(idx[1].tolist())) == 8
    with pytest.raises(ValueError, match="float32"):
        ckernels.topk(torch.randn(3, 10, dtype=torch.float64), 2)


def test_counting_sort_plan_equals_torch_sort_plan(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 50, (30, 6), generator=gen)
    order, src, starts = ckernels.counting_sort(idx, 50)
    want = idx.reshape(-1).sort(stable=True).indices
    assert torch.equal(order, want) and torch.equal(src, want // 6)
    counts = torch.bincount(idx.reshape(-1), minlength=50)
    assert torch.equal(starts, torch.cumsum(counts, 0) - counts)
    with pytest.raises(ValueError, match="outside"):
        ckernels.counting_sort(torch.tensor([[0, 50]]), 50)
    fast = kernels.SortPlan(idx, 50)
    monkeypatch.setattr(ckernels, "available", lambda: False)  # the torch fallback
    slow = kernels.SortPlan(idx, 50)
    for name in ("order", "src_rows", "offsets"):
        assert torch.equal(getattr(fast, name), getattr(slow, name))


def _problem(n=40, d=6, m=50, k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(m, d, generator=gen, dtype=torch.float64, requires_grad=True)
    return z, b, W, k


def test_sparse_transposed_product_and_gather_dot_equal_references():
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 30, (25, 4), generator=gen)
    w = torch.randn(25, 4, generator=gen, dtype=torch.float64)
    table = torch.randn(25, 7, generator=gen, dtype=torch.float64)
    dense_A = torch.zeros(25, 30, dtype=torch.float64)
    dense_A.index_put_((torch.arange(25)[:, None].expand(-1, 4), idx), w, accumulate=True)
    want = dense_A.t() @ table
    torch.testing.assert_close(kernels.sparse_t_matmul(idx, w, table, 30), want)
    torch.testing.assert_close(kernels.sparse_t_matmul_reference(idx, w, table, 30), want)
    plan = kernels.SortPlan(idx, 30)
    torch.testing.assert_close(kernels.sparse_t_matmul(idx, w, table, 30, plan), want)
    W = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    want_dot = torch.einsum("nkd,nd->nk", W[idx], table)
    torch.testing.assert_close(kernels.gather_dot(idx, W, table), want_dot)
    torch.testing.assert_close(kernels.gather_dot_reference(idx, W, table, chunk=7), want_dot)


def test_sparse_decode_and_its_gradients_equal_dense_reference():
    z, b, W, k = _problem()
    _, idx = kernels.encode_topk_reference(z, b, W, k)
    acts = torch.rand(z.shape[0], k, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn_like(W, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, Wd: kernels.sparse_decode(idx, a, Wd), (acts, W_dec))
    out = kernels.sparse_decode(idx, acts, W_dec)
    ref = kernels.sparse_decode_reference(idx, acts, W_dec)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (acts, W_dec), g)
    want = torch.autograd.grad(ref, (acts, W_dec), g)
    for a, b_ in zip(got, want, strict=True):
        torch.testing.assert_close(a, b_)


def test_encoder_sparse_backward_equals_dense_autograd():
    z, b, W, k = _problem(seed=2)
    vals, idx, _, _ = kernels.encode_topk(z, b, W, k)
    ref_vals, ref_idx = kernels.encode_topk_reference(z, b, W, k)
    order, ref_order = idx.argsort(1), ref_idx.argsort(1)
    assert torch.equal(idx.gather(1, order), ref_idx.gather(1, ref_order))
    g = torch.randn(z.shape[0], k, dtype=torch.float64)
    got = torch.autograd.grad((vals.gather(1, order) * g).sum(), (b, W))
    want = torch.autograd.grad((ref_vals.gather(1, ref_order) * g).sum(), (b, W))
    for a, b_ in zip(got, want, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda b_, W_: kernels.encode_topk(z, b_, W_, k)[0], (b, W))
    zr = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z_: kernels.encode_topk(z_, b, W, k)[0], (zr,))


def test_encoder_aux_selection_and_gradient_over_dead_latents():
    z, b, W, k = _problem(seed=3)
    dead = torch.tensor([3, 7, 11, 20, 21, 22, 40, 49])
    vals, idx, aux_vals, aux_idx = kernels.encode_topk(z, b, W, k, k_aux=4, dead_idx=dead)
    pre = ((z - b) @ W.t()).detach()
    want = pre[:, dead].topk(4, dim=1)
    torch.testing.assert_close(aux_vals.sort(1).values, want.values.sort(1).values)
    assert torch.equal(aux_idx.sort(1).values, dead[want.indices].sort(1).values)
    f = lambda b_, W_: sum(  # noqa: E731
        t.sum() for t in kernels.encode_topk(z, b_, W_, k, k_aux=4, dead_idx=dead)[::2])
    assert torch.autograd.gradcheck(f, (b, W))
    # k_aux larger than the dead set: all dead latents
    _, _, av, ai = kernels.encode_topk(z, b, W, k, k_aux=100, dead_idx=dead)
    assert ai.shape == (z.shape[0], len(dead))


def test_chunked_encoding_equals_one_chunk(monkeypatch):
    z, b, W, k = _problem(n=300, seed=4)
    one = kernels.encode_topk(z, b, W, k)
    monkeypatch.setattr(kernels, "MAX_PRE_ELEMENTS", 64 * W.shape[0])  # 64-row chunks
    many = kernels.encode_topk(z, b, W, k)
    assert torch.equal(one[1].sort(1).values, many[1].sort(1).values)
    torch.testing.assert_close(one[0].sort(1).values, many[0].sort(1).values)


def test_float32_fast_path_matches_float64_reference():
    z, b, W, k = _problem(n=200, d=32, m=512, k=16, seed=5)
    z32, b32, W32 = z.float(), b.detach().float().requires_grad_(), W.detach().float()
    W32.requires_grad_()
    vals, idx, _, _ = kernels.encode_topk(z32, b32, W32, k, plan_out=[])
    acts = vals.relu()
    W_dec = torch.nn.functional.normalize(W32.detach(), dim=1).requires_grad_()
    loss = kernels.sparse_decode(idx, acts, W_dec).pow(2).sum()
    loss.backward()
    ref_vals, ref_idx = kernels.encode_topk_reference(z, b, W, k)
    W_dec64 = W_dec.detach().double().requires_grad_()
    ref_loss = kernels.sparse_decode_reference(ref_idx, ref_vals.relu(), W_dec64).pow(2).sum()
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for got, want in ((b32.grad, b.grad), (W32.grad, W.grad), (W_dec.grad, W_dec64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
