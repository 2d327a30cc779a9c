"""Every sql/ view against a dense float64 numpy transcription of SPEC 5, on random
sparse activations written through the real logger (mlsae.latents.write_latents)
into real Parquet, read by real DuckDB; and the Polars versions against the SQL."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mlsae import analysis_polars as ap
from mlsae import warehouse as wh
from mlsae.latents import LatentLogConfig, SaeRecord, write_latents
from mlsae.part_sums import ON_THE_FLY

THRESHOLD = 1e-3


# --------------------------------------------------------------------------- data

def random_activations(seed: int, n_seq: int, seq_len: int, n_layers: int, n_latents: int):
    """Dense a[s, t, l, j] >= 0 (already rounded as stored) and the token mask.

    Latent 0 fires at one layer only, latent 1 never, latent 2 at one (token, layer)
    only, latent 3 only below the 1e-3 threshold; the rest at random (layer, token)s.
    """
    rng = np.random.default_rng(seed)
    a = rng.exponential(1.0, (n_seq, seq_len, n_layers, n_latents))
    a *= rng.random(a.shape) < 0.3
    a[..., 0] = 0.0
    a[:, ::2, n_layers // 2, 0] = rng.exponential(1.0, (n_seq, (seq_len + 1) // 2))
    a[..., 1] = 0.0
    a[..., 2] = 0.0
    a[1, 3, n_layers - 1, 2] = 0.7
    a[..., 3] = np.where(a[..., 3] > 0, 5e-4, 0.0)
    mask = rng.random((n_seq, seq_len)) > 0.15
    mask[:, 0] = False  # a BOS-like token everywhere
    mask[1, 3] = True  # latent 2's only activation
    a[~mask] = 0.0  # masked tokens are not logged, so they do not exist for the reference
    a = wh.quantize_values(a.astype(np.float32).ravel()).reshape(a.shape).astype(np.float64)
    return a, mask


def write_dense(root, sae_id: str, layers: list[int], a: np.ndarray, mask: np.ndarray,
                config: LatentLogConfig | None = None, encoder_hook=None):
    """Log dense activations through write_latents (k = n_latents; zeros are dropped)."""
    n_seq, seq_len, n_layers, n_latents = a.shape
    record = SaeRecord(sae_id=sae_id, model="synthetic", d_model=4, n_latents=n_latents,
                       expansion_factor=n_latents // 4, k=n_latents, layers=layers)
    tokens = (np.arange(n_seq * seq_len).reshape(n_seq, seq_len) * 7 + 3) % 50
    tokens[:, 0] = 1000 + np.arange(n_seq)  # names the sequence (and is masked)

    def encode(tokens_BT, mask_BT):
        if encoder_hook is not None:
            encoder_hook(tokens_BT)
        rows = tokens_BT[:, 0] - 1000
        acts = a[rows][mask_BT].astype(np.float32)
        idx = np.broadcast_to(np.arange(n_latents), acts.shape)
        return acts, idx

    return write_latents(root, record, zip(tokens, mask, strict=True), encode, lambda i: f" t{i}",
                         {"test": sae_id}, config or LatentLogConfig(sequences_per_part=2,
                                                                     batch_size=1),
                         progress_log=lambda _: None)


# --------------------------------------------------------------------------- numpy SPEC 5

def spec5(a: np.ndarray, mask: np.ndarray) -> dict:
    """Dense float64 transcription of SPEC 5 (layer index l = 0..L-1)."""
    n_seq, seq_len, n_layers, n_latents = a.shape
    idx = np.arange(n_layers, dtype=np.float64)[:, None]
    mass_LJ = a.sum((0, 1))
    count_LJ = (a > 0).sum((0, 1))
    mass_J = mass_LJ.sum(0)
    live = mass_J > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p_LJ = mass_LJ / mass_J
        e_J = (idx * p_LJ).sum(0)
        v_J = (idx**2 * p_LJ).sum(0) - e_J**2
        m_STJ = a.sum(2)
        p_STLJ = a / m_STJ[:, :, None, :]
        e_STJ = (idx * p_STLJ).sum(2)
        v_STJ = (idx**2 * p_STLJ).sum(2) - e_STJ**2
        v_STJ = np.where(m_STJ > 0, v_STJ, 0.0)
        token_var = (m_STJ * v_STJ).sum((0, 1)) / mass_J
        between = (m_STJ * np.where(m_STJ > 0, e_STJ - e_J, 0.0) ** 2).sum((0, 1)) / mass_J
        m_SJ = a.sum((1, 2))
        p_SLJ = a.sum(1) / m_SJ[:, None, :]
        e_SJ = (idx * p_SLJ).sum(1)
        v_SJ = np.where(m_SJ > 0, (idx**2 * p_SLJ).sum(1) - e_SJ**2, 0.0)
        prompt_var = (m_SJ * v_SJ).sum(0) / mass_J
    std_J = np.sqrt(np.maximum(v_J, 0))
    return dict(
        live=live, count_LJ=count_LJ, mass_LJ=mass_LJ, p_LJ=p_LJ, mass=mass_J, count=count_LJ.sum(0),
        expected_layer=e_J, layer_var=v_J, layer_std=std_J, relative_std=std_J / n_layers,
        token_var=token_var, prompt_var=prompt_var, between=between,
        n_live=int(live.sum()), mean_layer_var=v_J[live].mean(),
        mean_token_var=token_var[live].mean(), mean_prompt_var=prompt_var[live].mean(),
        mean_layer_std=std_J[live].mean(), std_layer_std=std_J[live].std(),
        mean_relative_std=(std_J / n_layers)[live].mean(),
    )


def reference_variant(a: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """SPEC 5's reference-code variant, transcribed literally: per sequence s of T tokens,
    over all n latents, q_tj(l) = p_tj(l) if j is active at t else 0."""
    n_seq, seq_len, n_layers, n_latents = a.shape
    idx = np.arange(n_layers, dtype=np.float64)

    def var(q_L):  # applied even when q does not sum to 1
        return (idx**2 * q_L).sum() - ((idx * q_L).sum()) ** 2

    a_s, b_s, ratio_s = [], [], []
    for s in range(n_seq):
        tokens = [t for t in range(seq_len) if mask[s, t]]
        T = len(tokens)
        q = np.zeros((T, n_layers, n_latents))
        for i, t in enumerate(tokens):
            for j in range(n_latents):
                m = a[s, t, :, j].sum()
                if m > 0:
                    q[i, :, j] = a[s, t, :, j] / m
        A = np.mean([var(q[:, :, j].sum(0) / T) for j in range(n_latents)])
        B = np.mean([sum(var(q[i, :, j]) for i in range(T)) / T for j in range(n_latents)])
        a_s.append(A)
        b_s.append(B)
        if A != 0:
            ratio_s.append(B / A)
    return float(np.mean(a_s)), float(np.mean(b_s)), float(np.mean(ratio_s))


# --------------------------------------------------------------------------- fixtures

SAES = {
    # sae_id: (layers = model blocks, shape (S, T, L, n), seed); blocks 1, 2, 4, 7 make the
    # block -> index map non-affine, so a view using block numbers would fail.
    "sae-a": ([1, 2, 4, 7], (5, 9, 4, 14), 0),
    "sae-b": ([0, 1, 2], (3, 7, 3, 10), 1),
}


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    root = tmp_path_factory.mktemp("wh")
    data = {}
    for sae_id, (layers, shape, seed) in SAES.items():
        a, mask = random_activations(seed, *shape)
        write_dense(root, sae_id, layers, a, mask)
        data[sae_id] = (a, mask, layers)
    return root, data


@pytest.fixture(scope="module")
def con(warehouse):
    con = wh.connect(warehouse[0])
    yield con
    con.close()


def frame(con, sql: str) -> pl.DataFrame:
    return pl.from_arrow(con.sql(sql).to_arrow_table())


def close(actual, expected, rtol=1e-12, atol=1e-12):
    np.testing.assert_allclose(np.asarray(actual, float), np.asarray(expected, float),
                               rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("sae_id", SAES)
def test_latent_layers_matches_spec(con, warehouse, sae_id):
    a, mask, layers = warehouse[1][sae_id]
    ref = spec5(a, mask)
    got = frame(con, f"SELECT * FROM latent_layers WHERE sae_id = '{sae_id}'")
    nz_l, nz_j = np.nonzero(ref["count_LJ"])
    assert got.height == len(nz_l)
    got = got.sort("latent", "layer_idx")
    order = np.lexsort((nz_l, nz_j))
    nz_l, nz_j = nz_l[order], nz_j[order]
    assert got["latent"].to_list() == nz_j.tolist()
    assert got["layer_idx"].to_list() == nz_l.tolist()
    assert got["layer"].to_list() == [layers[i] for i in nz_l]
    assert got["count"].to_list() == ref["count_LJ"][nz_l, nz_j].tolist()
    close(got["mass"], ref["mass_LJ"][nz_l, nz_j])
    close(got["p"], ref["p_LJ"][nz_l, nz_j])


@pytest.mark.parametrize("sae_id", SAES)
def test_latent_stats_matches_spec(con, warehouse, sae_id):
    a, mask, _ = warehouse[1][sae_id]
    ref = spec5(a, mask)
    got = frame(con, f"SELECT * FROM latent_stats WHERE sae_id = '{sae_id}' ORDER BY latent")
    live = np.nonzero(ref["live"])[0]
    assert got["latent"].to_list() == live.tolist()
    assert 1 not in live and 0 in live and 2 in live
    for column in ("count", "mass", "expected_layer", "layer_var", "layer_std", "relative_std",
                   "token_var", "prompt_var"):
        close(got[column], ref[column][live], rtol=1e-10, atol=1e-12)
    single = got.filter(pl.col("latent") == 0).row(0, named=True)
    assert single["layer_var"] == 0.0 and single["token_var"] == 0.0
    assert single["prompt_var"] == 0.0 and single["n_layers_active"] == 1
    once = got.filter(pl.col("latent") == 2).row(0, named=True)
    assert once["count"] == 1 and once["layer_var"] == 0.0


@pytest.mark.parametrize("sae_id", SAES)
def test_law_of_total_variance(con, warehouse, sae_id):
    a, mask, _ = warehouse[1][sae_id]
    ref = spec5(a, mask)
    got = frame(con, f"SELECT * FROM latent_stats WHERE sae_id = '{sae_id}' ORDER BY latent")
    live = np.nonzero(ref["live"])[0]
    between = ref["between"][live]
    # V_j = Vtok_j + sum_t (m_tj / M_j)(E_tj - E_j)^2, to 1e-9 relative
    close(got["layer_var"], got["token_var"].to_numpy() + between, rtol=1e-9, atol=1e-13)
    assert (got["token_var"] <= got["prompt_var"] + 1e-12).all()
    assert (got["prompt_var"] <= got["layer_var"] + 1e-12).all()


@pytest.mark.parametrize("sae_id", SAES)
def test_variance_summary_matches_spec_and_reference(con, warehouse, sae_id):
    a, mask, _ = warehouse[1][sae_id]
    ref = spec5(a, mask)
    row = frame(con, f"SELECT * FROM variance_summary WHERE sae_id = '{sae_id}'").row(0, named=True)
    assert row["n_latents"] == a.shape[3]
    assert row["n_live"] == ref["n_live"]
    for column in ("mean_layer_var", "mean_token_var", "mean_prompt_var", "mean_layer_std",
                   "std_layer_std", "mean_relative_std"):
        close(row[column], ref[column], rtol=1e-10)
    close(row["ratio_token"], ref["mean_layer_var"] / ref["mean_token_var"], rtol=1e-10)
    close(row["ratio_prompt"], ref["mean_layer_var"] / ref["mean_prompt_var"], rtol=1e-10)
    A, B, ratio = reference_variant(a, mask)
    assert row["ref_n_sequences"] == a.shape[0]
    close(row["ref_var_aggregated"], A, rtol=1e-10)
    close(row["ref_var_token"], B, rtol=1e-10)
    close(row["ref_rel_var"], ratio, rtol=1e-10)
    # consistent with latent_stats
    stats = frame(con, f"SELECT * FROM latent_stats WHERE sae_id = '{sae_id}'")
    close(row["mean_token_var"], stats["token_var"].mean(), rtol=1e-12)


def test_latent_heatmap_sorted_by_expected_layer(con, warehouse):
    a, mask, layers = warehouse[1]["sae-a"]
    ref = spec5(a, mask)
    got = frame(con, "SELECT * FROM latent_heatmap WHERE sae_id = 'sae-a' ORDER BY rank, layer_idx")
    live = np.nonzero(ref["live"])[0]
    order = live[np.lexsort((live, ref["expected_layer"][live]))]
    n_layers = len(layers)
    assert got.height == len(live) * n_layers
    assert got["latent"].to_list()[::n_layers] == order.tolist()
    close(got["p"], np.nan_to_num(ref["p_LJ"][:, order].T.ravel()))
    assert got["layer"].to_list()[:n_layers] == layers


def test_prompt_heatmap(con, warehouse):
    a, mask, layers = warehouse[1]["sae-a"]
    seq = 1
    a_TLJ = a[seq]
    m_LJ = a_TLJ.sum(0)
    keep = np.nonzero(a_TLJ.max((0, 1)) >= THRESHOLD)[0]
    assert 3 not in keep  # only ever below threshold
    p = m_LJ[:, keep] / m_LJ[:, keep].sum(0)
    e = (np.arange(len(layers))[:, None] * p).sum(0)
    order = np.lexsort((keep, e))
    got = frame(con, f"SELECT * FROM prompt_heatmap('sae-a', {seq})")
    assert got["latent"].to_list()[::len(layers)] == keep[order].tolist()
    close(got["p"], p[:, order].T.ravel())
    close(got["expected_layer"].to_numpy()[::len(layers)], e[order])


def test_layer_stats_l0(con, warehouse):
    a, mask, layers = warehouse[1]["sae-a"]
    got = frame(con, "SELECT * FROM layer_stats WHERE sae_id = 'sae-a' ORDER BY layer_idx")
    n_tokens = mask.sum()
    assert got["n_tokens"].to_list() == [n_tokens] * len(layers)
    close(got["l0"], (a > THRESHOLD).sum((0, 1, 3)) / n_tokens)
    assert got["n_active"].to_list() == (a > 0).sum((0, 1, 3)).tolist()
    assert got["eval_l0"].is_null().all()


def test_dead_latents(con, warehouse):
    a, _, _ = warehouse[1]["sae-a"]
    dead = frame(con, "SELECT * FROM dead_latents() WHERE sae_id = 'sae-a'")
    assert sorted(dead["latent"].to_list()) == [1, 3]  # never fires / only below 1e-3
    assert dead.filter(pl.col("latent") == 3)["count"].item() == (a[..., 3] > 0).sum()
    rare = frame(con, "SELECT * FROM dead_latents(max_frequency := 0.01) WHERE sae_id = 'sae-a'")
    assert 2 in rare["latent"].to_list()  # fired once
    everything = frame(con, "SELECT * FROM dead_latents(max_frequency := 1.0)")
    assert everything.height == sum(shape[3] for _, shape, _ in SAES.values())


def test_top_contexts(con, warehouse):
    a, mask, layers = warehouse[1]["sae-a"]
    got = frame(con, "SELECT * FROM top_contexts(n := 2, width := 1) "
                     "WHERE sae_id = 'sae-a' AND latent = 5 ORDER BY layer, rank")
    for layer_idx, block in enumerate(layers):
        values = np.sort(a[:, :, layer_idx, 5][a[:, :, layer_idx, 5] > 0])[::-1][:2]
        rows = got.filter(pl.col("layer") == block)
        close(rows["value"], values)
        for row in rows.iter_rows(named=True):
            s, t = row["seq_id"], row["pos"]
            assert a[s, t, layer_idx, 5] == pytest.approx(row["value"])
            assert f"[[{row['token']}]]" in row["context"]
            assert row["context"].count(" t") == mask[s, max(0, t - 1):t + 2].sum()


@pytest.mark.parametrize("view", ["latent_layers", "latent_stats", "variance_summary"])
def test_polars_matches_sql(con, warehouse, view):
    key = {"latent_layers": ["sae_id", "latent", "layer"], "latent_stats": ["sae_id", "latent"],
           "variance_summary": ["sae_id"]}[view]
    sql = frame(con, f"SELECT * FROM {view}").sort(key)
    polars = getattr(ap, view)(warehouse[0]).collect().sort(key)
    assert polars.columns == sql.columns
    assert polars.height == sql.height
    for column in sql.columns:
        if sql[column].dtype.is_float():
            close(polars[column], sql[column], rtol=1e-12, atol=1e-15)
        else:
            assert polars[column].cast(pl.String).to_list() == sql[column].cast(pl.String).to_list()


def test_empty_warehouse_has_every_view(tmp_path):
    con = wh.connect(tmp_path)
    for view in ("latent_layers", "latent_stats", "variance_summary", "latent_heatmap",
                 "layer_stats", "latent_seq_moments"):
        assert con.execute(f"SELECT count(*) FROM {view}").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM dead_latents()").fetchone() == (0,)
    assert ap.latent_stats(tmp_path).collect().height == 0


# --------------------------------------------------------------------------- stored sums

KEYS = {"latent_layers": ["sae_id", "latent", "layer"], "latent_stats": ["sae_id", "latent"],
        "variance_summary": ["sae_id"]}


def assert_frames_close(got: pl.DataFrame, want: pl.DataFrame, rtol: float) -> None:
    assert got.columns == want.columns
    assert got.height == want.height
    for column in want.columns:
        if want[column].dtype.is_float():
            close(got[column], want[column], rtol=rtol, atol=1e-15)
        else:
            assert got[column].cast(pl.String).to_list() == want[column].cast(pl.String).to_list()


def test_views_read_sums_of_several_parts(warehouse):
    root = warehouse[0]
    for sae_id in SAES:
        latents = sorted(p.name for p in wh.partition_dir(root, "latents", sae_id).glob("*.parquet"))
        assert len(latents) > 1
        for table in wh.PART_SUM_TABLES:
            assert sorted(p.name for p in wh.partition_dir(root, table, sae_id).glob("*.parquet")) \
                == latents


@pytest.mark.parametrize("view", list(ON_THE_FLY))
def test_stored_sums_equal_the_on_the_fly_sql(con, view):
    """The views (per-part sums stored at logging time) = the same macros over the raw rows."""
    stored = frame(con, f"SELECT * FROM {view}").sort(KEYS[view])
    on_the_fly = frame(con, ON_THE_FLY[view]).sort(KEYS[view])
    assert_frames_close(stored, on_the_fly, rtol=1e-9)
    assert stored.schema == on_the_fly.schema


def test_on_the_fly_macros_on_a_filtered_subset(con, warehouse):
    """The documented ad-hoc path: the macros over a subset of sequences = SPEC 5 on it."""
    a, mask, _ = warehouse[1]["sae-a"]
    keep = [0, 2, 3]
    sub_a, sub_mask = a[keep], mask[keep]
    ref = spec5(sub_a, sub_mask)
    where = f"sae_id = 'sae-a' AND seq_id IN {tuple(keep)}"
    stats = frame(con, f"WITH m AS (FROM latent_seq_moments WHERE {where}) "
                       "FROM latent_stats_of(m) ORDER BY latent")
    live = np.nonzero(ref["live"])[0]
    assert stats["latent"].to_list() == live.tolist()
    for column in ("count", "mass", "layer_var", "token_var", "prompt_var"):
        close(stats[column], ref[column][live], rtol=1e-10, atol=1e-12)
    row = frame(con, f"WITH m AS MATERIALIZED (FROM latent_seq_moments WHERE {where}), "
                     f"tok AS (FROM tokens WHERE {where}), st AS (FROM latent_stats_of(m)), "
                     "ss AS (FROM seq_sums_of(m, tok)) "
                     "FROM variance_summary_of(st, ss) WHERE sae_id = 'sae-a'").row(0, named=True)
    A, B, ratio = reference_variant(sub_a, sub_mask)
    assert row["ref_n_sequences"] == len(keep) and row["n_live"] == ref["n_live"]
    close(row["mean_token_var"], ref["mean_token_var"], rtol=1e-10)
    close([row["ref_var_aggregated"], row["ref_var_token"], row["ref_rel_var"]], [A, B, ratio],
          rtol=1e-10)
