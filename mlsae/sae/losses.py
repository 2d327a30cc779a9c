"""The training objective (SPEC 2): mean over layers of FVU, plus (1/32) AuxK.

FVU_l = sum_t ||x - x_hat||^2 / sum_t ||x - mean_t x||^2 over the batch's rows of
layer l, in the INPUT space (per-dimension variance around the layer's mean).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

TINY = 1e-30


class LayerSums(NamedTuple):
    sse_L: Tensor
    """sum ||x - x_hat||^2 per layer slot."""
    tv_L: Tensor
    """sum ||x - mean_l x||^2 per layer slot (mean over the batch's rows of that layer)."""
    count_L: Tensor
    """rows per layer slot."""


def layer_sums(x_ND: Tensor, x_hat_ND: Tensor, pos_N: Tensor, n_pos: int) -> LayerSums:
    """Per-layer error and total-variance sums; `pos_N` is each row's layer SLOT 0..n_pos-1."""
    x_ND = x_ND.to(x_hat_ND.dtype)
    count_L = torch.bincount(pos_N, minlength=n_pos).to(x_ND.dtype)
    sum_LD = x_ND.new_zeros(n_pos, x_ND.shape[1]).index_add_(0, pos_N, x_ND)
    mean_LD = sum_LD / count_L.clamp_min(1)[:, None]
    tv_N = (x_ND - mean_LD[pos_N]).pow(2).sum(1)
    sse_N = (x_ND - x_hat_ND).pow(2).sum(1)
    sse_L = sse_N.new_zeros(n_pos).index_add(0, pos_N, sse_N)
    tv_L = tv_N.new_zeros(n_pos).index_add_(0, pos_N, tv_N)
    return LayerSums(sse_L, tv_L, count_L)


def fvu_loss(sums: LayerSums) -> tuple[Tensor, Tensor]:
    """(mean FVU over the layers present in the batch, FVU per layer slot)."""
    fvu_L = sums.sse_L / sums.tv_L.clamp_min(TINY)
    present = sums.count_L > 0
    return fvu_L[present].mean(), fvu_L


def auxk_loss(e_ND: Tensor, e_hat_ND: Tensor) -> Tensor:
    """||e - e_hat||^2 / ||e - mean(e)||^2 over the batch (e detached by the caller)."""
    denom = (e_ND - e_ND.mean(0, keepdim=True)).pow(2).sum()
    return (e_ND - e_hat_ND).pow(2).sum() / denom.clamp_min(TINY)
