"""Pretrain the embedded default model (mlsae/embedded/model/) from scratch.

Reproducible end to end, offline, on the embedded corpus:
  1. a byte-level BPE tokenizer (vocab 8192, `<|endoftext|>` special token)
     trained on the TRAIN split with `tokenizers`, saved as a transformers
     tokenizer;
  2. a GPT-NeoX (Pythia architecture) causal LM built from a config and
     trained with AdamW on 256-token sequences of the train split (documents
     joined with `<|endoftext|>`), held-out loss measured on the test split;
  3. weights saved once as fp16 safetensors, plus the loss curve (PNG) and
     the numbers for the model card (training_log.json).

Usage:  python scripts/train_embedded_model.py [--steps 1200] [--out mlsae/embedded/model]
        python scripts/train_embedded_model.py --layers 4 --width 128 --heads 4 \
            --tokenizer mlsae/embedded/model --out mlsae/embedded/family/4x128
Seeded; on 2 CPU threads the default run (bf16 autocast, fp32 weights) takes 20-30 minutes.
The model family (mlsae/embedded/family/) is the same recipe at other shapes, with the
default model's tokenizer reused (--tokenizer) so every member sees the same token ids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
EOT = "<|endoftext|>"
CORPUS = Path("mlsae/embedded/corpus")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
        model_max_length=2048,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """All documents joined as doc EOT doc EOT ..., one flat int32 array."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat: list[int] = []
    for doc in ids:
        flat.extend(doc)
        flat.append(eot)
    return np.asarray(flat, dtype=np.int32)


def build_model(vocab_size: int, seed: int, layers: int = 6, width: int = 256,
                heads: int = 8) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        rotary_pct=0.25,
        max_position_embeddings=1024,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(config)


@torch.no_grad()
def heldout_loss(model, test_BT: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(test_BT), batch):
        x = test_BT[i : i + batch].long()
        out = model(input_ids=x, labels=x)
        total += out.loss.item() * x.numel()
        count += x.numel()
    model.train()
    return total / count


CARD_SUBSET_SEQS = 64
"""The card's second figure: held-out loss on the first 64 test sequences (16,384 tokens),
cheap enough for the test suite to reproduce on every run."""


def saved_model_losses(directory: Path, seq_len: int = 256) -> dict[str, float]:
    """Held-out loss of the SAVED (fp16) weights, computed in fp32 as a user loading the
    directory would: the whole TEST split and its first CARD_SUBSET_SEQS sequences."""
    from transformers import AutoModelForCausalLM

    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    test_texts = pq.read_table(CORPUS / "test.parquet")["text"].to_pylist()
    test_ids = token_stream(tokenizer, test_texts)
    n_seq = len(test_ids) // seq_len
    test_BT = torch.from_numpy(test_ids[: n_seq * seq_len].reshape(-1, seq_len))
    return {"heldout_loss_full_test": heldout_loss(model, test_BT),
            "heldout_loss_first_64_test_seqs": heldout_loss(model, test_BT[:CARD_SUBSET_SEQS])}


def write_family_card(directory: Path, log: dict) -> Path:
    """README.md of a family member, every number read from its training_log.json."""
    config = json.loads((directory / "config.json").read_text())
    args = log["args"]
    layers, width = config["num_hidden_layers"], config["hidden_size"]
    heads, mlp = config["num_attention_heads"], config["intermediate_size"]
    saved = log["saved_weights"]
    evals = log["heldout_loss"]
    last = ", ".join(f"{v:.3f}" for v in evals[-3:])
    window = [t for t in log["eval_tokens"] if t >= log["eval_tokens"][-1] - 1_000_000]
    start = evals[len(evals) - len(window)]
    phases = log.get("phases", [{"args": args, "seconds": log["seconds"],
                                 "tokens_seen": log["tokens_seen"]}])
    batch, seq = int(args["batch"]), int(args["seq_len"])
    steps = sum(int(phase["args"]["steps"]) for phase in phases)
    shape = f"{layers}x{width}"
    phase_intro = (f", in {len(phases)} phases (the second continues the first's saved weights, "
                   "`--init-from`, with a fresh optimizer and schedule):" if len(phases) > 1
                   else ".")
    phase_lines = "\n".join(
        f"  {'- phase ' + str(i + 1) + ': ' if len(phases) > 1 else ''}{int(ph['args']['steps']):,}"
        f" steps, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), lr "
        f"{float(ph['args']['lr']):g}, {max(1, int(ph['args']['steps']) // 20)} warm-up steps, "
        f"cosine decay to a tenth, gradient clipping 1.0, bf16 autocast with fp32 weights, seed "
        f"{ph['args']['seed']}, {ph['args']['threads']} thread(s), {ph['seconds'] / 60:.0f} min."
        for i, ph in enumerate(phases))
    base = (f"python scripts/train_embedded_model.py --layers {layers} --width {width} "
            f"--heads {heads} --tokenizer mlsae/embedded/model")
    commands, parent = [], None
    for i, ph in enumerate(phases):
        target = (f"mlsae/embedded/family/{shape}" if i == len(phases) - 1
                  else f"/tmp/{shape}-phase{i + 1}")
        extra = (f" --init-from {parent}" if parent else "") + (
            f" --lr {float(ph['args']['lr']):g} --seed {ph['args']['seed']}")
        commands.append(f"{base} \\\n    --steps {int(ph['args']['steps'])}{extra} --out {target}")
        parent = target
    retrain = "\n".join(commands)
    text = f"""# Embedded model family: GPT-NeoX {shape}, pretrained on the embedded corpus

A member of the embedded model family (the report's model-size axis; issue 14): the
same script, corpus, tokenizer and recipe as the default model
([mlsae/embedded/model](../../model/README.md), 6 x 256) at another shape.
`--model embedded-{shape}` in every mlsae command, or
`AutoModelForCausalLM.from_pretrained("mlsae/embedded/family/{shape}")`.

## Architecture
| | |
| --- | --- |
| type | `GPTNeoXForCausalLM` (Pythia architecture: parallel residual, rotary on 25% of head dims, untied unembedding) |
| blocks (L) | {layers} |
| d_model | {width} ({heads} heads x {width // heads}), MLP {mlp}, GELU |
| vocabulary | 8,192 byte-level BPE: the default model's tokenizer (same token ids) |
| context | 1,024 positions (trained on {seq}-token sequences) |
| parameters | {log["n_params"]:,} (fp16 weights, {(directory / "model.safetensors").stat().st_size / 1e6:.1f} MB) |

## Training
- Data: the TRAIN split of the embedded corpus, {log["train_tokens_available"]:,} tokens,
  documents joined with `<|endoftext|>`, cut into {seq}-token sequences, shuffled each epoch.
- {steps:,} steps x {batch} sequences x {seq} tokens = {log["tokens_seen"]:,} tokens seen
  ({log["epochs"]:.2f} epochs){phase_intro}
{phase_lines}
  Wall time {log["seconds"] / 60:.0f} minutes in total on a shared 2-core CPU.
- Held-out loss of the saved weights (fp16, computed in fp32), the whole TEST split
  ({log["test_tokens"]:,} tokens): **{saved["heldout_loss_full_test"]:.4f} nats/token**
  (perplexity {math.exp(saved["heldout_loss_full_test"]):.0f}); on the first 64 test sequences
  (16,384 tokens, what tests/test_embedded_family.py reproduces):
  **{saved["heldout_loss_first_64_test_seqs"]:.4f} nats/token**.

![loss curve](loss_curve.png)

Over the last 1M tokens seen the held-out loss (96 test sequences) moved from {start:.3f} to
{evals[-1]:.3f} ({last} at the last three evaluations). Every evaluation is in
`training_log.json`.

## Retrain
```bash
{retrain}
```
"""
    path = directory / "README.md"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("mlsae/embedded/model"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-seqs", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks")
    parser.add_argument("--width", type=int, default=256, help="d_model (MLP is 4x)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="reuse this directory's tokenizer instead of training one")
    parser.add_argument("--card-losses", action="store_true",
                        help="only compute the card's held-out losses of the model saved in "
                             "--out (fp16 weights, fp32 compute) into its training_log.json")
    parser.add_argument("--family-card", action="store_true",
                        help="with --card-losses: also write a family member's README.md card")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue pretraining from this saved model's weights (fp16 as saved) "
                             "with a fresh optimizer and a new warm-up + cosine schedule of "
                             "--steps; the parent's training_log.json is kept as the first phase")
    parser.add_argument("--no-bf16", action="store_true",
                        help="train in plain fp32 (bf16 autocast is ~1.5x faster on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.card_losses:
        log_path = args.out / "training_log.json"
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        log["saved_weights"] = saved_model_losses(args.out, args.seq_len)
        log_path.write_text(json.dumps(log))
        print(json.dumps(log["saved_weights"], indent=1))
        if args.family_card:
            print(f"card: {write_family_card(args.out, log)}")
        return
    args.out.mkdir(parents=True, exist_ok=True)

    train_texts = pq.read_table(CORPUS / "train.parquet")["text"].to_pylist()
    test_texts = pq.read_table(CORPUS / "test.parquet")["text"].to_pylist()
    t0 = time.time()
    if args.tokenizer is not None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab)
    tokenizer.save_pretrained(args.out)
    print(f"tokenizer ready in {time.time() - t0:.1f}s", flush=True)

    train_ids = token_stream(tokenizer, train_texts)
    test_ids = token_stream(tokenizer, test_texts)
    n_train_seq = len(train_ids) // args.seq_len
    train_BT = torch.from_numpy(train_ids[: n_train_seq * args.seq_len].reshape(-1, args.seq_len))
    n_test_seq = len(test_ids) // args.seq_len
    test_BT = torch.from_numpy(test_ids[: n_test_seq * args.seq_len].reshape(-1, args.seq_len))
    eval_BT = test_BT[:: max(1, len(test_BT) // args.eval_seqs)][: args.eval_seqs]
    print(f"train tokens {train_ids.size:,} ({n_train_seq} seqs), test tokens {test_ids.size:,}",
          flush=True)

    if args.width % args.heads or (args.width // args.heads) % 8:
        parser.error("--width / --heads must be a multiple of 8 (rotary on 25% of head dims)")
    parent_log: dict | None = None
    if args.init_from is not None:
        from transformers import AutoModelForCausalLM

        parent_log = json.loads((args.init_from / "training_log.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        if (model.config.num_hidden_layers, model.config.hidden_size) != (args.layers, args.width):
            parser.error(f"--init-from {args.init_from} is {model.config.num_hidden_layers}x"
                         f"{model.config.hidden_size}, not --layers {args.layers} --width "
                         f"{args.width}: pass the shape of the model you continue")
        model.train()
    else:
        model = build_model(len(tokenizer), args.seed, args.layers, args.width, args.heads)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_BT), generator=gen)
    cursor = 0
    log: dict = {"step": [], "tokens": [], "train_loss": [], "eval_step": [], "eval_tokens": [],
                 "heldout_loss": []}
    # A continuation counts steps and tokens after its parent's, so the curve is one line.
    step0 = int(parent_log["step"][-1]) if parent_log else 0
    token0 = int(parent_log["tokens_seen"]) if parent_log else 0
    running, t_start = None, time.time()
    for step in range(args.steps):
        if cursor + args.batch > len(order):  # new epoch, new order
            order, cursor = torch.randperm(len(train_BT), generator=gen), 0
        x = train_BT[order[cursor : cursor + args.batch]].long()
        cursor += args.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=not args.no_bf16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        tokens = token0 + (step + 1) * args.batch * args.seq_len
        log["step"].append(step0 + step + 1)
        log["tokens"].append(tokens)
        log["train_loss"].append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            held = heldout_loss(model, eval_BT)
            log["eval_step"].append(step0 + step + 1)
            log["eval_tokens"].append(tokens)
            log["heldout_loss"].append(held)
            rate = (tokens - token0) / (time.time() - t_start)
            print(f"step {step + 1}/{args.steps} tokens {tokens:,} train {running:.3f} "
                  f"held-out {held:.3f} lr {lr_at(step):.2e} {rate:,.0f} tok/s", flush=True)

    if parent_log is not None:
        log = {key: parent_log[key] + log[key] for key in log}
        log["phases"] = parent_log.get("phases", [{"args": parent_log["args"],
                                                   "seconds": parent_log["seconds"],
                                                   "tokens_seen": parent_log["tokens_seen"]}])
    final_heldout = heldout_loss(model, test_BT)
    model.config.torch_dtype = "float16"
    model.half().save_pretrained(args.out, safe_serialization=True)
    log.update({
        "n_params": n_params, "train_tokens_available": int(train_ids.size),
        "test_tokens": int(test_ids.size), "tokens_seen": log["tokens"][-1],
        "epochs": log["tokens"][-1] / train_ids.size, "final_heldout_loss_full_test": final_heldout,
        "seconds": time.time() - t_start, "args": {k: str(v) for k, v in vars(args).items()},
    })
    if parent_log is not None:
        log["phases"].append({"args": log["args"], "seconds": log["seconds"],
                              "tokens_seen": log["tokens_seen"] - token0})
        log["seconds"] = sum(phase["seconds"] for phase in log["phases"])
    (args.out / "training_log.json").write_text(json.dumps(log))
    plot_curve(log, args.out / "loss_curve.png", f"{args.layers}x{args.width}")
    print(f"done: held-out loss (full test split) {final_heldout:.4f}, {n_params:,} params")
    log["saved_weights"] = saved_model_losses(args.out, args.seq_len)
    (args.out / "training_log.json").write_text(json.dumps(log))
    print(f"saved weights: {log['saved_weights']}")


def plot_curve(log: dict, path: Path, shape: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = np.asarray(log["train_loss"])
    window = min(25, len(train))
    smooth = np.convolve(train, np.ones(window) / window, mode="valid")
    ax.plot(np.asarray(log["tokens"][window - 1 :]) / 1e6, smooth, label="train (25-step mean)")
    ax.plot(np.asarray(log["eval_tokens"]) / 1e6, log["heldout_loss"], "o-", ms=3,
            label="held-out")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"embedded GPT-NeoX {shape}: pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
