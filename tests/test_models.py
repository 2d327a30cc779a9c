"""Model loading: the embedded default, local directories, and fast offline failure for hub ids."""

from __future__ import annotations

import time

import pytest
import torch

from mlsae.models import ModelLoadError, load_model, resolve_model_source
from mlsae.paths import EMBEDDED_MODEL_DIR


def test_embedded_model_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    assert model.config.model_type == "gpt_neox"
    assert model.config.num_hidden_layers >= 6 and model.config.hidden_size >= 256
    assert tok.eos_token == "<|endoftext|>"


def test_load_model_defaults_to_embedded_and_predicts_text():
    loaded = load_model(None, device="cpu")
    assert loaded.name == "embedded"
    ids = loaded.tokenizer("And God said, Let there be light: and there was light.",
                           return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = loaded.model(input_ids=ids, labels=ids).loss.item()
    # A trained model, not random init (random: ln(8192) ~ 9.0 nats).
    assert loss < 5.0


def test_unknown_local_path_names_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nope" / "model"))


def test_directory_without_config_names_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_source(tmp_path)


def test_hub_id_offline_fails_fast_with_instructions(monkeypatch):
    # Without HF_HUB_OFFLINE as well: the reachability probe must answer within seconds.
    for offline in ("1", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        start = time.perf_counter()
        with pytest.raises(ModelLoadError, match="--model DIR"):
            load_model("EleutherAI/pythia-70m-deduped")
        assert time.perf_counter() - start < 10
