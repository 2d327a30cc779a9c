"""Load a causal LM and its tokenizer from a local directory or a hub id.

`None` or "embedded" means the model shipped in mlsae/embedded/model. A hub
id is tried only when the hub is reachable (or the files are already in the
local cache): offline, it fails within seconds with a message that says how
to point at a local copy, instead of retrying for ~23 s per file.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from mlsae.paths import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME

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
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
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
            f"On a machine with network run `huggingface-cli download {text} --local-dir DIR`, "
            "copy DIR here and pass --model DIR (or use --model embedded)"
        )
    return text, text


def load_model(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "float32",
) -> LoadedModel:
    """Load a causal LM + tokenizer in eval mode; raise ModelLoadError with a fix on failure."""
    source, name = resolve_model_source(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    offline = isinstance(source, Path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=offline
        )
    except OSError as err:
        raise ModelLoadError(f"could not load model {name!r}: {err}") from err
    model.to(resolve_device(device))
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
