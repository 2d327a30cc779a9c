"""How many sequences one evaluation or latent-logging pass may take for a memory budget.

The budget is working memory for activations on the model's device (the model's and
the autoencoders' weights are not counted). What one sequence costs follows from the
model's width, depth, MLP width, heads and vocabulary (read from its config): the
clean pass keeps every block's output, the spliced passes of one autoencoder keep
their last hidden states, one block's intermediates are alive at a time, and logits
and encoder pre-activations are computed in chunks of bounded size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

CPU_DEFAULT_BYTES = 2 * 2**30
"""Default on a CPU: 2 GiB (or an eighth of the RAM, if less)."""
LOGITS_MAX_BYTES = 256 * 2**20
"""Logits are unembedded in chunks of at most this many bytes (or a quarter of the budget)."""
RUNTIME_BYTES = 64 * 2**20
"""Held back from every budget for what the runtime allocates on its own (thread pools'
scratch, kernel workspaces, the tokenized text): measured at about 50-100 MiB on CPU."""


def default_eval_memory(device: str | torch.device) -> int:
    """The device's default budget: half the free memory of a GPU; on a CPU 2 GiB (or an
    eighth of the RAM when that is less)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 2**30
    return int(min(CPU_DEFAULT_BYTES, ram // 8))


class PassSizing(NamedTuple):
    batch_sequences: int
    """Sequences per forward pass."""
    logits_bytes: int
    """Bytes of float32 logits unembedded at once (0 without splicing)."""
    sequence_bytes: int
    """Working memory one sequence costs."""
    budget_bytes: int

    def describe(self) -> str:
        from mlsae.estimate import format_bytes

        return (f"memory budget {format_bytes(self.budget_bytes)}, "
                f"~{format_bytes(self.sequence_bytes)} per sequence")


def _config_int(model: nn.Module, names: tuple[str, ...], default: int) -> int:
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def sequence_bytes(model: nn.Module, seq_len: int, *, splice: bool, spliced_layers: int = 0
                   ) -> int:
    """Working memory of one sequence in an evaluation (splice=True) or capture pass."""
    from mlsae.hooks import d_model, n_layers

    d, depth = d_model(model), n_layers(model)
    width = next(model.parameters()).element_size()
    heads = _config_int(model, ("num_attention_heads", "n_head"), 1)
    mlp = _config_int(model, ("intermediate_size", "n_inner"), 4 * d)
    # Kept: every block's output (the clean pass; a capture pass stops at the deepest layer).
    kept = depth * seq_len * d * width
    # One block at a time: q, k, v, attention output, residual sums (~8 d), the MLP's
    # input/activation/gate (3 x mlp), and attention scores plus their softmax.
    block = seq_len * (8 * d + 3 * mlp) * width + 2 * heads * seq_len * seq_len * 4
    # The rows handed to the autoencoder and its reconstruction, in float32.
    rows = 3 * seq_len * d * 4
    spliced = 0
    if splice:  # the clean and one autoencoder's spliced last hidden states, and a clone
        spliced = (spliced_layers + 2) * seq_len * d * width
    return kept + block + rows + spliced


def eval_sizing(model: nn.Module, seq_len: int, budget_bytes: int, *, splice: bool = True,
                spliced_layers: int = 0, n_latents: int = 0) -> PassSizing:
    """The largest batch of sequences whose working memory fits `budget_bytes`; ValueError
    naming the smallest budget that fits one sequence when even that does not.
    n_latents: the widest autoencoder's latents (its pre-activations are computed in row
    chunks of at most MAX_PRE_ELEMENTS, so they cost per sequence only up to that cap)."""
    from mlsae.estimate import format_bytes
    from mlsae.sae.kernels import MAX_PRE_ELEMENTS

    per_sequence = sequence_bytes(model, seq_len, splice=splice, spliced_layers=spliced_layers)
    logits = min(LOGITS_MAX_BYTES, budget_bytes // 4) if splice else 0
    free = budget_bytes - logits - RUNTIME_BYTES
    pre_per_sequence = seq_len * n_latents * 4
    batch = max(free // (per_sequence + pre_per_sequence),  # pre-activations below the cap
                (free - MAX_PRE_ELEMENTS * 4) // per_sequence)  # at the cap
    if batch < 1:
        need = (logits + RUNTIME_BYTES + per_sequence
                + min(pre_per_sequence, MAX_PRE_ELEMENTS * 4))
        raise ValueError(f"eval memory {format_bytes(budget_bytes)} is too small: one sequence "
                         f"of {seq_len} tokens needs about {format_bytes(need)} with this model; "
                         f"raise --eval-memory to at least {format_bytes(need)} or lower "
                         "--seq-len")
    return PassSizing(int(batch), int(logits), int(per_sequence + pre_per_sequence),
                      int(budget_bytes))
