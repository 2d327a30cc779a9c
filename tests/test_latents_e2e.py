"""End to end: a real transformer, an MLSAE trained (briefly) and evaluated by mlsae.sae,
log_latents into a warehouse, then the views: finite values, token_var < prompt_var <=
layer_var, and the per-layer L0 from the table equal to the evaluation's L0 (and to
the SAE's own encoding of the same tokens).

Runs on a tiny random GPT-NeoX (always) and on the embedded model (once its
weights are in mlsae/embedded/model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlsae import warehouse as wh
from mlsae.paths import EMBEDDED_MODEL_DIR


def tiny_model_dir(root):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128, rotary_pct=0.25,
                        eos_token_id=tokenizer.eos_token_id)
    GPTNeoXForCausalLM(cfg).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module", params=["tiny", "embedded"])
def logged(request, tmp_path_factory):
    """Train an MLSAE briefly, evaluate it, log its latents; return what the tests need."""
    from mlsae.data import DataConfig, load_sequences, special_token_mask
    from mlsae.extract import ExtractConfig, stream_activations
    from mlsae.hooks import capture_residuals, n_layers
    from mlsae.latents import log_latents, write_layer_metrics
    from mlsae.models import load_model
    from mlsae.sae.config import SAEConfig, TrainConfig
    from mlsae.sae.evaluate import evaluate_sae
    from mlsae.sae.train import train_sae

    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    source = "embedded" if request.param == "embedded" else tiny_model_dir(root / "model")
    loaded = load_model(source, device="cpu")
    L = n_layers(loaded.model)
    d = loaded.model.config.hidden_size
    # On the tiny model k is half the latents, so many top-k pre-activations are <= 0 or
    # tiny: L0 then differs from k and from the row count, and the threshold matters.
    k = 128 if request.param == "tiny" else 8
    sae_cfg = SAEConfig(d_model=d, n_layers=L, expansion_factor=8, k=k, k_aux=k,
                        model=loaded.name)
    train_data = DataConfig(split="train", seq_len=64, max_sequences=48)
    stream = stream_activations(ExtractConfig(model=source, data=train_data, device="cpu",
                                              dtype="float32", shard_sequences=16), loaded)
    trained = train_sae(TrainConfig(sae=sae_cfg, train_tokens=3072, batch_tokens=256,
                                    lr=1e-3, device="cpu", checkpoint_every=10_000),
                        stream, root / "train", progress_log=lambda _: None)
    data = DataConfig(split="test", seq_len=64, max_sequences=6)
    metrics = evaluate_sae(trained.sae, loaded, data, splice=False)
    warehouse = root / "warehouse"
    result = log_latents(trained.sae_dir, loaded, data, warehouse, "e2e-sae",
                         progress_log=lambda _: None)
    write_layer_metrics(warehouse, "e2e-sae", metrics)
    # the SAE's own L0 per layer on the same unmasked tokens (SPEC 4: > 1e-3)
    sae = trained.sae.eval()
    tokens = load_sequences(data, loaded.tokenizer).tokens_BT
    mask = special_token_mask(tokens, loaded.tokenizer)
    with torch.no_grad():
        x_BTLD = capture_residuals(loaded.model, torch.as_tensor(tokens, dtype=torch.long),
                                   sae_cfg.layers)
        x_NLD = x_BTLD[torch.as_tensor(mask)]
        acts = sae.encode(x_NLD.reshape(-1, d)).top_acts_NK.reshape(x_NLD.shape[0], L, -1)
    l0 = (acts > sae_cfg.act_threshold).sum(-1).double().mean(0).numpy()
    return warehouse, result, l0, int(mask.sum()), L


def test_tables_are_complete(logged):
    warehouse, result, _, n_tokens, L = logged
    assert result.n_tokens == n_tokens and result.n_rows > 0
    rows = wh.run_readonly_sql(warehouse, "SELECT (SELECT count(*) FROM tokens), "
                                          "(SELECT count(*) FROM latents), "
                                          "(SELECT n_layers FROM saes)").rows
    assert rows == [(n_tokens, result.n_rows, L)]


def test_variance_summary_is_finite_and_ordered(logged):
    warehouse = logged[0]
    result = wh.run_readonly_sql(warehouse, "SELECT * FROM variance_summary")
    row = dict(zip(result.columns, result.rows[0], strict=True))
    for column, value in row.items():
        if isinstance(value, float):
            assert math.isfinite(value), column
    assert row["n_live"] > 0
    assert row["mean_token_var"] < row["mean_prompt_var"] <= row["mean_layer_var"]


def test_layer_l0_equals_the_evaluations(logged):
    warehouse, _, l0, _, _ = logged
    got = wh.run_readonly_sql(warehouse, "SELECT l0, eval_l0 FROM layer_stats "
                                         "ORDER BY layer_idx").rows
    np.testing.assert_allclose([r[0] for r in got], l0, rtol=0, atol=1e-12)
    np.testing.assert_allclose([r[0] for r in got], [r[1] for r in got], rtol=0, atol=1e-12)


def test_contexts_show_real_text(logged):
    warehouse = logged[0]
    rows = wh.run_readonly_sql(warehouse, "SELECT token, context FROM top_contexts(n := 1, "
                                          "width := 4) LIMIT 5").rows
    assert rows and all(f"[[{token}]]" in context for token, context in rows)
