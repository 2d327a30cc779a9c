"""The sweep flow: a grid of models x expansion factors x k x lens, run concurrently.

Every model is validated before anything runs. Then one inner flow runs the
whole grid with the task runner you pick:

- "thread" (default, nothing to install): a thread pool in this process;
- "dask": prefect-dask's DaskTaskRunner (`pip install -e .[dask]`), a local
  cluster or the one at `runner_address`;
- "ray": prefect-ray's RayTaskRunner (`pip install -e .[ray]`), local or remote.

Each model's activations are extracted once and shared by its configs; GPU
steps take a slot of the `mlsae-gpu` concurrency limit (one per GPU by
default), so concurrent configs queue for a GPU instead of sharing its memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from prefect import flow

from flows.pipeline import (
    PipelineResult,
    bind_tasks,
    resolve_warehouse,
    result_of,
    submit_model,
)
from mlsae.plan import Budget, Grid, Plan, Target, plan_sweep, stable_plan
from mlsae.warehouse import is_url, working_dir
from mlsae.warehouse.workspace import prepare_warehouse
from tasks.common import ensure_gpu_limit, run_logger
from tasks.validate import InvalidParameters

TASK_RUNNERS = ("thread", "dask", "ray")


class SweepResult(TypedDict):
    out: str
    runs: list[PipelineResult]
    figures: list[str]


def make_task_runner(kind: str, max_workers: int, address: str | None = None):
    """The task runner named `kind`; InvalidParameters naming the extra to install."""
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise InvalidParameters("task_runner 'dask' needs prefect-dask: "
                                    "pip install -e '.[dask]'") from err
        if address:
            return DaskTaskRunner(address=address)
        # Worker processes of one thread each: a task's torch threads and the GIL are its own.
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 1,
                                              "processes": True})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise InvalidParameters("task_runner 'ray' needs prefect-ray: "
                                    "pip install -e '.[ray]'") from err
        if address:
            return RayTaskRunner(address=address)
        # A local Ray instance with max_workers CPUs: Ray runs one task per CPU, each in a
        # worker process with one torch thread (Ray sets OMP_NUM_THREADS=1).
        return RayTaskRunner(init_kwargs={"num_cpus": max_workers,
                                          "include_dashboard": False})
    raise InvalidParameters(f"unknown task_runner {kind!r}: use one of {', '.join(TASK_RUNNERS)}")


@flow(name="mlsae-sweep-grid")
def run_grid(plans: list[dict[str, Any]], out: str, refresh: bool = False) -> SweepResult:
    """Submit every model's task graph at once; the task runner decides what runs together."""
    where = out if is_url(out) else Path(out)
    steps = bind_tasks(where, refresh)
    submitted = [(plan, *submit_model(plan, where, steps)) for plan in plans]
    runs = [result_of(plan, where, figures, analyses) for plan, figures, analyses in submitted]
    sweep_figures = steps["draw-sweep-figures"].submit(
        analyses=[a for _, _, analyses in submitted for a in analyses.values()],
        plans=[stable_plan(plan) for plan in plans], out=out).result()
    return SweepResult(out=out, runs=runs, figures=sweep_figures["figures"])


@flow(name="mlsae-sweep", validate_parameters=True)
def sweep(
    models: list[str] = ["embedded"],  # noqa: B006 - Prefect parameters are never mutated
    preset: str = "sweep",
    target: Target | None = None,
    grid: Grid | None = None,
    budget: Budget | None = None,
    task_runner: str = "thread",
    max_workers: int = 2,
    runner_address: str | None = None,
    gpu_slots: int | None = None,
    out: str | None = None,
    refresh: bool = False,
) -> SweepResult:
    """Run the pipeline over a grid, concurrently, into one warehouse.

    Args:
        models: models to sweep ("embedded", local directories, hub ids).
        preset, target, grid, budget: the request, as for the pipeline (target.model is
            replaced by each model in turn); preset "sweep" is R in {2,4} x k in {8,16}.
        task_runner: "thread" (default), "dask" or "ray".
        max_workers: concurrent tasks (threads, or Dask workers).
        runner_address: address of an existing Dask scheduler / Ray cluster.
        gpu_slots: size of the `mlsae-gpu` limit (default: one per visible GPU).
        out: the warehouse: a directory or a URL such as s3://bucket/prefix (default
            $MLSAE_HOME, else ./mlsae-data), as for the pipeline.
        refresh: ignore cached task results (finished warehouse outputs are still reused).
    """
    out_dir = resolve_warehouse(out)
    problems: list[str] = []
    plans: list[Plan] = []
    try:  # planned against the directory the runs write (for a URL: its working copy)
        plans = plan_sweep(models, preset, target, grid, budget, str(working_dir(out_dir)))
    except InvalidParameters as err:
        problems.append(str(err))
    if max_workers < 1:
        problems.append(f"--max-workers must be >= 1, got {max_workers}")
    try:
        runner = make_task_runner(task_runner, max(1, max_workers), runner_address)
    except InvalidParameters as err:
        problems.append(str(err))
    if problems:
        raise InvalidParameters("\n".join(problems))
    prepare_warehouse(out_dir)
    slots = ensure_gpu_limit(gpu_slots)
    n_saes = sum(len(p["specs"]) for p in plans)
    run_logger().info("sweep: %d model(s), %d autoencoders, task runner %s (%d workers)%s",
                      len(plans), n_saes, task_runner, max_workers,
                      f", {slots} GPU slot(s)" if slots else "")
    return run_grid.with_options(task_runner=runner)(plans=plans, out=str(out_dir),
                                                     refresh=refresh)
