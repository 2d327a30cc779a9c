"""Prefect tasks: draw the paper's figures for a model (and across a sweep) as PNG files.

The numbers come from the warehouse views and the saved autoencoders; the
drawing is mlsae.figures. Figures land in <warehouse>/figures/<model>/ and are
linked from a markdown artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from prefect import task
from prefect.artifacts import create_markdown_artifact

from mlsae import warehouse
from mlsae.plan import Plan
from tasks.analyse import AnalysisManifest, artifact_key, query_rows
from tasks.common import CACHE_POLICY, gpu_slot, run_logger
from tasks.evaluate import EvalManifest
from tasks.extract import CacheManifest
from tasks.lens import LensManifest, load_lens
from tasks.train import TrainManifest


class FiguresManifest(TypedDict):
    figures: list[str]


def spec_label(spec: dict[str, Any], with_model: str | None = None) -> str:
    label = f"R{spec['expansion_factor']} k{spec['k']}{' lens' if spec['lens'] else ''}"
    return f"{with_model} {label}" if with_model else label


def link_figures(title: str, key: str, paths: list[Path]) -> None:
    lines = [f"# {title}", ""] + [f"- [{p.name}](file://{p})  `{p}`" for p in paths]
    try:
        create_markdown_artifact(markdown="\n".join(lines) + "\n", key=artifact_key(key),
                                 description=title)
    except Exception as err:  # a figure index must never fail the run
        run_logger().warning("could not create the figure artifact: %s", err)


def _heatmap(out: str, sae_id: str, layers: list[int], path: Path) -> Path:
    from mlsae import figures, statistics

    rows = query_rows(out, "SELECT latent, layer_idx, p FROM latent_heatmap WHERE sae_id = ?",
                      [sae_id])
    dist = statistics.layer_distribution([r["latent"] for r in rows], [r["layer_idx"] for r in rows],
                                      [r["p"] for r in rows], len(layers))
    return figures.plot_layer_heatmap(dist, path, f"{sae_id}\nall logged tokens (Fig. 2)",
                                      layer_labels=layers)


def _expected_layer_hist(out: str, sae_id: str, n_layers: int, path: Path) -> Path:
    from mlsae import figures

    rows = query_rows(out, "SELECT expected_layer FROM latent_stats WHERE sae_id = ?", [sae_id])
    return figures.plot_expected_layer_histogram([r["expected_layer"] for r in rows], n_layers,
                                                 path, f"Expected layer of latents\n{sae_id}")


def _prompt_heatmap(sae, loaded, basis, layers: list[int], title: str, path: Path) -> Path:
    from mlsae import figures, statistics

    prompt = statistics.prompt_activations(sae, loaded, statistics.FIG3_PROMPT, basis)
    return figures.plot_layer_heatmap(
        statistics.prompt_distribution(prompt, len(layers)), path,
        f'{title}\n"{statistics.FIG3_PROMPT}" (Fig. 3)', layer_labels=layers)


def _per_layer(manifest: EvalManifest | None, layers: list[int], metric: str) -> list[float]:
    """One value per layer (NaN where the manifest has none)."""
    rows = {row["layer"]: row for row in (manifest or {}).get("layers", [])}
    value = [rows.get(layer, {}).get(metric) for layer in layers]
    return [float("nan") if v is None else v for v in value]


def _metrics_vs_baselines(layers: list[int], mlsae: EvalManifest,
                          baselines: dict[int, EvalManifest], path: Path) -> Path:
    from mlsae import figures

    metrics = ("fvu", "delta_ce")
    # Baseline l contributes only its own layer.
    peer = {m: [_per_layer(baselines.get(layer), [layer], m)[0] for layer in layers]
            for m in metrics}
    return figures.plot_metrics_vs_baselines(
        layers, {m: _per_layer(mlsae, layers, m) for m in metrics},
        peer if baselines else None, path)


def _mmcs(sae, baseline_dirs: dict[int, str], path: Path) -> Path:
    """MMCS within the MLSAE and each single-layer SAE, and between the MLSAE and each."""
    from mlsae import figures, statistics
    from mlsae.sae import MLSAE

    mlsae_rows = statistics.decoder_rows(sae)
    labels, values = ["within MLSAE"], [statistics.mmcs(mlsae_rows)]
    between_labels, between = [], []
    for layer, sae_dir in sorted(baseline_dirs.items()):
        rows = statistics.decoder_rows(MLSAE.from_pretrained(sae_dir))
        labels.append(f"within layer-{layer} SAE")
        values.append(statistics.mmcs(rows))
        between_labels.append(f"MLSAE vs layer-{layer} SAE")
        between.append(statistics.mmcs_between(mlsae_rows, rows))
    return figures.plot_mmcs(labels + between_labels, values + between, path)


@task(name="draw-model-figures", cache_policy=CACHE_POLICY)
def draw_model_figures(plan: Plan, cache: CacheManifest | None, lens: LensManifest | None,
                       trained: list[TrainManifest | list[TrainManifest]],
                       metrics: list[EvalManifest],
                       analyses: list[AnalysisManifest], out: str) -> FiguresManifest:
    """Fig. 1 for the model; Fig. 2/3, expected-layer histogram, metrics vs baselines and
    MMCS for each MLSAE; layer std by config across the model's MLSAEs."""
    from mlsae.warehouse.workspace import workspace

    # Reads the autoencoders (pulled, for a URL), writes only the shared figures.
    with workspace(out, [s["sae_id"] for s in plan["specs"]], write=False):
        paths = _model_figures(plan, cache, lens, trained, metrics, analyses, out)
    return FiguresManifest(figures=[warehouse.public_path(out, p) for p in paths])


def _model_figures(plan: Plan, cache: CacheManifest | None, lens: LensManifest | None,
                   trained: list[TrainManifest | list[TrainManifest]],
                   metrics: list[EvalManifest], analyses: list[AnalysisManifest],
                   out: str) -> list[Path]:
    from mlsae import figures, statistics
    from mlsae.cache import ActivationCache
    from mlsae.models import load_model
    from mlsae.sae import MLSAE

    model = plan["model"]
    fig_dir = warehouse.figures_dir(warehouse.working_dir(out), model["slug"])
    if cache is not None:
        from mlsae.warehouse.workspace import pull_activation_cache

        cache_dir = warehouse.local_path(out, cache["cache_dir"])
        pull_activation_cache(out, cache_dir)  # extracted (and shared) on another worker
        sample = statistics.residual_sample(ActivationCache.open(cache_dir))
    else:  # streaming run: no cache on disk, take the sample from the model directly
        from mlsae.extract import stream_activations
        from mlsae.plan import extract_config, run_settings

        sample = statistics.residual_sample(stream_activations(
            extract_config(run_settings(plan), tokens=4096), log=lambda line: None))
    paths = [figures.plot_residual_similarity({model["slug"]: statistics.residual_similarity(sample)},
                                              fig_dir / "fig1_residual_similarity.png")]
    specs = {spec["sae_id"]: spec for spec in plan["specs"]}
    flat = [m for t in trained for m in ([t] if isinstance(t, dict) else t)]
    trained_by_id = {t["sae_id"]: t for t in flat}
    metrics_by_id = {m["sae_id"]: m for m in metrics}
    loaded = load_model(model["name"], device=plan["device"])
    for sae_id, spec in specs.items():
        if spec["role"] != "mlsae":
            continue
        sae_dir, layers = fig_dir / sae_id, spec["layers"]
        # Its single-layer baselines: same (R, k, lens), one per layer.
        peers = {s["layers"][0]: s["sae_id"] for s in specs.values() if s["role"] == "baseline"
                 and (s["expansion_factor"], s["k"], s["lens"])
                 == (spec["expansion_factor"], spec["k"], spec["lens"])}
        sae = MLSAE.from_pretrained(warehouse.local_path(out, trained_by_id[sae_id]["sae_dir"]))
        sae.to(next(loaded.model.parameters()).device).eval()
        basis = load_lens(lens, loaded, out) if spec["lens"] else None
        paths.append(_heatmap(out, sae_id, layers, sae_dir / "fig2_layer_heatmap.png"))
        with gpu_slot(plan["device"]):
            paths.append(_prompt_heatmap(sae, loaded, basis, layers, sae_id,
                                         sae_dir / "fig3_prompt_heatmap.png"))
        paths.append(_expected_layer_hist(out, sae_id, len(layers),
                                          sae_dir / "expected_layer_histogram.png"))
        paths.append(_metrics_vs_baselines(
            layers, metrics_by_id[sae_id], {layer: metrics_by_id[b] for layer, b in peers.items()},
            sae_dir / "metrics_vs_baselines.png"))
        paths.append(_mmcs(sae, {layer: warehouse.local_path(out, trained_by_id[b]["sae_dir"])
                                 for layer, b in peers.items()}, sae_dir / "mmcs.png"))

    summary = [(specs[a["sae_id"]], a["variance_summary"][0]) for a in analyses
               if a["variance_summary"]]
    if summary:
        paths.append(figures.plot_layer_std_by_config(
            [spec_label(spec) for spec, _ in summary],
            [row["mean_layer_std"] or 0.0 for _, row in summary],
            [row["std_layer_std"] or 0.0 for _, row in summary],
            fig_dir / "layer_std_by_config.png"))
    link_figures(f"Figures for {model['name']}", f"figures-{model['slug']}", paths)
    run_logger().info("%d figures in %s", len(paths), fig_dir)
    return paths


@task(name="draw-sweep-figures", cache_policy=CACHE_POLICY)
def draw_sweep_figures(analyses: list[AnalysisManifest], plans: list[Plan],
                       out: str) -> FiguresManifest:
    """Layer std by config across every model and config of a sweep."""
    from mlsae import figures

    specs = {spec["sae_id"]: (plan["model"]["slug"], spec) for plan in plans
             for spec in plan["specs"]}
    rows = [(specs[a["sae_id"]], a["variance_summary"][0]) for a in analyses
            if a["variance_summary"]]
    if not rows:
        return FiguresManifest(figures=[])
    from mlsae.warehouse.workspace import workspace

    with workspace(out, write=False) as local:
        path = figures.plot_layer_std_by_config(
            [spec_label(spec, slug) for (slug, spec), _ in rows],
            [row["mean_layer_std"] or 0.0 for _, row in rows],
            [row["std_layer_std"] or 0.0 for _, row in rows],
            warehouse.figures_dir(local) / "sweep_layer_std_by_config.png")
    link_figures("Sweep figures", "figures-sweep", [path])
    return FiguresManifest(figures=[warehouse.public_path(out, path)])
