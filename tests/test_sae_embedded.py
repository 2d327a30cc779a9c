"""SAE training and SPEC 4 evaluation on real transformer forward passes.

A small random GPT-NeoX with the embedded tokenizer always runs (the splicing
wiring); the embedded model itself runs once its weights are committed.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlsae.data import DataConfig
from mlsae.extract import ExtractConfig, extract_to_cache, stream_activations
from mlsae.models import LoadedModel, load_model
from mlsae.paths import EMBEDDED_MODEL_DIR
from mlsae.sae import SAEConfig, TrainConfig, evaluate_sae, mean_over_layers, train_sae
from mlsae.sae import evaluate as ev
from mlsae.sae.evaluate import reconstruction_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_loaded():
    """A random 2-block GPT-NeoX over the embedded tokenizer's vocabulary."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, rotary_pct=0.25)
    return LoadedModel(GPTNeoXForCausalLM(cfg).eval(), tokenizer, "tiny")


def test_streamed_training_and_spliced_evaluation_on_a_tiny_model(tiny_loaded, tmp_path,
                                                                   monkeypatch):
    data = DataConfig(split="train", seq_len=32)
    stream = stream_activations(ExtractConfig(data=data, max_sequences=48, shard_sequences=8,
                                              device="cpu"), loaded=tiny_loaded,
                                log=lambda line: None)
    cfg = TrainConfig(SAEConfig(d_model=32, n_layers=2, expansion_factor=4, k=8, k_aux=16,
                                model="tiny"),
                      train_tokens=64 * 20, batch_tokens=64, lr=2e-3, shuffle_tokens=256)
    result = train_sae(cfg, stream, tmp_path / "run", progress_log=lambda line: None)
    assert result.steps == 20 and not result.data_exhausted
    test = DataConfig(split="test", seq_len=32)
    with pytest.raises(ValueError, match="split='test'"):
        evaluate_sae(result.sae, tiny_loaded, data)
    metrics = evaluate_sae(result.sae, tiny_loaded, test, max_tokens=6 * 32, batch_size=4,
                           progress_log=lambda line: None)
    assert [m.layer for m in metrics] == [0, 1]
    for m in metrics:
        assert 0 < m.fvu < 1 and m.l0 <= 8 and 0 <= m.dead_fraction < 1
        assert math.isfinite(m.delta_ce) and m.kl > 0
    fast = evaluate_sae(result.sae, tiny_loaded, test, max_tokens=6 * 32, splice=False,
                        progress_log=lambda line: None)
    for a, b in zip(metrics, fast, strict=True):  # same reconstructions, no splicing
        assert a.fvu == pytest.approx(b.fvu, rel=1e-5) and math.isnan(b.kl)
    mean = mean_over_layers(metrics)
    assert mean.fvu == pytest.approx((metrics[0].fvu + metrics[1].fvu) / 2)

    # a perfect reconstruction splices in the clean hidden state: no CE change, no KL
    def perfect(sae, x_ND, layer, basis=None):
        acts = torch.ones(x_ND.shape[0], 1)
        return x_ND.clone(), acts, torch.zeros(x_ND.shape[0], 1, dtype=torch.long)

    monkeypatch.setattr(ev, "reconstruct", perfect)
    exact = evaluate_sae(result.sae, tiny_loaded, test, max_tokens=4 * 32,
                         progress_log=lambda line: None)
    for m in exact:
        assert m.fvu == 0 and m.delta_ce == pytest.approx(0, abs=1e-6)
        assert m.kl == pytest.approx(0, abs=1e-6)


def test_tuned_lens_basis_trains_and_evaluates_in_the_model_basis(tiny_loaded, tmp_path):
    from mlsae.lens import TunedLensBasis

    gen = torch.Generator().manual_seed(0)
    basis = TunedLensBasis(torch.randn(2, 32, 32, generator=gen) * 0.05,
                           torch.randn(2, 32, generator=gen), name="tuned-lens:tiny")
    data = DataConfig(split="train", seq_len=32)
    shards = list(stream_activations(ExtractConfig(data=data, max_sequences=24,
                                                   shard_sequences=8, device="cpu"),
                                     loaded=tiny_loaded, log=lambda line: None))
    cfg = TrainConfig(SAEConfig(d_model=32, n_layers=2, expansion_factor=4, k=8, k_aux=16,
                                lens="tuned-lens:tiny"),
                      train_tokens=64 * 10, batch_tokens=64, lr=2e-3, shuffle_tokens=256)
    result = train_sae(cfg, shards, tmp_path / "run", basis=basis, progress_log=print)
    test = DataConfig(split="test", seq_len=32)
    with_lens = evaluate_sae(result.sae, tiny_loaded, test, basis=basis, max_tokens=4 * 32,
                             splice=False, progress_log=lambda line: None)
    without = evaluate_sae(result.sae, tiny_loaded, test, max_tokens=4 * 32, splice=False,
                           progress_log=lambda line: None)
    assert all(0 < m.fvu < 1 for m in with_lens)
    # block 0 is translated: reading its raw vectors as lens-basis ones changes the metrics
    assert with_lens[0].mse != pytest.approx(without[0].mse, rel=1e-3)
    # the last block is never translated (SPEC 3): identical either way
    assert with_lens[1].mse == pytest.approx(without[1].mse, rel=1e-6)


def test_embedded_model_multi_and_single_layer_training_lower_held_out_fvu(tmp_path):
    loaded = load_model(None, device="cpu")
    n_layers = loaded.model.config.num_hidden_layers
    d_model = loaded.model.config.hidden_size
    cache = extract_to_cache(
        ExtractConfig(data=DataConfig(split="train", max_sequences=24), batch_size=8,
                      shard_sequences=12, device="cpu"),
        tmp_path / "cache", loaded=loaded, log=lambda line: None)
    held_out = list(stream_activations(
        ExtractConfig(data=DataConfig(split="test", max_sequences=8), batch_size=8,
                      shard_sequences=8, device="cpu"), loaded=loaded, log=lambda line: None))
    sae_cfg = SAEConfig(d_model=d_model, n_layers=n_layers, expansion_factor=8, k=32,
                        k_aux=256, dead_tokens=5000)
    multi = train_sae(TrainConfig(sae_cfg, train_tokens=20 * 512, batch_tokens=512, lr=2e-3),
                      cache, tmp_path / "multi", progress_log=lambda line: None)
    fvu = reconstruction_metrics(multi.sae, held_out, source_layers=list(range(n_layers)))
    assert len(fvu) == n_layers
    assert mean_over_layers(fvu).fvu < 0.5, fvu  # "well below 1" (~0.26) after 10k tokens
    single_cfg = SAEConfig(d_model=d_model, n_layers=n_layers, layers=[3], expansion_factor=8,
                           k=32, k_aux=256, dead_tokens=5000)
    single = train_sae(TrainConfig(single_cfg, train_tokens=20 * 512, batch_tokens=512,
                                   lr=2e-3), cache, tmp_path / "single",
                       progress_log=lambda line: None)
    (m_single,) = reconstruction_metrics(single.sae, held_out, source_layers=list(range(n_layers)))
    assert m_single.layer == 3 and m_single.fvu < 0.5
    metrics = evaluate_sae(multi.sae, loaded, DataConfig(split="test"), max_tokens=2 * 256,
                           progress_log=lambda line: None)
    assert [m.layer for m in metrics] == list(range(n_layers))
    assert all(m.kl > 0 and math.isfinite(m.delta_ce) for m in metrics)
    assert mean_over_layers(metrics).fvu < 0.6


def test_chunked_logits_evaluation_equals_whole_logits(tiny_loaded, tmp_path):
    """delta CE and KL from chunks of positions (bounded memory: here one position at a
    time) equal the whole-logits computation."""
    from mlsae.sae import MLSAE

    model = tiny_loaded.model
    sae = MLSAE(SAEConfig(d_model=model.config.hidden_size,
                          n_layers=model.config.num_hidden_layers, expansion_factor=2, k=4,
                          k_aux=8),
                seed=0)
    data = DataConfig(split="test", seq_len=32, max_sequences=6)
    whole = evaluate_sae(sae, tiny_loaded, data, batch_size=4, chunk_logits=False)
    chunked = evaluate_sae(sae, tiny_loaded, data, batch_size=4, logits_budget_bytes=1)
    for a, b in zip(whole, chunked, strict=True):
        assert a.fvu == b.fvu and a.l0 == b.l0
        assert b.delta_ce == pytest.approx(a.delta_ce, rel=1e-6, abs=1e-9)
        assert b.kl == pytest.approx(a.kl, rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def wide_vocab_loaded():
    """A random 3-block GPT-NeoX with a Pythia-sized vocabulary (50,304) over the embedded
    tokenizer (its ids are a subset)."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    torch.manual_seed(1)
    cfg = GPTNeoXConfig(vocab_size=50_304, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, rotary_pct=0.25)
    return LoadedModel(GPTNeoXForCausalLM(cfg).eval(), tokenizer, "wide-vocab")


def _reference_ce_kl(sae, loaded, data, layer):
    """delta CE and KL of one layer the obvious way: whole logits of the full spliced pass
    (every block recomputed), log_softmax in float64."""
    from mlsae.data import load_sequences, special_token_mask
    from mlsae.hooks import splice_forward

    tokens_BT = torch.as_tensor(load_sequences(data, loaded.tokenizer).tokens_BT)
    mask_BT = torch.as_tensor(special_token_mask(tokens_BT.numpy(), loaded.tokenizer))

    def replace(h_BTD):
        out = h_BTD.clone()
        out[mask_BT] = ev.reconstruct(sae, h_BTD[mask_BT].float(), layer)[0]
        return out

    with torch.inference_mode():
        clean = torch.log_softmax(loaded.model(input_ids=tokens_BT).logits.double(), -1)
    spliced = torch.log_softmax(splice_forward(loaded.model, tokens_BT, layer, replace).double(), -1)
    w = mask_BT[:, :-1].double()
    target = tokens_BT[:, 1:].unsqueeze(-1)
    ce_c = -(clean[:, :-1].gather(-1, target).squeeze(-1) * w).sum()
    ce_s = -(spliced[:, :-1].gather(-1, target).squeeze(-1) * w).sum()
    kl = ((clean.exp() * (clean - spliced)).sum(-1)[:, :-1] * w).sum()
    return float((ce_s - ce_c) / w.sum()), float(kl / w.sum())


@pytest.mark.parametrize("loaded_name", ["tiny_loaded", "wide_vocab_loaded"])
def test_evaluation_equals_full_spliced_passes_with_whole_logits(loaded_name, request):
    """Chunked CE/KL from the clean pass's prefix equal whole-logits full spliced passes
    (float64) to 1e-6, on a small and on a 50k vocabulary."""
    from mlsae.sae import MLSAE

    loaded = request.getfixturevalue(loaded_name)
    cfg = loaded.model.config
    sae = MLSAE(SAEConfig(d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
                          expansion_factor=2, k=4, k_aux=8), seed=0)
    data = DataConfig(split="test", seq_len=32, max_sequences=3)
    chunked = evaluate_sae(sae, loaded, data, batch_size=2, logits_budget_bytes=4 * 2**20)
    whole = evaluate_sae(sae, loaded, data, batch_size=3, chunk_logits=False)
    for layer, (a, b) in enumerate(zip(chunked, whole, strict=True)):
        delta_ce, kl = _reference_ce_kl(sae, loaded, data, layer)
        for got in (a, b):
            assert got.delta_ce == pytest.approx(delta_ce, rel=1e-6, abs=1e-6)
            assert got.kl == pytest.approx(kl, rel=1e-6, abs=1e-6)


def test_autoencoders_evaluated_together_equal_each_alone(tiny_loaded):
    """One clean pass shared by several autoencoders (an MLSAE and a single-layer SAE with
    other widths and k) gives each the metrics it gets alone."""
    from mlsae.sae import MLSAE
    from mlsae.sae.evaluate import evaluate_saes

    multi = MLSAE(SAEConfig(d_model=32, n_layers=2, expansion_factor=4, k=8, k_aux=8), seed=1)
    single = MLSAE(SAEConfig(d_model=32, n_layers=2, layers=[1], expansion_factor=2, k=3,
                             k_aux=8), seed=2)
    data = DataConfig(split="test", seq_len=32, max_sequences=5)
    together = evaluate_saes([multi, single], tiny_loaded, data, batch_size=2)
    alone = [evaluate_sae(multi, tiny_loaded, data, batch_size=3),
             evaluate_sae(single, tiny_loaded, data, batch_size=5)]
    assert [len(r) for r in together] == [2, 1]
    for got, want in zip(together, alone, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.layer == b.layer and a.l0 == b.l0 and a.dead_fraction == b.dead_fraction
            for name in ("fvu", "mse", "delta_ce", "kl"):
                assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-6, abs=1e-9)


def test_eval_memory_too_small_names_the_fix(tiny_loaded):
    from mlsae.memory import eval_sizing

    with pytest.raises(ValueError, match="raise --eval-memory to at least"):
        eval_sizing(tiny_loaded.model, 32, 1000)
    big = eval_sizing(tiny_loaded.model, 32, 2**30)
    small = eval_sizing(tiny_loaded.model, 32, 2**29)
    assert big.batch_sequences > small.batch_sequences >= 1
