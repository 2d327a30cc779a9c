"""Evaluation in a memory budget: the batch chosen for a budget keeps the measured peak
RSS growth of a fresh process under it (with a generous margin), and a budget that
admits a bigger batch chooses one. No timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, resource, sys, torch
torch.set_num_threads(1)
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
from mlsae.data import DataConfig
from mlsae.models import LoadedModel
from mlsae.paths import EMBEDDED_MODEL_DIR
from mlsae.sae import MLSAE, SAEConfig
from mlsae.sae.evaluate import evaluate_sae
from mlsae.memory import eval_sizing

budget = int(sys.argv[1])
torch.manual_seed(0)
cfg = GPTNeoXConfig(vocab_size=50_304, hidden_size=128, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=512, max_position_embeddings=256)
loaded = LoadedModel(GPTNeoXForCausalLM(cfg).eval(),
                     AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR), "random")
sae = MLSAE(SAEConfig(d_model=128, n_layers=4, expansion_factor=16, k=16, k_aux=16), seed=0)
data = DataConfig(split="test", seq_len=256, max_sequences=16)
lines = []
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
from mlsae.data import load_sequences
load_sequences(data, loaded.tokenizer)  # reading the corpus is not evaluation's memory
before = rss()
# Reset the peak (VmHWM) to now: building the model may have peaked higher than the
# evaluation will, and that peak is not the evaluation's.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
evaluate_sae(sae, loaded, data, memory_bytes=budget, progress_log=lines.append)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
sizing = eval_sizing(loaded.model, 256, budget, spliced_layers=4, n_latents=sae.cfg.n_latents)
print(json.dumps({"before": before, "peak": peak, "batch": sizing.batch_sequences,
                  "first_line": lines[0]}))
'''


def _run(budget: int) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(budget)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
def test_batch_for_a_budget_keeps_peak_memory_under_it():
    small, large = 128 * 2**20, 512 * 2**20
    got_small = _run(small)
    assert 1 <= got_small["batch"] < 16
    assert f"{got_small['batch']} per pass" in got_small["first_line"]  # the batch is logged
    growth = got_small["peak"] - got_small["before"]
    assert growth < 1.5 * small, (growth, got_small)
    # a larger budget takes a larger batch (the same sizing, in this process)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mlsae.memory import eval_sizing

    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50_304, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=256))
    assert eval_sizing(model, 256, small, spliced_layers=4, n_latents=2048).batch_sequences \
        == got_small["batch"]
    assert eval_sizing(model, 256, large, spliced_layers=4, n_latents=2048).batch_sequences \
        > 4 * got_small["batch"]
