"""The paper's released MLSAE format (github tim-lawson/mlsae; hub repos
tim-lawson/mlsae-pythia-*-x{R}-k{k} and ...-tfm): read it, write it, map it onto mlsae.

What its `MLSAE.save_pretrained` writes (PyTorchModelHubMixin):

    config.json          {"n_inputs", "n_latents", "k", "auxk", "dead_steps_threshold",
                          "dead_threshold", "standardize"}
    model.safetensors    encoder.weight [n_latents, n_inputs]   (nn.Linear, no bias)
                         decoder.weight [n_inputs, n_latents]   (nn.Linear; column j = latent j)
                         pre_encoder_bias [n_inputs]
                         last_nonzero [n_latents] int64          (training state; ignored)

A `-tfm` checkpoint is the Lightning module (`MLSAETransformer.save_pretrained`): its
config.json holds the run's hyperparameters (model_name, layers, expansion_factor, k,
auxk, dead_tokens_threshold, standardize, tuned_lens, ...) and model.safetensors the
autoencoder's tensors under `autoencoder.` beside the transformer's under `transformer.`.

The forward pass is mlsae's (SPEC 2): both standardise per vector with the unbiased std
plus 1e-5, subtract the pre-encoder bias, take the top k then ReLU, decode sparsely, add
the bias and de-standardise with the std (no 1e-5). So W_enc = encoder.weight,
W_dec = decoder.weight^T, b = pre_encoder_bias, and the import is exact.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mlsae.interop.errors import InteropError
from mlsae.interop.tensors import expect_shape, read_json, read_safetensors, tensor_names
from mlsae.interop.weights import Weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
AUTOENCODER_PREFIXES = ("", "autoencoder.")
"""Where the autoencoder's tensors sit: the autoencoder repos, the -tfm checkpoints."""
REFERENCE_TOKENS_PER_STEP = 2048 * 64
"""The reference training step: batch 1 x 2048 tokens x 64 accumulated batches; its dead
window is counted in steps (dead_steps_threshold), ours in tokens."""
FIX = ("Pass the directory of one of the paper's MLSAEs as its save_pretrained wrote it "
       "(config.json + model.safetensors, e.g. a download of "
       "tim-lawson/mlsae-pythia-70m-deduped-x64-k32)")
_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class PaperConfig:
    """The paper module's constructor arguments (its config.json)."""

    n_inputs: int
    """Input width: the model's d_model."""
    n_latents: int
    """Number of latents."""
    k: int
    """Active latents per example (TopK)."""
    auxk: int | None = 256
    """Dead latents used by the AuxK loss (None: no AuxK)."""
    dead_steps_threshold: int | None = None
    """Training steps without firing after which a latent counts as dead (the reference counts
    steps of REFERENCE_TOKENS_PER_STEP tokens)."""
    dead_threshold: float = 1e-3
    """A latent fires when its activation exceeds this."""
    standardize: bool = True
    """Per-vector standardisation of the inputs (SPEC 2)."""

    def __post_init__(self) -> None:
        for name in ("n_inputs", "n_latents", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InteropError(f"{CONFIG_FILE}: {name} must be a positive integer, got "
                                   f"{value!r}. {FIX}")
        if self.k > self.n_latents:
            raise InteropError(f"{CONFIG_FILE}: k = {self.k} exceeds n_latents = "
                               f"{self.n_latents}. {FIX}")
        if not isinstance(self.standardize, bool):
            raise InteropError(f"{CONFIG_FILE}: standardize must be true or false, got "
                               f"{self.standardize!r}. {FIX}")


class PaperSAE(NamedTuple):
    """One autoencoder read from the paper's format."""

    weights: Weights
    config: PaperConfig
    kind: str
    """"autoencoder" (the autoencoder repos) or "tfm" (a checkpoint with the transformer)."""
    hyperparameters: dict[str, Any]
    """config.json as found (for a -tfm checkpoint: the run's hyperparameters)."""
    transformer: dict[str, int] | None
    """A -tfm checkpoint's transformer shape read from its tensors: {"d_model", "n_layers"}."""

    @property
    def layers(self) -> list[int] | None:
        """The blocks it was trained on when the checkpoint says (-tfm), else None (all)."""
        layers = self.hyperparameters.get("layers") if self.kind == "tfm" else None
        return [int(layer) for layer in layers] if layers else None

    @property
    def model_name(self) -> str | None:
        return self.hyperparameters.get("model_name") if self.kind == "tfm" else None

    @property
    def tuned_lens(self) -> bool:
        return bool(self.hyperparameters.get("tuned_lens")) if self.kind == "tfm" else False


def is_paper_dir(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def _prefix(names: list[str], where: Path) -> str:
    for prefix in AUTOENCODER_PREFIXES:
        if all(f"{prefix}{n}" in names for n in ("encoder.weight", "decoder.weight",
                                                  "pre_encoder_bias")):
            return prefix
    found = [n for n in names if n.endswith("pre_encoder_bias")]
    if found:  # some other wrapper: the prefix of its pre_encoder_bias
        prefix = found[0][: -len("pre_encoder_bias")]
        if all(f"{prefix}{n}" in names for n in ("encoder.weight", "decoder.weight")):
            return prefix
    raise InteropError(f"{where}: no autoencoder tensors (encoder.weight, decoder.weight, "
                       f"pre_encoder_bias, bare or under 'autoencoder.'); found "
                       f"{sorted(names)[:6]}{' ...' if len(names) > 6 else ''}. {FIX}")


def _transformer_shape(names: list[str], path: Path, prefix: str) -> dict[str, int] | None:
    """d_model and block count of the transformer stored beside the autoencoder (-tfm)."""
    from safetensors import safe_open

    others = [n for n in names if not n.startswith(prefix)] if prefix else []
    blocks = {int(m.group(1)) for n in others if (m := _LAYER_KEY.search(n))}
    embed = [n for n in others if n.endswith(("embed_in.weight", "wte.weight",
                                              "embed_tokens.weight"))]
    if not blocks or not embed:
        return None
    with safe_open(str(path), framework="pt") as f:
        d_model = int(f.get_slice(embed[0]).get_shape()[-1])
    return {"d_model": d_model, "n_layers": max(blocks) + 1}


def _tfm_config(raw: dict[str, Any], n_inputs: int, n_latents: int, where: Path) -> PaperConfig:
    if not isinstance(raw.get("k"), int):
        raise InteropError(f"{where}: no integer 'k' among the checkpoint's hyperparameters "
                           f"({sorted(raw)[:8]}). {FIX}")
    steps = raw.get("dead_steps_threshold")
    if steps is None and raw.get("dead_tokens_threshold"):
        steps = max(1, int(raw["dead_tokens_threshold"]) // REFERENCE_TOKENS_PER_STEP)
    return PaperConfig(n_inputs=n_inputs, n_latents=n_latents, k=raw["k"],
                       auxk=raw.get("auxk", 256), dead_steps_threshold=steps,
                       dead_threshold=float(raw.get("dead_threshold", 1e-3)),
                       standardize=raw.get("standardize", True))


def read_paper_sae(directory: str | Path) -> PaperSAE:
    """Read and check one autoencoder in the paper's format (autoencoder repo or -tfm
    checkpoint). InteropError naming the file and the fix for anything wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InteropError(f"{directory}: not a directory. {FIX}")
    if not is_paper_dir(directory):
        present = sorted(p.name for p in directory.iterdir())[:8]
        raise InteropError(f"{directory}: needs {CONFIG_FILE} and {WEIGHTS_FILE} (found "
                           f"{present or 'nothing'}). {FIX}")
    raw = read_json(directory / CONFIG_FILE, FIX)
    path = directory / WEIGHTS_FILE
    names = tensor_names(path, FIX)
    prefix = _prefix(names, path)
    tensors = read_safetensors(path, FIX, [f"{prefix}{n}" for n in (
        "encoder.weight", "decoder.weight", "pre_encoder_bias")])
    enc = tensors[f"{prefix}encoder.weight"]
    if enc.ndim != 2:
        raise InteropError(f"{path}: {prefix}encoder.weight has shape {list(enc.shape)}, "
                           "expected [n_latents, n_inputs]. " + FIX)
    n_latents, n_inputs = (int(s) for s in enc.shape)
    kind = "autoencoder" if "n_inputs" in raw else "tfm"
    if kind == "autoencoder":
        known = {f.name for f in dataclasses.fields(PaperConfig)}
        try:
            config = PaperConfig(**{key: raw[key] for key in known if key in raw})
        except TypeError as err:
            raise InteropError(f"{directory / CONFIG_FILE}: {err}. {FIX}") from err
        if (config.n_latents, config.n_inputs) != (n_latents, n_inputs):
            raise InteropError(
                f"{path}: encoder.weight is [{n_latents}, {n_inputs}] but {CONFIG_FILE} says "
                f"n_latents = {config.n_latents}, n_inputs = {config.n_inputs}: the two files "
                "belong to different autoencoders. " + FIX)
    else:
        config = _tfm_config(raw, n_inputs, n_latents, directory / CONFIG_FILE)
    fix = f"{FIX} (tensor shapes must agree with n_inputs = {n_inputs}, n_latents = {n_latents})"
    dec = expect_shape(tensors, f"{prefix}decoder.weight", (n_inputs, n_latents), path, fix)
    bias = expect_shape(tensors, f"{prefix}pre_encoder_bias", (n_inputs,), path, fix)
    expect_shape(tensors, f"{prefix}encoder.weight", (n_latents, n_inputs), path, fix)
    for name, t in ((f"{prefix}encoder.weight", enc), (f"{prefix}decoder.weight", dec),
                    (f"{prefix}pre_encoder_bias", bias)):
        if not bool(torch.isfinite(t).all()):
            raise InteropError(f"{path}: {name} holds NaN or infinite values (a damaged or "
                               f"diverged checkpoint). {FIX}")
    weights = Weights(W_enc_MD=enc.contiguous(), W_dec_MD=dec.T.contiguous(),
                      b_D=bias.contiguous(), k=config.k, standardize=config.standardize)
    return PaperSAE(weights=weights, config=config, kind=kind, hyperparameters=raw,
                    transformer=_transformer_shape(names, path, prefix) if kind == "tfm"
                    else None)


def write_paper_sae(weights: Weights, directory: str | Path, *, auxk: int | None = 256,
                    dead_steps_threshold: int = 1000, dead_threshold: float = 1e-3) -> Path:
    """Write `weights` exactly as the paper module's save_pretrained does (config.json +
    model.safetensors, last_nonzero zero), so its MLSAE.from_pretrained loads it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = PaperConfig(n_inputs=weights.d_model, n_latents=weights.n_latents, k=weights.k,
                         auxk=auxk, dead_steps_threshold=dead_steps_threshold,
                         dead_threshold=dead_threshold, standardize=weights.standardize)
    tensors = {"encoder.weight": weights.W_enc_MD.contiguous(),
               "decoder.weight": weights.W_dec_MD.T.contiguous(),
               "pre_encoder_bias": weights.b_D.contiguous(),
               "last_nonzero": torch.zeros(weights.n_latents, dtype=torch.long)}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2,
                                                    sort_keys=True))
    return directory


def dead_tokens(config: PaperConfig) -> int:
    """The reference's dead window in tokens (mlsae counts tokens, SPEC 2)."""
    steps = config.dead_steps_threshold
    return max(1, int(steps) * REFERENCE_TOKENS_PER_STEP) if steps else 10_000_000
