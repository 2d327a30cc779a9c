"""`mlsae sweep`: a grid of models x expansion factors x k x lens, run concurrently."""

from __future__ import annotations

import time

import click

from flows.cmd_run import print_plan
from flows.options import build_request, run_options, split_options
from flows.session import call_flow, fail_fast


@click.command("sweep")
@run_options("sweep", multiple_models=True)
@click.option("--task-runner", type=click.Choice(["thread", "dask", "ray"]), default="thread",
              show_default=True,
              help="thread: nothing to install; dask/ray: pip install -e '.[dask]' / '.[ray]'.")
@click.option("--max-workers", type=int, default=2, show_default=True,
              help="Tasks run at once: threads, or the worker processes of the local Dask "
                   "cluster (one thread each).")
@click.option("--runner-address", default=None,
              help="Address of an existing Dask scheduler or Ray cluster.")
@click.option("--gpu-slots", type=int, default=None,
              help="Concurrent GPU tasks (default: one per visible GPU).")
def command(preset, out, refresh, dry_run, as_json, task_runner, max_workers, runner_address,
            gpu_slots, **fields) -> None:
    """Run the pipeline over a grid of configs (and models), concurrently.

    \b
    Examples:
      mlsae sweep                               # embedded model, R in {2,4} x k in {8,16}
      mlsae sweep -R 4 -R 8 -k 32 --lens both --max-workers 4
      mlsae sweep --model m1/ --model m2/ --task-runner dask --max-workers 8
      mlsae sweep --out s3://bucket/wh --task-runner dask --runner-address tcp://sched:8786

    Every model is validated before anything runs; each model's activations are
    extracted once; GPU steps queue on the `mlsae-gpu` concurrency limit.
    """
    from mlsae.paths import default_warehouse_location
    from mlsae.plan import plan_sweep
    from mlsae.warehouse import check_writable, working_dir

    models = list(fields.pop("model") or ["embedded"])
    parts = split_options(fields)
    request = build_request(preset, parts)
    if max_workers < 1:
        raise click.BadParameter(f"{max_workers}: give 1 or more", param_hint="--max-workers")
    where = out or default_warehouse_location()
    fail_fast(check_writable, where)
    # planned against the directory the runs write (a URL's local working copy)
    plans = fail_fast(plan_sweep, models, preset, **request.given(), out=str(working_dir(where)))
    if dry_run:
        print_plan(plans, as_json, where=where)
        return
    from flows.cmd_run import print_example_queries, print_outputs, print_start
    from flows.sweep import sweep

    for plan in plans:
        print_start(plan)

    start = time.perf_counter()
    result = call_flow(
        sweep, models=models, preset=preset, **request.given(), task_runner=task_runner,
        max_workers=max_workers, runner_address=runner_address, gpu_slots=gpu_slots, out=out,
        refresh=refresh)
    click.echo(f"\nDone in {(time.perf_counter() - start) / 60:.1f} min.")
    for run in result["runs"]:
        print_outputs(run, None, examples=False)
    if result["figures"]:
        click.echo("\nSweep figures:\n" + "\n".join(f"  {p}" for p in result["figures"]))
    print_example_queries(result["out"])
