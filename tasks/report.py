"""Prefect task: write the generated report of a report flow's grid and model family
(mlsae.report) and link it as a Markdown artifact."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TypedDict

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mlsae.plan import Plan
from tasks.analyse import AnalysisManifest, artifact_key
from tasks.common import run_logger
from tasks.extract import cache_dir_for
from tasks.figures import FiguresManifest
from tasks.train import autoencoder_dir


class ReportManifest(TypedDict):
    report: str
    report_dir: str
    figures: list[str]


def _model_inputs(plan: Plan, out: str) -> dict:
    """Where a model's residual sample comes from (its cache on this worker, else a stream)
    and its size."""
    from mlsae.plan import extract_config, run_settings
    from mlsae.report import count_parameters

    settings = run_settings(plan)
    cache = cache_dir_for(out, extract_config(settings))
    # a warehouse at a URL keeps the cache on the worker that extracted it: another
    # worker writing the report streams the sample instead, unless the cache is shared
    # (Budget.shared_cache): then it is pulled from the bucket
    if plan["training_source"] == "cache" and plan["budget"].get("shared_cache"):
        from mlsae.warehouse.workspace import pull_activation_cache

        pull_activation_cache(out, cache)
    cached = plan["training_source"] == "cache" and cache.exists()
    return dict(cache_dir=str(cache) if cached else None,
                extract=None if cached else extract_config(settings, tokens=4096),
                n_params=count_parameters(plan["model"]["source"]))


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(plan: Plan, base: tuple[int, int], figures: FiguresManifest,
                 analyses: list[AnalysisManifest], command: str, started_at: float,
                 out: str, out_arg: str | None = None, family: list[Plan] | None = None,
                 family_figures: list[FiguresManifest] | None = None,
                 family_analyses: list[AnalysisManifest] | None = None,
                 dose: Plan | None = None,
                 dose_analyses: list[AnalysisManifest] | None = None) -> ReportManifest:
    """Rewrite <out>/report/<model>/report.md from the warehouse (never cached: it is cheap
    and must reflect the warehouse as it is now). `family`: the other models' plans (one
    base-config MLSAE each); their figures and analyses are awaited, not read; likewise
    `dose`, the first model's dose-response at its own budget (Grid.dose_train_tokens). For a
    warehouse at a URL the report is written in the working copy (the autoencoders, the
    model's figures and the report's ledger pulled from the bucket first) and published."""
    from mlsae import warehouse
    from mlsae.warehouse.workspace import workspace

    model = plan["model"]
    ids = [s["sae_id"] for p in (plan, *(family or []), *([dose] if dose else []))
           for s in p["specs"]]
    with workspace(out, ids, write=False, shared=(warehouse.report_prefix(model["slug"]),
                                                  warehouse.figures_prefix(model["slug"]))):
        result, target = _write(plan, base, figures, command, started_at, out, out_arg, family,
                                dose)
    report = warehouse.public_path(out, result.report)
    _link(report, result.report.read_text(), model["name"])
    return ReportManifest(report=report, report_dir=warehouse.public_path(out, target),
                          figures=[warehouse.public_path(out, p) for p in result.figures])


def _write(plan: Plan, base: tuple[int, int], figures: FiguresManifest, command: str,
           started_at: float, out: str, out_arg: str | None, family: list[Plan] | None,
           dose: Plan | None = None):
    """Write the report into the warehouse's (working) directory: (its ReportOutput, its
    directory)."""
    from mlsae import warehouse
    from mlsae.report import GridEntry, ModelEntry, ReportInputs
    from mlsae.report import write_report as build

    model = plan["model"]
    base_id = next(s["sae_id"] for s in plan["specs"] if s["role"] == "mlsae" and not s["lens"]
                   and (s["expansion_factor"], s["k"]) == tuple(base))
    others = [ModelEntry(name=p["model"]["name"], n_layers=len(p["layers"]),
                         d_model=p["model"]["d_model"],
                         base_id=next(s["sae_id"] for s in p["specs"] if s["role"] == "mlsae"),
                         **_model_inputs(p, out)) for p in family or []]
    def entries(p: Plan, train_tokens: int | None = None) -> list[GridEntry]:
        return [GridEntry(sae_id=s["sae_id"], role=s["role"],
                          expansion_factor=s["expansion_factor"], k=s["k"], lens=s["lens"],
                          layers=list(s["layers"]), run_dir=str(autoencoder_dir(out, s["sae_id"])),
                          train_tokens=train_tokens)
                for s in p["specs"]]

    inputs = ReportInputs(
        warehouse=out if warehouse.is_url(out) else Path(out), model=model["name"],
        data=plan["data"], n_layers=len(plan["layers"]), d_model=model["d_model"],
        grid=entries(plan), dose_grid=entries(dose, dose["train_tokens"]) if dose else [],
        dose_train_tokens=dose["train_tokens"] if dose else None,
        base_id=base_id, train_tokens=plan["train_tokens"], eval_tokens=plan["eval_tokens"],
        seq_len=plan["seq_len"], lr=plan["lr"],
        batch_tokens=min(plan["batch_tokens"], plan["train_tokens"]), command=command,
        warehouse_arg=out_arg,
        pipeline_figures=[str(warehouse.local_path(out, p)) for p in figures["figures"]],
        family=others, dose_k=plan["request"]["grid"].get("dose_k"), started_at=started_at,
        device=plan["device"], **_model_inputs(plan, out))
    target = warehouse.report_dir(warehouse.working_dir(out), model["slug"])
    start = time.perf_counter()
    result = build(inputs, target)
    run_logger().info("report: %s (%d figures, %.1f s); finding 3 across %d models: %s",
                      result.report, len(result.figures), time.perf_counter() - start,
                      len(inputs.models), result.verdicts.family.status)
    return result, target


def _link(report: str, text: str, model: str) -> None:
    """The report as a Markdown artifact; its figures as links into the warehouse (file://
    for a directory, the objects' URLs for a bucket)."""
    folder = report.rsplit("/", 1)[0]
    base = folder if "://" in folder else f"file://{folder}"
    text = text.replace("](figures/", f"]({base}/figures/")
    try:
        create_markdown_artifact(markdown=text, key=artifact_key(f"report-{model}"),
                                 description=f"MLSAE report for {model}: {report}")
    except Exception as err:  # the report file is the product; the artifact a convenience
        run_logger().warning("could not create the report artifact: %s", err)
