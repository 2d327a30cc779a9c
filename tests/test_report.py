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
