"""The statistics the figures and the report need that are not views over the warehouse.

Residual-stream similarity across layers (SPEC Fig. 1), MMCS of decoder directions,
the pivot of long (latent, layer, mass) rows into p_j(l) (Fig. 2), and one prompt's
latent activations (Fig. 3). The prompt's distribution over layers is computed by
sql/prompt_heatmap.sql itself, run over the prompt's activations in memory: the prompt
is not in the warehouse, but the formula stays in one place. Plain numpy (+ DuckDB for
the prompt); drawing is mlsae.figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

FIG3_PROMPT = "When John and Mary went to the store, John gave"
PROMPT_SAE_ID = "prompt"
"""The sae_id the prompt's activations get in the in-memory tables of prompt_distribution."""


class ResidualSimilarity(NamedTuple):
    adjacent_cos_L1: np.ndarray
    """Mean cosine similarity of layer l and l+1 vectors (after per-layer mean subtraction), l = 0..L-2."""
    mean_norm_L: np.ndarray
    """Mean L2 norm of the raw block outputs per layer, l = 0..L-1."""


def residual_similarity(acts_NLD: np.ndarray) -> ResidualSimilarity:
    """SPEC Fig. 1 statistics from N token positions x L layers x D residual vectors.

    Each layer's mean over the N tokens is subtracted before the cosine (the
    residual stream has a large shared direction per layer that would otherwise
    make every pair look alike).
    """
    acts = np.asarray(acts_NLD, dtype=np.float64)
    if acts.ndim != 3 or acts.shape[0] == 0 or acts.shape[1] < 1:
        raise ValueError(f"expected acts of shape [N, L, D] with N, L >= 1, got {acts.shape}")
    mean_norm_L = np.linalg.norm(acts, axis=2).mean(axis=0)
    centred = acts - acts.mean(axis=0, keepdims=True)
    norms_NL = np.linalg.norm(centred, axis=2)
    dots_NL1 = np.einsum("nld,nld->nl", centred[:, :-1], centred[:, 1:])
    denom = norms_NL[:, :-1] * norms_NL[:, 1:]
    cos_NL1 = np.divide(dots_NL1, denom, out=np.zeros_like(dots_NL1), where=denom > 0)
    return ResidualSimilarity(adjacent_cos_L1=cos_NL1.mean(axis=0), mean_norm_L=mean_norm_L)


def _unit_rows(dirs_MD: np.ndarray) -> np.ndarray:
    dirs = np.asarray(dirs_MD, dtype=np.float32)
    norms = np.linalg.norm(dirs, axis=1, keepdims=True)
    return dirs / np.maximum(norms, 1e-12)


def mmcs(dirs_MD: np.ndarray, chunk: int = 2048) -> float:
    """Mean max cosine similarity within one dictionary: mean_j max_{i != j} cos(d_i, d_j).

    `dirs_MD` holds one decoder direction per ROW (pass W_dec.T for a d x n
    W_dec). Chunked so 16k+ latents never build an n x n matrix at once.
    """
    unit = _unit_rows(dirs_MD)
    m = unit.shape[0]
    if m < 2:
        raise ValueError("MMCS needs at least two latents")
    best = np.empty(m, dtype=np.float32)
    for start in range(0, m, chunk):
        sims = unit[start:start + chunk] @ unit.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # exclude i == j
        best[start:start + chunk] = sims.max(axis=1)
    return float(best.mean())


def mmcs_between(dirs_MD: np.ndarray, other_MD: np.ndarray, chunk: int = 2048) -> float:
    """Mean over the rows j of `dirs_MD` of max_i cos(dirs_j, other_i): how well `other` covers `dirs`."""
    unit, other = _unit_rows(dirs_MD), _unit_rows(other_MD)
    if unit.shape[1] != other.shape[1]:
        raise ValueError(f"dictionaries live in different spaces: d={unit.shape[1]} vs {other.shape[1]}")
    best = np.concatenate([(unit[s:s + chunk] @ other.T).max(axis=1)
                           for s in range(0, unit.shape[0], chunk)])
    return float(best.mean())


def decoder_rows(sae) -> np.ndarray:
    """An MLSAE's decoder directions as float32 [n_latents, d_model] (row j = latent j)."""
    return sae.W_dec_MD.detach().float().cpu().numpy()


class LayerDistribution(NamedTuple):
    latent_J: np.ndarray
    """Latent ids, sorted by expected layer (ties by id)."""
    p_JL: np.ndarray
    """p_j(l): each latent's activation mass over layers, rows sum to 1."""
    expected_layer_J: np.ndarray


def layer_distribution(latent: Sequence[int], layer: Sequence[int], mass: Sequence[float],
                       n_layers: int) -> LayerDistribution:
    """Pivot long (latent, layer, mass) rows (e.g. the `latent_layers` view) into p_j(l).

    Latents with zero total mass are dropped. Rows are sorted by expected layer
    E_j = sum_l l p_j(l), the order of SPEC Fig. 2.
    """
    latent = np.asarray(latent, dtype=np.int64)
    layer = np.asarray(layer, dtype=np.int64)
    mass = np.asarray(mass, dtype=np.float64)
    if not (latent.shape == layer.shape == mass.shape):
        raise ValueError("latent, layer and mass must have the same length")
    if layer.size and (layer.min() < 0 or layer.max() >= n_layers):
        raise ValueError(f"layer indices must lie in 0..{n_layers - 1}")
    ids, row = np.unique(latent, return_inverse=True)
    m_JL = np.zeros((ids.size, n_layers))
    np.add.at(m_JL, (row, layer), mass)
    total_J = m_JL.sum(axis=1)
    keep = total_J > 0
    ids, m_JL, total_J = ids[keep], m_JL[keep], total_J[keep]
    p_JL = m_JL / total_J[:, None]
    expected_J = p_JL @ np.arange(n_layers)
    order = np.lexsort((ids, expected_J))
    return LayerDistribution(latent_J=ids[order], p_JL=p_JL[order], expected_layer_J=expected_J[order])


def residual_sample(cache, max_tokens: int = 4096) -> np.ndarray:
    """Up to `max_tokens` unmasked token positions of an ActivationCache (or an iterable of
    its ShardArrays, e.g. a stream) as float32 [N, L, D] (the first shards: extraction
    order is already a shuffled mix of documents)."""
    parts, n = [], 0
    shards = cache.iter_shards() if hasattr(cache, "iter_shards") else cache
    for shard in shards:
        acts_NLD = np.asarray(shard.acts_BTLD[np.asarray(shard.mask_BT)], dtype=np.float32)
        parts.append(acts_NLD[: max_tokens - n])
        n += len(parts[-1])
        if n >= max_tokens:
            break
    if not parts:
        raise ValueError("the activation cache holds no tokens")
    return np.concatenate(parts)


class PromptActivations(NamedTuple):
    tokens: list[str]
    layer_idx: np.ndarray
    """Position of the layer in the SAE's layers (0..L-1), one entry per positive activation."""
    latent: np.ndarray
    value: np.ndarray
    pos: np.ndarray | None = None
    """Index of the (unmasked) token each activation belongs to."""


def prompt_activations(sae, loaded, text: str = FIG3_PROMPT, basis=None) -> PromptActivations:
    """Every positive latent activation of `sae` on the unmasked tokens of one prompt
    (SPEC Fig. 3), computed as the latent tables are (mlsae.latents.encode_tokens)."""
    import torch

    from mlsae.data import special_token_mask
    from mlsae.latents import encode_tokens

    layers = list(sae.cfg.layers) if getattr(sae.cfg, "layers", None) is not None else list(
        range(sae.cfg.n_layers))
    ids_T = np.asarray(loaded.tokenizer(text)["input_ids"], dtype=np.int64)
    mask_T = np.asarray(special_token_mask(ids_T[None], loaded.tokenizer), bool)[0]
    device = next(loaded.model.parameters()).device
    acts_NLK, idx_NLK = encode_tokens(sae, loaded.model, layers,
                                      torch.as_tensor(ids_T[None], device=device),
                                      torch.as_tensor(mask_T[None]), basis)
    acts_NLK, idx_NLK = acts_NLK.cpu().numpy(), idx_NLK.cpu().numpy()
    keep = acts_NLK > 0
    layer_NLK = np.broadcast_to(np.arange(len(layers))[None, :, None], acts_NLK.shape)
    pos_NLK = np.broadcast_to(np.arange(acts_NLK.shape[0])[:, None, None], acts_NLK.shape)
    tokens = [loaded.tokenizer.decode([int(i)]) for i in ids_T[mask_T]]
    return PromptActivations(tokens, layer_NLK[keep], idx_NLK[keep], acts_NLK[keep],
                             pos_NLK[keep])


def prompt_distribution(acts: PromptActivations, n_layers: int,
                        threshold: float = 1e-3) -> LayerDistribution:
    """p_sj(l) pooled over the prompt's tokens, latents whose max activation < threshold
    dropped: sql/prompt_heatmap.sql run over the prompt's activations, as if the prompt were
    one logged sequence (mlsae.warehouse.memory_connection, as the explorer does)."""
    from mlsae import warehouse as wh

    pos = np.zeros(len(acts.latent), np.int16) if acts.pos is None else acts.pos
    rows = wh.latent_rows(PROMPT_SAE_ID, np.zeros(len(acts.latent), np.int32), pos,
                          acts.layer_idx, acts.latent, acts.value)
    record = wh.SaeRecord(sae_id=PROMPT_SAE_ID, model="prompt", d_model=1, n_latents=1,
                          expansion_factor=1, k=1, layers=list(range(n_layers)))
    con = wh.memory_connection({"saes": record.to_arrow(), "latents": rows}, threads=1)
    try:
        found = con.execute(f"SELECT latent, expected_layer, p FROM prompt_heatmap("
                            f"'{PROMPT_SAE_ID}', 0, threshold := $1) ORDER BY rank, layer_idx",
                            [threshold]).fetchnumpy()
    finally:
        con.close()
    n_rows = found["latent"].size // max(n_layers, 1)
    return LayerDistribution(
        latent_J=np.asarray(found["latent"][::n_layers], dtype=np.int64),
        p_JL=np.asarray(found["p"], dtype=np.float64).reshape(n_rows, n_layers),
        expected_layer_J=np.asarray(found["expected_layer"][::n_layers], dtype=np.float64))
