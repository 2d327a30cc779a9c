"""The paper's figures (SPEC section 5) as PNG files, from plain arrays.

Every `plot_*` function takes numpy arrays (or lists) and a path, writes one PNG
atomically and returns the path. Only drawing lives here: the numbers come from
the SQL views or from mlsae.statistics (residual similarity, MMCS, p_j(l)).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot,
no global state), so several threads of a sweep can draw at once and no
display is ever needed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlsae.statistics import LayerDistribution, ResidualSimilarity

DPI = 120


# -- drawing ------------------------------------------------------------------------------


def _new_figure(width: float = 6.4, height: float = 4.0, ncols: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write the PNG next to its final name, then rename: never a half-written figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _relative_layers(n: int, n_layers: int) -> np.ndarray:
    return np.arange(n) / max(n_layers - 1, 1)


def plot_residual_similarity(curves: dict[str, ResidualSimilarity], path: str | os.PathLike) -> Path:
    """SPEC Fig. 1: adjacent-layer cosine similarity vs l/(L-1), and mean norm per layer.

    `curves` maps a label (model name) to its statistics; models of different
    depths share the relative-layer axis. The pair (l, l+1) is drawn at l/(L-1).
    """
    if not curves:
        raise ValueError("no curves to plot")
    fig, (ax_cos, ax_norm) = _new_figure(10, 4, ncols=2)
    for label, stats in curves.items():
        n_layers = len(stats.mean_norm_L)
        cos = np.asarray(stats.adjacent_cos_L1)
        ax_cos.plot(_relative_layers(len(cos), n_layers), cos, marker="o", label=label)
        ax_norm.plot(_relative_layers(n_layers, n_layers), stats.mean_norm_L, marker="o", label=label)
    ax_cos.set(xlabel="relative layer l / (L - 1)", ylabel="mean cos(x_l, x_l+1), mean-centred",
               title="Adjacent-layer similarity", xlim=(-0.05, 1.05))
    ax_norm.set(xlabel="relative layer l / (L - 1)", ylabel="mean ||x_l||", title="Residual norm")
    for ax in (ax_cos, ax_norm):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_layer_heatmap(dist: LayerDistribution, path: str | os.PathLike, title: str,
                       max_latents: int = 4096, layer_labels: Sequence[int] | None = None) -> Path:
    """SPEC Fig. 2/3: p_j(l) as an image, one row per latent sorted by expected layer.

    With more than `max_latents` rows an evenly spaced subset is drawn (the sort
    order, and so the shape of the picture, is kept). `layer_labels` names the
    columns (the model's block indices when the SAE reads a subset of blocks).
    """
    p_JL = np.asarray(dist.p_JL)
    n_rows, n_layers = p_JL.shape if p_JL.ndim == 2 else (0, 0)
    fig, ax = _new_figure(5, 6)
    if n_rows == 0:
        ax.text(0.5, 0.5, "no active latents", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        if n_rows > max_latents:
            p_JL = p_JL[np.linspace(0, n_rows - 1, max_latents).round().astype(int)]
        image = ax.imshow(p_JL, aspect="auto", interpolation="nearest", cmap="viridis",
                          vmin=0.0, vmax=1.0, extent=(-0.5, n_layers - 0.5, n_rows, 0))
        ax.set_xticks(range(n_layers), [str(x) for x in (layer_labels or range(n_layers))])
        ax.set(xlabel="layer l", ylabel=f"latent (sorted by expected layer; {n_rows:,} latents)")
        fig.colorbar(image, ax=ax, label="p_j(l)")
    ax.set_title(title, fontsize="medium")
    return _save(fig, path)


def plot_expected_layer_histogram(expected_layer_J: np.ndarray, n_layers: int,
                                  path: str | os.PathLike, title: str = "Expected layer of latents") -> Path:
    """Histogram of E_j over latents (bins of width 1/4 layer)."""
    values = np.asarray(expected_layer_J, dtype=np.float64)
    fig, ax = _new_figure()
    bins = np.linspace(0, max(n_layers - 1, 1), 4 * max(n_layers - 1, 1) + 1)
    ax.hist(values, bins=bins, color="tab:blue", edgecolor="white")
    ax.set(xlabel="expected layer E_j", ylabel="latents", title=title)
    ax.set_xticks(range(n_layers))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_layer_std_by_config(labels: Sequence[str], mean_std: Sequence[float], std_std: Sequence[float],
                             path: str | os.PathLike, relative: bool = False) -> Path:
    """Mean (bar) and std (error bar) over latents of the layer std, one bar per (model, R, k, lens)."""
    if not (len(labels) == len(mean_std) == len(std_std)):
        raise ValueError("labels, mean_std and std_std must have the same length")
    fig, ax = _new_figure(max(4.0, 1.0 + 0.8 * len(labels)), 4)
    x = np.arange(len(labels))
    ax.bar(x, mean_std, yerr=std_std, capsize=4, color="tab:orange")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize="small")
    ax.set(ylabel="relative layer std (std / L)" if relative else "layer std (layers)",
           title="Spread of latents over layers, by config")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


METRIC_AXES = {
    "fvu": ("FVU", "Reconstruction (FVU)"),
    "delta_ce": ("delta CE (nats)", "Downstream loss (delta CE)"),
    "kl": ("KL (nats)", "KL to the clean logits"),
    "dead_fraction": ("fraction of latents", "Dead latents"),
}
"""Per-layer metrics the comparison figure knows: name -> (axis label, panel title)."""


def plot_metrics_vs_baselines(layers: Sequence[int], mlsae: dict[str, Sequence[float]],
                              baselines: dict[str, Sequence[float]] | None,
                              path: str | os.PathLike, label: str = "MLSAE") -> Path:
    """Per-layer metrics of the MLSAE beside single-layer SAEs (one per layer), one panel
    per metric of METRIC_AXES present in `mlsae` (in that order).

    `mlsae` and `baselines` map a metric name ("fvu", "delta_ce", "kl", "dead_fraction")
    to one value per entry of `layers`; a missing value is NaN (drawn as a gap).
    """
    metrics = [m for m in METRIC_AXES if m in mlsae]
    if not metrics:
        raise ValueError(f"mlsae must hold per-layer values of one of {', '.join(METRIC_AXES)}")
    fig, axes = _new_figure(4.6 * len(metrics), 3.8, ncols=len(metrics))
    axes = np.atleast_1d(axes)
    x = np.asarray(layers)
    width = 0.4 if baselines else 0.8
    for ax, metric in zip(axes, metrics, strict=True):
        ax.bar(x - (width / 2 if baselines else 0), np.asarray(mlsae[metric], dtype=float), width,
               label=label)
        if baselines and metric in baselines:
            ax.bar(x + width / 2, np.asarray(baselines[metric], dtype=float), width,
                   label="single-layer SAE")
        ax.set_xticks(x)
        ylabel, title = METRIC_AXES[metric]
        ax.set(xlabel="layer", ylabel=ylabel, title=title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_training_curves(curves: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                         path: str | os.PathLike, highlight: Sequence[str] = ()) -> Path:
    """FVU and dead fraction against training tokens, one line per autoencoder.

    `curves` maps a label to (tokens, fvu, dead_fraction) per optimizer step;
    labels in `highlight` are drawn thick, the rest thin (e.g. the baselines).
    """
    if not curves:
        raise ValueError("no training curves to plot")
    from matplotlib import colormaps

    fig, (ax_fvu, ax_dead) = _new_figure(10, 4, ncols=2)
    palette = colormaps["tab20"]
    for i, (label, (tokens, fvu, dead)) in enumerate(curves.items()):
        main = label in highlight or not highlight
        style = dict(lw=2.0 if main else 0.8, alpha=1.0 if main else 0.7,
                     ls="-" if main else "--", color=palette(i % 20), label=label)
        x = np.asarray(tokens, dtype=float) / 1e6
        ax_fvu.plot(x, fvu, **style)
        ax_dead.plot(x, dead, **style)
    ax_fvu.set(xlabel="training tokens per layer (M)", ylabel="FVU (training batch)",
               title="Reconstruction during training", yscale="log")
    ax_dead.set(xlabel="training tokens per layer (M)", ylabel="fraction of latents",
                title="Dead latents during training")
    for ax in (ax_fvu, ax_dead):
        ax.grid(alpha=0.3)
    ax_fvu.legend(fontsize="x-small", ncol=2)
    return _save(fig, path)


def plot_variance_by_config(labels: Sequence[str], series: dict[str, Sequence[float]],
                            path: str | os.PathLike,
                            title: str = "Variance of the layer distributions") -> Path:
    """Grouped bars: one group per config, one bar per series (e.g. mean layer / prompt /
    token variance). Non-positive or missing values are left out. The axis starts at 0
    unless the values span more than 20x (then it is logarithmic), so bar heights never
    exaggerate small differences."""
    if not series or any(len(v) != len(labels) for v in series.values()):
        raise ValueError("every series needs one value per label")
    fig, ax = _new_figure(max(5.0, 1.2 + 1.1 * len(labels)), 4)
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    finite = []
    for i, (name, values) in enumerate(series.items()):
        v = np.asarray([np.nan if (y is None or not y > 0) else y for y in values], dtype=float)
        finite += [y for y in v if np.isfinite(y)]
        ax.bar(x - 0.4 + width * (i + 0.5), v, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize="small")
    log = bool(finite) and max(finite) > 20 * min(finite)
    ax.set(yscale="log" if log else "linear", ylabel="variance (layers^2)", title=title)
    if not log:
        ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_layers_active(labels: Sequence[str], fractions_CL: np.ndarray, path: str | os.PathLike,
                       title: str) -> Path:
    """Stacked bars: for each config, the fraction of items (latents, or token-latent
    pairs) active at 1, 2, ..., L layers."""
    f_CL = np.asarray(fractions_CL, dtype=float)
    if f_CL.ndim != 2 or f_CL.shape[0] != len(labels):
        raise ValueError("fractions_CL must have one row per label")
    fig, ax = _new_figure(max(5.0, 1.5 + 0.9 * len(labels)), 4)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for n in range(f_CL.shape[1]):
        ax.bar(x, f_CL[:, n], bottom=bottom, label=f"{n + 1} layer{'s' if n else ''}")
        bottom += f_CL[:, n]
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize="small")
    ax.set(ylabel="fraction", ylim=(0, 1), title=title)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_mmcs(labels: Sequence[str], values: Sequence[float], path: str | os.PathLike,
              title: str = "Mean max cosine similarity of decoder directions") -> Path:
    """One bar per comparison, e.g. "MLSAE (within)", "MLSAE vs layer-2 SAE"."""
    if len(labels) != len(values):
        raise ValueError("labels and values must have the same length")
    fig, ax = _new_figure(max(4.0, 1.0 + 0.9 * len(labels)), 4)
    x = np.arange(len(labels))
    ax.bar(x, values, color="tab:green")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize="small")
    ax.set(ylabel="MMCS", ylim=(0, 1), title=title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


RATIO_LABELS = {
    "ref_ratio": "reference A/B (the paper's statistic)",
    "ratio_count": "ours: count-weighted",
    "ratio_mass": "ours: mass-weighted",
}
"""The three variance ratios of sql/variance_ratios.sql, as the calibration plot names them."""


def plot_calibration(curves: dict[str, tuple[Sequence[float], dict[str, Sequence[float]]]],
                     marks: dict[str, tuple[float, dict[str, float]]], path: str | os.PathLike,
                     paper_ratio: float = 100.0) -> Path:
    """The calibration with known answers: each ratio of RATIO_LABELS (one colour each)
    against the share of single-layer token-latent pairs, one line style per synthetic
    family (`curves`: name -> (shares, {ratio: values})), and each measured autoencoder
    as a marker per ratio (`marks`: label -> (share, {ratio: value})). A dotted line at
    `paper_ratio` marks the paper's ~100, which only the reference A/B may be read against.
    Infinite, missing or non-positive values are left out (log axis)."""
    fig, ax = _new_figure(7.2, 7.4)
    colours = {"ref_ratio": "C3", "ratio_count": "C2", "ratio_mass": "C0"}  # red = the paper's
    styles = ["-", "--", ":", "-."]

    def finite(xs: Sequence[float], ys: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(xs, dtype=float)
        y = np.asarray([np.nan if v is None else v for v in ys], dtype=float)
        keep = np.isfinite(x) & np.isfinite(y) & (y > 0)
        return x[keep], y[keep]

    for c, (family, (shares, ratios)) in enumerate(curves.items()):
        for name, label in RATIO_LABELS.items():
            if name in ratios:
                x, y = finite(shares, ratios[name])
                ax.plot(x, y, styles[c % len(styles)], color=colours[name], lw=1.4,
                        label=f"{label} ({family})")
    markers = "osD^v<>ph*"
    for m, (who, (share, ratios)) in enumerate(marks.items()):
        for name in RATIO_LABELS:
            x, y = finite([share], [ratios.get(name)])
            if len(x):
                ax.plot(x, y, markers[m % len(markers)], color=colours[name], ms=6, mec="black",
                        mew=0.6, label=who if name == "ref_ratio" else None)
    ax.axhline(paper_ratio, color="grey", ls=":", lw=1)
    ax.text(0.01, paper_ratio * 1.08, f"paper: ~{paper_ratio:g} (reference A/B only)",
            fontsize="x-small", color="grey")
    ax.set(yscale="log", xlim=(0, 1), xlabel="share of token-latent pairs active at one layer",
           ylabel="aggregated / per-token layer variance",
           title="Calibration: synthetic tables with known answers")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1)
    return _save(fig, path)


def plot_against_size(xlabel: str, points: dict[str, Sequence[float]],
                      measures: dict[str, Sequence[float | None]],
                      ratios: dict[str, Sequence[float | None]], path: str | os.PathLike,
                      title: str = "", paper_ratio: float | None = None,
                      measures_label: str = "share / similarity") -> Path:
    """Two panels against one size axis (model size, or R of a dose-response): `measures`
    (shares, similarities; linear, left) and `ratios` (log, right; a dotted line at
    `paper_ratio`). `points` maps each x label (a model name, "R") to its x values, in
    the order of the series' values; missing or non-positive ratios are left out."""
    xs = np.asarray([x for values in points.values() for x in values], dtype=float)
    if xs.size == 0 or any(len(v) != xs.size for v in (*measures.values(), *ratios.values())):
        raise ValueError("every series needs one value per point")
    order = np.argsort(xs, kind="stable")
    log_x = xs.min() > 0 and xs.max() > 8 * xs.min()
    fig, (ax_m, ax_r) = _new_figure(10, 4, ncols=2)

    def draw(ax, series: dict[str, Sequence[float | None]], positive: bool) -> None:
        for name, values in series.items():
            y = np.asarray([np.nan if v is None else v for v in values], dtype=float)[order]
            keep = np.isfinite(y) & ((y > 0) if positive else True)
            ax.plot(xs[order][keep], y[keep], marker="o", label=name)

    draw(ax_m, measures, positive=False)
    draw(ax_r, ratios, positive=True)
    if len(points) > 1:  # name each model at its x
        for name, values in points.items():
            for x in values:
                ax_m.annotate(name, (x, 0), xycoords=("data", "axes fraction"), fontsize="x-small",
                              rotation=90, va="bottom", ha="right", color="grey")
    if paper_ratio is not None:
        ax_r.axhline(paper_ratio, color="grey", ls=":", lw=1)
        ax_r.text(xs.min(), paper_ratio * 1.08, f"paper: ~{paper_ratio:g} (reference A/B only)",
                  fontsize="x-small", color="grey")
    ax_m.set(xlabel=xlabel, ylabel=measures_label, title="Measures")
    ax_r.set(xlabel=xlabel, ylabel="aggregated / per-token layer variance", yscale="log",
             title="Variance ratios")
    for ax in (ax_m, ax_r):
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, path)
