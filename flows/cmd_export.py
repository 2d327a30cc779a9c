"""`mlsae export SAE_ID --format saelens|sparsify --layer L --to DIR`: one warehouse
autoencoder as files SAELens or sparsify load (mlsae.interop.exports; docs/interop.md).
No Prefect: it reads one saved autoencoder and writes two files."""

from __future__ import annotations

import click

from flows.session import fail_fast


@click.command("export")
@click.argument("sae_id")
@click.option("--format", "fmt", type=click.Choice(["saelens", "sparsify"]), required=True,
              help="saelens: DIR/cfg.json + DIR/sae_weights.safetensors (SAE.load_from_disk); "
                   "sparsify: DIR/layers.L/cfg.json + sae.safetensors "
                   "(SparseCoder.load_from_disk).")
@click.option("--layer", type=int, default=None,
              help="The block the exported SAE reads (an MLSAE's weights serve every layer it "
                   "was trained on). [default: a single-layer SAE's layer]")
@click.option("--to", "to", required=True, help="Output directory.")
@click.option("--standardized-inputs", is_flag=True,
              help="sparsify only: export an SAE trained with per-vector standardisation as "
                   "the SAE of standardised vectors (sparsify cannot standardise; see "
                   "docs/interop.md).")
@click.option("--out", default=None,
              help="Warehouse: a directory or a URL such as s3://bucket/prefix (default "
                   "$MLSAE_HOME, else ./mlsae-data).")
def command(sae_id, fmt, layer, to, standardized_inputs, out) -> None:
    """Export an autoencoder for SAELens or sparsify.

    \b
    Examples:
      mlsae export embedded-R4-k16-all-1a2b3c4d --format saelens --layer 3 --to sae-l3/
      mlsae export my-sae --format sparsify --layer 3 --to sparsify-sae/ --standardized-inputs
    """
    from mlsae.interop.exports import ExportRequest, export_sae
    from mlsae.paths import default_warehouse_location
    from mlsae.warehouse import require_warehouse, working_dir
    from mlsae.warehouse.workspace import pull_weights

    where = out or default_warehouse_location()
    fail_fast(require_warehouse, where)
    request = fail_fast(lambda: ExportRequest(sae_id=sae_id, format=fmt, layer=layer, to=to,
                                              standardized_inputs=standardized_inputs))
    fail_fast(pull_weights, where, sae_id)  # a bucket's committed weights, to the working copy
    result = fail_fast(export_sae, request, working_dir(where))
    click.echo(f"{result.sae_id} (layer {result.layer}) -> {result.format}:")
    for path in result.files:
        click.echo(f"  {path}")
    for note in result.notes:
        click.echo(f"Note: {note}")
