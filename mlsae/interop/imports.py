"""`mlsae import`: bring an autoencoder saved by another tool into a warehouse.

    resolve_source(SOURCE)       a local directory, or a hub id (fails fast offline with the
                                 local-directory fix, like --model)
    plan_import(request)         read + check everything (format, files, dimensions against
                                 the model): nothing written; InteropError naming the fix
    save_import(plan, warehouse) write <warehouse>/autoencoders/<sae_id>/sae (from_pretrained-
                                 loadable; SAEConfig.extra["imported_from"] says where from)

Formats, detected from the files: the paper's (config.json + model.safetensors, also its
-tfm checkpoints), SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json +
sae.safetensors, one hookpoint directory). The evaluate -> log latents -> analyse steps
then run on the saved autoencoder as on a trained one (flows/imported.py).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mlsae.interop import paper, saelens, sparsify
from mlsae.interop.errors import InteropError
from mlsae.interop.weights import Weights, decoder_norm_warning, to_mlsae

FORMATS = ("paper", "saelens", "sparsify")
KNOWN_LAYOUTS = ("the paper's MLSAE (config.json + model.safetensors), SAELens "
                 "(cfg.json + sae_weights.safetensors) or sparsify (cfg.json + sae.safetensors)")


@dataclass
class ImportRequest:
    """What to import and for which model (the options of `mlsae import`)."""

    source: str
    """A local directory holding the autoencoder's files, or a hub id (downloaded when the hub
    is reachable)."""
    model: str | None = None
    """The language model the autoencoder reads ('embedded', a directory or a hub id); its
    d_model and block count are checked against the autoencoder."""
    sae_id: str | None = None
    """The id in the warehouse. [default: 'paper-' / 'saelens-' / 'sparsify-' + the source's
    name]"""
    layers: list[int] | None = None
    """Blocks the autoencoder reads. [default: the checkpoint's record (a -tfm checkpoint's
    layers, a SAELens hook_name, a sparsify hookpoint), else every block]"""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise InteropError("SOURCE must be a directory or a hub id, e.g. "
                               "tim-lawson/mlsae-pythia-70m-deduped-x64-k32")


class ImportPlan(NamedTuple):
    """A checked import: everything needed to write it, nothing written yet."""

    sae_id: str
    sae: Any
    """The MLSAE (eval mode) with the imported weights and its SAEConfig record."""
    format: str
    source_dir: Path
    fingerprint: str
    """sha256 of the weight file: the same source imports to the same autoencoder."""
    warnings: list[str]
    """Things worth a look that do not stop the import (e.g. decoder columns not unit norm)."""


def _looks_like_hub_id(text: str) -> bool:
    return (text.count("/") == 1 and not text.startswith((".", "/", "~"))
            and bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)))


def resolve_source(source: str) -> Path:
    """The local directory of SOURCE: the path itself, or a hub repository's files (from the
    local cache, or downloaded when the hub is reachable). Offline, a hub id fails within
    seconds with the `hf download` command to run elsewhere."""
    from mlsae.models import _hub_reachable, hub_download_command

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InteropError(f"{path} is a file: pass the directory that holds the "
                               f"autoencoder's files ({KNOWN_LAYOUTS})")
        return path.resolve()
    if not _looks_like_hub_id(source):
        raise InteropError(f"source directory {source!r} does not exist: check the path, or "
                           "pass a hub id such as tim-lawson/mlsae-pythia-70m-deduped-x64-k32")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not in the local cache
        pass
    if not _hub_reachable():
        raise InteropError(
            f"cannot download {source!r}: the Hugging Face hub is not reachable from this "
            f"machine. On a machine with network run `{hub_download_command(source)}`, copy "
            "DIR here and pass DIR as the source")
    try:
        return Path(snapshot_download(source))
    except Exception as err:
        raise InteropError(f"could not download {source!r} from the hub: {err}") from err


def detect_format(directory: Path) -> str:
    if paper.is_paper_dir(directory):
        return "paper"
    if (directory / saelens.WEIGHTS_FILE).is_file():
        return "saelens"
    if (directory / sparsify.WEIGHTS_FILE).is_file():
        return "sparsify"
    present = sorted(p.name for p in directory.iterdir())[:8]
    subdirs = [p.name for p in directory.iterdir() if p.is_dir()
               and (p / sparsify.CFG_FILE).is_file()]
    hint = (f"; for sparsify pass one hookpoint directory, e.g. {directory / subdirs[0]}"
            if subdirs else "")
    raise InteropError(f"{directory}: not an autoencoder this version reads (found "
                       f"{present or 'nothing'}): it needs the files of {KNOWN_LAYOUTS}{hint}")


def _fingerprint(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_sae_id(fmt: str, source: str, directory: Path) -> str:
    tail = source.rstrip("/").rsplit("/", 1)[-1] if _looks_like_hub_id(source) else (
        directory.name if fmt != "sparsify" else f"{directory.parent.name}-{directory.name}")
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("._-") or "sae"
    return f"{fmt}-{clean}"[:128]


def _read(fmt: str, directory: Path) -> tuple[Weights, list[int] | None, dict[str, Any],
                                              paper.PaperSAE | None]:
    if fmt == "paper":
        found = paper.read_paper_sae(directory)
        return found.weights, found.layers, found.hyperparameters, found
    if fmt == "saelens":
        weights, layer, cfg = saelens.read_saelens(directory)
    else:
        weights, layer, cfg = sparsify.read_sparsify(directory)
    return weights, None if layer is None else [layer], cfg, None


def _check_model(found: paper.PaperSAE | None, weights: Weights, model: dict[str, Any],
                 layers: list[int], where: Path) -> None:
    name, d_model, n_layers = model["name"], model["d_model"], model["n_layers"]
    if weights.d_model != d_model:
        raise InteropError(
            f"{where}: the autoencoder reads {weights.d_model}-dimensional vectors but model "
            f"{name!r} has d_model = {d_model}: pass the --model it was trained on (the paper's "
            "Pythia SAEs: EleutherAI/pythia-70m-deduped has d_model 512, 160m 768, 410m 1024)")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise InteropError(
            f"{where}: the autoencoder reads block(s) {bad} but model {name!r} has {n_layers} "
            f"blocks (0..{n_layers - 1}): pass the --model it was trained on, or --layers")
    if found is not None and found.transformer is not None:
        inside = found.transformer
        if (inside["d_model"], inside["n_layers"]) != (d_model, n_layers):
            raise InteropError(
                f"{where}: this -tfm checkpoint holds a transformer with d_model "
                f"{inside['d_model']} and {inside['n_layers']} blocks, but model {name!r} has "
                f"d_model {d_model} and {n_layers} blocks: pass the --model it was trained on"
                + (f" ({found.model_name})" if found.model_name else ""))


def _sae_config(fmt: str, weights: Weights, found: paper.PaperSAE | None,
                model: dict[str, Any], layers: list[int], record: dict[str, Any]):
    from mlsae.sae import SAEConfig

    n, d = weights.n_latents, weights.d_model
    extra: dict[str, Any] = {"imported_from": record, "role": "imported"}
    if found is not None:
        cfg = found.config
        k_aux = min(cfg.auxk or 256, n)
        aux_coef = found.hyperparameters.get("auxk_coef", 1 / 32) if cfg.auxk else 0.0
        return SAEConfig(d_model=d, n_layers=model["n_layers"], layers=layers,
                         expansion_factor=max(1, n // d), n_latents=n, k=weights.k,
                         k_aux=k_aux, aux_coef=float(aux_coef or 0.0),
                         dead_tokens=paper.dead_tokens(cfg), act_threshold=cfg.dead_threshold,
                         standardize=weights.standardize, model=model["name"], extra=extra)
    return SAEConfig(d_model=d, n_layers=model["n_layers"], layers=layers,
                     expansion_factor=max(1, n // d), n_latents=n, k=weights.k,
                     k_aux=min(256, n), standardize=weights.standardize, model=model["name"],
                     extra=extra)


def plan_import(request: ImportRequest, model_info: dict[str, Any] | None = None) -> ImportPlan:
    """Resolve, read and check SOURCE against the model: the MLSAE to save, nothing written.
    `model_info`: mlsae.plan.inspect_model(request.model) when the caller already has it."""
    from mlsae import warehouse
    from mlsae.plan import inspect_model

    directory = resolve_source(request.source)
    fmt = detect_format(directory)
    model = dict(model_info or inspect_model(request.model))
    weights, recorded_layers, raw, found = _read(fmt, directory)
    if found is not None and found.tuned_lens:
        raise InteropError(
            f"{directory}: this MLSAE was trained in the tuned-lens basis (tuned_lens: true); "
            "importing those is not supported yet (the lens would have to be imported with "
            "it): import the same configuration without '-lens'")
    layers = sorted(request.layers) if request.layers else (
        recorded_layers or list(range(model["n_layers"])))
    if len(set(layers)) != len(layers):
        raise InteropError(f"--layers {layers} repeats a block: list each once")
    _check_model(found, weights, model, layers, directory)
    warnings = [w for w in [decoder_norm_warning(weights, str(directory))] if w]
    if found is not None and found.model_name and model["name"] != found.model_name and \
            not model["name"].endswith(found.model_name.rsplit("/", 1)[-1]):
        warnings.append(f"{directory}: the checkpoint was trained on {found.model_name!r}, "
                        f"importing it for {model['name']!r} (same shape)")
    weight_file = directory / {"paper": paper.WEIGHTS_FILE, "saelens": saelens.WEIGHTS_FILE,
                               "sparsify": sparsify.WEIGHTS_FILE}[fmt]
    fingerprint = _fingerprint(weight_file)
    record = {"format": fmt, "kind": found.kind if found else fmt, "source": request.source,
              "directory": str(directory), "sha256": fingerprint, "config": raw}
    try:
        cfg = _sae_config(fmt, weights, found, model, layers, record)
    except ValueError as err:
        raise InteropError(f"{directory}: {err}") from err
    sae_id = request.sae_id or default_sae_id(fmt, request.source, directory)
    try:
        warehouse.check_sae_id(sae_id)
    except ValueError as err:
        raise InteropError(f"--sae-id: {err}") from err
    return ImportPlan(sae_id=sae_id, sae=to_mlsae(weights, cfg), format=fmt,
                      source_dir=directory, fingerprint=fingerprint, warnings=warnings)


def imported_sae_dir(warehouse_dir: str | os.PathLike, sae_id: str) -> Path:
    from mlsae.warehouse import trained_weights_dir

    return trained_weights_dir(warehouse_dir, sae_id)


def check_target(plan: ImportPlan, warehouse_dir: str | os.PathLike) -> None:
    """InteropError when the warehouse already has a different autoencoder under this id
    (the same import again is fine: it is reused)."""
    from mlsae.sae import MLSAE

    target = imported_sae_dir(warehouse_dir, plan.sae_id)
    if not target.exists():
        if target.parent.exists():  # a trained run (checkpoints) of that id
            raise InteropError(f"{target.parent} already exists (an autoencoder trained as "
                               f"{plan.sae_id!r}): pass another --sae-id")
        return
    try:
        existing = MLSAE.from_pretrained(target).cfg.extra.get("imported_from") or {}
    except (OSError, ValueError, KeyError) as err:
        raise InteropError(f"{target} exists and is unreadable ({err}): pass another "
                           "--sae-id or delete it") from err
    if existing.get("sha256") != plan.fingerprint:
        raise InteropError(f"the warehouse already has a different autoencoder as "
                           f"{plan.sae_id!r} ({target}): pass another --sae-id, or delete "
                           "that directory to replace it")


def save_import(plan: ImportPlan, warehouse_dir: str | os.PathLike) -> Path:
    """Write the planned autoencoder into the warehouse (atomic; a repeat is a no-op) and
    return its directory (MLSAE.from_pretrained loads it)."""
    from mlsae.warehouse import init_warehouse

    check_target(plan, warehouse_dir)
    target = imported_sae_dir(warehouse_dir, plan.sae_id)
    if target.exists():
        return target
    init_warehouse(warehouse_dir)
    return plan.sae.save_pretrained(target)


def describe(plan: ImportPlan) -> str:
    cfg = plan.sae.cfg
    return (f"{plan.sae_id}: {plan.format} autoencoder from {plan.source_dir}, d_model "
            f"{cfg.d_model}, {cfg.n_latents} latents, k {cfg.k}, layers {cfg.layers}, "
            f"standardize {cfg.standardize}")


def plan_import_run(request: ImportRequest, preset: str = "demo",
                    target: dict[str, Any] | None = None, budget: dict[str, Any] | None = None,
                    out: str | os.PathLike | None = None) -> tuple[ImportPlan, dict[str, Any]]:
    """Every check of `mlsae import` before compute: the import itself (plan_import) and the
    evaluation settings of the steps that follow (mlsae.plan.make_plan on the autoencoder's
    layers: model files, data, budget). Returns (plan, run settings); nothing written."""
    from mlsae.plan import RunRequest, inspect_model, make_plan, run_settings

    target = {**(target or {}), "model": request.model}
    info = inspect_model(request.model)
    plan = plan_import(request, model_info=info)
    run = make_plan(RunRequest(preset=preset, target=target,
                               grid={"layers": list(plan.sae.cfg.layers), "baselines": False},
                               budget=budget), out)
    return plan, run_settings(run)
