"""EleutherAI sparsify's on-disk format (`SparseCoder.load_from_disk(DIR/<hookpoint>)`).

    DIR/layers.<l>/cfg.json          {"activation": "topk", "k", "num_latents",
                                      "expansion_factor", "normalize_decoder", "multi_topk",
                                      "skip_connection", "transcode", "d_in"}
    DIR/layers.<l>/sae.safetensors   encoder.weight [n, d], encoder.bias [n],
                                     W_dec [n, d], b_dec [d]

The hookpoint `layers.<l>` is the module whose output is block l's output (sparsify's
default hookpoints on a Hugging Face model), i.e. mlsae's layer l (SPEC 1).

sparsify's TopK forward: pre = ReLU(encoder(x - b_dec)); TopK_k(pre); out = acts @ W_dec +
b_dec. ReLU comes BEFORE the top k there and after it in mlsae: when fewer than k
pre-activations are positive the two pick different zero-valued latents, but every
non-zero (latent, value) pair and the reconstruction are the same.

Standardisation: sparsify has no input normalisation, and mlsae's per-vector
standardisation cannot be folded into its weights: the selection ranks W_enc (x - mu) /
(std + 1e-5) - W_enc b, whose bias term is divided by a per-vector scale, and the output
(W_dec a + b) * std + mu multiplies the bias by that scale; no fixed affine map (even with
sparsify's linear skip connection) does either. An SAE trained with standardisation is
therefore exported as the SAE of the standardised vectors z = (x - mean) / (std + 1e-5)
(only with `standardized_inputs=True`): standardise before encode, de-standardise after
decode (docs/interop.md gives the two lines). cfg.json says so in `mlsae_standardize`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mlsae.interop.errors import InteropError
from mlsae.interop.tensors import expect_shape, read_json, read_safetensors
from mlsae.interop.weights import Weights

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
STANDARDIZE_KEY = "mlsae_standardize"
"""Extra cfg.json key (sparsify drops unknown keys on loading): the inputs are standardised."""
_HOOKPOINT_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")
FIX = ("Pass a directory written by sparsify's SparseCoder.save_to_disk (cfg.json + "
       "sae.safetensors) of a TopK sparse autoencoder on a block output (layers.<l>)")
STANDARDIZED_FIX = (
    "sparsify has no input normalisation and mlsae's per-vector standardisation cannot be "
    "folded into its weights (docs/interop.md, 'sparsify'): pass --standardized-inputs to "
    "export the SAE of the standardised vectors z = (x - mean) / (std + 1e-5), which you "
    "standardise and de-standardise around, or export to SAELens, which has the same "
    "standardisation built in (normalize_activations='layer_norm')")


def hookpoint(layer: int) -> str:
    """sparsify's hookpoint of block `layer`'s output on a Hugging Face model."""
    return f"layers.{int(layer)}"


def sparsify_config(weights: Weights, record: dict[str, Any] | None = None) -> dict[str, Any]:
    n, d = weights.n_latents, weights.d_model
    return {"activation": "topk", "expansion_factor": max(1, n // d),
            "normalize_decoder": True, "num_latents": n, "k": weights.k, "multi_topk": False,
            "skip_connection": False, "transcode": False, "d_in": d,
            STANDARDIZE_KEY: weights.standardize, "mlsae": record or {}}


def write_sparsify(weights: Weights, directory: str | Path, *, layer: int,
                   standardized_inputs: bool = False, record: dict[str, Any] | None = None
                   ) -> list[Path]:
    """Write DIR/layers.<layer>/{cfg.json, sae.safetensors}; returns the two paths. An SAE
    with standardisation needs standardized_inputs=True (see the module docstring)."""
    from safetensors.torch import save_file

    if weights.standardize and not standardized_inputs:
        raise InteropError("this autoencoder standardises its inputs per vector; "
                           + STANDARDIZED_FIX)
    target = Path(directory) / hookpoint(layer)
    target.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": weights.W_enc_MD.contiguous(),
               "encoder.bias": torch.zeros(weights.n_latents, dtype=weights.W_enc_MD.dtype),
               "W_dec": weights.W_dec_MD.contiguous(), "b_dec": weights.b_D.contiguous()}
    save_file(tensors, str(target / WEIGHTS_FILE), metadata={"format": "pt"})
    (target / CFG_FILE).write_text(json.dumps(sparsify_config(weights, record), indent=2) + "\n")
    return [target / CFG_FILE, target / WEIGHTS_FILE]


def read_sparsify(directory: str | Path) -> tuple[Weights, int | None, dict[str, Any]]:
    """(weights, block layer from the hookpoint directory name or None, cfg) of a sparsify
    TopK SAE that mlsae's autoencoder represents exactly; InteropError otherwise."""
    directory = Path(directory)
    cfg = read_json(directory / CFG_FILE, FIX)
    where = directory / CFG_FILE
    for key, ok in (("activation", "topk"), ("transcode", False), ("skip_connection", False)):
        if cfg.get(key, ok) != ok:
            raise InteropError(f"{where}: {key} = {cfg.get(key)!r}; only a TopK sparse "
                               f"autoencoder ({key} = {ok!r}) maps onto mlsae's")
    try:
        d, k = int(cfg["d_in"]), int(cfg["k"])
    except (KeyError, TypeError, ValueError) as err:
        raise InteropError(f"{where}: needs integer d_in and k ({err}). {FIX}") from err
    path = directory / WEIGHTS_FILE
    tensors = read_safetensors(path, FIX)
    enc = tensors.get("encoder.weight")
    if enc is None or enc.ndim != 2:
        raise InteropError(f"{path}: no 2-D encoder.weight. {FIX}")
    n = int(enc.shape[0])
    expect_shape(tensors, "encoder.weight", (n, d), path, FIX)
    W_dec = expect_shape(tensors, "W_dec", (n, d), path, FIX)
    b_dec = expect_shape(tensors, "b_dec", (d,), path, FIX)
    bias = tensors.get("encoder.bias")
    if bias is not None and bool(bias.any()):
        raise InteropError(f"{path}: encoder.bias is not zero; mlsae's TopK autoencoder has no "
                           "latent bias, so this SAE cannot be imported exactly")
    match = _HOOKPOINT_LAYER.search(directory.name)
    weights = Weights(enc.contiguous(), W_dec.contiguous(), b_dec.contiguous(), k,
                      bool(cfg.get(STANDARDIZE_KEY, False)))
    return weights, int(match.group(1)) if match else None, cfg
