"""`mlsae run`: the whole pipeline for one model, as a Prefect flow run.

Without options it trains on the embedded model and corpus (offline, CPU,
minutes). Prefect is imported only when the command runs, so `mlsae --help`
stays fast; without PREFECT_API_URL Prefect starts a temporary local server
for the run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

LAYERS_HELP = "Block indices the MLSAE reads, comma-separated (e.g. 0,2,4), or 'all'."


def prefect_defaults() -> None:
    """Offline-friendly Prefect settings (ENV.md), unless the user set them."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_layers(text: str | None) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as err:
        raise click.BadParameter(f"{text!r}: give comma-separated block indices like 0,1,2 "
                                 "or 'all'", param_hint="--layers") from err


def call_flow(flow_fn, **params):
    """Run a flow for a command: bad parameters and Ctrl-C become a one-line error that
    says what to do (the flow's steps are cached, so rerunning continues)."""
    from tasks.validate import InvalidParameters

    try:
        return flow_fn(**params)
    except InvalidParameters as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        raise click.ClickException("interrupted: run the same command again to continue "
                                   "from the last finished step") from None


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
    for row in result.get("variance_summary") or []:
        ratio = row.get("ratio_token")
        click.echo(f"  {row['sae_id']}: {row.get('n_live')} live latents; aggregate layer "
                   f"variance = {ratio:.3g} x the per-token one" if ratio else
                   f"  {row['sae_id']}: {row.get('n_live')} live latents")
    if examples:
        print_example_queries(out)


def print_example_queries(out: str) -> None:
    from mlsae.paths import default_warehouse
    from tasks.analyse import EXAMPLE_QUERIES

    out_opt = "" if Path(out) == default_warehouse().resolve() else f" --out {out}"
    click.echo("\nTry:")
    for what, sql in EXAMPLE_QUERIES:
        click.echo(f"  # {what}\n  mlsae sql{out_opt} \"{sql}\"")


@click.command("run")
@click.option("--model", default="embedded", show_default=True,
              help="'embedded' (ships with mlsae), a local directory saved with save_pretrained, "
                   "or a hub id such as EleutherAI/pythia-70m-deduped.")
@click.option("--data", default="embedded", show_default=True,
              help="'embedded', a local .txt/.jsonl/.parquet file or directory, or a hub data set.")
@click.option("--expansion-factor", "-R", "expansion_factors", type=int, multiple=True,
              help="n_latents = R x d_model; repeat for several MLSAEs.  [default: 4]")
@click.option("-k", "ks", type=int, multiple=True,
              help="Active latents per example (TopK); repeat for several.  [default: 16]")
@click.option("--layers", default="all", show_default=True, help=LAYERS_HELP)
@click.option("--lens/--no-lens", default=False, show_default=True,
              help="Train in the tuned-lens basis (a lens is trained first if none exists).")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also train a single-layer SAE per layer, to compare against the MLSAE.")
@click.option("--train-tokens", type=int, default=None,
              help="Training tokens per layer.  [default: 200000]")
@click.option("--eval-tokens", type=int, default=None,
              help="Held-out tokens for metrics and latent tables.  [default: 8192]")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence.  [default: 128]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Adam learning rate (the paper's 1e-4 assumes 1B tokens).  [default: 1e-3]")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Warehouse directory (default $MLSAE_HOME, else ./mlsae-data).")
@click.option("--refresh", is_flag=True,
              help="Ignore cached task results and re-run every task (finished outputs in the "
                   "warehouse are still reused: use it after deleting some of them).")
def command(model, data, expansion_factors, ks, layers, lens, baselines, train_tokens,
            eval_tokens, seq_len, seed, lr, device, out, refresh) -> None:
    """Run the whole pipeline for one model: extract, train, evaluate, log latents,
    analyse, draw figures.

    \b
    Examples:
      mlsae run                                # embedded model, default budget
      mlsae run -R 4 -R 8 -k 16 --lens         # two MLSAEs in the tuned-lens basis
      mlsae run --model EleutherAI/pythia-70m-deduped --data my_texts/ --device cuda

    Rerunning the same command reuses every finished step (cached in the
    warehouse); after a crash or Ctrl-C it continues where it stopped.
    """
    prefect_defaults()
    from flows.pipeline import (
        DEFAULT_EVAL_TOKENS,
        DEFAULT_EXPANSION_FACTORS,
        DEFAULT_KS,
        DEFAULT_LR,
        DEFAULT_SEQ_LEN,
        DEFAULT_TRAIN_TOKENS,
        pipeline,
    )
    params = dict(
        model=model, data=data,
        expansion_factors=list(expansion_factors or DEFAULT_EXPANSION_FACTORS),
        ks=list(ks or DEFAULT_KS), layers=parse_layers(layers), lens=lens, baselines=baselines,
        train_tokens=train_tokens or DEFAULT_TRAIN_TOKENS,
        eval_tokens=eval_tokens or DEFAULT_EVAL_TOKENS, seq_len=seq_len or DEFAULT_SEQ_LEN,
        seed=seed, lr=lr or DEFAULT_LR, device=device, out=str(out) if out else None,
        refresh=refresh)
    start = time.perf_counter()
    result = call_flow(pipeline, **params)
    print_outputs(result, time.perf_counter() - start)
