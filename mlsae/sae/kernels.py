"""The sparse hot path of a TopK SAE step: encoder matmul + top-k, and the sparse decode.

Only k latents per example carry a value, so only N*k entries of the encoder and
decoder receive gradient. Both autograd Functions below exploit that:

- `encode_topk`: forward = one matmul per row chunk + top-k (the compiled kernel of
  `ckernels` on CPU float32, torch.topk otherwise), optionally also the top-k_aux among
  dead latents for AuxK. The [N, M] pre-activations never reach autograd; backward
  builds grad W_enc from the N*(k + k_aux) selected entries only.
- `sparse_decode`: forward = `embedding_bag` (sum of the k chosen decoder rows, weighted
  by the activations); backward = a gather-dot for the activations and a transposed
  sparse product for the decoder.

The transposed sparse product out[m] = sum_{(n,j): idx[n,j] = m} w[n,j] * table[n]
is one `embedding_bag` over the entries sorted by latent (`sparse_t_matmul`): a
gather-sum instead of a scatter, fast and deterministic on CPU and GPU.
`sparse_t_matmul_reference` (index_add_) is the tested fallback/reference.

Naming: W_MD stores one row per latent (row j of W_dec_MD = decoder column j).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from mlsae.sae import ckernels

MAX_PRE_ELEMENTS = 1 << 26
"""Rows are encoded in chunks so the dense pre-activations stay under this many elements
(256 MiB in float32): memory stays bounded at any batch size, and backward never needs them."""


# --------------------------------------------------------------------------- top-k selection

def topk_select(pre_NM: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of each row's k largest entries, in no particular order.

    Fast path: the compiled CPU kernel (float32); fallback: torch.topk(sorted=False).
    """
    if ckernels.supports(pre_NM, k):
        return ckernels.topk(pre_NM, k)
    return pre_NM.topk(k, dim=1, sorted=False)


# --------------------------------------------------------------------------- transposed product

class SortPlan:
    """The N*K entries of idx_NK grouped by latent: computed once, shared by every
    transposed product over the same indices (encoder and decoder backward)."""

    def __init__(self, idx_NK: Tensor, n_rows: int):
        n, k = idx_NK.shape
        if idx_NK.device.type == "cpu" and ckernels.available():
            # O(N*K + M) counting sort: no parallel comparison sort to stall on a shared CPU
            self.order, self.src_rows, self.offsets = ckernels.counting_sort(idx_NK, n_rows)
        else:
            flat = idx_NK.reshape(-1)
            # int32 keys sort about twice as fast; stable keeps the order deterministic
            self.order = flat.to(torch.int32).sort(stable=True).indices
            self.src_rows = torch.div(self.order, k, rounding_mode="floor")
            counts = torch.bincount(flat, minlength=n_rows)
            self.offsets = torch.zeros(n_rows, dtype=torch.long, device=flat.device)
            torch.cumsum(counts[:-1], 0, out=self.offsets[1:])
        self.shape = (n, k)

    def t_matmul(self, w_NK: Tensor, table_ND: Tensor) -> Tensor:
        """out[m] = sum over entries (n, j) of latent m of w[n, j] * table[n]."""
        w = w_NK.reshape(-1).index_select(0, self.order).to(table_ND.dtype)
        return F.embedding_bag(self.src_rows, table_ND, self.offsets, mode="sum",
                               per_sample_weights=w)


def sparse_t_matmul(idx_NK: Tensor, w_NK: Tensor, table_ND: Tensor, n_rows: int,
                    plan: SortPlan | None = None) -> Tensor:
    """out[m] = sum over (n, j) with idx[n, j] == m of w[n, j] * table[n]; shape [n_rows, D].

    (A^T @ table for the sparse [N, n_rows] matrix A with A[n, idx[n, j]] = w[n, j].)
    Sorting the N*K entries by output row turns the scatter into one embedding_bag
    gather-sum with one bag per output row. Pass `plan` to reuse a sort of idx_NK.
    """
    if idx_NK.numel() == 0:
        return table_ND.new_zeros(n_rows, table_ND.shape[1])
    return (plan or SortPlan(idx_NK, n_rows)).t_matmul(w_NK, table_ND)


def sparse_t_matmul_reference(idx_NK: Tensor, w_NK: Tensor, table_ND: Tensor,
                              n_rows: int) -> Tensor:
    """The same product with index_add_ (materializes [N*K, D]): the reference and fallback."""
    n, k = idx_NK.shape
    contrib = (w_NK.to(table_ND.dtype)[:, :, None] * table_ND[:, None, :]).reshape(n * k, -1)
    out = table_ND.new_zeros(n_rows, table_ND.shape[1])
    return out.index_add_(0, idx_NK.reshape(-1), contrib)


def gather_dot(idx_NK: Tensor, W_MD: Tensor, g_ND: Tensor) -> Tensor:
    """out[n, j] = <W[idx[n, j]], g[n]>, without materializing the [N, K, D] gather.

    Uses embedding_bag's own per-sample-weights backward kernel (a fused gather-dot);
    falls back to chunked batched dot products where that private op is missing.
    """
    n, k = idx_NK.shape
    flat = idx_NK.reshape(-1)
    try:
        offsets = torch.arange(0, n * k, k, device=flat.device)
        offset2bag = torch.arange(n, device=flat.device).repeat_interleave(k)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g_ND.contiguous(), W_MD, flat, offsets, offset2bag, 0, -1)
        return out.view(n, k)
    except (AttributeError, RuntimeError):  # op absent or changed in this torch build
        return gather_dot_reference(idx_NK, W_MD, g_ND)


def gather_dot_reference(idx_NK: Tensor, W_MD: Tensor, g_ND: Tensor, chunk: int = 1024) -> Tensor:
    out = g_ND.new_empty(idx_NK.shape)
    for i in range(0, idx_NK.shape[0], chunk):
        out[i:i + chunk] = torch.einsum("nkd,nd->nk", W_MD[idx_NK[i:i + chunk]], g_ND[i:i + chunk])
    return out


# --------------------------------------------------------------------------- encoder

def _chunk_rows(n_latents: int) -> int:
    return max(64, MAX_PRE_ELEMENTS // max(1, n_latents))


_workspace: dict[tuple, Tensor] = {}


def pre_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable [rows, cols] scratch buffer for the pre-activations.

    On CPU a fresh 100+ MiB tensor is mmapped and page-faulted on every step, which costs
    a third as much as the matmul that fills it; the buffer is kept and reused instead.
    CUDA's caching allocator already reuses memory, so there it is a plain allocation.
    """
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    key = (dtype, device)
    buf = _workspace.get(key)
    if buf is None or buf.numel() < rows * cols:
        _workspace.pop(key, None)
        buf = torch.empty(rows * cols, dtype=dtype, device=device)
        _workspace[key] = buf
    return buf[: rows * cols].view(rows, cols)


def release_workspace() -> None:
    """Free the cached pre-activation buffers."""
    _workspace.clear()


class _EncodeTopK(Function):
    """vals = top-k of (z - b) W^T per row, and top-k_aux among the dead columns."""

    @staticmethod
    def forward(ctx, z_ND: Tensor, b_D: Tensor, W_MD: Tensor, k: int, k_aux: int,
                dead_idx: Tensor | None, compute_dtype: torch.dtype | None,
                plan_out: list | None, scale_N1: Tensor | None):
        if scale_N1 is None:
            xin_ND = z_ND - b_D
        else:  # one pass for (xm * scale) - b
            xin_ND = torch.addcmul(-b_D.detach(), z_ND, scale_N1)
        ctx.scale_N1 = scale_N1
        n, m = xin_ND.shape[0], W_MD.shape[0]
        use_aux = dead_idx is not None and dead_idx.numel() > 0 and k_aux > 0
        k_a = min(k_aux, dead_idx.numel()) if use_aux else 0
        vals_NK = xin_ND.new_empty(n, k)
        idx_NK = torch.empty(n, k, dtype=torch.long, device=xin_ND.device)
        aux_vals_NA = xin_ND.new_empty(n, k_a)
        aux_idx_NA = torch.empty(n, k_a, dtype=torch.long, device=xin_ND.device)
        lhs, rhs = xin_ND, W_MD
        if compute_dtype is not None and compute_dtype != xin_ND.dtype:
            lhs, rhs = xin_ND.to(compute_dtype), W_MD.to(compute_dtype)
        chunk = _chunk_rows(m)
        for i in range(0, n, chunk):
            rows = slice(i, min(n, i + chunk))
            x_c = lhs[rows]
            pre = torch.mm(x_c, rhs.t(), out=pre_buffer(x_c.shape[0], m, x_c.dtype, x_c.device))
            if pre.dtype in (torch.float16, torch.bfloat16):
                pre = pre.float()  # select in float32: half-precision ties are common
            v, j = topk_select(pre, k)
            if i == 0 and rows.stop == n:  # one chunk: no copies
                vals_NK, idx_NK = v.to(xin_ND.dtype), j
            else:
                vals_NK[rows], idx_NK[rows] = v, j
            if use_aux:
                pre_dead = pre.index_select(1, dead_idx)
                va, ja = topk_select(pre_dead, k_a)
                aux_vals_NA[rows], aux_idx_NA[rows] = va, dead_idx[ja]
        ctx.save_for_backward(xin_ND, W_MD, idx_NK, aux_idx_NA)
        ctx.mark_non_differentiable(idx_NK, aux_idx_NA)
        ctx.plan = None
        if plan_out is not None:  # training: one sort of idx shared with the decoder backward
            ctx.plan = SortPlan(idx_NK, m)
            plan_out.append(ctx.plan)
        return vals_NK, idx_NK, aux_vals_NA, aux_idx_NA

    @staticmethod
    @once_differentiable
    def backward(ctx, g_vals_NK, _g_idx, g_aux_NA, _g_aux_idx):
        xin_ND, W_MD, idx_NK, aux_idx_NA = ctx.saved_tensors
        if g_vals_NK is None:
            g_vals_NK = torch.zeros_like(idx_NK, dtype=xin_ND.dtype)
        has_aux = aux_idx_NA.shape[1] > 0 and g_aux_NA is not None
        if has_aux:
            idx_all, g_all = torch.cat([idx_NK, aux_idx_NA], 1), torch.cat([g_vals_NK, g_aux_NA], 1)
        else:
            idx_all, g_all = idx_NK, g_vals_NK
        g_all = g_all.to(xin_ND.dtype)
        grad_z = grad_b = grad_W = None
        if ctx.needs_input_grad[2]:
            m = W_MD.shape[0]
            grad_W = sparse_t_matmul(idx_NK, g_vals_NK, xin_ND, m, ctx.plan)
            if has_aux:
                grad_W += sparse_t_matmul(aux_idx_NA, g_aux_NA, xin_ND, m)
        if ctx.needs_input_grad[0]:
            grad_z = F.embedding_bag(idx_all, W_MD, mode="sum", per_sample_weights=g_all)
            if ctx.scale_N1 is not None:
                grad_z = grad_z * ctx.scale_N1
        if ctx.needs_input_grad[1]:
            # d pre[n, m] / d b = -W[m]: sum the entry gradients per latent, then one matvec
            per_latent_M = g_all.new_zeros(W_MD.shape[0]).index_add_(0, idx_all.reshape(-1),
                                                                     g_all.reshape(-1))
            grad_b = -(per_latent_M @ W_MD)
        return grad_z, grad_b, grad_W, None, None, None, None, None, None


def encode_topk(z_ND: Tensor, b_D: Tensor, W_enc_MD: Tensor, k: int, *, k_aux: int = 0,
                dead_idx: Tensor | None = None, compute_dtype: torch.dtype | None = None,
                plan_out: list | None = None,
                scale_N1: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k pre-activations of pre = (z - b) W_enc^T, before ReLU.

    Returns (vals_NK, idx_NK, aux_vals_NA, aux_idx_NA); the aux pair is the top-k_aux
    among the latents in `dead_idx` (empty [N, 0] when none are dead or k_aux = 0).
    Gradients reach z, b and W_enc through the selected entries only.
    `compute_dtype` (e.g. torch.bfloat16 on GPU) runs the matmul in that dtype.
    `plan_out`: a list that receives the SortPlan of idx_NK (when W_enc needs grad), for
    sharing with sparse_decode over the same indices.
    `scale_N1`: encode z * scale_N1 instead of z (saves a pass when z = xm / (sigma + eps)).
    """
    return _EncodeTopK.apply(z_ND, b_D, W_enc_MD, k, k_aux, dead_idx, compute_dtype, plan_out,
                             scale_N1)


def encode_topk_reference(z_ND: Tensor, b_D: Tensor, W_enc_MD: Tensor,
                          k: int) -> tuple[Tensor, Tensor]:
    """Dense autograd reference: full pre-activations, torch.topk, gather."""
    pre_NM = (z_ND - b_D) @ W_enc_MD.t()
    idx_NK = pre_NM.detach().topk(k, dim=1).indices
    return pre_NM.gather(1, idx_NK), idx_NK


# --------------------------------------------------------------------------- decoder

class _SparseDecode(Function):
    @staticmethod
    def forward(ctx, idx_NK: Tensor, acts_NK: Tensor, W_MD: Tensor, plan: SortPlan | None):
        ctx.save_for_backward(idx_NK, acts_NK, W_MD)
        ctx.plan = plan
        # detached inputs select embedding_bag's forward-only kernel (no backward buffers)
        return F.embedding_bag(idx_NK, W_MD.detach(), mode="sum",
                               per_sample_weights=acts_NK.detach().to(W_MD.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ND):
        idx_NK, acts_NK, W_MD = ctx.saved_tensors
        g_ND = g_ND.contiguous()
        grad_acts = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_acts = gather_dot(idx_NK, W_MD, g_ND).to(acts_NK.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = sparse_t_matmul(idx_NK, acts_NK, g_ND, W_MD.shape[0], ctx.plan)
        return None, grad_acts, grad_W, None


def sparse_decode(idx_NK: Tensor, acts_NK: Tensor, W_dec_MD: Tensor,
                  plan: SortPlan | None = None) -> Tensor:
    """sum_j acts[n, j] * W_dec[idx[n, j]]: only the k chosen decoder rows are read.

    `plan`: a SortPlan of idx_NK to reuse in backward (from encode_topk's plan_out).
    """
    if idx_NK.shape[1] == 0:
        return acts_NK.new_zeros(idx_NK.shape[0], W_dec_MD.shape[1])
    return _SparseDecode.apply(idx_NK, acts_NK, W_dec_MD, plan)


def sparse_decode_reference(idx_NK: Tensor, acts_NK: Tensor, W_dec_MD: Tensor) -> Tensor:
    """Dense reference: scatter into [N, M] and multiply."""
    dense_NM = acts_NK.new_zeros(idx_NK.shape[0], W_dec_MD.shape[0]).scatter(1, idx_NK, acts_NK)
    return dense_NM @ W_dec_MD
