"""Residual-stream access through forward hooks on the model's own block modules.

x[l] is the OUTPUT of block l (SPEC 1), before any final norm; the embedding
output is not a layer. The same hooks serve GPT-NeoX (Pythia), GPT-2,
Llama-style models and, through a fallback search, most other decoder stacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

# Where well-known architectures keep their blocks (attribute path from the LM wrapper).
_BLOCK_PATHS = ("gpt_neox.layers", "transformer.h", "model.layers", "layers", "h",
                "model.decoder.layers", "transformer.blocks", "transformer.layers")


class _StopForward(Exception):
    """Raised by the last capture hook so blocks after it are never computed."""


def _get_attr_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    for path in _BLOCK_PATHS:
        blocks = _get_attr_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    # Fallback: the ModuleList whose length is the configured depth, else the longest one.
    lists = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [m for m in lists if len(m) == depth]
    if exact:
        return exact[0]
    if lists:
        return max(lists, key=len)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: "
                     f"expected a ModuleList at one of {', '.join(_BLOCK_PATHS)}")


def n_layers(model: nn.Module) -> int:
    return len(get_blocks(model))


def d_model(model: nn.Module) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot read the residual width from {type(config).__name__}")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model accepts, when its config says (None: unknown)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Raise ValueError naming the fix when `seq_len` exceeds the model's maximum positions."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is above this model's maximum of {limit} positions: "
                         f"use --seq-len {limit} or less")


def check_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """Validate block indices (None = all blocks) and return them as a list."""
    n = n_layers(model)
    if layers is None:
        return list(range(n))
    layers = [int(layer) for layer in layers]
    if not layers:
        raise ValueError(f"layers is empty: give block indices in 0..{n - 1}, or None for all")
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range: this model has {n} blocks, "
                         f"valid layers are 0..{n - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} has duplicates: list each block index once")
    return layers


def _hidden(output: object) -> Tensor:
    """A block's output hidden state: the tensor itself, or the first element of a tuple."""
    return output[0] if isinstance(output, tuple | list) else output


def capture_residuals(model: nn.Module, input_ids_BT: Tensor,
                      layers: Sequence[int] | None = None) -> Tensor:
    """Block outputs [B, T, len(layers), D] for `layers` (in the order given; None = all).

    The forward pass stops right after the deepest requested block: later
    blocks, the final norm and the unembedding are never computed. Runs under
    torch.inference_mode: the result is an inference tensor (`.clone()` it to
    feed it to something that records gradients).
    """
    layers = check_layers(model, layers)
    blocks = get_blocks(model)
    last = max(layers)
    captured: dict[int, Tensor] = {}

    def make_hook(layer: int) -> Callable:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            captured[layer] = _hidden(output)
            if layer == last:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in set(layers)]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids_BT.to(_device(model)), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[layer] for layer in layers], dim=2)


@contextlib.contextmanager
def _spliced(model: nn.Module, layer: int, replace: Callable[[Tensor], Tensor]):
    """While inside, block `layer`'s output hidden state is replaced by `replace(h_BTD)`."""
    (layer,) = check_layers(model, [layer])

    def hook(_module: nn.Module, _args: object, output: object) -> object:
        h_BTD = _hidden(output)
        new_BTD = replace(h_BTD)
        if new_BTD.shape != h_BTD.shape:
            raise ValueError(f"replace returned shape {tuple(new_BTD.shape)} for block {layer}; "
                             f"it must return the block output's shape {tuple(h_BTD.shape)}")
        new_BTD = new_BTD.to(h_BTD.dtype)
        if isinstance(output, tuple):
            return (new_BTD, *output[1:])
        return new_BTD

    handle = get_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def splice_forward(model: nn.Module, input_ids_BT: Tensor, layer: int,
                   replace: Callable[[Tensor], Tensor]) -> Tensor:
    """Logits [B, T, V] with block `layer`'s output hidden state replaced by `replace(h_BTD)`.

    An identity `replace` gives exactly the clean logits (the same tensor flows on).
    """
    with _spliced(model, layer, replace), torch.inference_mode():
        return model(input_ids=input_ids_BT.to(_device(model)), use_cache=False).logits


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def final_hidden_states(model: nn.Module, input_ids_BT: Tensor, layer: int | None = None,
                        replace: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The base model's last hidden state [B, T, D] (final norm applied: what the unembedding
    reads), optionally with block `layer`'s output replaced as in splice_forward. Unlike the
    logits [B, T, V] it is small, so evaluation can unembed it in chunks of positions."""
    base = getattr(model, "base_model", model)
    splice = (_spliced(model, layer, replace) if layer is not None and replace is not None
              else contextlib.nullcontext())
    with splice, torch.inference_mode():
        return base(input_ids=input_ids_BT.to(_device(model)), use_cache=False).last_hidden_state


def unembedding(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """h -> logits such that unembedding(final_hidden_states(ids)) == model(ids).logits, or
    None when this model's logits are not just its output embedding of the last hidden
    state (e.g. a logit scale or soft cap): checked once per model on a short input."""
    cached = getattr(model, "_mlsae_unembedding_ok", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "base_model"):
        return None
    if cached is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
        ids = torch.arange(8).remainder(vocab).unsqueeze(0)
        with torch.inference_mode():
            full = model(input_ids=ids.to(_device(model)), use_cache=False).logits
            mine = head(final_hidden_states(model, ids))
        cached = bool(full.shape == mine.shape and torch.allclose(
            full.float(), mine.float(), rtol=1e-4, atol=1e-4 * float(full.abs().max())))
        model._mlsae_unembedding_ok = cached
    return head if cached else None


class CleanPass(NamedTuple):
    """One clean forward pass, kept so spliced passes can start after the spliced block.

    outputs: each block's output exactly as the block returned it (a tensor or a tuple).
    final_BTD: the base model's last hidden state (final norm applied).
    """

    input_ids_BT: Tensor
    outputs: list[object]
    final_BTD: Tensor

    def block_output(self, layer: int) -> Tensor:
        """Block `layer`'s output hidden state [B, T, D]."""
        return _hidden(self.outputs[layer])


def clean_pass(model: nn.Module, input_ids_BT: Tensor) -> CleanPass:
    """The clean forward pass with every block's output recorded (see tail_forward)."""
    blocks = get_blocks(model)
    outputs: list[object] = [None] * len(blocks)

    def make_hook(i: int) -> Callable:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            outputs[i] = output
        return hook

    handles = [block.register_forward_hook(make_hook(i)) for i, block in enumerate(blocks)]
    ids = input_ids_BT.to(_device(model))
    base = getattr(model, "base_model", model)
    try:
        with torch.inference_mode():
            final = base(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return CleanPass(ids, outputs, final)


class _Replay(nn.Module):
    """Stands in for a block during a tail pass: returns what the block returned in the
    clean pass (or the spliced output), without computing anything."""

    def __init__(self, output: object):
        super().__init__()
        self.output = output

    def forward(self, *_args: object, **_kwargs: object) -> object:
        return self.output


def _with_hidden(output: object, h_BTD: Tensor) -> object:
    if isinstance(output, tuple):
        return (h_BTD, *output[1:])
    if isinstance(output, list):
        return [h_BTD, *output[1:]]
    return h_BTD


def tail_forward(model: nn.Module, clean: CleanPass, layer: int, h_BTD: Tensor,
                 logits: bool = False) -> Tensor:
    """What splice_forward / final_hidden_states give with block `layer`'s output replaced by
    `h_BTD`, computing only the blocks after `layer`: blocks 0..layer are swapped for
    stand-ins that return the clean pass's outputs, so the model's own forward (embedding,
    masks, position embeddings, later blocks, final norm) runs unchanged around them.
    Splicing all L layers so costs about L/2 extra passes of blocks, not L.

    logits=False: the last hidden state [B, T, D]; True: the logits [B, T, V].
    """
    (layer,) = check_layers(model, [layer])
    blocks = get_blocks(model)
    old = clean.block_output(layer)
    if h_BTD.shape != old.shape:
        raise ValueError(f"the spliced hidden state has shape {tuple(h_BTD.shape)}; block "
                         f"{layer}'s output has shape {tuple(old.shape)}")
    originals = [blocks[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            blocks[i] = _Replay(clean.outputs[i])
        blocks[layer] = _Replay(_with_hidden(clean.outputs[layer], h_BTD.to(old.dtype)))
        with torch.inference_mode():
            if logits:
                return model(input_ids=clean.input_ids_BT, use_cache=False).logits
            base = getattr(model, "base_model", model)
            return base(input_ids=clean.input_ids_BT, use_cache=False).last_hidden_state
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
