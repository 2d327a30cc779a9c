"""Read the files of another tool's autoencoder: JSON configs and safetensors weights, each
checked before use so a damaged or wrong file is one clear InteropError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlsae.interop.errors import InteropError


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; InteropError (with `fix`) when missing or not an object."""
    if not path.is_file():
        raise InteropError(f"{path}: missing. {fix}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InteropError(f"{path}: not valid JSON ({err}). {fix}") from err
    if not isinstance(raw, dict):
        raise InteropError(f"{path}: expected a JSON object, found {type(raw).__name__}. {fix}")
    return raw


def tensor_names(path: Path, fix: str) -> list[str]:
    """The tensor names of a safetensors file, after checking its header and data size
    (mlsae.models.check_safetensors_file): a truncated or corrupt file is named with its fix
    here instead of failing deep inside the loader."""
    from safetensors import safe_open

    from mlsae.models import check_safetensors_file

    if not path.is_file():
        raise InteropError(f"{path}: missing. {fix}")
    problem = check_safetensors_file(path)
    if problem:
        raise InteropError(f"{path}: {problem}. {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # the library's own errors
        raise InteropError(f"{path}: unreadable safetensors file ({err}). {fix}") from err


def read_safetensors(path: Path, fix: str, names: list[str] | None = None) -> dict[str, Any]:
    """Tensors of a checked safetensors file (CPU): `names` only (a checkpoint that also holds
    a transformer is not read whole), or all of them."""
    from safetensors import safe_open

    present = tensor_names(path, fix)
    wanted = present if names is None else [n for n in names if n in present]
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in wanted}
    except Exception as err:
        raise InteropError(f"{path}: unreadable safetensors file ({err}). {fix}") from err


def expect_shape(tensors: dict[str, Any], name: str, shape: tuple[int, ...], where: Path,
                 fix: str) -> Any:
    """tensors[name], which must exist and have `shape`."""
    if name not in tensors:
        raise InteropError(f"{where}: no tensor {name!r} (found {sorted(tensors)[:8]}). {fix}")
    tensor = tensors[name]
    if tuple(tensor.shape) != tuple(shape):
        raise InteropError(f"{where}: tensor {name!r} has shape {list(tensor.shape)}, expected "
                           f"{list(shape)}. {fix}")
    if not tensor.is_floating_point():
        raise InteropError(f"{where}: tensor {name!r} is {tensor.dtype}, expected floating "
                           f"point. {fix}")
    return tensor
