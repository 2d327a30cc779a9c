"""SAELens' on-disk format for a TopK SAE (sae_lens >= 6: `SAE.load_from_disk(DIR)`).

    DIR/cfg.json                  {"architecture": "topk", "d_in", "d_sae", "k", "dtype",
                                   "device", "apply_b_dec_to_input": true,
                                   "normalize_activations": "layer_norm" | "none",
                                   "rescale_acts_by_decoder_norm": false, "metadata": {...}}
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
                                  b_dec [d_in]

SAELens' TopK forward: sae_in = norm_in(x) - b_dec; pre = sae_in @ W_enc + b_enc;
acts = ReLU(TopK_k(pre)) (top k first, then ReLU: mlsae's order); out = norm_out(acts @ W_dec
+ b_dec). Its normalize_activations="layer_norm" is, line for line, mlsae's per-vector
standardisation: mu = mean(x), std = unbiased std of x - mu, norm_in = (x - mu) / (std + 1e-5),
norm_out = y * std + mu (no 1e-5). So the map is exact: W_enc = W_enc_MD^T, b_enc = 0,
W_dec = W_dec_MD, b_dec = b_D, normalize_activations = "layer_norm" when standardize.
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
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: configs older than 6.0 are converted by SAELens'
loader, newer ones read as they are."""
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
FIX = ("Pass a directory written by SAELens' SAE.save_model (cfg.json + "
       "sae_weights.safetensors) of a TopK SAE on the residual stream (hook_resid_post)")


def hook_name(layer: int) -> str:
    """TransformerLens' name for the output of block `layer` (mlsae's layer, SPEC 1)."""
    return f"blocks.{int(layer)}.hook_resid_post"


def saelens_config(weights: Weights, *, layer: int, model_name: str,
                   context_size: int | None = None, dtype: str = "float32",
                   record: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json of the TopK SAE (SAELens 6 layout: architecture fields + metadata)."""
    return {
        "architecture": "topk", "d_in": weights.d_model, "d_sae": weights.n_latents,
        "k": weights.k, "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if weights.standardize else "none",
        "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
        "use_sparse_activations": False,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": model_name, "hook_name": hook_name(layer), "hook_head_index": None,
            # mlsae cuts text into sequences without a BOS token (docs/interop.md)
            "prepend_bos": False, "context_size": context_size, "dataset_path": None,
            "neuronpedia_id": None,
            # block outputs as the model computes them (TransformerLens would otherwise
            # centre the residual stream; with layer_norm the SAE is invariant to it anyway)
            "model_from_pretrained_kwargs": {"center_writing_weights": False},
            "mlsae": record or {},
        },
    }


def write_saelens(weights: Weights, directory: str | Path, *, layer: int, model_name: str,
                  context_size: int | None = None, record: dict[str, Any] | None = None
                  ) -> list[Path]:
    """Write DIR/cfg.json + DIR/sae_weights.safetensors; returns the two paths."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = str(weights.W_enc_MD.dtype).removeprefix("torch.")
    tensors = {"W_enc": weights.W_enc_MD.T.contiguous(),
               "b_enc": torch.zeros(weights.n_latents, dtype=weights.W_enc_MD.dtype),
               "W_dec": weights.W_dec_MD.contiguous(), "b_dec": weights.b_D.contiguous()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    cfg = saelens_config(weights, layer=layer, model_name=model_name, context_size=context_size,
                         dtype=dtype, record=record)
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return [directory / CFG_FILE, directory / WEIGHTS_FILE]


def read_saelens(directory: str | Path) -> tuple[Weights, int | None, dict[str, Any]]:
    """(weights, block layer from hook_name or None, cfg) of a SAELens TopK SAE that mlsae's
    autoencoder represents exactly; InteropError naming what does not fit."""
    directory = Path(directory)
    cfg = read_json(directory / CFG_FILE, FIX)
    where = directory / CFG_FILE
    if cfg.get("architecture") != "topk":
        raise InteropError(f"{where}: architecture {cfg.get('architecture')!r}; only TopK SAEs "
                           "map onto mlsae's autoencoder. " + FIX)
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "layer_norm"):
        raise InteropError(f"{where}: normalize_activations {norm!r} has no mlsae equivalent "
                           "(mlsae has per-vector standardisation = 'layer_norm', or none)")
    for key, ok in (("rescale_acts_by_decoder_norm", False), ("reshape_activations", "none")):
        if cfg.get(key, ok) != ok:
            raise InteropError(f"{where}: {key} = {cfg.get(key)!r} has no mlsae equivalent "
                               f"(needs {ok!r})")
    try:
        d, n, k = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
    except (KeyError, TypeError, ValueError) as err:
        raise InteropError(f"{where}: needs integer d_in, d_sae and k ({err}). {FIX}") from err
    path = directory / WEIGHTS_FILE
    tensors = read_safetensors(path, FIX)
    W_enc = expect_shape(tensors, "W_enc", (d, n), path, FIX)
    W_dec = expect_shape(tensors, "W_dec", (n, d), path, FIX)
    b_dec = expect_shape(tensors, "b_dec", (d,), path, FIX)
    b_enc = expect_shape(tensors, "b_enc", (n,), path, FIX) if "b_enc" in tensors else None
    if b_enc is not None and bool(b_enc.any()):
        raise InteropError(f"{path}: b_enc is not zero; mlsae's TopK autoencoder has no latent "
                           "bias, so this SAE cannot be imported exactly")
    if not cfg.get("apply_b_dec_to_input", True) and bool(b_dec.any()):
        raise InteropError(f"{where}: apply_b_dec_to_input is false with a non-zero b_dec; "
                           "mlsae subtracts its bias before encoding, so this SAE cannot be "
                           "imported exactly")
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or ""
    match = _HOOK.match(hook)
    weights = Weights(W_enc.T.contiguous(), W_dec.contiguous(), b_dec.contiguous(), k,
                      norm == "layer_norm")
    return weights, int(match.group(1)) if match else None, cfg
