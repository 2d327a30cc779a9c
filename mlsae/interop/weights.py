"""The common ground of every format: a TopK SAE's weights in mlsae's orientation.

Every format module converts its files to and from `Weights`; `to_mlsae` and `from_mlsae`
connect Weights with mlsae's own MLSAE (SPEC 2):

    z     = (x - mean x) / (std x + 1e-5)     if standardize (std unbiased), else z = x
    a     = ReLU(TopK_k(W_enc_MD (z - b_D)))  no latent bias
    x_hat = (W_dec_MD^T a + b_D) * std x + mean x   (or W_dec_MD^T a + b_D)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from mlsae.interop.errors import InteropError

UNIT_NORM_TOLERANCE = 1e-3
"""Decoder columns whose norm is further than this from 1 are reported (a warning)."""


class Weights(NamedTuple):
    W_enc_MD: Tensor
    """[n_latents, d_model]: row j is latent j's encoder direction."""
    W_dec_MD: Tensor
    """[n_latents, d_model]: row j is latent j's decoder column (unit norm when trained)."""
    b_D: Tensor
    """[d_model]: the pre-encoder bias, subtracted before encoding and added after decoding."""
    k: int
    """Active latents per example."""
    standardize: bool
    """Per-vector standardisation around the SAE (SPEC 2)."""

    @property
    def d_model(self) -> int:
        return int(self.W_enc_MD.shape[1])

    @property
    def n_latents(self) -> int:
        return int(self.W_enc_MD.shape[0])


def decoder_norm_warning(weights: Weights, where: str) -> str | None:
    """A sentence when some decoder column is not unit norm (the paper's and mlsae's training
    keep them at 1; other norms still work, but latent values then mean something else)."""
    norms = torch.linalg.vector_norm(weights.W_dec_MD.double(), dim=1)
    off = (norms - 1).abs() > UNIT_NORM_TOLERANCE
    if not bool(off.any()):
        return None
    return (f"{where}: {int(off.sum())} of {weights.n_latents} decoder columns are not unit "
            f"norm (norms {float(norms.min()):.4g}..{float(norms.max()):.4g}); the autoencoder "
            "is imported as is, but its latent values are not on the usual unit-decoder scale")


def to_mlsae(weights: Weights, cfg: Any):
    """An MLSAE (eval mode, the weights' dtype) with `weights` and the SAEConfig `cfg`, whose
    d_model, n_latents, k and standardize must agree with the weights."""
    from mlsae.sae import MLSAE

    checks = {"d_model": (cfg.d_model, weights.d_model),
              "n_latents": (cfg.n_latents, weights.n_latents), "k": (cfg.k, weights.k),
              "standardize": (cfg.standardize, weights.standardize)}
    for name, (want, have) in checks.items():
        if want != have:
            raise InteropError(f"SAEConfig.{name} = {want!r} but the weights have {have!r}")
    dtype = weights.W_enc_MD.dtype
    sae = MLSAE(cfg, dtype=dtype)
    with torch.no_grad():
        sae.W_enc_MD.copy_(weights.W_enc_MD.to(dtype))
        sae.W_dec_MD.copy_(weights.W_dec_MD.to(dtype))
        sae.b_D.copy_(weights.b_D.to(dtype))
    return sae.eval()


def from_mlsae(sae: Any) -> Weights:
    """The Weights of an MLSAE (detached CPU copies)."""
    def grab(t: Tensor) -> Tensor:
        return t.detach().cpu().clone().contiguous()

    return Weights(grab(sae.W_enc_MD), grab(sae.W_dec_MD), grab(sae.b_D), int(sae.cfg.k),
                   bool(sae.cfg.standardize))
