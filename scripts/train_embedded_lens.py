"""Train the tuned lens for the embedded model (mlsae/embedded/lens/), or for any local model.

Fits one tuned-lens translator per stream index (mlsae.lens_train: KL(final ||
lens), AdamW, special tokens masked) on the train split, measures per-layer
KL(final || tuned lens) and KL(final || logit lens) on the held-out test split,
and writes, in --out:
  params.pt + config.json  the lens, in tuned-lens's own format
  training.json            how it was made and the KL numbers
  kl.png, README.md        the card

Usage:  python scripts/train_embedded_lens.py [--model embedded] [--out mlsae/embedded/lens]
Seeded; the default run takes ~5 minutes on one CPU thread (plus ~1 minute of evaluation).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import resource
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from mlsae.lens_train import LensTrainConfig, corpus_sequences, lens_kl, save_lens, train_lens
from mlsae.models import load_model
from mlsae.paths import EMBEDDED_LENS_DIR, EMBEDDED_MODEL_DIR


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="model dir or hub id (default: embedded)")
    p.add_argument("--out", default=str(EMBEDDED_LENS_DIR), help="lens directory to write")
    p.add_argument("--data", default=None, help="training/eval text (default: embedded corpus)")
    p.add_argument("--steps", type=int, default=LensTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=LensTrainConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=LensTrainConfig.seq_len)
    p.add_argument("--lr", type=float, default=LensTrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences for KL")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a busy 2-core machine 2 threads run slower)")
    p.add_argument("--device", default="auto")
    p.add_argument("--card-only", action="store_true",
                   help="only re-render README.md and kl.png from --out/training.json")
    return p.parse_args()


def plot_kl(tuned, logit, path: Path, history: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    idx = list(range(len(tuned)))
    ax.plot(idx, logit, "o-", label="logit lens")
    ax.plot(idx, tuned, "o-", label="tuned lens")
    ax.set_yscale("log")
    ax.set_xticks(idx, ["emb"] + [f"b{i - 1}" for i in idx[1:]])
    ax.set_xlabel("stream index (emb = embeddings, b<l> = output of block l)")
    ax.set_ylabel("KL(final || lens), nats")
    ax.set_title("held-out KL per layer")
    ax.legend()
    bx.plot(history)
    bx.set_yscale("log")
    bx.set_xlabel("step")
    bx.set_ylabel("sum over translators of KL")
    bx.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def card(meta: dict) -> str:
    kl = meta["kl"]
    L = len(kl["tuned"])
    rows = [f"| {i} | {'embeddings' if i == 0 else f'block {i - 1} output'} | "
            f"{'-' if i == 0 else i - 1} | {kl['logit'][i]:.4f} | {kl['tuned'][i]:.4f} | "
            f"{kl['tuned'][i] / kl['logit'][i]:.2f} |" for i in range(L)]
    rows.append(f"| - | block {L - 1} output (last) | {L - 1} | 0 | 0 (not translated) | - |")
    cfg = meta["config"]
    return f"""# Tuned lens for the embedded model

A [tuned lens](https://github.com/AlignmentResearch/tuned-lens) for `{meta['model']}`
({L} blocks, width {meta['d_model']}; weights sha256 `{(meta.get('model_sha256') or '?')[:16]}...`): one affine translator T_i(h) = h + A_i h + c_i
per stream index i (0 = embeddings, i = output of block i-1), trained so that
unembedding T_i(h_i) predicts the model's final distribution. mlsae uses it as
a change of basis before the MLSAE (SPEC 3): the output of block l is mapped
by T_(l+1) (the last block's output is not translated) and reconstructions are
mapped back exactly with (I + A)^-1.

Files, in tuned-lens's own format: `params.pt` (the translators' state dict)
and `config.json` (with the unembedding hash of the model it was trained for);
`training.json` holds the numbers below.

```python
from mlsae.lens import load_basis            # the basis mlsae uses
basis = load_basis("embedded", load_model())  # or "auto"
from tuned_lens import TunedLens             # or tuned-lens itself
lens = TunedLens.from_model_and_pretrained(model, "mlsae/embedded/lens")
```

## Held-out KL per layer

Mean KL(p_final || p_lens) in nats over {meta['eval_tokens']:,} tokens of the
held-out split (`mlsae/embedded/corpus/test.parquet`, {meta['eval_sequences']} sequences
of {cfg['seq_len']} tokens; special tokens excluded). Lower is better; the
logit lens is the same read-out with no translator.

| stream index | residual stream | SAE layer | logit lens | tuned lens | ratio |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Mean over the stream indices the SAE sees translated (1..{L - 1}, blocks 0..{L - 2}): logit lens
{sum(kl['logit'][1:]) / (L - 1):.4f}, tuned lens {sum(kl['tuned'][1:]) / (L - 1):.4f}; over all {L} translators:
{sum(kl['logit']) / L:.4f} and {sum(kl['tuned']) / L:.4f}.

![KL per layer and training loss](kl.png)

## Training

    {meta['command']}

- data: the train split of the embedded corpus, {cfg['seq_len']}-token sequences;
  special tokens excluded from the loss
- {meta['steps']} AdamW steps of {cfg['batch_size']} sequences ({meta['tokens']:,} counted
  tokens), lr {cfg['lr']} (linear warmup {cfg['warmup_steps']} steps, linear decay),
  weight decay {cfg['weight_decay']}, seed {cfg['seed']}; translators start at zero (= logit lens)
- loss: sum over translators of mean KL(final || lens); the model is frozen
- {meta['seconds']:.0f} s wall, {meta['cpu_seconds']:.0f} s of CPU time, on {meta['threads']} CPU thread(s)
  (torch {meta['torch']}; the shared machine's load average was {meta['load_average']} at the start)
- condition numbers of I + A (max over layers): {meta['max_condition']:.3g}, so the
  inverse is well posed in float32
"""


def keep_freed_memory() -> None:
    """Stop glibc returning the big [tokens, vocab] buffers to the OS after every step.

    Each fresh 64 MB allocation otherwise page-faults in again: ~0.4 s of system
    time per step, 15-20% of the run.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: only slower
        pass


def weights_sha256(model: str) -> str | None:
    """sha256 of a local model's model.safetensors: which weights the lens was trained for."""
    path = (EMBEDDED_MODEL_DIR if model == "embedded" else Path(model)) / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def write_card(out: Path, meta: dict) -> None:
    plot_kl(meta["kl"]["tuned"], meta["kl"]["logit"], out / "kl.png", meta["loss_history"])
    (out / "README.md").write_text(card(meta))


def main() -> None:
    args = parse_args()
    if args.card_only:
        out = Path(args.out)
        write_card(out, json.loads((out / "training.json").read_text()))
        return
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = LensTrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                          lr=args.lr, data=args.data, seed=args.seed)
    loaded = load_model(args.model, device=args.device, dtype="float32")
    tok = loaded.tokenizer
    train_BT, train_mask = corpus_sequences(tok, cfg.data, "train", cfg.seq_len,
                                            cfg.steps * cfg.batch_size)
    load = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    result = train_lens(loaded.model, train_BT, cfg, train_mask, name=loaded.name)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    test_BT, test_mask = corpus_sequences(tok, cfg.data, "test", cfg.seq_len,
                                          args.eval_sequences)
    kl = lens_kl(loaded.model, result.lens, test_BT, test_mask)
    from mlsae.lens import TunedLensBasis

    basis = TunedLensBasis.from_lens(result.lens)
    out = Path(args.out)
    meta = {
        "model": loaded.name, "model_sha256": weights_sha256(args.model),
        "d_model": loaded.model.config.hidden_size,
        "command": " ".join(["python scripts/train_embedded_lens.py", shlex.join(sys.argv[1:])]).strip(),
        "config": asdict(cfg), "steps": result.steps, "tokens": result.tokens,
        "seconds": round(result.seconds, 1), "cpu_seconds": round(cpu_s, 1),
        "load_average": round(load, 2), "threads": args.threads,
        "torch": torch.__version__.split("+")[0],
        "eval_sequences": len(test_BT), "eval_tokens": kl.n_tokens,
        "kl": {"tuned": kl.tuned_L.round(5).tolist(), "logit": kl.logit_L.round(5).tolist()},
        "max_condition": float(basis.condition_L.max()),
        "loss_history": [round(x, 5) for x in result.loss_history],
    }
    save_lens(result.lens.to("cpu"), out, meta)
    write_card(out, meta)
    print(json.dumps(meta["kl"], indent=1))


if __name__ == "__main__":
    main()
