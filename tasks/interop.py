"""Prefect task: import an autoencoder saved by another tool into the warehouse
(mlsae.interop.imports does the work); the steps after it treat it as a trained one."""

from __future__ import annotations

import time
from typing import Any

from prefect import task

from tasks.common import CACHE_POLICY, TRANSIENT_RETRIES, run_logger
from tasks.train import TrainManifest


@task(name="import-autoencoder", cache_policy=CACHE_POLICY, **TRANSIENT_RETRIES)
def import_autoencoder(request: dict[str, Any], fingerprint: str, settings: dict,
                       out: str) -> TrainManifest:
    """Check and save one imported autoencoder (`fingerprint`, the weight file's sha256, is
    part of the cache key: new weights at the same path import again)."""
    from mlsae.interop.imports import ImportRequest, describe, plan_import, save_import

    start = time.perf_counter()
    plan = plan_import(ImportRequest(**request), model_info=settings["model"])
    for warning in plan.warnings:
        run_logger().warning("%s", warning)
    from mlsae.warehouse import public_path
    from mlsae.warehouse.workspace import workspace

    with workspace(out, [plan.sae_id]) as local:
        sae_dir = save_import(plan, local)
    run_logger().info("imported %s", describe(plan))
    return TrainManifest(sae_id=plan.sae_id, sae_dir=public_path(out, sae_dir),
                         run_dir=public_path(out, sae_dir.parent),
                         role="imported", layers=list(plan.sae.cfg.layers), train_tokens=None,
                         steps=0, resumed_from_step=0, final_fvu=None,
                         seconds=round(time.perf_counter() - start, 2))
