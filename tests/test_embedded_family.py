"""The embedded model family (issue 14's model-size axis): every member loads with plain
transformers, shares the default model's tokenizer, and reproduces its card's held-out loss.

The loss is an independent transcription of the card's definition (documents of the TEST
split joined with <|endoftext|>, cut into 256-token sequences, mean next-token
cross-entropy), not a call into the training script.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mlsae.paths import (
    EMBEDDED_CORPUS_DIR,
    EMBEDDED_FAMILY,
    EMBEDDED_MODEL_DIR,
    EMBEDDED_MODEL_NAME,
    embedded_model_dir,
)

SEQ_LEN = 256
CARD_SEQS = 64  # the card's "first 64 test sequences" figure
MEMBERS = (EMBEDDED_MODEL_NAME, *EMBEDDED_FAMILY)
MAX_FAMILY_MB = 30  # issue 14: all new weights together at most ~30 MB (fp16)


def _card_loss(directory) -> float:
    text = (directory / "README.md").read_text()
    found = re.search(r"first 64 test sequences[^*]*\*\*(\d+\.\d+) nats/token\*\*", text)
    assert found, f"{directory}/README.md states no loss on the first 64 test sequences"
    return float(found.group(1))


def _test_sequences(tokenizer) -> torch.Tensor:
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = pq.read_table(EMBEDDED_CORPUS_DIR / "test.parquet")["text"].to_pylist()
    flat: list[int] = []
    for doc in tokenizer(texts[:200], add_special_tokens=False)["input_ids"]:
        flat += [*doc, eot]
    need = CARD_SEQS * SEQ_LEN
    assert len(flat) >= need, "the first 200 test documents hold fewer than 64 sequences"
    return torch.tensor(np.asarray(flat[:need]).reshape(CARD_SEQS, SEQ_LEN))


@pytest.mark.parametrize("name", MEMBERS)
def test_member_loads_and_reproduces_its_cards_held_out_loss(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = embedded_model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    default_tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    assert tokenizer.get_vocab() == default_tokenizer.get_vocab()  # same token ids
    x_BT = _test_sequences(tokenizer)
    total = 0.0
    with torch.no_grad():
        for batch_BT in x_BT.split(16):
            logits_BTV = model(input_ids=batch_BT).logits.double()
            logp_BTV = torch.log_softmax(logits_BTV[:, :-1], dim=-1)
            total += -logp_BTV.gather(-1, batch_BT[:, 1:, None]).sum().item()
    loss = total / (CARD_SEQS * (SEQ_LEN - 1))
    assert abs(loss - _card_loss(directory)) < 1e-3, (name, loss)


def test_family_shapes_sizes_and_names():
    from mlsae.plan import inspect_model

    shapes = {}
    for name in MEMBERS:
        info = inspect_model(name)
        assert info["name"] == name and info["slug"] == name
        shapes[name] = (info["n_layers"], info["d_model"])
        log = json.loads((embedded_model_dir(name) / "training_log.json").read_text())
        assert log["heldout_loss"][-1] <= log["heldout_loss"][0]  # it learned
    assert shapes == {"embedded": (6, 256), "embedded-4x128": (4, 128), "embedded-8x288": (8, 288)}
    new_bytes = sum(embedded_model_dir(name).joinpath("model.safetensors").stat().st_size
                    for name in EMBEDDED_FAMILY)
    assert new_bytes < MAX_FAMILY_MB * 1.1e6
