"""`mlsae gc`: remove the activation caches that no unfinished run needs."""

from __future__ import annotations

import click


@click.command("gc")
@click.option("--out", "warehouse_dir", default=None,
              help="The warehouse: a directory, or the URL of one in object storage "
                   "(s3://bucket/prefix). [default: $MLSAE_HOME or ./mlsae-data]")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def command(warehouse_dir: str | None, dry_run: bool) -> None:
    """Remove activation caches that no unfinished run needs.

    A finished run keeps its cache (a rerun on the same data then trains without
    running the model). A cache is kept while its extraction is unfinished or while
    any training in the warehouse is unfinished (it resumes from the cache); a rerun
    that needs a removed cache extracts it again.

    For a warehouse in object storage (--out s3://bucket/prefix): the caches of this
    machine's working copy ($MLSAE_SCRATCH) and those shared through the bucket
    (--shared-cache), by the same rule, judged from the bucket's committed checkpoints
    and weights.

    \b
    Examples:
      mlsae gc --dry-run
      mlsae gc --out /data/wh
      mlsae gc --out s3://bucket/wh --dry-run
    """
    from mlsae.estimate import format_bytes
    from mlsae.gc import remove_unneeded_caches
    from mlsae.paths import default_warehouse_location
    from mlsae.warehouse import WarehouseError, require_warehouse

    try:  # not click.Path: it would make s3:// a local "s3:/"
        where = warehouse_dir or default_warehouse_location()
        require_warehouse(where)
        removed, kept = remove_unneeded_caches(where, dry_run=dry_run)
    except WarehouseError as err:
        raise click.ClickException(str(err)) from err
    verb = "would remove" if dry_run else "removed"
    for use in removed:
        click.echo(f"{verb} {use.path} ({format_bytes(use.bytes)})")
    for use in kept:
        click.echo(f"kept {use.path} ({format_bytes(use.bytes)}): needed by "
                   f"{', '.join(use.needed_by)}")
    click.echo(f"{verb} {len(removed)} cache(s), {format_bytes(sum(u.bytes for u in removed))}; "
               f"kept {len(kept)}, {format_bytes(sum(u.bytes for u in kept))}")
