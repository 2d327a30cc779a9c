"""Extraction speed vs the same model's plain forward pass, measured in the same run.

    .venv/bin/python benchmarks/bench_extract.py [--sequences 128] [--threads 2]

Rows (tokens/s, best of --repeats, and the ratio to the plain forward pass):
- forward (logits): model(input_ids), the bare forward pass with the unembedding;
- forward (trunk):  the base model only (blocks + final norm, no unembedding);
- capture hooks:    capture_residuals on every block (stops after the last block);
- stream:           stream_activations: capture + fp16 + mask, from text (tokenizes too);
- extract to cache: extract_to_cache end to end (tokenizes, writes + fsyncs shards).
Uses the embedded model; before its weights exist, a random model of the same
config and tokenizer (the speed is the same). Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mlsae.data import DataConfig, load_sequences  # noqa: E402
from mlsae.extract import ExtractConfig, extract_to_cache, stream_activations  # noqa: E402
from mlsae.hooks import capture_residuals  # noqa: E402
from mlsae.models import LoadedModel, load_model  # noqa: E402
from mlsae.paths import EMBEDDED_MODEL_DIR  # noqa: E402


def _embedded_or_stand_in(device: str) -> LoadedModel:
    if (EMBEDDED_MODEL_DIR / "config.json").exists():
        return load_model(None, device=device)
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    print("(embedded weights not there yet: random model of the same 6 x 256 config)")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=6,
                           num_attention_heads=8, intermediate_size=1024, rotary_pct=0.25,
                           max_position_embeddings=1024, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config).eval().to(device)
    return LoadedModel(model, AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR), "embedded")


def _best(fn: Callable[[], None], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = _embedded_or_stand_in(args.device)
    data = DataConfig(split="train", seq_len=args.seq_len, max_sequences=args.sequences)
    cfg = ExtractConfig(data=data, batch_size=args.batch_size, device=args.device,
                        shard_sequences=64)
    tokens_BT = torch.from_numpy(load_sequences(data, loaded.tokenizer).tokens_BT).long()
    batches = [b.to(args.device) for b in tokens_BT.split(args.batch_size)]
    n_tokens = tokens_BT.numel()
    quiet = lambda line: None  # noqa: E731

    @torch.inference_mode()
    def forward_logits() -> None:
        for ids in batches:
            loaded.model(input_ids=ids, use_cache=False)

    @torch.inference_mode()
    def forward_trunk() -> None:
        for ids in batches:
            loaded.model.base_model(input_ids=ids, use_cache=False)

    def capture() -> None:
        for ids in batches:
            capture_residuals(loaded.model, ids)

    def stream() -> None:
        for _ in stream_activations(cfg, loaded=loaded, log=quiet):
            pass

    def to_cache() -> None:
        out = tempfile.mkdtemp(prefix="bench-extract-")
        try:
            extract_to_cache(cfg, out, loaded=loaded, log=quiet)
        finally:
            shutil.rmtree(out)

    forward_logits()  # warm-up
    rows = [("forward (logits)", forward_logits), ("forward (trunk)", forward_trunk),
            ("capture hooks", capture), ("stream", stream), ("extract to cache", to_cache)]
    results = [(name, n_tokens / _best(fn, args.repeats, args.device)) for name, fn in rows]
    floor = results[0][1]
    m = loaded.model.config
    print(f"\nmodel {m.num_hidden_layers} x {m.hidden_size}, vocab {m.vocab_size}; "
          f"{args.sequences} x {args.seq_len} tokens, batch {args.batch_size}, "
          f"{args.threads} threads, {args.device}, best of {args.repeats}")
    print(f"{'':18} {'tokens/s':>10} {'vs forward':>11}")
    for name, rate in results:
        print(f"{name:18} {rate:>10,.0f} {rate / floor:>10.2f}x")


if __name__ == "__main__":
    main()
