"""Tuned-lens translators as a change of basis around the MLSAE (SPEC 3).

A *basis* maps block outputs into the space the SAE sees, and back:

    basis.to_sae(x_ND, layer_N)    y = T(x) = x + A x + c      (identity for the last block)
    basis.from_sae(y_ND, layer_N)  x = (I + A)^{-1} (y - c)    (exact: a real linear solve)

`layer_N` holds the BLOCK index (0..L-1) of each row; an int applies one layer
to a whole batch of any shape `[..., D]`. tuned-lens numbers its translators by
stream index (0 = embeddings, l+1 = output of block l) and has none for the
last block, whose output is what the unembedding reads: so block l uses
translator l+1 and the last block is not translated. The inverse is
precomputed once per layer in float64 and applied in the working dtype
(float32, or float64 for float64 input; half precision is upcast to float32).
Metrics stay in the model's own basis: map reconstructions back with
`from_sae` before comparing them with the model's activations.

Choosing a lens, `load_basis(spec, loaded)`, where `spec` is
- None or "none": `IdentityBasis`, no lens;
- "auto" or "embedded": the lens committed in mlsae/embedded/lens when it fits
  the model (the embedded model); else a pretrained tuned-lens lens from the
  hub when the hub is reachable and has one for the model's hub id; else a lens
  trained here (`mlsae.lens_train`) and cached in `$MLSAE_HOME/lenses/<model>`,
  reused by later calls;
- a local directory in tuned-lens's format (params.pt + config.json), such as
  one written by `scripts/train_embedded_lens.py` or `TunedLens.save`;
- a hub id: a lens in tuned-lens's hub space (AlignmentResearch/tuned-lens,
  folder lens/<id>), e.g. "EleutherAI/pythia-70m-deduped". Offline this fails
  within seconds with how to point at a local copy.

Every lens is checked against the model (layer count, width and tuned-lens's
unembedding hash); a mismatch raises `LensError` naming the fix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from mlsae.models import LoadedModel, _hub_reachable
from mlsae.paths import (
    EMBEDDED_LENS_DIR,
    EMBEDDED_MODEL_NAME,
    default_warehouse,
    embedded_model_dir,
)

if TYPE_CHECKING:
    from tuned_lens import TunedLens

    from mlsae.lens_train import LensTrainConfig

log = logging.getLogger(__name__)

LENS_HUB_REPO = "AlignmentResearch/tuned-lens"
LENS_HUB_REPO_TYPE = "space"
PARAMS_FILE, CONFIG_FILE = "params.pt", "config.json"
# Beyond this the float32 inverse loses most digits: refuse rather than be silently wrong.
MAX_CONDITION = 1e7
TRAIN_HINT = ("train one for this model: load_basis('auto', loaded) does it, or run "
              "`python scripts/train_embedded_lens.py --model MODEL --out DIR` and pass DIR")


class LensError(ValueError):
    """A lens could not be found, loaded or used with this model; the message says what to do."""


@runtime_checkable
class ResidualBasis(Protocol):
    """Maps block outputs into the SAE's basis and back; layers are block indices 0..L-1."""

    name: str

    def to_sae(self, x_ND: Tensor, layer_N: Tensor | int) -> Tensor: ...

    def from_sae(self, y_ND: Tensor, layer_N: Tensor | int) -> Tensor: ...


class IdentityBasis:
    """No lens: the SAE sees the block outputs as they are."""

    name = "none"

    def to_sae(self, x_ND: Tensor, layer_N: Tensor | int) -> Tensor:
        return x_ND

    def from_sae(self, y_ND: Tensor, layer_N: Tensor | int) -> Tensor:
        return y_ND

    def __repr__(self) -> str:
        return "IdentityBasis()"


def translator_index(layer: int, n_layers: int) -> int | None:
    """tuned-lens translator (stream index) for the output of block `layer`; None = identity."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is not a block index of a {n_layers}-block model")
    return layer + 1 if layer + 1 < n_layers else None


class _Mats(NamedTuple):
    A_LDD: Tensor      # per block: translator weight (zeros for the last block)
    c_LD: Tensor       # per block: translator bias
    inv_T_LDD: Tensor  # per block: ((I + A)^{-1})^T, so rows map as x = (y - c) @ inv_T


class TunedLensBasis:
    """y = x + A x + c per block (tuned-lens translators), with the exact inverse."""

    def __init__(self, weight_LDD: Tensor, bias_LD: Tensor | None, name: str = "tuned-lens"):
        """`weight_LDD`, `bias_LD`: tuned-lens translators by STREAM index 0..L-1 (L = blocks)."""
        if weight_LDD.ndim != 3 or weight_LDD.shape[1] != weight_LDD.shape[2]:
            raise LensError(f"translator weights must be [L, D, D], got {tuple(weight_LDD.shape)}")
        n_layers, d_model, _ = weight_LDD.shape
        if bias_LD is None:
            bias_LD = weight_LDD.new_zeros(n_layers, d_model)
        if bias_LD.shape != (n_layers, d_model):
            raise LensError(f"translator biases must be [{n_layers}, {d_model}], "
                            f"got {tuple(bias_LD.shape)}")
        self.name, self.n_layers, self.d_model = name, n_layers, d_model
        W_LDD = weight_LDD.detach().to("cpu", torch.float64)
        b_LD = bias_LD.detach().to("cpu", torch.float64)
        # Re-index by block: block l reads translator l+1; the last block stays zero (identity).
        A_LDD = torch.zeros_like(W_LDD)
        c_LD = torch.zeros_like(b_LD)
        A_LDD[:-1], c_LD[:-1] = W_LDD[1:], b_LD[1:]
        M_LDD = torch.eye(d_model, dtype=torch.float64) + A_LDD
        with _one_thread():
            cond_L = torch.linalg.cond(M_LDD)
        bad = [i for i, c in enumerate(cond_L.tolist()) if not c < MAX_CONDITION]
        if bad:
            raise LensError(
                f"lens {name!r}: I + A is singular or ill-conditioned for blocks {bad} "
                f"(condition numbers {[f'{cond_L[i]:.3g}' for i in bad]}), so reconstructions "
                f"cannot be mapped back exactly; retrain the lens (weight decay keeps A small)")
        with _one_thread():  # LU-based inverse in float64, once; applying it is a matmul
            inv_T_LDD = torch.linalg.inv(M_LDD).transpose(1, 2).contiguous()
        self._master = _Mats(A_LDD, c_LD, inv_T_LDD)
        self.condition_L = cond_L
        self._cache: dict[tuple[torch.device, torch.dtype], _Mats] = {}

    @classmethod
    def from_lens(cls, lens: TunedLens, name: str = "tuned-lens") -> TunedLensBasis:
        """Wrap an in-memory `tuned_lens.TunedLens` (e.g. one just trained)."""
        W_LDD = torch.stack([t.weight.detach() for t in lens.layer_translators])
        biases = [t.bias for t in lens.layer_translators]
        b_LD = None if biases[0] is None else torch.stack([b.detach() for b in biases])
        return cls(W_LDD, b_LD, name=name)

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> TunedLensBasis:
        """Read params.pt of a tuned-lens directory (no model check: use `load_lens_basis`)."""
        path = Path(path)
        state = torch.load(path / PARAMS_FILE, map_location="cpu", weights_only=True)
        n = len({k.split(".")[0] for k in state})
        try:
            W_LDD = torch.stack([state[f"{i}.weight"] for i in range(n)])
            b_LD = torch.stack([state[f"{i}.bias"] for i in range(n)]) if "0.bias" in state else None
        except KeyError as err:
            raise LensError(f"{path / PARAMS_FILE} is not a tuned-lens checkpoint "
                            f"(missing {err}); {TRAIN_HINT}") from err
        return cls(W_LDD, b_LD, name=name or str(path))

    def mats(self, device: torch.device, dtype: torch.dtype) -> _Mats:
        """The per-block matrices on `device` in `dtype`, cast once and cached."""
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = _Mats(*(t.to(device, dtype) for t in self._master))
        return self._cache[key]

    def to_sae(self, x_ND: Tensor, layer_N: Tensor | int) -> Tensor:
        def fwd(x, m: _Mats, layer: int) -> Tensor:
            # The same arithmetic as tuned-lens's transform_hidden: h + Linear(h).
            return x + x @ m.A_LDD[layer].T + m.c_LD[layer]
        return self._apply(x_ND, layer_N, fwd)

    def from_sae(self, y_ND: Tensor, layer_N: Tensor | int) -> Tensor:
        def inv(y, m: _Mats, layer: int) -> Tensor:
            return (y - m.c_LD[layer]) @ m.inv_T_LDD[layer]
        return self._apply(y_ND, layer_N, inv)

    def _apply(self, x: Tensor, layer_N: Tensor | int,
               fn: Callable[[Tensor, _Mats, int], Tensor]) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"expected vectors of width {self.d_model}, got {tuple(x.shape)}")
        work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        m = self.mats(x.device, work)
        last = self.n_layers - 1
        if isinstance(layer_N, int) or (isinstance(layer_N, Tensor) and layer_N.ndim == 0):
            layer = int(layer_N)
            translator_index(layer, self.n_layers)  # range check
            return x if layer == last else fn(x.to(work), m, layer).to(x.dtype)
        layer_N = torch.as_tensor(layer_N, device=x.device)
        if layer_N.shape != x.shape[:-1]:
            raise ValueError(f"layer_N has shape {tuple(layer_N.shape)}; expected one block index "
                             f"per row of x, i.e. {tuple(x.shape[:-1])}")
        out = x.clone()  # rows of the last block stay as they are
        for layer in layer_N.unique().tolist():
            translator_index(layer, self.n_layers)
            if layer == last:
                continue
            rows = layer_N == layer
            out[rows] = fn(x[rows].to(work), m, layer).to(x.dtype)
        return out

    def __repr__(self) -> str:
        return f"TunedLensBasis(name={self.name!r}, n_layers={self.n_layers}, d_model={self.d_model})"


# ---------------------------------------------------------------- loading + checks


def unembed_hash(model: torch.nn.Module) -> str:
    """tuned-lens's fingerprint of a model's unembedding (recorded in a lens's config.json)."""
    from tuned_lens.nn.unembed import Unembed

    return Unembed(model).unembedding_hash()


def check_lens_config(config: dict, model: torch.nn.Module, source: str) -> None:
    """Raise LensError unless the lens config fits `model` (layers, width, unembedding)."""
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    lens_for = config.get("base_model_name_or_path", "?")
    if config.get("num_hidden_layers") != n_layers or config.get("d_model") != d_model:
        raise LensError(
            f"lens {source} was made for a model with {config.get('num_hidden_layers')} layers "
            f"of width {config.get('d_model')} ({lens_for}); this model has {n_layers} layers of "
            f"width {d_model}. Use the lens trained for this model, or {TRAIN_HINT}")
    recorded = config.get("unembed_hash")
    if recorded and recorded != unembed_hash(model):
        raise LensError(
            f"lens {source} was trained for another model ({lens_for}): its unembedding hash "
            f"does not match this model's. Use the lens trained for this model, or {TRAIN_HINT}")


def read_lens_config(path: Path) -> dict:
    if not ((path / CONFIG_FILE).is_file() and (path / PARAMS_FILE).is_file()):
        raise LensError(f"{path} is not a tuned-lens directory: it needs {PARAMS_FILE} and "
                        f"{CONFIG_FILE} (the format of TunedLens.save); {TRAIN_HINT}")
    return json.loads((path / CONFIG_FILE).read_text())


def load_lens_basis(path: str | Path, model: torch.nn.Module,
                    name: str | None = None) -> TunedLensBasis:
    """Load a local tuned-lens directory as a basis, after checking it fits `model`."""
    path = Path(path).expanduser()
    check_lens_config(read_lens_config(path), model, str(path))
    basis = TunedLensBasis.from_dir(path, name=name or str(path))
    if (basis.n_layers, basis.d_model) != (model.config.num_hidden_layers,
                                           model.config.hidden_size):
        raise LensError(f"{path / PARAMS_FILE} holds {basis.n_layers} translators of width "
                        f"{basis.d_model}, which contradicts its {CONFIG_FILE}; {TRAIN_HINT}")
    return basis


def load_tuned_lens(source: str | Path, model: torch.nn.Module) -> TunedLens:
    """The lens as a `tuned_lens.TunedLens` (for its own forward/plots), checked against `model`."""
    from tuned_lens import TunedLens

    path = resolve_lens_dir(str(source))
    check_lens_config(read_lens_config(path), model, str(path))
    return TunedLens.from_model_and_pretrained(model, str(path), map_location="cpu",
                                               weights_only=True)


def resolve_lens_dir(source: str) -> Path:
    """A local lens directory for `source` (a path, or a hub id fetched/cached); LensError if none."""
    path = Path(source).expanduser()
    if path.exists():
        read_lens_config(path)
        return path
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise LensError(f"lens directory {source!r} does not exist: check the path; {TRAIN_HINT}")
    return _hub_lens_dir(source)


def _hub_lens_dir(lens_id: str) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    sub = f"lens/{lens_id}"
    cached = [try_to_load_from_cache(LENS_HUB_REPO, f"{sub}/{f}", repo_type=LENS_HUB_REPO_TYPE)
              for f in (PARAMS_FILE, CONFIG_FILE)]
    if all(isinstance(c, str) for c in cached):
        return Path(cached[0]).parent
    if not _hub_reachable():
        raise LensError(
            f"cannot download the tuned lens {lens_id!r}: the Hugging Face hub is not reachable "
            f"from this machine. On a machine with network run `hf download "
            f"{LENS_HUB_REPO} --repo-type space --include '{sub}/*' --local-dir DIR`, copy "
            f"DIR/{sub} here and pass that directory as the lens (or use the lens 'auto', "
            "which trains one locally)")
    try:
        for f in (CONFIG_FILE, PARAMS_FILE):
            got = hf_hub_download(LENS_HUB_REPO, f, subfolder=sub, repo_type=LENS_HUB_REPO_TYPE)
    except Exception as err:  # 404s, gated repos, flaky network: one clear message
        raise LensError(f"no pretrained tuned lens {lens_id!r} on the hub ({LENS_HUB_REPO}, "
                        f"{sub}): {err}. Pass a local lens directory, or {TRAIN_HINT}") from err
    return Path(got).parent


@contextlib.contextmanager
def _one_thread():
    """Run LAPACK on one torch thread: with the CPU build of torch 2.13.0, the batched float64
    inverse fails inside oneMKL after torch.set_num_threads(2) ("Parameter 6 was incorrect on
    entry to DLASWP") and then hangs; on one thread it takes milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def trained_lens_dir(model_name: str, cache_dir: str | Path | None = None) -> Path:
    """Where 'auto' keeps the lens it trains for `model_name` (reused by later calls)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", model_name.strip("/")).strip("-")[-80:] or "model"
    return Path(cache_dir or default_warehouse() / "lenses") / slug


def load_basis(spec: str | Path | None, loaded: LoadedModel, *,
               train: LensTrainConfig | None = None,
               cache_dir: str | Path | None = None) -> ResidualBasis:
    """The basis named by `spec` for `loaded` (see the module docstring); LensError on bad input.

    `train` configures the lens trained by "auto" when no lens fits; `cache_dir`
    is where such lenses are kept (default `$MLSAE_HOME/lenses`).
    """
    if spec is None or str(spec).lower() in {"", "none"}:
        return IdentityBasis()
    text = str(spec)
    if text.lower() in {"auto", EMBEDDED_MODEL_NAME}:
        return _auto_basis(loaded, train, cache_dir)
    path = resolve_lens_dir(text)
    return load_lens_basis(path, loaded.model, name=text)


def _fits(path: Path, model: torch.nn.Module) -> bool:
    try:
        check_lens_config(read_lens_config(path), model, str(path))
    except LensError:
        return False
    return True


def _auto_basis(loaded: LoadedModel, train: LensTrainConfig | None,
                cache_dir: str | Path | None) -> TunedLensBasis:
    model = loaded.model
    if (EMBEDDED_LENS_DIR / CONFIG_FILE).exists() and _fits(EMBEDDED_LENS_DIR, model):
        return load_lens_basis(EMBEDDED_LENS_DIR, model, name=EMBEDDED_MODEL_NAME)
    out = trained_lens_dir(loaded.name, cache_dir)
    if (out / CONFIG_FILE).exists() and _fits(out, model):
        log.info("using the lens trained earlier for %s: %s", loaded.name, out)
        return load_lens_basis(out, model, name=str(out))
    is_hub_id = not Path(loaded.name).exists() and embedded_model_dir(loaded.name) is None
    if is_hub_id and _hub_reachable():
        try:
            path = _hub_lens_dir(loaded.name)
            return load_lens_basis(path, model, name=loaded.name)
        except LensError as err:
            log.info("no usable pretrained lens for %s (%s); training one", loaded.name, err)
    from mlsae.lens_train import train_lens_for_model

    log.info("training a tuned lens for %s into %s", loaded.name, out)
    train_lens_for_model(loaded, out, train)
    return load_lens_basis(out, model, name=str(out))
