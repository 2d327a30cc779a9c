"""The options of `mlsae run/sweep/report`, generated from the request dataclasses.

Every field of mlsae.plan.Target / Grid / Budget with `cli` metadata becomes one
option: its name is the field's (`--train-tokens`), its help is the field's
docstring followed by the presets' values, its default is unset (None), so the
preset fills it and an explicit value always wins. A new option is one field.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import click

from mlsae.plan import (
    PARTS,
    PRESETS,
    REPORT_MODELS,
    InvalidRequest,
    RunRequest,
    field_docs,
    nest_fields,
)

COMMON_OPTIONS = ("preset", "out", "refresh", "dry_run", "as_json")
"""Options every run-like command has besides the request fields."""


def _base_type(cls: type, name: str) -> Any:
    """int / float / str / bool / list[int] of a field, with its `| None` removed."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _preset_values(part: str, name: str) -> str:
    values = []
    for preset, content in PRESETS.items():
        if name in content.get(part, {}):
            value = content[part][name]
            if isinstance(value, list):
                value = ",".join(map(str, value))
            elif isinstance(value, float):
                value = f"{value:g}"
            elif isinstance(value, int) and not isinstance(value, bool):
                value = f"{value:,}"
            values.append(f"{preset}: {value}")
    return f"  [{'; '.join(values)}]" if values else ""


def field_options(command: str, multiple_models: bool = False) -> list[click.Option]:
    """One click option per request field offered by `command`, in declaration order."""
    options: list[click.Option] = []
    for part, cls in PARTS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("cli")
            if meta is None or command not in meta["commands"]:
                continue
            long = "--" + f.name.replace("_", "-")
            decls = [*meta["flags"]]
            if not any(flag.startswith("--") for flag in decls) and f.name != "ks":
                decls.insert(0, long)
            help_text = docs.get(f.name, "") + _preset_values(part, f.name)
            base = _base_type(cls, f.name)
            kwargs: dict[str, Any] = dict(default=None, help=help_text)
            if f.name == "model" and multiple_models:
                kwargs.update(multiple=True, help=help_text + " Repeat for several models.")
            elif f.name == "layers":
                kwargs.update(type=str)
            elif meta["choices"]:
                kwargs.update(type=click.Choice(meta["choices"]))
                if meta["flag_value"] is not None:
                    kwargs.update(is_flag=False, flag_value=meta["flag_value"])
            elif base is bool:
                decls = [f"{long}/--no-{long[2:]}"]
            elif typing.get_origin(base) is list:
                kwargs.update(type=typing.get_args(base)[0], multiple=True)
            elif base in (int, float):
                kwargs.update(type=base)
            options.append(click.Option([*decls, f.name], **kwargs))
            if f.name == "lens":
                options.append(click.Option(["--no-lens", "no_lens"], is_flag=True, default=False,
                                            help="The same as --lens off."))
    return options


def _set_scratch(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--scratch is the worker's $MLSAE_SCRATCH (a property of the machine, not of the
    request), so the flow and its tasks in this process see it."""
    import os

    from mlsae.warehouse.layout import SCRATCH_ENV

    if value:
        os.environ[SCRATCH_ENV] = value


def run_options(command: str, multiple_models: bool = False) -> Callable:
    """Decorator: --preset, every request field, --out, --dry-run/--json, --refresh."""
    default_preset = {"run": "demo", "sweep": "sweep", "report": "report"}[command]

    def decorate(fn: Callable) -> Callable:
        params = [
            click.Option(["--preset"], type=click.Choice(list(PRESETS)), default=default_preset,
                         show_default=True, help=field_docs(RunRequest)["preset"]),
            *field_options(command, multiple_models),
            click.Option(["--out"], default=None,
                         help="Warehouse: a directory or a URL such as s3://bucket/prefix "
                              "(default $MLSAE_HOME, else ./mlsae-data)."),
            click.Option(["--scratch"], default=None, expose_value=False, callback=_set_scratch,
                         help="For a warehouse at a URL: the local directory the run works in "
                              "(activation caches, the working copy it publishes from; "
                              "default $MLSAE_SCRATCH, else ~/.cache/mlsae/scratch)."),
            click.Option(["--dry-run"], is_flag=True, default=False,
                         help="Validate, print the plan and its estimated cost (disk, RAM, time), "
                              "and exit without writing anything."),
            click.Option(["--json", "as_json"], is_flag=True, default=False,
                         help="With --dry-run: print the plan as one JSON object."),
            click.Option(["--refresh"], is_flag=True, default=False,
                         help="Ignore cached task results and re-run every task (finished "
                              "outputs in the warehouse are still reused)."),
        ]
        fn.__click_params__ = [*getattr(fn, "__click_params__", []), *reversed(params)]
        return fn
    return decorate


def split_options(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Click values of the request fields -> {part: {field: value}} of the given ones."""
    values = dict(values)
    if values.pop("no_lens", False):
        if values.get("lens") not in (None, "off"):
            raise click.UsageError("--lens and --no-lens contradict each other: give one")
        values["lens"] = "off"
    given = {name: list(value) if isinstance(value, tuple) else value
             for name, value in values.items() if value is not None and value != ()}
    return nest_fields(given)


def build_request(preset: str, parts: dict[str, dict[str, Any]]) -> RunRequest:
    """The RunRequest of the given options; a bad value is a one-line click error."""
    try:
        return RunRequest(preset=preset, **parts)
    except InvalidRequest as err:
        raise click.ClickException(str(err)) from err


def command_line(command: str, request: RunRequest, out: str | None = None) -> str:
    """The `mlsae COMMAND ...` line that reproduces `request`: the preset when it is not the
    command's default, then only the explicitly given fields."""
    default_preset = {"run": "demo", "sweep": "sweep", "report": "report"}[command]
    words = [f"mlsae {command}"]
    if request.preset != default_preset:
        words.append(f"--preset {request.preset}")
    for values in request.given().values():
        for name, value in values.items():
            flag = "--" + name.replace("_", "-")
            flag = {"expansion_factors": "-R", "ks": "-k",
                    "base_expansion_factor": "--base-R"}.get(name, flag)
            if isinstance(value, bool):
                words.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, list) and name == "layers":
                words.append(f"{flag} {','.join(map(str, value))}")
            elif isinstance(value, list):
                words += [f"{flag} {v}" for v in value]
            else:
                words.append(f"{flag} {value}")
    if out:
        words.append(f"--out {out}")
    return " ".join(words)


def report_command_line(request: RunRequest, models: list[str], out: str | None = None) -> str:
    """The `mlsae report ...` line that reproduces this report: every model (none when they
    are the default family), then the request's given options."""
    given = request.given()
    model_given = given["target"].pop("model", None) is not None
    line = command_line("report", RunRequest(preset=request.preset, **given), out)
    if model_given or list(models) != list(REPORT_MODELS):
        prefix = "mlsae report"
        line = prefix + "".join(f" --model {m}" for m in models) + line[len(prefix):]
    return line
