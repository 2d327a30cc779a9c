"""The `mlsae` command line. Each command lives in its own module flows/cmd_<name>.py
and is registered here; modules that need Prefect import it inside the command,
so `mlsae sql` and `mlsae --help` stay fast."""

from __future__ import annotations

import click


class _Commands(click.Group):
    """Warehouse errors (a bad --out or $MLSAE_HOME) end any command as one Error: line."""

    def invoke(self, ctx: click.Context):
        from mlsae.warehouse.errors import WarehouseError

        try:
            return super().invoke(ctx)
        except WarehouseError as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlsae")
def main() -> None:
    """Multi-layer sparse autoencoders on the residual stream.

    Train MLSAEs on every layer of a language model, log their latents as
    Parquet and query them with DuckDB. Everything defaults to the small model
    and corpus shipped with mlsae, so `mlsae run` works offline as is.
    """


# Registered commands (one line each; keep sorted).
_COMMANDS: list[str] = ["deploy", "export", "extract", "gc", "import", "report", "run", "serve",
                        "sql", "sweep"]


def _register() -> None:
    import importlib

    for name in _COMMANDS:
        module = importlib.import_module(f"flows.cmd_{name}")
        main.add_command(module.command)


_register()

if __name__ == "__main__":
    main()
