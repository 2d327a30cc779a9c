"""One optimizer step of an MLSAE, and the dead-latent counter (counted in TOKENS).

Step: forward (TopK + AuxK over dead latents) -> loss = mean_l FVU_l + aux_coef * AuxK
-> backward (sparse) -> remove the decoder-gradient component parallel to each column
-> Adam -> renormalize the decoder columns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from mlsae.sae.kernels import encode_topk, sparse_decode
from mlsae.sae.losses import TINY, auxk_loss, fvu_loss, layer_sums
from mlsae.sae.model import MLSAE, STD_EPS


class StepOutput(NamedTuple):
    loss: float
    fvu: float
    """Mean over layers of the batch FVU."""
    auxk: float
    """AuxK loss (0 when nothing is dead)."""
    l0: float
    """Mean latents above act_threshold per example."""
    dead_fraction: float
    """Fraction of latents dead when the step started."""
    fvu_L: list[float]
    """Batch FVU per layer slot."""


def make_optimizer(model: MLSAE, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 6.25e-10) -> torch.optim.Adam:
    """Adam with one fused kernel per parameter where this torch build supports it."""
    params = list(model.parameters())
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):  # fused unsupported for this device/dtype
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


class DeadCounter:
    """Tokens since each latent last fired (value > act_threshold), counted in TOKENS.

    Each step adds the step's TOKEN count (not 1 per call, not the example count), so
    "dead after 10M tokens" means the same for any batch size or number of layers.
    """

    def __init__(self, n_latents: int, device: torch.device | str = "cpu"):
        self.tokens_since_fired_M = torch.zeros(n_latents, dtype=torch.int64, device=device)

    def dead_mask(self, dead_tokens: int) -> Tensor:
        return self.tokens_since_fired_M >= dead_tokens

    def dead_idx(self, dead_tokens: int) -> Tensor:
        return self.dead_mask(dead_tokens).nonzero().flatten()

    @torch.no_grad()
    def update(self, top_acts_NK: Tensor, top_idx_NK: Tensor, n_tokens: int,
               act_threshold: float) -> None:
        m = self.tokens_since_fired_M.shape[0]
        # fired latents via a sentinel row m (no boolean-mask compaction)
        fired_NK = torch.where(top_acts_NK > act_threshold, top_idx_NK, m)
        flag = torch.zeros(m + 1, dtype=torch.bool, device=top_idx_NK.device)
        flag.index_fill_(0, fired_NK.reshape(-1), True)
        self.tokens_since_fired_M += n_tokens
        self.tokens_since_fired_M.masked_fill_(flag[:m], 0)


class Objective(NamedTuple):
    loss: Tensor
    """Scalar to minimize: mean_l FVU_l + aux_coef * AuxK (with autograd graph)."""
    fvu: Tensor
    fvu_L: Tensor
    """Batch FVU per layer slot (detached; NaN-free, 0 rows -> 0/tiny)."""
    auxk: Tensor
    top_acts_NK: Tensor
    top_idx_NK: Tensor


def objective_reference(model: MLSAE, x_ND: Tensor, pos_N: Tensor, n_pos: int,
                        dead_idx: Tensor | None = None) -> Objective:
    """The objective written plainly with model.forward + losses (the tested reference)."""
    out = model(x_ND, dead_idx=dead_idx)
    fvu, fvu_L = fvu_loss(layer_sums(x_ND, out.x_hat_ND, pos_N, n_pos))
    auxk = fvu.new_zeros(())
    loss = fvu
    if out.aux_idx_NA.shape[1] > 0 and model.cfg.aux_coef > 0:
        e_ND = (out.z_ND - out.z_hat_ND).detach()
        auxk = auxk_loss(e_ND, sparse_decode(out.aux_idx_NA, out.aux_acts_NA, model.W_dec_MD))
        loss = loss + model.cfg.aux_coef * auxk
    return Objective(loss, fvu.detach(), fvu_L.detach(), auxk.detach(), out.top_acts_NK,
                     out.top_idx_NK)


class _WeightedSSE(Function):
    """sum_n w_n ||xm_n - s_n (zhat_n + b)||^2, with x - x_hat = xm - s * z_hat.

    One fused forward (addcmul + row dot) and backward (one scale, one column sum)
    instead of autograd's chain of [N, D] temporaries through de-standardization.
    """

    @staticmethod
    def forward(ctx, zhat_nb_ND: Tensor, b_D: Tensor, xm_ND: Tensor, s_N1: Tensor, w_N: Tensor):
        err_ND = torch.addcmul(xm_ND, s_N1, zhat_nb_ND + b_D, value=-1.0)
        sse_N = torch.linalg.vector_norm(err_ND, dim=1).square()  # one fused reduction
        ctx.save_for_backward(err_ND, s_N1, w_N)
        ctx.mark_non_differentiable(sse_N)
        return (sse_N * w_N).sum(), sse_N

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_sse):
        err_ND, s_N1, w_N = ctx.saved_tensors
        g_zhat_ND = err_ND * (s_N1 * (w_N[:, None] * (-2.0 * g_loss)))
        g_b = g_zhat_ND.sum(0) if ctx.needs_input_grad[1] else None
        return g_zhat_ND, g_b, None, None, None


@torch.no_grad()
def layer_total_variance(x_ND: Tensor, onehot_NL: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_t ||x - mean_l x||^2 per layer slot, rows per slot), via per-slot sums.

    S2 - n ||mean||^2 with the combination in float64; the [L, D] sums are one small GEMM
    (index_add_ into L rows serializes on CPU).
    """
    count_L = onehot_NL.sum(0).double()
    sum_LD = (onehot_NL.t() @ x_ND).double()
    s2_L = onehot_NL.t().double() @ torch.linalg.vector_norm(x_ND, dim=1).double().square()
    tv_L = s2_L - sum_LD.pow(2).sum(1) / count_L.clamp_min(1)
    return tv_L.to(x_ND.dtype), count_L.to(x_ND.dtype)


def objective_fused(model: MLSAE, x_ND: Tensor, pos_N: Tensor, n_pos: int,
                    dead_idx: Tensor | None = None,
                    compute_dtype: torch.dtype | None = None) -> Objective:
    """The same objective as objective_reference, with fewer passes over [N, D]."""
    cfg = model.cfg
    x_ND = x_ND.to(model.W_enc_MD.dtype)
    if cfg.standardize:
        # two-pass std (exact like torch.std, faster than its Welford kernel)
        xm_ND = x_ND - x_ND.mean(1, keepdim=True)
        s_N1 = torch.linalg.vector_norm(xm_ND, dim=1, keepdim=True) / math.sqrt(
            max(1, x_ND.shape[1] - 1))
        inv_N1 = 1.0 / (s_N1 + STD_EPS)
    else:
        s_N1, xm_ND, inv_N1 = x_ND.new_ones(x_ND.shape[0], 1), x_ND, None
    plans: list = []
    k_aux = cfg.k_aux if cfg.aux_coef > 0 else 0
    vals_NK, idx_NK, aux_vals_NA, aux_idx_NA = encode_topk(
        xm_ND, model.b_D, model.W_enc_MD, cfg.k, k_aux=k_aux, dead_idx=dead_idx,
        compute_dtype=compute_dtype, plan_out=plans, scale_N1=inv_N1)
    acts_NK = vals_NK.relu()
    zhat_nb_ND = sparse_decode(idx_NK, acts_NK, model.W_dec_MD, plans[0] if plans else None)
    onehot_NL = F.one_hot(pos_N, n_pos).to(x_ND.dtype)
    tv_L, count_L = layer_total_variance(x_ND, onehot_NL)
    present_L = count_L > 0
    w_L = torch.where(present_L, 1.0 / (present_L.sum() * tv_L.clamp_min(TINY)), 0.0)
    fvu, sse_N = _WeightedSSE.apply(zhat_nb_ND, model.b_D, xm_ND, s_N1, w_L[pos_N])
    with torch.no_grad():
        fvu_L = (onehot_NL.t() @ sse_N) / tv_L.clamp_min(TINY)
    loss, auxk = fvu, fvu.new_zeros(())
    if aux_idx_NA.shape[1] > 0:
        z_ND = xm_ND * inv_N1 if inv_N1 is not None else xm_ND
        e_ND = (z_ND - (zhat_nb_ND + model.b_D)).detach()
        auxk = auxk_loss(e_ND, sparse_decode(aux_idx_NA, aux_vals_NA.relu(), model.W_dec_MD))
        loss = loss + cfg.aux_coef * auxk
    return Objective(loss, fvu.detach(), fvu_L, auxk.detach(), acts_NK.detach(), idx_NK)


def train_step(model: MLSAE, optimizer: torch.optim.Optimizer, x_ND: Tensor, pos_N: Tensor,
               n_pos: int, *, dead: DeadCounter | None = None, n_tokens: int | None = None,
               compute_dtype: torch.dtype | None = None, fused: bool = True) -> StepOutput:
    """One step on x_ND (SAE-basis inputs); pos_N = each row's layer slot in 0..n_pos-1.

    `dead` supplies the dead latents for AuxK and is then updated with `n_tokens`
    (default: rows / n_pos). `fused=False` uses objective_reference (slower, same math).
    """
    cfg = model.cfg
    dead_idx = dead.dead_idx(cfg.dead_tokens) if dead is not None else None
    if fused:
        obj = objective_fused(model, x_ND, pos_N, n_pos, dead_idx, compute_dtype)
    else:
        obj = objective_reference(model, x_ND, pos_N, n_pos, dead_idx)
    obj.loss.backward()
    model.remove_parallel_grad()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.normalize_decoder()
    with torch.no_grad():
        l0 = (obj.top_acts_NK > cfg.act_threshold).sum().item() / max(1, x_ND.shape[0])
    n_dead = 0 if dead_idx is None else dead_idx.numel()
    if dead is not None:
        tokens = n_tokens if n_tokens is not None else x_ND.shape[0] // max(1, n_pos)
        dead.update(obj.top_acts_NK, obj.top_idx_NK, tokens, cfg.act_threshold)
    return StepOutput(obj.loss.item(), obj.fvu.item(), obj.auxk.item(), l0,
                      n_dead / cfg.n_latents, obj.fvu_L.tolist())
