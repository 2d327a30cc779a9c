"""The report's own pieces: the token_layer_spread view against numpy, the training
'settled' verdict, the reproduce command, and the report figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from mlsae import figures
from mlsae.report import training_facts
from tests.test_sql_views import random_activations, write_dense


def test_token_layer_spread_matches_numpy(tmp_path):
    from mlsae.warehouse import connect

    a, mask = random_activations(seed=3, n_seq=4, seq_len=12, n_layers=4, n_latents=9)
    write_dense(tmp_path, "spread", [0, 1, 2, 3], a, mask)
    n_STJ = (a > 0).sum(axis=2)  # layers active per (token, latent)
    m_STJ = a.sum(axis=2)
    pairs = n_STJ > 0
    con = connect(tmp_path)
    rows = con.execute("SELECT n_layers, token_latents, fraction, mass_fraction "
                       "FROM token_layer_spread WHERE sae_id = 'spread' ORDER BY n_layers"
                       ).fetchall()
    con.close()
    assert [r[0] for r in rows] == sorted(set(n_STJ[pairs].tolist()))
    for n_layers, count, fraction, mass_fraction in rows:
        sel = n_STJ == n_layers
        assert count == sel.sum()
        assert fraction == pytest.approx(sel.sum() / pairs.sum(), rel=1e-12)
        assert mass_fraction == pytest.approx(m_STJ[sel].sum() / m_STJ.sum(), rel=1e-6)


def _summary(tmp_path, fvu: list[float]) -> None:
    history = [{"step": i + 1, "tokens": 4096 * (i + 1), "fvu": f, "dead_fraction": 0.01}
               for i, f in enumerate(fvu)]
    (tmp_path / "train_summary.json").write_text(json.dumps(
        {"steps": len(fvu), "tokens": 4096 * len(fvu), "tokens_per_s": 4096.0,
         "data_exhausted": False, "history": history}))


def test_training_facts_judges_whether_fvu_settled(tmp_path):
    _summary(tmp_path, list(np.linspace(0.5, 0.1, 100)))  # still falling fast
    facts = training_facts(tmp_path)
    assert facts.steps == 100 and facts.seconds == pytest.approx(100.0)
    # last 5% (steps 96-100) vs steps 76-80 of a straight line from 0.5 to 0.1
    line = np.linspace(0.5, 0.1, 100)
    assert facts.fvu_change == pytest.approx(line[95:].mean() / line[75:80].mean() - 1)
    assert facts.fvu_change < -0.05
    _summary(tmp_path, [0.2] * 100)
    assert training_facts(tmp_path).fvu_change == pytest.approx(0.0)
    _summary(tmp_path, [0.2] * 10)  # too few steps for a verdict
    assert training_facts(tmp_path).fvu_change is None
    assert training_facts(tmp_path / "missing") is None


def test_report_command_names_only_given_options():
    from flows.options import command_line
    from mlsae.plan import report_request

    assert command_line("report", report_request()) == "mlsae report"
    request = report_request(grid={"ks": [4, 8], "lens": "off"}, budget={"train_tokens": 1000})
    assert command_line("report", request, "wh") == (
        "mlsae report -k 4 -k 8 --lens off --train-tokens 1000 --out wh")


def test_other_models_get_the_base_config_only_and_the_command_names_them():
    from flows.options import report_command_line
    from mlsae.plan import REPORT_MODELS, family_request, report_models, report_request

    request = report_request(grid={"ks": [8, 16]}, budget={"train_tokens": 4096})
    other = family_request(request, "other/")
    g = other.grid
    assert (g.expansion_factors, g.ks, g.lens, g.baselines) == ([4], [16], "off", False)
    assert g.dose_expansion_factors is None and g.dose_k is None and g.layers is None
    assert other.target.model == "other/" and other.budget == request.budget
    assert request.target.model == "embedded"  # the first model's request is untouched
    assert report_models(None) == list(REPORT_MODELS)
    assert report_models(None, {"model": "m/"}) == ["m/"]
    assert report_models(["a", "b", "a"]) == ["a", "b"]
    assert report_command_line(report_request(), list(REPORT_MODELS)) == "mlsae report"
    assert report_command_line(request, ["a", "b"], "wh") == (
        "mlsae report --model a --model b -k 8 -k 16 --train-tokens 4096 --out wh")


def test_report_figures_are_written(tmp_path):
    paths = [
        figures.plot_training_curves({"a": ([1, 2, 3], [0.5, 0.3, 0.2], [0, 0, 0.1]),
                                      "b": ([1, 2, 3], [0.6, 0.4, 0.3], [0, 0, 0])},
                                     tmp_path / "curves.png", highlight=["a"]),
        figures.plot_variance_by_config(["x", "y"], {"layer": [1.0, 2.0], "token": [0.1, None]},
                                        tmp_path / "var.png"),
        figures.plot_layers_active(["x", "y"], np.array([[0.5, 0.5], [1.0, 0.0]]),
                                   tmp_path / "active.png", "title"),
        figures.plot_metrics_vs_baselines([0, 1], {m: [0.1, 0.2] for m in figures.METRIC_AXES},
                                          {m: [0.1, np.nan] for m in figures.METRIC_AXES},
                                          tmp_path / "metrics.png"),
    ]
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="one value per label"):
        figures.plot_variance_by_config(["x"], {"layer": [1.0, 2.0]}, tmp_path / "bad.png")


# -- the whole report over a synthetic grid and a second tiny model ----------------------------


class Built(NamedTuple):
    out: Path
    """The warehouse."""
    inputs: object
    """The ReportInputs."""
    report_dir: Path
    text: str
    output: object
    """The ReportOutput (its facts and verdicts)."""


@pytest.fixture(scope="module")
def built_report(tmp_path_factory) -> Built:
    """write_report once (its calibration is most of the cost) on a warehouse of synthetic
    latent tables (mlsae.calibration): a grid of three MLSAEs (two at k 4 for the
    dose-response), a single-layer baseline whose latents are not logged, and a second
    model's base MLSAE; the two models are tiny GPT-NeoX made here, their residual samples
    streamed."""
    from mlsae.calibration import SpillTables, write_spill_tables
    from mlsae.data import DataConfig
    from mlsae.extract import ExtractConfig
    from mlsae.latents import SaeRecord, write_layer_metrics, write_sae_record
    from mlsae.report import GridEntry, ModelEntry, ReportInputs, count_parameters, write_report
    from tests.test_flows_support import save_tiny_model

    tmp_path = tmp_path_factory.mktemp("report")
    small = save_tiny_model(tmp_path / "small", n_layers=3, d_model=16)
    large = save_tiny_model(tmp_path / "large", n_layers=3, d_model=32)

    def sample(model_dir):
        return ExtractConfig(model=str(model_dir), layers=[0, 1, 2], device="cpu",
                             data=DataConfig(source="embedded", split="train", seq_len=32,
                                             max_sequences=8))

    out = tmp_path / "wh"
    grid, dose_grid = [], []
    for sae_id, spill, r, k in [("a-R4-k4", 0.6, 4, 4), ("a-R8-k4", 0.3, 8, 4),
                                ("a-R4-k2", 0.2, 4, 2), ("b-R4-k4", 0.1, 4, 4),
                                ("a-R4-k4-long", 0.5, 4, 4), ("a-R8-k4-long", 0.25, 8, 4)]:
        write_spill_tables(out, sae_id, SpillTables(n_layers=3, n_latents=8 * r,
                                                    latents_per_token=k, n_sequences=40,
                                                    seq_len=64, spill=spill))
        # the saes row as the pipeline writes it (the synthetic writer says R 1)
        long = sae_id.endswith("-long")
        write_sae_record(out, SaeRecord(sae_id=sae_id, model=sae_id[0], d_model=8,
                                        n_latents=8 * r, expansion_factor=r, k=k,
                                        layers=[0, 1, 2], train_tokens=4000 if long else 1000),
                         overwrite=True)
        write_layer_metrics(out, sae_id, [{"layer": i, "fvu": 0.1 * r / 4 / (2 if long else 1),
                                           "delta_ce": 0.05, "kl": 0.04,
                                           "dead_fraction": 0.01 * r} for i in range(3)])
        if long:  # the dose line (k 4) again at 4x the budget
            dose_grid.append(GridEntry(sae_id, "mlsae", r, k, False, [0, 1, 2],
                                       str(tmp_path / sae_id), train_tokens=4000))
        elif sae_id.startswith("a-"):
            grid.append(GridEntry(sae_id, "mlsae", r, k, False, [0, 1, 2], str(tmp_path / sae_id)))
    write_sae_record(out, SaeRecord(sae_id="single-1", model="synthetic", d_model=8,
                                    n_latents=32, expansion_factor=4, k=4, layers=[1]))
    write_layer_metrics(out, "single-1", [{"layer": 1, "fvu": 0.08, "delta_ce": 0.04,
                                           "kl": 0.03, "dead_fraction": 0.0}])
    grid.append(GridEntry("single-1", "baseline", 4, 4, False, [1], str(tmp_path / "single-1")))
    family = [ModelEntry(str(large), 3, 32, "b-R4-k4", n_params=count_parameters(large),
                         extract=sample(large))]
    inputs = ReportInputs(warehouse=out, model=str(small), data="synthetic", n_layers=3,
                          d_model=16, grid=grid, base_id="a-R4-k4", train_tokens=1000,
                          eval_tokens=2560, seq_len=64, lr=1e-3, batch_tokens=256,
                          command="mlsae report", calibration_tokens=256, dose_k=4,
                          extract=sample(small), n_params=count_parameters(small),
                          family=family, dose_grid=dose_grid, dose_train_tokens=4000)
    report_dir = tmp_path / "report"
    output = write_report(inputs, report_dir)
    return Built(out, inputs, report_dir, output.report.read_text(), output)


def test_report_compares_the_paper_only_with_the_reference_statistic(built_report):
    """The like-for-like table equals variance_ratios, the calibration figure is drawn with
    the MLSAEs on it, the baseline is 'not logged', and the paper's ~100 is set against
    the reference A/B only."""
    import re

    from mlsae import warehouse as wh

    text = built_report.text
    con = wh.connect(built_report.out)
    rows = {r["sae_id"]: r for r in wh.query_dicts(con, "SELECT * FROM variance_ratios")}
    summary = {r["sae_id"]: r for r in wh.query_dicts(con, "SELECT * FROM variance_summary")}
    con.close()
    assert summary["single-1"]["n_live"] is None and summary["single-1"]["n_tokens"] == 0
    assert set(rows) == {"a-R4-k4", "a-R8-k4", "a-R4-k2", "b-R4-k4", "a-R4-k4-long",
                         "a-R8-k4-long"}
    like = text[text.index("### Like for like with the paper"):]
    for label, sae_id in [("MLSAE R4 k4", "a-R4-k4"), ("MLSAE R4 k2", "a-R4-k2"),
                          ("MLSAE R8 k4 at 4k", "a-R8-k4-long")]:
        r = rows[sae_id]
        assert r["ref_n_batches"] == 1  # 2,560 tokens: one full 2048-token batch
        line = next(x for x in like.splitlines() if x.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{r['ref_ratio']:.3g}" and cells[2] == "1"
        assert cells[6] == f"{r['ratio_mass']:.3g}" and cells[7] == f"{r['ratio_count']:.3g}"
    assert "### Calibration with known answers" in text
    assert (built_report.report_dir / "figures" / "calibration.png").stat().st_size > 10_000
    # Every mention of the paper's ~100 / "two orders of magnitude" sits in the like-for-like
    # subsections, the calibration, or finding 2, which quotes the reference A/B.
    grid_ids = ("a-R4-k4", "a-R8-k4", "a-R4-k2", "a-R4-k4-long", "a-R8-k4-long")
    finding = text[text.index("2. **Aggregated layer variance"):].split("\n\n")[0]
    assert f"{min(rows[i]['ref_ratio'] for i in grid_ids):.3g}" in finding
    assert "mass-weighted ratio is" not in text and "layer/token var 100" not in text
    outside = text[:text.index("### Like for like")] + text[text.index("## 4."):]
    outside = outside.replace(finding, "")
    assert not re.search(r"~ ?100\b|about 100\b|two orders of magnitude above", outside)


# -- verdicts: pure functions of the facts, each flipped by the facts it reads ---------------


def _inputs(tmp_path, lens: bool = False):
    from mlsae.report import GridEntry, ReportInputs

    grid = [GridEntry("base", "mlsae", 4, 16, False, [0, 1, 2], str(tmp_path / "base")),
            GridEntry("single", "baseline", 4, 16, False, [1], str(tmp_path / "single"))]
    if lens:
        grid.append(GridEntry("lens", "mlsae", 4, 16, True, [0, 1, 2], str(tmp_path / "lens")))
    return ReportInputs(warehouse=tmp_path, model="m", data="d", n_layers=3, d_model=8,
                        grid=grid, base_id="base", train_tokens=1, eval_tokens=1, seq_len=8,
                        lr=1e-3, batch_tokens=1, command="mlsae report")


def _training(change: float | None):
    from mlsae.report import TrainingFacts

    return TrainingFacts(steps=100, tokens=1, seconds=1.0, final_fvu=0.1, fvu_change=change,
                         final_dead=0.0, data_exhausted=False, history=[])


def test_settled_verdict_follows_the_fvu_change(tmp_path):
    from mlsae.report import facts, verdicts

    inputs = _inputs(tmp_path)

    def judge(base: float | None, single: float | None):
        grid = facts.GridFacts(training={"base": _training(base), "single": _training(single)},
                               runs=[], cpu_count=2, machine="x")
        return verdicts.settled(grid, inputs)

    assert judge(0.01, -0.02).settled is True
    assert judge(0.01, -0.2).settled is False  # a baseline still falling
    assert judge(verdicts.SETTLED_MAX_CHANGE + 0.01, 0.0).settled is False
    assert judge(0.01, None).settled is None  # a run too short to judge


def test_finding_verdicts_flip_with_their_facts(tmp_path):
    from mlsae.report import facts, verdicts

    inputs = _inputs(tmp_path, lens=True)

    def activity(share: float, std_base: float = 1.0, std_lens: float = 1.0):
        return facts.ActivityFacts("", "", "", {
            "base": {"single_layer_share": share, "latent_one_layer": 0.1,
                     "mean_layer_std": std_base},
            "lens": {"single_layer_share": share, "mean_layer_std": std_lens}},
            [], np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))

    # 1: most token-latent pairs at one layer, or not
    assert verdicts.one_layer(activity(0.6), inputs).holds
    assert not verdicts.one_layer(activity(0.4), inputs).holds
    # 4: the lens raises the layer std by more than 10%, or not
    assert verdicts.lens(activity(0.5, 1.0, 1.2), inputs).increases
    assert not verdicts.lens(activity(0.5, 1.0, 1.05), inputs).increases
    assert verdicts.lens(activity(0.5), _inputs(tmp_path)) is None  # no lens in the grid

    # 5: MLSAE FVU within 1.5x of the single-layer SAEs', or not
    def metrics(fvu: float, fvu_sae: float):
        return verdicts.metrics(facts.MetricsFacts("", [], "", {
            "fvu": fvu, "fvu_sae": fvu_sae, "delta_ce": 0.1, "delta_ce_sae": 0.1}, "", {}))

    assert metrics(0.2, 0.15).comparable and not metrics(0.5, 0.15).comparable

    # 2: the reference A/B of the paper's order, or below it
    Point = facts.CalibrationFacts  # noqa: N806 - a NamedTuple class
    from mlsae.calibration import CalibrationPoint

    fields = CalibrationPoint._fields
    points = [CalibrationPoint(**{f: None for f in fields} | {
        "single_layer_share": s, "ref_ratio": r}) for s, r in [(0.5, 10.0), (0.9, 1000.0)]]
    calibration = Point(None, (), {"family": points}, {})

    def variance(ref: float):
        like = facts.LikeForLikeFacts("", {"base": {"ref_ratio": ref, "ratio_mass": 1.2,
                                                    "ratio_count": 1.5,
                                                    "single_layer_share": 0.4}}, 2048, 4096, 8)
        return verdicts.variance(like, calibration)

    assert variance(50.0).near_paper and not variance(10.0).near_paper
    # log-linear between (0.5, 10) and (0.9, 1000): 100 is half-way
    assert variance(10.0).crossings["family"] == pytest.approx(0.7)


def _family(sizes, cos_means, single_shares, same_params: bool = False):
    from mlsae import statistics
    from mlsae.report import ModelEntry, facts

    models = [ModelEntry(f"m{i}", 4, 8, f"base{i}", n_params=size)
              for i, size in enumerate(sizes)]
    similarity = {m.name: statistics.ResidualSimilarity(np.full(3, c), np.ones(4))
                  for m, c in zip(models, cos_means, strict=True)}
    rows = {m.base_id: {"single_layer_share": s} for m, s in zip(models, single_shares,
                                                                  strict=True)}
    return facts.FamilyFacts(models, similarity, "", rows)


def test_finding_3_verdict_flips_with_the_model_family():
    from mlsae.report import verdicts

    one = verdicts.family(_family([10], [0.9], [0.5]))
    assert not one.testable and one.status == "not testable"
    same_size = verdicts.family(_family([10, 10], [0.5, 0.9], [0.5, 0.3]))
    assert not same_size.testable
    grows = verdicts.family(_family([30, 10, 20], [0.9, 0.5, 0.7], [0.2, 0.6, 0.4]))
    assert grows.testable and grows.status == "reproduced" and grows.size_axis == "parameters"
    assert grows.similarity.correlation == pytest.approx(1.0)
    partly = verdicts.family(_family([10, 20, 30], [0.5, 0.7, 0.9], [0.2, 0.4, 0.6]))
    assert partly.status == "partly reproduced" and not partly.activity.grows
    shrinks = verdicts.family(_family([10, 20, 30], [0.9, 0.7, 0.5], [0.2, 0.4, 0.6]))
    assert shrinks.status == "not reproduced"
    # growth smaller than TREND_MIN_CHANGE is not growth
    tiny = verdicts.family(_family([10, 20], [0.5, 0.5 + verdicts.TREND_MIN_CHANGE / 2],
                                   [0.6, 0.2]))
    assert tiny.status == "partly consistent (two models)" and not tiny.similarity.grows
    two = verdicts.family(_family([10, 20], [0.5, 0.9], [0.6, 0.2]))
    assert two.status == "consistent (two models)"  # rank correlation 1 from two points


def test_dose_verdict_reads_the_trend_in_r():
    from mlsae.report import facts, verdicts

    def dose(shares, refs):
        rows = [{"expansion_factor": r, "single_layer_share": s, "ref_ratio": x}
                for r, s, x in zip([4, 16, 64], shares, refs, strict=True)]
        return verdicts.dose(facts.DoseFacts(32, "", rows, None, []))

    rising = dose([0.3, 0.4, 0.5], [10, 20, 40])
    assert rising.single_layer.grows and rising.ref_ratio.grows
    falling = dose([0.5, 0.4, 0.3], [40, 20, 10])
    assert not falling.single_layer.grows and falling.single_layer.correlation == pytest.approx(-1.0)
    assert verdicts.dose(facts.DoseFacts(32, "", [{"expansion_factor": 4,
                                                   "single_layer_share": 0.3}], None, [])) is None


def test_budget_check_verdict_flips_with_the_twins():
    from mlsae.report import facts, verdicts

    def check(rows_by_r):
        rows = [{"sae_id": f"R{r}-{t}", "expansion_factor": r, "train_tokens": t,
                 "single_layer_share": share, "ref_ratio": ref, "fvu": fvu}
                for r, pair in rows_by_r.items()
                for t, (share, ref, fvu) in zip((1000, 4000), pair, strict=False)]
        return verdicts.budget_check(facts.DoseFacts(32, "", [], "sql", rows[::-1]))

    tol = verdicts.BUDGET_SHARE_TOLERANCE
    held = check({4: [(0.30, 10, 0.2), (0.30 + tol / 2, 11, 0.1)],
                  16: [(0.40, 20, 0.1), (0.40 - tol / 2, 19, 0.08)]})
    assert held.stable and held.same_trends
    assert held.twins[0].fvu_per_doubling == pytest.approx(0.5 ** 0.5 - 1)
    assert held.twins[0].ref_change == pytest.approx(0.1)
    share_moved = check({4: [(0.30, 10, 0.2), (0.30 + 2 * tol, 10, 0.2)]})
    assert not share_moved.stable and share_moved.same_trends is None  # one R: no trend
    ratio_moved = check({4: [(0.30, 10, 0.2), (0.30, 10 * (1.01 + verdicts.BUDGET_RATIO_TOLERANCE),
                                                0.2)]})
    assert not ratio_moved.stable
    flipped = check({4: [(0.30, 10, 0.2), (0.41, 10, 0.2)], 16: [(0.40, 20, 0.1),
                                                                  (0.40, 20, 0.1)]})
    assert flipped.same_trends is False  # the share rises with R at 1k, falls at 4k
    assert check({4: [(0.3, 10, 0.2)]}) is None  # one budget only


def test_report_with_a_model_family_writes_every_section(built_report):
    """Every section, the cross-model and dose figures, the family table equal to the views,
    and finding 3 written from the verdict on those facts."""
    from mlsae import warehouse as wh
    from mlsae.report import count_parameters, verdicts

    out, inputs, text = built_report.out, built_report.inputs, built_report.text
    small, large = Path(inputs.model), Path(inputs.family[0].name)

    for heading in [f"\n## {n}. " for n in range(8)] + [
            "### Like for like with the paper", "### Calibration with known answers",
            "### R dose-response at k 4", "\n## Reproduce"]:
        assert heading in text, heading
    figure_dir = built_report.report_dir / "figures"
    for name in ("fig1_models.png", "activity_vs_model_size.png", "dose_response_k4.png",
                 "calibration.png"):
        assert (figure_dir / name).stat().st_size > 10_000, name
    assert count_parameters(large) > count_parameters(small) > 0

    con = wh.connect(out)
    ratios = {r["sae_id"]: r for r in wh.query_dicts(con, "SELECT * FROM variance_ratios")}
    activity = {r["sae_id"]: r for r in wh.query_dicts(con, "SELECT * FROM latent_activity")}
    con.close()
    across = text[text.index("## 6. Across models"):text.index("## 7.")]
    for name, base in [(str(small), "a-R4-k4"), (str(large), "b-R4-k4")]:
        row = next(x for x in across.splitlines() if x.startswith(f"| `{name}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[6] == f"{activity[base]['single_layer_share']:.3g}"
        assert cells[8] == f"{activity[base]['mean_layer_std']:.3g}"
        assert cells[10] == f"{ratios[base]['ref_ratio']:.3g}"
    # The dose section reads the dose line at its own budget; the budget check sets each
    # beside its twin at the report's budget, its changes computed from the same rows.
    dose = text[text.index("### R dose-response at k 4"):text.index("#### Budget check")]
    assert "trained on 4,000 tokens per layer" in dose
    assert [line.split("|")[1].strip() for line in dose.splitlines()
            if line.startswith("| ") and line[2].isdigit()] == ["4", "8"]
    check = text[text.index("#### Budget check: 1k vs 4k tokens per layer"):text.index("## 5.")]
    budget = built_report.output.verdicts.budget
    assert [t.expansion_factor for t in budget.twins] == [4, 8]
    for t, short, long in zip(budget.twins, ("a-R4-k4", "a-R8-k4"),
                              ("a-R4-k4-long", "a-R8-k4-long"), strict=True):
        assert (t.short["sae_id"], t.long["sae_id"]) == (short, long)
        assert t.share_change == pytest.approx(ratios[long]["single_layer_share"]
                                               - ratios[short]["single_layer_share"], abs=1e-12)
        assert t.ref_change == pytest.approx(ratios[long]["ref_ratio"]
                                             / ratios[short]["ref_ratio"] - 1, rel=1e-12)
        assert t.fvu_per_doubling == pytest.approx(0.5 ** 0.5 - 1)  # FVU halved over 2 doublings
        assert f"| {t.expansion_factor} | {100 * t.share_change:+.1f} | " in check
    for sae_id in ("a-R4-k4", "a-R4-k4-long", "a-R8-k4", "a-R8-k4-long"):
        assert f" | {ratios[sae_id]['single_layer_share']:.3g} | " in check
    # spills 0.6 -> 0.5 and 0.3 -> 0.25: shares move 5-10 points, beyond the tolerance
    assert not budget.stable and "the statistics move with the budget" in check
    assert "Budget check (section 4): from 1k to 4k tokens per layer" in text
    assert "beyond the tolerances: findings read from the dose line" in text

    # Finding 3 is the verdict on the facts the report read: testable (two sizes), its
    # status in the text.
    found = built_report.output.facts.family
    assert [m.name for m in found.models] == [str(small), str(large)]
    verdict = verdicts.family(found)
    assert verdict == built_report.output.verdicts.family
    assert verdict.testable and verdict.size_axis == "parameters"
    # the larger model's base MLSAE spills less (0.1 vs 0.6): multi-layer activity falls
    assert verdict.activity.correlation == pytest.approx(-1.0) and not verdict.activity.grows
    finding = text[text.index("3. **Adjacent-layer similarity"):].split("\n\n")[0]
    assert finding.split("** ")[1].startswith(verdict.status.capitalize())
    assert f"**{verdict.status}**" in across
