"""`mlsae gc`: remove the activation caches that no unfinished run needs."""

from __future__ import annotations

import click


@click.command("gc")
@click.option("--out", "warehouse_dir", default=None, help="The warehouse. [default: $MLSAE_HOME or ./mlsae-data]")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def command(warehouse_dir: str | None, dry_run: bool) -> None:
    """Remove activation caches that no unfinished run needs.

    A finished run keeps its cache (a rerun on the same data then trains without
    running the model). A cache is kept while its extraction is unfinished or while
    any training in the warehouse is unfinished (it resumes from the cache); a rerun
    that needs a removed cache extracts it again.

    \b
    Examples:
      mlsae gc --dry-run
      mlsae gc --out /data/wh
    """
    from mlsae.estimate import format_bytes
    from mlsae.gc import remove_unneeded_caches
    from mlsae.paths import default_warehouse
    from mlsae.warehouse import WarehouseError, check_local, require_warehouse

    try:  # a URL is named as one (click.Path would have made s3:// a local "s3:/")
        where = check_local(warehouse_dir) if warehouse_dir else default_warehouse()
        require_warehouse(where)
    except WarehouseError as err:
        raise click.ClickException(str(err)) from err
    removed, kept = remove_unneeded_caches(where, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for use in removed:
        click.echo(f"{verb} {use.path} ({format_bytes(use.bytes)})")
    for use in kept:
        click.echo(f"kept {use.path} ({format_bytes(use.bytes)}): needed by "
                   f"{', '.join(use.needed_by)}")
    click.echo(f"{verb} {len(removed)} cache(s), {format_bytes(sum(u.bytes for u in removed))}; "
               f"kept {len(kept)}, {format_bytes(sum(u.bytes for u in kept))}")
