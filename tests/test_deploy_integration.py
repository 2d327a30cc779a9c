"""End to end on a real Prefect server: deploy from prefect.yaml, run a worker,
trigger the pipeline deployment and the rerun deployment, check the outputs.

Everything is real: `prefect server start` on a free loopback port with its
own PREFECT_HOME, `mlsae deploy` (process work pool + `prefect deploy --all`),
`prefect worker start` running flow runs as subprocesses from this checkout.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.server import PrefectServer
from tests.test_flows_support import (
    SMALL,
    request,
    save_tiny_model,
    table_rows,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(480),
]

MLSAE_BIN = str(Path(sys.executable).with_name("mlsae"))
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deployment_ids(server: PrefectServer) -> dict[str, dict]:
    flows = {f["id"]: f["name"] for f in server.api("POST", "flows/filter", {})}
    return {f"{flows[d['flow_id']]}/{d['name']}": d
            for d in server.api("POST", "deployments/filter", {})}


def trigger(server: PrefectServer, name: str, parameters: dict) -> str:
    """`prefect deployment run NAME -p key=JSON ...`, as docs/deploy.md shows; the run's id."""
    argv = ["deployment", "run", name]
    for key, value in parameters.items():
        argv += ["-p", f"{key}={json.dumps(value)}"]
    output = server.run_cli(*argv).stdout
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def wait_for(server: PrefectServer, run_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    state = "unknown"
    while time.monotonic() < deadline:
        try:
            run = server.api("GET", f"flow_runs/{run_id}")
        except TimeoutError:  # one slow reply (SQLite busy under a running flow): poll again
            continue
        state = run["state"]["type"]
        if state in TERMINAL:
            return run
        time.sleep(1.0)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout_s:.0f}s "
                       f"(state {state})\n{server.child_logs()}")


def runs_of(server: PrefectServer, deployment: dict) -> list[dict]:
    return server.api("POST", "flow_runs/filter",
                      {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})


def test_deploy_worker_pipeline_and_rerun(tmp_path):
    warehouse = tmp_path / "warehouse"
    tiny = save_tiny_model(tmp_path / "models" / "tiny")
    small_params = {**SMALL, "baselines": False}
    registry = tmp_path / "models.yaml"  # the registry file holds the embedded model...
    registry.write_text(yaml.safe_dump({"models": [{"model": "embedded",
                                                    "parameters": small_params}]}))
    # ...and the Prefect Variable adds the tiny one (docs/deploy.md, step 5).
    variable = json.dumps([{"model": str(tiny), "parameters": small_params}])
    # The scheduler looks for new schedules every 2 s; workers poll every second.
    server_env = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                  "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                  "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with PrefectServer(tmp_path / "server", extra_env=server_env) as server:
        # 1. Deploy: `mlsae deploy` creates the process pool and deploys prefect.yaml.
        deployed = server.run([MLSAE_BIN, "deploy", "--out", str(warehouse), "--gpu-slots", "0"],
                              timeout_s=180)
        assert "created process work pool 'mlsae-process'" in deployed.stdout
        deployments = deployment_ids(server)
        assert {"mlsae-pipeline/default", "mlsae-sweep/default",
                "mlsae-rerun/default"} <= set(deployments)
        rerun_deployment = deployments["mlsae-rerun/default"]
        assert [s["schedule"].get("cron") for s in rerun_deployment["schedules"]] == ["0 3 * * *"]
        check_cron_runs_then_pause(server, rerun_deployment)
        pipeline_deployment = deployments["mlsae-pipeline/default"]
        assert pipeline_deployment["work_pool_name"] == "mlsae-process"
        assert pipeline_deployment["parameters"]["out"] == str(warehouse)

        # 2. A worker runs the flow runs as subprocesses of this checkout.
        server.spawn_cli("worker", "start", "--pool", "mlsae-process", "--limit", "2",
                         name="worker")

        # 3. The pipeline deployment, with small budgets.
        run = wait_for(server, trigger(server, "mlsae-pipeline/default",
                                       request(baselines=False)), 240)
        assert run["state"]["type"] == "COMPLETED", (run["state"], server.child_logs())
        (n_saes, model), = table_rows(warehouse, "SELECT count(*), any_value(model) FROM saes")
        assert (n_saes, model) == (1, "embedded")
        assert table_rows(warehouse, "SELECT count(*) FROM latents")[0][0] > 0
        assert table_rows(warehouse, "SELECT count(*) FROM variance_summary")[0][0] == 1
        assert list((warehouse / "figures" / "embedded").rglob("*.png"))

        # 4. The rerun deployment: the embedded model has results, the tiny one does
        # not -> exactly one more pipeline run, through the pipeline deployment.
        server.run_cli("variable", "set", "mlsae_models", variable)
        runs_before = len(runs_of(server, pipeline_deployment))
        rerun_params = {"registry": str(registry)}
        run = wait_for(server, trigger(server, "mlsae-rerun/default", rerun_params), 240)
        assert run["state"]["type"] == "COMPLETED", (run["state"], server.child_logs())
        pipeline_runs = runs_of(server, pipeline_deployment)
        assert len(pipeline_runs) == runs_before + 1
        new_run = max(pipeline_runs, key=lambda r: r["created"])
        assert new_run["parameters"]["target"]["model"] == str(tiny)
        assert new_run["state"]["type"] == "COMPLETED"
        models = {row[0] for row in table_rows(warehouse, "SELECT model FROM saes")}
        assert models == {"embedded", str(tiny)}

        # 5. Idempotent: nothing new -> no pipeline run.
        run_id = trigger(server, "mlsae-rerun/default", rerun_params)
        run = wait_for(server, run_id, timeout_s=120)
        assert run["state"]["type"] == "COMPLETED", (run["state"], server.child_logs())
        assert len(runs_of(server, pipeline_deployment)) == runs_before + 1
        assert wait_for_log(server, run_id, "nothing to do")


def check_cron_runs_then_pause(server: PrefectServer, deployment: dict) -> None:
    """The server's scheduler turns the cron schedule into runs at 03:00 UTC. Then pause
    it and drop those runs, so none can start while the test runs (say at 02:59)."""
    deadline = time.monotonic() + 60
    while not (scheduled := runs_of(server, deployment)):
        assert time.monotonic() < deadline, "the scheduler created no run for the cron schedule"
        time.sleep(1.0)
    for run in scheduled:
        assert run["state"]["type"] == "SCHEDULED"
        assert run["expected_start_time"][11:16] == "03:00", run["expected_start_time"]
    for schedule in deployment["schedules"]:
        server.api("PATCH", f"deployments/{deployment['id']}/schedules/{schedule['id']}",
                   {"active": False})
    for run in runs_of(server, deployment):
        server.api("DELETE", f"flow_runs/{run['id']}")


def wait_for_log(server: PrefectServer, run_id: str, text: str, timeout_s: float = 15) -> bool:
    """Logs reach the API in batches, possibly after the run's final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = server.api("POST", "logs/filter",
                          {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        if any(text in entry["message"] for entry in logs):
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {text!r}: {json.dumps(logs)[:2000]}")
        time.sleep(1.0)
