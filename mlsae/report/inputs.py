"""What the report is asked to describe: the grid of autoencoders, the models, the budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GridEntry:
    """One autoencoder of the report's grid."""

    sae_id: str
    role: str
    """"mlsae" or "baseline" (a single-layer SAE)."""
    expansion_factor: int
    k: int
    lens: bool
    """Trained in the tuned-lens basis."""
    layers: list[int]
    """Model blocks it reads (one for a single-layer SAE)."""
    run_dir: str
    """Its training directory (train_summary.json, the saved autoencoder under sae/)."""
    train_tokens: int | None = None
    """Training tokens per layer when not the report's budget (the dose-response at its own
    budget); None: the report's budget."""

    @property
    def label(self) -> str:
        if self.role == "baseline":
            return f"layer-{self.layers[0]} SAE R{self.expansion_factor} k{self.k}"
        budget = f" at {short_tokens(self.train_tokens)}" if self.train_tokens else ""
        return f"MLSAE R{self.expansion_factor} k{self.k}{' lens' if self.lens else ''}{budget}"


def short_tokens(n: int) -> str:
    """8000000 -> "8M", 16384 -> "16k", 1500000 -> "1.5M": a token budget in a label."""
    for size, unit in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the cross-model section: its shape and its base-config MLSAE."""

    name: str
    """The model as the `saes` table names it ("embedded", a directory, a hub id)."""
    n_layers: int
    """Blocks the MLSAE reads (L)."""
    d_model: int
    base_id: str
    """Its MLSAE at the report's base config (R, k), without the lens."""
    n_params: int | None = None
    """Parameters of the model (from its weight files); None when unknown."""
    cache_dir: str | None = None
    """Its training activation cache (Fig. 1's residual sample); None for a streamed run."""
    extract: Any = None
    """mlsae.extract.ExtractConfig of a residual sample (a few thousand tokens) to stream when
    there is no cache."""

    @property
    def label(self) -> str:
        """A short name for legends: the last part of a directory or hub id."""
        return Path(self.name).name or self.name

    @property
    def size(self) -> int:
        """n_layers x d_model: the size axis when parameter counts are unknown."""
        return self.n_layers * self.d_model


@dataclass
class ReportInputs:
    """Everything the report reads besides the warehouse's tables."""

    warehouse: Path | str
    """The warehouse the pipeline filled, whose tables the report reads: a directory, or a
    URL (s3://bucket/prefix; read through its local mirror, committed parts only)."""
    model: str
    """The first model: the one with the full star grid."""
    data: str
    """The text the autoencoders were trained and evaluated on."""
    n_layers: int
    """Blocks the first model's MLSAEs read (L)."""
    d_model: int
    grid: list[GridEntry]
    """Every autoencoder trained on the first model: MLSAEs and single-layer SAEs."""
    base_id: str
    """The base MLSAE: compared with the single-layer SAEs, drawn in the figures."""
    train_tokens: int
    """Training tokens per layer, the same for every autoencoder."""
    eval_tokens: int
    """Held-out tokens of the metrics and the latent tables."""
    seq_len: int
    lr: float
    batch_tokens: int
    """Tokens per optimizer step."""
    command: str
    """The command that regenerates the report."""
    warehouse_arg: str | None = None
    """How the commands shown in the report name the warehouse (`--out ...`); None = the
    default warehouse ($MLSAE_HOME), so no --out."""
    pipeline_figures: list[str] = field(default_factory=list)
    """PNG files the pipeline drew (Fig. 1-3, MMCS, layer std by config), copied in."""
    cache_dir: str | None = None
    """The first model's training activation cache (for the Fig. 1 numbers)."""
    extract: Any = None
    """The first model's ExtractConfig of Fig. 1's sample, streamed when there is no cache."""
    n_params: int | None = None
    """The first model's parameter count (None: unknown)."""
    family: list[ModelEntry] = field(default_factory=list)
    """The other models (base-config MLSAE each) for the cross-model section."""
    dose_k: int | None = 32
    """k of the R dose-response section (the grid's MLSAEs at this k, every R found); None:
    no dose-response."""
    started_at: float | None = None
    """Unix time this report run started (for the runtime ledger)."""
    device: str = "cpu"
    """Where the autoencoders were trained (named in the runtime paragraph)."""
    calibration_tokens: int = 8192
    """Tokens per synthetic table of the calibration (section 3): 4 batches of 2048."""
    dose_grid: list[GridEntry] = field(default_factory=list)
    """The dose-response's MLSAEs at their own budget (dose_train_tokens): the dose section
    reads these, and the budget check compares each with its twin in `grid` (same R and k at
    the report's budget). Empty: the dose-response at the report's budget only."""
    dose_train_tokens: int | None = None
    """Training tokens per layer of `dose_grid`."""

    def __post_init__(self) -> None:
        ids = [e.sae_id for e in self.grid]
        if self.base_id not in ids:
            raise ValueError(f"base autoencoder {self.base_id!r} is not in the grid")
        if len(set(ids)) != len(ids):
            raise ValueError("the grid lists an autoencoder twice")
        if bool(self.dose_grid) != (self.dose_train_tokens is not None):
            raise ValueError("dose_grid and dose_train_tokens go together")
        if self.dose_train_tokens == self.train_tokens:
            raise ValueError("dose_train_tokens equals train_tokens: no second budget")
        if {e.sae_id for e in self.dose_grid} & set(ids):
            raise ValueError("an autoencoder of dose_grid is also in the grid")
        if any(e.role != "mlsae" or e.lens or e.k != self.dose_k for e in self.dose_grid):
            raise ValueError("dose_grid holds MLSAEs at dose_k without the lens only")

    @property
    def mlsaes(self) -> list[GridEntry]:
        return [e for e in self.grid if e.role == "mlsae"]

    @property
    def base(self) -> GridEntry:
        return next(e for e in self.grid if e.sae_id == self.base_id)

    @property
    def baselines(self) -> list[GridEntry]:
        return sorted((e for e in self.grid if e.role == "baseline"), key=lambda e: e.layers[0])

    @property
    def report_mlsaes(self) -> list[GridEntry]:
        """The grid's MLSAEs, then the dose-response's at its own budget."""
        return [*self.mlsaes, *self.dose_grid]

    @property
    def dose_line(self) -> list[GridEntry]:
        """The dose-response the report reads, by R: the MLSAEs at dose_k (no lens) at the
        dose budget when there is one, else at the report's budget."""
        at_k = self.dose_grid or [e for e in self.mlsaes if not e.lens and e.k == self.dose_k]
        return sorted(at_k, key=lambda e: e.expansion_factor)

    @property
    def budget_twins(self) -> list[tuple[GridEntry, GridEntry]]:
        """(at the report's budget, at the dose budget) for every dose R trained at both."""
        at_budget = {e.expansion_factor: e for e in self.mlsaes
                     if not e.lens and e.k == self.dose_k}
        return [(at_budget[e.expansion_factor], e) for e in self.dose_line
                if self.dose_grid and e.expansion_factor in at_budget]

    @property
    def lens_entry(self) -> GridEntry | None:
        """The MLSAE at the base (R, k) in the tuned-lens basis, if the grid has one."""
        base = self.base
        return next((e for e in self.mlsaes if e.lens and (e.expansion_factor, e.k)
                     == (base.expansion_factor, base.k)), None)

    @property
    def models(self) -> list[ModelEntry]:
        """Every model of the report, the first (star grid) first."""
        first = ModelEntry(self.model, self.n_layers, self.d_model, self.base_id,
                           self.n_params, self.cache_dir, self.extract)
        return [first, *self.family]
