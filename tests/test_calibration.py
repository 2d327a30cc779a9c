"""Calibration with known answers (mlsae.calibration): synthetic tables written with the
warehouse's writer, read by the real views; the limiting cases exactly, the intermediate
ones against analytic values and float64 numpy to 1e-9."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mlsae import warehouse as wh
from mlsae.calibration import SpillTables, calibration_curve, spill_activations, write_spill_tables
from tests.test_reference_variant import count_weighted, pooled_reference
from tests.test_sql_views import spec5

SMALL = SpillTables(n_layers=4, n_latents=12, latents_per_token=3, n_sequences=6, seq_len=10)
PAIR_VAR = 0.5 / 1.5**2
"""Per-token variance of a pair at one layer plus one neighbour at half its activation."""


def logged(tmp_path, spec: SpillTables, sae_id: str = "spill"):
    drawn, _ = write_spill_tables(tmp_path, sae_id, spec)
    return drawn, wh.connect(tmp_path)


def test_generator_spills_into_contiguous_windows():
    spec = dataclasses.replace(SMALL, spill=0.6, spill_width=3, seed=4)
    drawn = spill_activations(spec)
    active_STKL = drawn.acts_STKL > 0
    n_STK = active_STKL.sum(-1)
    assert np.array_equal(n_STK > 1, drawn.spilled_STK)
    assert n_STK.min() >= 1 and n_STK.max() <= 1 + spec.spill_width
    first = active_STKL.argmax(-1)
    last = spec.n_layers - 1 - active_STKL[..., ::-1].argmax(-1)
    assert np.array_equal(last - first + 1, n_STK)  # one run of layers, no gaps
    # every token fires latents_per_token distinct latents
    sorted_STK = np.sort(drawn.latents_STK, axis=-1)
    assert (np.diff(sorted_STK, axis=-1) > 0).all()
    home_STK = drawn.acts_STKL.max(-1)
    spilled_values = np.where(active_STKL, drawn.acts_STKL, home_STK[..., None])
    assert np.isin(spilled_values / home_STK[..., None], [0.5, 1.0]).all()


def test_no_spill_gives_zero_token_variance_exactly(tmp_path):
    drawn, con = logged(tmp_path, dataclasses.replace(SMALL, spill=0.0))
    assert not drawn.spilled_STK.any()
    token_var = [r[0] for r in con.execute("SELECT token_var FROM latent_stats").fetchall()]
    counted = [r[0] for r in con.execute("SELECT token_var FROM count_weighted_stats").fetchall()]
    assert len(token_var) == SMALL.n_latents and set(token_var) == {0.0}
    assert set(counted) == {0.0}
    b = [r[0] for r in con.execute("SELECT b FROM reference_batches_from(token_latent_moments, "
                                   "tokens, batch_tokens := 16)").fetchall()]
    assert len(b) == 60 // 16 and set(b) == {0.0}
    row = wh.query_dicts(con, "SELECT * FROM variance_ratios")[0]
    assert row["single_layer_share"] == 1.0
    assert row["ref_var_token"] == 0.0 and row["ref_rel_var"] == 0.0
    assert row["ref_ratio"] is None  # A/B with B = 0: no finite ratio
    assert row["ratio_mass"] == np.inf and row["ratio_count"] == np.inf
    assert row["ref_var_aggregated"] > 0
    con.close()


def test_full_spill_leaves_no_single_layer_pair(tmp_path):
    drawn, con = logged(tmp_path, dataclasses.replace(SMALL, spill=1.0))
    assert drawn.spilled_STK.all()
    row = wh.query_dicts(con, "SELECT single_layer_share, ref_var_token FROM variance_ratios")[0]
    assert row["single_layer_share"] == 0.0
    # every pair has variance PAIR_VAR: B = PAIR_VAR * (pairs per token) / n
    assert row["ref_var_token"] == pytest.approx(
        PAIR_VAR * SMALL.latents_per_token / SMALL.n_latents, rel=1e-12)
    con.close()


def test_intermediate_spill_equals_analytic_values(tmp_path):
    spec = dataclasses.replace(SMALL, spill=0.3, seed=1)
    drawn, con = logged(tmp_path, spec)
    n_spilled_N = drawn.spilled_STK.reshape(-1, spec.latents_per_token).sum(1)
    assert 0 < n_spilled_N.sum() < n_spilled_N.size * spec.latents_per_token
    # B_b = PAIR_VAR x (spilled pairs in batch b) / (n T), batches of 16 cut across sequences
    rows = con.execute("SELECT batch, t, b FROM reference_batches_from(token_latent_moments, "
                       "tokens, batch_tokens := 16) ORDER BY batch").fetchall()
    for batch, t, b in rows:
        spilled = n_spilled_N[batch * 16:(batch + 1) * 16].sum()
        assert t == 16
        assert b == pytest.approx(PAIR_VAR * spilled / (spec.n_latents * t), rel=1e-9, abs=1e-15)
    # count-weighted token variance of latent j = PAIR_VAR x (its spilled pairs) / (its pairs)
    latents_NK = drawn.latents_STK.reshape(-1, spec.latents_per_token)
    spilled_NK = drawn.spilled_STK.reshape(-1, spec.latents_per_token)
    for latent, n_tokens, token_var in con.execute(
            "SELECT latent, n_tokens, token_var FROM count_weighted_stats").fetchall():
        pairs = latents_NK == latent
        assert n_tokens == pairs.sum()
        assert token_var == pytest.approx(PAIR_VAR * spilled_NK[pairs].sum() / pairs.sum(),
                                          rel=1e-9, abs=1e-15)
    share = wh.query_dicts(con, "SELECT single_layer_share FROM variance_ratios")[0]
    assert share["single_layer_share"] == pytest.approx(1 - spilled_NK.mean(), rel=1e-12)
    con.close()


@pytest.mark.parametrize("spill_width", [1, 3])
def test_three_ratios_equal_numpy(tmp_path, spill_width):
    spec = dataclasses.replace(SMALL, spill=0.4, spill_width=spill_width, seed=2)
    drawn, con = logged(tmp_path, spec)
    a_STLJ = drawn.dense(spec.n_latents)
    mask_ST = np.ones(a_STLJ.shape[:2], dtype=bool)
    row = wh.query_dicts(con, "SELECT * FROM variance_ratios")[0]
    mass = spec5(a_STLJ, mask_ST)
    assert row["ratio_mass"] == pytest.approx(mass["mean_layer_var"] / mass["mean_token_var"],
                                              rel=1e-9)
    assert row["ratio_count"] == pytest.approx(count_weighted(a_STLJ, mask_ST)["ratio"], rel=1e-9)
    assert row["ref_ratio"] == pytest.approx(pooled_reference(a_STLJ, mask_ST, 2048)["ratio"],
                                             rel=1e-9)
    con.close()


def test_calibration_curve_reads_the_views(tmp_path):
    points = calibration_curve(tmp_path, SMALL, spills=(1.0, 0.5, 0.1))
    assert [p.spill for p in points] == [1.0, 0.5, 0.1]
    shares = [p.single_layer_share for p in points]
    assert shares[0] == 0.0 and shares[0] < shares[1] < shares[2]
    for ratio in ("ref_ratio", "ratio_mass", "ratio_count"):
        values = [getattr(p, ratio) for p in points]
        assert values[0] < values[1] < values[2], ratio
    # the paper's statistic runs above ours: its A carries the uncentred E^2 term
    assert all(p.ref_ratio > p.ratio_count > p.ratio_mass for p in points)
