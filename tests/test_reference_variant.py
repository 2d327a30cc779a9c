"""The like-for-like statistics (sql/reference_variant.sql, count_weighted_stats.sql,
variance_ratios.sql) against literal float64 numpy transcriptions of SPEC 5, on random
latent tables logged through the real writer; and variance_summary's "not logged" rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mlsae import analysis_polars as ap
from mlsae import warehouse as wh
from mlsae.latents import SaeRecord, write_sae_record
from tests.test_sql_views import random_activations, write_dense


def var_of(q_L: np.ndarray) -> float:
    """The reference's var(q) = sum l^2 q - (sum l q)^2, applied even when sum q != 1."""
    idx = np.arange(len(q_L), dtype=np.float64)
    return float((idx**2 * q_L).sum() - ((idx * q_L).sum()) ** 2)


def logged_q(a_STLJ: np.ndarray, mask_ST: np.ndarray) -> np.ndarray:
    """q_tj(l) for every logged token in (seq, pos) order: [N, L, J], 0 where inactive."""
    a_NLJ = a_STLJ[mask_ST]
    m_NJ = a_NLJ.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m_NJ[:, None, :] > 0, a_NLJ / m_NJ[:, None, :], 0.0)


def pooled_reference(a_STLJ: np.ndarray, mask_ST: np.ndarray, batch_tokens: int) -> dict:
    """SPEC 5's reference variant, literally: the logged tokens in (seq, pos) order cut into
    consecutive batches of batch_tokens (across sequence boundaries; the shorter tail
    dropped unless it is the only batch); per batch, over ALL latents, A = mean_j var(mean_t
    q_tj), B = mean_j mean_t var(q_tj); the paper's A/B = 1 / mean_b(B_b / A_b)."""
    q_NLJ = logged_q(a_STLJ, mask_ST)
    n_tokens, _, n_latents = q_NLJ.shape
    starts = list(range(0, n_tokens, batch_tokens))
    batches = [q_NLJ[s:s + batch_tokens] for s in starts]
    if n_tokens >= batch_tokens:
        batches = [b for b in batches if len(b) == batch_tokens]
    a_b, b_b = [], []
    for q in batches:
        T = len(q)
        a_b.append(np.mean([var_of(q[:, :, j].sum(0) / T) for j in range(n_latents)]))
        b_b.append(np.mean([sum(var_of(q[i, :, j]) for i in range(T)) / T
                            for j in range(n_latents)]))
    rel = np.mean([b / a for a, b in zip(a_b, b_b, strict=True) if a != 0])
    return dict(t=[len(q) for q in batches], a=a_b, b=b_b, n_batches=len(batches),
                var_aggregated=np.mean(a_b), var_token=np.mean(b_b), rel_var=rel,
                ratio=1 / rel)


def count_weighted(a_STLJ: np.ndarray, mask_ST: np.ndarray) -> dict:
    """SPEC 5's count-weighted statistics per latent: every active token counts 1."""
    q_NLJ = logged_q(a_STLJ, mask_ST)
    active_NJ = q_NLJ.sum(axis=1) > 0
    idx = np.arange(q_NLJ.shape[1], dtype=np.float64)[None, :, None]
    e_NJ = (idx * q_NLJ).sum(1)
    v_NJ = (idx**2 * q_NLJ).sum(1) - e_NJ**2
    n_J = active_NJ.sum(0)
    live = n_J > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled_LJ = q_NLJ.sum(0) / n_J  # the token-averaged distribution
        expected = (idx[0] * pooled_LJ).sum(0)
        layer_var = (idx[0] ** 2 * pooled_LJ).sum(0) - expected**2
        token_var = np.where(active_NJ, v_NJ, 0.0).sum(0) / n_J
    return dict(live=live, n_tokens=n_J, expected_layer=expected, layer_var=layer_var,
                token_var=token_var,
                ratio=layer_var[live].mean() / token_var[live].mean(),
                single_layer_share=((a_STLJ[mask_ST] > 0).sum(1) == 1).sum() / active_NJ.sum())


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    # 8 sequences of 9 positions, ~7 logged each (position 0 and ~15% masked): batches of
    # 8 or 16 tokens cut through sequences, and the parts (2 sequences each) too.
    a, mask = random_activations(seed=5, n_seq=8, seq_len=9, n_layers=4, n_latents=14)
    write_dense(root, "ref-a", [1, 2, 4, 7], a, mask)
    # An autoencoder with no logged latents (as the report's single-layer baselines).
    write_sae_record(root, SaeRecord(sae_id="not-logged", model="synthetic", d_model=4,
                                     n_latents=8, expansion_factor=2, k=2, layers=[3]))
    con = wh.connect(root)
    yield root, con, a, mask
    con.close()


@pytest.mark.parametrize("batch_tokens", [8, 16, 2048])
def test_pooled_reference_matches_numpy(tables, batch_tokens):
    _, con, a, mask = tables
    want = pooled_reference(a, mask, batch_tokens)
    n_logged = int(mask.sum())
    per_seq = mask.sum(1)
    if batch_tokens < n_logged:  # the cut falls inside sequences, not only between them
        edges = np.cumsum(per_seq)[:-1]
        assert any(e % batch_tokens for e in edges)
        assert want["n_batches"] == n_logged // batch_tokens >= 2
    else:  # fewer tokens than one batch: the one batch of all of them
        assert want["t"] == [n_logged]
    batches = con.execute(
        "SELECT batch, t, a, b FROM reference_batches_from(token_latent_moments, tokens, "
        f"batch_tokens := {batch_tokens}) WHERE sae_id = 'ref-a' ORDER BY batch").fetchall()
    assert [r[1] for r in batches] == want["t"]
    np.testing.assert_allclose([r[2] for r in batches], want["a"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose([r[3] for r in batches], want["b"], rtol=1e-10, atol=1e-14)
    row = wh.query_dicts(con, "SELECT * FROM reference_variant_of(latents, tokens, "
                              f"batch_tokens := {batch_tokens}) WHERE sae_id = 'ref-a'")[0]
    assert row["ref_batch_tokens"] == batch_tokens
    assert row["ref_n_batches"] == want["n_batches"]
    for column, key in [("ref_var_aggregated", "var_aggregated"), ("ref_var_token", "var_token"),
                        ("ref_rel_var", "rel_var"), ("ref_ratio", "ratio")]:
        assert row[column] == pytest.approx(want[key], rel=1e-10), column


def test_pooled_reference_of_a_subset(tables):
    """The macro over filtered relations (tokens filtered alike) = numpy on that subset."""
    _, con, a, mask = tables
    keep = [1, 2, 3]
    want = pooled_reference(a[keep], mask[keep], 8)
    row = wh.query_dicts(con, "WITH l AS (FROM latents WHERE seq_id BETWEEN 1 AND 3), "
                              "t AS (FROM tokens WHERE seq_id BETWEEN 1 AND 3) "
                              "FROM reference_variant_of(l, t, batch_tokens := 8) "
                              "WHERE sae_id = 'ref-a'")[0]
    assert row["ref_n_batches"] == want["n_batches"]
    assert row["ref_ratio"] == pytest.approx(want["ratio"], rel=1e-10)


def test_count_weighted_stats_match_numpy(tables):
    _, con, a, mask = tables
    want = count_weighted(a, mask)
    got = con.sql("SELECT * FROM count_weighted_stats WHERE sae_id = 'ref-a' "
                  "ORDER BY latent").pl()
    live = np.nonzero(want["live"])[0]
    assert got["latent"].to_list() == live.tolist()
    assert got["n_tokens"].to_list() == want["n_tokens"][live].tolist()
    for column in ("expected_layer", "layer_var", "token_var"):
        np.testing.assert_allclose(got[column].to_numpy(), want[column][live], rtol=1e-10,
                                   atol=1e-13, err_msg=column)
    # Latent 0 fires at one layer only: its variances are exactly 0, not rounding noise.
    zero = got.filter(pl.col("latent") == 0).row(0, named=True)
    assert zero["layer_var"] == 0.0 and zero["token_var"] == 0.0


def test_variance_ratios_side_by_side(tables):
    _, con, a, mask = tables
    rows = wh.query_dicts(con, "SELECT * FROM variance_ratios")
    assert [r["sae_id"] for r in rows] == ["ref-a"]  # nothing for an SAE without latents
    row = rows[0]
    summary = wh.query_dicts(con, "SELECT ratio_token FROM variance_summary "
                                  "WHERE sae_id = 'ref-a'")[0]
    spread = wh.query_dicts(con, "SELECT fraction FROM token_layer_spread "
                                 "WHERE sae_id = 'ref-a' AND n_layers = 1")[0]
    counted = count_weighted(a, mask)
    assert row["ratio_mass"] == pytest.approx(summary["ratio_token"], rel=1e-12)
    assert row["single_layer_share"] == pytest.approx(spread["fraction"], rel=1e-12)
    assert row["single_layer_share"] == pytest.approx(counted["single_layer_share"], rel=1e-12)
    assert row["ratio_count"] == pytest.approx(counted["ratio"], rel=1e-10)
    reference = pooled_reference(a, mask, 2048)
    assert row["ref_ratio"] == pytest.approx(reference["ratio"], rel=1e-10)
    assert row["ref_batch_tokens"] == 2048 and row["ref_n_batches"] == 1


def test_variance_summary_says_not_logged(tables):
    """An SAE whose latents are not logged has NULL n_live (not 0 live latents), 0 tokens."""
    root, con, a, mask = tables
    sql = wh.query_dicts(con, "SELECT * FROM variance_summary ORDER BY sae_id")
    by_id = {r["sae_id"]: r for r in sql}
    assert by_id["not-logged"]["n_tokens"] == 0
    assert by_id["not-logged"]["n_live"] is None
    assert by_id["not-logged"]["ref_n_sequences"] is None
    assert by_id["not-logged"]["mean_layer_var"] is None
    assert by_id["ref-a"]["n_tokens"] == int(mask.sum())
    assert by_id["ref-a"]["n_live"] == int((a.sum((0, 1, 2)) > 0).sum())
    polars = ap.variance_summary(root).sort("sae_id").collect()
    assert polars.columns == list(sql[0])
    assert polars["n_tokens"].to_list() == [r["n_tokens"] for r in sql]
    assert polars["n_live"].to_list() == [r["n_live"] for r in sql]
    assert polars["ref_n_sequences"].to_list() == [r["ref_n_sequences"] for r in sql]
