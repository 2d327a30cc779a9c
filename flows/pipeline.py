"""The pipeline flow: one model, one or more SAE configs, every step of the paper.

    validate (no compute) -> extract block outputs once -> [tuned lens] ->
    each MLSAE config:             train -> log latents -> analyse
    its single-layer baselines:    train
    all autoencoders of the model: evaluate (one pass, the clean forward pass shared)
    -> figures

Each step is a task in tasks/ returning a small manifest; tasks are cached by
their inputs in the warehouse, so rerunning the same flow skips finished work,
and the library steps resume from their checkpoints after a kill.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, TypedDict

from prefect import flow
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from mlsae.estimate import format_duration, step_flops
from mlsae.plan import Budget, Grid, Plan, RunRequest, Target, run_settings, stable_plan
from mlsae.warehouse import table_dir, working_dir
from mlsae.warehouse.workspace import prepare_warehouse
from tasks.analyse import analyse_autoencoder, report_run
from tasks.common import ensure_gpu_limit, result_storage, run_logger
from tasks.evaluate import evaluate_autoencoder, evaluate_autoencoders
from tasks.extract import extract_activations
from tasks.figures import draw_model_figures, draw_sweep_figures
from tasks.latents import log_latent_tables
from tasks.lens import prepare_lens
from tasks.train import train_autoencoder, train_autoencoders_streaming
from tasks.validate import validate_parameters


class PipelineResult(TypedDict):
    out: str
    model: str
    sae_ids: list[str]
    mlsae_ids: list[str]
    tables: dict[str, str]
    figures: list[str]
    variance_summary: list[dict[str, Any]]


def resolve_warehouse(out: str | Path | None) -> Path | str:
    """The warehouse: `out`, else $MLSAE_HOME, else ./mlsae-data: an absolute directory, or
    a URL (s3://bucket/prefix) written through a local working copy
    (mlsae.warehouse.workspace; $MLSAE_SCRATCH / --scratch)."""
    from mlsae.paths import default_warehouse_location
    from mlsae.warehouse import check_writable, is_url, warehouse_url

    where = out or default_warehouse_location()
    if is_url(where):
        check_writable(where)
        return warehouse_url(where)
    return Path(where).expanduser().resolve()


SHARED_EXTRACTION = "extract-activations (shared cache)"
"""bind_tasks' key of the extraction whose cache is shared through the bucket."""


def bind_tasks(out: Path | str, refresh: bool = False) -> dict[str, Any]:
    """The pipeline's tasks with their results persisted in this warehouse (the cache; for
    a URL in the bucket, except the extraction's, whose cache stays on the worker, unless
    it is shared (Budget.shared_cache): SHARED_EXTRACTION, with its result in the bucket
    beside the cache it publishes, so every worker skips it)."""
    options = dict(persist_result=True, result_serializer="json",
                   refresh_cache=refresh or None)
    steps = {t.name: t.with_options(result_storage=result_storage(
                out, on_worker=t is extract_activations), **options) for t in (
        extract_activations, prepare_lens, train_autoencoder, evaluate_autoencoder,
        evaluate_autoencoders,
        log_latent_tables, analyse_autoencoder, draw_model_figures, draw_sweep_figures,
        train_autoencoders_streaming)}
    steps[SHARED_EXTRACTION] = extract_activations.with_options(
        result_storage=result_storage(out), **options)
    return steps


def shares_cache(plan: Plan, out: Path | str) -> bool:
    """Whether this run publishes its activation cache to the warehouse at a URL
    (Budget.shared_cache; a local warehouse holds its caches anyway)."""
    from mlsae.warehouse import is_url

    return (plan["training_source"] == "cache" and bool(plan["budget"].get("shared_cache"))
            and is_url(out))


class RunProgress:
    """The whole run's progress: one line per finished step with the share of the run's
    estimated work done (mlsae.estimate.step_flops), the elapsed time and an ETA. The
    steps' own lines give their tokens/s and ETA."""

    def __init__(self, flops: dict[str, float]):
        self.flops, self.total = flops, sum(flops.values()) or 1.0
        self.done, self.n_done = 0.0, 0
        self.start = time.perf_counter()
        self.log = run_logger().info
        self.lock = threading.Lock()

    def track(self, future: PrefectFuture, key: str) -> PrefectFuture:
        future.add_done_callback(lambda f: self._finished(key))
        return future

    def _finished(self, key: str) -> None:
        with self.lock:
            self.done += self.flops.get(key, 0.0)
            self.n_done += 1
            elapsed = time.perf_counter() - self.start
            share = self.done / self.total
            eta = elapsed * (1 - share) / share if share > 0 else None
            self.log("run: %d of %d steps done (%s), ~%.0f%% of the work, %s elapsed%s",
                     self.n_done, len(self.flops), key.split(":")[0], 100 * share,
                     format_duration(elapsed),
                     f", ETA ~{format_duration(eta)}" if eta and share < 1 else "")


def submit_model(plan: Plan, out: Path | str, steps: dict[str, Any], *, figures: bool = True
                 ) -> tuple[PrefectFuture | None, dict[str, PrefectFuture]]:
    """Submit one model's whole task graph; return (figures future, analysis futures by sae_id).
    figures=False: no model figures (None), for a second plan on the same model (the report's
    dose-response at its own budget), whose figures would replace the first plan's.

    Futures carry the dependencies, so a concurrent task runner (the sweep's) runs
    independent configs side by side while each config's steps stay in order:
    train -> log latents (MLSAEs) -> evaluate (all autoencoders of the model in one pass)
    -> analyse (MLSAEs). Training reads the activation cache (extracted once, one task per autoencoder) or,
    when the cache would not fit the cache limit, one streaming pass of the model
    trains every autoencoder of the plan together.
    """

    progress = RunProgress(step_flops(plan))
    track = progress.track
    settings, where = run_settings(plan), str(out)
    eval_args = dict(settings=settings, out=where)
    lens = None
    if any(spec["lens"] for spec in plan["specs"]):
        lens = steps["prepare-lens"].submit(settings=settings, out=where)
    cache = None
    trained_by_id: dict[str, Any] = {}
    if plan["training_source"] == "stream":
        group = track(steps["train-autoencoders-streaming"].submit(
            specs=plan["specs"], settings=settings, lens=lens, out=where), "stream")
        trained_by_id = {spec["sae_id"]: group for spec in plan["specs"]}
    else:
        if shares_cache(plan, out):
            cache = track(steps[SHARED_EXTRACTION].submit(
                settings=settings, out=where, shared_cache=True), "extract")
        else:
            cache = track(steps["extract-activations"].submit(settings=settings, out=where),
                          "extract")
        for spec in plan["specs"]:
            trained_by_id[spec["sae_id"]] = track(steps["train-autoencoder"].submit(
                spec=spec, settings=settings, cache=cache, lens=lens if spec["lens"] else None,
                out=where), f"train:{spec['sae_id']}")
    trained: list[Any] = []  # futures of one manifest, or of a streaming group's list
    logged_by_id: dict[str, PrefectFuture] = {}
    for spec in plan["specs"]:
        if trained_by_id[spec["sae_id"]] not in trained:
            trained.append(trained_by_id[spec["sae_id"]])
        if spec["role"] == "mlsae":  # baselines: weights and metrics only, no latent table
            logged_by_id[spec["sae_id"]] = track(steps["log-latent-tables"].submit(
                trained=trained_by_id[spec["sae_id"]], sae_id=spec["sae_id"],
                lens=lens if spec["lens"] else None, **eval_args), f"log:{spec['sae_id']}")
    # One evaluation for all: each batch's clean forward pass is shared.
    evaluated = track(steps["evaluate-autoencoders"].submit(
        trained=trained, sae_ids=[spec["sae_id"] for spec in plan["specs"]],
        logged=list(logged_by_id.values()), lens=lens,
        lens_ids=[spec["sae_id"] for spec in plan["specs"] if spec["lens"]], **eval_args),
        "evaluate")
    analyses: dict[str, PrefectFuture] = {
        sae_id: track(steps["analyse-autoencoder"].submit(
            sae_id=sae_id, logged=logged, evaluated=evaluated, out=where), f"analyse:{sae_id}")
        for sae_id, logged in logged_by_id.items()}
    if not figures:
        return None, analyses
    drawn = track(steps["draw-model-figures"].submit(
        plan=stable_plan(plan), cache=cache, lens=lens, trained=trained, metrics=evaluated,
        analyses=list(analyses.values()), out=where), "figures")
    return drawn, analyses


def result_of(plan: Plan, out: Path | str, figures: PrefectFuture,
              analyses: dict[str, PrefectFuture]) -> PipelineResult:
    figure_manifest = figures.result()
    summaries = [row for future in analyses.values()
                 for row in future.result()["variance_summary"]]
    return PipelineResult(
        out=str(out), model=plan["model"]["name"],
        sae_ids=[spec["sae_id"] for spec in plan["specs"]],
        mlsae_ids=[spec["sae_id"] for spec in plan["specs"] if spec["role"] == "mlsae"],
        tables={t: str(table_dir(out, t)) for t in ("saes", "layer_metrics", "tokens",
                                                      "latents")},
        figures=figure_manifest["figures"], variance_summary=summaries)


@flow(name="mlsae-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1),
      log_prints=True, validate_parameters=True)
def pipeline(
    preset: str = "demo",
    target: Target | None = None,
    grid: Grid | None = None,
    budget: Budget | None = None,
    out: str | None = None,
    refresh: bool = False,
) -> PipelineResult:
    """Train, evaluate and analyse MLSAEs for one model (all SPEC steps, then the figures).

    Args:
        preset: demo, sweep, report or paper (mlsae.plan.PRESETS): the budget and grid
            that every field left unset takes.
        target: what to run on (mlsae.plan.Target: model, data, text_column, data_config,
            device, precision), e.g. {"model": "EleutherAI/pythia-70m-deduped"}.
        grid: which autoencoders (mlsae.plan.Grid: expansion_factors, ks, lens, layers,
            baselines, base_expansion_factor, base_k), e.g. {"ks": [16, 32]}.
        budget: how much (mlsae.plan.Budget: train_tokens, eval_tokens, seq_len,
            batch_tokens, lr, seed, k_aux, dead_tokens, shuffle_tokens, cache_limit,
            shared_cache, ...).
        out: the warehouse: a directory or a URL such as s3://bucket/prefix (default
            $MLSAE_HOME, else ./mlsae-data). A URL is written through a local working copy
            ($MLSAE_SCRATCH on the worker), and its step cache lives in the bucket.
        refresh: ignore Prefect's cached task results and re-run every task; each step
            still reuses its finished outputs in the warehouse (delete them to recompute).
            Use it after deleting part of a warehouse.
    """
    out_dir = resolve_warehouse(out)
    request = RunRequest(preset=preset, target=target, grid=grid, budget=budget)
    # planned against the directory the run writes (for a URL: its working copy's disk)
    plan = validate_parameters(request=request, out=str(working_dir(out_dir)))
    prepare_warehouse(out_dir)
    if ensure_gpu_limit() is not None:
        run_logger().info("GPU work is limited by the 'mlsae-gpu' concurrency limit")
    figures, analyses = submit_model(plan, out_dir, bind_tasks(out_dir, refresh))
    result = result_of(plan, out_dir, figures, analyses)
    report_run(result)
    return result
