"""Train a tuned lens for any local model with a short KL(final || lens) loop.

tuned-lens 0.2.0's own training CLI does not run on current torch/transformers
(ENV.md), so this is a small loop over `tuned_lens.TunedLens`: the model is
frozen, each translator i maps stream index i (0 = embeddings, i = output of
block i-1) so that the unembedded result predicts the model's final
distribution. The loss is the sum over translators of the mean, over counted
tokens, of KL(p_final || p_lens); special tokens are left out (SPEC 1). The
lens is saved with `TunedLens.save` (params.pt + config.json) so tuned-lens
and other tools load it, plus `training.json` with how it was made.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mlsae.models import LoadedModel
from mlsae.progress import Progress

if TYPE_CHECKING:
    from tuned_lens import TunedLens


@dataclass
class LensTrainConfig:
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 256
    """Tokens per sequence."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warmup, then linear decay to 0)."""
    warmup_steps: int = 20
    """Steps of linear warmup."""
    weight_decay: float = 1e-3
    """AdamW weight decay: pulls the translators toward the identity map (as tuned-lens does)."""
    data: str | None = None
    """Text to train on: None = the embedded corpus, else a Parquet/text file or directory."""
    max_sequences: int | None = None
    """Cap on training sequences read (None = steps * batch_size, the most one pass uses)."""
    seed: int = 0
    """Seed for the order of sequences."""
    extra: dict = field(default_factory=dict)
    """Free-form notes copied into training.json (e.g. the command line)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"LensTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"LensTrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"LensTrainConfig.warmup_steps must be in [0, steps={self.steps}), "
                             f"got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"LensTrainConfig.weight_decay must be >= 0, got {self.weight_decay}")


class LensTrainResult(NamedTuple):
    lens: TunedLens
    steps: int
    tokens: int          # counted (unmasked) tokens seen
    seconds: float
    loss_history: list[float]  # summed per-translator KL, per step


class LensKL(NamedTuple):
    tuned_L: np.ndarray  # mean KL(final || tuned lens) per stream index 0..L-1, nats
    logit_L: np.ndarray  # the same for the logit lens (no translator)
    n_tokens: int


def new_lens(model: torch.nn.Module, name: str) -> TunedLens:
    """A zero-initialised (= logit lens) float32 TunedLens for `model`, named `name`."""
    from tuned_lens import TunedLens

    lens = TunedLens.from_model(model).float()  # float32 even for a half-precision model
    lens.config.base_model_name_or_path = name
    return lens.to(next(model.parameters()).device)


def _stream(model: torch.nn.Module, ids_BT: Tensor) -> tuple[list[Tensor], Tensor]:
    """Hidden states at stream indices 0..L-1 (float32) and the final log-probs."""
    out = model(input_ids=ids_BT, output_hidden_states=True)
    # hidden_states[-1] is the final-normed last block output: the lens never sees it.
    hidden = [h.float() for h in out.hidden_states[:-1]]
    return hidden, out.logits.float().log_softmax(-1)


def _kl_BT(logp_BTV: Tensor, logq_BTV: Tensor) -> Tensor:
    return (logp_BTV.exp() * (logp_BTV - logq_BTV)).sum(-1)


def train_lens(model: torch.nn.Module, tokens_BT: Tensor | np.ndarray,
               cfg: LensTrainConfig | None = None, mask_BT: Tensor | np.ndarray | None = None,
               name: str = "model", lens: TunedLens | None = None) -> LensTrainResult:
    """Fit a tuned lens to `model` on `tokens_BT` (mask_BT False = not counted)."""
    cfg = cfg or LensTrainConfig()
    device = next(model.parameters()).device
    tokens_BT = torch.as_tensor(np.asarray(tokens_BT), dtype=torch.long)
    mask_BT = (torch.ones_like(tokens_BT, dtype=torch.bool) if mask_BT is None
               else torch.as_tensor(np.asarray(mask_BT), dtype=torch.bool))
    if tokens_BT.ndim != 2 or mask_BT.shape != tokens_BT.shape or len(tokens_BT) == 0:
        raise ValueError(f"need tokens [B, T] and a mask of the same shape, got "
                         f"{tuple(tokens_BT.shape)} and {tuple(mask_BT.shape)}")
    lens = lens or new_lens(model, name)
    model.requires_grad_(False)
    params = list(lens.layer_translators.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / (cfg.warmup_steps + 1), (cfg.steps - s) / max(1, cfg.steps - cfg.warmup_steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(tokens_BT), generator=gen)
    pos, seen, history = 0, 0, []
    progress = Progress("tuned lens", total=cfg.steps * cfg.batch_size * tokens_BT.shape[1])
    start = time.perf_counter()
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > len(order):  # next epoch, new order
            order, pos = torch.randperm(len(tokens_BT), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        ids, mask = tokens_BT[idx].to(device), mask_BT[idx].to(device)
        with torch.no_grad():
            hidden, logp = _stream(model, ids)
        p_mask = logp[mask]
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for i, h in enumerate(hidden):
            # One backward per translator keeps only one [tokens, V] graph alive.
            kl = _kl_BT(p_mask, lens(h[mask], i).log_softmax(-1)).mean()
            kl.backward()
            total += kl.item()
        opt.step()
        sched.step()
        history.append(total)
        n = int(mask.sum())
        seen += n
        progress.update(ids.numel(), kl=total, lr=sched.get_last_lr()[0])
    progress.close(kl=history[-1])
    return LensTrainResult(lens, cfg.steps, seen, time.perf_counter() - start, history)


@torch.no_grad()
def lens_kl(model: torch.nn.Module, lens: TunedLens | None, tokens_BT: Tensor | np.ndarray,
            mask_BT: Tensor | np.ndarray | None = None, batch_size: int = 8) -> LensKL:
    """Per stream index, the mean KL(final || lens) and KL(final || logit lens) on counted tokens."""
    from tuned_lens.nn.unembed import Unembed

    device = next(model.parameters()).device
    tokens_BT = torch.as_tensor(np.asarray(tokens_BT), dtype=torch.long)
    mask_BT = (torch.ones_like(tokens_BT, dtype=torch.bool) if mask_BT is None
               else torch.as_tensor(np.asarray(mask_BT), dtype=torch.bool))
    unembed = lens.unembed if lens is not None else Unembed(model).float().to(device)
    n_layers = model.config.num_hidden_layers
    tuned = torch.zeros(n_layers, dtype=torch.float64)
    logit = torch.zeros(n_layers, dtype=torch.float64)
    n = 0
    for s in range(0, len(tokens_BT), batch_size):
        ids, mask = tokens_BT[s:s + batch_size].to(device), mask_BT[s:s + batch_size].to(device)
        hidden, logp = _stream(model, ids)
        p_mask = logp[mask]
        for i, h in enumerate(hidden):
            h_mask = h[mask]
            logit[i] += _kl_BT(p_mask, unembed(h_mask).log_softmax(-1)).double().sum().cpu()
            if lens is not None:
                tuned[i] += _kl_BT(p_mask, lens(h_mask, i).log_softmax(-1)).double().sum().cpu()
        n += int(mask.sum())
    if n == 0:
        raise ValueError("no counted tokens to evaluate the lens on")
    tuned_L = (tuned / n).numpy() if lens is not None else np.full(n_layers, math.nan)
    return LensKL(tuned_L, (logit / n).numpy(), n)


def corpus_sequences(tokenizer, source: str | None = None, split: str = "train",
                     seq_len: int = 256, max_sequences: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BT int32, mask_BT bool) from `source` (None = embedded corpus); special tokens False."""
    from mlsae.data import DataConfig, load_sequences, special_token_mask

    seqs = load_sequences(DataConfig(source=source, split=split, seq_len=seq_len,
                                     max_sequences=max_sequences), tokenizer)
    tokens_BT = np.asarray(seqs.tokens_BT)
    return tokens_BT, np.asarray(special_token_mask(tokens_BT, tokenizer), dtype=bool)


def save_lens(lens: TunedLens, out_dir: str | Path, meta: dict) -> Path:
    """Write params.pt + config.json (tuned-lens's format) and training.json into `out_dir`."""
    out = Path(out_dir)
    lens.save(out)
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def train_lens_for_model(loaded: LoadedModel, out_dir: str | Path,
                         cfg: LensTrainConfig | None = None) -> LensTrainResult:
    """Train a lens for `loaded` on `cfg.data` (default: embedded corpus) and save it to out_dir."""
    cfg = cfg or LensTrainConfig()
    cap = cfg.max_sequences or cfg.steps * cfg.batch_size
    tokens_BT, mask_BT = corpus_sequences(loaded.tokenizer, cfg.data, "train", cfg.seq_len, cap)
    result = train_lens(loaded.model, tokens_BT, cfg, mask_BT, name=loaded.name)
    save_lens(result.lens, out_dir, {
        "model": loaded.name, "config": asdict(cfg), "steps": result.steps,
        "tokens": result.tokens, "seconds": round(result.seconds, 1),
        "final_loss": result.loss_history[-1],
    })
    return result
