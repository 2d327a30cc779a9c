"""Forward hooks on block modules: block outputs, early stop, splicing, bad layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlsae.hooks import (
    capture_residuals,
    check_seq_len,
    clean_pass,
    d_model,
    get_blocks,
    n_layers,
    splice_forward,
    tail_forward,
)

ARCHS = ["tiny_neox", "tiny_gpt2", "tiny_llama"]


def _final_norm(model: nn.Module) -> nn.Module:
    base = model.base_model
    for name in ("final_layer_norm", "ln_f", "norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError(f"no final norm on {type(base).__name__}")


def _ids(seed: int = 1, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_block_outputs_match_hidden_states_and_pre_norm(arch, request):
    model = request.getfixturevalue(arch)
    ids_BT = _ids()
    L = n_layers(model)
    assert L == 3 and d_model(model) == 32
    pre_norm = {}
    handle = _final_norm(model).register_forward_pre_hook(
        lambda _m, args: pre_norm.setdefault("x", args[0].clone()))
    with torch.inference_mode():
        out = model(input_ids=ids_BT, output_hidden_states=True)
    handle.remove()
    acts_BTLD = capture_residuals(model, ids_BT)  # all layers
    assert acts_BTLD.shape == (2, 12, L, 32)
    # hidden_states[0] is the embedding output; [l + 1] the output of block l (l < L - 1).
    for layer in range(L - 1):
        assert torch.equal(acts_BTLD[:, :, layer], out.hidden_states[layer + 1])
    # transformers 5 applies the final norm to hidden_states[-1]: the last block's output
    # is what goes INTO the final norm.
    assert torch.equal(acts_BTLD[:, :, L - 1], pre_norm["x"])
    assert not torch.allclose(acts_BTLD[:, :, L - 1], out.hidden_states[L])


def test_layer_subset_in_requested_order(tiny_neox):
    ids_BT = _ids()
    all_BTLD = capture_residuals(tiny_neox, ids_BT)
    sub_BTLD = capture_residuals(tiny_neox, ids_BT, [2, 0])
    assert torch.equal(sub_BTLD[:, :, 0], all_BTLD[:, :, 2])
    assert torch.equal(sub_BTLD[:, :, 1], all_BTLD[:, :, 0])


@pytest.mark.parametrize("arch", ["tiny_neox", "tiny_gpt2"])
def test_forward_stops_after_last_requested_layer(arch, request):
    model = request.getfixturevalue(arch)
    calls = []
    later = [*list(get_blocks(model))[1:], _final_norm(model), model.get_output_embeddings()]
    handles = [m.register_forward_hook(lambda m, a, o: calls.append(m)) for m in later]
    first = get_blocks(model)[0].register_forward_hook(lambda m, a, o: calls.append("block0"))
    try:
        with torch.inference_mode():
            model(input_ids=_ids())
        assert len(calls) == 1 + len(later)  # the counting hooks do fire on a full pass
        calls.clear()
        acts_BTLD = capture_residuals(model, _ids(), [0])
    finally:
        for h in [*handles, first]:
            h.remove()
    assert calls == ["block0"]  # block 0 ran; blocks 1.., final norm and unembedding did not
    assert acts_BTLD.shape == (2, 12, 1, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_splice_identity_is_exact_and_noise_changes_logits(arch, request):
    model = request.getfixturevalue(arch)
    ids_BT = _ids(seed=2)
    with torch.inference_mode():
        clean_BTV = model(input_ids=ids_BT).logits
    for layer in range(n_layers(model)):
        same_BTV = splice_forward(model, ids_BT, layer, lambda h: h)
        assert torch.equal(same_BTV, clean_BTV)
        # the clean activation passed in as a copy also reproduces the logits exactly
        clean_BTD = capture_residuals(model, ids_BT, [layer])[:, :, 0]
        copy_BTV = splice_forward(model, ids_BT, layer, lambda h, c=clean_BTD: c.clone())
        assert torch.equal(copy_BTV, clean_BTV)
        noisy_BTV = splice_forward(model, ids_BT, layer, lambda h: h + 0.5 * torch.randn_like(h))
        assert (noisy_BTV - clean_BTV).abs().max() > 1e-3
    # splicing leaves no hook behind
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids_BT).logits, clean_BTV)


def test_splice_rejects_wrong_shape(tiny_neox):
    with pytest.raises(ValueError, match="must return the block output's shape"):
        splice_forward(tiny_neox, _ids(), 1, lambda h: h[:, :-1])


@pytest.mark.parametrize("bad", [3, -1, 10])
def test_layer_out_of_range_names_valid_range(tiny_gpt2, bad):
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.2"):
        capture_residuals(tiny_gpt2, _ids(), [0, bad])
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.2"):
        splice_forward(tiny_gpt2, _ids(), bad, lambda h: h)


def test_duplicate_layers_rejected(tiny_neox):
    with pytest.raises(ValueError, match="duplicates"):
        capture_residuals(tiny_neox, _ids(), [1, 1])


def test_seq_len_above_max_positions(tiny_neox):
    check_seq_len(tiny_neox, 64)
    with pytest.raises(ValueError, match="maximum of 64 positions: use --seq-len 64"):
        check_seq_len(tiny_neox, 65)


def test_generic_fallback_finds_blocks(tiny_neox):
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.config = inner.config
            self.stack = nn.ModuleList([nn.Linear(2, 2)])  # a decoy
            self.trunk = inner

    wrapped = Wrapped(tiny_neox)
    assert get_blocks(wrapped) is tiny_neox.gpt_neox.layers


@pytest.mark.parametrize("arch", ARCHS)
def test_unembedding_of_the_final_hidden_state_is_the_logits(arch, request):
    """Evaluation unembeds chunks of the last hidden state instead of holding [B, T, V]
    logits: for every supported architecture that gives the model's own logits, spliced or
    not."""
    from mlsae.hooks import final_hidden_states, unembedding

    model = request.getfixturevalue(arch)
    ids_BT = _ids(seed=3)
    unembed = unembedding(model)
    assert unembed is not None
    with torch.inference_mode():
        clean_BTV = model(input_ids=ids_BT).logits
        assert torch.allclose(unembed(final_hidden_states(model, ids_BT)), clean_BTV, atol=1e-5)
        noisy = lambda h: h + 0.5 * torch.randn(h.shape, generator=torch.Generator().manual_seed(0))  # noqa: E731
        spliced_BTV = splice_forward(model, ids_BT, 1, noisy)
        mine_BTV = unembed(final_hidden_states(model, ids_BT, 1, noisy))
    assert torch.allclose(mine_BTV, spliced_BTV, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_tail_from_the_clean_pass_equals_the_full_spliced_pass(arch, request):
    """Splicing from the clean pass's block outputs (only blocks after the spliced one run)
    gives the full spliced forward pass's logits and last hidden state, for every layer;
    GPT-NeoX here has the parallel residual (Pythia's)."""
    from mlsae.hooks import final_hidden_states

    model = request.getfixturevalue(arch)
    if arch == "tiny_neox":
        assert model.config.use_parallel_residual
    ids_BT = _ids(seed=3)
    clean = clean_pass(model, ids_BT)
    with torch.inference_mode():
        assert torch.equal(clean.final_BTD, final_hidden_states(model, ids_BT))
    blocks_before = list(get_blocks(model))
    for layer in range(n_layers(model)):
        noise_BTD = 0.5 * torch.randn_like(clean.block_output(layer))
        full_BTV = splice_forward(model, ids_BT, layer, lambda h, n=noise_BTD: h + n)
        tail_BTV = tail_forward(model, clean, layer, clean.block_output(layer) + noise_BTD,
                                logits=True)
        torch.testing.assert_close(tail_BTV, full_BTV, rtol=1e-5, atol=1e-5)
        full_BTD = final_hidden_states(model, ids_BT, layer, lambda h, n=noise_BTD: h + n)
        tail_BTD = tail_forward(model, clean, layer, clean.block_output(layer) + noise_BTD)
        torch.testing.assert_close(tail_BTD, full_BTD, rtol=1e-5, atol=1e-5)
        assert (tail_BTV - model(input_ids=ids_BT).logits).abs().max() > 1e-3
    assert list(get_blocks(model)) == blocks_before  # the stand-ins are gone


def test_tail_forward_skips_the_blocks_before_the_splice(tiny_neox):
    """The prefix is not recomputed: splicing at the last block runs no block at all."""
    ids_BT = _ids(seed=4)
    clean = clean_pass(tiny_neox, ids_BT)
    calls: list[int] = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, block in enumerate(get_blocks(tiny_neox))]
    try:
        for layer in range(n_layers(tiny_neox)):
            tail_forward(tiny_neox, clean, layer, clean.block_output(layer))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [1, 2, 2]  # after 0: blocks 1, 2; after 1: block 2; after 2: none


def test_tail_forward_rejects_a_wrong_shape(tiny_neox):
    clean = clean_pass(tiny_neox, _ids())
    with pytest.raises(ValueError, match="block 1's output has shape"):
        tail_forward(tiny_neox, clean, 1, torch.zeros(1, 2, 3))
