"""Tuned-lens basis: index mapping vs tuned-lens itself, exact inverse, checks, save/load, training."""

from __future__ import annotations

import time

import pytest
import torch
from tuned_lens import TunedLens
from tuned_lens.model_surgery import get_transformer_layers

from mlsae.lens import (
    IdentityBasis,
    LensError,
    ResidualBasis,
    TunedLensBasis,
    load_basis,
    load_lens_basis,
    load_tuned_lens,
    translator_index,
)
from mlsae.lens_train import LensTrainConfig, lens_kl, new_lens, save_lens, train_lens
from mlsae.models import LoadedModel

pytestmark = pytest.mark.usefixtures("one_thread")


def random_lens(model, scale: float = 0.5, seed: int = 0) -> TunedLens:
    """A lens with clearly non-trivial, different translators (A ~ scale * O(1) spectrum)."""
    lens = new_lens(model, "tiny")
    gen = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(scale * torch.randn(d, d, generator=gen) / d**0.5)
            t.bias.copy_(torch.randn(d, generator=gen))
    return lens


def block_outputs(model, ids_BT):
    """Block outputs via forward hooks on the model's own blocks (as the pipeline takes them)."""
    _, blocks = get_transformer_layers(model)
    outs: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(
        lambda mod, inp, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            res = model(input_ids=ids_BT, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(blocks))], res


def test_translator_index():
    assert [translator_index(i, 4) for i in range(4)] == [1, 2, 3, None]
    with pytest.raises(ValueError, match="block index"):
        translator_index(4, 4)


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_mapping_agrees_with_tuned_lens_on_real_hidden_states(fixture, request):
    model = request.getfixturevalue(fixture)
    lens = random_lens(model)
    basis = TunedLensBasis.from_lens(lens)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    blocks, res = block_outputs(model, ids)
    L = model.config.num_hidden_layers
    with torch.no_grad():
        for layer in range(L - 1):
            # hidden_states[l+1] is block l's output: tuned-lens's stream index l+1.
            torch.testing.assert_close(blocks[layer], res.hidden_states[layer + 1])
            ours = basis.to_sae(blocks[layer], layer)
            torch.testing.assert_close(ours, lens.transform_hidden(res.hidden_states[layer + 1],
                                                                   layer + 1))
            torch.testing.assert_close(lens.unembed(ours), lens(res.hidden_states[layer + 1],
                                                                layer + 1))
            # An off-by-one (translator l) would be visibly different.
            assert not torch.allclose(ours, lens.transform_hidden(blocks[layer], layer), atol=1e-3)
        # The last block is not translated: unembedding it untouched gives the model's logits.
        last = basis.to_sae(blocks[L - 1], L - 1)
        assert torch.equal(last, blocks[L - 1])
        torch.testing.assert_close(lens.unembed(last), res.logits)
        # Per-row layer indices give the same as one layer at a time.
        x_ND = torch.cat([b.reshape(-1, b.shape[-1]) for b in blocks])
        layer_N = torch.arange(L).repeat_interleave(blocks[0].shape[0] * blocks[0].shape[1])
        perm = torch.randperm(len(x_ND), generator=torch.Generator().manual_seed(2))
        y_ND = basis.to_sae(x_ND[perm], layer_N[perm])
        expect = torch.cat([basis.to_sae(b, i).reshape(-1, b.shape[-1])
                            for i, b in enumerate(blocks)])[perm]
        torch.testing.assert_close(y_ND, expect)


def test_round_trip_random_vectors_exact_inverse():
    L, D, N = 4, 64, 512
    gen = torch.Generator().manual_seed(0)
    W = 0.6 * torch.randn(L, D, D, generator=gen) / D**0.5
    b = torch.randn(L, D, generator=gen)
    basis = TunedLensBasis(W, b)
    assert float(W[1].norm() / D**0.5) > 0.5  # far from the identity map
    x64 = torch.randn(N, D, dtype=torch.float64, generator=gen) * 3
    layer_N = torch.randint(0, L, (N,), generator=gen)
    y64 = basis.to_sae(x64, layer_N)
    assert (y64 - x64)[layer_N < L - 1].abs().mean() > 0.3
    torch.testing.assert_close(basis.from_sae(y64, layer_N), x64, rtol=0, atol=1e-10)
    x32 = x64.float()
    torch.testing.assert_close(basis.from_sae(basis.to_sae(x32, layer_N), layer_N), x32,
                               rtol=1e-4, atol=1e-4)
    # Half precision in, half out, computed in float32.
    x16 = x32.half()
    back16 = basis.from_sae(basis.to_sae(x16, layer_N), layer_N)
    assert back16.dtype == torch.float16
    torch.testing.assert_close(back16.float(), x16.float(), rtol=0, atol=2e-2)
    # The reference code's diagonal inverse is NOT an inverse here.
    A1 = W[2]  # block 1 uses translator 2
    y1 = basis.to_sae(x64[:8], 1)
    diag = (y1 - b[2].double()) / (1 + torch.diagonal(A1).double())
    assert (diag - x64[:8]).abs().max() > 0.1


def test_round_trip_real_activations_and_last_layer_identity(tiny_neox):
    lens = random_lens(tiny_neox, scale=0.8)
    basis = TunedLensBasis.from_lens(lens)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(3))
    blocks, _ = block_outputs(tiny_neox, ids)
    L = len(blocks)
    for layer, x_BTD in enumerate(blocks):
        y = basis.to_sae(x_BTD, layer)
        torch.testing.assert_close(basis.from_sae(y, layer), x_BTD, rtol=1e-4, atol=1e-4)
        if layer == L - 1:
            assert torch.equal(y, x_BTD) and torch.equal(basis.from_sae(y, layer), y)
        else:
            assert (y - x_BTD).abs().mean() > 0.1
    x_ND = torch.cat([b.reshape(-1, 32) for b in blocks])
    layer_N = torch.arange(L).repeat_interleave(48)
    y_ND = basis.to_sae(x_ND, layer_N)
    assert torch.equal(y_ND[layer_N == L - 1], x_ND[layer_N == L - 1])
    torch.testing.assert_close(basis.from_sae(y_ND, layer_N), x_ND, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one block index per row"):
        basis.to_sae(x_ND, layer_N[:-1])
    with pytest.raises(ValueError, match="block index"):
        basis.to_sae(x_ND, L)


def test_identity_basis():
    basis = load_basis(None, LoadedModel(None, None, "x"))
    assert isinstance(basis, IdentityBasis) and isinstance(basis, ResidualBasis)
    assert isinstance(load_basis("none", LoadedModel(None, None, "x")), IdentityBasis)
    x = torch.randn(5, 8)
    assert basis.to_sae(x, 0) is x and basis.from_sae(x, torch.zeros(5)) is x
    assert isinstance(TunedLensBasis(torch.zeros(2, 4, 4), None), ResidualBasis)


def test_save_load_round_trip_through_tuned_lens(tiny_neox, tmp_path):
    lens = random_lens(tiny_neox)
    save_lens(lens, tmp_path / "lens", {"note": "test"})
    loaded = TunedLens.from_model_and_pretrained(tiny_neox, str(tmp_path / "lens"))
    for a, b in zip(lens.layer_translators, loaded.layer_translators, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert loaded.config.base_model_name_or_path == "tiny"
    assert isinstance(load_tuned_lens(tmp_path / "lens", tiny_neox), TunedLens)
    ours = load_basis(str(tmp_path / "lens"), LoadedModel(tiny_neox, None, "tiny"))
    ref = TunedLensBasis.from_lens(lens)
    x = torch.randn(10, 32)
    for layer in range(3):
        torch.testing.assert_close(ours.to_sae(x, layer), ref.to_sae(x, layer))
    assert ours.name == str(tmp_path / "lens")


def test_mismatched_lens_errors(tiny_neox, tiny_gpt2, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    save_lens(random_lens(tiny_neox), tmp_path / "neox", {})
    # Same layer count and width, different model: caught by tuned-lens's unembedding hash.
    with pytest.raises(LensError, match="trained for another model.*train one"):
        load_lens_basis(tmp_path / "neox", tiny_gpt2)
    wide = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).eval()
    with pytest.raises(LensError, match="3 layers of width 32.*3 layers of width 48"):
        load_lens_basis(tmp_path / "neox", wide)
    deep = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).eval()
    with pytest.raises(LensError, match="layers"):
        load_basis(str(tmp_path / "neox"), LoadedModel(deep, None, "deep"))
    with pytest.raises(LensError, match="does not exist"):
        load_basis(str(tmp_path / "nope"), LoadedModel(tiny_neox, None, "t"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LensError, match="params.pt"):
        load_basis(str(tmp_path / "empty"), LoadedModel(tiny_neox, None, "t"))


def test_hub_lens_offline_fails_fast_with_fix(tiny_neox):
    start = time.perf_counter()
    with pytest.raises(LensError, match="not reachable.*hf download"):
        load_basis("EleutherAI/pythia-70m-deduped", LoadedModel(tiny_neox, None, "t"))
    assert time.perf_counter() - start < 5


def test_singular_lens_refused():
    W = torch.zeros(3, 4, 4)
    W[1] = -torch.eye(4)  # I + A = 0
    with pytest.raises(LensError, match="ill-conditioned"):
        TunedLensBasis(W, None)


def test_training_reduces_kl(tiny_neox, capsys):
    gen = torch.Generator().manual_seed(1)
    train_BT = torch.randint(0, 97, (64, 32), generator=gen)
    test_BT = torch.randint(0, 97, (16, 32), generator=gen)
    mask_BT = torch.ones_like(train_BT, dtype=torch.bool)
    mask_BT[:, 0] = False  # e.g. a BOS column: not counted
    cfg = LensTrainConfig(steps=60, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5)
    result = train_lens(tiny_neox, train_BT, cfg, mask_BT, name="tiny")
    assert result.tokens == 60 * 8 * 31
    kl = lens_kl(tiny_neox, result.lens, test_BT)
    assert (kl.tuned_L < 0.5 * kl.logit_L).all(), kl
    assert "tuned lens" in capsys.readouterr().err


def test_train_config_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        LensTrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="lr"):
        LensTrainConfig(lr=0)


def test_auto_trains_once_then_reuses(tiny_neox, tmp_path, monkeypatch):
    import mlsae.lens_train as lt

    calls = []

    def fake_corpus(tokenizer, source, split, seq_len, max_sequences):
        calls.append(split)
        ids = torch.randint(0, 97, (16, seq_len), generator=torch.Generator().manual_seed(0))
        return ids.numpy(), torch.ones_like(ids, dtype=torch.bool).numpy()

    monkeypatch.setattr(lt, "corpus_sequences", fake_corpus)
    loaded = LoadedModel(tiny_neox, None, "/some/local/tiny-model")
    cfg = LensTrainConfig(steps=3, batch_size=4, seq_len=16, warmup_steps=1)
    first = load_basis("auto", loaded, train=cfg, cache_dir=tmp_path)
    assert isinstance(first, TunedLensBasis) and calls == ["train"]
    lens_dir = tmp_path / "some--local--tiny-model"
    assert (lens_dir / "params.pt").exists() and (lens_dir / "training.json").exists()
    second = load_basis("auto", loaded, train=cfg, cache_dir=tmp_path)
    assert calls == ["train"] and second.name == str(lens_dir)
    x = torch.randn(4, 32)
    torch.testing.assert_close(first.to_sae(x, 0), second.to_sae(x, 0))


def test_committed_embedded_lens_fits_the_embedded_model():
    import json

    from mlsae.models import load_model
    from mlsae.paths import EMBEDDED_LENS_DIR

    loaded = load_model(None, device="cpu")
    basis = load_basis("embedded", loaded)
    assert isinstance(basis, TunedLensBasis) and basis.name == "embedded"
    assert (basis.n_layers, basis.d_model) == (6, 256)
    card = json.loads((EMBEDDED_LENS_DIR / "training.json").read_text())
    assert all(t < lg for t, lg in zip(card["kl"]["tuned"], card["kl"]["logit"], strict=True))
    # Real activations of the real model round-trip through the committed lens.
    ids = loaded.tokenizer("And God said, Let there be light: and there was light. "
                           "To be, or not to be, that is the question.",
                           return_tensors="pt")["input_ids"]
    blocks, _ = block_outputs(loaded.model, ids)
    for layer, x in enumerate(blocks):
        torch.testing.assert_close(basis.from_sae(basis.to_sae(x, layer), layer), x,
                                   rtol=1e-4, atol=1e-4)
    # tuned-lens itself loads it, and it beats the logit lens on held-out-like text.
    lens = TunedLens.from_model_and_pretrained(loaded.model, str(EMBEDDED_LENS_DIR))
    kl = lens_kl(loaded.model, lens, ids)
    assert (kl.tuned_L[1:] < kl.logit_L[1:]).all(), kl


def test_lens_loads_after_setting_two_threads():
    """oneMKL's batched float64 inverse (torch 2.13.0 CPU) fails and hangs after an explicit
    torch.set_num_threads(2) in a fresh process; the lens inverts on one thread."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(2)\n"
            "from mlsae.models import load_model\nfrom mlsae.lens import load_basis\n"
            "b = load_basis('embedded', load_model('embedded', device='cpu'))\n"
            "assert torch.get_num_threads() == 2\nprint('loaded', b.n_layers)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "loaded 6" in done.stdout, done.stderr[-2000:]
    assert "DLASWP" not in done.stderr
