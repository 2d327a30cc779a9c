"""mlsae.statistics and mlsae.figures on synthetic data: the statistics are right, the PNGs
exist and are not blank."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from matplotlib.image import imread

from mlsae import figures, statistics


def assert_png(path, min_side: int = 200) -> None:
    assert path.exists(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert min(image.shape[:2]) >= min_side
    assert image[..., :3].std() > 0.01, "figure is blank"
    # No temporary files left beside it.
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_figures_module_does_not_import_prefect_or_pyplot():
    from pathlib import Path

    source = Path(figures.__file__).read_text()
    assert "prefect" not in source and "import matplotlib.pyplot" not in source
    # Plotting only: the statistics live in mlsae.statistics.
    assert not any(hasattr(figures, name) for name in (
        "residual_similarity", "mmcs", "mmcs_between", "decoder_rows", "layer_distribution",
        "residual_sample", "prompt_activations", "prompt_distribution"))


def test_residual_similarity_known_values():
    rng = np.random.default_rng(0)
    base_ND = rng.normal(size=(500, 16))
    # Layer 1 = layer 0 + a constant offset (removed by mean subtraction): cos 1.
    # Layer 2 independent noise: cos ~ 0.
    acts_NLD = np.stack([base_ND, base_ND + 5.0, rng.normal(size=(500, 16))], axis=1)
    stats = statistics.residual_similarity(acts_NLD)
    assert stats.adjacent_cos_L1.shape == (2,)
    assert stats.mean_norm_L.shape == (3,)
    assert stats.adjacent_cos_L1[0] == pytest.approx(1.0, abs=1e-9)
    assert abs(stats.adjacent_cos_L1[1]) < 0.1
    assert stats.mean_norm_L[1] > stats.mean_norm_L[0]
    with pytest.raises(ValueError, match="shape"):
        statistics.residual_similarity(np.zeros((4, 16)))


def test_mmcs_within_and_between():
    eye = np.eye(8)
    assert statistics.mmcs(eye) == pytest.approx(0.0)
    # Duplicated directions: every latent has a twin.
    assert statistics.mmcs(np.concatenate([eye, 3 * eye])) == pytest.approx(1.0)
    assert statistics.mmcs_between(eye, -eye[::-1] * 2 + 0) == pytest.approx(0.0, abs=1e-6)
    assert statistics.mmcs_between(eye[:4], eye) == pytest.approx(1.0)
    # Chunking gives the same answer as one block.
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(300, 12))
    assert statistics.mmcs(dirs, chunk=7) == pytest.approx(statistics.mmcs(dirs, chunk=1000), rel=1e-6)
    with pytest.raises(ValueError, match="different spaces"):
        statistics.mmcs_between(np.eye(3), np.eye(4))


def test_layer_distribution_sorts_by_expected_layer():
    # latent 7: all mass at layer 2; latent 3: half at 0 and 1; latent 5: no mass (dropped).
    dist = statistics.layer_distribution(
        latent=[7, 3, 3, 5], layer=[2, 0, 1, 0], mass=[4.0, 1.0, 1.0, 0.0], n_layers=3)
    assert dist.latent_J.tolist() == [3, 7]
    np.testing.assert_allclose(dist.p_JL, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(dist.expected_layer_J, [0.5, 2.0])
    with pytest.raises(ValueError, match="0..2"):
        statistics.layer_distribution([1], [3], [1.0], n_layers=3)


def test_prompt_distribution_is_the_prompt_heatmap_view():
    """The prompt's p_sj(l) comes from sql/prompt_heatmap.sql; it equals a direct numpy
    transcription (pooled mass per layer, latents with max activation < threshold left out,
    sorted by expected layer then id)."""
    rng = np.random.default_rng(4)
    n, n_layers, threshold = 400, 4, 0.3
    acts = statistics.PromptActivations(
        tokens=["t"] * 12, layer_idx=rng.integers(0, n_layers, n), latent=rng.integers(0, 60, n),
        value=rng.uniform(0, 0.5, n).astype(np.float32), pos=rng.integers(0, 12, n))
    got = statistics.prompt_distribution(acts, n_layers, threshold=threshold)
    peak = {j: acts.value[acts.latent == j].max() for j in np.unique(acts.latent)}
    keep = np.array([peak[j] >= threshold for j in acts.latent])
    assert 0 < keep.sum() < n  # the threshold drops some latents and keeps others
    want = statistics.layer_distribution(acts.latent[keep], acts.layer_idx[keep],
                                         acts.value[keep].astype(np.float64), n_layers)
    assert got.latent_J.tolist() == want.latent_J.tolist()
    np.testing.assert_allclose(got.p_JL, want.p_JL, rtol=1e-6)
    np.testing.assert_allclose(got.expected_layer_J, want.expected_layer_J, rtol=1e-6)
    empty = statistics.prompt_distribution(
        statistics.PromptActivations([], np.zeros(0), np.zeros(0), np.zeros(0)), n_layers)
    assert empty.p_JL.shape == (0, n_layers)


def _synthetic_distribution(n_latents=600, n_layers=6, seed=0):
    rng = np.random.default_rng(seed)
    latent = np.repeat(np.arange(n_latents), n_layers)
    layer = np.tile(np.arange(n_layers), n_latents)
    centre = rng.uniform(0, n_layers - 1, size=n_latents).repeat(n_layers)
    mass = np.exp(-((layer - centre) ** 2)) * rng.uniform(0.5, 2, size=latent.size)
    return statistics.layer_distribution(latent, layer, mass, n_layers)


def test_every_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    curves = {
        "6 layers": statistics.residual_similarity(rng.normal(size=(200, 6, 32)).cumsum(axis=1)),
        "3 layers": statistics.residual_similarity(rng.normal(size=(200, 3, 32)).cumsum(axis=1)),
    }
    dist = _synthetic_distribution()
    paths = [
        figures.plot_residual_similarity(curves, tmp_path / "fig1.png"),
        figures.plot_layer_heatmap(dist, tmp_path / "fig2.png", "all tokens"),
        figures.plot_layer_heatmap(dist, tmp_path / "fig3.png", statistics.FIG3_PROMPT, max_latents=100),
        figures.plot_expected_layer_histogram(dist.expected_layer_J, 6, tmp_path / "hist.png"),
        figures.plot_layer_std_by_config(["R2 k4", "R4 k8", "R4 k8 lens"], [0.6, 0.5, 0.7],
                                         [0.2, 0.3, 0.1], tmp_path / "std.png"),
        figures.plot_metrics_vs_baselines(
            list(range(6)), {"fvu": rng.uniform(0.1, 0.4, 6), "delta_ce": rng.uniform(0, 1, 6)},
            {"fvu": rng.uniform(0.1, 0.4, 6), "delta_ce": [np.nan, *rng.uniform(0, 1, 5)]},
            tmp_path / "metrics.png"),
        figures.plot_metrics_vs_baselines([0, 1], {"fvu": [0.2, 0.3]}, None, tmp_path / "fvu_only.png"),
        figures.plot_mmcs(["MLSAE (within)", "MLSAE vs layer 0"], [0.41, 0.63], tmp_path / "mmcs.png"),
    ]
    for path in paths:
        assert_png(path)


def test_empty_heatmap_still_draws(tmp_path):
    empty = statistics.layer_distribution([], [], [], n_layers=4)
    path = figures.plot_layer_heatmap(empty, tmp_path / "empty.png", "nothing fired")
    assert path.exists() and path.stat().st_size > 1000


def test_plots_are_thread_safe(tmp_path):
    # A sweep draws from several threads at once; no pyplot state to race on.
    dist = _synthetic_distribution(n_latents=200)
    errors: list[BaseException] = []

    def draw(i: int) -> None:
        try:
            figures.plot_layer_heatmap(dist, tmp_path / f"t{i}.png", f"thread {i}")
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert_png(tmp_path / f"t{i}.png")
