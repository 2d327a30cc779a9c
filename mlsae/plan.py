"""The run request (one parameter model), its presets, and the plan derived from it.

A request has three parts, each a dataclass whose fields are documented once here:
the CLI options of `mlsae run/sweep/report` are generated from these fields
(flows/options.py) and the flows take the same objects, so a new option is one
edit. A field left as None takes the value of the request's PRESET; an explicitly
given value is never replaced (0 or a negative budget is an error naming the
option, raised on construction, before any compute).

    RunRequest(preset, target: Target, grid: Grid, budget: Budget)
        -> make_plan(request) -> Plan: the model's shape, every autoencoder (sae_id,
           role, R, k, layers, lens), the training source (cache or stream) and sizes
        -> train_config(plan, spec): the library TrainConfig of one autoencoder

Planning reads only the model's config.json and weight headers and peeks at the
data, so a bad request fails in seconds. The library never imports Prefect.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import inspect
import json
import re
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, TypedDict


class InvalidRequest(ValueError):
    """The request cannot work; the message lists each problem and its fix."""


# ---------------------------------------------------------------- field docs

@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the CLI's help text)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def cli(*flags: str, multiple: bool = False, commands: tuple[str, ...] = ("run", "sweep", "report"),
        choices: tuple[str, ...] | None = None, flag_value: Any = None) -> dict[str, Any]:
    """Field metadata for the generated CLI: extra flags (e.g. "-R"), repeatable, commands."""
    return {"cli": dict(flags=flags, multiple=multiple, commands=commands, choices=choices,
                        flag_value=flag_value)}


OPTION_NAMES = {"ks": "-k", "expansion_factors": "--expansion-factor",
                "base_expansion_factor": "--base-R", "dose_expansion_factors": "--dose-R"}
"""CLI flags that are not simply --field-name."""


def _fail(owner: str, name: str, value: Any, need: str) -> None:
    option = OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
    raise InvalidRequest(f"{option} {value!r}: {need} ({owner}.{name})")


def _check_positive(owner: str, name: str, value: Any, kind: type = int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        _fail(owner, name, value, f"must be a {'number' if kind is float else 'whole number'}")
    if not value > 0:
        _fail(owner, name, value, "must be > 0 (leave the option out to take the preset's value)")


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'20GB' -> 20_000_000_000, '512MiB', '0', 1000 -> bytes; ValueError naming the format."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size {text} must be >= 0")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise ValueError(f"size {text!r}: write a number with an optional unit, e.g. 20GB, "
                         "512MiB or 0")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


# ---------------------------------------------------------------- the request parts

@dataclass
class Target:
    """What to run on: the model, the text and the device."""

    model: str | None = field(default=None, metadata=cli())
    """'embedded' (ships with mlsae), a local directory saved with save_pretrained, or a hub id
    such as EleutherAI/pythia-70m-deduped. [default: embedded]"""
    data: str | None = field(default=None, metadata=cli())
    """'embedded', a local .txt/.jsonl/.parquet file or directory, or a hub data set.
    [default: embedded]"""
    text_column: str | None = field(default=None, metadata=cli())
    """Field or column holding the text in .jsonl/.parquet files and hub data sets.
    [default: text]"""
    data_config: str | None = field(default=None, metadata=cli())
    """Configuration (subset) name of a hub data set, e.g. wikitext-103-raw-v1."""
    device: str | None = field(default=None, metadata=cli())
    """auto (CUDA when available), cpu, cuda, cuda:1, ... [default: auto]"""
    precision: str | None = field(default=None, metadata=cli(
        choices=("float32", "bfloat16", "float16")))
    """Compute dtype of the model's forward pass and the SAE's encoder matmul (autocast);
    bfloat16/float16 are for GPUs. Parameters, TopK selection and sums stay float32.
    [default: float32]"""

    def __post_init__(self) -> None:
        for name in ("model", "data", "text_column", "device"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                _fail("Target", name, value, "must be a non-empty string")
        if self.precision is not None and self.precision not in ("float32", "bfloat16", "float16"):
            _fail("Target", "precision", self.precision, "use float32, bfloat16 or float16")


LENS_CHOICES = ("off", "on", "both")


@dataclass
class Grid:
    """Which autoencoders: expansion factors x k x lens, the layers, the baselines."""

    expansion_factors: list[int] | None = field(default=None, metadata=cli(
        "-R", "--expansion-factor", multiple=True))
    """n_latents = R x d_model; repeat for several MLSAEs."""
    ks: list[int] | None = field(default=None, metadata=cli("-k", multiple=True))
    """Active latents per example (TopK); repeat for several."""
    lens: str | None = field(default=None, metadata=cli(choices=LENS_CHOICES, flag_value="on"))
    """Train in the tuned-lens basis: off, on, or both (every config twice); --lens alone
    means on. A lens is trained first where none exists. With a star grid (base R/k set)
    only the base config gets the lens."""
    layers: list[int] | None = field(default=None, metadata=cli())
    """Block indices the MLSAE reads, comma-separated (e.g. 0,2,4), or all. [default: all]"""
    baselines: bool | None = field(default=None, metadata=cli())
    """Also train a single-layer SAE per layer, to compare against the MLSAE."""
    base_expansion_factor: int | None = field(default=None, metadata=cli("--base-R"))
    """Star grid: every R at the base k and every k at the base R, instead of every
    combination; the base config also gets the baselines and the lens."""
    base_k: int | None = field(default=None, metadata=cli())
    """Base k of a star grid (see --base-R)."""
    dose_expansion_factors: list[int] | None = field(default=None, metadata=cli(
        "--dose-R", multiple=True))
    """R dose-response: also train the MLSAE at each of these R at --dose-k (no lens, no
    baselines), beside the grid; repeat for several."""
    dose_k: int | None = field(default=None, metadata=cli())
    """The k of the R dose-response (see --dose-R)."""
    dose_train_tokens: int | None = field(default=None, metadata=cli(commands=("report",)))
    """Report only: train the R dose-response (--dose-R at --dose-k) also at this budget
    (training tokens per layer), large enough for FVU to settle at the largest R; the report
    reads the dose-response at this budget and compares it with the grid's budget (the
    budget check). Unset: the dose-response at the grid's budget only."""

    def __post_init__(self) -> None:
        for name in ("expansion_factors", "ks", "dose_expansion_factors"):
            values = getattr(self, name)
            if values is None:
                continue
            if isinstance(values, int):
                values = [values]
            values = list(values)
            if not values:
                _fail("Grid", name, values, "give at least one value")
            for value in values:
                _check_positive("Grid", name, value)
            setattr(self, name, sorted(set(values), key=values.index))
        if self.lens is not None:
            if isinstance(self.lens, bool):
                self.lens = "on" if self.lens else "off"
            if self.lens not in LENS_CHOICES:
                _fail("Grid", "lens", self.lens, f"use one of {', '.join(LENS_CHOICES)}")
        if self.layers is not None:
            if isinstance(self.layers, str):
                self.layers = parse_layers(self.layers)
            else:
                self.layers = [int(layer) for layer in self.layers] or None
        if self.layers is not None:
            if any(layer < 0 for layer in self.layers):
                _fail("Grid", "layers", self.layers, "block indices are >= 0")
            if len(set(self.layers)) != len(self.layers):
                _fail("Grid", "layers", self.layers, "list each block once")
        _check_positive("Grid", "base_expansion_factor", self.base_expansion_factor)
        _check_positive("Grid", "base_k", self.base_k)
        _check_positive("Grid", "dose_k", self.dose_k)
        _check_positive("Grid", "dose_train_tokens", self.dose_train_tokens)


def parse_layers(text: str) -> list[int] | None:
    """'0,2,4' -> [0, 2, 4]; 'all' or '' -> None (every block)."""
    if text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as err:
        raise InvalidRequest(f"--layers {text!r}: give comma-separated block indices like "
                             "0,1,2 or 'all'") from err


@dataclass
class Budget:
    """How much: tokens, sequence length, optimizer, and where training data comes from."""

    train_tokens: int | None = field(default=None, metadata=cli())
    """Training tokens per layer (an MLSAE on L layers sees L examples per token)."""
    eval_tokens: int | None = field(default=None, metadata=cli())
    """Held-out tokens for the metrics and the latent tables."""
    seq_len: int | None = field(default=None, metadata=cli())
    """Tokens per sequence (at most the model's maximum positions)."""
    batch_tokens: int | None = field(default=None, metadata=cli())
    """Tokens per optimizer step (at most train_tokens)."""
    lr: float | None = field(default=None, metadata=cli())
    """Adam learning rate (constant)."""
    adam_eps: float | None = field(default=None, metadata=cli())
    """Adam epsilon."""
    seed: int | None = field(default=None, metadata=cli())
    """Seed of the initialisation and the data order. [default: 0]"""
    k_aux: int | None = field(default=None, metadata=cli())
    """Latents in the AuxK loss (chosen among dead ones). Unset: min(256, n_latents / 2)."""
    aux_coef: float | None = field(default=None, metadata=cli())
    """Weight of the AuxK term in the loss."""
    dead_tokens: int | None = field(default=None, metadata=cli())
    """A latent is dead after this many training tokens without firing. Unset: min(10M,
    train_tokens / 5), so AuxK acts in short runs too."""
    shuffle_tokens: int | None = field(default=None, metadata=cli())
    """Tokens in the shuffle buffer: whole sequences whose (token, layer) examples are
    mixed before batching. RAM: about shuffle_tokens x layers x d_model x 2 bytes."""
    cache_limit: str | None = field(default=None, metadata=cli())
    """Largest activation cache to write, e.g. 20GB: a training set that fits is extracted
    to disk once (reused by later runs); a larger one is streamed from the model. 0 =
    always stream. [default: half the free disk space]"""
    shared_cache: bool | None = field(default=None, metadata=cli())
    """For a warehouse at a URL: publish the activation cache to the warehouse too (each
    finished shard, committed like the tables), so another worker downloads it instead of
    running the model, and a finished extraction is skipped on every worker. Costs the
    cache's size in the bucket (printed by --dry-run) and one download per other worker.
    A local warehouse holds its caches already (the option changes nothing there).
    [default: off: each worker extracts its own cache into its --scratch]"""
    checkpoint_minutes: float | None = field(default=None, metadata=cli())
    """Minutes of training between exact-resume checkpoints (and one at the end, and on
    Ctrl-C): what a kill can lose, however long a step takes. [default: 10]"""
    eval_memory: str | None = field(default=None, metadata=cli())
    """Working memory for evaluation and latent logging passes, e.g. 4GiB: sets how many
    sequences one forward pass takes (logged). [default: 2 GiB on a CPU, half the free
    memory of a GPU]"""

    def __post_init__(self) -> None:
        for name in ("train_tokens", "eval_tokens", "seq_len", "batch_tokens", "k_aux",
                     "dead_tokens", "shuffle_tokens"):
            _check_positive("Budget", name, getattr(self, name))
        for name in ("lr", "adam_eps", "checkpoint_minutes"):
            _check_positive("Budget", name, getattr(self, name), float)
        if self.seq_len is not None and self.seq_len < 2:
            _fail("Budget", "seq_len", self.seq_len, "must be >= 2 (next-token metrics need two)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            _fail("Budget", "seed", self.seed, "must be a whole number >= 0")
        if self.aux_coef is not None and not (isinstance(self.aux_coef, (int, float))
                                              and self.aux_coef >= 0):
            _fail("Budget", "aux_coef", self.aux_coef, "must be >= 0 (0 turns AuxK off)")
        if self.shared_cache is not None and not isinstance(self.shared_cache, bool):
            _fail("Budget", "shared_cache", self.shared_cache,
                  "must be true or false (--shared-cache / --no-shared-cache)")
        for name in ("cache_limit", "eval_memory"):
            value = getattr(self, name)
            if value is None:
                continue
            setattr(self, name, str(value))
            try:
                size = parse_size(str(value))
            except ValueError as err:
                raise InvalidRequest(f"--{name.replace('_', '-')}: {err}") from err
            if name == "eval_memory" and size == 0:
                _fail("Budget", name, value, "must be > 0 (e.g. 2GiB)")


PARTS: dict[str, type] = {"target": Target, "grid": Grid, "budget": Budget}

# ---------------------------------------------------------------- presets

_DEMO_BUDGET = dict(train_tokens=200_000, eval_tokens=8_192, seq_len=128, batch_tokens=4096,
                    lr=1e-3, shuffle_tokens=65_536)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # `mlsae run` with no options: minutes on a 2-core CPU with the embedded model.
    "demo": {"grid": dict(expansion_factors=[4], ks=[16], lens="off", baselines=True),
             "budget": _DEMO_BUDGET},
    # `mlsae sweep` with no options: a small R x k grid on the demo budget.
    "sweep": {"grid": dict(expansion_factors=[2, 4], ks=[8, 16], lens="off", baselines=False),
              "budget": _DEMO_BUDGET},
    # The report's star grid; steps of 1024 tokens so FVU settles within the embedded corpus.
    # Beside the star, an R dose-response at k 32 up to the paper's R 64 (issue 14), also at
    # 4x the budget: at 2M tokens per layer R 64's FVU was still falling (docs/report, the
    # budget check).
    "report": {"grid": dict(expansion_factors=[2, 4, 8], ks=[8, 16, 32], base_expansion_factor=4,
                            base_k=16, lens="both", baselines=True,
                            dose_expansion_factors=[4, 16, 64], dose_k=32,
                            dose_train_tokens=8_000_000),
               "budget": dict(train_tokens=2_000_000, eval_tokens=16_384, seq_len=128,
                              batch_tokens=1024, lr=1e-3, shuffle_tokens=65_536)},
    # The paper's recipe (SPEC 1-2).
    "paper": {"grid": dict(expansion_factors=[64], ks=[32], lens="off", baselines=False),
              "budget": dict(train_tokens=1_000_000_000, eval_tokens=10_000_000, seq_len=2048,
                             batch_tokens=131_072, lr=1e-4, adam_eps=6.25e-10, k_aux=256,
                             aux_coef=1 / 32, dead_tokens=10_000_000, shuffle_tokens=262_144)},
}
# Values no preset sets (None stays None where None means "all"/"auto").
FIXED_DEFAULTS: dict[str, dict[str, Any]] = {
    "target": dict(model="embedded", data="embedded", text_column="text", device="auto",
                   precision="float32"),
    "grid": {},
    "budget": dict(seed=0, adam_eps=6.25e-10, aux_coef=1 / 32, checkpoint_minutes=10.0,
                   shared_cache=False),
}


@dataclass
class RunRequest:
    """One request: a preset, and the parts that override it (None = the preset's value)."""

    preset: str = "demo"
    """Named budget + grid: demo (minutes on a CPU), sweep, report (the report's star grid),
    paper (the paper's recipe: R 64, k 32, 2048-token sequences, 131,072 tokens per step,
    1B training tokens, 10M held-out tokens). Options given explicitly override it."""
    target: Target = field(default_factory=Target)
    grid: Grid = field(default_factory=Grid)
    budget: Budget = field(default_factory=Budget)
    explicit: dict[str, list[str]] = field(default_factory=dict)
    """Set on construction: the fields of each part that were given (not from the preset)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise InvalidRequest(f"--preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        for name, cls in PARTS.items():
            value = getattr(self, name)
            if value is None:
                value = cls()
            elif isinstance(value, dict):
                unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
                if unknown:
                    raise InvalidRequest(f"unknown {name} fields {unknown}: known are "
                                         f"{[f.name for f in dataclasses.fields(cls)]}")
                value = cls(**value)
            elif dataclasses.is_dataclass(value) and not isinstance(value, cls):
                value = cls(**dataclasses.asdict(value))  # the same class from another import
            if not self.explicit.get(name):
                self.explicit[name] = [f.name for f in dataclasses.fields(cls)
                                       if getattr(value, f.name) is not None]
            fill = {**FIXED_DEFAULTS[name], **PRESETS[self.preset].get(name, {})}
            resolved = {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)}
            for key, default in fill.items():
                if resolved[key] is None:
                    resolved[key] = default
            setattr(self, name, cls(**resolved))

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset,
                **{name: dataclasses.asdict(getattr(self, name)) for name in PARTS}}

    def given(self) -> dict[str, dict[str, Any]]:
        """Only the explicitly given fields (what a reproduce command must name)."""
        return {name: {key: getattr(getattr(self, name), key) for key in self.explicit[name]}
                for name in PARTS}


# ---------------------------------------------------------------- the plan

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
    vocab_size: int | None


class SAESpec(TypedDict):
    sae_id: str
    role: str
    """"mlsae" (trained on every requested layer) or "baseline" (one layer)."""
    expansion_factor: int
    k: int
    layers: list[int]
    lens: bool
    n_latents: int


class Plan(TypedDict):
    """Everything a run does, derived once from a RunRequest (JSON: Prefect passes it on)."""

    request: dict[str, Any]
    model: ModelInfo
    data: str
    layers: list[int]
    train_tokens: int
    eval_tokens: int
    seq_len: int
    seed: int
    lr: float
    device: str
    batch_tokens: int
    budget: dict[str, Any]
    """The resolved Budget (every field)."""
    target: dict[str, Any]
    specs: list[SAESpec]
    training_source: str
    """"cache" (extract to disk once, then train each SAE) or "stream" (one pass of the model
    feeds every SAE; nothing on disk)."""
    cache_bytes: int
    """Bytes of the training activation cache (written only when training_source is cache)."""
    cache_limit_bytes: int
    corpus_tokens: dict[str, int]
    """Tokens of the data's train and test splits (local sources; estimated when large)."""
    notes: list[str]
    """What the run should say before it starts (e.g. epochs over a small corpus)."""
    disk: dict[str, int]
    """Bytes the run will write (cache, latents, checkpoints) and the free space (disk_plan)."""


PLAN_ONLY = ("specs", "request", "training_source", "cache_bytes", "cache_limit_bytes",
             "corpus_tokens", "notes", "disk")
"""Plan entries that change where data comes from or what is said, not the results: left
out of every step's settings (and so of their cache keys)."""

LEGACY_BATCH_TOKENS = 4096
REFERENCE_K_AUX = 256
REFERENCE_DEAD_TOKENS = 10_000_000
CACHE_BYTES_PER_VALUE = 2  # float16 cache
LATENT_BYTES_PER_ROW = 3.2  # docs/warehouse.md: measured bytes per stored activation


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


CONFIG_KEYS = {"n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
               "d_model": ("hidden_size", "n_embd", "d_model"),
               "max_positions": ("max_position_embeddings", "n_positions", "n_ctx"),
               "vocab_size": ("vocab_size",)}
"""config.json keys of each shape field, across architectures (GPT-NeoX/Llama, GPT-2, ...)."""


def _read_config(source: str | Path, name: str) -> dict[str, Any]:
    """The model's config.json as a dict: read directly for a local directory (no torch or
    transformers import: validation stays under a second), else through AutoConfig."""
    from mlsae.models import ModelLoadError

    path = Path(source) / "config.json"
    if isinstance(source, Path) or path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not read {path}: {err}: save the model again with "
                                 "model.save_pretrained(DIR)") from err
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the config of model {name!r}: {err}") from err


def inspect_model(model: str | None) -> ModelInfo:
    """Resolve a model and read its shape from config.json (no weights); ModelLoadError on failure."""
    from mlsae.models import ModelLoadError, resolve_model_source

    source, name = resolve_model_source(model)
    raw = _read_config(source, name)
    if "text_config" in raw and not any(k in raw for k in CONFIG_KEYS["n_layers"]):
        raw = {**raw, **raw["text_config"]}  # multimodal wrappers keep the LM's shape there
    shape = {field: next((raw[k] for k in keys if raw.get(k)), None)
             for field, keys in CONFIG_KEYS.items()}
    if not shape["n_layers"] or not shape["d_model"]:
        raise ModelLoadError(f"model {name!r} has no num_hidden_layers/hidden_size in its config: "
                             "only transformer language models are supported")
    return ModelInfo(name=name, source=str(source), slug=model_slug(name),
                     n_layers=int(shape["n_layers"]), d_model=int(shape["d_model"]),
                     max_positions=shape["max_positions"], vocab_size=shape["vocab_size"])


def sae_id_for(model: ModelInfo, data: str, budget: Budget, target: Target,
               expansion_factor: int, k: int, layers: list[int], lens: bool, role: str) -> str:
    """A readable, deterministic id: <model>-R<R>-k<k>-<layers>[-lens]-<hash of everything>.

    Settings at their historical defaults are left out of the hash, so ids of earlier
    runs stay the same."""
    identity: dict[str, Any] = dict(
        model=model["name"], data=data, seq_len=budget.seq_len, train_tokens=budget.train_tokens,
        seed=budget.seed, lr=budget.lr, expansion_factor=expansion_factor, k=k, layers=layers,
        lens=lens)
    if budget.batch_tokens != LEGACY_BATCH_TOKENS:
        identity["batch_tokens"] = budget.batch_tokens
    for name, legacy in (("k_aux", None), ("dead_tokens", None), ("aux_coef", 1 / 32),
                         ("adam_eps", 6.25e-10)):
        if getattr(budget, name) != legacy:
            identity[name] = getattr(budget, name)
    if target.text_column != "text":
        identity["text_column"] = target.text_column
    if target.data_config is not None:
        identity["data_config"] = target.data_config
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    where = f"L{layers[0]}" if role == "baseline" else (
        "all" if layers == list(range(model["n_layers"])) else "L" + "_".join(map(str, layers)))
    return f"{model['slug']}-R{expansion_factor}-k{k}-{where}{'-lens' if lens else ''}-{digest}"


def data_config(plan: Plan | dict, split: str, max_sequences: int | None = None):
    """The mlsae.data.DataConfig of the plan's text (train or test split)."""
    from mlsae.data import DataConfig

    target = plan["target"]
    return DataConfig(source=plan["data"], split=split, seq_len=plan["seq_len"],
                      text_column=target.get("text_column") or "text",
                      hub_config=target.get("data_config"), max_sequences=max_sequences)


def _check_data(target: Target, problems: list[str]) -> None:
    from mlsae.data import DataConfig, iter_documents

    for split in ("train", "test"):
        cfg = DataConfig(source=target.data, split=split, text_column=target.text_column,
                         hub_config=target.data_config)
        try:
            if next(iter(iter_documents(cfg)), None) is None:
                problems.append(f"data {target.data!r} has no documents in its {split!r} split: "
                                "point --data at a non-empty .txt/.jsonl/.parquet file or "
                                "directory")
        except (ValueError, OSError) as err:
            problems.append(f"data {target.data!r}: {err}")
            return


def _check_device(device: str, problems: list[str]) -> None:
    if device in ("auto", "cpu"):
        return  # always valid; spares the torch import
    from mlsae.models import resolve_device

    try:
        resolved = resolve_device(device)
    except (RuntimeError, ValueError) as err:
        problems.append(f"--device {device!r}: {err}")
        return
    if resolved.type == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append(f"--device {device!r} asks for CUDA but no GPU is visible: use "
                            "--device cpu or auto")


def cache_bytes_for(n_sequences: int, seq_len: int, n_layers: int, d_model: int) -> int:
    """Bytes of a float16 activation cache (activations + int32 token ids + mask)."""
    n_tokens = n_sequences * seq_len
    return n_tokens * (n_layers * d_model * CACHE_BYTES_PER_VALUE + 5)


def default_cache_limit(where: str | Path | None) -> int:
    """Half the free space of the disk that holds (or will hold) the warehouse."""
    return free_bytes(where) // 2


def free_bytes(where: str | Path | None) -> int:
    """Free space of the disk that holds (or will hold) `where` (None: the default
    warehouse)."""
    from mlsae.paths import default_warehouse

    path = (Path(where).expanduser() if where else default_warehouse()).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _corpus_sizes(target: Target, info: ModelInfo) -> dict[str, int]:
    """{"train": tokens, "test": tokens} of a local data source with the model's tokenizer
    ({} for a hub data set or when the tokenizer cannot be read here). Counted once per
    process for a given source and tokenizer (a run plans in the command and again in its
    flow), again if the data's files changed."""
    from mlsae.data import normalized_source
    from mlsae.paths import EMBEDDED_CORPUS_DIR

    source = normalized_source(target.data)
    path = EMBEDDED_CORPUS_DIR if source == "embedded" else Path(source)
    stamp = max((f.stat().st_mtime_ns for f in [path, *path.rglob("*")]), default=0) \
        if path.exists() else None
    return dict(_counted_corpus(target.data, target.text_column, target.data_config,
                                info["source"], stamp))


@cache
def _counted_corpus(data: str, text_column: str, data_config: str | None, tokenizer_source: str,
                    _stamp: int | None) -> tuple[tuple[str, int], ...]:
    from mlsae.data import DataConfig, split_size

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError):
        return ()
    sizes = []
    for split in ("train", "test"):
        size = split_size(DataConfig(source=data, split=split, text_column=text_column,
                                     hub_config=data_config), tokenizer)
        if size is None:
            return ()
        sizes.append((split, size.tokens))
    return tuple(sizes)


def _fit_held_out(budget: Budget, corpus: dict[str, int], explicit: list[str], data: str,
                  problems: list[str], notes: list[str]) -> Budget:
    """Refuse an explicit held-out budget above the test split; cut a preset's to fit."""
    held_out = corpus.get("test")
    if not held_out or budget.eval_tokens <= held_out:
        return budget
    whole = held_out // budget.seq_len * budget.seq_len
    if "eval_tokens" in explicit:
        problems.append(f"--eval-tokens {budget.eval_tokens:,} exceeds the held-out split of "
                        f"{data!r} (~{held_out:,} tokens): use --eval-tokens {whole:,} or less, "
                        "or give --data more text")
        return budget
    notes.append(f"held-out tokens cut from the preset's {budget.eval_tokens:,} to {whole:,}: "
                 f"the held-out split of {data!r} has ~{held_out:,}")
    return dataclasses.replace(budget, eval_tokens=max(budget.seq_len, whole))


def _check_training_corpus(budget: Budget, corpus: dict[str, int], source: str, explicit: bool,
                           data: str, problems: list[str], notes: list[str]) -> None:
    """A training budget above the corpus: epochs over a cache are said; a stream, which
    reads the text once, cannot reach it."""
    tokens = corpus.get("train")
    if not tokens or budget.train_tokens <= tokens:
        return
    epochs = budget.train_tokens / tokens
    if source == "cache":
        notes.append(f"--train-tokens {budget.train_tokens:,} is ~{epochs:,.1f} epochs over the "
                     f"~{tokens:,} training tokens of {data!r}: every example is seen ~"
                     f"{epochs:,.0f} times (give --data more text for distinct examples)")
        return
    problems.append(f"--train-tokens {budget.train_tokens:,}{'' if explicit else ' (preset)'} "
                    f"exceeds the ~{tokens:,} training tokens of {data!r}, and this run streams "
                    "its training data (which reads the text once): give --data more text, "
                    f"lower --train-tokens to {tokens:,} or less, or allow a cache (--cache-limit) "
                    f"that training rereads for ~{epochs:,.0f} epochs")


def disk_plan(plan: Plan, out: str | Path | None) -> dict[str, int]:
    """Bytes the run writes under the warehouse (the activation cache not yet on disk, the
    latent tables, checkpoints and weights) and the free space there."""
    from mlsae import warehouse
    from mlsae.extract import cache_key
    from mlsae.gc import directory_bytes
    from mlsae.paths import default_warehouse

    d_model = plan["model"]["d_model"]
    cache = 0
    if plan["training_source"] == "cache":
        where = warehouse.activation_cache_dir(
            out or default_warehouse(), cache_key(extract_config(run_settings(plan))))
        cache = max(0, plan["cache_bytes"] - directory_bytes(where))
    eval_tokens = -(-plan["eval_tokens"] // plan["seq_len"]) * plan["seq_len"]
    latents_rows = sum(eval_tokens * len(s["layers"]) * s["k"]
                       for s in plan["specs"] if s["role"] == "mlsae")
    # float32 weights, and Adam's two moments in the checkpoint
    weights = sum(4 * (2 * s["n_latents"] * d_model + s["n_latents"] + d_model)
                  for s in plan["specs"])
    return {"cache": cache, "latents_rows": latents_rows,
            "latents": int(latents_rows * LATENT_BYTES_PER_ROW), "checkpoints": 3 * weights,
            "autoencoders": weights, "free": free_bytes(out)}


def _check_disk(disk: dict[str, int], problems: list[str]) -> None:
    from mlsae.estimate import format_bytes

    needed = disk["cache"] + disk["latents"] + disk["checkpoints"] + disk["autoencoders"]
    if needed <= disk["free"]:
        return
    parts = ", ".join(f"{name} {format_bytes(disk[name])}" for name in
                      ("cache", "latents", "checkpoints", "autoencoders") if disk[name])
    fix = ("--cache-limit 0 streams instead of caching, " if disk["cache"] else "")
    problems.append(f"this run writes ~{format_bytes(needed)} ({parts}) but the warehouse's "
                    f"disk has {format_bytes(disk['free'])} free: free space, use another --out, "
                    f"{fix}or lower --eval-tokens / the grid")


def make_plan(request: RunRequest, out: str | Path | None = None, *, for_report: bool = False
              ) -> Plan:
    """Every check that needs no compute, then the plan; InvalidRequest listing every problem.
    `for_report`: the report's first model (its dose-response may have a budget of its own,
    planned by dose_plan_request)."""
    from mlsae.models import ModelLoadError

    if not isinstance(request, RunRequest):
        raise TypeError("make_plan needs a RunRequest")
    from mlsae.warehouse import WarehouseError, check_local

    if out is not None:
        try:
            check_local(out)
        except WarehouseError as err:
            raise InvalidRequest(f"--out: {err}") from err
    target, grid, budget = request.target, request.grid, request.budget
    problems: list[str] = []
    try:
        info = inspect_model(target.model)
        _check_model_files(info)
    except ModelLoadError as err:
        raise InvalidRequest(f"invalid parameters: model {target.model!r}: {err}") from err
    n_layers, d_model = info["n_layers"], info["d_model"]

    if grid.layers is None:
        chosen = list(range(n_layers))
    else:
        chosen = sorted(grid.layers)
        bad = [layer for layer in chosen if not 0 <= layer < n_layers]
        if bad:
            problems.append(f"--layers: layers {bad} do not exist: model {info['name']!r} has "
                            f"{n_layers} blocks, so use block indices 0..{n_layers - 1} (or "
                            "omit --layers for all of them)")
    star = grid.base_expansion_factor is not None or grid.base_k is not None
    rs, ks = list(grid.expansion_factors), list(grid.ks)
    if star:
        if grid.base_expansion_factor is None or grid.base_k is None:
            problems.append("a star grid needs both --base-R and --base-k")
        else:
            rs = sorted(set(rs) | {grid.base_expansion_factor})
            ks = sorted(set(ks) | {grid.base_k})
    dose = list(grid.dose_expansion_factors or [])
    if bool(dose) != (grid.dose_k is not None):
        problems.append("an R dose-response needs both --dose-R and --dose-k (or neither)")
        dose = []
    # A preset's dose budget is the report's business: `mlsae run --preset report` trains
    # the grid's budget only. Given explicitly to another command, it is an error.
    if grid.dose_train_tokens is not None and (
            for_report or "dose_train_tokens" in request.explicit["grid"]):
        if not for_report:
            problems.append("--dose-train-tokens is read by `mlsae report` only: train the "
                            "dose-response at another budget with --train-tokens instead")
        elif not dose:
            problems.append("--dose-train-tokens needs an R dose-response (--dose-R and "
                            "--dose-k)")
        elif grid.dose_train_tokens == budget.train_tokens:
            problems.append(f"--dose-train-tokens {grid.dose_train_tokens:,} equals "
                            "--train-tokens: give another budget (the dose-response is "
                            "trained at the grid's budget anyway)")
        elif ("dose_train_tokens" not in request.explicit["grid"]
              and "train_tokens" in request.explicit["budget"]
              and budget.train_tokens > grid.dose_train_tokens):
            problems.append(f"--train-tokens {budget.train_tokens:,} is above the preset's "
                            f"dose-response budget ({grid.dose_train_tokens:,} tokens per "
                            "layer): give --dose-train-tokens too (a larger budget for the "
                            "budget check)")
    for r, k in [(r, k) for r in rs for k in ks] + [(r, grid.dose_k) for r in dose]:
        n_latents = r * d_model
        if k > n_latents:
            problems.append(f"-k {k} > n_latents {n_latents} (expansion factor {r} x "
                            f"d_model {d_model}): lower k or raise the expansion factor")
    if info["max_positions"] and budget.seq_len > info["max_positions"]:
        problems.append(f"--seq-len {budget.seq_len} exceeds the model's "
                        f"{info['max_positions']} positions: use --seq-len "
                        f"{info['max_positions']} or less")
    if budget.train_tokens < budget.seq_len:
        problems.append(f"--train-tokens {budget.train_tokens} is less than one sequence "
                        f"(--seq-len {budget.seq_len})")
    if budget.eval_tokens < budget.seq_len:
        problems.append(f"--eval-tokens {budget.eval_tokens} is less than one sequence "
                        f"(--seq-len {budget.seq_len})")
    batch_tokens = budget.batch_tokens
    if batch_tokens > budget.train_tokens:
        if "batch_tokens" in request.explicit["budget"]:
            problems.append(f"--batch-tokens {batch_tokens} exceeds --train-tokens "
                            f"{budget.train_tokens}: lower the batch or raise the budget")
        batch_tokens = budget.train_tokens  # the preset's batch, cut to a small budget
    _check_device(target.device, problems)
    if target.precision == "float16" and target.device == "cpu":
        problems.append("--precision float16 needs a GPU: use bfloat16 or float32 on CPU")
    _check_data(target, problems)
    if problems:
        raise InvalidRequest("invalid parameters:\n  - " + "\n  - ".join(problems))

    budget = dataclasses.replace(budget, batch_tokens=batch_tokens)
    notes: list[str] = []
    corpus = _corpus_sizes(target, info)
    budget = _fit_held_out(budget, corpus, request.explicit["budget"], target.data, problems,
                           notes)
    lenses = {"off": [False], "on": [True], "both": [False, True]}[grid.lens]
    specs: list[SAESpec] = []

    def spec(role: str, spec_layers: list[int], r: int, k: int, use_lens: bool) -> SAESpec:
        return SAESpec(
            sae_id=sae_id_for(info, target.data, budget, target, r, k, spec_layers, use_lens,
                              role),
            role=role, expansion_factor=r, k=k, layers=spec_layers, lens=use_lens,
            n_latents=r * d_model)

    for use_lens in lenses:
        for r in rs:
            for k in ks:
                if star:
                    base = (r, k) == (grid.base_expansion_factor, grid.base_k)
                    on_axis = r == grid.base_expansion_factor or k == grid.base_k
                    if not (base or (on_axis and not use_lens)) or (use_lens and not base):
                        continue
                else:
                    base = True
                specs.append(spec("mlsae", chosen, r, k, use_lens))
                if (grid.baselines and len(chosen) > 1 and base
                        and not (star and use_lens)):
                    specs += [spec("baseline", [layer], r, k, use_lens) for layer in chosen]
    for r in dose:  # the R dose-response line, where the grid does not already hold it
        dose_spec = spec("mlsae", chosen, r, grid.dose_k, False)
        if all(s["sae_id"] != dose_spec["sae_id"] for s in specs):
            specs.append(dose_spec)

    n_sequences = -(-budget.train_tokens // budget.seq_len)
    if corpus.get("train"):  # a cache holds at most the whole split (reread for epochs)
        n_sequences = min(n_sequences, max(1, corpus["train"] // budget.seq_len))
    cache_bytes = cache_bytes_for(n_sequences, budget.seq_len, len(chosen), d_model)
    limit = (parse_size(budget.cache_limit) if budget.cache_limit is not None
             else default_cache_limit(out))
    source = "cache" if 0 < cache_bytes <= limit else "stream"
    _check_training_corpus(budget, corpus, source, "train_tokens" in request.explicit["budget"],
                           target.data, problems, notes)
    plan = Plan(
        request=request.to_dict(), model=info, data=target.data, layers=chosen,
        train_tokens=budget.train_tokens, eval_tokens=budget.eval_tokens, seq_len=budget.seq_len,
        seed=budget.seed, lr=budget.lr, device=target.device, batch_tokens=batch_tokens,
        budget=dataclasses.asdict(budget), target=dataclasses.asdict(target), specs=specs,
        training_source=source, cache_bytes=cache_bytes, cache_limit_bytes=limit,
        corpus_tokens=corpus, notes=notes, disk={})
    plan["disk"] = disk_plan(plan, out)
    _check_disk(plan["disk"], problems)
    for one in specs:  # the library's own checks on the exact configs training will use
        try:
            train_config(plan, one)
        except ValueError as err:
            problems.append(f"{one['sae_id']}: {err}")
    if problems:
        raise InvalidRequest("invalid parameters:\n  - " + "\n  - ".join(problems))
    return plan


# ---------------------------------------------------------------- report and sweep plans

def report_request(preset: str = "report", target: Target | dict | None = None,
                   grid: Grid | dict | None = None, budget: Budget | dict | None = None
                   ) -> RunRequest:
    """The report's request: a star grid (base R and k default to the first R and k given)."""
    request = RunRequest(preset=preset, target=target, grid=grid, budget=budget)
    g = request.grid
    if g.lens == "on":
        raise InvalidRequest("--lens on would train only the tuned-lens base config; the report "
                             "compares with and without the lens: use --lens both (the default) "
                             "or --lens off")
    if g.base_expansion_factor is None or g.base_k is None:
        request.grid = dataclasses.replace(
            g, base_expansion_factor=g.base_expansion_factor or g.expansion_factors[0],
            base_k=g.base_k or g.ks[0])
    if not request.grid.baselines:
        raise InvalidRequest("the report compares the MLSAE with single-layer SAEs: leave out "
                             "--no-baselines")
    return request


def check_report_plan(request: RunRequest, out: str | None = None) -> Plan:
    """The star grid's plan; InvalidRequest listing every problem before any compute."""
    plan = make_plan(request, out, for_report=True)
    if plan["model"]["n_layers"] < 2 or len(plan["layers"]) < 2:
        raise InvalidRequest(f"model {plan['model']['name']!r}: a multi-layer report needs "
                                "at least two blocks")
    return plan


REPORT_MODELS = ("embedded", "embedded-4x128", "embedded-8x288")
"""The report's models when none is given: the first gets the star grid, every other one the
base-config MLSAE (the model family of the cross-model section; mlsae/embedded/family)."""


def report_models(models: list[str] | tuple[str, ...] | None, target: Target | dict | None = None
                  ) -> list[str]:
    """The report's models: `models` (--model, repeated) if given, else target.model, else
    REPORT_MODELS; each once, in order."""
    if not models:
        given = target.get("model") if isinstance(target, dict) else getattr(target, "model", None)
        models = [given] if given else list(REPORT_MODELS)
    return list(dict.fromkeys(models))


def _with_model(request: RunRequest, model: str) -> RunRequest:
    """A copy of a resolved request on another model (no preset is applied again)."""
    other = copy.copy(request)
    other.target = dataclasses.replace(request.target, model=model)
    other.explicit = {**request.explicit,
                      "target": sorted({*request.explicit.get("target", []), "model"})}
    return other


def family_request(request: RunRequest, model: str) -> RunRequest:
    """Another model's request in a multi-model report: the same budget, and only the MLSAE
    at the star's base config (no other R or k, no lens, no baselines, no dose-response)."""
    family = _with_model(request, model)
    family.grid = dataclasses.replace(
        request.grid, expansion_factors=[request.grid.base_expansion_factor],
        ks=[request.grid.base_k], lens="off", baselines=False, layers=None,
        dose_expansion_factors=None, dose_k=None, dose_train_tokens=None)
    return family


def dose_plan_request(request: RunRequest, model: str) -> RunRequest | None:
    """The report's dose-response at its own budget (Grid.dose_train_tokens) on the first
    model: only the MLSAE at each dose R at the dose k (no lens, no baselines), every other
    setting as the grid's, so each differs from its twin at the grid's budget in the budget
    alone. None when the request gives no dose budget."""
    grid = request.grid
    if grid.dose_train_tokens is None or not grid.dose_expansion_factors or grid.dose_k is None:
        return None
    dose = _with_model(request, model)
    dose.grid = dataclasses.replace(
        grid, expansion_factors=list(grid.dose_expansion_factors), ks=[grid.dose_k],
        lens="off", baselines=False, base_expansion_factor=None, base_k=None,
        dose_expansion_factors=None, dose_k=None, dose_train_tokens=None)
    dose.budget = dataclasses.replace(request.budget, train_tokens=grid.dose_train_tokens)
    dose.explicit = {**dose.explicit,
                     "budget": sorted({*dose.explicit.get("budget", []), "train_tokens"})}
    return dose


class ReportPlans(NamedTuple):
    """The report's plans: one per model, and the dose-response at its own budget."""

    models: list[Plan]
    """The star grid on the first model, the base-config MLSAE on every other."""
    dose: Plan | None
    """The first model's dose-response at Grid.dose_train_tokens (None: not asked)."""

    @property
    def all(self) -> list[Plan]:
        return [*self.models, *([self.dose] if self.dose else [])]


def check_report_plans(request: RunRequest, models: list[str], out: str | None = None
                       ) -> ReportPlans:
    """The report's plans (ReportPlans); InvalidRequest listing every problem of every model
    before any compute."""
    plans: list[Plan] = []
    problems: list[str] = []
    if not models:
        raise InvalidRequest("give at least one model (--model)")
    for i, model in enumerate(models):
        try:
            plans.append(check_report_plan(_with_model(request, model) if i == 0
                                           else family_request(request, model), out))
        except InvalidRequest as err:
            problems.append(f"{model}: {err}" if len(models) > 1 else str(err))
    dose: Plan | None = None
    dose_request = dose_plan_request(request, models[0])
    if dose_request is not None and not problems:
        try:
            dose = make_plan(dose_request, out)
            # its budget is --dose-train-tokens: say so where the plan names the option
            dose["notes"] = [
                f"the report's R dose-response again at --dose-train-tokens "
                f"{dose['train_tokens']:,} (its budget check)",
                *(n.replace("--train-tokens", "--dose-train-tokens") for n in dose["notes"])]
        except InvalidRequest as err:
            problems.append(f"the dose-response at --dose-train-tokens: {err}")
    if problems:
        raise InvalidRequest("\n".join(problems))
    return ReportPlans(plans, dose)


def plan_sweep(models: list[str], preset: str = "sweep", target: Target | dict | None = None,
               grid: Grid | dict | None = None, budget: Budget | dict | None = None,
               out: str | None = None) -> list[Plan]:
    """One plan per model (the same grid and budget); every problem of every model listed."""
    plans: list[Plan] = []
    problems: list[str] = []
    if not models:
        raise InvalidRequest("give at least one model (--model)")
    for model in models:
        try:
            request = RunRequest(preset=preset, target=target, grid=grid, budget=budget)
            request.target = dataclasses.replace(request.target, model=model)
            plans.append(make_plan(request, out))
        except InvalidRequest as err:
            problems.append(f"{model}: {err}")
    if problems:
        raise InvalidRequest("invalid sweep parameters:\n" + "\n".join(problems))
    return plans


def _check_model_files(info: ModelInfo) -> None:
    """The weight files are readable (headers and sizes) before any compute: a truncated
    download is named with its fix here, not deep inside a step."""
    from mlsae.models import check_model_files

    check_model_files(info["source"])


def sae_config(plan: Plan | dict, spec: SAESpec | dict, lens: str | None):
    """SAEConfig of one planned autoencoder (k_aux and the dead window scale to short runs
    unless the budget sets them)."""
    from mlsae.sae import SAEConfig

    budget, model = plan["budget"], plan["model"]
    n_latents = spec["expansion_factor"] * model["d_model"]
    k_aux = budget.get("k_aux") or max(1, min(REFERENCE_K_AUX, n_latents // 2))
    dead = budget.get("dead_tokens") or max(1, min(REFERENCE_DEAD_TOKENS,
                                                   plan["train_tokens"] // 5))
    return SAEConfig(
        d_model=model["d_model"], n_layers=model["n_layers"], layers=list(spec["layers"]),
        expansion_factor=spec["expansion_factor"], k=spec["k"], k_aux=k_aux,
        aux_coef=budget.get("aux_coef", 1 / 32), dead_tokens=dead, model=model["name"],
        lens=lens, extra={"sae_id": spec["sae_id"], "role": spec["role"], "data": plan["data"]})


def train_config(plan: Plan | dict, spec: SAESpec | dict, lens: str | None = None):
    """TrainConfig of one planned autoencoder: the budget, ~10 resume checkpoints per run.

    A single-layer baseline gets its own seed (seed + 1 + its layer): with the MLSAE's
    seed it would start from the very same decoder, and MMCS between the two
    dictionaries would measure the shared initialisation, not what they learned.
    """
    from mlsae.sae import TrainConfig

    if lens is None and spec["lens"]:
        lens = "tuned-lens"
    budget = plan["budget"]
    seed = plan["seed"] + (1 + spec["layers"][0] if spec["role"] == "baseline" else 0)
    precision = plan["target"].get("precision") or "float32"
    return TrainConfig(
        sae=sae_config(plan, spec, lens), train_tokens=plan["train_tokens"],
        batch_tokens=plan["batch_tokens"], lr=plan["lr"],
        adam_eps=budget.get("adam_eps", 6.25e-10), seed=seed, device=plan["device"],
        # A buffer larger than the whole budget only makes a stream read past the budget.
        shuffle_tokens=min(budget.get("shuffle_tokens") or 65_536, plan["train_tokens"]),
        autocast=None if precision == "float32" else precision,
        checkpoint_every=0, checkpoint_seconds=60 * (budget.get("checkpoint_minutes") or 10.0))


def run_settings(plan: Plan | dict) -> dict[str, Any]:
    """What every step of one model needs from the plan, without the list of autoencoders
    (so adding a config to a grid does not invalidate the cached steps of the others) and
    without the cache limit and shared_cache (which change where data comes from and goes
    to, not the results)."""
    settings = {key: value for key, value in plan.items() if key not in PLAN_ONLY}
    settings["budget"] = {k: v for k, v in plan["budget"].items()
                          if k not in ("cache_limit", "shared_cache")}
    return settings


def stable_plan(plan: Plan | dict) -> dict[str, Any]:
    """The plan without what changes from one identical run to the next (the default cache
    limit follows the free disk space), for steps whose cache key includes the plan."""
    return {key: value for key, value in plan.items() if key not in ("cache_limit_bytes", "disk")}


def extract_config(settings: Plan | dict, split: str = "train", tokens: int | None = None,
                   stream: bool = False):
    """The ExtractConfig of the plan's training activations (or `tokens` of another split):
    sequences = ceil(tokens / seq_len). The training stream (`stream`) gets 5% and one
    sequence more: special tokens (masked) give no examples, so a stream of exactly that
    many sequences would run out before the last step; training stops at its budget, and
    the margin bounds what the last shuffle window forwards past it."""
    from mlsae.extract import ExtractConfig

    tokens = settings["train_tokens"] if tokens is None else tokens
    precision = settings["target"].get("precision") or "float32"
    return ExtractConfig(
        model=settings["model"]["name"],
        data=data_config(settings, split), layers=list(settings["layers"]),
        device=settings["device"],
        max_sequences=(-(-tokens * 105 // (100 * settings["seq_len"])) + 1 if stream
                       else max(1, -(-tokens // settings["seq_len"]))),
        model_dtype="float32" if precision == "float32" else precision)


def nest_fields(flat: dict[str, Any]) -> dict[str, Any]:
    """{"ks": [32], "preset": "paper", "budget": {...}} -> {"preset": ..., "grid": {"ks": [32]},
    "budget": {...}}: flat field names go to their part; InvalidRequest names unknown keys."""
    owners = {f.name: part for part, cls in PARTS.items() for f in dataclasses.fields(cls)}
    nested: dict[str, Any] = {}
    unknown = []
    for key, value in flat.items():
        if key == "preset":
            nested["preset"] = value
        elif key in PARTS:
            nested.setdefault(key, {}).update(dict(value or {}))
        elif key in owners:
            nested.setdefault(owners[key], {})[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise InvalidRequest(f"unknown parameters {sorted(unknown)}: use preset, target, grid, "
                             f"budget or one of their fields ({', '.join(sorted(owners))})")
    return nested
