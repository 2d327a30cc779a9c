"""The rerun flow: give every registered model without results the pipeline (or the report).

The registry is flows/models.yaml (or the file named by `registry`) plus the
Prefect Variable `mlsae_models`. A model "has results" when the warehouse's
`saes` table has an evaluated autoencoder for it (a row joined to
`layer_metrics`). For each model without results:

- deployed (this flow runs from a deployment and the pipeline deployment
  exists): `run_deployment` of the pipeline deployment, unless a run for that
  model is already scheduled or running; the runs are awaited;
- otherwise: the pipeline as a subflow, in this process.

With `kind="report"` the flow is the report flow instead (flows/report.py: a grid
and the generated report), and a model counts as done when its report exists in
the warehouse; so a schedule on a registry of models yields a report per new model.

Idempotent: a second run with nothing new finds every model done and does nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TypedDict

from prefect import flow

from flows.pipeline import pipeline, resolve_warehouse
from flows.report import report
from tasks.common import run_logger
from tasks.validate import InvalidParameters, normalise_model_name

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REGISTRY = "flows/models.yaml"
REGISTRY_VARIABLE = "mlsae_models"
PIPELINE_DEPLOYMENT = "mlsae-pipeline/default"
REPORT_DEPLOYMENT = "mlsae-report/default"
KINDS = {"pipeline": (PIPELINE_DEPLOYMENT, pipeline), "report": (REPORT_DEPLOYMENT, report)}
"""What a new model gets: kind -> (its deployment, its flow for subflow mode)."""
ENTRY_KEYS = {"model", "data", "parameters"}


class RegistryEntry(TypedDict, total=False):
    model: str
    data: str
    parameters: dict[str, Any]


class RerunResult(TypedDict):
    registered: list[str]
    done_before: list[str]
    started: list[str]
    skipped_in_flight: list[str]
    failed: list[str]
    mode: str


def registry_path(registry: str) -> Path:
    """A relative registry path is looked up in the working directory, then the repository."""
    path = Path(registry).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def check_entries(entries: Any, where: str) -> list[RegistryEntry]:
    if not isinstance(entries, list):
        raise InvalidParameters(f"{where}: expected a list of {{model: ...}} entries")
    checked: list[RegistryEntry] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not entry.get("model"):
            raise InvalidParameters(f"{where}, entry {i}: needs a `model` (got {entry!r})")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise InvalidParameters(f"{where}, entry {i}: unknown keys {sorted(unknown)}; "
                                    "put pipeline parameters under `parameters:`")
        checked.append(RegistryEntry(**entry))
    return checked


def read_registry(registry: str | None) -> list[RegistryEntry]:
    """Entries of the registry file (none if `registry` is empty)."""
    if not registry:
        return []
    import yaml

    path = registry_path(registry)
    if not path.exists():
        raise InvalidParameters(f"model registry {path} does not exist: pass registry= a YAML "
                                f"file like {DEFAULT_REGISTRY}")
    content = yaml.safe_load(path.read_text()) or {}
    return check_entries(content.get("models", []) if isinstance(content, dict) else content,
                         str(path))


def read_variable(name: str | None) -> list[RegistryEntry]:
    """Entries of the Prefect Variable `name` (a JSON list), none if it is not set."""
    if not name:
        return []
    from prefect.variables import Variable

    value = Variable.get(name, default=None)
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidParameters(f"Prefect Variable {name!r} is not JSON: {err}") from err
    return check_entries(value, f"Prefect Variable {name!r}")


def models_with_results(out: Path | str) -> set[str]:
    """Models of the `saes` table that have an evaluated autoencoder (for a warehouse at a
    URL, the bucket's committed parts: an upload killed before its commit does not count)."""
    from mlsae.warehouse import connect, is_url

    if not is_url(out) and not Path(out).is_dir():
        return set()
    con = connect(out, read_only=True)
    try:
        rows = con.execute("SELECT DISTINCT s.model FROM saes s "
                           "SEMI JOIN layer_metrics m ON m.sae_id = s.sae_id").fetchall()
    finally:
        con.close()
    return {row[0] for row in rows}


def models_with_reports(out: Path | str, names: list[str]) -> set[str]:
    """Those of `names` whose generated report exists in the warehouse (for a URL: is
    committed in the bucket)."""
    from mlsae.plan import model_slug
    from mlsae.warehouse import is_url, report_file, report_key
    from mlsae.warehouse.remote import is_committed

    if is_url(out):
        return {n for n in names if is_committed(out, report_key(model_slug(n)))}
    return {n for n in names if report_file(out, model_slug(n)).exists()}


def pipeline_deployment_exists(name: str = PIPELINE_DEPLOYMENT) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except ObjectNotFound:
            return False


def in_flight_models(name: str = PIPELINE_DEPLOYMENT) -> set[str]:
    """Models of runs of deployment `name` that are scheduled, pending or running."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]))))
    return {normalise_model_name((run.parameters.get("target") or {}).get("model")
                                 or run.parameters.get("model")) for run in runs}


def wait_for_runs(runs: list[tuple[str, Any]], poll_s: float = 5.0) -> dict[str, Any]:
    """Final states of flow runs started with run_deployment(timeout=0), by model name."""
    from prefect.client.orchestration import get_client

    pending, final = dict(runs), {}
    with get_client(sync_client=True) as client:
        while pending:
            for name, run in list(pending.items()):
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    final[name] = state
                    del pending[name]
            if pending:
                time.sleep(poll_s)
    return final


def pipeline_parameters(entry: RegistryEntry, out: Path | str, kind: str = "pipeline"
                        ) -> dict[str, Any]:
    """The flow's parameters for one registry entry: `parameters` may name the request's
    parts (preset, target, grid, budget) or their fields directly (e.g. ks: [32])."""
    from mlsae.plan import nest_fields

    params = dict(entry.get("parameters") or {})
    params.pop("out", None)
    nested = nest_fields(params)
    target = nested.setdefault("target", {})
    target.update(model=entry["model"], data=entry.get("data", target.get("data", "embedded")))
    return {**nested, "out": str(out)}


@flow(name="mlsae-rerun", validate_parameters=True)
def rerun(registry: str = DEFAULT_REGISTRY, variable: str = REGISTRY_VARIABLE,
          out: str | None = None, use_deployment: bool | None = None,
          wait: bool = True, kind: str = "pipeline") -> RerunResult:
    """Run the pipeline (or the report) for every registered model that has none yet.

    Args:
        registry: YAML file listing models (relative: working directory, then the repo).
            Empty string: only the Prefect Variable.
        variable: Prefect Variable holding more entries (JSON list); empty: none.
        out: the warehouse whose `saes` table is checked and written: a directory or a
            URL such as s3://bucket/prefix (default $MLSAE_HOME, else ./mlsae-data); for a
            URL the bucket's committed `saes` and `layer_metrics` parts are compared, and
            the runs started write into the bucket.
        use_deployment: run the pipeline deployment (True), a subflow (False), or decide:
            the deployment when this flow itself runs from a deployment and it exists.
        wait: wait for deployment runs to finish (they are linked as subflows either way).
        kind: "pipeline" (a model is done once it has evaluated autoencoders) or "report"
            (the report flow; a model is done once its report exists).
    """
    from prefect.runtime import deployment as this_deployment

    if kind not in KINDS:
        raise InvalidParameters(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    deployment_name, subflow = KINDS[kind]
    logger = run_logger()
    out_dir = resolve_warehouse(out)
    entries = read_registry(registry) + read_variable(variable)
    by_model: dict[str, RegistryEntry] = {}
    for entry in entries:  # a later entry for the same model wins (the Variable over the file)
        by_model[normalise_model_name(entry["model"])] = entry
    done = (models_with_results(out_dir) if kind == "pipeline"
            else models_with_reports(out_dir, list(by_model)))
    todo = {name: entry for name, entry in by_model.items() if name not in done}
    if use_deployment is None:
        use_deployment = (this_deployment.id is not None
                          and pipeline_deployment_exists(deployment_name))
    mode = "deployment" if use_deployment else "subflow"
    result = RerunResult(registered=sorted(by_model), done_before=sorted(set(by_model) & done),
                         started=[], skipped_in_flight=[], failed=[], mode=mode)
    if not todo:
        logger.info("nothing to do: all %d registered model(s) have results in %s",
                    len(by_model), out_dir)
        return result
    logger.info("%d of %d registered model(s) have no results: %s (via %s)", len(todo),
                len(by_model), ", ".join(sorted(todo)), mode)

    if use_deployment:
        from prefect.deployments import run_deployment

        busy = in_flight_models(deployment_name)
        runs = []
        for name, entry in sorted(todo.items()):
            if name in busy:
                logger.info("%s: a %s run is already scheduled or running; skipped", name, kind)
                result["skipped_in_flight"].append(name)
                continue
            run = run_deployment(deployment_name,
                                 parameters=pipeline_parameters(entry, out_dir, kind),
                                 timeout=0, flow_run_name=f"rerun-{kind}-{Path(name).name}")
            logger.info("%s: started %s run %s", name, kind, run.name)
            result["started"].append(name)
            runs.append((name, run))
        if wait:
            for name, state in wait_for_runs(runs).items():
                logger.info("%s: %s run ended %s", name, kind, state.name)
                if not state.is_completed():
                    result["failed"].append(name)
    else:
        for name, entry in sorted(todo.items()):
            result["started"].append(name)
            state = subflow(**pipeline_parameters(entry, out_dir, kind), return_state=True)
            if not state.is_completed():
                logger.error("%s: the %s ended %s: %s", name, kind, state.type.value,
                             state.message)
                result["failed"].append(name)
    if result["failed"]:
        raise RuntimeError(f"the {kind} failed for {', '.join(result['failed'])}; "
                           "see their flow runs")
    return result
