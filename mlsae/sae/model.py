"""The TopK multi-layer sparse autoencoder (SPEC 2).

    mu, sigma = mean_i x_i, std_i x (unbiased)      per vector
    z     = (x - mu) / (sigma + 1e-5)               (standardize=True)
    a     = ReLU(TopK_k(W_enc (z - b)))             no latent bias
    z_hat = W_dec a + b                             sparse: only the k chosen columns are read
    x_hat = z_hat * sigma + mu

One code path serves the multi-layer SAE and the single-layer baseline: every
input row is one (token, layer) example and nothing tells the SAE its layer.
Parameters: W_enc_MD [n, d]; W_dec_MD [n, d], whose row j is decoder column j
(unit norm); b_D [d], the pre-encoder bias.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mlsae.sae.config import SAEConfig
from mlsae.sae.kernels import encode_topk, sparse_decode

STD_EPS = 1e-5
FORMAT = "mlsae-sae"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class Standardized(NamedTuple):
    z_ND: Tensor
    mu_N1: Tensor
    sigma_N1: Tensor


class EncoderOutput(NamedTuple):
    top_acts_NK: Tensor
    """Post-ReLU activations of the k selected latents (some may be 0)."""
    top_idx_NK: Tensor
    """Their latent indices (int64), in no particular order."""
    z_ND: Tensor
    """The standardized input (the input itself when standardize=False)."""
    mu_N1: Tensor
    sigma_N1: Tensor
    aux_acts_NA: Tensor
    """Post-ReLU top-k_aux activations among the dead latents ([N, 0] when none given)."""
    aux_idx_NA: Tensor


class ForwardOutput(NamedTuple):
    x_hat_ND: Tensor
    """Reconstruction in the input space."""
    top_acts_NK: Tensor
    top_idx_NK: Tensor
    z_ND: Tensor
    z_hat_ND: Tensor
    """Reconstruction in the standardized space (W_dec a + b)."""
    aux_acts_NA: Tensor
    aux_idx_NA: Tensor


def standardize(x_ND: Tensor, enabled: bool = True) -> Standardized:
    """Per-vector z = (x - mean) / (unbiased std + 1e-5); identity when not enabled."""
    if not enabled:
        ones = x_ND.new_ones(x_ND.shape[0], 1)
        return Standardized(x_ND, ones * 0, ones)
    sigma_N1, mu_N1 = torch.std_mean(x_ND, dim=1, keepdim=True)  # correction=1: unbiased
    return Standardized((x_ND - mu_N1) / (sigma_N1 + STD_EPS), mu_N1, sigma_N1)


def geometric_median(points_ND: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm in float64, started at the mean; stops when a step moves < tol."""
    pts = points_ND.detach().double()
    y = pts.mean(0)
    for _ in range(iters):
        w = 1.0 / (pts - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w[:, None] * pts).sum(0) / w.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * (1 + y.norm()):
            break
    return y.to(points_ND.dtype)


class MLSAE(nn.Module):
    """TopK SAE shared across layers. `cfg` is the SAEConfig (a record of what it was trained on)."""

    def __init__(self, cfg: SAEConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_model
        gen = torch.Generator().manual_seed(seed)
        # nn.Linear's default init (kaiming_uniform, a=sqrt(5)) is U(-1/sqrt(d), 1/sqrt(d))
        bound = 1.0 / math.sqrt(d)
        W_enc = (torch.rand(n, d, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        self.W_enc_MD = nn.Parameter(W_enc.to(dtype))
        self.W_dec_MD = nn.Parameter((W_enc / W_enc.norm(dim=1, keepdim=True)).to(dtype))
        self.b_D = nn.Parameter(torch.zeros(d, dtype=dtype))
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ forward pieces

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    def standardize(self, x_ND: Tensor) -> Standardized:
        return standardize(x_ND, self.cfg.standardize)

    def encode(self, x_ND: Tensor, *, dead_idx: Tensor | None = None,
               compute_dtype: torch.dtype | None = None) -> EncoderOutput:
        """Standardize, then TopK + ReLU. With `dead_idx`, also the AuxK selection."""
        x_ND = x_ND.to(self.W_enc_MD.dtype)
        z_ND, mu_N1, sigma_N1 = self.standardize(x_ND)
        k_aux = self.cfg.k_aux if self.cfg.aux_coef > 0 else 0
        vals_NK, idx_NK, aux_vals_NA, aux_idx_NA = encode_topk(
            z_ND, self.b_D, self.W_enc_MD, self.cfg.k, k_aux=k_aux, dead_idx=dead_idx,
            compute_dtype=compute_dtype)
        return EncoderOutput(vals_NK.relu(), idx_NK, z_ND, mu_N1, sigma_N1,
                             aux_vals_NA.relu(), aux_idx_NA)

    def decode_standardized(self, top_acts_NK: Tensor, top_idx_NK: Tensor) -> Tensor:
        """z_hat = W_dec a + b, reading only the k chosen decoder columns."""
        return sparse_decode(top_idx_NK, top_acts_NK, self.W_dec_MD) + self.b_D

    def decode(self, top_acts_NK: Tensor, top_idx_NK: Tensor, mu_N1: Tensor,
               sigma_N1: Tensor) -> Tensor:
        """x_hat = z_hat * sigma + mu."""
        return self.decode_standardized(top_acts_NK, top_idx_NK) * sigma_N1 + mu_N1

    def forward(self, x_ND: Tensor, layer_N: Tensor | None = None, *,
                dead_idx: Tensor | None = None,
                compute_dtype: torch.dtype | None = None) -> ForwardOutput:
        """Encode and decode. `layer_N` is accepted for the shared interface and ignored:
        nothing tells an MLSAE which layer a vector came from (SPEC 1)."""
        enc = self.encode(x_ND, dead_idx=dead_idx, compute_dtype=compute_dtype)
        z_hat_ND = self.decode_standardized(enc.top_acts_NK, enc.top_idx_NK)
        x_hat_ND = z_hat_ND * enc.sigma_N1 + enc.mu_N1
        return ForwardOutput(x_hat_ND, enc.top_acts_NK, enc.top_idx_NK, enc.z_ND, z_hat_ND,
                             enc.aux_acts_NA, enc.aux_idx_NA)

    def reconstruct(self, x_ND: Tensor) -> Tensor:
        """x_hat for a batch of vectors (no AuxK, no autograd needed)."""
        return self.forward(x_ND).x_hat_ND

    # ------------------------------------------------------------------ training helpers

    @torch.no_grad()
    def init_bias(self, x_ND: Tensor, iters: int = 100) -> None:
        """b = geometric median of the STANDARDIZED vectors (SPEC 2; the reference used raw)."""
        z_ND = self.standardize(x_ND.to(self.b_D.dtype)).z_ND
        self.b_D.copy_(geometric_median(z_ND, iters))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component parallel to each decoder column (before the step)."""
        g, W = self.W_dec_MD.grad, self.W_dec_MD
        if g is None:
            return
        dots_M = torch.linalg.vecdot(g, W, dim=1)
        g.addcmul_(dots_M[:, None], W, value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder column back to unit norm (after the step)."""
        W = self.W_dec_MD
        W.div_(torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-12))

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write DIR/model.safetensors + DIR/config.json; replaces DIR atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        record = {"format": FORMAT, "version": VERSION, "config": self.cfg.to_dict(),
                  "dtype": str(self.W_enc_MD.dtype).removeprefix("torch."),
                  "tensors": {"W_enc_MD": "[n_latents, d_model] encoder rows",
                              "W_dec_MD": "[n_latents, d_model]; row j = decoder column j, "
                                          "unit norm",
                              "b_D": "[d_model] pre-encoder bias (standardized space)"}}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike,
                        device: str | torch.device | None = None) -> MLSAE:
        """Load an SAE written by save_pretrained (no training state needed)."""
        path = Path(path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{path} is not a saved MLSAE (needs {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE}): pass the directory given to "
                                    "save_pretrained or train_sae's out_dir/sae")
        record = json.loads((path / CONFIG_FILE).read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG_FILE} is not an mlsae SAE config (format "
                             f"{record.get('format')!r})")
        cfg = SAEConfig.from_dict(record["config"])
        tensors = load_file(str(path / WEIGHTS_FILE))
        sae = cls(cfg, dtype=tensors["W_enc_MD"].dtype)
        sae.load_state_dict(tensors)
        if device is not None:
            sae.to(device)
        return sae.eval()
