"""The report's own pieces: the token_layer_spread view against numpy, the training
'settled' verdict, the reproduce command, and the report figures."""

from __future__ import annotations

import json

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


def test_report_compares_the_paper_only_with_the_reference_statistic(tmp_path):
    """write_report on a small warehouse (synthetic MLSAE tables from mlsae.calibration, a
    single-layer baseline whose latents are not logged): the like-for-like table equals
    variance_ratios, the calibration figure is drawn with the MLSAEs on it, and the
    paper's ~100 is set against the reference A/B only."""
    import re

    from mlsae import warehouse as wh
    from mlsae.calibration import SpillTables, write_spill_tables
    from mlsae.latents import SaeRecord, write_layer_metrics, write_sae_record
    from mlsae.report import GridEntry, ReportInputs, write_report

    out = tmp_path / "wh"
    grid = []
    for sae_id, spill, k in [("mlsae-a", 0.6, 4), ("mlsae-b", 0.2, 2)]:
        write_spill_tables(out, sae_id, SpillTables(n_layers=3, n_latents=32, latents_per_token=k,
                                                    n_sequences=40, seq_len=64, spill=spill))
        write_layer_metrics(out, sae_id, [{"layer": i, "fvu": 0.1, "delta_ce": 0.05, "kl": 0.04,
                                           "dead_fraction": 0.0} for i in range(3)])
        grid.append(GridEntry(sae_id, "mlsae", 4, k, False, [0, 1, 2], str(tmp_path / sae_id)))
    write_sae_record(out, SaeRecord(sae_id="single-1", model="synthetic", d_model=8,
                                    n_latents=32, expansion_factor=4, k=4, layers=[1]))
    write_layer_metrics(out, "single-1", [{"layer": 1, "fvu": 0.08, "delta_ce": 0.04, "kl": 0.03,
                                           "dead_fraction": 0.0}])
    grid.append(GridEntry("single-1", "baseline", 4, 4, False, [1], str(tmp_path / "single-1")))
    inputs = ReportInputs(warehouse=out, model="synthetic", data="synthetic", n_layers=3,
                          d_model=8, grid=grid, base_id="mlsae-a", train_tokens=1000,
                          eval_tokens=2560, seq_len=64, lr=1e-3, batch_tokens=256,
                          command="mlsae report", calibration_tokens=256)
    result = write_report(inputs, tmp_path / "report")
    text = result.report.read_text()

    con = wh.connect(out)
    rows = {r["sae_id"]: r for r in wh.query_dicts(con, "SELECT * FROM variance_ratios")}
    summary = {r["sae_id"]: r for r in wh.query_dicts(con, "SELECT * FROM variance_summary")}
    con.close()
    assert summary["single-1"]["n_live"] is None and summary["single-1"]["n_tokens"] == 0
    assert set(rows) == {"mlsae-a", "mlsae-b"}
    like = text[text.index("### Like for like with the paper"):]
    for label, sae_id in [("MLSAE R4 k4", "mlsae-a"), ("MLSAE R4 k2", "mlsae-b")]:
        r = rows[sae_id]
        assert r["ref_n_batches"] == 1  # 2,560 tokens: one full 2048-token batch
        line = next(x for x in like.splitlines() if x.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{r['ref_ratio']:.3g}" and cells[2] == "1"
        assert cells[6] == f"{r['ratio_mass']:.3g}" and cells[7] == f"{r['ratio_count']:.3g}"
    assert "### Calibration with known answers" in text
    assert (tmp_path / "report" / "figures" / "calibration.png").stat().st_size > 10_000
    # Every mention of the paper's ~100 / "two orders of magnitude" sits in the like-for-like
    # subsections, the calibration, or finding 2, which quotes the reference A/B.
    finding = text[text.index("2. **Aggregated layer variance"):].split("\n\n")[0]
    assert f"{min(r['ref_ratio'] for r in rows.values()):.3g}" in finding
    assert "mass-weighted ratio is" not in text and "layer/token var 100" not in text
    outside = text[:text.index("### Like for like")] + text[text.index("## 4."):]
    outside = outside.replace(finding, "")
    assert not re.search(r"~ ?100\b|about 100\b|two orders of magnitude above", outside)
