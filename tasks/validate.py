"""Check a pipeline request against the model's config BEFORE any compute.

Reads only the model's config.json (not its weights) and peeks at one document
of the data, so a typo in a model name, k larger than the dictionary or a layer
the model does not have fails the flow run in seconds, with every problem
listed and the fix named.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TypedDict

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import run_logger


class InvalidParameters(ValueError):
    """The flow's parameters cannot work; the message lists each problem and its fix."""


class ModelInfo(TypedDict):
    name: str
    """Normalised name, as stored in the `saes` table ("embedded", an absolute path or a hub id)."""
    source: str
    """What to load it from (a directory or a hub id)."""
    slug: str
    """A short name for ids and directories."""
    n_layers: int
    d_model: int
    max_positions: int | None


class SAESpec(TypedDict):
    sae_id: str
    role: str
    """"mlsae" (trained on every requested layer) or "baseline" (one layer)."""
    expansion_factor: int
    k: int
    layers: list[int]
    lens: bool
    n_latents: int


class PipelinePlan(TypedDict):
    model: ModelInfo
    data: str
    layers: list[int]
    train_tokens: int
    eval_tokens: int
    seq_len: int
    seed: int
    lr: float
    device: str
    specs: list[SAESpec]
    batch_tokens: int
    """Tokens per optimizer step (tasks.configs.BATCH_TOKENS unless the flow sets it)."""


def model_slug(name: str) -> str:
    """'EleutherAI/pythia-70m-deduped' -> 'pythia-70m-deduped'; '/x/my model' -> 'my_model'."""
    tail = Path(name.rstrip("/")).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("._-")[:40] or "model"


def normalise_model_name(model: str | None) -> str:
    """The name the `saes` table stores for `model`, without touching the network."""
    from mlsae.paths import EMBEDDED_MODEL_NAME

    if model is None or str(model) in ("", EMBEDDED_MODEL_NAME):
        return EMBEDDED_MODEL_NAME
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def inspect_model(model: str | None) -> ModelInfo:
    """Resolve a model and read its shape from config.json (no weights); ModelLoadError on failure."""
    from transformers import AutoConfig

    from mlsae.models import ModelLoadError, resolve_model_source

    source, name = resolve_model_source(model)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=isinstance(source, Path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the config of model {name!r}: {err}") from err
    n_layers = getattr(config, "num_hidden_layers", None)
    d_model = getattr(config, "hidden_size", None)
    if not n_layers or not d_model:
        raise ModelLoadError(f"model {name!r} has no num_hidden_layers/hidden_size in its config: "
                             "only transformer language models are supported")
    max_positions = (getattr(config, "max_position_embeddings", None)
                     or getattr(config, "n_positions", None))
    return ModelInfo(name=name, source=str(source), slug=model_slug(name), n_layers=int(n_layers),
                     d_model=int(d_model), max_positions=max_positions)


def sae_id_for(model: ModelInfo, data: str, seq_len: int, train_tokens: int, seed: int,
               lr: float, expansion_factor: int, k: int, layers: list[int], lens: bool,
               role: str, batch_tokens: int | None = None) -> str:
    """A readable, deterministic id: <model>-R<R>-k<k>-<layers>[-lens]-<hash of everything>.

    The default batch size is left out of the hash, so ids from before it was a
    parameter stay the same."""
    from tasks.configs import BATCH_TOKENS

    identity = dict(model=model["name"], data=data, seq_len=seq_len, train_tokens=train_tokens,
                    seed=seed, lr=lr, expansion_factor=expansion_factor, k=k, layers=layers,
                    lens=lens)
    if batch_tokens not in (None, BATCH_TOKENS):
        identity["batch_tokens"] = batch_tokens
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    where = f"L{layers[0]}" if role == "baseline" else (
        "all" if layers == list(range(model["n_layers"])) else "L" + "_".join(map(str, layers)))
    return f"{model['slug']}-R{expansion_factor}-k{k}-{where}{'-lens' if lens else ''}-{digest}"


def _check_data(data: str, problems: list[str]) -> None:
    from mlsae.data import DataConfig, iter_documents

    for split in ("train", "test"):
        try:
            if next(iter(iter_documents(DataConfig(source=data, split=split))), None) is None:
                problems.append(f"data {data!r} has no documents in its {split!r} split: "
                                "point --data at a non-empty .txt/.jsonl/.parquet file or directory")
        except (ValueError, OSError) as err:
            problems.append(f"data {data!r}: {err}")
            return


def check_pipeline_parameters(
    model: str | None, data: str | None, expansion_factors: list[int], ks: list[int],
    layers: list[int] | None, lens: bool | list[bool], baselines: bool, train_tokens: int,
    eval_tokens: int,
    seq_len: int, seed: int = 0, device: str = "auto", lr: float = 1e-3,
    batch_tokens: int | None = None,
) -> PipelinePlan:
    """Every check that needs no compute; raise InvalidParameters listing all problems.

    `lens` may list both values (a sweep): one set of autoencoders per value.
    """
    from mlsae.models import ModelLoadError, resolve_device

    problems: list[str] = []
    try:
        info = inspect_model(model)
    except ModelLoadError as err:
        raise InvalidParameters(f"invalid parameters: unknown model {model!r}: {err}") from err
    n_layers, d_model = info["n_layers"], info["d_model"]

    if layers is None or len(layers) == 0:
        chosen = list(range(n_layers))
    else:
        chosen = sorted({int(layer) for layer in layers})
        bad = [layer for layer in chosen if not 0 <= layer < n_layers]
        if bad:
            problems.append(f"layers {bad} do not exist: model {info['name']!r} has {n_layers} "
                            f"blocks, so use block indices 0..{n_layers - 1} (or omit --layers "
                            "for all of them)")
        if len(chosen) != len(layers):
            problems.append(f"layers {list(layers)} repeat a block index: list each block once")
    if not expansion_factors:
        problems.append("give at least one expansion factor (e.g. --expansion-factor 4)")
    if not ks:
        problems.append("give at least one k (e.g. -k 16)")
    for r in expansion_factors:
        if int(r) < 1:
            problems.append(f"expansion factor {r} must be an integer >= 1 (n_latents = R x d_model)")
    for k in ks:
        if int(k) < 1:
            problems.append(f"k={k} must be >= 1 (the number of active latents per example)")
    for r in expansion_factors:
        for k in ks:
            n_latents = int(r) * d_model
            if int(k) >= 1 and int(r) >= 1 and int(k) > n_latents:
                problems.append(f"k={k} > n_latents={n_latents} (expansion factor {r} x d_model "
                                f"{d_model}): lower k or raise the expansion factor")
    if info["max_positions"] and seq_len > info["max_positions"]:
        problems.append(f"seq_len {seq_len} exceeds the model's {info['max_positions']} positions")
    from tasks.configs import BATCH_TOKENS

    batch_tokens = BATCH_TOKENS if batch_tokens is None else int(batch_tokens)
    if batch_tokens < 1:
        problems.append(f"batch_tokens {batch_tokens} must be >= 1 (tokens per optimizer step)")
    if seq_len < 2:
        problems.append(f"seq_len {seq_len} must be >= 2")
    if train_tokens < seq_len:
        problems.append(f"train_tokens {train_tokens} is less than one sequence ({seq_len} tokens)")
    if eval_tokens < seq_len:
        problems.append(f"eval_tokens {eval_tokens} is less than one sequence ({seq_len} tokens)")
    try:
        resolve_device(device)
    except (RuntimeError, ValueError) as err:
        problems.append(f"device {device!r}: {err}")
    else:
        if resolve_device(device).type == "cuda":
            import torch

            if not torch.cuda.is_available():
                problems.append(f"device {device!r} asks for CUDA but no GPU is visible: "
                                "use --device cpu or auto")
    lenses = sorted({bool(v) for v in lens}) if isinstance(lens, (list, tuple)) else [bool(lens)]
    if not lenses:
        problems.append("give at least one lens setting (true and/or false)")
    if True in lenses:
        from mlsae.paths import EMBEDDED_MODEL_NAME

        if info["name"] != EMBEDDED_MODEL_NAME:
            run_logger().info("no committed lens for %s: one will be trained (or fetched) "
                              "before the first lens config", info["name"])
    _check_data(data or "embedded", problems)
    if problems:
        raise InvalidParameters("invalid parameters:\n  - " + "\n  - ".join(problems))

    data_name = data or "embedded"
    specs: list[SAESpec] = []
    for use_lens in lenses:
        for r in expansion_factors:
            for k in ks:
                def spec(role: str, spec_layers: list[int], r=int(r), k=int(k),
                         use_lens=use_lens) -> SAESpec:
                    return SAESpec(
                        sae_id=sae_id_for(info, data_name, seq_len, train_tokens, seed, lr, r,
                                          k, spec_layers, use_lens, role, batch_tokens),
                        role=role, expansion_factor=r, k=k, layers=spec_layers, lens=use_lens,
                        n_latents=r * d_model)
                specs.append(spec("mlsae", chosen))
                if baselines and len(chosen) > 1:
                    specs += [spec("baseline", [layer]) for layer in chosen]
    # The library's own checks on the exact configs training will use (k_aux, budgets, ...).
    from tasks.configs import train_config

    for spec in specs:
        try:
            train_config(spec, info, data_name, "tuned-lens" if spec["lens"] else None,
                         int(train_tokens), int(seed), float(lr), device, batch_tokens)
        except ValueError as err:
            problems.append(f"{spec['sae_id']}: {err}")
    if problems:
        raise InvalidParameters("invalid parameters:\n  - " + "\n  - ".join(problems))
    return PipelinePlan(model=info, data=data_name, layers=chosen, train_tokens=int(train_tokens),
                        eval_tokens=int(eval_tokens), seq_len=int(seq_len), seed=int(seed),
                        lr=float(lr), device=device, specs=specs, batch_tokens=batch_tokens)


@task(name="validate-parameters", cache_policy=NO_CACHE)
def validate_parameters(**parameters) -> PipelinePlan:
    """Fail fast (before any compute) with every problem in the parameters listed."""
    plan = check_pipeline_parameters(**parameters)
    run_logger().info("model %s: %d blocks x d_model %d; %d autoencoders planned",
                      plan["model"]["name"], plan["model"]["n_layers"], plan["model"]["d_model"],
                      len(plan["specs"]))
    return plan
