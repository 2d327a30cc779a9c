"""`mlsae report`: train the report's grid on one model and write the generated report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from flows.cmd_run import print_plan
from flows.options import build_request, run_options, split_options
from flows.session import call_flow, fail_fast


@click.command("report")
@run_options("report")
@click.option("--copy-to", type=click.Path(path_type=Path), default=None,
              help="Also copy the report directory (report.md + figures) here, e.g. docs/report.")
def command(preset, out, refresh, dry_run, as_json, copy_to, **fields) -> None:
    """Reproduce the paper's findings on one model, as a generated report.

    \b
    Trains a star-shaped grid around a base config (R=4, k=16 by default):
      every R at the base k, every k at the base R, the base config with the
      tuned lens, and a single-layer SAE per layer at the base config,
    then writes <out>/report/<model>/report.md with its figures.
    \b
    Examples:
      mlsae report                                   # embedded model (~35 min on 2 cores)
      mlsae report --copy-to docs/report             # and copy it into the docs
      mlsae report --model my-model/ -R 4 -R 16 -k 32 --base-R 16 --base-k 32

    Every step is cached in the warehouse: after a crash or Ctrl-C, rerun the
    same command and it continues; a finished grid only rewrites the report.
    """
    from mlsae.plan import check_report_plan, report_request

    parts = split_options(fields)
    request = build_request(preset, parts)
    request = fail_fast(report_request, preset, **request.given())
    plan = fail_fast(check_report_plan, request, out)
    if dry_run:
        print_plan([plan], as_json)
        return
    from flows.cmd_run import print_start
    from flows.report import report

    print_start(plan)
    start = time.perf_counter()
    result = call_flow(report, preset=preset, **request.given(), out=out, refresh=refresh)
    click.echo(f"\nDone in {(time.perf_counter() - start) / 60:.1f} min.")
    click.echo(f"Report: {result['report']}")
    if copy_to is not None:
        target = Path(copy_to)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(result["report_dir"], target)
        click.echo(f"Copied to {target}")
