"""The report flow: reproduce the paper's findings on a model (and across a family of
models) as a generated report.

    validate every model's grid (no compute) -> the pipeline's task graph per model (and for
    the dose-response at its own budget, Grid.dose_train_tokens) ->
    write-report (Markdown + PNG into <warehouse>/report/<first model>/, a Prefect artifact;
    for a warehouse at a URL written in the worker's working copy and published to the bucket)

The grid is a "star" around one base config (R0, k0): the MLSAE at every R in
`expansion_factors` with k0, at every k in `ks` with R0, the base config in the
tuned-lens basis, and single-layer SAEs for every layer at the base config. One
axis moves at a time, so each comparison in the report changes one thing, and
the grid costs len(R) + len(k) + 1 MLSAEs instead of a full product. Every other
model of `models` gets only the base-config MLSAE with the same budget: the report's
cross-model section compares the models at one config.

Every step is a cached pipeline task (inputs + task source + mlsae version,
results in the warehouse), and the library steps resume from their
checkpoints, so an interrupted report run continues where it stopped; the
report itself is rewritten on every run (it is cheap).
"""

from __future__ import annotations

import time
from typing import TypedDict

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.options import report_command_line
from flows.pipeline import bind_tasks, resolve_warehouse, submit_model
from mlsae.plan import Budget, Grid, Target, check_report_plans, report_models, report_request
from mlsae.warehouse import working_dir
from mlsae.warehouse.workspace import prepare_warehouse
from tasks.common import ensure_gpu_limit, run_logger
from tasks.report import ReportManifest, write_report


class ReportResult(TypedDict):
    out: str
    report: str
    """The generated Markdown file."""
    report_dir: str
    sae_ids: list[str]
    seconds: float


@flow(name="mlsae-report", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True,
      validate_parameters=True)
def report(
    preset: str = "report",
    target: Target | None = None,
    grid: Grid | None = None,
    budget: Budget | None = None,
    out: str | None = None,
    refresh: bool = False,
    models: list[str] | None = None,
) -> ReportResult:
    """Train the report's grid on the first model, the base config on every other, and write
    the report of the paper's findings.

    Args:
        preset: the budget and star grid unset fields take (default "report": R in
            {2,4,8} at k 16, k in {8,16,32} at R 4, 2M training tokens per layer).
        target: what to run on (mlsae.plan.Target), as for the pipeline.
        grid: mlsae.plan.Grid: expansion_factors (each at base_k), ks (each at
            base_expansion_factor), the base config (it also gets single-layer SAEs and,
            with lens "both", a tuned-lens MLSAE).
        budget: mlsae.plan.Budget, as for the pipeline.
        out: the warehouse: a directory or a URL such as s3://bucket/prefix (default
            $MLSAE_HOME, else ./mlsae-data), as for the pipeline; the report goes to
            <out>/report/<model>/report.md (for a URL, into the bucket).
        refresh: ignore cached task results (finished warehouse outputs are still reused).
        models: the report's models, the first with the star grid (default: target.model if
            given, else mlsae.plan.REPORT_MODELS, the embedded family).
    """
    start = time.time()
    out_dir = resolve_warehouse(out)
    models = report_models(models, target)
    request = report_request(preset, target, grid, budget)
    # planned against the directory the run writes (for a URL: its working copy's disk)
    planned = check_report_plans(request, models, str(working_dir(out_dir)))
    plans = planned.models
    prepare_warehouse(out_dir)
    ensure_gpu_limit()
    for plan in planned.all:
        run_logger().info("report: %d autoencoders on %s, %d training tokens per layer",
                          len(plan["specs"]), plan["model"]["name"], plan["train_tokens"])
    steps = bind_tasks(out_dir, refresh)
    submitted = [submit_model(plan, out_dir, steps) for plan in plans]
    (figures, analyses), family = submitted[0], submitted[1:]
    dose_done = [] if planned.dose is None else list(
        submit_model(planned.dose, out_dir, steps, figures=False)[1].values())
    base = (request.grid.base_expansion_factor, request.grid.base_k)
    manifest: ReportManifest = write_report.submit(
        plan=plans[0], base=base, figures=figures, analyses=list(analyses.values()),
        family=plans[1:], family_figures=[f for f, _ in family],
        family_analyses=[a for _, done in family for a in done.values()],
        dose=planned.dose, dose_analyses=dose_done,
        command=report_command_line(request, models, out), started_at=start, out=str(out_dir),
        out_arg=out).result()
    return ReportResult(out=str(out_dir), report=manifest["report"],
                        report_dir=manifest["report_dir"],
                        sae_ids=[s["sae_id"] for plan in planned.all for s in plan["specs"]],
                        seconds=round(time.time() - start, 1))
