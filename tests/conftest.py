"""Shared test setup: offline hub, quiet Prefect, small CPU thread count, tiny models."""

from __future__ import annotations

import os

# Set before anything imports transformers / prefect.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores,
# so two workers do not oversubscribe them with two torch threads each.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny tensors gain nothing from two, and on a loaded
    machine lose up to ~20x to OpenMP synchronisation. Use via pytest.mark.usefixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_neox():
    """A random 3-block GPT-NeoX (Pythia architecture), eval mode, fp32."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, rotary_pct=0.25)
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    """A random 3-block GPT-2, eval mode, fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_llama():
    """A random 3-block Llama-style model, eval mode, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect server (own PREFECT_HOME and database) for this module."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home)}), \
            prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()
