"""A latent's decoder direction W_dec[j] (the SAE's weights, not the warehouse): its
nearest latents by cosine similarity, and the tokens it promotes and suppresses through the
model's unembedding (W_U W_dec[j], the direct logit effect; with a tuned lens the direction
lives in the lens' space, which is the one the lens reads out with the unembedding)."""

from __future__ import annotations

from typing import Any

import torch

TOP_N = 10


@torch.no_grad()
def nearest_latents(sae, latent: int, n: int = TOP_N) -> list[dict[str, Any]]:
    """The n other latents whose decoder directions have the highest cosine with latent's."""
    W_MD = sae.W_dec_MD.float()
    W_MD = W_MD / W_MD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_M = W_MD @ W_MD[latent]
    cos_M[latent] = -float("inf")
    values, idx = cos_M.topk(min(n, cos_M.numel() - 1))
    return [{"latent": int(j), "cosine": float(c)} for c, j in zip(values, idx, strict=True)]


@torch.no_grad()
def promoted_tokens(sae, loaded, latent: int, n: int = TOP_N) -> dict[str, list[dict]]:
    """Tokens with the largest and smallest W_U W_dec[j] (empty lists for a model
    without an output embedding)."""
    head = loaded.model.get_output_embeddings()
    if head is None:
        return {"promoted": [], "suppressed": []}
    W_VD = head.weight
    logits_V = (W_VD.float() @ sae.W_dec_MD[latent].float().to(W_VD.device)).cpu()
    tokenizer = loaded.tokenizer

    def listed(values: torch.Tensor, idx: torch.Tensor) -> list[dict]:
        return [{"id": int(i), "token": tokenizer.decode([int(i)]), "logit": float(v)}
                for v, i in zip(values, idx, strict=True)]

    low_values, low_idx = logits_V.topk(n, largest=False)
    return {"promoted": listed(*logits_V.topk(n)), "suppressed": listed(low_values, low_idx)}
