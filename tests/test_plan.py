"""The one parameter model (mlsae/plan.py): presets, explicit overrides, validation before
compute, the generated CLI, the flows' parameters, and `--dry-run` (no server needed)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlsae.plan import (
    PARTS,
    Budget,
    Grid,
    InvalidRequest,
    RunRequest,
    Target,
    check_report_plans,
    make_plan,
    nest_fields,
    parse_size,
    train_config,
)

MLSAE_BIN = str(Path(sys.executable).with_name("mlsae"))


def test_presets_hold_the_documented_values():
    paper = RunRequest(preset="paper")
    assert paper.grid.expansion_factors == [64] and paper.grid.ks == [32]
    b = paper.budget
    assert (b.train_tokens, b.eval_tokens, b.seq_len, b.batch_tokens) == (
        1_000_000_000, 10_000_000, 2048, 131_072)
    assert (b.lr, b.adam_eps, b.k_aux, b.aux_coef, b.dead_tokens) == (
        1e-4, 6.25e-10, 256, 1 / 32, 10_000_000)
    demo = RunRequest()
    assert (demo.grid.expansion_factors, demo.grid.ks, demo.grid.baselines) == ([4], [16], True)
    assert (demo.budget.train_tokens, demo.budget.eval_tokens, demo.budget.seq_len,
            demo.budget.lr, demo.budget.batch_tokens) == (200_000, 8192, 128, 1e-3, 4096)
    report = RunRequest(preset="report")
    assert (report.grid.base_expansion_factor, report.grid.base_k, report.grid.lens) == (4, 16,
                                                                                         "both")
    assert (report.budget.train_tokens, report.budget.batch_tokens) == (2_000_000, 1024)


def test_explicit_values_override_the_preset_and_are_recorded():
    request = RunRequest(preset="paper", grid=Grid(ks=[16]), budget=Budget(train_tokens=10_000))
    assert request.grid.ks == [16] and request.grid.expansion_factors == [64]
    assert request.budget.train_tokens == 10_000 and request.budget.seq_len == 2048
    assert request.given() == {"target": {}, "grid": {"ks": [16]},
                               "budget": {"train_tokens": 10_000}}
    # The same request from flat fields (the CLI's and a registry's form) and from dicts
    # (Prefect's JSON parameters).
    again = RunRequest(**nest_fields({"preset": "paper", "ks": [16], "train_tokens": 10_000}))
    assert again.to_dict() == request.to_dict()


@pytest.mark.parametrize("part, value, option", [
    (Budget, {"train_tokens": 0}, "--train-tokens 0"),
    (Budget, {"train_tokens": -5}, "--train-tokens -5"),
    (Budget, {"lr": 0.0}, "--lr 0.0"),
    (Budget, {"seq_len": 0}, "--seq-len 0"),
    (Budget, {"seq_len": 1}, "--seq-len 1"),
    (Budget, {"eval_tokens": 0}, "--eval-tokens 0"),
    (Budget, {"batch_tokens": -1}, "--batch-tokens -1"),
    (Budget, {"cache_limit": "lots"}, "--cache-limit"),
    (Grid, {"ks": [0]}, "-k 0"),
    (Grid, {"expansion_factors": [-4]}, "--expansion-factor -4"),
    (Grid, {"base_k": 0}, "--base-k 0"),
    (Grid, {"lens": "sideways"}, "--lens 'sideways'"),
    (Target, {"precision": "int8"}, "--precision 'int8'"),
])
def test_zero_negative_and_absurd_values_fail_naming_the_option(part, value, option):
    with pytest.raises(InvalidRequest) as err:
        part(**value)
    assert option in str(err.value)


def test_a_zero_budget_on_the_cli_is_an_error_not_the_default(tmp_path):
    for args, option in ((["--train-tokens", "0"], "--train-tokens"), (["--lr", "0"], "--lr"),
                         (["--seq-len", "0"], "--seq-len"), (["-k", "0"], "-k 0")):
        start = time.perf_counter()
        result = subprocess.run([MLSAE_BIN, "run", *args, "--out", str(tmp_path / "wh")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and option in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert time.perf_counter() - start < 10
    assert not (tmp_path / "wh").exists()


def test_the_cli_options_and_the_flows_come_from_one_definition():
    """Every request field is an option of run, sweep and report (help = its docstring)
    unless it names the commands it belongs to (--dose-train-tokens: report only), and every
    flow takes the request as (preset, target, grid, budget)."""
    from flows.cli import main
    from flows.pipeline import pipeline
    from flows.report import report
    from flows.sweep import sweep
    from mlsae.plan import field_docs

    for name in ("run", "sweep", "report"):
        command = main.commands[name]
        params = {p.name: p for p in command.params}
        for part in PARTS.values():
            for f in dataclasses.fields(part):
                if name not in f.metadata["cli"]["commands"]:
                    assert f.name not in params, (name, f.name)
                    continue
                assert f.name in params, (name, f.name)
                assert field_docs(part)[f.name].split(".")[0] in params[f.name].help
    assert "dose_train_tokens" in {p.name for p in main.commands["report"].params}
    for flow in (pipeline, sweep, report):
        signature = inspect.signature(flow.fn).parameters
        assert {"preset", "target", "grid", "budget", "out", "refresh"} <= set(signature)
        assert signature["target"].annotation in ("Target | None", Target | None)


def test_planning_matches_the_historical_ids_and_scales_short_runs():
    plan = make_plan(RunRequest())
    ids = [s["sae_id"] for s in plan["specs"]]
    assert ids[0] == "embedded-R4-k16-all-57e6e9d7"  # the id `mlsae run` always gave
    assert len(ids) == 7
    cfg = train_config(plan, plan["specs"][0])
    assert cfg.sae.k_aux == 256 and cfg.sae.dead_tokens == 40_000  # min(10M, 200k / 5)
    paper_like = make_plan(RunRequest(preset="paper", target={"device": "cpu"},
                                      budget={"train_tokens": 2048 * 64, "eval_tokens": 2048,
                                              "seq_len": 256, "batch_tokens": 4096}))
    cfg = train_config(paper_like, paper_like["specs"][0])
    assert (cfg.sae.k_aux, cfg.sae.dead_tokens, cfg.lr) == (256, 10_000_000, 1e-4)


def test_report_star_grid_matches_the_report():
    from mlsae.plan import report_request

    planned = check_report_plans(report_request(), ["embedded"])
    plan = planned.models[0]
    roles = [(s["expansion_factor"], s["k"], s["lens"], s["role"]) for s in plan["specs"]]
    mlsaes = {r[:3] for r in roles if r[3] == "mlsae"}
    star = {(2, 16, False), (4, 16, False), (8, 16, False), (4, 8, False), (4, 32, False),
            (4, 16, True)}
    dose = {(16, 32, False), (64, 32, False)}  # R 4 at k 32 is already on the star
    assert mlsaes == star | dose and len(roles) == len(set(roles)) + 5  # baselines share R/k
    assert sum(r[3] == "baseline" for r in roles) == 6
    # ...and the dose line again at its own budget: the same configs, the budget alone differs
    long = planned.dose
    assert long["train_tokens"] == 8_000_000 > plan["train_tokens"]
    assert [(s["expansion_factor"], s["k"], s["lens"], s["role"]) for s in long["specs"]] == [
        (4, 32, False, "mlsae"), (16, 32, False, "mlsae"), (64, 32, False, "mlsae")]
    twins = {s["expansion_factor"]: s["sae_id"] for s in plan["specs"]
             if s["k"] == 32 and not s["lens"] and s["role"] == "mlsae"}
    for spec in long["specs"]:
        assert spec["sae_id"] != twins[spec["expansion_factor"]]
        assert spec["sae_id"].rsplit("-", 1)[0] == twins[spec["expansion_factor"]].rsplit("-", 1)[0]
    assert {k: v for k, v in long["budget"].items() if k != "train_tokens"} == {
        k: v for k, v in plan["budget"].items() if k != "train_tokens"}


def test_dose_budget_is_checked_before_any_compute():
    from mlsae.plan import report_request

    with pytest.raises(InvalidRequest, match="read by `mlsae report` only"):
        make_plan(RunRequest(preset="report", grid={"dose_train_tokens": 4_000_000}))
    # the preset's dose budget is not given: `mlsae run --preset report` trains the grid
    assert make_plan(RunRequest(preset="report"))["train_tokens"] == 2_000_000
    with pytest.raises(InvalidRequest, match="needs an R dose-response"):
        check_report_plans(report_request(grid={"dose_train_tokens": 4_000_000, "dose_k": None,
                                                "dose_expansion_factors": None},
                                          preset="demo"), ["embedded"])
    with pytest.raises(InvalidRequest, match="equals --train-tokens"):
        check_report_plans(report_request(grid={"dose_train_tokens": 2_000_000}), ["embedded"])
    with pytest.raises(InvalidRequest, match="give --dose-train-tokens too"):
        check_report_plans(report_request(budget={"train_tokens": 9_000_000}), ["embedded"])
    with pytest.raises(InvalidRequest, match="--dose-train-tokens 0"):
        report_request(grid={"dose_train_tokens": 0})


def test_dose_response_needs_both_fields_and_fits_k():
    with pytest.raises(InvalidRequest, match="--dose-R and --dose-k"):
        make_plan(RunRequest(grid={"dose_expansion_factors": [2]}))
    with pytest.raises(InvalidRequest, match="-k 600 > n_latents 512"):
        make_plan(RunRequest(grid={"dose_expansion_factors": [2], "dose_k": 600}))
    with pytest.raises(InvalidRequest, match="--dose-k 0"):
        RunRequest(grid={"dose_expansion_factors": [2], "dose_k": 0})
    plan = make_plan(RunRequest(grid={"dose_expansion_factors": [2, 4], "dose_k": 16}))
    got = [(s["expansion_factor"], s["k"], s["role"]) for s in plan["specs"]]
    assert got.count((4, 16, "mlsae")) == 1 and (2, 16, "mlsae") in got  # no duplicate


def test_training_source_follows_the_cache_limit():
    assert make_plan(RunRequest(budget={"cache_limit": "0"}))["training_source"] == "stream"
    plan = make_plan(RunRequest(budget={"cache_limit": "10GB"}))
    assert plan["training_source"] == "cache" and 0 < plan["cache_bytes"] < 10**9
    assert parse_size("20GB") == 20 * 10**9 and parse_size("1KiB") == 1024


def test_batch_larger_than_budget_is_an_error_only_when_given():
    plan = make_plan(RunRequest(budget={"train_tokens": 1024}))  # preset batch 4096: cut
    assert plan["batch_tokens"] == 1024
    with pytest.raises(InvalidRequest, match="--batch-tokens 4096 exceeds --train-tokens 1024"):
        make_plan(RunRequest(budget={"train_tokens": 1024, "batch_tokens": 4096}))


def test_dry_run_writes_nothing_and_prints_the_plan_as_json(tmp_path):
    from flows.cli import main

    out = tmp_path / "wh"
    result = CliRunner().invoke(main, ["run", "--dry-run", "--json", "--cache-limit", "0",
                                       "--train-tokens", "4096", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output[result.output.index("{"):])
    assert plan["training_source"] == "stream" and plan["cache_bytes"] > 0
    assert plan["latents_rows"] == 8192 * 6 * 16 and plan["latents_bytes"] > 0
    assert plan["estimated_seconds"] > 0 and len(plan["saes"]) == 7
    assert not out.exists()
    text = CliRunner().invoke(main, ["run", "--dry-run", "--out", str(out)])
    assert "estimated wall time" in text.output and "Nothing was written" in text.output
    assert not out.exists()
