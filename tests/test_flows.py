"""The flows on a real temporary Prefect server (prefect_test_harness), embedded model,
small budgets: every table, view and figure; caching; validation before compute;
rerun idempotency; the sweep; the report. Interrupted runs: tests/test_flows_interrupt.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_flows_support import (
    EXPECTED_TABLES,
    EXPECTED_VIEWS,
    MLSAE_FIGURES,
    MODEL_FIGURES,
    SMALL,
    request,
    save_tiny_model,
    snapshot,
    table_rows,
)

pytestmark = pytest.mark.timeout(300)


# Three of the six blocks: exercises a layer subset and keeps the baselines to three.
LAYERS = [1, 3, 5]


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    """One pipeline run on the embedded model (MLSAE + a single-layer SAE per layer)."""
    from flows.pipeline import pipeline

    out = tmp_path_factory.mktemp("warehouse")
    result = pipeline(**request(model="embedded", data="embedded", layers=LAYERS), out=str(out))
    return out, result


def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def test_pipeline_writes_every_table_view_and_figure(first_run):
    out, result = first_run
    assert len(result["mlsae_ids"]) == 1
    mlsae_id = result["mlsae_ids"][0]
    assert len(result["sae_ids"]) == 1 + len(LAYERS)  # the MLSAE + one baseline per block
    for table in EXPECTED_TABLES:
        assert table_rows(out, f"SELECT count(*) FROM {table}")[0][0] > 0, table
    for view in EXPECTED_VIEWS:
        assert table_rows(out, f"SELECT count(*) FROM {view} WHERE sae_id = '{mlsae_id}'")[0][0] > 0
    # Baselines: weights, saes rows and metrics, but no latent tables.
    n_saes, n_metric_saes = table_rows(
        out, "SELECT count(*), (SELECT count(DISTINCT sae_id) FROM layer_metrics) FROM saes")[0]
    assert n_saes == n_metric_saes == 1 + len(LAYERS)
    assert table_rows(out, "SELECT count(DISTINCT sae_id) FROM latents")[0][0] == 1
    (layers,), = table_rows(out, f"SELECT layers FROM saes WHERE sae_id = '{mlsae_id}'")
    assert list(layers) == LAYERS
    (metric_layers,), = table_rows(
        out, f"SELECT list(layer ORDER BY layer) FROM layer_metrics WHERE sae_id = '{mlsae_id}'")
    assert list(metric_layers) == LAYERS
    for sae_id in result["sae_ids"]:
        assert (out / "autoencoders" / sae_id / "sae" / "config.json").exists() or any(
            (out / "autoencoders" / sae_id).rglob("config.json"))
    figures = {Path(p).name for p in result["figures"]}
    assert set(MLSAE_FIGURES) | set(MODEL_FIGURES) <= figures
    for path in result["figures"]:
        assert Path(path).stat().st_size > 5_000, path
    assert result["variance_summary"][0]["n_live"] > 0


def test_second_identical_run_hits_the_caches_and_writes_nothing(first_run):
    from flows.pipeline import pipeline

    out, _ = first_run
    before = snapshot(out)
    state = pipeline(**request(model="embedded", data="embedded", layers=LAYERS), out=str(out),
                     return_state=True)
    assert state.is_completed()
    states = task_states(state.state_details.flow_run_id)
    work = {name: s for name, s in states.items() if not name.startswith("validate-parameters")}
    assert work and set(work.values()) == {"Cached"}, states
    assert snapshot(out) == before


@pytest.mark.parametrize("bad, message", [
    ({"model": "no/such/model/dir"}, "does not exist"),
    ({"ks": [100_000]}, "-k 100000 > n_latents 512"),
    ({"layers": [0, 9]}, "layers [9] do not exist"),
])
def test_bad_parameters_fail_the_run_before_any_compute(prefect_api, tmp_path, bad, message):
    from flows.pipeline import pipeline

    out = tmp_path / "warehouse"
    params = {**request(**{"model": "embedded", **bad}), "out": str(out)}
    start = time.perf_counter()
    state = pipeline(**params, return_state=True)
    assert state.is_failed()
    assert "invalid parameters" in state.message and message in state.message, state.message
    assert not out.exists(), "nothing may be computed or written for invalid parameters"
    assert time.perf_counter() - start < 30


def test_rerun_gives_only_new_models_the_pipeline_and_is_idempotent(first_run, tmp_path):
    from flows.rerun import rerun

    out, _ = first_run
    tiny = save_tiny_model(tmp_path / "tiny")
    registry = tmp_path / "models.yaml"
    params = {**SMALL, "baselines": False}
    registry.write_text(yaml.safe_dump({"models": [
        {"model": "embedded", "parameters": params}, {"model": str(tiny), "parameters": params}]}))
    result = rerun(registry=str(registry), variable="", out=str(out))
    assert result["mode"] == "subflow"
    assert result["done_before"] == ["embedded"] and result["started"] == [str(tiny)]
    assert str(tiny) in {row[0] for row in table_rows(out, "SELECT model FROM saes")}
    again = rerun(registry=str(registry), variable="", out=str(out))
    assert again["started"] == [] and sorted(again["done_before"]) == sorted(["embedded", str(tiny)])


def test_sweep_runs_the_grid_with_a_thread_pool(first_run):
    from flows.sweep import sweep

    out, first = first_run
    result = sweep(models=["embedded"], **request(ks=[4, 8], lens="off", layers=LAYERS,
                                                  baselines=False),
                   task_runner="thread", max_workers=2, out=str(out))
    (run,) = result["runs"]
    assert len(run["mlsae_ids"]) == 2
    assert first["mlsae_ids"][0] in run["mlsae_ids"]  # same config, same id: reused
    assert {row["sae_id"] for row in run["variance_summary"]} == set(run["mlsae_ids"])
    assert all(Path(p).exists() for p in result["figures"])


def test_streaming_pipeline_trains_every_autoencoder_in_one_pass(prefect_api, tmp_path):
    """--cache-limit 0: no activation cache on disk; one streaming task trains the MLSAE and
    its single-layer baselines together; every table, view and figure is there."""
    from flows.pipeline import pipeline
    from mlsae.estimate import SERVER_START_S, estimate_plan
    from mlsae.plan import RunRequest, make_plan

    out = tmp_path / "warehouse"
    params = request(layers=LAYERS, cache_limit="0")
    estimate = estimate_plan(make_plan(RunRequest(**params)))
    assert not out.exists()  # the dry run's probe writes nothing
    start = time.perf_counter()
    state = pipeline(**params, out=str(out), return_state=True)
    seconds = time.perf_counter() - start
    result = state.result()
    # The estimate (less the temporary server this test does not start) is within 2x.
    expected = estimate["estimated_seconds"] - SERVER_START_S
    print(f"estimate {expected:.1f} s, measured {seconds:.1f} s", estimate["stages_seconds"])
    assert expected / 2 < seconds < expected * 2, (seconds, estimate["stages_seconds"])
    assert not (out / "activations").exists()
    states = task_states(state.state_details.flow_run_id)
    assert [n for n in states if n.startswith("train-autoencoders-streaming")] and not [
        n for n in states if n.startswith(("train-autoencoder-", "extract-activations"))], states
    assert len(result["sae_ids"]) == 1 + len(LAYERS)
    for table in EXPECTED_TABLES:
        assert table_rows(out, f"SELECT count(*) FROM {table}")[0][0] > 0, table
    mlsae_id = result["mlsae_ids"][0]
    for view in EXPECTED_VIEWS:
        assert table_rows(out, f"SELECT count(*) FROM {view} WHERE sae_id = '{mlsae_id}'")[0][0]
    assert table_rows(out, "SELECT count(DISTINCT sae_id) FROM layer_metrics")[0][0] == 4
    assert {Path(p).name for p in result["figures"]} >= set(MODEL_FIGURES) | set(MLSAE_FIGURES)
    # The rerun's estimate does not count the training that is done.
    from mlsae.warehouse.remote import trained_autoencoders

    plan = make_plan(RunRequest(**params))
    trained = trained_autoencoders(out, [s["sae_id"] for s in plan["specs"]])
    assert trained == set(result["sae_ids"])
    again = estimate_plan(plan, trained=trained)
    assert again["already_trained"] == sorted(trained)
    assert again["stages_seconds"]["train_sae_steps"] == 0
    assert again["stages_seconds"]["extract_or_stream_forward"] == 0
    assert again["estimated_seconds"] < estimate["estimated_seconds"]


def test_pipeline_in_the_tuned_lens_basis(prefect_api, tmp_path):
    """--lens: the lens task finds (here: a quickly trained) lens for the model, the SAE
    trains in its basis and everything downstream maps back through it."""
    from flows.pipeline import pipeline
    from mlsae.lens import trained_lens_dir
    from mlsae.lens_train import LensTrainConfig, train_lens_for_model
    from mlsae.models import load_model

    tiny = save_tiny_model(tmp_path / "tiny", n_layers=3)
    out = tmp_path / "warehouse"
    # Where the lens task looks for a lens it trained earlier: a 3-step lens saves minutes.
    lens_dir = trained_lens_dir(str(tiny), out / "lenses")
    train_lens_for_model(load_model(str(tiny), device="cpu"), lens_dir,
                         LensTrainConfig(steps=3, batch_size=2, seq_len=64))
    result = pipeline(**request(model=str(tiny), lens="on", baselines=False), out=str(out))
    ((lens, sae_id),) = table_rows(out, "SELECT lens, sae_id FROM saes")
    assert sae_id == result["mlsae_ids"][0] and "-lens-" in sae_id
    assert lens == str(lens_dir)
    assert table_rows(out, "SELECT count(*) FROM variance_summary")[0][0] == 1
    assert all(Path(p).exists() for p in result["figures"])


def test_report_flow_writes_every_section_and_resumes_from_the_cache(prefect_api, tmp_path):
    """`mlsae report`'s flow on two tiny models: a star grid on the 3-block one (R x k, the
    lens, single-layer SAEs, the dose-response line at k 4), the base-config MLSAE on a
    2-block one; report.md with every section (the cross-model one with its figures),
    figure links that resolve, numbers equal to the views; a second run trains nothing and
    only rewrites the report."""
    import re

    from flows.report import report
    from mlsae.lens import trained_lens_dir
    from mlsae.lens_train import LensTrainConfig, train_lens_for_model
    from mlsae.models import load_model

    tiny = save_tiny_model(tmp_path / "tiny", n_layers=3)
    out = tmp_path / "warehouse"
    train_lens_for_model(load_model(str(tiny), device="cpu"),
                         trained_lens_dir(str(tiny), out / "lenses"),
                         LensTrainConfig(steps=3, batch_size=2, seq_len=64))
    other = save_tiny_model(tmp_path / "other", n_layers=2, d_model=48)
    flat = dict(model=str(tiny), expansion_factors=[1, 2], ks=[2, 4], base_expansion_factor=2,
                base_k=4, dose_expansion_factors=[1], dose_k=4, dose_train_tokens=4096,
                train_tokens=2048,
                eval_tokens=512, seq_len=64)
    params = {**request(**flat), "preset": "report", "out": str(out)}
    result = report(**params, models=[str(tiny), str(other)])
    ids = result["sae_ids"]
    # R in {1, 2} at k=4 (the dose line: R 1 is on the star), k=2 at R=2, the base with the
    # lens, 3 single-layer SAEs; the other model's base MLSAE; the dose line's R 1 again at
    # the dose budget.
    assert len(ids) == 3 + 1 + 3 + 1 + 1 and sum("-lens-" in i for i in ids) == 1
    assert sum(re.search(r"-L\d-", i) is not None for i in ids) == 3
    assert sum(i.startswith("other-R2-k4-all-") for i in ids) == 1
    dose_ids = [i for i in ids if i.startswith("tiny-R1-k4-all-")]
    assert len(dose_ids) == 2
    budgets = dict(table_rows(out, "SELECT sae_id, train_tokens FROM saes WHERE sae_id IN "
                                   f"('{dose_ids[0]}', '{dose_ids[1]}')"))
    assert sorted(budgets.values()) == [2048, 4096]
    text = Path(result["report"]).read_text()
    for n in range(8):
        assert f"\n## {n}. " in text, n
    assert "### R dose-response at k 4" in text and "Not testable" not in text
    check = text[text.index("#### Budget check: 2.05k vs 4.1k tokens per layer"):]
    assert "| 1 | 2,048 | " in check and "| 1 | 4,096 | " in check
    links = re.findall(r"\]\((figures/[^)]+)\)", text)
    assert len(links) >= 10 and {"figures/fig1_models.png",
                                 "figures/activity_vs_model_size.png"} <= set(links)
    assert all((Path(result["report_dir"]) / link).stat().st_size > 1000 for link in links)
    across = text[text.index("## 6. Across models"):text.index("## 7.")]
    assert f"| `{other}` |" in across and f"| `{tiny}` |" in across
    base = next(i for i in ids if i.startswith("tiny-R2-k4-all-") and "-lens-" not in i)
    ((ratio,),) = table_rows(out, f"SELECT ratio_token FROM variance_summary WHERE sae_id = '{base}'")
    assert "| MLSAE R2 k4 | 64 | " in text and f" | {ratio:.3g} | " in text
    assert f"mlsae report --model {tiny} --model {other}" in text and "--out" in text

    trained = snapshot(out / "autoencoders")
    again = report(**params, models=[str(tiny), str(other)])
    assert snapshot(out / "autoencoders") == trained  # nothing retrained
    ledger = json.loads((Path(again["report_dir"]) / "runs.json").read_text())
    assert len(ledger) == 2

    # The scheduled rerun in report mode: a model with a report is done; flat entry
    # parameters go to their parts of the request.
    from flows.rerun import pipeline_parameters, rerun

    entry = {"model": str(tiny), "parameters": {**flat, "preset": "report", "layers": [0, 1]}}
    registry = tmp_path / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": [entry]}))
    result = rerun(registry=str(registry), variable="", out=str(out), kind="report")
    assert result["done_before"] == [str(tiny)] and result["started"] == []
    assert pipeline_parameters(entry, out, "pipeline")["grid"]["layers"] == [0, 1]
    assert pipeline_parameters(entry, out, "report")["target"]["model"] == str(tiny)


# -- fast checks without a server ----------------------------------------------------------------


def test_prefect_yaml_parameters_match_the_flows():
    import inspect

    from flows.cmd_deploy import REPO_ROOT

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    names = set()
    for deployment in spec["deployments"]:
        module, func = deployment["entrypoint"].split(":")
        flow = getattr(__import__(module.removesuffix(".py").replace("/", "."), fromlist=[func]),
                       func)
        params = inspect.signature(flow.fn).parameters
        assert set(deployment["parameters"]) <= set(params), deployment["name"]
        assert deployment["work_pool"]["name"] == "mlsae-process"
        names.add(flow.name)
    assert names == {"mlsae-pipeline", "mlsae-sweep", "mlsae-rerun", "mlsae-report"}
    (rerun,) = [d for d in spec["deployments"] if d["entrypoint"].startswith("flows/rerun")]
    assert rerun["schedules"][0]["cron"]


def test_render_prefect_file_fills_pool_out_and_schedule(tmp_path):
    from flows.cmd_deploy import REPO_ROOT, render_prefect_file

    target = tmp_path / "prefect.yaml"
    render_prefect_file(REPO_ROOT / "prefect.yaml", "gpu", tmp_path / "wh", False, target)
    spec = yaml.safe_load(target.read_text())
    for deployment in spec["deployments"]:
        assert deployment["work_pool"]["name"] == "gpu"
        assert deployment["parameters"]["out"] == str(tmp_path / "wh")
        assert all(not s["active"] for s in deployment.get("schedules") or [])


def test_only_transient_failures_are_retried():
    from tasks.common import is_transient

    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError("read timed out"))
    try:
        try:
            raise ConnectionError("reset")
        except ConnectionError as inner:
            raise RuntimeError("download failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)
    assert not is_transient(ValueError("k > n_latents"))
    assert not is_transient(FileNotFoundError("no such model"))
    assert not is_transient(MemoryError())


def test_registry_entries_are_checked(tmp_path):
    from flows.rerun import read_registry
    from tasks.validate import InvalidParameters

    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - data: embedded\n")
    with pytest.raises(InvalidParameters, match="needs a `model`"):
        read_registry(str(path))
    path.write_text("models:\n  - model: embedded\n    ks: [4]\n")
    with pytest.raises(InvalidParameters, match="under `parameters:`"):
        read_registry(str(path))
    path.write_text("models:\n  - embedded\n  - model: /x\n    parameters: {ks: [4]}\n")
    assert [e["model"] for e in read_registry(str(path))] == ["embedded", "/x"]
    with pytest.raises(InvalidParameters, match="does not exist"):
        read_registry(str(tmp_path / "missing.yaml"))


def test_task_runner_choices():
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.sweep import make_task_runner
    from tasks.validate import InvalidParameters

    assert isinstance(make_task_runner("thread", 3), ThreadPoolTaskRunner)
    with pytest.raises(InvalidParameters, match="unknown task_runner"):
        make_task_runner("celery", 2)


def test_commands_have_help_a_newcomer_can_follow():
    from click.testing import CliRunner

    from flows.cli import main

    runner = CliRunner()
    for command, words in [("run", ["--model", "--lens", "--train-tokens", "--out", "Examples"]),
                           ("sweep", ["--task-runner", "--max-workers", "--gpu-slots"]),
                           ("deploy", ["prefect server start", "prefect worker start", "--pool"]),
                           ("report", ["--base-R", "--copy-to", "--lens", "Examples"])]:
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0, result.output
        for word in words:
            assert word in result.output, (command, word)


def test_gpu_slots_keep_two_tasks_off_one_gpu(prefect_api, monkeypatch):
    import threading

    import torch

    import mlsae.models
    from tasks.common import GPU_LIMIT, ensure_gpu_limit, gpu_slot

    assert ensure_gpu_limit(3) == 3  # created
    assert ensure_gpu_limit(1) == 1  # resized
    if not torch.cuda.is_available():
        assert ensure_gpu_limit() is None  # no GPU, no size: nothing to guard
    # Pretend "auto" resolves to a GPU; the limit lives on the Prefect server.
    monkeypatch.setattr(mlsae.models, "resolve_device", lambda device: torch.device("cuda"))
    holding, overlaps = [], []
    lock = threading.Lock()

    def work() -> None:
        with gpu_slot("auto"):
            with lock:
                holding.append(1)
                overlaps.append(len(holding))
            time.sleep(1.0)
            with lock:
                holding.pop()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert overlaps == [1, 1], f"two tasks held {GPU_LIMIT!r} at once"


def test_deploy_without_a_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)  # a fresh profile: no PREFECT_API_URL anywhere
    result = subprocess.run([str(Path(sys.executable).with_name("mlsae")), "deploy"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "prefect server start" in result.stderr and "PREFECT_API_URL" in result.stderr
