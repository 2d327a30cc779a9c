"""`mlsae report`: train the report's grid on one model and write the generated report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from flows.cmd_run import call_flow, prefect_defaults


@click.command("report")
@click.option("--model", default="embedded", show_default=True,
              help="'embedded', a local directory saved with save_pretrained, or a hub id.")
@click.option("--data", default="embedded", show_default=True,
              help="'embedded', a local .txt/.jsonl/.parquet file or directory, or a hub data set.")
@click.option("--expansion-factor", "-R", "expansion_factors", type=int, multiple=True,
              help="R values, each trained at the base k; repeat.  [default: 2, 4, 8]")
@click.option("-k", "ks", type=int, multiple=True,
              help="k values, each trained at the base R; repeat.  [default: 8, 16, 32]")
@click.option("--base-R", "base_expansion_factor", type=int, default=None,
              help="Base expansion factor (also gets single-layer SAEs and the lens run).  "
                   "[default: 4]")
@click.option("--base-k", type=int, default=None, help="Base k.  [default: 16]")
@click.option("--lens/--no-lens", default=True, show_default=True,
              help="Also train the base config in the tuned-lens basis.")
@click.option("--train-tokens", type=int, default=None,
              help="Training tokens per layer for every autoencoder.  [default: 2000000]")
@click.option("--batch-tokens", type=int, default=None,
              help="Tokens per optimizer step.  [default: 1024]")
@click.option("--eval-tokens", type=int, default=None,
              help="Held-out tokens for metrics and latent tables.  [default: 16384]")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence.  [default: 128]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=float, default=None, help="Adam learning rate.  [default: 1e-3]")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Warehouse directory (default $MLSAE_HOME, else ./mlsae-data).")
@click.option("--copy-to", type=click.Path(path_type=Path), default=None,
              help="Also copy the report directory (report.md + figures) here, e.g. docs/report.")
@click.option("--refresh", is_flag=True,
              help="Ignore cached task results (finished outputs in the warehouse are reused).")
def command(model, data, expansion_factors, ks, base_expansion_factor, base_k, lens,
            train_tokens, batch_tokens, eval_tokens, seq_len, seed, lr, device, out, copy_to,
            refresh) -> None:
    """Reproduce the paper's findings on one model, as a generated report.

    \b
    Trains a star-shaped grid around a base config (R=4, k=16 by default):
      every R at the base k, every k at the base R, the base config with the
      tuned lens, and a single-layer SAE per layer at the base config,
    then writes <out>/report/<model>/report.md with its figures.
    \b
    Examples:
      mlsae report                                   # embedded model (~40 min on 2 cores)
      mlsae report --copy-to docs/report             # and copy it into the docs
      mlsae report --model my-model/ -R 4 -R 16 -k 32 --base-R 16 --base-k 32

    Every step is cached in the warehouse: after a crash or Ctrl-C, rerun the
    same command and it continues; a finished grid only rewrites the report.
    """
    prefect_defaults()
    from flows.report import REPORT_DEFAULTS, report

    d = REPORT_DEFAULTS
    params = dict(
        model=model, data=data,
        expansion_factors=list(expansion_factors or d["expansion_factors"]),
        ks=list(ks or d["ks"]),
        base_expansion_factor=base_expansion_factor or d["base_expansion_factor"],
        base_k=base_k or d["base_k"], lens=lens,
        train_tokens=train_tokens or d["train_tokens"],
        batch_tokens=batch_tokens or d["batch_tokens"],
        eval_tokens=eval_tokens or d["eval_tokens"], seq_len=seq_len or d["seq_len"],
        seed=seed, lr=lr or d["lr"], device=device, out=str(out) if out else None,
        refresh=refresh)
    start = time.perf_counter()
    result = call_flow(report, **params)
    click.echo(f"\nDone in {(time.perf_counter() - start) / 60:.1f} min.")
    click.echo(f"Report: {result['report']}")
    if copy_to is not None:
        target = Path(copy_to)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(result["report_dir"], target)
        click.echo(f"Copied to {target}")
