"""One typed-in prompt through a model and its SAE: the explorer's prompt page.

- activations: the SAE's encoder output for every (token, layer) of the prompt, exactly as
  the latent logger computes it (block outputs, through the SAE's basis, `sae.encode`);
- heatmap: SPEC 5 / Fig. 3 for this prompt, by sql/prompt_heatmap.sql itself, run over the
  prompt's activations in an in-memory DuckDB (the same SQL as for a logged sequence);
- logits: the model's top next-token predictions at every position, clean, with one
  layer replaced by its reconstruction (the evaluation's splice: mlsae.sae.evaluate's
  `reconstruct` at the unmasked tokens) with the prompt's delta CE and KL, and steered:
  `factor` times one latent's decoder direction added at one layer, i.e. the change of the
  reconstruction when that latent's activation grows by `factor` (sigma_t * W_dec[j] per
  token in the SAE's space, mapped back through the basis).
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mlsae.serve import queries as q

MAX_PROMPT_CHARS = 4000
MAX_PROMPT_TOKENS = 256
MAX_STEER_FACTOR = 200.0
TOP_LOGITS = 10
TOP_LATENTS_PER_TOKEN = 8


class BadInput(ValueError):
    """A request the explorer refuses, with a message naming the fix (HTTP 422)."""


class Steer(NamedTuple):
    latent: int
    layer: int
    """Model block index (one of the SAE's layers)."""
    factor: float


def check_layer(layer: int, layers: list[int], what: str = "layer") -> int:
    if layer not in layers:
        raise BadInput(f"{what} {layer} is not one of this SAE's layers {layers}")
    return layer


def tokenize(handle, text: str) -> list[int]:
    """The prompt's token ids, after the length checks (BadInput)."""
    if not text.strip():
        raise BadInput("the prompt is empty: type some text")
    if len(text) > MAX_PROMPT_CHARS:
        raise BadInput(f"the prompt has {len(text)} characters; the limit is "
                       f"{MAX_PROMPT_CHARS}: shorten it")
    from mlsae.hooks import max_positions

    ids = list(handle.loaded.tokenizer(text)["input_ids"])
    limit = min(MAX_PROMPT_TOKENS, max_positions(handle.loaded.model) or MAX_PROMPT_TOKENS)
    if len(ids) > limit:
        raise BadInput(f"the prompt is {len(ids)} tokens long; the limit is {limit}: "
                       "shorten it")
    if not ids:
        raise BadInput("the prompt has no tokens: type some text")
    return ids


@torch.no_grad()
def encode_prompt(handle, ids_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """(top_acts [N, L, K], top_idx [N, L, K]) of the unmasked tokens (N of them), as
    mlsae.latents.log_latents encodes logged text (the same function)."""
    from mlsae.latents import encode_tokens

    return encode_tokens(handle.sae, handle.loaded.model, handle.layers, ids_BT, mask_BT,
                         handle.basis)


def reconstruct_at(handle, layer: int, mask_BT: Tensor):
    """The evaluation's splice: block `layer`'s output at the unmasked tokens replaced by
    the SAE's reconstruction (mlsae.sae.evaluate.reconstruct), the rest unchanged."""
    from mlsae.sae.evaluate import reconstruct

    def replace(h_BTD: Tensor) -> Tensor:
        m = mask_BT.to(h_BTD.device)
        x_hat, _, _ = reconstruct(handle.sae, h_BTD[m].float(), layer, handle.basis)
        out = h_BTD.clone()
        out[m] = x_hat.to(h_BTD.dtype)
        return out

    return replace


def steer_at(handle, steer: Steer, mask_BT: Tensor):
    """Add steer.factor x latent's decoder direction (scaled by each token's sigma, mapped
    back through the basis) to block steer.layer's output at the unmasked tokens."""
    sae, basis = handle.sae, handle.basis
    direction_D = sae.W_dec_MD[steer.latent]

    def replace(h_BTD: Tensor) -> Tensor:
        m = mask_BT.to(h_BTD.device)
        x_ND = h_BTD[m].to(sae.W_enc_MD.dtype)
        y_ND = basis.to_sae(x_ND, steer.layer) if basis is not None else x_ND
        sigma_N1 = sae.standardize(y_ND).sigma_N1
        moved_ND = y_ND + steer.factor * sigma_N1 * direction_D
        if basis is not None:
            delta_ND = basis.from_sae(moved_ND, steer.layer) - basis.from_sae(y_ND, steer.layer)
        else:
            delta_ND = moved_ND - y_ND
        out = h_BTD.clone()
        out[m] = h_BTD[m] + delta_ND.to(h_BTD.dtype)
        return out

    return replace


def top_predictions(logits_TV: Tensor, tokenizer, k: int = TOP_LOGITS) -> list[list[dict]]:
    """Per position: the k most likely next tokens with logit and probability."""
    logits_TV = logits_TV.float()
    probs_TV = torch.softmax(logits_TV, dim=-1)
    top_p, top_i = probs_TV.topk(k, dim=-1)
    out = []
    for t in range(logits_TV.shape[0]):
        out.append([{"id": int(i), "token": tokenizer.decode([int(i)]),
                     "logit": float(logits_TV[t, i]), "prob": float(p)}
                    for p, i in zip(top_p[t], top_i[t], strict=True)])
    return out


def ce_kl(clean_BTV: Tensor, other_BTV: Tensor, ids_BT: Tensor, mask_BT: Tensor
          ) -> dict[str, float | None]:
    """The prompt's delta CE and KL(clean || other), as the evaluation computes them."""
    from mlsae.sae.evaluate import next_token_ce_kl

    sums = next_token_ce_kl(clean_BTV, other_BTV, ids_BT, mask_BT)
    if sums.count == 0:
        return {"delta_ce": None, "kl": None, "positions": 0}
    return {"delta_ce": (sums.ce_spliced - sums.ce_clean) / sums.count,
            "kl": sums.kl / sums.count, "positions": sums.count}


class PromptHeatmap:
    """sql/prompt_heatmap.sql over one prompt's activations at a time (thread-safe)."""

    def __init__(self, sae_id: str, saes_row):
        """saes_row: the SAE's `saes` row as an Arrow table (Catalog.sae_table)."""
        from mlsae import warehouse as wh

        empty = wh.latent_rows(sae_id, [], [], [], [], [])
        self.sae_id = sae_id
        self._con = wh.memory_connection({"saes": saes_row, "latents": empty}, threads=1)
        self._lock = threading.Lock()

    def __call__(self, pos_R, layer_R, latent_R, value_R) -> q.Panel:
        from mlsae import warehouse as wh

        rows = wh.latent_rows(self.sae_id, np.zeros_like(pos_R), pos_R, layer_R, latent_R,
                              value_R)
        with self._lock:
            self._con.register("_latents_rows", rows)
            return q.run(self._con, q.PROMPT_HEATMAP, {"sae": self.sae_id})


def activation_lists(acts_NLK: np.ndarray, idx_NLK: np.ndarray, counted: np.ndarray,
                     n_layers: int) -> list[list[list[list[float]]]]:
    """Per token, per layer index: [[latent, value], ...] of the positive activations,
    largest first ([] for masked tokens)."""
    out: list = []
    n = 0
    for is_counted in counted:
        if not is_counted:
            out.append([[] for _ in range(n_layers)])
            continue
        per_layer = []
        for li in range(n_layers):
            order = np.argsort(-acts_NLK[n, li], kind="stable")
            per_layer.append([[int(idx_NLK[n, li, o]), float(acts_NLK[n, li, o])]
                              for o in order if acts_NLK[n, li, o] > 0])
        out.append(per_layer)
        n += 1
    return out


def top_latents(acts_NLK: np.ndarray, idx_NLK: np.ndarray, counted: np.ndarray, n_latents: int,
                k: int = TOP_LATENTS_PER_TOKEN) -> list[list[dict]]:
    """Per token: its k latents of largest total activation over layers, with each layer's
    activation (a dense row of L values)."""
    out: list = []
    n = 0
    n_layers = acts_NLK.shape[1]
    for is_counted in counted:
        if not is_counted:
            out.append([])
            continue
        dense_LM: dict[int, np.ndarray] = {}
        for li in range(n_layers):
            for j, a in zip(idx_NLK[n, li], acts_NLK[n, li], strict=True):
                if a > 0:
                    dense_LM.setdefault(int(j), np.zeros(n_layers))[li] += float(a)
        ranked = sorted(dense_LM.items(), key=lambda kv: (-kv[1].sum(), kv[0]))[:k]
        out.append([{"latent": j, "total": float(v.sum()), "per_layer": v.tolist()}
                    for j, v in ranked])
        n += 1
    return out


@torch.no_grad()
def analyse(handle, heatmap: PromptHeatmap, text: str, layer: int | None = None,
            steer: Steer | None = None) -> dict[str, Any]:
    """Everything the prompt page shows for `text` (see the module docstring)."""
    from mlsae.data import special_token_mask
    from mlsae.hooks import splice_forward

    layers = handle.layers
    layer = check_layer(layers[len(layers) // 2] if layer is None else layer, layers)
    n_latents = handle.sae.cfg.n_latents
    if steer is not None:
        check_layer(steer.layer, layers, "steering layer")
        if not 0 <= steer.latent < n_latents:
            raise BadInput(f"steering latent {steer.latent} is out of range: this SAE has "
                           f"{n_latents} latents (0..{n_latents - 1})")
        if not abs(steer.factor) <= MAX_STEER_FACTOR:
            raise BadInput(f"steering factor {steer.factor} is out of range: give a number "
                           f"between -{MAX_STEER_FACTOR:g} and {MAX_STEER_FACTOR:g}")
    tokenizer, model = handle.loaded.tokenizer, handle.loaded.model
    ids = tokenize(handle, text)
    device = next(model.parameters()).device
    ids_BT = torch.tensor([ids], dtype=torch.long, device=device)
    counted = np.asarray(special_token_mask(np.asarray([ids]), tokenizer), dtype=bool)[0]
    mask_BT = torch.as_tensor(counted[None], device=device)
    if not counted.any():
        raise BadInput("the prompt has only special tokens (such as <|endoftext|>), which are "
                       "never analysed (SPEC 1): add some text")

    acts, idx = encode_prompt(handle, ids_BT, mask_BT)
    acts_NLK, idx_NLK = acts.cpu().numpy(), idx.cpu().numpy()
    token_pos = np.flatnonzero(counted)
    n_idx, l_idx, k_idx = np.nonzero(acts_NLK > 0)
    heat = heatmap(token_pos[n_idx], np.asarray(layers)[l_idx], idx_NLK[n_idx, l_idx, k_idx],
                   acts_NLK[n_idx, l_idx, k_idx])

    clean = model(input_ids=ids_BT, use_cache=False).logits
    spliced = splice_forward(model, ids_BT, layer, reconstruct_at(handle, layer, mask_BT))
    logits = {"layer": layer, "clean": top_predictions(clean[0], tokenizer),
              "reconstructed": top_predictions(spliced[0], tokenizer),
              "reconstructed_cost": ce_kl(clean, spliced, ids_BT, mask_BT),
              "steer": None, "steered": None, "steered_cost": None}
    if steer is not None:
        steered = splice_forward(model, ids_BT, steer.layer, steer_at(handle, steer, mask_BT))
        logits.update(steer=steer._asdict(), steered=top_predictions(steered[0], tokenizer),
                      steered_cost=ce_kl(clean, steered, ids_BT, mask_BT))
    return {
        "sae_id": handle.sae_id, "text": text, "layers": layers, "n_latents": n_latents,
        "tokens": [{"pos": t, "id": int(i), "text": tokenizer.decode([int(i)]),
                    "counted": bool(counted[t])} for t, i in enumerate(ids)],
        "activations": activation_lists(acts_NLK, idx_NLK, counted, len(layers)),
        "top_latents": top_latents(acts_NLK, idx_NLK, counted, n_latents),
        "heatmap": heat.as_json(),
        "logits": logits,
    }
