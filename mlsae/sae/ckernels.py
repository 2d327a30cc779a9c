"""Small C kernels for the CPU hot path, compiled on first use and loaded with ctypes.

Two kernels: a row-wise top-k, and a counting sort of latent indices (for the
transposed sparse products in backward; torch.sort is a parallel comparison sort
that stalls badly when the CPU is shared). Both release the GIL.

Top-k.
torch.topk on CPU copies every row into (value, index) pairs and heap-sorts them,
which costs about a third of the encoder matmul at SAE shapes. This kernel reads
each row twice while it sits in L2: pass 1 takes the minimum over k disjoint
blocks of each block's maximum, a lower bound on the row's k-th largest value
(those k maxima are k distinct entries); pass 2 keeps only the entries at or
above it (about 4k of them for typical pre-activations, AVX-512 compress when
available); a branch-free radix select on the candidates' order-preserving
integer keys picks the k largest. The result equals torch.topk's up to order
(sorted=False) and the choice among ties.

The shared library is built with the system C compiler into a per-user cache
(`$MLSAE_KERNEL_DIR`, else `$XDG_CACHE_HOME/mlsae/kernels`, else ~/.cache/...)
and reused. No compiler, a failed build, `MLSAE_C_KERNELS=0`, a non-CPU tensor
or a dtype other than float32: `available()` is False and callers fall back to
torch.topk / torch.sort (mlsae.sae.kernels does).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static float block_max(const float* x, int64_t n) {
    float m = -INFINITY;
    int64_t j = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= n; j += 16) acc = _mm512_max_ps(acc, _mm512_loadu_ps(x + j));
    m = _mm512_reduce_max_ps(acc);
#endif
    for (; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* Entries >= thr into (bv, bi); bv/bi hold M + 16 slots (full-vector stores). Dense hits
   (branchless) suit short rows; sparse hits (branch per vector) suit long rows. */
static int64_t collect(const float* x, int64_t M, float thr, int branchless, float* bv,
                       int32_t* bi) {
    int64_t c = 0, j = 0;
#ifdef __AVX512F__
    const __m512 t = _mm512_set1_ps(thr);
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; j + 16 <= M; j += 16) {
        __m512 v = _mm512_loadu_ps(x + j);
        __mmask16 mk = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
        if (branchless || mk) {
            /* compress in registers, then a plain store: memory-destination compress is slow on Zen 4 */
            _mm512_storeu_ps(bv + c, _mm512_maskz_compress_ps(mk, v));
            _mm512_storeu_si512((void*)(bi + c), _mm512_maskz_compress_epi32(mk, iv));
            c += __builtin_popcount((unsigned)mk);
        }
        iv = _mm512_add_epi32(iv, step);
    }
#endif
    for (; j < M; j++) if (x[j] >= thr) { bv[c] = x[j]; bi[c] = (int32_t)j; c++; }
    return c;
}

/* Order-preserving unsigned key of a float (NaN is mapped to -inf by the caller). */
static inline uint32_t fkey(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static int64_t count_ge(const uint32_t* key, int64_t n, uint32_t t) {
    int64_t cnt = 0, j = 0;
#ifdef __AVX512F__
    const __m512i tv = _mm512_set1_epi32((int)t);
    for (; j + 16 <= n; j += 16)
        cnt += __builtin_popcount((unsigned)_mm512_cmpge_epu32_mask(
            _mm512_loadu_si512((const void*)(key + j)), tv));
#endif
    for (; j < n; j++) cnt += key[j] >= t;
    return cnt;
}

/* The k largest of (v, ix)[0..n): build the k-th largest key bit by bit (32 vectorized
   counting passes, no data-dependent branches), then copy those above it and ties. */
static void radix_select(const float* v, const int32_t* ix, uint32_t* key, int64_t n, int64_t k,
                         float* out_v, int64_t* out_i) {
    for (int64_t j = 0; j < n; j++) key[j] = fkey(v[j]);
    uint32_t T = 0;
    for (int b = 31; b >= 0; b--) {
        uint32_t t2 = T | (1u << b);
        if (count_ge(key, n, t2) >= k) T = t2;
    }
    int64_t o = 0;
    for (int64_t j = 0; j < n; j++) if (key[j] > T) { out_v[o] = v[j]; out_i[o] = ix[j]; o++; }
    for (int64_t j = 0; j < n && o < k; j++) if (key[j] == T) { out_v[o] = v[j]; out_i[o] = ix[j]; o++; }
}

void mlsae_topk_rows(const float* pre, int64_t ld, int64_t M, int64_t k, int64_t r0, int64_t r1,
                     float* vals, int64_t* idx, float* bv, int32_t* bi, uint32_t* key) {
    const int64_t g = M / k;
    const int branchless = M <= 128 * k;  /* ~4k hits: most vectors of a short row hold one */
    for (int64_t r = r0; r < r1; r++) {
        const float* x = pre + r * ld;
        float thr = INFINITY;
        for (int64_t s = 0; s < k; s++) {
            int64_t lo = s * g, len = (s == k - 1) ? M - lo : g;
            float m = block_max(x + lo, len);
            thr = m < thr ? m : thr;
        }
        int64_t c = collect(x, M, thr, branchless, bv, bi);
        if (c < k) {  /* NaNs spoilt the bound: rank every entry, NaN as -inf */
            for (int64_t j = 0; j < M; j++) { bv[j] = isnan(x[j]) ? -INFINITY : x[j]; bi[j] = (int32_t)j; }
            c = M;
        }
        radix_select(bv, bi, key, c, k, vals + r * k, idx + r * k);
    }
}

/* Stable counting sort of keys in [0, m): order = entry ids grouped by key, src = order / k,
   starts[j] = first position of key j (m + 1 entries). Returns -1 on an out-of-range key. */
int mlsae_counting_sort(const int64_t* keys, int64_t n, int64_t m, int64_t k,
                        int64_t* order, int64_t* src, int64_t* starts) {
    for (int64_t j = 0; j <= m; j++) starts[j] = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t key = keys[i];
        if (key < 0 || key >= m) return -1;
        starts[key + 1]++;
    }
    for (int64_t j = 1; j <= m; j++) starts[j] += starts[j - 1];
    for (int64_t i = 0; i < n; i++) {
        int64_t pos = starts[keys[i]]++;
        order[pos] = i;
        src[pos] = i / k;
    }
    for (int64_t j = m; j > 0; j--) starts[j] = starts[j - 1];  /* undo the increments */
    starts[0] = 0;
    return 0;
}
"""

_FLAGS = (["-O3", "-march=native"], ["-O3"])
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    if os.environ.get("MLSAE_KERNEL_DIR"):
        return Path(os.environ["MLSAE_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlsae" / "kernels"


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: top-k falls back to torch.topk")
        return None
    tag = hashlib.sha256((C_SOURCE + platform.machine() + compiler).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    for flags in _FLAGS:
        so = out_dir / f"kernels-{tag}-{flags[-1].lstrip('-').replace('=', '_')}.so"
        if not so.exists():
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                    src = Path(tmp) / "kernels.c"
                    src.write_text(C_SOURCE)
                    built = Path(tmp) / "kernels.so"
                    subprocess.run([compiler, *flags, "-shared", "-fPIC", str(src), "-o", str(built)],
                                   check=True, capture_output=True, timeout=120)
                    os.replace(built, so)  # atomic: concurrent builders never see a partial file
            except (OSError, subprocess.SubprocessError) as err:
                log.info("building the C kernels with %s failed (%s)", flags, err)
                continue
        try:
            lib = ctypes.CDLL(str(so))
        except OSError as err:
            log.info("loading %s failed (%s)", so, err)
            continue
        fn = lib.mlsae_topk_rows
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        sort = lib.mlsae_counting_sort
        sort.restype = ctypes.c_int
        sort.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        return lib
    return None


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                if os.environ.get("MLSAE_C_KERNELS", "1").lower() not in {"0", "false", "no"}:
                    _lib = _build()
                _tried = True
    return _lib


def available() -> bool:
    """True when the compiled kernel can be used (builds it on first call)."""
    return _library() is not None


def supports(pre_NM: Tensor, k: int) -> bool:
    """The kernel handles this input: CPU float32 rows with unit stride, 1 <= k <= M < 2^31."""
    return (pre_NM.device.type == "cpu" and pre_NM.dtype == torch.float32 and pre_NM.dim() == 2
            and pre_NM.stride(1) == 1 and 1 <= k <= pre_NM.shape[1] < 2**31
            and not pre_NM.requires_grad and available())


def topk(pre_NM: Tensor, k: int, threads: int | None = None) -> tuple[Tensor, Tensor]:
    """(values [N, k] float32, indices [N, k] int64) of each row's k largest entries, unordered."""
    if not supports(pre_NM, k):
        raise ValueError("ckernels.topk needs a CPU float32 [N, M] tensor with unit column stride, "
                         "1 <= k <= M, and the compiled kernel (check ckernels.available())")
    global _pool
    n, m = pre_NM.shape
    vals_NK = torch.empty(n, k, dtype=torch.float32)
    idx_NK = torch.empty(n, k, dtype=torch.int64)
    if threads is None:  # small inputs: a second thread costs more than it saves
        threads = torch.get_num_threads() if n * m >= 1 << 20 else 1
    threads = max(1, min(threads, n))
    bufs = [(torch.empty(m + 16, dtype=torch.float32), torch.empty(m + 16, dtype=torch.int32),
             torch.empty(m + 16, dtype=torch.int32)) for _ in range(threads)]
    fn = _library().mlsae_topk_rows
    args = (pre_NM.data_ptr(), pre_NM.stride(0), m, k)
    bounds = [n * i // threads for i in range(threads + 1)]

    def run(i: int) -> None:
        bv, bi, key = bufs[i]
        fn(*args, bounds[i], bounds[i + 1], vals_NK.data_ptr(), idx_NK.data_ptr(),
           bv.data_ptr(), bi.data_ptr(), key.data_ptr())

    if threads == 1:
        run(0)
    else:  # ctypes releases the GIL, so Python threads run the row blocks in parallel
        if _pool is None or _pool._max_workers < threads:
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="mlsae-topk")
        for f in [_pool.submit(run, i) for i in range(threads)]:
            f.result()
    return vals_NK, idx_NK


def counting_sort(idx_NK: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entries of idx_NK grouped by value (stable): (order, order // K, starts[n_rows]).

    order[p] is the flat entry id at position p, so entries of value j sit at
    positions starts[j] .. starts[j + 1] - 1. CPU int64 only, with the compiled kernel.
    """
    if idx_NK.device.type != "cpu" or idx_NK.dtype != torch.int64 or not available():
        raise ValueError("ckernels.counting_sort needs a CPU int64 tensor and the compiled kernel")
    flat = idx_NK.reshape(-1).contiguous()
    n = flat.numel()
    order = torch.empty(n, dtype=torch.int64)
    src = torch.empty(n, dtype=torch.int64)
    starts = torch.empty(n_rows + 1, dtype=torch.int64)
    k = idx_NK.shape[1] if idx_NK.dim() == 2 else 1
    rc = _library().mlsae_counting_sort(flat.data_ptr(), n, n_rows, max(1, k), order.data_ptr(),
                                        src.data_ptr(), starts.data_ptr())
    if rc != 0:
        raise ValueError(f"an index is outside 0..{n_rows - 1}")
    return order, src, starts[:n_rows]
