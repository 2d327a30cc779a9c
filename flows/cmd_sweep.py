"""`mlsae sweep`: a grid of models x expansion factors x k x lens, run concurrently."""

from __future__ import annotations

import time
from pathlib import Path

import click

from flows.cmd_run import LAYERS_HELP, call_flow, parse_layers, prefect_defaults


@click.command("sweep")
@click.option("--model", "models", multiple=True,
              help="Model to include; repeat for several.  [default: embedded]")
@click.option("--data", default="embedded", show_default=True,
              help="'embedded', a local text file/directory, or a hub data set.")
@click.option("--expansion-factor", "-R", "expansion_factors", type=int, multiple=True,
              help="Expansion factors of the grid; repeat.  [default: 2, 4]")
@click.option("-k", "ks", type=int, multiple=True, help="k values of the grid; repeat.  "
              "[default: 8, 16]")
@click.option("--lens", type=click.Choice(["off", "on", "both"]), default="off",
              show_default=True, help="Train without the tuned lens, with it, or both.")
@click.option("--layers", default="all", show_default=True, help=LAYERS_HELP)
@click.option("--baselines/--no-baselines", default=False, show_default=True,
              help="Also train single-layer SAEs for every grid point.")
@click.option("--train-tokens", type=int, default=None,
              help="Training tokens per layer.  [default: 200000]")
@click.option("--eval-tokens", type=int, default=None,
              help="Held-out tokens for metrics and latents.  [default: 8192]")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence.  [default: 128]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=float, default=None, help="Adam learning rate.  [default: 1e-3]")
@click.option("--device", default="auto", show_default=True)
@click.option("--task-runner", type=click.Choice(["thread", "dask", "ray"]), default="thread",
              show_default=True,
              help="thread: nothing to install; dask/ray: pip install -e '.[dask]' / '.[ray]'.")
@click.option("--max-workers", type=int, default=2, show_default=True,
              help="Tasks run at once (threads or Dask workers).")
@click.option("--runner-address", default=None,
              help="Address of an existing Dask scheduler or Ray cluster.")
@click.option("--gpu-slots", type=int, default=None,
              help="Concurrent GPU tasks (default: one per visible GPU).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Warehouse directory (default $MLSAE_HOME, else ./mlsae-data).")
@click.option("--refresh", is_flag=True,
              help="Ignore cached task results and re-run every task (finished outputs in the "
                   "warehouse are still reused).")
def command(models, data, expansion_factors, ks, lens, layers, baselines, train_tokens,
            eval_tokens, seq_len, seed, lr, device, task_runner, max_workers, runner_address,
            gpu_slots, out, refresh) -> None:
    """Run the pipeline over a grid of configs (and models), concurrently.

    \b
    Examples:
      mlsae sweep                               # embedded model, R in {2,4} x k in {8,16}
      mlsae sweep -R 4 -R 8 -k 32 --lens both --max-workers 4
      mlsae sweep --model m1/ --model m2/ --task-runner dask --max-workers 8

    Every model is validated before anything runs; each model's activations are
    extracted once; GPU steps queue on the `mlsae-gpu` concurrency limit.
    """
    prefect_defaults()
    from flows.cmd_run import print_example_queries, print_outputs
    from flows.pipeline import (
        DEFAULT_EVAL_TOKENS,
        DEFAULT_LR,
        DEFAULT_SEQ_LEN,
        DEFAULT_TRAIN_TOKENS,
    )
    from flows.sweep import sweep

    start = time.perf_counter()
    result = call_flow(
        sweep,
        models=list(models or ["embedded"]), data=data,
        expansion_factors=list(expansion_factors or [2, 4]), ks=list(ks or [8, 16]),
        lenses={"off": [False], "on": [True], "both": [False, True]}[lens],
        layers=parse_layers(layers), baselines=baselines,
        train_tokens=train_tokens or DEFAULT_TRAIN_TOKENS,
        eval_tokens=eval_tokens or DEFAULT_EVAL_TOKENS, seq_len=seq_len or DEFAULT_SEQ_LEN,
        seed=seed, lr=lr or DEFAULT_LR, device=device, task_runner=task_runner,
        max_workers=max_workers,
        runner_address=runner_address, gpu_slots=gpu_slots,
        out=str(out) if out else None, refresh=refresh)
    click.echo(f"\nDone in {(time.perf_counter() - start) / 60:.1f} min.")
    for run in result["runs"]:
        print_outputs(run, None, examples=False)
    if result["figures"]:
        click.echo("\nSweep figures:\n" + "\n".join(f"  {p}" for p in result["figures"]))
    print_example_queries(result["out"])
