"""Per-layer evaluation of an SAE on held-out text (SPEC 4).

For each layer l of the SAE and the whole evaluation set (sums first, ratios at the
end, never means of per-batch ratios), in the MODEL's basis (reconstructions made
in a lens basis are mapped back with basis.from_sae first):

- fvu      = sum ||x - x_hat||^2 / sum ||x - mean x||^2  (mean over the eval tokens of l)
- mse      = sum ||x - x_hat||^2 / (tokens * d_model)     (per element)
- l0       = mean number of latents above act_threshold per token
- dead_fraction = fraction of latents that never exceed act_threshold at layer l
- delta_ce = CE(spliced) - CE(clean), next-token loss averaged over predicting positions
- kl       = mean over predicting positions of KL(p_clean || p_spliced)

"Spliced": the model run with block l's output replaced by its reconstruction, one
layer at a time. Special tokens are excluded everywhere: they are neither
reconstructed (their hidden state passes through unchanged) nor counted; a
position t counts for CE/KL when its input token is unmasked and t < T - 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mlsae.memory import LOGITS_MAX_BYTES
from mlsae.progress import Progress, to_stderr
from mlsae.sae.model import MLSAE


class LayerMetrics(NamedTuple):
    layer: int
    """Block index (-1 for the mean over layers)."""
    fvu: float
    mse: float
    l0: float
    dead_fraction: float
    delta_ce: float
    """NaN when splicing was not run."""
    kl: float
    """NaN when splicing was not run."""


class CeKlSums(NamedTuple):
    ce_clean: float
    ce_spliced: float
    kl: float
    count: int


class _CleanTerms(NamedTuple):
    """What every spliced run of one chunk compares with: computed once per chunk."""

    lp_BTV: Tensor
    """log p_clean (float32)."""
    p_BTV: Tensor
    target_BT1: Tensor
    w_BT: Tensor
    ce_sum: float


def _clean_terms(logits_clean_BTV: Tensor, target_BT: Tensor, w_BT: Tensor) -> _CleanTerms:
    lp_c = torch.log_softmax(logits_clean_BTV.float(), dim=-1)
    target = target_BT.to(lp_c.device, torch.long).unsqueeze(-1)
    w = w_BT.to(lp_c.device, torch.float64)
    ce_c = -lp_c.gather(-1, target).squeeze(-1).double()
    return _CleanTerms(lp_c, lp_c.exp(), target, w, float((ce_c * w).sum()))


def _spliced_sums(clean: _CleanTerms, logits_spliced_BTV: Tensor) -> CeKlSums:
    """Sums of CE(clean), CE(spliced) and KL(clean||spliced) over positions weighted by w."""
    lp_s = torch.log_softmax(logits_spliced_BTV.float(), dim=-1)
    ce_s = -lp_s.gather(-1, clean.target_BT1).squeeze(-1).double()
    # KL = sum_v p_c (lp_c - lp_s); the difference in place over lp_s (no new [B, T, V])
    kl = torch.einsum("btv,btv->bt", clean.p_BTV, torch.sub(clean.lp_BTV, lp_s, out=lp_s))
    w = clean.w_BT
    return CeKlSums(clean.ce_sum, float((ce_s * w).sum()), float((kl.double() * w).sum()),
                    int(w.sum()))


def next_token_ce_kl(logits_clean_BTV: Tensor, logits_spliced_BTV: Tensor, tokens_BT: Tensor,
                     count_BT: Tensor) -> CeKlSums:
    """Sums over positions t < T-1 with count_BT[:, t] of CE(clean), CE(spliced), KL(clean||spliced)."""
    clean = _clean_terms(logits_clean_BTV[:, :-1], tokens_BT[:, 1:], count_BT[:, :-1])
    return _spliced_sums(clean, logits_spliced_BTV[:, :-1])


def chunked_ce_kl(unembed: Callable[[Tensor], Tensor], h_clean_BTD: Tensor,
                  h_spliced: dict[int, Tensor], tokens_BT: Tensor, count_BT: Tensor,
                  vocab: int, budget_bytes: int = LOGITS_MAX_BYTES,
                  on_chunk: Callable[[float], None] | None = None) -> dict[int, CeKlSums]:
    """next_token_ce_kl for several spliced runs (by layer) from last hidden states, unembedding
    a chunk of positions at a time: the clean chunk's log-probabilities once, then each
    layer's. Memory: about six [B, chunk, V] float32 tensors, with chunk chosen to fit
    `budget_bytes`.
    on_chunk(share): called after each chunk with the share of the positions it covered."""
    n_b, n_t = tokens_BT.shape
    chunk = max(1, budget_bytes // (6 * 4 * n_b * vocab))
    sums = {layer: [0.0, 0.0, 0.0, 0] for layer in h_spliced}
    for t0 in range(0, n_t - 1, chunk):
        t1 = min(n_t - 1, t0 + chunk)
        clean = _clean_terms(unembed(h_clean_BTD[:, t0:t1]), tokens_BT[:, t0 + 1:t1 + 1],
                             count_BT[:, t0:t1])
        for layer, h_BTD in h_spliced.items():
            part = _spliced_sums(clean, unembed(h_BTD[:, t0:t1]))
            total = sums[layer]
            for i, value in enumerate(part):
                total[i] += value
        if on_chunk is not None:
            on_chunk((t1 - t0) / (n_t - 1))
    return {layer: CeKlSums(*total) for layer, total in sums.items()}


class LayerAccumulator:
    """Float64 running sums for one layer's reconstruction and splicing metrics."""

    def __init__(self, layer: int, d_model: int, n_latents: int, act_threshold: float):
        self.layer, self.d_model, self.act_threshold = layer, d_model, act_threshold
        self.n = 0
        self.sum_x_D = torch.zeros(d_model, dtype=torch.float64)
        self.sum_x2 = 0.0
        self.sse = 0.0
        self.active = 0.0
        self.fired_M = torch.zeros(n_latents, dtype=torch.bool)
        self.ce_clean = self.ce_spliced = self.kl = 0.0
        self.n_pred = 0

    @torch.no_grad()
    def add_reconstruction(self, x_ND: Tensor, x_hat_ND: Tensor, top_acts_NK: Tensor,
                           top_idx_NK: Tensor) -> None:
        x64 = x_ND.double()
        self.n += x_ND.shape[0]
        self.sum_x_D += x64.sum(0).cpu()
        self.sum_x2 += float(x64.pow(2).sum())
        self.sse += float((x64 - x_hat_ND.double()).pow(2).sum())
        on = top_acts_NK > self.act_threshold
        self.active += float(on.sum())
        self.fired_M[top_idx_NK[on].cpu()] = True

    def add_ce_kl(self, sums: CeKlSums) -> None:
        self.ce_clean += sums.ce_clean
        self.ce_spliced += sums.ce_spliced
        self.kl += sums.kl
        self.n_pred += sums.count

    def result(self) -> LayerMetrics:
        n = max(self.n, 1)
        total_var = self.sum_x2 - float(self.sum_x_D.pow(2).sum()) / n
        nan = float("nan")
        return LayerMetrics(
            layer=self.layer,
            fvu=self.sse / total_var if total_var > 0 else nan,
            mse=self.sse / (n * self.d_model),
            l0=self.active / n,
            dead_fraction=1.0 - float(self.fired_M.float().mean()),
            delta_ce=(self.ce_spliced - self.ce_clean) / self.n_pred if self.n_pred else nan,
            kl=self.kl / self.n_pred if self.n_pred else nan,
        )


def mean_over_layers(metrics: Sequence[LayerMetrics]) -> LayerMetrics:
    """The unweighted mean of each metric over layers, as a LayerMetrics with layer = -1."""
    cols = list(zip(*metrics, strict=True))[1:]
    return LayerMetrics(-1, *(float(np.mean(c)) for c in cols))


@torch.no_grad()
def reconstruct(sae: MLSAE, x_ND: Tensor, layer: int, basis: Any = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(x_hat in the model's basis, top_acts_NK, top_idx_NK) for rows of block `layer`."""
    dtype = sae.W_enc_MD.dtype
    x = x_ND.to(dtype)
    if basis is not None:
        x = basis.to_sae(x, layer).to(dtype)
    out = sae(x)
    x_hat = out.x_hat_ND
    if basis is not None:
        x_hat = basis.from_sae(x_hat, layer).to(dtype)
    return x_hat, out.top_acts_NK, out.top_idx_NK


def _check_split(data: Any) -> None:
    if getattr(data, "split", "test") != "test":
        raise ValueError(f"evaluation must use held-out text, but data.split is {data.split!r}: "
                         "pass DataConfig(split='test', ...)")


def evaluate_sae(sae: MLSAE, loaded: Any, data: Any, basis: Any = None, **options: Any
                 ) -> list[LayerMetrics]:
    """Metrics per SAE layer on the held-out split `data`: evaluate_saes of one SAE."""
    return evaluate_saes([sae], loaded, data, [basis], **options)[0]


@torch.no_grad()
def evaluate_saes(saes: Sequence[MLSAE], loaded: Any, data: Any,
                  bases: Sequence[Any] | None = None, *, batch_size: int | None = None,
                  memory_bytes: int | None = None, max_tokens: int | None = None,
                  splice: bool = True, progress_log: Callable[[str], None] | None = None,
                  chunk_logits: bool = True, logits_budget_bytes: int | None = None,
                  ) -> list[list[LayerMetrics]]:
    """Metrics per layer of each SAE (one list per SAE, in order) on the held-out split
    `data` (a DataConfig with split="test"), sharing one clean forward pass per batch.

    loaded: a LoadedModel (mlsae.models). The SAEs are moved to the model's device.
    bases: each SAE's ResidualBasis (tuned lens) or None (default: None for all).
    batch_size: sequences per forward pass; None = as many as `memory_bytes` allows
      (mlsae.memory.eval_sizing; memory_bytes None = the device's default budget).
    max_tokens: evaluate on the first ceil(max_tokens / seq_len) sequences (None: all).
    splice=False skips the spliced forward passes (delta_ce and kl are then NaN).
    chunk_logits: compute CE/KL from the last hidden states, unembedding chunks of positions
      (a [8, 2048, 50304] float32 batch of logits would be 3.3 GB per tensor); models whose
      logits are not plain unembeddings use whole logits.
    Each spliced pass starts from the clean pass's output of the spliced block
    (mlsae.hooks.tail_forward): splicing all L layers costs about L/2 passes of blocks.
    Use mean_over_layers(result[i]) for the averages.
    """
    from mlsae.data import load_sequences, special_token_mask
    from mlsae.hooks import capture_residuals, check_layers, clean_pass, tail_forward, unembedding
    from mlsae.memory import default_eval_memory, eval_sizing

    _check_split(data)
    saes = list(saes)
    bases = list(bases) if bases is not None else [None] * len(saes)
    if not saes or len(bases) != len(saes):
        raise ValueError(f"give one basis (or None) per SAE: {len(saes)} SAEs, {len(bases)} "
                         "bases")
    model, tokenizer = loaded.model, loaded.tokenizer
    layers_of = [check_layers(model, sae.cfg.layers) for sae in saes]
    device = next(model.parameters()).device
    for sae in saes:
        sae.to(device).eval()
    seqs = load_sequences(data, tokenizer)
    tokens_BT = np.asarray(seqs.tokens_BT)
    if max_tokens is not None:
        tokens_BT = tokens_BT[: max(1, math.ceil(max_tokens / tokens_BT.shape[1]))]
    mask_BT = np.asarray(special_token_mask(tokens_BT, tokenizer), dtype=bool)
    if not mask_BT.any():
        raise ValueError("the evaluation data has no unmasked tokens: check data.source")
    accs = [{layer: LayerAccumulator(layer, sae.cfg.d_model, sae.cfg.n_latents,
                                     sae.cfg.act_threshold) for layer in layers}
            for sae, layers in zip(saes, layers_of, strict=True)]
    unembed = unembedding(model) if splice and chunk_logits else None
    vocab = int(model.get_output_embeddings().weight.shape[0]) if unembed is not None else 0
    sizing = eval_sizing(model, tokens_BT.shape[1],
                         memory_bytes if memory_bytes is not None else default_eval_memory(device),
                         splice=splice, spliced_layers=max(map(len, layers_of)),
                         n_latents=max(sae.cfg.n_latents for sae in saes))
    batch = batch_size or sizing.batch_sequences
    logits_budget = logits_budget_bytes or sizing.logits_bytes
    log = progress_log or to_stderr
    log(f"evaluate: {len(saes)} autoencoder(s), {tokens_BT.shape[0]} sequences of "
        f"{tokens_BT.shape[1]} tokens, {batch} per pass ({sizing.describe()})")
    # One unit per (token, SAE layer): half for its splice, half for its CE/KL chunks, so the
    # line moves within a batch of a large model.
    per_token = sum(map(len, layers_of))
    progress = Progress("evaluate sae", total=float(mask_BT.sum()) * per_token,
                        unit="token-layers", log=log)
    for b0 in range(0, tokens_BT.shape[0], batch):
        ids = torch.as_tensor(tokens_BT[b0:b0 + batch], dtype=torch.long, device=device)
        mask = torch.as_tensor(mask_BT[b0:b0 + batch], device=device)
        n_tokens = float(mask.sum())
        if not n_tokens:
            continue
        if not splice:
            wanted = sorted({layer for layers in layers_of for layer in layers})
            x_BTLD = capture_residuals(model, ids, wanted)
            for sae, basis, layers, acc in zip(saes, bases, layers_of, accs, strict=True):
                for layer in layers:
                    x_ND = x_BTLD[:, :, wanted.index(layer)][mask].float()
                    x_hat, acts, idx = reconstruct(sae, x_ND, layer, basis)
                    acc[layer].add_reconstruction(x_ND, x_hat, acts, idx)
                    progress.update(n_tokens)
            continue
        clean = clean_pass(model, ids)
        clean_logits = None
        if unembed is None:  # a model whose logits are more than its unembedding
            last = len(clean.outputs) - 1
            clean_logits = tail_forward(model, clean, last, clean.block_output(last), logits=True)
        for sae, basis, layers, acc in zip(saes, bases, layers_of, accs, strict=True):
            h_spliced: dict[int, Tensor] = {}
            for layer in layers:
                h_BTD = clean.block_output(layer)
                x_ND = h_BTD[mask].float()
                x_hat, acts, idx = reconstruct(sae, x_ND, layer, basis)
                acc[layer].add_reconstruction(x_ND, x_hat, acts, idx)
                spliced_BTD = h_BTD.clone()
                spliced_BTD[mask] = x_hat.to(h_BTD.dtype)
                if unembed is not None:
                    h_spliced[layer] = tail_forward(model, clean, layer, spliced_BTD)
                else:
                    logits = tail_forward(model, clean, layer, spliced_BTD, logits=True)
                    acc[layer].add_ce_kl(next_token_ce_kl(clean_logits, logits, ids, mask))
                progress.update(n_tokens * (0.5 if unembed is not None else 1.0))
            if h_spliced:
                def chunk_done(share: float, units: float = 0.5 * n_tokens * len(h_spliced)
                               ) -> None:
                    progress.update(units * share)

                for layer, sums in chunked_ce_kl(unembed, clean.final_BTD, h_spliced, ids, mask,
                                                 vocab, logits_budget, chunk_done).items():
                    acc[layer].add_ce_kl(sums)
        del clean, clean_logits
    results = [[acc[layer].result() for layer in layers] for acc, layers in zip(
        accs, layers_of, strict=True)]
    mean = mean_over_layers([m for result in results for m in result])
    progress.close(fvu=mean.fvu, delta_ce=mean.delta_ce, kl=mean.kl)
    return results


@torch.no_grad()
def reconstruction_metrics(sae: MLSAE, shards: Iterable, basis: Any = None, *,
                           source_layers: Sequence[int] | None = None,
                           device: str | torch.device | None = None) -> list[LayerMetrics]:
    """FVU, MSE, L0 and dead fraction per layer on cached/streamed held-out activations.

    shards: an ActivationCache (its iter_shards()) or an iterable of ShardArrays whose L
    axis holds `source_layers` (default: the cache's layers, else the SAE's). No
    splicing: delta_ce and kl are NaN. Use evaluate_sae for the full SPEC 4 set.
    """
    from mlsae.cache import ActivationCache

    if isinstance(shards, ActivationCache):
        source_layers = shards.manifest.layers
        shards = shards.iter_shards()
    cfg = sae.cfg
    source_layers = list(source_layers if source_layers is not None else cfg.layers)
    missing = [layer for layer in cfg.layers if layer not in source_layers]
    if missing:
        raise ValueError(f"the data lacks the SAE's layers {missing}: it holds {source_layers}")
    device = torch.device(device) if device is not None else sae.W_enc_MD.device
    sae.to(device).eval()
    accs = {layer: LayerAccumulator(layer, cfg.d_model, cfg.n_latents, cfg.act_threshold)
            for layer in cfg.layers}
    for shard in shards:
        mask = np.asarray(shard.mask_BT, dtype=bool)
        for layer in cfg.layers:
            pos = source_layers.index(layer)
            x_ND = torch.from_numpy(np.asarray(shard.acts_BTLD[:, :, pos])[mask]).to(device)
            if x_ND.shape[0] == 0:
                continue
            x_ND = x_ND.float()
            x_hat, acts, idx = reconstruct(sae, x_ND, layer, basis)
            accs[layer].add_reconstruction(x_ND, x_hat, acts, idx)
    return [accs[layer].result() for layer in cfg.layers]
