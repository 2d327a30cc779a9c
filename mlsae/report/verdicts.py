"""The report's verdicts: pure functions from facts to a NamedTuple, every threshold named.

A verdict decides which fixed text a section writes (reproduced or not, settled or
not); the numbers it rests on travel with it so the prose quotes them. No queries,
no files, no prose here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from mlsae.report.facts import (
    ActivityFacts,
    CalibrationFacts,
    DoseFacts,
    FamilyFacts,
    GridFacts,
    LikeForLikeFacts,
    MetricsFacts,
    ReportFacts,
)
from mlsae.report.inputs import ReportInputs

SETTLED_MAX_CHANGE = 0.05
"""FVU has settled when its change over the last fifth of training is below 5% in magnitude."""
ONE_LAYER_MAJORITY = 0.5
"""Finding 1 holds when at least half of the token-latent pairs sit at one layer."""
PAPER_RATIO = 100.0
"""The paper's aggregated / per-token variance (its code's A/B): about two orders of magnitude."""
PAPER_ORDER = 30.0
"""A reference A/B at least this large counts as "of the paper's order" (its ~100)."""
LENS_INCREASE = 1.1
"""The lens increases multi-layer activity when the mean layer std grows by more than 10%."""
FVU_COMPARABLE_FACTOR = 1.5
FVU_COMPARABLE_SLACK = 0.02
"""Finding 5: MLSAE FVU <= 1.5 x the single-layer SAEs' FVU + 0.02 counts as comparable."""
FAMILY_MIN_MODELS = 2
"""Finding 3 needs at least two models of different sizes."""
FAMILY_TREND_MIN_MODELS = 3
"""...and a trend needs three: with two, any difference has rank correlation +-1, so the
verdict says only whether the two point the paper's way ("consistent")."""
TREND_MIN_RANK_CORRELATION = 0.8
"""A measure grows with model size when its Spearman correlation with size is at least 0.8
(with three models: strictly monotone)."""
TREND_MIN_CHANGE = 0.01
"""...and it moves by at least this much (absolute) from the smallest to the largest model,
so ties and noise-level differences do not count as growth."""


# -- helpers ------------------------------------------------------------------------------


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than two points
    or a constant series."""
    if len(x) < 2 or len(x) != len(y):
        return None

    def ranks(v: Sequence[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for value in np.unique(a):  # ties share their mean rank
            r[a == value] = r[a == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


class Trend(NamedTuple):
    correlation: float | None
    """Spearman correlation of the measure with size."""
    change: float | None
    """Measure at the largest model minus at the smallest."""
    grows: bool


def trend(size: Sequence[float], measure: Sequence[float]) -> Trend:
    """Does `measure` grow with `size`? (TREND_MIN_RANK_CORRELATION and TREND_MIN_CHANGE)."""
    rho = rank_correlation(size, measure)
    if rho is None:
        return Trend(None, None, False)
    change = float(measure[int(np.argmax(size))] - measure[int(np.argmin(size))])
    return Trend(rho, change, rho >= TREND_MIN_RANK_CORRELATION and change >= TREND_MIN_CHANGE)


# -- section 0 ------------------------------------------------------------------------------


class SettledVerdict(NamedTuple):
    worst_by_role: dict[str, float | None]
    """role -> largest |FVU change| over the last fifth among its runs (None: some run too
    short or without a summary)."""
    settled: bool | None
    """None: not judgeable (some run too short)."""
    exhausted: list[str]
    """Runs that ran out of training data before their budget."""


def settled(grid: GridFacts, inputs: ReportInputs) -> SettledVerdict:
    """Judged per role: the grid's MLSAEs, its single-layer SAEs and, with a dose budget, the
    dose-response at that budget. The dose R's twins at the report's budget are left out of
    the judgement (the budget check shows how far they were from settled)."""
    twins = {short.sae_id for short, _ in inputs.budget_twins}
    roles = {"mlsae": [e for e in inputs.grid if e.role == "mlsae" and e.sae_id not in twins],
             "baseline": [e for e in inputs.grid if e.role == "baseline"],
             "dose": list(inputs.dose_grid)}
    by_role: dict[str, float | None] = {}
    for role, entries in roles.items():
        changes = [None if (f := grid.training[e.sae_id]) is None else f.fvu_change
                   for e in entries]
        if changes:
            by_role[role] = None if None in changes else max(abs(c) for c in changes)
    worst = None if None in by_role.values() or not by_role else max(by_role.values())
    return SettledVerdict(by_role, None if worst is None else worst < SETTLED_MAX_CHANGE,
                          [sid for sid, f in grid.training.items() if f and f.data_exhausted])


# -- the findings (section 7) ---------------------------------------------------------------


class OneLayerVerdict(NamedTuple):
    token_share: float
    """Base MLSAE: share of token-latent pairs at one layer."""
    latent_share: float | None
    """Base MLSAE: share of live latents at one layer over all tokens."""
    holds: bool


def one_layer(activity: ActivityFacts, inputs: ReportInputs) -> OneLayerVerdict | None:
    row = activity.per_sae.get(inputs.base_id)
    if row is None or row.get("single_layer_share") is None:
        return None
    share = float(row["single_layer_share"])
    return OneLayerVerdict(share, row.get("latent_one_layer"), share >= ONE_LAYER_MAJORITY)


def share_at(points: Sequence[Any], ratio: float) -> float | None:
    """The single-layer share at which a calibration curve's reference A/B reaches `ratio`
    (linear in share, log in ratio, between the two points around it); None if it never does."""
    pts = sorted((p.single_layer_share, p.ref_ratio) for p in points
                 if p.ref_ratio is not None and np.isfinite(p.ref_ratio))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if y0 <= ratio <= y1 and y1 > y0:
            return x0 + (x1 - x0) * (np.log(ratio) - np.log(y0)) / (np.log(y1) - np.log(y0))
    return None


def calibration_crossings(calibration: CalibrationFacts) -> dict[str, float | None]:
    """family -> the single-layer share where its reference A/B reaches PAPER_RATIO."""
    return {name: share_at(points, PAPER_RATIO) for name, points in calibration.curves.items()}


class VarianceVerdict(NamedTuple):
    ref_low: float
    ref_high: float
    """The grid's reference A/B (the paper's statistic), lowest and highest."""
    near_paper: bool
    ours: list[float]
    """Our mass- and count-weighted ratios (never set against the paper's number)."""
    token_shares: list[float]
    crossings: dict[str, float]
    """Calibration family -> single-layer share where the reference A/B reaches ~100."""


def variance(like: LikeForLikeFacts, calibration: CalibrationFacts) -> VarianceVerdict | None:
    refs = [r["ref_ratio"] for r in like.rows.values() if r.get("ref_ratio") is not None]
    if not refs:
        return None
    ours = [r[k] for r in like.rows.values() for k in ("ratio_mass", "ratio_count")
            if r.get(k) is not None]
    shares = [r["single_layer_share"] for r in like.rows.values()
              if r.get("single_layer_share") is not None]
    crossings = {k: v for k, v in calibration_crossings(calibration).items() if v is not None}
    return VarianceVerdict(min(refs), max(refs), max(refs) >= PAPER_ORDER, ours, shares,
                           crossings)


class FamilyVerdict(NamedTuple):
    testable: bool
    n_models: int
    size_axis: str
    """"parameters" when every model's count is known, else "n_layers x d_model"."""
    similarity: Trend
    """Mean adjacent-layer cosine similarity against size."""
    activity: Trend
    """Multi-layer share of token-latent pairs (1 - single-layer share) against size."""
    status: str
    """"not testable", "reproduced", "partly reproduced" or "not reproduced"; with two
    models "consistent (two models)" or "partly consistent (two models)" instead."""


def model_sizes(family: FamilyFacts) -> tuple[str, list[float]]:
    """The size axis: parameters when every model has a count, else n_layers x d_model."""
    if all(m.n_params for m in family.models):
        return "parameters", [float(m.n_params) for m in family.models]
    return "n_layers x d_model", [float(m.size) for m in family.models]


def family(facts: FamilyFacts) -> FamilyVerdict:
    """The paper's finding 3: adjacent-layer similarity and multi-layer activity grow with
    model size. Testable with FAMILY_MIN_MODELS models of distinct sizes that have both
    measures."""
    axis, sizes = model_sizes(facts)
    points = []
    for model, size in zip(facts.models, sizes, strict=True):
        sim = facts.similarity.get(model.name)
        row = facts.rows.get(model.base_id)
        if sim is not None and row is not None and row.get("single_layer_share") is not None:
            points.append((size, float(np.mean(sim.adjacent_cos_L1)),
                           1.0 - float(row["single_layer_share"])))
    none = Trend(None, None, False)
    if len(points) < FAMILY_MIN_MODELS or len({p[0] for p in points}) < FAMILY_MIN_MODELS:
        return FamilyVerdict(False, len(points), axis, none, none, "not testable")
    size, sim, multi = zip(*points, strict=True)
    sim_trend, act_trend = trend(size, sim), trend(size, multi)
    grows = sim_trend.grows + act_trend.grows
    if len(points) < FAMILY_TREND_MIN_MODELS:
        status = {2: "consistent (two models)", 1: "partly consistent (two models)",
                  0: "not reproduced"}[grows]
    else:
        status = {2: "reproduced", 1: "partly reproduced", 0: "not reproduced"}[grows]
    return FamilyVerdict(True, len(points), axis, sim_trend, act_trend, status)


class LensVerdict(NamedTuple):
    without: float
    with_lens: float
    increases: bool


def lens(activity: ActivityFacts, inputs: ReportInputs) -> LensVerdict | None:
    if inputs.lens_entry is None:
        return None
    a = activity.per_sae.get(inputs.base_id, {}).get("mean_layer_std")
    b = activity.per_sae.get(inputs.lens_entry.sae_id, {}).get("mean_layer_std")
    if a is None or b is None:
        return None
    return LensVerdict(a, b, b > LENS_INCREASE * a)


class MetricsVerdict(NamedTuple):
    fvu: float
    fvu_sae: float
    delta_ce: float | None
    delta_ce_sae: float | None
    comparable: bool


def metrics(facts: MetricsFacts) -> MetricsVerdict | None:
    m = facts.mean
    if m is None or m.get("fvu") is None or m.get("fvu_sae") is None:
        return None
    return MetricsVerdict(m["fvu"], m["fvu_sae"], m.get("delta_ce"), m.get("delta_ce_sae"),
                          m["fvu"] <= FVU_COMPARABLE_FACTOR * m["fvu_sae"] + FVU_COMPARABLE_SLACK)


class DoseVerdict(NamedTuple):
    single_layer: Trend
    """Single-layer share of token-latent pairs against R."""
    ref_ratio: Trend
    """Reference A/B against R."""


def dose(facts: DoseFacts) -> DoseVerdict | None:
    """How the single-layer share and the reference A/B move with R at fixed k (the same
    trend rule as finding 3); None with fewer than two R."""
    return dose_trends(facts.rows)


def dose_trends(dose_rows: Sequence[dict]) -> DoseVerdict | None:
    """dose() of rows of the dose query (expansion_factor, single_layer_share, ref_ratio)."""
    rows = [r for r in dose_rows if r.get("single_layer_share") is not None]
    if len({r["expansion_factor"] for r in rows}) < 2:
        return None
    rs = [r["expansion_factor"] for r in rows]
    with_ref = [r for r in rows if r.get("ref_ratio") is not None]
    return DoseVerdict(trend(rs, [r["single_layer_share"] for r in rows]),
                       trend([r["expansion_factor"] for r in with_ref],
                             [r["ref_ratio"] for r in with_ref]))


BUDGET_SHARE_TOLERANCE = 0.02
"""The budget check holds when each dose R's single-layer share moves by at most 2 points
between the report's budget and the dose budget..."""
BUDGET_RATIO_TOLERANCE = 0.2
"""...and its reference A/B by at most 20% (relative): the statistics the report concludes
from, not FVU, which keeps falling slowly with budget."""


class BudgetTwin(NamedTuple):
    expansion_factor: int
    short: dict
    """The dose query's row at the report's budget."""
    long: dict
    """...at the dose budget."""
    share_change: float | None
    """Single-layer share, long minus short (absolute)."""
    ref_change: float | None
    """Reference A/B, long / short - 1."""
    fvu_per_doubling: float | None
    """Held-out FVU change per doubling of the budget: (long / short)^(1 / log2(budget
    ratio)) - 1."""


class BudgetVerdict(NamedTuple):
    twins: list[BudgetTwin]
    stable: bool
    """Every twin within BUDGET_SHARE_TOLERANCE and BUDGET_RATIO_TOLERANCE."""
    same_trends: bool | None
    """The dose-response's trends (share and reference A/B against R) point the same way
    at both budgets; None with fewer than two R."""
    worst_share_change: float
    """Largest |single-layer share change| over the twins (a twin without one counts 0)."""
    worst_ref_change: float
    """Largest |reference A/B change| over the twins (likewise)."""


def budget_check(facts: DoseFacts) -> BudgetVerdict | None:
    """Do the dose-response's statistics hold between the two budgets? None without a dose
    budget (or twins)."""
    by_r: dict[int, list[dict]] = {}
    for row in facts.budget_rows:
        by_r.setdefault(row["expansion_factor"], []).append(row)
    twins = []
    for r, rows in sorted(by_r.items()):
        if len(rows) != 2:
            continue
        short, long = sorted(rows, key=lambda x: x["train_tokens"])

        def change(key: str, relative: bool, a: dict = short, b: dict = long) -> float | None:
            if a.get(key) is None or b.get(key) is None or (relative and not a[key]):
                return None
            return b[key] / a[key] - 1 if relative else b[key] - a[key]

        fvu = None
        if short.get("fvu") and long.get("fvu") and long["train_tokens"] > short["train_tokens"]:
            doublings = float(np.log2(long["train_tokens"] / short["train_tokens"]))
            fvu = (long["fvu"] / short["fvu"]) ** (1 / doublings) - 1
        twins.append(BudgetTwin(r, short, long, change("single_layer_share", False),
                                change("ref_ratio", True), fvu))
    if not twins:
        return None
    stable = all(t.share_change is not None and abs(t.share_change) <= BUDGET_SHARE_TOLERANCE
                 and t.ref_change is not None and abs(t.ref_change) <= BUDGET_RATIO_TOLERANCE
                 for t in twins)
    at_short = dose_trends([t.short for t in twins])
    at_long = dose_trends([t.long for t in twins])
    same = (None if at_short is None or at_long is None else
            all(_sign(getattr(at_short, m)) == _sign(getattr(at_long, m))
                for m in ("single_layer", "ref_ratio")))
    return BudgetVerdict(twins, stable, same,
                         worst_share_change=max(abs(t.share_change or 0) for t in twins),
                         worst_ref_change=max(abs(t.ref_change or 0) for t in twins))


def _sign(t: Trend) -> int:
    """+1 grows, -1 falls (by the trend rule's correlation), 0 neither."""
    if t.grows:
        return 1
    if t.correlation is not None and t.correlation <= -TREND_MIN_RANK_CORRELATION:
        return -1
    return 0


class Verdicts(NamedTuple):
    settled: SettledVerdict
    one_layer: OneLayerVerdict | None
    variance: VarianceVerdict | None
    crossings: dict[str, float | None]
    family: FamilyVerdict
    lens: LensVerdict | None
    metrics: MetricsVerdict | None
    dose: DoseVerdict | None
    budget: BudgetVerdict | None


def decide(facts: ReportFacts) -> Verdicts:
    inputs = facts.inputs
    return Verdicts(
        settled=settled(facts.grid, inputs), one_layer=one_layer(facts.activity, inputs),
        variance=variance(facts.like, facts.calibration),
        crossings=calibration_crossings(facts.calibration), family=family(facts.family),
        lens=lens(facts.activity, inputs), metrics=metrics(facts.metrics), dose=dose(facts.dose),
        budget=budget_check(facts.dose))
