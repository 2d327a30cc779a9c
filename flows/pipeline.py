"""The pipeline flow: one model, one or more SAE configs, every step of the paper.

    validate (no compute) -> extract block outputs once -> [tuned lens] ->
    each MLSAE config:             train -> log latents -> evaluate -> analyse
    its single-layer baselines:    train -> evaluate
    -> figures

Each step is a task in tasks/ returning a small manifest; tasks are cached by
their inputs in the warehouse, so rerunning the same flow skips finished work,
and the library steps resume from their checkpoints after a kill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from prefect import flow
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.analyse import analyse_autoencoder, report_run
from tasks.common import ensure_gpu_limit, results_dir, run_logger
from tasks.evaluate import evaluate_autoencoder
from tasks.extract import extract_activations
from tasks.figures import draw_model_figures, draw_sweep_figures
from tasks.latents import log_latent_tables
from tasks.lens import prepare_lens
from tasks.train import train_autoencoder
from tasks.validate import PipelinePlan, validate_parameters

# Defaults: sized so that `mlsae run` with no options finishes in well under 15
# minutes on a 2-core CPU with the embedded model (6 blocks x d_model 256).
DEFAULT_EXPANSION_FACTORS = (4,)
DEFAULT_KS = (16,)
DEFAULT_TRAIN_TOKENS = 200_000
DEFAULT_EVAL_TOKENS = 8_192
DEFAULT_SEQ_LEN = 128
DEFAULT_LR = 1e-3


class PipelineResult(TypedDict):
    out: str
    model: str
    sae_ids: list[str]
    mlsae_ids: list[str]
    tables: dict[str, str]
    figures: list[str]
    variance_summary: list[dict[str, Any]]


def resolve_out(out: str | Path | None) -> Path:
    """The warehouse directory: `out`, else $MLSAE_HOME, else ./mlsae-data (absolute).
    Created only once the parameters are valid."""
    from mlsae.paths import default_warehouse

    path = Path(out).expanduser() if out else default_warehouse()
    return path.resolve()


def bind_tasks(out: Path, refresh: bool = False) -> dict[str, Any]:
    """The pipeline's tasks with their results persisted in this warehouse (the cache)."""
    options = dict(result_storage=results_dir(out), persist_result=True,
                   result_serializer="json", refresh_cache=refresh or None)
    return {t.name: t.with_options(**options) for t in (
        extract_activations, prepare_lens, train_autoencoder, evaluate_autoencoder,
        log_latent_tables, analyse_autoencoder, draw_model_figures, draw_sweep_figures)}


def submit_model(plan: PipelinePlan, out: Path, steps: dict[str, Any]
                 ) -> tuple[PrefectFuture, dict[str, PrefectFuture]]:
    """Submit one model's whole task graph; return (figures future, analysis futures by sae_id).

    Futures carry the dependencies, so a concurrent task runner (the sweep's) runs
    independent configs side by side while each config's steps stay in order:
    MLSAE: train -> log latents -> evaluate -> analyse; baseline: train -> evaluate.
    """
    model, device, where = plan["model"], plan["device"], str(out)
    eval_args = dict(model=model["name"], data=plan["data"], eval_tokens=plan["eval_tokens"],
                     seq_len=plan["seq_len"], device=device, out=where)
    cache = steps["extract-activations"].submit(
        model=model["name"], data=plan["data"], layers=plan["layers"],
        train_tokens=plan["train_tokens"], seq_len=plan["seq_len"], device=device, out=where)
    lens = None
    if any(spec["lens"] for spec in plan["specs"]):
        lens = steps["prepare-lens"].submit(model=model["name"], data=plan["data"],
                                            device=device, out=where)
    trained: list[PrefectFuture] = []
    evaluated: list[PrefectFuture] = []
    analyses: dict[str, PrefectFuture] = {}
    for spec in plan["specs"]:
        spec_lens = lens if spec["lens"] else None
        train = steps["train-autoencoder"].submit(
            spec=spec, model=model, data=plan["data"], cache=cache, lens=spec_lens,
            train_tokens=plan["train_tokens"], seed=plan["seed"], lr=plan["lr"], device=device,
            out=where, batch_tokens=plan["batch_tokens"])
        trained.append(train)
        logged = None
        if spec["role"] == "mlsae":  # baselines: weights and metrics only, no latent table
            logged = steps["log-latent-tables"].submit(trained=train, lens=spec_lens, **eval_args)
        evaluate = steps["evaluate-autoencoder"].submit(
            trained=train, logged=logged, lens=spec_lens, **eval_args)
        evaluated.append(evaluate)
        if logged is not None:
            analyses[spec["sae_id"]] = steps["analyse-autoencoder"].submit(
                sae_id=spec["sae_id"], logged=logged, evaluated=evaluate, out=where)
    figures = steps["draw-model-figures"].submit(
        plan=plan, cache=cache, lens=lens, trained=trained, metrics=evaluated,
        analyses=list(analyses.values()), out=where)
    return figures, analyses


def result_of(plan: PipelinePlan, out: Path, figures: PrefectFuture,
              analyses: dict[str, PrefectFuture]) -> PipelineResult:
    figure_manifest = figures.result()
    summaries = [row for future in analyses.values()
                 for row in future.result()["variance_summary"]]
    return PipelineResult(
        out=str(out), model=plan["model"]["name"],
        sae_ids=[spec["sae_id"] for spec in plan["specs"]],
        mlsae_ids=[spec["sae_id"] for spec in plan["specs"] if spec["role"] == "mlsae"],
        tables={t: str(out / t) for t in ("saes", "layer_metrics", "tokens", "latents")},
        figures=figure_manifest["figures"], variance_summary=summaries)


@flow(name="mlsae-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1),
      log_prints=True, validate_parameters=True)
def pipeline(
    model: str = "embedded",
    data: str = "embedded",
    expansion_factors: tuple[int, ...] = DEFAULT_EXPANSION_FACTORS,
    ks: tuple[int, ...] = DEFAULT_KS,
    layers: list[int] | None = None,
    lens: bool = False,
    baselines: bool = True,
    train_tokens: int = DEFAULT_TRAIN_TOKENS,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    device: str = "auto",
    out: str | None = None,
    refresh: bool = False,
) -> PipelineResult:
    """Train, evaluate and analyse MLSAEs for one model (all SPEC steps, then the figures).

    Args:
        model: "embedded" (the model shipped with mlsae), a local directory saved with
            `save_pretrained`, or a hub id such as "EleutherAI/pythia-70m-deduped".
        data: "embedded", a local .txt/.jsonl/.parquet file or directory, or a hub data set.
        expansion_factors: R values; n_latents = R x d_model. One MLSAE per (R, k).
        ks: active latents per example.
        layers: block indices the MLSAE reads (default: every block).
        lens: train in the tuned-lens basis (trains a lens first where none exists).
        baselines: also train a single-layer SAE on each layer, for comparison.
        train_tokens: training tokens per layer (the MLSAE sees train_tokens x L examples).
        eval_tokens: held-out tokens for the metrics and the latent tables.
        seq_len: tokens per sequence.
        seed: initialisation / data order seed.
        lr: Adam learning rate. The reference's 1e-4 is tuned for 1B tokens; 1e-3 suits
            the short budgets used here.
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        out: the warehouse directory (default $MLSAE_HOME, else ./mlsae-data).
        refresh: ignore Prefect's cached task results and re-run every task; each step
            still reuses its finished outputs in the warehouse (delete them to recompute).
            Use it after deleting part of a warehouse.
    """
    out_dir = resolve_out(out)
    plan = validate_parameters(
        model=model, data=data, expansion_factors=list(expansion_factors), ks=list(ks),
        layers=layers, lens=lens, baselines=baselines, train_tokens=train_tokens,
        eval_tokens=eval_tokens, seq_len=seq_len, seed=seed, lr=lr, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ensure_gpu_limit() is not None:
        run_logger().info("GPU work is limited by the 'mlsae-gpu' concurrency limit")
    figures, analyses = submit_model(plan, out_dir, bind_tasks(out_dir, refresh))
    result = result_of(plan, out_dir, figures, analyses)
    report_run(result)
    return result


