"""The report flow: reproduce the paper's findings on one model as a generated report.

    validate the grid (no compute) -> the pipeline's task graph over the grid ->
    write-report (Markdown + PNG into <warehouse>/report/<model>/, a Prefect artifact)

The grid is a "star" around one base config (R0, k0): the MLSAE at every R in
`expansion_factors` with k0, at every k in `ks` with R0, the base config in the
tuned-lens basis, and single-layer SAEs for every layer at the base config. One
axis moves at a time, so each comparison in the report changes one thing, and
the grid costs len(R) + len(k) + 1 MLSAEs instead of a full product.

Every step is a cached pipeline task (inputs + task source + mlsae version,
results in the warehouse), and the library steps resume from their
checkpoints, so an interrupted report run continues where it stopped; the
report itself is rewritten on every run (it is cheap).
"""

from __future__ import annotations

import inspect
import time
from typing import TypedDict

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import DEFAULT_LR, DEFAULT_SEQ_LEN, bind_tasks, resolve_out, submit_model
from tasks.common import ensure_gpu_limit, run_logger
from tasks.report import ReportManifest, report_command, write_report
from tasks.validate import InvalidParameters, PipelinePlan, check_pipeline_parameters

# Budgets for the embedded model (6 blocks x d_model 256, ~2.6M training tokens in
# its corpus): 2M tokens per layer is one pass over 3/4 of the corpus. Steps of
# 1024 tokens (1953 of them; 6144 examples per MLSAE step) rather than the
# pipeline's 4096: at 488 steps FVU was still falling ~6% over the last fifth.
# The report shows each run's curve and its change over the last fifth.
REPORT_TRAIN_TOKENS = 2_000_000
REPORT_BATCH_TOKENS = 1024
REPORT_EVAL_TOKENS = 16_384
REPORT_EXPANSION_FACTORS = (2, 4, 8)
REPORT_KS = (8, 16, 32)
BASE_EXPANSION_FACTOR = 4
BASE_K = 16


class ReportResult(TypedDict):
    out: str
    report: str
    """The generated Markdown file."""
    report_dir: str
    sae_ids: list[str]
    seconds: float


def star_plan(plan: PipelinePlan, base_r: int, base_k: int) -> PipelinePlan:
    """Keep, of a full R x k x lens (x baselines) plan, the star around (base_r, base_k):
    the MLSAE along each axis without the lens, the base MLSAE with the lens, and the
    base config's single-layer baselines (without the lens)."""
    def wanted(spec) -> bool:
        r, k, lens = spec["expansion_factor"], spec["k"], spec["lens"]
        base = (r, k) == (base_r, base_k)
        if spec["role"] == "baseline":
            return base and not lens
        return base or (not lens and (r == base_r or k == base_k))

    return PipelinePlan(**{**plan, "specs": [s for s in plan["specs"] if wanted(s)]})


def check_report_parameters(model: str, data: str, expansion_factors: list[int], ks: list[int],
                            base_expansion_factor: int, base_k: int, lens: bool,
                            train_tokens: int, eval_tokens: int, seq_len: int, seed: int,
                            lr: float, device: str, batch_tokens: int) -> PipelinePlan:
    """The star grid's plan; InvalidParameters listing every problem before any compute."""
    rs = sorted({int(r) for r in expansion_factors} | {int(base_expansion_factor)})
    all_ks = sorted({int(k) for k in ks} | {int(base_k)})
    plan = check_pipeline_parameters(
        model=model, data=data, expansion_factors=rs, ks=all_ks, layers=None,
        lens=[False, True] if lens else [False], baselines=True, train_tokens=train_tokens,
        eval_tokens=eval_tokens, seq_len=seq_len, seed=seed, device=device, lr=lr,
        batch_tokens=batch_tokens)
    if plan["model"]["n_layers"] < 2:
        raise InvalidParameters(f"model {plan['model']['name']!r} has one block: a multi-layer "
                                "report needs at least two")
    return star_plan(plan, int(base_expansion_factor), int(base_k))


@flow(name="mlsae-report", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True,
      validate_parameters=True)
def report(
    model: str = "embedded",
    data: str = "embedded",
    expansion_factors: list[int] = list(REPORT_EXPANSION_FACTORS),  # noqa: B006 - never mutated
    ks: list[int] = list(REPORT_KS),  # noqa: B006
    base_expansion_factor: int = BASE_EXPANSION_FACTOR,
    base_k: int = BASE_K,
    lens: bool = True,
    train_tokens: int = REPORT_TRAIN_TOKENS,
    batch_tokens: int = REPORT_BATCH_TOKENS,
    eval_tokens: int = REPORT_EVAL_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    device: str = "auto",
    out: str | None = None,
    refresh: bool = False,
) -> ReportResult:
    """Train the report's grid on one model and write the report of the paper's findings.

    Args:
        model: "embedded", a local directory or a hub id (as for the pipeline).
        data: the text, as for the pipeline.
        expansion_factors: R values, each trained at k = base_k.
        ks: k values, each trained at R = base_expansion_factor.
        base_expansion_factor, base_k: the base config; it also gets single-layer SAEs
            for every layer and (with `lens`) a tuned-lens MLSAE.
        lens: include the base config in the tuned-lens basis.
        train_tokens: training tokens per layer for every autoencoder of the grid.
        batch_tokens: tokens per optimizer step.
        eval_tokens: held-out tokens for the metrics and the latent tables.
        seq_len, seed, lr, device: as for the pipeline.
        out: the warehouse (default $MLSAE_HOME, else ./mlsae-data); the report goes to
            <out>/report/<model>/report.md.
        refresh: ignore cached task results (finished warehouse outputs are still reused).
    """
    start = time.time()
    out_dir = resolve_out(out)
    plan = check_report_parameters(
        model=model, data=data, expansion_factors=list(expansion_factors), ks=list(ks),
        base_expansion_factor=base_expansion_factor, base_k=base_k, lens=lens,
        train_tokens=train_tokens, eval_tokens=eval_tokens, seq_len=seq_len, seed=seed, lr=lr,
        device=device, batch_tokens=batch_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_gpu_limit()
    run_logger().info("report grid: %d autoencoders on %s, %d training tokens per layer",
                      len(plan["specs"]), plan["model"]["name"], train_tokens)
    steps = bind_tasks(out_dir, refresh)
    figures, analyses = submit_model(plan, out_dir, steps)
    params = dict(model=model, data=data, expansion_factors=list(expansion_factors), ks=list(ks),
                  base_expansion_factor=base_expansion_factor, base_k=base_k, lens=lens,
                  train_tokens=train_tokens, batch_tokens=batch_tokens, eval_tokens=eval_tokens,
                  seq_len=seq_len, seed=seed,
                  lr=lr, device=device, out=out)
    manifest: ReportManifest = write_report.submit(
        plan=plan, base=(int(base_expansion_factor), int(base_k)), figures=figures,
        analyses=list(analyses.values()), command=report_command(params, REPORT_DEFAULTS),
        started_at=start, out=str(out_dir), out_arg=out).result()
    return ReportResult(out=str(out_dir), report=manifest["report"],
                        report_dir=manifest["report_dir"],
                        sae_ids=[s["sae_id"] for s in plan["specs"]],
                        seconds=round(time.time() - start, 1))


# The flow's defaults, read from its signature (one place): the CLI fills unset options
# from them, and the report's reproduce command names only what differs.
REPORT_DEFAULTS = {name: p.default for name, p in inspect.signature(report.fn).parameters.items()}
