"""`mlsae extract`: residual-stream activations of a model into an on-disk cache.

Runs the library directly (no Prefect server needed): the cache is resumable,
so rerunning the same command after a crash or a kill continues where it
stopped, and rerunning a finished one does nothing.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlsae.paths import default_warehouse_location
from mlsae.plan import parse_layers


@click.command("extract")
@click.option("--model", default="embedded", show_default=True,
              help="Local model directory, hub id, or 'embedded'.")
@click.option("--data", "data_source", default="embedded", show_default=True,
              help="Local .txt/.jsonl/.parquet file or directory, hub data set, or 'embedded'.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--text-column", default="text", show_default=True,
              help="Field holding the text in JSONL/Parquet/hub rows.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--layers", default="all", show_default=True,
              help="Block indices to store, comma-separated, or 'all'.")
@click.option("--max-sequences", type=int, default=None,
              help="Stop after this many sequences (default: the whole split).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--shard-sequences", type=int, default=64, show_default=True,
              help="Sequences per shard (the unit of atomic writes and resuming).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the activations.")
@click.option("--model-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True, help="Dtype the model runs in.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--out", default=None,
              help="Warehouse: a directory or a URL such as s3://bucket/prefix, whose cache "
                   "then goes to this machine's working copy ($MLSAE_SCRATCH), as a run's "
                   "does (default $MLSAE_HOME, else ./mlsae-data).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="Cache directory (default OUT/activations/<model>-<split>-<config hash>).")
def command(model, data_source, split, text_column, seq_len, layers, max_sequences, batch_size,
            shard_sequences, dtype, model_dtype, device, out, cache_dir) -> None:
    """Extract block outputs (the residual stream) into a resumable activation cache."""
    from mlsae import warehouse
    from mlsae.cache import CacheError
    from mlsae.data import DataConfig, DataError
    from mlsae.extract import ExtractConfig, cache_key, extract_to_cache
    from mlsae.models import ModelLoadError

    try:
        cfg = ExtractConfig(
            model=model,
            data=DataConfig(source=data_source, split=split, seq_len=seq_len,
                            text_column=text_column),
            layers=parse_layers(layers), batch_size=batch_size,
            shard_sequences=shard_sequences, dtype=dtype, device=device,
            max_sequences=max_sequences, model_dtype=model_dtype,
        )
        target = cache_dir or warehouse.activation_cache_dir(
            out or default_warehouse_location(), cache_key(cfg))
        cache = extract_to_cache(cfg, target)
    except (ModelLoadError, DataError, CacheError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    m = cache.manifest
    click.echo(f"activation cache: {target}")
    click.echo(f"model {m.model} | layers {m.layers} | d_model {m.d_model} | seq_len {m.seq_len} "
               f"| {m.n_sequences} sequences | {m.n_tokens} unmasked tokens | "
               f"{len(m.shards)} shards of {m.dtype}")
