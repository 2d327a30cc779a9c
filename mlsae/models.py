"""Load a causal LM and its tokenizer from a local directory or a hub id.

`None` or "embedded" means the model shipped in mlsae/embedded/model. A hub
id is tried only when the hub is reachable (or the files are already in the
local cache): offline, it fails within seconds with a message that says how
to point at a local copy, instead of retrying for ~23 s per file.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mlsae.paths import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME, embedded_model_dir

if TYPE_CHECKING:  # torch and transformers are imported where used: resolving a model
    import torch  # and checking its files (parameter validation) should not pay ~3 s
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer

HUB_HOST = "huggingface.co"
HUB_PROBE_SECONDS = 3.0


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message says what to do."""


class LoadedModel(NamedTuple):
    model: PreTrainedModel
    tokenizer: Tokenizer
    name: str
    """What the user asked for, normalised: "embedded", a resolved local path, or a hub id."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) picks CUDA when available, else CPU."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)}")
    return names[dtype]


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """True when a TCP connection to the hub opens within `timeout` seconds.

    Run in a thread because name resolution itself can block far longer than
    the socket timeout on a machine without DNS.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(hit, str)
    except Exception:  # malformed ids and the like: treat as not cached
        return False


def resolve_model_source(name_or_path: str | Path | None) -> tuple[str | Path, str]:
    """Return (what to pass to from_pretrained, normalised name); raise ModelLoadError."""
    if name_or_path is None or str(name_or_path) == EMBEDDED_MODEL_NAME:
        if not (EMBEDDED_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(
                f"the embedded model is missing from {EMBEDDED_MODEL_DIR}; reinstall mlsae from "
                "a full checkout or retrain it with `python scripts/train_embedded_model.py`"
            )
        return EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME
    text = str(name_or_path)
    family_dir = embedded_model_dir(text)
    if family_dir is not None:
        if not (family_dir / "config.json").exists():
            raise ModelLoadError(
                f"the embedded model {text!r} is missing from {family_dir}; restore it from a "
                "full checkout or retrain it (its README.md gives the command)")
        return family_dir, text
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} exists but has no config.json: point --model at a directory saved "
                "with `save_pretrained` (config.json, weights and tokenizer files)"
            )
        return path.resolve(), str(path.resolve())
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep + os.sep in text
    if looks_local:
        raise ModelLoadError(
            f"model directory {text!r} does not exist: check the path, or use --model embedded "
            "for the model shipped with mlsae"
        )
    if not _hub_cached(text) and not _hub_reachable():
        raise ModelLoadError(
            f"cannot download {text!r}: the Hugging Face hub is not reachable from this machine. "
            f"On a machine with network run `{hub_download_command(text)}`, "
            "copy DIR here and pass --model DIR (or use --model embedded)"
        )
    return text, text


def hub_download_command(repo_id: str, repo_type: str = "model", local_dir: str = "DIR") -> str:
    """The `hf download` command line (the CLI that huggingface_hub installs) that copies a
    hub repository to `local_dir`; tests parse it against the installed `hf download --help`."""
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return f"hf download {repo_id}{kind} --local-dir {local_dir}"


# --------------------------------------------------------------------------- weight files

SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
    "C64": 8, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _weights_fix(name: str, directory: Path | None) -> str:
    if embedded_model_dir(name) is not None:
        return ("Fix: restore the embedded model from a full checkout (git checkout -- "
                f"{directory}) or retrain it with `python scripts/train_embedded_model.py` "
                "(its README.md gives the options)")
    if not Path(name).is_absolute():  # a hub id (local directories are resolved, absolute)
        return (f"Fix: download the model again (`{hub_download_command(name)}`, then "
                "--model DIR), or delete it from the hub cache so it is fetched again")
    return ("Fix: download the model again, or save it again with "
            "`model.save_pretrained(DIR)` (the copy in this directory is damaged)")


def check_safetensors_file(path: Path) -> str | None:
    """None if `path` is a whole safetensors file (its header parses and the data section
    has exactly the size the header's offsets give), else what is wrong. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"truncated: {size} bytes, shorter than the 8-byte header length"
            (n_header,) = struct.unpack("<Q", prefix)
            if n_header > _SAFETENSORS_MAX_HEADER:
                return (f"corrupt header: its length field says {n_header} bytes "
                        "(not a safetensors file, or damaged)")
            if 8 + n_header > size:
                return (f"truncated: the header says it is {n_header} bytes, the file has "
                        f"{size - 8} after the length field")
            raw = f.read(n_header)
    except OSError as e:
        return f"unreadable ({e})"
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        return f"corrupt header: it does not parse as JSON ({e})"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            n_values = math.prod(int(d) for d in info["shape"])
            width = SAFETENSORS_DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"corrupt header: tensor {name!r} has no valid dtype/shape/data_offsets"
        if not 0 <= begin <= stop:
            return f"corrupt header: tensor {name!r} has data_offsets {[begin, stop]}"
        if width is not None and stop - begin != math.ceil(n_values * width):
            return (f"corrupt header: tensor {name!r} ({info['dtype']} {info['shape']}) needs "
                    f"{math.ceil(n_values * width)} bytes, its offsets give {stop - begin}")
        end = max(end, stop)
    data = size - 8 - n_header
    if data != end:
        what = "truncated" if data < end else "has trailing bytes"
        return f"{what}: the header says {end} bytes of tensor data, the file has {data}"
    return None


def _check_torch_bin(path: Path) -> str | None:
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"damaged zip archive ({e})"
        return None
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] == b"\x80":  # a legacy (pre-zip) torch pickle: nothing cheap to check
        return None
    return ("truncated or not a torch checkpoint: not a zip archive (the format "
            "torch.save writes) and not a pickle")


def _model_directory(resolved: str | Path) -> Path | None:
    """The local directory holding the weights of a resolved source (resolve_model_source);
    None for a hub id that is not in the local cache (nothing on disk to check yet)."""
    if isinstance(resolved, Path):
        return resolved
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(resolved, "config.json")
    except Exception:
        hit = None
    return Path(hit).parent if isinstance(hit, str) else None


def check_model_files(source: str | Path | None) -> None:
    """Check a model's weight files without loading them: they exist (model.safetensors,
    sharded *.safetensors with their index, or pytorch_model.bin[ + index]), every
    safetensors header parses and the data size matches the header's offsets, every
    shard the index names exists, a torch .bin is a readable zip. Reads headers only
    (milliseconds). `source` is what --model takes (None/"embedded", a directory, a hub
    id: checked only when it is in the local cache). Raises ModelLoadError naming the
    file, what is wrong and the fix."""
    resolved, name = resolve_model_source(source)
    _check_weights(_model_directory(resolved), name, local=isinstance(resolved, Path))


def _check_weights(directory: Path | None, name: str, local: bool) -> None:
    """local=False (a hub id's cache): files not downloaded yet are fetched on loading, so
    only the ones present are checked."""
    if directory is None:
        return
    fix = _weights_fix(name, directory)
    to_check: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if not index.exists():
            continue
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: unreadable shard index ({e}). {fix}") from e
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing and local:
            raise ModelLoadError(f"{directory / missing[0]}: missing ({len(missing)} of "
                                 f"{len(shards)} shards named in {index.name} missing). {fix}")
        to_check = [directory / s for s in shards if (directory / s).is_file()]
        break
    else:
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (directory / single).is_file():
                to_check = [directory / single]
                break
    if not to_check and local:
        raise ModelLoadError(
            f"{directory}: no weights (model.safetensors, model-*.safetensors with "
            "model.safetensors.index.json, or pytorch_model.bin). "
            f"{fix}")
    for path in to_check:
        problem = (check_safetensors_file(path) if path.suffix == ".safetensors"
                   else _check_torch_bin(path))
        if problem:
            raise ModelLoadError(f"{path}: {problem}. {fix}")


def load_model(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "float32",
) -> LoadedModel:
    """Load a causal LM + tokenizer in eval mode; raise ModelLoadError with a fix on failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = resolve_model_source(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    offline = isinstance(source, Path)
    _check_weights(_model_directory(source), name, local=offline)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=offline
        )
    except OSError as err:
        raise ModelLoadError(f"could not load model {name!r}: {err}") from err
    except Exception as err:
        if "safetensor" not in type(err).__name__.lower():
            raise
        # The header check passed but the library still refused (e.g. a downloaded hub
        # model damaged after the check): name the files it reads.
        directory = _model_directory(source)
        where = ", ".join(str(p) for p in sorted((directory or Path(str(source))).glob(
            "*.safetensors"))) or str(source)
        raise ModelLoadError(f"could not read the weights of model {name!r} ({where}): "
                             f"{type(err).__name__}: {err}. {_weights_fix(name, directory)}"
                             ) from err
    model.to(resolve_device(device))
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
