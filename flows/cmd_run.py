"""`mlsae run`: the whole pipeline for one model, as a Prefect flow run.

Without options it trains on the embedded model and corpus (offline, CPU,
minutes). The options come from mlsae/plan.py (flows/options.py); the request is
planned and checked before Prefect is imported, so bad input fails in well under
a second. Without PREFECT_API_URL the command starts a temporary local server
for the run (flows/session.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from flows.options import build_request, run_options, split_options
from flows.session import call_flow, fail_fast


def _trained(plan: dict, where) -> set[str]:
    """The plan's autoencoders already trained in the warehouse `where` (None: none)."""
    from mlsae.warehouse.remote import trained_autoencoders

    return trained_autoencoders(where, [s["sae_id"] for s in plan["specs"]]) if where else set()


def print_plan(plans: list, as_json: bool, probe: bool = True, where=None) -> None:
    """--dry-run: the plan(s) and their estimated cost; nothing is written. where: the
    warehouse, whose finished training is not counted again."""
    from mlsae.estimate import estimate_plan, format_estimate

    estimates = [fail_fast(estimate_plan, plan, probe=probe, trained=_trained(plan, where))
                 for plan in plans]
    if as_json:
        click.echo(json.dumps(estimates[0] if len(estimates) == 1 else
                              {"models": estimates}, indent=1))
    else:
        for estimate in estimates:
            click.echo(format_estimate(estimate))


def print_start(plan: dict, where=None) -> None:
    """What the run will cost (the dry run's estimate, probed), before it starts."""
    from mlsae.estimate import estimate_plan, format_estimate

    estimate = fail_fast(estimate_plan, plan, trained=_trained(plan, where))
    click.echo(format_estimate(estimate, dry_run=False), err=True)


def print_caches(out: str) -> None:
    """The disk the warehouse's activation caches hold (kept for reruns)."""
    from mlsae.estimate import format_bytes
    from mlsae.gc import total_cache_bytes

    held = total_cache_bytes(out)
    if held:
        click.echo(f"  activation caches: {format_bytes(held)} (kept so reruns on this data "
                   "skip the model; `mlsae gc` removes those no unfinished run needs)")


def print_outputs(result: dict, seconds: float | None, examples: bool = True) -> None:
    """Where the tables and figures are, and three queries to try."""
    out = result["out"]
    if seconds is not None:
        click.echo(f"\nDone in {seconds / 60:.1f} min.")
    click.echo(f"\n{result['model']} -> warehouse {out}")
    click.echo("  tables (Parquet): " + ", ".join(
        f"{name} ({path})" for name, path in result["tables"].items()))
    click.echo("  views: latent_layers, latent_stats, variance_summary, latent_heatmap, "
               "top_contexts(), ... (defined in sql/)")
    click.echo(f"  autoencoders: {out}/autoencoders/<sae_id> (safetensors + config.json)")
    click.echo("  figures:")
    for path in result["figures"]:
        click.echo(f"    {path}")
    print_caches(out)
    for row in result.get("variance_summary") or []:
        ratio, live = row.get("ratio_token"), row.get("n_live")
        if live is None:  # an autoencoder whose latents were not logged
            click.echo(f"  {row['sae_id']}: latents not logged")
            continue
        click.echo(f"  {row['sae_id']}: {live} live latents; aggregate layer variance = "
                   f"{ratio:.3g} x the per-token one" if ratio else
                   f"  {row['sae_id']}: {live} live latents")
    if examples:
        print_example_queries(out)


def print_example_queries(out: str) -> None:
    from mlsae.paths import default_warehouse_location
    from mlsae.warehouse import is_url
    from tasks.analyse import EXAMPLE_QUERIES

    home = default_warehouse_location()
    same = out == home if is_url(out) else not is_url(home) and Path(out) == Path(home).resolve()
    out_opt = "" if same else f" --out {out}"
    click.echo("\nTry:")
    for what, sql in EXAMPLE_QUERIES:
        click.echo(f"  # {what}\n  mlsae sql{out_opt} \"{sql}\"")


@click.command("run")
@run_options("run")
def command(preset, out, refresh, dry_run, as_json, **fields) -> None:
    """Run the whole pipeline for one model: extract, train, evaluate, log latents,
    analyse, draw figures.

    \b
    Examples:
      mlsae run                                # embedded model, demo budget
      mlsae run -R 4 -R 8 -k 16 --lens         # two MLSAEs in the tuned-lens basis
      mlsae run --model EleutherAI/pythia-70m-deduped --preset paper --dry-run
      mlsae run --model my-model/ --data my_texts/ --device cuda --precision bfloat16

    Every option left out takes the preset's value (shown in [...]). The request is
    checked before anything starts. Rerunning the same command reuses every finished
    step (cached in the warehouse); after a crash or Ctrl-C it continues where it stopped.
    """
    from mlsae.paths import default_warehouse_location
    from mlsae.plan import make_plan
    from mlsae.warehouse import check_writable, working_dir

    parts = split_options(fields)
    request = build_request(preset, parts)
    where = out or default_warehouse_location()
    fail_fast(check_writable, where)
    # planned against the directory the run writes (a URL's local working copy)
    plan = fail_fast(make_plan, request, working_dir(where))
    if dry_run:
        print_plan([plan], as_json, where=where)
        return
    print_start(plan, where)
    from flows.pipeline import pipeline

    start = time.perf_counter()
    result = call_flow(pipeline, preset=preset, **request.given(), out=out, refresh=refresh)
    print_outputs(result, time.perf_counter() - start)
