"""`mlsae import SOURCE --model MODEL`: an autoencoder saved by another tool (the paper's
released MLSAEs, SAELens, sparsify) into the warehouse, then evaluated, logged and
analysed like a trained one (flows/imported.py, a Prefect flow run). Every check (files,
format, dimensions against the model, data) runs before Prefect starts."""

from __future__ import annotations

import click

from flows.session import call_flow, fail_fast
from mlsae.plan import PRESETS, parse_layers


@click.command("import")
@click.argument("source")
@click.option("--model", required=True,
              help="The language model the autoencoder reads: 'embedded', a local directory "
                   "or a hub id (the paper's Pythia SAEs: EleutherAI/pythia-70m-deduped, ...).")
@click.option("--sae-id", default=None,
              help="Its id in the warehouse. [default: <format>-<source name>]")
@click.option("--layers", default=None,
              help="Blocks it reads, comma-separated. [default: the checkpoint's record, "
                   "else every block]")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="demo", show_default=True,
              help="Evaluation budget (held-out tokens, sequence length) of the steps after "
                   "the import.")
@click.option("--data", default=None, help="Held-out text for the metrics and latent tables "
                                           "(as `mlsae run --data`). [default: embedded]")
@click.option("--eval-tokens", type=int, default=None, help="Held-out tokens.")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence.")
@click.option("--device", default=None, help="auto, cpu, cuda, ... [default: auto]")
@click.option("--out", default=None,
              help="Warehouse: a directory or a URL such as s3://bucket/prefix, written through "
                   "a working copy in $MLSAE_SCRATCH (default $MLSAE_HOME, else ./mlsae-data).")
@click.option("--refresh", is_flag=True, help="Ignore cached step results and rerun them.")
def command(source, model, sae_id, layers, preset, data, eval_tokens, seq_len, device, out,
            refresh) -> None:
    """Import an autoencoder (the paper's MLSAE format, SAELens or sparsify) and analyse it.

    SOURCE is a local directory or a hub id. Offline, download it elsewhere with
    `hf download REPO --local-dir DIR` and pass DIR.

    \b
    Examples:
      mlsae import ./mlsae-pythia-70m-deduped-x64-k32 --model EleutherAI/pythia-70m-deduped
      mlsae import tim-lawson/mlsae-pythia-70m-deduped-x64-k32-tfm --model pythia-70m/
      mlsae import exported/layers.3 --model embedded --sae-id my-sae-again
    """
    from flows.imported import import_flow
    from flows.pipeline import resolve_warehouse
    from mlsae.interop.imports import ImportRequest, describe, plan_import_run
    from mlsae.warehouse import working_dir

    target = {k: v for k, v in (("data", data), ("device", device)) if v is not None}
    budget = {k: v for k, v in (("eval_tokens", eval_tokens), ("seq_len", seq_len))
              if v is not None}
    request = fail_fast(lambda: ImportRequest(source=source, model=model, sae_id=sae_id,
                                              layers=parse_layers(layers) if layers else None))
    # planned against the directory the import writes (a URL's local working copy)
    where = fail_fast(resolve_warehouse, out)
    plan, _ = fail_fast(plan_import_run, request, preset, target, budget, working_dir(where))
    click.echo(describe(plan), err=True)
    for warning in plan.warnings:
        click.echo(f"Warning: {warning}", err=True)
    result = call_flow(import_flow, source=source, model=model, sae_id=sae_id,
                       layers=request.layers, preset=preset, target=target, budget=budget,
                       out=out, refresh=refresh)
    click.echo(f"\n{result['sae_id']} -> warehouse {result['out']}")
    click.echo(f"  autoencoder: {result['sae_dir']} (MLSAE.from_pretrained)")
    for row in result["layer_metrics"]:
        click.echo(f"  layer {row['layer']}: FVU {row['fvu']:.4g}, L0 {row['l0']:.3g}"
                   + (f", delta CE {row['delta_ce']:.4g}" if row.get("delta_ce") is not None
                      else ""))
    for row in result["variance_summary"]:
        ratio = row.get("ratio_token")
        click.echo(f"  {row.get('n_live')} live latents" + (
            f"; aggregate layer variance = {ratio:.3g} x the per-token one" if ratio else ""))
    click.echo(f"\nTry:\n  mlsae sql --out {result['out']} \"SELECT * FROM variance_summary "
               f"WHERE sae_id = '{result['sae_id']}'\"")
