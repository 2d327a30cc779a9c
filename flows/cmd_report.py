"""`mlsae report`: train the report's grid on the first model (the base config on every other)
and write the generated report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from flows.cmd_run import print_plan
from flows.options import build_request, run_options, split_options
from flows.session import call_flow, fail_fast


@click.command("report")
@run_options("report", multiple_models=True)
@click.option("--copy-to", type=click.Path(path_type=Path), default=None,
              help="Also copy the report directory (report.md + figures) here, e.g. docs/report.")
def command(preset, out, refresh, dry_run, as_json, copy_to, **fields) -> None:
    """Reproduce the paper's findings on a model (and a family of models), as a generated report.

    \b
    Trains a star-shaped grid around a base config (R=4, k=16 by default) on the
    FIRST model: every R at the base k, every k at the base R, the base config
    with the tuned lens, a single-layer SAE per layer at the base config, and
    the R dose-response (--dose-R at --dose-k, and again at --dose-train-tokens
    when given: the budget check); every other --model gets the
    base-config MLSAE only, with the same budget (the cross-model section).
    Then writes <out>/report/<first model>/report.md with its figures (--out
    may be a bucket URL, s3://bucket/prefix, as for `mlsae run`).
    \b
    Examples:
      mlsae report                                   # embedded family (embedded first)
      mlsae report --copy-to docs/report             # and copy it into the docs
      mlsae report --model my-model/ -R 4 -R 16 -k 32 --base-R 16 --base-k 32
      mlsae report --model embedded --model my-bigger-model/

    Every step is cached in the warehouse: after a crash or Ctrl-C, rerun the
    same command and it continues; a finished grid only rewrites the report.
    """
    from mlsae.paths import default_warehouse_location
    from mlsae.plan import check_report_plans, report_models, report_request
    from mlsae.warehouse import check_writable, working_dir

    models = report_models(list(fields.pop("model") or []))
    parts = split_options(fields)
    request = build_request(preset, parts)
    request = fail_fast(report_request, preset, **request.given())
    where = out or default_warehouse_location()
    fail_fast(check_writable, where)
    # planned against the directory the run writes (a URL's local working copy)
    planned = fail_fast(check_report_plans, request, models, str(working_dir(where)))
    plans = planned.models
    if dry_run:
        print_plan(planned.all, as_json, where=where)
        return
    from flows.cmd_run import print_start
    from flows.report import report

    for plan in planned.all:
        print_start(plan, where)
    start = time.perf_counter()
    result = call_flow(report, preset=preset, **request.given(), models=models, out=out,
                       refresh=refresh)
    click.echo(f"\nDone in {(time.perf_counter() - start) / 60:.1f} min.")
    click.echo(f"Report: {result['report']}")
    if copy_to is not None:
        copy_report(result, plans[0]["model"]["slug"], Path(copy_to))
        click.echo(f"Copied to {copy_to}")


def copy_report(result: dict, model_slug: str, target: Path) -> None:
    """--copy-to: the report directory (report.md + figures) replaces `target`; from the
    bucket (its committed files) for a warehouse at a URL."""
    from mlsae.warehouse import is_url, report_prefix

    if target.exists():
        shutil.rmtree(target)
    if not is_url(result["out"]):
        shutil.copytree(result["report_dir"], target)
        return
    from mlsae.warehouse.remote import download

    download(result["out"], report_prefix(model_slug), target)
