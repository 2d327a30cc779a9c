"""`mlsae serve`: the explorer page and its JSON API over a warehouse (read-only).

No Prefect: it runs mlsae.serve's FastAPI app with uvicorn. See docs/serve.md.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlsae.paths import default_warehouse_location


def _check_port(host: str, port: int) -> None:
    """Fail with our message before uvicorn starts (it prints its own error and exits)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                                       "pick another --port") from e


@click.command("serve")
@click.option("--out", "warehouse", default=None,
              help="Warehouse directory, or the URL of one in object storage (s3://bucket/"
                   "prefix: its tables are read through a local mirror, an SAE's weights "
                   "pulled on first use) (default: $MLSAE_HOME, else ./mlsae-data).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default is this machine only; any other "
                   "address lets others on the network read the warehouse (a warning says so).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="TCP port.")
@click.option("--device", default="auto", show_default=True,
              help="Where models and autoencoders run: auto (a GPU when there is one), cpu, cuda.")
def command(warehouse: str | None, host: str, port: int, device: str) -> None:
    """Explore the warehouse in a browser: the autoencoders and their metrics, any prompt's
    latents per layer (heatmap, token colouring, logits clean / reconstructed / steered),
    and each latent's layer distribution, statistics and top contexts.

    \b
    Pages: /  /prompt?sae=ID&text=...  /latent?sae=ID&latent=J
    API:   GET /api/saes, POST /api/prompt, GET /api/latent/{sae_id}/{latent}  (/openapi.json)
    """
    from mlsae import warehouse as wh
    from mlsae.serve.app import exposure_warning, serve

    try:  # not click.Path: it would make s3:// a local "s3:/"
        root = warehouse or default_warehouse_location()
        wh.require_warehouse(root)
    except wh.WarehouseError as e:
        raise click.ClickException(str(e)) from e
    _check_port(host, port)
    warning = exposure_warning(host)
    if warning:
        click.secho(f"Warning: {warning}", fg="yellow", err=True)
    shown = f"[{host}]" if ":" in host else host
    named = wh.warehouse_url(root) if wh.is_url(root) else Path(root).resolve()
    click.echo(f"mlsae explorer on http://{shown}:{port}/ (warehouse {named}); "
               "Ctrl-C stops it", err=True)
    try:
        serve(root, host=host, port=port, device=device)
    except wh.WarehouseError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                                   "pick another --port") from e
