"""The report's facts: the one module that reads the warehouse (through sql/ views and
macros), the training summaries, the saved weights and the activation caches.

`gather(inputs)` returns ReportFacts, one NamedTuple per section. Every query string
kept in a fact is the exact query that produced it, so the report shows it beside
its table and a reader can rerun it with `mlsae sql`. Nothing here decides or
writes prose: verdicts.py judges, sections.py writes.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mlsae import statistics
from mlsae.report.inputs import GridEntry, ModelEntry, ReportInputs
from mlsae.warehouse.layout import TRAINED_WEIGHTS_DIR

SETTLE_FRACTION = 0.2
"""'Settled' is judged on the change of the training FVU over the last fifth of training."""
SETTLE_MIN_STEPS = 40
"""Fewer steps than this and the settle windows are a step or two: no basis for a verdict."""
WINDOW_FRACTION = 0.05
"""Final FVU and dead fraction: means over the last 5% of the steps."""
RESIDUAL_SAMPLE_TOKENS = 4096
"""Tokens of the residual sample behind Fig. 1 and the cross-model similarity."""
CALIBRATION_SEQ_LEN = 128


# -- query helpers ----------------------------------------------------------------------


def in_list(ids: Sequence[str]) -> str:
    """A SQL list literal of sae_ids: ('a', 'b')."""
    return "(" + ", ".join("'" + i.replace("'", "''") + "'" for i in ids) + ")"


def array_literal(ids: Sequence[str]) -> str:
    """A DuckDB list literal of sae_ids: ['a', 'b']."""
    return "[" + ", ".join("'" + i.replace("'", "''") + "'" for i in ids) + "]"


class _Warehouse:
    """Read-only queries over the warehouse, rows as dicts."""

    def __init__(self, root: Path):
        from mlsae.warehouse import connect

        self.con = connect(root, read_only=True)
        # Three sections read variance_ratios (a full scan of every latent row): scan it once
        # into a temp table that shadows the view under the same name, so each query the
        # report shows still reruns verbatim with `mlsae sql`.
        self.con.execute("CREATE TEMP TABLE variance_ratios AS "
                         "SELECT * FROM main.variance_ratios")

    def rows(self, sql: str) -> list[dict[str, Any]]:
        from mlsae.warehouse import query_dicts

        return query_dicts(self.con, sql)

    def by_id(self, sql: str) -> dict[str, dict[str, Any]]:
        return {r["sae_id"]: r for r in self.rows(sql)}

    def close(self) -> None:
        self.con.close()


# -- section 0: training budgets and whether they settled ---------------------------------


class TrainingFacts(NamedTuple):
    steps: int
    tokens: int
    seconds: float | None
    final_fvu: float | None
    fvu_change: float | None
    """Relative change of the (smoothed) training FVU over the last fifth of training."""
    final_dead: float | None
    data_exhausted: bool
    history: list[dict]


def _window_mean(history: list[dict], key: str, end_frac: float,
                 width: float = WINDOW_FRACTION) -> float | None:
    n = len(history)
    if n == 0:
        return None
    hi = max(1, round(end_frac * n))
    lo = max(0, min(hi - 1, round((end_frac - width) * n)))
    values = [h[key] for h in history[lo:hi] if h.get(key) is not None]
    return float(np.mean(values)) if values else None


def training_facts(run_dir: str | os.PathLike) -> TrainingFacts | None:
    """What train_summary.json says about a run: budget, time, and how FVU moved at the end."""
    path = Path(run_dir) / "train_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    history = summary.get("history") or []
    rate = summary.get("tokens_per_s") or 0.0
    end = _window_mean(history, "fvu", 1.0)
    before = _window_mean(history, "fvu", 1.0 - SETTLE_FRACTION)
    change = (end / before - 1.0 if end is not None and before
              and len(history) >= SETTLE_MIN_STEPS else None)
    return TrainingFacts(
        steps=int(summary.get("steps", 0)), tokens=int(summary.get("tokens", 0)),
        seconds=summary["tokens"] / rate if rate else None, final_fvu=end, fvu_change=change,
        final_dead=_window_mean(history, "dead_fraction", 1.0),
        data_exhausted=bool(summary.get("data_exhausted")), history=history)


class GridFacts(NamedTuple):
    training: dict[str, TrainingFacts | None]
    """sae_id -> its training summary (None: no summary found)."""
    runs: list[dict]
    """The ledger's report runs with a wall time (started, wall_s, load_15min)."""
    cpu_count: int | None
    machine: str


# -- section 1: MLSAE vs single-layer SAEs ------------------------------------------------


class MetricsFacts(NamedTuple):
    sql_layers: str
    layers: list[dict]
    """metrics_vs_baselines rows, one per layer of the base MLSAE."""
    sql_mean: str
    mean: dict | None
    """Means over the layers that have a single-layer SAE (None: no baselines)."""
    sql_grid: str
    grid: dict[str, dict]
    """sae_id -> sae_metric_means row, every MLSAE of the grid."""


# -- section 2: the residual stream -------------------------------------------------------


class ResidualFacts(NamedTuple):
    similarity: statistics.ResidualSimilarity | None
    """The first model's Fig. 1 statistics (None: no cache and nothing to stream)."""
    sample_tokens: int


# -- section 3: variance, like for like, calibration ---------------------------------------


class VarianceFacts(NamedTuple):
    sql: str
    rows: dict[str, dict]
    """sae_id -> variance_summary row, the grid's MLSAEs."""


class LikeForLikeFacts(NamedTuple):
    sql: str
    rows: dict[str, dict]
    """sae_id -> variance_ratios row, the grid's MLSAEs."""
    batch_tokens: int
    logged_tokens: int | None
    """Tokens logged for the base MLSAE (variance_summary.n_tokens)."""
    seq_len: int


class CalibrationFacts(NamedTuple):
    spec: Any
    """mlsae.calibration.SpillTables shared by the families (spill and width vary)."""
    spills: tuple[float, ...]
    curves: dict[str, list]
    """family name -> CalibrationPoint per spill."""
    marks: dict[str, tuple[float, dict[str, float | None]]]
    """MLSAE label -> (its single-layer share, {ratio name: value})."""


# -- section 4: multi-layer activity, the R dose-response ---------------------------------


class ActivityFacts(NamedTuple):
    sql_latent: str
    sql_token: str
    sql_latent_hist: str
    per_sae: dict[str, dict]
    """sae_id -> latent_activity row."""
    labels: list[str]
    token_CL: np.ndarray
    """Share of token-latent pairs active at 1..L layers, one row per MLSAE of the grid."""
    token_mass_CL: np.ndarray
    latent_CL: np.ndarray
    """Share of live latents active at 1..L layers over all tokens."""


class DoseFacts(NamedTuple):
    k: int | None
    sql: str
    rows: list[dict]
    """One row per MLSAE of the dose line (inputs.dose_line), by R: sae_id,
    expansion_factor, n_latents, train_tokens, the ratios, single_layer_share, fvu,
    dead_fraction."""
    budget_sql: str | None
    budget_rows: list[dict]
    """The budget check (only with a dose budget): the same columns for every dose R at
    both budgets, by R then train_tokens."""


# -- section 5: heatmaps and MMCS ---------------------------------------------------------


class HeatmapFacts(NamedTuple):
    shown: list[GridEntry]
    """The base MLSAE (and its lens twin) whose Fig. 2/3 are copied in."""
    mmcs: list[tuple[str, float, float | None]] | None
    """(dictionary, MMCS within, MMCS vs the base MLSAE); None: base weights missing."""


# -- section 6: across models --------------------------------------------------------------


class FamilyFacts(NamedTuple):
    models: list[ModelEntry]
    similarity: dict[str, statistics.ResidualSimilarity | None]
    """model name -> its residual similarity (None: no sample)."""
    sql: str
    rows: dict[str, dict]
    """base sae_id -> its activity and ratios (saes x latent_activity x variance_ratios)."""


class ReportFacts(NamedTuple):
    inputs: ReportInputs
    grid: GridFacts
    metrics: MetricsFacts
    residual: ResidualFacts
    variance: VarianceFacts
    like: LikeForLikeFacts
    calibration: CalibrationFacts
    activity: ActivityFacts
    dose: DoseFacts
    heatmaps: HeatmapFacts
    family: FamilyFacts


# -- gathering ------------------------------------------------------------------------------


def grid_facts(inputs: ReportInputs, ledger: list[dict]) -> GridFacts:
    return GridFacts(training={e.sae_id: training_facts(e.run_dir)
                               for e in [*inputs.grid, *inputs.dose_grid]},
                     runs=[r for r in ledger if r.get("wall_s") is not None],
                     cpu_count=os.cpu_count(), machine=platform.machine())


def metrics_facts(db: _Warehouse, inputs: ReportInputs) -> MetricsFacts:
    macro = (f"metrics_vs_baselines('{inputs.base_id}', "
             f"{array_literal([b.sae_id for b in inputs.baselines])})")
    sql_layers = f"SELECT * FROM {macro}"
    sql_mean = ("SELECT avg(fvu) AS fvu, avg(fvu_sae) AS fvu_sae, avg(delta_ce) AS delta_ce, "
                "avg(delta_ce_sae) AS delta_ce_sae, avg(kl) AS kl, avg(kl_sae) AS kl_sae, "
                f"count(*) AS n_layers FROM {macro} WHERE baseline_id IS NOT NULL")
    sql_grid = ("SELECT sae_id, fvu, delta_ce, kl, dead_fraction FROM sae_metric_means "
                f"WHERE sae_id IN {in_list([e.sae_id for e in inputs.mlsaes])}")
    mean = db.rows(sql_mean)[0] if inputs.baselines else None
    return MetricsFacts(sql_layers=sql_layers, layers=db.rows(sql_layers), sql_mean=sql_mean,
                        mean=mean if mean and mean["n_layers"] else None,
                        sql_grid=sql_grid, grid=db.by_id(sql_grid))


def residual_similarity_of(model: ModelEntry) -> statistics.ResidualSimilarity | None:
    """Fig. 1's statistics on up to RESIDUAL_SAMPLE_TOKENS tokens of the model's training
    activation cache, or streamed from the model when it has none."""
    if model.cache_dir and Path(model.cache_dir).exists():
        from mlsae.cache import ActivationCache

        shards = ActivationCache.open(model.cache_dir)
    elif model.extract is not None:
        from mlsae.extract import stream_activations

        shards = stream_activations(model.extract, log=lambda line: None)
    else:
        return None
    return statistics.residual_similarity(statistics.residual_sample(shards, RESIDUAL_SAMPLE_TOKENS))


def variance_facts(db: _Warehouse, inputs: ReportInputs) -> VarianceFacts:
    sql = ("SELECT sae_id, n_tokens, n_live, mean_layer_var, mean_prompt_var, mean_token_var, "
           "ratio_token, ratio_prompt, ref_var_aggregated, ref_var_token, ref_rel_var "
           "FROM variance_summary WHERE sae_id IN "
           f"{in_list([e.sae_id for e in inputs.report_mlsaes])}")
    return VarianceFacts(sql=sql, rows=db.by_id(sql))


def like_facts(db: _Warehouse, inputs: ReportInputs, variance: VarianceFacts) -> LikeForLikeFacts:
    sql = ("SELECT sae_id, ref_ratio, ref_n_batches, ref_batch_tokens, ref_var_aggregated, "
           "ref_var_token, ratio_mass, ratio_count, single_layer_share "
           "FROM variance_ratios WHERE sae_id IN "
           f"{in_list([e.sae_id for e in inputs.report_mlsaes])}")
    rows = db.by_id(sql)
    batch = next((r["ref_batch_tokens"] for r in rows.values()), 2048)
    return LikeForLikeFacts(sql=sql, rows=rows, batch_tokens=batch,
                            logged_tokens=variance.rows.get(inputs.base_id, {}).get("n_tokens"),
                            seq_len=inputs.seq_len)


def calibration_facts(inputs: ReportInputs, like: LikeForLikeFacts) -> CalibrationFacts:
    """The three ratios on synthetic tables whose single-layer share is known (written to a
    scratch warehouse and measured by the same views), and where the grid's MLSAEs sit."""
    from mlsae.calibration import DEFAULT_SPILLS, SpillTables, calibration_curve
    from mlsae.figures import RATIO_LABELS

    n_layers, base = inputs.n_layers, inputs.base
    spec = SpillTables(n_layers=n_layers, n_latents=base.expansion_factor * inputs.d_model,
                       latents_per_token=base.k,
                       n_sequences=max(1, inputs.calibration_tokens // CALIBRATION_SEQ_LEN),
                       seq_len=CALIBRATION_SEQ_LEN)
    families = {"1 adjacent layer": 1, f"up to {n_layers - 1} layers": n_layers - 1}
    curves: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="mlsae-calibration-") as scratch:
        for i, (name, width) in enumerate(families.items()):
            curves[name] = calibration_curve(Path(scratch) / f"family-{i}",
                                             replace(spec, spill_width=width), DEFAULT_SPILLS)
    marks = {e.label: (r["single_layer_share"], {k: r.get(k) for k in RATIO_LABELS})
             for e in inputs.report_mlsaes if (r := like.rows.get(e.sae_id))
             and r.get("single_layer_share") is not None}
    return CalibrationFacts(spec=spec, spills=tuple(DEFAULT_SPILLS), curves=curves, marks=marks)


def activity_facts(db: _Warehouse, inputs: ReportInputs) -> ActivityFacts:
    mlsaes = inputs.mlsaes
    ids = [e.sae_id for e in mlsaes]
    sql_latent = f"SELECT * FROM latent_activity WHERE sae_id IN {in_list(ids)}"
    sql_token = ("SELECT sae_id, n_layers, fraction, mass_fraction FROM token_layer_spread "
                 f"WHERE sae_id IN {in_list(ids)} ORDER BY sae_id, n_layers")
    sql_hist = ("SELECT sae_id, n_layers_active, fraction FROM latents_by_layers_active "
                f"WHERE sae_id IN {in_list(ids)} ORDER BY sae_id, n_layers_active")
    n = inputs.n_layers
    token_CL, token_mass_CL, latent_CL = (np.zeros((len(ids), n)) for _ in range(3))
    for row in db.rows(sql_token):  # a pivot of long rows into one array per MLSAE
        token_CL[ids.index(row["sae_id"]), row["n_layers"] - 1] = row["fraction"]
        token_mass_CL[ids.index(row["sae_id"]), row["n_layers"] - 1] = row["mass_fraction"]
    for row in db.rows(sql_hist):
        latent_CL[ids.index(row["sae_id"]), row["n_layers_active"] - 1] = row["fraction"]
    return ActivityFacts(sql_latent=sql_latent, sql_token=sql_token, sql_latent_hist=sql_hist,
                         per_sae=db.by_id(sql_latent), labels=[e.label for e in mlsaes],
                         token_CL=token_CL, token_mass_CL=token_mass_CL, latent_CL=latent_CL)


def _dose_sql(ids: Sequence[str]) -> str:
    return ("SELECT s.sae_id, s.expansion_factor, s.n_latents, s.train_tokens, r.ref_ratio, "
            "r.ratio_mass, r.ratio_count, r.single_layer_share, m.fvu, m.dead_fraction "
            "FROM saes s JOIN variance_ratios r USING (sae_id) "
            f"JOIN sae_metric_means m USING (sae_id) WHERE s.sae_id IN {in_list(ids)} "
            "ORDER BY s.expansion_factor, s.train_tokens")


def dose_facts(db: _Warehouse, inputs: ReportInputs) -> DoseFacts:
    line = inputs.dose_line
    sql = _dose_sql([e.sae_id for e in line])
    twins = inputs.budget_twins
    budget_sql = _dose_sql([e.sae_id for pair in twins for e in pair]) if twins else None
    return DoseFacts(k=inputs.dose_k, sql=sql, rows=db.rows(sql) if line else [],
                     budget_sql=budget_sql, budget_rows=db.rows(budget_sql) if budget_sql else [])


def heatmap_facts(inputs: ReportInputs) -> HeatmapFacts:
    from mlsae.sae import MLSAE

    def rows_of(e: GridEntry) -> np.ndarray | None:
        path = Path(e.run_dir) / TRAINED_WEIGHTS_DIR
        return statistics.decoder_rows(MLSAE.from_pretrained(path)) if path.exists() else None

    shown = [inputs.base] + ([inputs.lens_entry] if inputs.lens_entry else [])
    base = rows_of(inputs.base)
    if base is None:
        return HeatmapFacts(shown=shown, mmcs=None)
    table: list[tuple[str, float, float | None]] = [("base MLSAE", statistics.mmcs(base), None)]
    for b in inputs.baselines:
        rows = rows_of(b)
        if rows is not None:
            table.append((b.label, statistics.mmcs(rows), statistics.mmcs_between(base, rows)))
    return HeatmapFacts(shown=shown, mmcs=table)


def family_facts(db: _Warehouse, inputs: ReportInputs,
                 first: statistics.ResidualSimilarity | None) -> FamilyFacts:
    models = inputs.models
    similarity = {models[0].name: first}
    for model in models[1:]:
        similarity[model.name] = residual_similarity_of(model)
    sql = ("SELECT s.sae_id, s.model, a.n_live, a.single_layer_share, a.mean_token_layers, "
           "a.mean_layer_std, a.mean_relative_std, r.ref_ratio, r.ratio_mass, r.ratio_count "
           "FROM saes s JOIN latent_activity a USING (sae_id) "
           "LEFT JOIN variance_ratios r USING (sae_id) "
           f"WHERE s.sae_id IN {in_list([m.base_id for m in models])}")
    return FamilyFacts(models=models, similarity=similarity, sql=sql,
                       rows=db.by_id(sql) if len(models) > 1 else {})


def count_parameters(source: str | os.PathLike) -> int | None:
    """Parameters of a model directory, from its safetensors headers (no weights read);
    None when there are none to read (a hub id not on disk, torch .bin files)."""
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(path, "np") as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118 - safe_open is not iterable
    return total


def gather(inputs: ReportInputs, ledger: list[dict]) -> ReportFacts:
    """Every fact of the report, section by section."""
    db = _Warehouse(inputs.warehouse)
    try:
        variance = variance_facts(db, inputs)
        like = like_facts(db, inputs, variance)
        first = residual_similarity_of(inputs.models[0])
        return ReportFacts(
            inputs=inputs, grid=grid_facts(inputs, ledger), metrics=metrics_facts(db, inputs),
            residual=ResidualFacts(similarity=first, sample_tokens=RESIDUAL_SAMPLE_TOKENS),
            variance=variance, like=like, calibration=calibration_facts(inputs, like),
            activity=activity_facts(db, inputs), dose=dose_facts(db, inputs),
            heatmaps=heatmap_facts(inputs), family=family_facts(db, inputs, first))
    finally:
        db.close()
