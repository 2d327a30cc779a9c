"""The import flow: an autoencoder saved by another tool (the paper's released MLSAEs,
SAELens, sparsify) -> the warehouse -> the usual evaluate -> log latents -> analyse steps,
so `mlsae sql` and the report work on it as on one mlsae trained.

    check (no compute) -> import-autoencoder -> log-latent-tables -> evaluate-autoencoder
                       -> analyse-autoencoder

Tasks are cached in the warehouse like the pipeline's (flows.pipeline.bind_tasks): a rerun
of the same import skips every finished step.
"""

from __future__ import annotations

from typing import Any, TypedDict

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import bind_tasks, resolve_warehouse
from mlsae.warehouse import working_dir
from mlsae.warehouse.workspace import prepare_warehouse
from tasks.common import result_storage, run_logger
from tasks.interop import import_autoencoder


class ImportFlowResult(TypedDict):
    out: str
    sae_id: str
    sae_dir: str
    model: str
    format: str
    warnings: list[str]
    layer_metrics: list[dict[str, Any]]
    variance_summary: list[dict[str, Any]]


@flow(name="mlsae-import", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True,
      validate_parameters=True)
def import_flow(
    source: str,
    model: str | None = None,
    sae_id: str | None = None,
    layers: list[int] | None = None,
    preset: str = "demo",
    target: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    out: str | None = None,
    refresh: bool = False,
) -> ImportFlowResult:
    """Import an autoencoder and evaluate, log and analyse it like a trained one.

    Args:
        source: a directory with the autoencoder's files (the paper's config.json +
            model.safetensors, SAELens' or sparsify's) or a hub id.
        model: the language model it reads ('embedded', a directory or a hub id).
        sae_id: its id in the warehouse (default from the source's name).
        layers: the blocks it reads (default: the checkpoint's record, else every block).
        preset: the evaluation budget's preset (mlsae.plan.PRESETS: eval_tokens, seq_len).
        target: mlsae.plan.Target fields besides the model (data, device, ...).
        budget: mlsae.plan.Budget fields (eval_tokens, seq_len, ...).
        out: the warehouse: a directory or a URL (as for the pipeline; default
            $MLSAE_HOME, else ./mlsae-data).
        refresh: ignore Prefect's cached task results and rerun every step.
    """
    from mlsae.interop.imports import ImportRequest, plan_import_run

    out_dir = resolve_warehouse(out)
    request = ImportRequest(source=source, model=model, sae_id=sae_id, layers=layers)
    plan, settings = plan_import_run(request, preset, target, budget, working_dir(out_dir))
    prepare_warehouse(out_dir)
    steps = bind_tasks(out_dir, refresh)
    importer = import_autoencoder.with_options(
        result_storage=result_storage(out_dir), persist_result=True, result_serializer="json",
        refresh_cache=refresh or None)
    where, sae_id = str(out_dir), plan.sae_id
    fixed = {"source": source, "model": model, "sae_id": sae_id, "layers": layers}
    imported = importer.submit(request=fixed, fingerprint=plan.fingerprint, settings=settings,
                               out=where)
    logged = steps["log-latent-tables"].submit(trained=imported, sae_id=sae_id, lens=None,
                                               settings=settings, out=where)
    evaluated = steps["evaluate-autoencoder"].submit(trained=imported, sae_id=sae_id,
                                                     logged=logged, lens=None,
                                                     settings=settings, out=where)
    analysed = steps["analyse-autoencoder"].submit(sae_id=sae_id, logged=logged,
                                                   evaluated=evaluated, out=where).result()
    run_logger().info("imported %s into %s", sae_id, where)
    return ImportFlowResult(out=where, sae_id=sae_id, sae_dir=imported.result()["sae_dir"],
                            model=settings["model"]["name"], format=plan.format,
                            warnings=plan.warnings, layer_metrics=analysed["layer_metrics"],
                            variance_summary=analysed["variance_summary"])
