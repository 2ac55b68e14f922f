"""Fused attention: `tfkernels.attention`, SDPA's signature and semantics, FlashAttention-2 style.

Math (per batch b, query head h, with h_kv = h // (H_q // H_kv) for GQA/MQA):

    S = cap(scale * Q K^T) + M_add                 (T_q, T_k); M_add: float mask, -inf where a bool
                                                   mask is False, (is_causal) j > i, or j is outside
                                                   the window [i - left, i + right];
                                                   cap(x) = softcap * tanh(x / softcap), or x
    P = softmax(S) row-wise,  LSE = logsumexp(S)   (LSE saved, fp32, natural log)
    Pd = Z * P / (1 - p)                           Z: dropout keep mask (p = dropout_p), else Pd = P
    O = Pd V

Backward (P recomputed from Q, K and LSE; no T_q x T_k tensor is stored):

    delta = rowsum(dO * O)                         (= rowsum(P * dP), the softmax VJP term)
    dV = Pd^T dO
    dP = Z * (dO V^T) / (1 - p)
    dS = P * (dP - delta)                          (= d loss / d S, also the float mask's gradient)
    dX = dS * cap'(X), cap' = 1 - tanh^2           (X = scale * Q K^T; cap' = 1 without softcap)
    dQ = scale * dX K,   dK = scale * dX^T Q       (dK, dV summed over the query heads of a group)

Kernels (Triton, written like the fused-attention tutorial):
- `_attn_fwd`: one program per (BLOCK_M query rows, b*H_q + h). Online softmax in base 2 (log2(e)
  folded into the scale, exp2 is the hardware instruction), fp32 accumulators, P cast to V's dtype
  for the second dot. K/V blocks are walked in two stages: blocks that need no masking (the fast
  path: no `where`, no bounds checks) and blocks that do (the window's lower edge before them; the
  causal diagonal / upper edge and the ragged last block after them), `_kv_stages` / `_q_stages`. Blocks entirely
  outside the window (above the diagonal, when causal) are never visited: a window of W keys costs
  O(T * W), not O(T^2). The window's sides are constexprs (WIN_LEFT, WIN_RIGHT; causal is a right
  side at 0), so launches without a window compile to the causal / full kernels.
- `_attn_bwd_preprocess`: delta.
- `_attn_bwd_dkdv`: one program per (BLOCK_N1 key rows, b*H_kv + h_kv); loops over the group's query
  heads and over the query blocks that see its keys (`_q_stages`: none above the diagonal when
  causal, none outside the window), keeps dK
  and dV in fp32 registers. No atomics: deterministic, and GQA's sum over heads happens in-kernel.
- `_attn_bwd_dq`: one program per (BLOCK_M2 query rows, b*H_q + h); walks K/V blocks like the forward.
- `_dropout_keep_kernel`: materialises the keep mask Z for tests (same RNG call as the kernels).

Semantics and limits:
- q (B, H_q, T_q, D), k (B, H_kv, T_k, D), v (B, H_kv, T_k, D); any strides (incl. 0); output
  (B, H_q, T_q, D) in q's layout of heads and time (`_like_layout`: (B, T, H, D) memory for the usual
  transposed projection, so the caller's transpose back is free), and dq/dk/dv likewise. D (the same for q, k, v in the kernels; the public function pads
  a different v head dim, `_value_dim_attention`) up to 256, any value (BLOCK_D is the next power
  of two, padded lanes are masked). Any T_q, T_k (T_q != T_k allowed).
- is_causal: SDPA's top-left `tril` (row i sees keys j <= i), also when T_q != T_k. It may be
  combined with attn_mask (SDPA forbids that).
- window (left, right), FlashAttention's window_size: row i sees keys i - left .. i + right
  (-1: unbounded), top-left aligned like is_causal; the kernels take it as win_l, win_r >= 0 with
  constexpr flags for the bounded sides, causality folded in (a right side at 0). softcap > 0: Gemma 2's logit soft-capping, before the mask.
- documents (`document_ids`, packed sequences): q_doc (B, T_q), k_doc (B, T_k) int32; query i sees
  key j only if q_doc[i] == k_doc[j] >= 0 (ANDed with the rest). Per 16-row granule, a small kernel
  finds the key (query) range of its documents (`_documents.ranges`); each program visits only its
  granules' range, keeps blocks wholly inside its single document on the unmasked path, and
  compares ids in the masked stages (HAS_DOCS). See tfkernels/ops/_documents.py.
- attn_mask: bool (True = keep) or float (added to the scores), broadcastable to (B, H_q, T_q, T_k);
  it reaches the kernels as a stride-0 `expand` view, never materialised. A float mask that
  requires grad gets d(mask) = dS: the dK/dV kernel then also writes dS into a (B, H_q, T_q, T_k)
  fp32 buffer (O(T^2) memory, only in that case), which autograd sums over the broadcast dims.
- A query row whose every key is masked returns 0 (and gets zero gradients); its saved LSE is +inf.
  (SDPA's math backend returns NaN there.)
- dtypes: float16, bfloat16, float32, with fp32 accumulation everywhere. fp32 inputs use TF32 dot
  products when PyTorch allows TF32 in fp32 matmuls (`torch.backends.cuda.matmul.fp32_precision`
  == "tf32", which `allow_tf32 = True` and `set_float32_matmul_precision("high")` also set; the
  legacy `allow_tf32` on torch < 2.9; read at each call), IEEE fp32 otherwise.
- Dropout: counter-based Philox RNG, `_keep(seed, offset)` (Triton 3.6's `tl.rand` stream) with
  offset = ((b * H_q + h) * T_q + i) * T_k + j (int64) and keep = (uniform >= dropout_p). The seed is
  drawn from torch's default CPU generator (`torch.randint`), so `torch.manual_seed` reproduces a
  call; the backward regenerates Z from the seed instead of storing it.

Op contract (the "cuda" backend implements the same two functions, `torch.ops.tfkernels_cuda.*`,
with exactly these arguments and results):

    attention_fwd(q, k, v, mask: Tensor?, q_doc: Tensor?, k_doc: Tensor?, dropout_p: float,
                  seed: Tensor?, is_causal: bool, scale: float, window_left: int, window_right: int,
                  softcap: float) -> (out, lse)
        q (B,Hq,Tq,D), k/v (B,Hkv,Tk,D) fp16/bf16/fp32 any strides, Hq % Hkv == 0;
        mask None or (B,Hq,Tq,Tk) with any strides (0 on broadcast dims), dtype bool or float;
        q_doc/k_doc both None, or (B,Tq)/(B,Tk) int32 contiguous document ids (negative: padding);
        seed None (dropout_p == 0) or int64 CPU tensor of shape (1,); dropout_p in [0, 1] (1: all
        dropped, output and gradients 0);
        window_left/right -1 (unbounded) or >= 0; softcap >= 0 (0 = off);
        out (B,Hq,Tq,D) in q's dtype and _like_layout(q) (a stride test both backends make); lse (B,Hq,Tq) fp32 contiguous, natural log,
        +inf for a fully masked row.
    attention_bwd(dout, q, k, v, mask: Tensor?, q_doc: Tensor?, k_doc: Tensor?, out, lse, dlse: Tensor?, dropout_p: float,
                  seed: Tensor?, is_causal: bool, scale: float, window_left: int, window_right: int,
                  softcap: float, mask_grad: bool) -> (dq, dk, dv, dmask)
        dout (B,Hq,Tq,D) any strides; dq/dk/dv in q/k/v's dtypes and _like_layout(q/k/v);
        dlse None or (B,Hq,Tq) fp32 contiguous, 0 on fully masked rows: the gradient of lse, when the
        caller used it (d lse / d S = P, so the kernels take delta - dlse for delta);
        dmask (B,Hq,Tq,Tk) fp32 contiguous = dS when mask_grad, else an empty (0,) fp32 tensor.
    To reproduce the Triton kernels' dropout bit for bit (tests replay it through `_dropout_mask`),
    a CUDA implementation uses `_keep`'s stream (Triton 3.6's `tl.rand` for int64 offsets):
    Philox-4x32 (10 rounds, key (lo(seed), hi(seed)), counter (lo(offset), hi(offset), 0, 0)),
    keep = uniform(c0) >= dropout_p,
    uniform(c0) = (c0 as int32, negatives mapped to -x - 1) * 4.6566127342e-10 in fp32.
    Documents on the cuda backend: the same spans (csrc/attention.cu, attn_doc_spans_kernel, from the
    search key of _documents), but its tiles start at a block's first document column rather than
    on a block boundary, and it checks q_doc/k_doc itself (int32, (B, T), q's device; a copy when
    not contiguous), so a direct call with bad ids raises an error naming them.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _cuda_ext, _validate, reference
from . import _documents, _eager, _grid

try:  # SDPA's attn_mask=causal_upper_left(...) / causal_lower_right(...) (torch >= 2.2)
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover
    CausalBias = CausalVariant = None

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch and cuda backends still work
    triton = None
else:
    from ._documents import _GRAN, _doc_stages, _doc_valid

MAX_HEAD_DIM = 256
SOFTCAP_OFF = 1e30  # a softcap this large caps nothing an fp32 score can hold: treated as off
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453  # log(x) = log2(x) * ln(2)

if triton is not None:

    @triton.jit
    def _load_tile(ptrs, offs_r, offs_c, n_r, n_c, CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
        """2-D tile load whose bounds checks are compiled in only where a dimension can be ragged."""
        if CHECK_R and CHECK_C:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
        elif CHECK_R:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
        elif CHECK_C:
            x = tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _store_tile(ptrs, x, offs_r, offs_c, n_r, n_c, CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
        if CHECK_R and CHECK_C:
            tl.store(ptrs, x, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c))
        elif CHECK_R:
            tl.store(ptrs, x, mask=offs_r[:, None] < n_r)
        elif CHECK_C:
            tl.store(ptrs, x, mask=offs_c[None, :] < n_c)
        else:
            tl.store(ptrs, x)

    @triton.jit
    def _keep(seed, offset, dropout_p):
        """Dropout's keep mask: uniform(seed, offset) >= dropout_p, the Philox stream of the contract.

        Written out rather than `tl.rand(seed, offset)`: that is the same stream on Triton 3.6, but
        Triton 3.2 ran int64 offsets through Philox-4x64, so the mask (and the cuda backend's
        bit-for-bit match) would change with the installed Triton."""
        lo = offset.to(tl.uint32)
        hi = (offset >> 32).to(tl.uint32)
        zero = lo * 0
        c0, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
        return tl.uint_to_uniform_float(c0) >= dropout_p

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b with fp32 accumulation. UPCAST (interpreter + bf16 only): Triton 3.6's interpreter
        computes bf16 dots wrongly, so the (already bf16-rounded) operands are widened exactly."""
        if UPCAST:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            c = tl.dot(a, b, input_precision=PRECISION)
        return c

    @triton.jit
    def _dot_acc(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b, the accumulator fed to the MMA (see _dot for UPCAST)."""
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _bh_ptr(X, b, h, stride_b, stride_h):
        """X[b, h]: the batch/head offset taken in int64 (B * H * T * D may pass 2**31)."""
        return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h

    @triton.jit
    def _q_program(Hq, GROUP, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Indices of a program over (BLOCK_M query rows, b*Hq + h), as the forward and dQ kernels
        launch: (start_m, bh, b, h, hk = h's K/V head under GQA, offs_m, offs_d)."""
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // GROUP
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        return start_m, bh, b, h, hk, offs_m, offs_d

    @triton.jit
    def _lower_edge(r0, ROWS: tl.constexpr, w, hi, BLOCK: tl.constexpr):
        """(lo, u_lo) of a window's lower edge for rows [r0, r0 + ROWS) that see columns from r - w
        on: lo the block holding the first column any row sees, u_lo the first block (at most hi)
        from which every row sees every column; both multiples of BLOCK unless u_lo = hi."""
        lo = (tl.maximum(r0 - w, 0) // BLOCK) * BLOCK
        u_lo = ((tl.maximum(r0 + ROWS - 1 - w, 0) + BLOCK - 1) // BLOCK) * BLOCK
        return lo, tl.minimum(u_lo, hi)

    @triton.jit
    def _kv_stages(r0, ROWS: tl.constexpr, Tk, win_l, win_r,
                   WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
        """Key-block bounds (lo, u_lo, u_hi, hi) of a program over query rows [r0, r0 + ROWS), where
        row i sees keys i - win_l .. i + win_r (a side only when WIN_LEFT / WIN_RIGHT; causal is
        win_r = 0): [lo, u_lo) the window's lower edge (masked; empty without WIN_LEFT), [u_lo, u_hi)
        whole blocks every row sees (no masking, no bounds checks), [u_hi, hi) the diagonal / upper
        edge and the ragged end (masked). Blocks no row sees are never visited; lo, u_lo, u_hi are
        multiples of BLOCK_N (or u_lo = u_hi = hi, when the masked stages take everything).
        CAUSAL (right side 0): r0 is a multiple of BLOCK_N (BLOCK_M % BLOCK_N == 0), so the bounds
        are the plain causal kernel's, computed as simply (no extra registers in the hot kernels)."""
        if CAUSAL:
            hi = tl.minimum(r0 + ROWS, Tk)
            u_hi = tl.minimum(r0, (Tk // BLOCK_N) * BLOCK_N)
        elif WIN_RIGHT:
            hi = tl.minimum(r0 + ROWS + win_r, Tk)
            u_hi = ((tl.minimum(r0 + win_r, Tk - 1) + 1) // BLOCK_N) * BLOCK_N  # after the last key every row sees
        else:
            hi = Tk
            u_hi = (Tk // BLOCK_N) * BLOCK_N
        lo = 0
        u_lo = 0
        if WIN_LEFT:
            lo, u_lo = _lower_edge(r0, ROWS, win_l, hi, BLOCK_N)
            u_hi = tl.maximum(u_hi, u_lo)
        return lo, u_lo, u_hi, hi

    @triton.jit
    def _q_stages(n0, ROWS: tl.constexpr, Tq, win_l, win_r,
                  WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
        """Query-block bounds (lo, u_lo, u_hi, hi) of the dK/dV program over key rows [n0, n0 + ROWS):
        key j is seen by queries j - win_r .. j + win_l. [lo, u_lo) the lower edge (the causal
        diagonal; masked, empty without WIN_RIGHT), [u_lo, u_hi) whole blocks, [u_hi, hi) the upper
        edge (masked, empty without WIN_LEFT). Query rows past Tq need no masking (their LSE is +inf,
        so P = 0): the ragged last block stays in the unmasked stage. CAUSAL: n0 is a multiple of
        BLOCK_M (BLOCK_N % BLOCK_M == 0); the diagonal blocks are [n0, n0 + ROWS), as in _kv_stages."""
        if WIN_LEFT:
            hi = tl.minimum(n0 + ROWS + win_l, Tq)
            full_end = n0 + win_l + 1  # queries below it see every key of the block (from u_lo on)
            u_hi = tl.where(full_end >= Tq, Tq, (full_end // BLOCK_M) * BLOCK_M)
        else:
            hi = Tq
            u_hi = Tq
        if CAUSAL:
            lo = n0
            u_lo = tl.minimum(n0 + ROWS, hi)
        elif WIN_RIGHT:
            lo, u_lo = _lower_edge(n0, ROWS, win_r, hi, BLOCK_M)
        else:
            lo = 0
            u_lo = 0
        if WIN_LEFT:
            u_hi = tl.maximum(u_hi, u_lo)
        return lo, u_lo, u_hi, hi

    @triton.jit
    def _window_valid(offs_q, offs_k, win_l, win_r, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                      KEYS_BY_QUERIES: tl.constexpr):
        """Whether query i may see key j under the window: i - win_l <= j (WIN_LEFT) and
        j <= i + win_r (WIN_RIGHT). A (queries, keys) tile, or (keys, queries) with KEYS_BY_QUERIES.
        The window is moved onto the 1-D query offsets first, so a side costs one compare per
        element, as the plain causal test did."""
        if KEYS_BY_QUERIES:
            k2 = offs_k[:, None]
            first = (offs_q - win_l)[None, :]
            last = (offs_q + win_r)[None, :]
        else:
            k2 = offs_k[None, :]
            first = (offs_q - win_l)[:, None]
            last = (offs_q + win_r)[:, None]
        if WIN_LEFT and WIN_RIGHT:
            valid = (k2 >= first) & (k2 <= last)
        elif WIN_LEFT:
            valid = k2 >= first
        else:  # WIN_RIGHT (callers skip the call without either side)
            valid = k2 <= last
        return valid

    @triton.jit
    def _tanh(x):
        """tanh in fp32 (no tanh in tl; libdevice's is not in the interpreter) to a few ulp of t:
        (1 - e) / (1 + e) with e = exp(-2|x|), the sign put back; below |x| = 1/8, where 1 - e
        cancels (a large softcap makes every x small), the odd series x (1 - x^2/3 + 2x^4/15 -
        17x^6/315), whose next term is ~1e-9 relative there."""
        ax = tl.abs(x)
        e = tl.math.exp2(-2.8853900817779268 * ax)  # exp(-2|x|)
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        x2 = x * x
        series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 - x2 * 0.05396825396825397)))
        return tl.where(ax < 0.125, series, t)

    @triton.jit
    def _scores(qk, qk_scale, cap2, SOFTCAP: tl.constexpr):
        """Scores in base-2 units from the raw q.k dot, and t = tanh(scale * q.k / softcap) (the
        soft-capping's derivative factor 1 - t^2 in the backward; 0 when SOFTCAP is off).
        Without softcap: qk_scale = scale * log2(e). With: qk_scale = scale / softcap and
        cap2 = softcap * log2(e), so s = softcap * tanh(scale * q.k / softcap) * log2(e)."""
        if SOFTCAP:
            t = _tanh(qk * qk_scale)
            s = t * cap2
        else:
            t = 0.0
            s = qk * qk_scale
        return s, t

    @triton.jit
    def _add_mask(s, Mask_bh, offs_r, offs_c, n_r, n_c, stride_r, stride_c, MASK_BOOL: tl.constexpr):
        """Scores s (base 2) with the attention mask tile applied: -inf where a bool mask is False,
        + mask * log2(e) for a float mask. Rows/columns are queries/keys or (transposed) keys/queries."""
        m_ptrs = Mask_bh + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
        in_bounds = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
        if MASK_BOOL:
            keep = tl.load(m_ptrs, mask=in_bounds, other=0) != 0
            s = tl.where(keep, s, -float("inf"))
        else:
            s += tl.load(m_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * 1.4426950408889634
        return s

    @triton.jit
    def _load_lse_delta(LSE_bh, Delta_bh, offs_m, Tq, EVEN_M: tl.constexpr):
        """lse and delta of query rows offs_m; rows past Tq get LSE = +inf (hence P = 0) and delta 0."""
        if EVEN_M:
            lse = tl.load(LSE_bh + offs_m)
            delta = tl.load(Delta_bh + offs_m)
        else:
            lse = tl.load(LSE_bh + offs_m, mask=offs_m < Tq, other=float("inf"))
            delta = tl.load(Delta_bh + offs_m, mask=offs_m < Tq, other=0.0)
        return lse, delta

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _attn_fwd_inner(
        acc, l_i, m_i, q,  # running state (BLOCK_M, BLOCK_D) fp32, (BLOCK_M,), (BLOCK_M,); q tile
        K_bh,  # pointer to K[b, h_kv], shape (Tk, D), strides (stride_kn, stride_kd)
        V_bh,  # pointer to V[b, h_kv], shape (Tk, D), strides (stride_vn, stride_vd)
        Mask_bh,  # pointer to mask[b, h], shape (Tq, Tk), strides (stride_mq, stride_mk)
        seed, rng_row,  # dropout seed; rng_row (BLOCK_M,) int64 = ((b*Hq + h)*Tq + i) * Tk
        KDoc_b, q_doc,  # documents: pointer to k_doc[b] (Tk,) int32, the query rows' ids (BLOCK_M,)
        offs_m, offs_d, lo, hi, Tq, Tk, D,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
        qk_scale, cap2, win_l, win_r, dropout_p,
        MASKED_STAGE: tl.constexpr,  # blocks on the window's edges / ragged end: mask columns
        WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MAY_EMPTY: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kT = _load_tile(K_bh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                            offs_d, offs_n, D, Tk, not EVEN_D, MASKED_STAGE)  # (BLOCK_D, BLOCK_N)
            # scores in base-2 units: s = (scale * log2(e)) * q.k  (fp32 accumulation)
            s, _ = _scores(_dot(q, kT, DOT_PRECISION, UPCAST), qk_scale, cap2, SOFTCAP)
            if HAS_MASK:
                s = _add_mask(s, Mask_bh, offs_m, offs_n, Tq, Tk, stride_mq, stride_mk, MASK_BOOL)
            if MASKED_STAGE:
                valid = offs_n[None, :] < Tk
                if WIN_LEFT or WIN_RIGHT:
                    valid = valid & _window_valid(offs_m, offs_n, win_l, win_r, WIN_LEFT, WIN_RIGHT, False)
                if HAS_DOCS:
                    valid = valid & _doc_valid(q_doc, tl.load(KDoc_b + offs_n, mask=offs_n < Tk, other=-1), True)
                s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MAY_EMPTY:
                # a row that has seen no key yet has max -inf: subtract 0 instead so exp2 gives 0, not NaN
                m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
            else:
                m_sub = m_new
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser is taken before dropout
            acc = acc * alpha[:, None]
            if HAS_DROPOUT:
                keep_d = _keep(seed, rng_row[:, None] + offs_n[None, :], dropout_p)
                p = tl.where(keep_d, p, 0.0)
            v = _load_tile(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                           offs_n, offs_d, Tk, D, MASKED_STAGE, not EVEN_D)  # (BLOCK_N, BLOCK_D)
            acc = _dot_acc(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(
        Q,  # pointer to q, shape (B, Hq, Tq, D), strides stride_q*
        K,  # pointer to k, shape (B, Hkv, Tk, D), strides stride_k*
        V,  # pointer to v, shape (B, Hkv, Tk, D), strides stride_v*
        Mask,  # pointer to the mask, shape (B, Hq, Tq, Tk), strides stride_m* (0 on broadcast dims)
        QDoc, KDoc,  # document ids (B, Tq), (B, Tk) int32 contiguous (HAS_DOCS only)
        Ranges,  # (3, B, n_gran) int32: the query granules' key ranges (_documents.ranges; HAS_DOCS only)
        O,  # pointer to out, shape (B, Hq, Tq, D), strides stride_o* (d: 1; see _like_layout)
        LSE,  # pointer to lse, shape (B, Hq, Tq), fp32 contiguous
        seed, dropout_p, rp_keep, qk_scale, cap2,  # rp_keep = 1 / (1 - dropout_p); see _scores
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mq, stride_mk,
        stride_ob, stride_oh, stride_om,
        B, Hq, Tq, Tk, D, GROUP,  # GROUP = Hq // Hkv
        win_l, win_r,  # query i sees keys i - win_l (WIN_LEFT) .. i + win_r (WIN_RIGHT; causal: 0)
        WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MAY_EMPTY: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        start_m, bh, b, h, hk, offs_m, offs_d = _q_program(Hq, GROUP, BLOCK_M, BLOCK_D)
        Q_bh = _bh_ptr(Q, b, h, stride_qb, stride_qh)
        K_bh = _bh_ptr(K, b, hk, stride_kb, stride_kh)
        V_bh = _bh_ptr(V, b, hk, stride_vb, stride_vh)
        Mask_bh = _bh_ptr(Mask, b, h, stride_mb, stride_mh)
        q = _load_tile(Q_bh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       offs_m, offs_d, Tq, D, not EVEN_M, not EVEN_D)  # (BLOCK_M, BLOCK_D)
        rng_row = (bh.to(tl.int64) * Tq + offs_m) * Tk
        m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        # the window's lower edge (masked), whole blocks that need no masking, then the diagonal /
        # upper edge and the ragged tail (masked); key blocks outside the window are never visited
        if CAUSAL:  # the right side at a constant 0: it folds into the bounds and the diagonal test
            win_r = 0
        lo, u_lo, u_hi, hi = _kv_stages(start_m * BLOCK_M, BLOCK_M, Tk, win_l, win_r, WIN_LEFT, WIN_RIGHT, CAUSAL, BLOCK_N)
        KDoc_b = KDoc + b.to(tl.int64) * Tk
        q_doc = offs_m  # unused without documents
        if HAS_DOCS:  # only the key blocks the rows' documents hold; see _documents
            q_doc = tl.load(QDoc + b.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=-1)
            lo, u_lo, u_hi, hi = _doc_stages(lo, u_lo, u_hi, hi, Ranges, b, B, tl.cdiv(Tq, _GRAN), start_m * BLOCK_M, Tk,
                                             BLOCK_M, BLOCK_N, _GRAN)
        if WIN_LEFT or HAS_DOCS:  # compiled only for a window with a lower edge, or documents
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, K_bh, V_bh, Mask_bh, seed, rng_row, KDoc_b, q_doc, offs_m, offs_d, lo, u_lo, Tq, Tk, D,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk, qk_scale, cap2, win_l, win_r,
                dropout_p, True, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_MASK, MASK_BOOL, MAY_EMPTY, HAS_DROPOUT, HAS_DOCS,
                EVEN_D, BLOCK_N, DOT_PRECISION, UPCAST)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, Mask_bh, seed, rng_row, KDoc_b, q_doc, offs_m, offs_d, u_lo, u_hi, Tq, Tk, D,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk, qk_scale, cap2, win_l, win_r,
            dropout_p, False, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_MASK, MASK_BOOL, MAY_EMPTY, HAS_DROPOUT, HAS_DOCS,
            EVEN_D, BLOCK_N, DOT_PRECISION, UPCAST)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, Mask_bh, seed, rng_row, KDoc_b, q_doc, offs_m, offs_d, u_hi, hi, Tq, Tk, D,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk, qk_scale, cap2, win_l, win_r,
            dropout_p, True, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_MASK, MASK_BOOL, MAY_EMPTY, HAS_DROPOUT, HAS_DOCS,
            EVEN_D, BLOCK_N, DOT_PRECISION, UPCAST)
        if MAY_EMPTY:
            # every key masked: l = 0 -> output 0 and LSE = +inf (the backward's P is then 0)
            empty = l_i == 0.0
            lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
            l_i = tl.where(empty, 1.0, l_i)
        else:
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # base 2 -> natural log
        if HAS_DROPOUT:
            out = acc * (rp_keep / l_i)[:, None]
        else:
            out = acc / l_i[:, None]
        O_bh = _bh_ptr(O, b, h, stride_ob, stride_oh)
        _store_tile(O_bh + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
                    offs_m, offs_d, Tq, D, not EVEN_M, not EVEN_D)
        if EVEN_M:
            tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse)
        else:
            tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)

    # ------------------------------------------------------------------------------------------
    # backward
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _attn_bwd_preprocess(
        O,  # pointer to out, shape (B, Hq, Tq, D), strides stride_o*
        DO,  # pointer to d(out), shape (B, Hq, Tq, D), strides stride_do* (may be 0)
        Delta,  # pointer to delta = rowsum(dO * O), shape (B, Hq, Tq), fp32 contiguous
        stride_ob, stride_oh, stride_om, stride_od,
        stride_dob, stride_doh, stride_dom, stride_dod,
        Hq, Tq, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(1)
        b = (bh // Hq).to(tl.int64)
        h = (bh % Hq).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        msk = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                    mask=msk, other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=msk, other=0.0).to(tl.float32)
        tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)  # fp32

    @triton.jit
    def _attn_bwd_dkdv_inner(
        dk, dv, k, v,  # (BLOCK_N, BLOCK_D): fp32 accumulators and the program's K/V tiles
        Q_bh,  # pointer to q[b, h], shape (Tq, D), strides (stride_qm, stride_qd)
        DO_bh,  # pointer to dout[b, h], shape (Tq, D), strides (stride_dom, stride_dod)
        LSE_bh, Delta_bh,  # pointers to lse[b, h] and delta[b, h], shape (Tq,), fp32
        Mask_bh,  # pointer to mask[b, h], shape (Tq, Tk), strides (stride_mq, stride_mk)
        DMask_bh,  # pointer to dmask[b, h], shape (Tq, Tk), fp32 contiguous
        seed, rng_base,  # rng_base = (b*Hq + h) * Tq
        QDoc_b, k_doc,  # documents: pointer to q_doc[b] (Tq,) int32, the key rows' ids (BLOCK_N,)
        offs_n, offs_d, lo, hi, Tq, Tk, D,
        stride_qm, stride_qd, stride_dom, stride_dod, stride_mq, stride_mk,
        qk_scale, cap2, win_l, win_r, dropout_p, rp_keep,
        MASKED_STAGE: tl.constexpr,  # query blocks on the window's edges (the causal diagonal), documents' edges
        WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_GRAD: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # Works on transposed tiles (keys x queries) as the tutorial does, so that dK and dV come
        # out of dots without transposing the big operands.
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qT = _load_tile(Q_bh + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm,
                            offs_d, offs_m, D, Tq, not EVEN_D, not EVEN_M)  # (BLOCK_D, BLOCK_M)
            # rows past Tq get LSE = +inf, hence P = 0: no other masking needed for them
            lse, delta = _load_lse_delta(LSE_bh, Delta_bh, offs_m, Tq, EVEN_M)
            sT, tT = _scores(_dot(k, qT, DOT_PRECISION, UPCAST), qk_scale, cap2, SOFTCAP)  # (BLOCK_N, BLOCK_M), base 2
            if HAS_MASK:  # the mask tile transposed: rows are keys, columns queries
                sT = _add_mask(sT, Mask_bh, offs_n, offs_m, Tk, Tq, stride_mk, stride_mq, MASK_BOOL)
            pT = tl.math.exp2(sT - (lse * 1.4426950408889634)[None, :])
            if MASKED_STAGE:  # query i sees key j iff i - win_l <= j <= i + win_r, and its document's keys
                if WIN_LEFT or WIN_RIGHT:
                    pT = tl.where(_window_valid(offs_m, offs_n, win_l, win_r, WIN_LEFT, WIN_RIGHT, True), pT, 0.0)
                if HAS_DOCS:
                    pT = tl.where(_doc_valid(k_doc, tl.load(QDoc_b + offs_m, mask=offs_m < Tq, other=-1), False),
                                  pT, 0.0)
            do = _load_tile(DO_bh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                            offs_m, offs_d, Tq, D, not EVEN_M, not EVEN_D)  # (BLOCK_M, BLOCK_D)
            dpT = _dot(v, tl.trans(do), DOT_PRECISION, UPCAST)  # (BLOCK_N, BLOCK_M) fp32
            if HAS_DROPOUT:
                rng = (rng_base + offs_m[None, :]).to(tl.int64) * Tk + offs_n[:, None]
                keep_d = _keep(seed, rng, dropout_p)
                pdT = tl.where(keep_d, pT * rp_keep, 0.0)
                dpT = tl.where(keep_d, dpT * rp_keep, 0.0)
            else:
                pdT = pT
            dv = _dot_acc(pdT.to(do.dtype), do, dv, DOT_PRECISION, UPCAST)
            dsT = pT * (dpT - delta[None, :])  # fp32; the gradient of the (capped) score + mask
            if MASK_GRAD:
                tl.store(DMask_bh + offs_m[None, :].to(tl.int64) * Tk + offs_n[:, None], dsT,
                         mask=(offs_n[:, None] < Tk) & (offs_m[None, :] < Tq))
            if SOFTCAP:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
                dsT = dsT * (1.0 - tT * tT)
            dk = _dot_acc(dsT.to(qT.dtype), tl.trans(qT), dk, DOT_PRECISION, UPCAST)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(
        Q, K, V, Mask, QDoc, KDoc,  # as in _attn_fwd
        Ranges,  # (3, B, n_gran) int32: the key granules' query ranges (HAS_DOCS only)
        DO,  # pointer to dout, shape (B, Hq, Tq, D), strides stride_do*
        LSE, Delta,  # pointers to lse and delta, shape (B, Hq, Tq), fp32 contiguous
        DK,  # pointer to dk, shape (B, Hkv, Tk, D), strides stride_dk* (d: 1; see _like_layout)
        DV,  # pointer to dv, shape (B, Hkv, Tk, D), strides stride_dv* (d: 1)
        DMask,  # pointer to dmask (= dS), shape (B, Hq, Tq, Tk), fp32 contiguous (MASK_GRAD only)
        seed, dropout_p, rp_keep, qk_scale, cap2, scale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mq, stride_mk,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
        B, Hq, Hkv, Tq, Tk, D, GROUP, win_l, win_r,
        WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_GRAD: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        bhk = tl.program_id(1)
        b = bhk // Hkv
        hk = bhk % Hkv
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        K_bh = _bh_ptr(K, b, hk, stride_kb, stride_kh)
        V_bh = _bh_ptr(V, b, hk, stride_vb, stride_vh)
        k = _load_tile(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, offs_d, Tk, D, not EVEN_N, not EVEN_D)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, offs_d, Tk, D, not EVEN_N, not EVEN_D)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        # key j is seen by queries j - win_r .. j + win_l (causal: no block before the diagonal, the
        # diagonal masked, every later block whole)
        if CAUSAL:  # as in _attn_fwd
            win_r = 0
        lo, u_lo, u_hi, hi = _q_stages(start_n, BLOCK_N, Tq, win_l, win_r, WIN_LEFT, WIN_RIGHT, CAUSAL, BLOCK_M)
        QDoc_b = QDoc + b.to(tl.int64) * Tq
        k_doc = offs_n  # unused without documents
        if HAS_DOCS:  # only the query blocks the keys' documents hold
            k_doc = tl.load(KDoc + b.to(tl.int64) * Tk + offs_n, mask=offs_n < Tk, other=-1)
            lo, u_lo, u_hi, hi = _doc_stages(lo, u_lo, u_hi, hi, Ranges, b, B, tl.cdiv(Tk, _GRAN), start_n, Tq,
                                             BLOCK_N, BLOCK_M, _GRAN)
        for g in range(0, GROUP):  # GQA: this K/V head serves GROUP query heads; sum over them
            h = hk * GROUP + g
            bh = b * Hq + h
            Q_bh = _bh_ptr(Q, b, h, stride_qb, stride_qh)
            DO_bh = _bh_ptr(DO, b, h, stride_dob, stride_doh)
            LSE_bh = LSE + bh.to(tl.int64) * Tq
            Delta_bh = Delta + bh.to(tl.int64) * Tq
            Mask_bh = _bh_ptr(Mask, b, h, stride_mb, stride_mh)
            DMask_bh = DMask + bh.to(tl.int64) * Tq * Tk
            rng_base = bh.to(tl.int64) * Tq
            if WIN_RIGHT or HAS_DOCS:  # the lower edge (the causal diagonal)
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Q_bh, DO_bh, LSE_bh, Delta_bh, Mask_bh, DMask_bh, seed, rng_base, QDoc_b, k_doc,
                    offs_n, offs_d, lo, u_lo, Tq, Tk, D, stride_qm, stride_qd, stride_dom, stride_dod,
                    stride_mq, stride_mk, qk_scale, cap2, win_l, win_r, dropout_p, rp_keep, True, WIN_LEFT, WIN_RIGHT,
                    SOFTCAP, HAS_MASK, MASK_BOOL, MASK_GRAD, HAS_DROPOUT, HAS_DOCS, EVEN_M, EVEN_D, BLOCK_M, DOT_PRECISION, UPCAST)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q_bh, DO_bh, LSE_bh, Delta_bh, Mask_bh, DMask_bh, seed, rng_base, QDoc_b, k_doc,
                offs_n, offs_d, u_lo, u_hi, Tq, Tk, D, stride_qm, stride_qd, stride_dom, stride_dod,
                stride_mq, stride_mk, qk_scale, cap2, win_l, win_r, dropout_p, rp_keep, False, WIN_LEFT, WIN_RIGHT,
                SOFTCAP, HAS_MASK, MASK_BOOL, MASK_GRAD, HAS_DROPOUT, HAS_DOCS, EVEN_M, EVEN_D, BLOCK_M, DOT_PRECISION, UPCAST)
            if WIN_LEFT or HAS_DOCS:  # the upper edge, for a window with a lower one, or documents
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Q_bh, DO_bh, LSE_bh, Delta_bh, Mask_bh, DMask_bh, seed, rng_base, QDoc_b, k_doc,
                    offs_n, offs_d, u_hi, hi, Tq, Tk, D, stride_qm, stride_qd, stride_dom, stride_dod,
                    stride_mq, stride_mk, qk_scale, cap2, win_l, win_r, dropout_p, rp_keep, True, WIN_LEFT, WIN_RIGHT,
                    SOFTCAP, HAS_MASK, MASK_BOOL, MASK_GRAD, HAS_DROPOUT, HAS_DOCS, EVEN_M, EVEN_D, BLOCK_M, DOT_PRECISION, UPCAST)
        dk *= scale  # dK = scale * dS^T Q
        _store_tile(_bh_ptr(DK, b, hk, stride_dkb, stride_dkh) + offs_n[:, None] * stride_dkn + offs_d[None, :],
                    dk.to(DK.dtype.element_ty), offs_n, offs_d, Tk, D, not EVEN_N, not EVEN_D)
        _store_tile(_bh_ptr(DV, b, hk, stride_dvb, stride_dvh) + offs_n[:, None] * stride_dvn + offs_d[None, :],
                    dv.to(DV.dtype.element_ty), offs_n, offs_d, Tk, D, not EVEN_N, not EVEN_D)

    @triton.jit
    def _attn_bwd_dq_inner(
        dq, q, do, lse2, delta,  # dq (BLOCK_M, BLOCK_D) fp32; the program's q/dout tiles; lse*log2(e), delta (BLOCK_M,)
        K_bh, V_bh, Mask_bh,  # as in _attn_fwd_inner
        seed, rng_row,  # rng_row (BLOCK_M,) int64 = ((b*Hq + h)*Tq + i) * Tk
        KDoc_b, q_doc,  # as in _attn_fwd_inner
        offs_m, offs_d, lo, hi, Tq, Tk, D,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
        qk_scale, cap2, win_l, win_r, dropout_p, rp_keep,
        MASKED_STAGE: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr,
        MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kT = _load_tile(K_bh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                            offs_d, offs_n, D, Tk, not EVEN_D, MASKED_STAGE)  # (BLOCK_D, BLOCK_N)
            vT = _load_tile(V_bh + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn,
                            offs_d, offs_n, D, Tk, not EVEN_D, MASKED_STAGE)
            s, t = _scores(_dot(q, kT, DOT_PRECISION, UPCAST), qk_scale, cap2, SOFTCAP)  # (BLOCK_M, BLOCK_N), base 2
            if HAS_MASK:
                s = _add_mask(s, Mask_bh, offs_m, offs_n, Tq, Tk, stride_mq, stride_mk, MASK_BOOL)
            p = tl.math.exp2(s - lse2[:, None])
            if MASKED_STAGE:
                valid = offs_n[None, :] < Tk
                if WIN_LEFT or WIN_RIGHT:
                    valid = valid & _window_valid(offs_m, offs_n, win_l, win_r, WIN_LEFT, WIN_RIGHT, False)
                if HAS_DOCS:
                    valid = valid & _doc_valid(q_doc, tl.load(KDoc_b + offs_n, mask=offs_n < Tk, other=-1), True)
                p = tl.where(valid, p, 0.0)
            dp = _dot(do, vT, DOT_PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N) fp32
            if HAS_DROPOUT:
                keep_d = _keep(seed, rng_row[:, None] + offs_n[None, :], dropout_p)
                dp = tl.where(keep_d, dp * rp_keep, 0.0)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = _dot_acc(ds.to(kT.dtype), tl.trans(kT), dq, DOT_PRECISION, UPCAST)
        return dq

    @triton.jit
    def _attn_bwd_dq(
        Q, K, V, Mask, QDoc, KDoc, DO, LSE, Delta,  # as in _attn_bwd_dkdv
        Ranges,  # as in _attn_fwd
        DQ,  # pointer to dq, shape (B, Hq, Tq, D), strides stride_dq* (d: 1; see _like_layout)
        seed, dropout_p, rp_keep, qk_scale, cap2, scale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mq, stride_mk,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm,
        B, Hq, Tq, Tk, D, GROUP, win_l, win_r,
        WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        start_m, bh, b, h, hk, offs_m, offs_d = _q_program(Hq, GROUP, BLOCK_M, BLOCK_D)
        Q_bh = _bh_ptr(Q, b, h, stride_qb, stride_qh)
        q = _load_tile(Q_bh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       offs_m, offs_d, Tq, D, not EVEN_M, not EVEN_D)
        DO_bh = _bh_ptr(DO, b, h, stride_dob, stride_doh)
        do = _load_tile(DO_bh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        offs_m, offs_d, Tq, D, not EVEN_M, not EVEN_D)
        lse, delta = _load_lse_delta(LSE + bh.to(tl.int64) * Tq, Delta + bh.to(tl.int64) * Tq, offs_m, Tq, EVEN_M)
        lse2 = lse * 1.4426950408889634
        K_bh = _bh_ptr(K, b, hk, stride_kb, stride_kh)
        V_bh = _bh_ptr(V, b, hk, stride_vb, stride_vh)
        Mask_bh = _bh_ptr(Mask, b, h, stride_mb, stride_mh)
        rng_row = (bh.to(tl.int64) * Tq + offs_m) * Tk
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if CAUSAL:  # as in _attn_fwd
            win_r = 0
        lo, u_lo, u_hi, hi = _kv_stages(start_m * BLOCK_M, BLOCK_M, Tk, win_l, win_r, WIN_LEFT, WIN_RIGHT, CAUSAL, BLOCK_N)
        KDoc_b = KDoc + b.to(tl.int64) * Tk
        q_doc = offs_m  # unused without documents
        if HAS_DOCS:  # as in _attn_fwd
            q_doc = tl.load(QDoc + b.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=-1)
            lo, u_lo, u_hi, hi = _doc_stages(lo, u_lo, u_hi, hi, Ranges, b, B, tl.cdiv(Tq, _GRAN), start_m * BLOCK_M, Tk,
                                             BLOCK_M, BLOCK_N, _GRAN)
        if WIN_LEFT or HAS_DOCS:
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, K_bh, V_bh, Mask_bh, seed, rng_row, KDoc_b, q_doc, offs_m, offs_d, lo, u_lo, Tq, Tk, D,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk, qk_scale, cap2, win_l, win_r,
                dropout_p, rp_keep, True, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HAS_DOCS, EVEN_D,
                BLOCK_N, DOT_PRECISION, UPCAST)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, K_bh, V_bh, Mask_bh, seed, rng_row, KDoc_b, q_doc, offs_m, offs_d, u_lo, u_hi, Tq, Tk, D,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk, qk_scale, cap2, win_l, win_r,
            dropout_p, rp_keep, False, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HAS_DOCS, EVEN_D,
            BLOCK_N, DOT_PRECISION, UPCAST)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, K_bh, V_bh, Mask_bh, seed, rng_row, KDoc_b, q_doc, offs_m, offs_d, u_hi, hi, Tq, Tk, D,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk, qk_scale, cap2, win_l, win_r,
            dropout_p, rp_keep, True, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HAS_DOCS, EVEN_D,
            BLOCK_N, DOT_PRECISION, UPCAST)
        dq *= scale  # dQ = scale * dS K
        _store_tile(_bh_ptr(DQ, b, h, stride_dqb, stride_dqh) + offs_m[:, None] * stride_dqm + offs_d[None, :],
                    dq.to(DQ.dtype.element_ty), offs_m, offs_d, Tq, D, not EVEN_M, not EVEN_D)

    @triton.jit
    def _dropout_keep_kernel(Out, seed, base, dropout_p, N, BLOCK: tl.constexpr):
        """Out[i] = keep at RNG offset base + i, i < N (int8)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = _keep(seed, base + offs.to(tl.int64), dropout_p)
        tl.store(Out + offs, keep.to(tl.int8), mask=offs < N)


# ----------------------------------------------------------------------------------------------
# configs: block sizes, warps and stages per GPU generation and head dim
# ----------------------------------------------------------------------------------------------
# forward (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed (compute-capability major, D bucket).
# Hopper: 128 x 128 tiles with 8 warps keep the tensor cores busy at D <= 128 (the tutorial's
# winners); D > 128 halves BLOCK_M/BLOCK_N so Q, the accumulator and the K/V pipeline fit in
# registers / shared memory. Ampere has less shared memory (and sm_86/89 only ~100 KB): fewer stages.
# fp32 inputs halve BLOCK_N and use 2 stages (twice the bytes per tile).
_FWD_CONFIGS = {
    (9, 64): (128, 128, 8, 3),
    (9, 128): (128, 128, 8, 3),
    (9, 256): (64, 64, 8, 2),
    (8, 64): (128, 64, 4, 3),
    (8, 128): (128, 64, 8, 2),
    (8, 256): (64, 32, 4, 2),
}
# backward (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages): the dK/dV kernel keeps a
# tall K/V tile (BLOCK_N1) and streams thin Q/dO tiles (BLOCK_M1); the dQ kernel the reverse — the
# tutorial's (32, 128, 128, 32), 5 stages on Hopper. Warps: the dK/dV kernel holds two
# (BLOCK_N1, D) fp32 accumulators, 2 * 128 * D / (32 * num_warps) registers per thread; with 4 warps
# at D = 128 that alone is 256, and ptxas spills 660-880 bytes per thread (bf16, sm_90, Triton 3.6;
# `python -m benchmarks.static`), so D = 128 on Hopper and D = 64 on Ampere (160 bytes) take 8 warps:
# no spills. D = 64 on Hopper keeps the tutorial's 4 warps (255 registers, 0-24 bytes spilled).
_BWD_CONFIGS = {
    (9, 64): (32, 128, 128, 32, 4, 5),
    (9, 128): (32, 128, 128, 32, 8, 5),
    (9, 256): (16, 64, 64, 16, 8, 2),
    (8, 64): (32, 128, 128, 32, 8, 3),
    (8, 128): (32, 64, 64, 32, 4, 2),
    (8, 256): (16, 32, 32, 16, 4, 1),
}
# fp32 with IEEE dots (torch.backends.cuda.matmul.allow_tf32 False, PyTorch's default) multiplies
# on the FP32 pipe, not the tensor cores, and Triton keeps far more of each operand in registers
# there: the tables above (halved for fp32) spill 0.5-7 KB per thread. These tiles are the largest
# without spills in a sweep with `python -m benchmarks.static` (Triton 3.6, sm_80 and sm_90).
_FWD_IEEE = {
    (9, 64): (64, 32, 8, 2),
    (9, 128): (32, 16, 4, 2),
    (9, 256): (64, 16, 8, 2),
    (8, 64): (64, 32, 8, 2),
    (8, 128): (64, 32, 8, 2),
    (8, 256): (32, 16, 4, 2),
}
_BWD_IEEE = {
    (9, 64): (32, 64, 64, 32, 8, 2),
    (9, 128): (16, 64, 64, 16, 8, 2),
    (9, 256): (16, 32, 32, 16, 4, 2),
    (8, 64): (32, 64, 64, 32, 8, 2),
    (8, 128): (16, 64, 64, 16, 8, 2),
    (8, 256): (16, 32, 32, 16, 4, 2),
}
# the interpreter executes tiles with numpy: small tiles keep CPU tests fast
_INTERP_FWD = (16, 16, 1, 1)
_INTERP_BWD = (16, 16, 16, 16, 1, 1)


def _d_bucket(D: int) -> int:
    return 64 if D <= 64 else (128 if D <= 128 else 256)


def _gpu_major(x: Tensor) -> Optional[int]:
    """The config tables' GPU generation for x (compute-capability major clamped to 8..9), or None
    when the kernels run in the interpreter (CPU tensors). benchmarks/static.py replaces this to
    compile the launches for a GPU that is not there."""
    if not x.is_cuda:
        return None
    return max(8, min(9, torch.cuda.get_device_capability(x.device)[0]))


@functools.lru_cache(maxsize=None)  # pure, and asked for at every launch
def _fwd_fallbacks(bm: int, bn: int, w: int, s: int) -> tuple:
    """The tuned forward config, then smaller ones to try when a launch runs out of shared memory or
    registers (a mask tile adds to the pipeline's buffers; sm_86/89 have 99 KB): the same tiles
    with fewer stages first (the stage buffers are most of the shared memory), then the key and
    the query block halved in turn (K/V stages scale with BLOCK_N, the Q tile with BLOCK_M).
    Keeps BLOCK_M % BLOCK_N == 0."""
    out = []
    while True:
        out += [(bm, bn, w, st) for st in range(s, 0, -1)]
        if bm > 16 and (bm >= 2 * bn or bn == 16):
            bm //= 2
        elif bn > 16:
            bn //= 2
        else:
            return tuple(out)
        s, w = min(s, 2), min(w, 4)


@functools.lru_cache(maxsize=None)
def _bwd_fallbacks(m1: int, n1: int, m2: int, n2: int, w: int, s: int) -> tuple:
    """As _fwd_fallbacks for the backward: fewer stages, then the tall blocks (BLOCK_N1, BLOCK_M2)
    halved down to the thin ones, then all four halved. Keeps BLOCK_N1 % BLOCK_M1 == 0 and
    BLOCK_M2 % BLOCK_N2 == 0."""
    out = []
    while True:
        out += [(m1, n1, m2, n2, w, st) for st in range(s, 0, -1)]
        if n1 > m1 or m2 > n2:
            n1, m2 = max(m1, n1 // 2), max(n2, m2 // 2)
        elif m1 > 16 or n2 > 16:
            m1, n1, m2, n2 = max(16, m1 // 2), max(16, n1 // 2), max(16, m2 // 2), max(16, n2 // 2)
        else:
            return tuple(out)
        s, w = min(s, 2), min(w, 4)


def _fwd_configs(q: Tensor, has_rules: bool, has_docs: bool = False) -> tuple:
    """has_rules: a mask or dropout. Their tiles add to the key block's shared memory (the mask tile
    is pipelined with K and V) and registers (the RNG): at Hopper's BLOCK_N = 128, D = 128 a masked
    launch needs 256-288 KB (over the 227 KB limit) and dropout spills 56-560 bytes per thread; at
    BLOCK_N = 64 both fit with no spills (`python -m benchmarks.static`).
    has_docs: document ids add a masked key-block loop (the documents' lower edge); at 4 warps
    Ampere's D = 256 tile then spills 72 bytes per thread, at 8 warps nothing."""
    major = _gpu_major(q)
    if major is None:
        return (_INTERP_FWD,)
    key = (major, _d_bucket(q.shape[-1]))
    if _dot_precision(q.dtype) == "ieee":
        bm, bn, w, s = _FWD_IEEE[key]
    else:
        bm, bn, w, s = _FWD_CONFIGS[key]
        if q.dtype == torch.float32:  # TF32: twice the bytes per tile
            bn, s = max(16, bn // 2), min(s, 2)
    if has_rules:
        bn = min(bn, 64)
    if has_docs:
        w = max(w, 8)
    return _fwd_fallbacks(bm, bn, w, s)


def _bwd_configs(q: Tensor, has_docs: bool = False, grouped: bool = False) -> tuple:
    """has_docs: document ids add a third query-block loop (the documents' upper edge) to the dK/dV
    kernel, and at 4 warps ptxas then spills 216 bytes per thread (bf16 D = 64 on sm_90; IEEE fp32
    D = 128 at 8 warps likewise): 8 warps, and IEEE fp32 a halved key block, spill nothing
    (`python -m benchmarks.static --only docs`).
    grouped: GQA/MQA (H_q > H_kv). The dK/dV kernel then runs its query-block loops inside a loop
    over the group's heads (with one head Triton specialises GROUP = 1 and the outer loop goes), and
    the nest holds more registers: bf16 causal on sm_90 spills 472 bytes per thread at D = 64 with
    4 warps, 120 at D = 128 with 8 warps and 5 stages (32 with 4 stages); sm_80 D = 128 at 4 warps
    32. 8 warps, and 3 stages for Hopper's D = 128, spill nothing (`--only gqa`)."""
    major = _gpu_major(q)
    if major is None:
        return (_INTERP_BWD,)
    key = (major, _d_bucket(q.shape[-1]))
    if _dot_precision(q.dtype) == "ieee":
        m1, n1, m2, n2, w, s = _BWD_IEEE[key]
        if has_docs:
            n1 = max(m1, n1 // 2)
        return _bwd_fallbacks(m1, n1, m2, n2, w, s)
    m1, n1, m2, n2, w, s = _BWD_CONFIGS[key]
    if q.dtype == torch.float32:  # TF32: twice the bytes per tile
        n1, m2, s = max(m1, n1 // 2), max(n2, m2 // 2), min(s, 2)
        if grouped and major >= 9:  # the head loop: sm_90 D = 128 spills 312 bytes at BLOCK_M1 = 32, 56 at 16
            m1 = max(16, m1 // 2)  # (halving BLOCK_N1 instead spills none, but drops wgmma for mma.sync)
    if has_docs or grouped:
        w = max(w, 8)
    if grouped and major >= 9 and _d_bucket(q.shape[-1]) >= 128:
        s = min(s, 3)
    return _bwd_fallbacks(m1, n1, m2, n2, w, s)


# launch key -> index of the first config in its chain that fit, so that a launch whose tuned
# config does not fit pays the failed compiles and the OutOfResources once, not at every call
_FIRST_FIT: dict = {}


def _launch_first_fit(key: tuple, configs: tuple, launch) -> None:
    """launch(*config) with the first config of the chain (from the remembered one on) that does not
    run out of shared memory or registers; any other error propagates."""
    err = None
    for cfg in configs[_FIRST_FIT.get(key, 0):]:
        try:
            launch(*cfg)
        except Exception as e:  # noqa: BLE001 — retried with the next, smaller config
            if not _out_of_resources(e):
                raise
            err = e
            continue
        if cfg != configs[0]:
            _FIRST_FIT[key] = configs.index(cfg)
        return
    raise err


def _out_of_resources(err: Exception) -> bool:
    return type(err).__name__ == "OutOfResources"


def _tf32_allowed() -> bool:
    """PyTorch's switch for TF32 in fp32 matmuls. torch >= 2.9's `matmul.fp32_precision` reflects
    both APIs (the legacy `allow_tf32` and `set_float32_matmul_precision` set it too), while reading
    the legacy flag after the new API was used raises a RuntimeError (torch 2.11, 2.13)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows PyTorch's matmul flag; half types always run native tensor-core dots
    if dtype == torch.float32 and not _tf32_allowed():
        return "ieee"
    return "tf32"


def _upcast(q: Tensor) -> bool:
    return q.dtype == torch.bfloat16 and _gpu_major(q) is None  # see _dot: interpreter-only workaround


def _block_d(D: int) -> int:
    return max(16, _grid.next_power_of_2(D))  # tl.dot needs every dim >= 16


def _mask_args(mask: Optional[Tensor], q: Tensor):
    """(pointer tensor, strides, HAS_MASK, MASK_BOOL) for an optional (B, Hq, Tq, Tk) mask view."""
    if mask is None:
        return q, (0, 0, 0, 0), False, False  # q is a dummy pointer, never read
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), True, True  # same bytes, loadable as u8
    return mask, mask.stride(), True, False


def _seed_value(seed: Optional[Tensor], dropout_p: float) -> int:
    return int(seed.item()) if dropout_p > 0.0 else 0


def _keep_scale(dropout_p: float) -> float:
    """1 / (1 - p), the kept probabilities' scale; 0 when p = 1 (everything dropped: output and
    gradients 0, as in SDPA, instead of 0 * inf)."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0


def _window_args(Tq: int, Tk: int, is_causal: bool, window_left: int, window_right: int):
    """The kernels' window: (win_l, win_r, WIN_LEFT, WIN_RIGHT); query i sees keys i - win_l (when
    WIN_LEFT) .. i + win_r (when WIN_RIGHT); causality is the right side at 0. Each flag compiles a
    side in: without a window the kernels are the causal / full ones they always were."""
    window_left, window_right = _effective_window(Tq, Tk, window_left, window_right)
    win_left = window_left >= 0
    win_right = bool(is_causal) or window_right >= 0
    win_l = window_left if win_left else 0
    win_r = 0 if is_causal else max(window_right, 0)
    return win_l, win_r, win_left, win_right


def _effective_window(Tq: int, Tk: int, window_left: int, window_right: int) -> tuple[int, int]:
    """A side that reaches past every key (left >= Tq - 1: every query's window starts at or before
    key 0; right >= Tk - 1: ends at or after the last) is no bound: -1. Exactly equivalent, so the
    kernels' int32 bound arithmetic never sees a huge window (2**31 - 1 as "unbounded" overflowed)
    and such a call runs the kernels without window tests."""
    return (-1 if window_left >= max(Tq - 1, 0) else window_left,
            -1 if window_right >= max(Tk - 1, 0) else window_right)


def _softcap_args(scale: float, softcap: float):
    """(qk_scale, cap2) of the kernels' _scores. A cap at or above SOFTCAP_OFF is off (attention()
    already makes it 0): softcap * tanh(x / softcap) = x to fp32 precision there, and fp32 would
    overflow softcap * log2(e) or flush scale / softcap to zero."""
    if 0.0 < softcap < SOFTCAP_OFF:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _doc_args(q_doc, k_doc, q, rows_are_queries: bool):
    """(q_doc, k_doc, ranges, HAS_DOCS) for a launch: the granules' column ranges of the program's
    rows (queries, or keys for dK/dV); dummy pointers without documents."""
    if q_doc is None:
        return q, q, q, False
    rows, cols = (q_doc, k_doc) if rows_are_queries else (k_doc, q_doc)
    return q_doc, k_doc, _documents.ranges(rows, cols), True


def _like_layout(x: Tensor) -> Tensor:
    """An empty (B, H, T, D) tensor like x, for an output or a gradient of the kernels: (B, T, H, D)
    memory, seen through .transpose(1, 2), when x's heads are inner to its time steps, else (B, H, T, D)
    contiguous. The usual q = proj(x).view(B, T, H, D).transpose(1, 2) gives the first, and the
    caller's out.transpose(1, 2).reshape(B, T, H * D) is then a view, not a copy of B*T*H*D elements
    (nanoGPT's, this package's model, the HF and flash_api wrappers, varlen's packed rows); the
    gradients the same way for the projection's backward. SDPA's flash backend does the same. One
    comparison of two strides, so the fake implementations (torch.compile), the Triton host code and
    the CUDA glue (csrc/ops.cpp, like_layout) agree on it exactly."""
    B, H, T, D = x.shape
    if x.stride(1) < x.stride(2):
        return x.new_empty((B, T, H, D)).transpose(1, 2)
    return x.new_empty((B, H, T, D))


def _triton_fwd(q, k, v, mask, q_doc, k_doc, dropout_p, seed, is_causal, scale, window_left, window_right, softcap):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = _like_layout(q)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        lse.fill_(float("inf"))
        return o, lse
    if Tk == 0:  # no keys: every row fully masked
        o.zero_()
        lse.fill_(float("inf"))
        return o, lse
    m_ptr, m_str, has_mask, mask_bool = _mask_args(mask, q)
    has_dropout = dropout_p > 0.0
    win_l, win_r, win_left, win_right = _window_args(Tq, Tk, is_causal, window_left, window_right)
    qk_scale, cap2 = _softcap_args(float(scale), float(softcap))
    qd, kd, ranges, has_docs = _doc_args(q_doc, k_doc, q, True)
    # a row may have seen no key when a block starts (running max -inf): only with a lower window
    # edge, a mask or documents
    may_empty = has_mask or win_left or has_docs
    key = ("fwd", q.device, q.dtype, D, has_mask, mask_bool, has_dropout, win_left, win_right, bool(is_causal), softcap > 0.0,
           has_docs, _dot_precision(q.dtype))

    def launch(bm, bn, warps, stages):
        _attn_fwd[(_grid.cdiv(Tq, bm), B * Hq)](
            q, k, v, m_ptr, qd, kd, ranges, o, lse,
            _seed_value(seed, dropout_p), float(dropout_p), _keep_scale(dropout_p), qk_scale, cap2,
            *q.stride(), *k.stride(), *v.stride(), *m_str, *o.stride()[:3],
            B, Hq, Tq, Tk, D, Hq // Hkv, win_l, win_r,
            WIN_LEFT=win_left, WIN_RIGHT=win_right, CAUSAL=bool(is_causal), SOFTCAP=softcap > 0.0, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
            MAY_EMPTY=may_empty,
            HAS_DROPOUT=has_dropout, HAS_DOCS=has_docs,
            EVEN_M=Tq % bm == 0, EVEN_D=D == _block_d(D),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_upcast(q),
            num_warps=warps, num_stages=stages)

    _launch_first_fit(key, _fwd_configs(q, has_mask or has_dropout, has_docs), launch)
    return o, lse


def _triton_bwd(dout, q, k, v, mask, q_doc, k_doc, out, lse, dlse, dropout_p, seed, is_causal, scale, window_left,
                window_right, softcap, mask_grad):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = _like_layout(q), _like_layout(k), _like_layout(v)
    # dS is zero on the tiles the causal kernels skip, so the buffer starts at zero
    dmask = (torch.zeros((B, Hq, Tq, Tk), dtype=torch.float32, device=q.device) if mask_grad
             else torch.empty((0,), dtype=torch.float32, device=q.device))
    if B * Hq * Tq == 0 or Tk == 0 or D == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    m_ptr, m_str, has_mask, mask_bool = _mask_args(mask, q)
    dm_ptr = dmask if mask_grad else q  # dummy pointer when unused
    has_dropout = dropout_p > 0.0
    seed_v = _seed_value(seed, dropout_p)
    BD = _block_d(D)
    prec = _dot_precision(q.dtype)
    delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    pre_m = 16 if _gpu_major(q) is None else 64
    _attn_bwd_preprocess[(_grid.cdiv(Tq, pre_m), B * Hq)](
        out, dout, delta, *out.stride(), *dout.stride(), Hq, Tq, D, BLOCK_M=pre_m, BLOCK_D=BD)
    if dlse is not None:  # lse was used too: dS = P (dP - delta) + P dlse = P (dP - (delta - dlse))
        delta -= dlse
    win_l, win_r, win_left, win_right = _window_args(Tq, Tk, is_causal, window_left, window_right)
    qk_scale, cap2 = _softcap_args(float(scale), float(softcap))
    qd, kd, q_ranges, has_docs = _doc_args(q_doc, k_doc, q, True)
    k_ranges = _doc_args(q_doc, k_doc, q, False)[2]
    common = dict(WIN_LEFT=win_left, WIN_RIGHT=win_right, CAUSAL=bool(is_causal), SOFTCAP=softcap > 0.0, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
                  HAS_DROPOUT=has_dropout, HAS_DOCS=has_docs, EVEN_D=D == BD, BLOCK_D=BD, DOT_PRECISION=prec,
                  UPCAST=_upcast(q))
    rp_keep = _keep_scale(dropout_p)
    key = ("bwd", q.device, q.dtype, D, has_mask, mask_bool, has_dropout, win_left, win_right, bool(is_causal),
           softcap > 0.0, has_docs, prec, bool(mask_grad), Hq != Hkv)

    def launch(m1, n1, m2, n2, warps, stages):
        # a retry reruns both kernels: they overwrite dk, dv, dq and dmask, nothing accumulates
        _attn_bwd_dkdv[(_grid.cdiv(Tk, n1), B * Hkv)](
            q, k, v, m_ptr, qd, kd, k_ranges, dout, lse, delta, dk, dv, dm_ptr,
            seed_v, float(dropout_p), rp_keep, qk_scale, cap2, float(scale),
            *q.stride(), *k.stride(), *v.stride(), *m_str, *dout.stride(), *dk.stride()[:3], *dv.stride()[:3],
            B, Hq, Hkv, Tq, Tk, D, Hq // Hkv, win_l, win_r,
            MASK_GRAD=bool(mask_grad), EVEN_M=Tq % m1 == 0, EVEN_N=Tk % n1 == 0,
            BLOCK_M=m1, BLOCK_N=n1, num_warps=warps, num_stages=stages, **common)
        _attn_bwd_dq[(_grid.cdiv(Tq, m2), B * Hq)](
            q, k, v, m_ptr, qd, kd, dout, lse, delta, q_ranges, dq,
            seed_v, float(dropout_p), rp_keep, qk_scale, cap2, float(scale),
            *q.stride(), *k.stride(), *v.stride(), *m_str, *dout.stride(), *dq.stride()[:3],
            B, Hq, Tq, Tk, D, Hq // Hkv, win_l, win_r,
            EVEN_M=Tq % m2 == 0, BLOCK_M=m2, BLOCK_N=n2, num_warps=warps, num_stages=stages, **common)

    _launch_first_fit(key, _bwd_configs(q, has_docs, Hq != Hkv), launch)
    return dq, dk, dv, dmask


def _dropout_mask(seed: int, B: int, H: int, Tq: int, Tk: int, dropout_p: float, device="cpu") -> Tensor:
    """The keep mask (B, H, Tq, Tk) bool that the kernels apply for `seed` (tests replay it): the RNG
    offset of (b, h, i, j), ((b * H + h) * Tq + i) * Tk + j, is the element's index in that layout."""
    return _dropout_keep_at(seed, 0, B * H * Tq * Tk, dropout_p, device).view(B, H, Tq, Tk)


def _dropout_keep_at(seed: int, base: int, n: int, dropout_p: float, device="cpu") -> Tensor:
    """The keep decisions (n,) bool at RNG offsets base .. base + n - 1 (tests pin the stream with it)."""
    out = torch.empty(n, dtype=torch.int8, device=device)
    if n:
        _dropout_keep_kernel[(_grid.cdiv(n, 64),)](out, int(seed), int(base), float(dropout_p), n, BLOCK=64)
    return out.bool()


def _draw_seed() -> Tensor:
    """The dropout seed for one call, from torch's default CPU generator (torch.manual_seed)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def _cuda_fwd(q, k, v, mask, q_doc, k_doc, dropout_p, seed, is_causal, scale, window_left, window_right, softcap):
    return _cuda_ext.ops().attention_fwd(q, k, v, mask, q_doc, k_doc, dropout_p, seed, is_causal, scale, window_left,
                                         window_right, softcap)


def _cuda_bwd(dout, q, k, v, mask, q_doc, k_doc, out, lse, dlse, dropout_p, seed, is_causal, scale, window_left,
              window_right, softcap, mask_grad):
    return _cuda_ext.ops().attention_bwd(dout, q, k, v, mask, q_doc, k_doc, out, lse, dlse, dropout_p, seed, is_causal,
                                         scale, window_left, window_right, softcap, mask_grad)


# ----------------------------------------------------------------------------------------------
# registration and autograd
# ----------------------------------------------------------------------------------------------

def _stride_exact_op(name: str):
    """torch.library.custom_op (with `_eager.op`'s eager shortcut) for an op whose results' strides
    follow its inputs' (_like_layout): tagged so that Inductor hands it inputs with exactly the
    strides it was traced with (by default it may pick other layouts for a custom op's inputs, and
    the fake implementation's predicted output strides would then be wrong at run time). needs_exact_strides where torch has it, else
    needs_fixed_stride_order (the same stride order, which is all _like_layout compares)."""
    tag = getattr(torch.Tag, "needs_exact_strides", None) or getattr(torch.Tag, "needs_fixed_stride_order", None)
    if tag is not None and "tags" in inspect.signature(torch.library.custom_op).parameters:
        return _eager.op(name, tags=(tag,))
    return _eager.op(name)


@_stride_exact_op("tfkernels::attention_fwd")
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], q_doc: Optional[Tensor],
                  k_doc: Optional[Tensor], dropout_p: float, seed: Optional[Tensor], is_causal: bool, scale: float,
                  window_left: int, window_right: int, softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    """-> out (B, Hq, Tq, D) in q's layout (_like_layout), lse (B, Hq, Tq) fp32 contiguous (see the module
    docstring)."""
    # attention() checks softcap in eager; under torch.compile it may not (a symbolic float), so the
    # value the op runs with is checked here, where it is concrete
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"attention: softcap must be a finite float >= 0 (0 = off), got {softcap}")
    return _backend.run("attention", backend, _triton_fwd, _cuda_fwd, q, k, v, mask, q_doc, k_doc, dropout_p, seed,
                        is_causal, scale, window_left, window_right, softcap if softcap < SOFTCAP_OFF else 0.0)


@attention_fwd.register_fake
def _(q, k, v, mask, q_doc, k_doc, dropout_p, seed, is_causal, scale, window_left, window_right, softcap, backend):
    B, Hq, Tq, D = q.shape
    return _like_layout(q), q.new_empty((B, Hq, Tq), dtype=torch.float32)


@_stride_exact_op("tfkernels::attention_bwd")
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], q_doc: Optional[Tensor],
                  k_doc: Optional[Tensor], out: Tensor, lse: Tensor, dlse: Optional[Tensor], dropout_p: float,
                  seed: Optional[Tensor], is_causal: bool, scale: float, window_left: int, window_right: int,
                  softcap: float, mask_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv in q's, k's and v's layouts (_like_layout), dmask ((B, Hq, Tq, Tk) fp32 contiguous when
    mask_grad, else empty)."""
    if dlse is not None:  # a fully masked row has lse = inf and P = 0: its dlse must not make 0 * inf
        dlse = torch.where(torch.isinf(lse), 0.0, dlse.to(torch.float32))  # a new, contiguous tensor
    return _backend.run("attention", backend, _triton_bwd, _cuda_bwd, dout, q, k, v, mask, q_doc, k_doc, out, lse,
                        dlse, dropout_p, seed, is_causal, scale, window_left, window_right, softcap, mask_grad)


@attention_bwd.register_fake
def _(dout, q, k, v, mask, q_doc, k_doc, out, lse, dlse, dropout_p, seed, is_causal, scale, window_left, window_right,
      softcap, mask_grad, backend):
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    dmask = (q.new_empty((B, Hq, Tq, Tk), dtype=torch.float32) if mask_grad
             else q.new_empty((0,), dtype=torch.float32))
    return _like_layout(q), _like_layout(k), _like_layout(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, q_doc, k_doc, dropout_p, seed, is_causal, scale, window_left, window_right, softcap, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, q_doc, k_doc, out, lse, seed)
    ctx.args = (dropout_p, is_causal, scale, window_left, window_right, softcap, backend)
    # an unused output's gradient comes as None, not zeros: lse is unused unless return_lse=True,
    # and then the backward skips the dlse work altogether
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, mask, q_doc, k_doc, out, lse, seed = ctx.saved_tensors
    dropout_p, is_causal, scale, window_left, window_right, softcap, backend = ctx.args
    nones = (None,) * 8  # dropout_p, seed, is_causal, scale, window_left, window_right, softcap, backend
    if dout is None:  # only lse was used (autograd passes None or zeros for an unused output)
        dout = torch.zeros_like(out)
    if _backend.differentiable_backward():  # create_graph=True: through the reference's autograd
        return (*_reference_backward(ctx, dout, dlse), None, None, *nones)
    mask_grad = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dmask = attention_bwd(dout, q, k, v, mask, q_doc, k_doc, out, lse, dlse, dropout_p, seed, is_causal,
                                      scale, window_left, window_right, softcap, mask_grad, backend)
    dmask = dmask.to(mask.dtype) if mask_grad else None
    return dq, dk, dv, dmask, None, None, *nones  # no gradient for the document ids


def _reference_backward(ctx, dout, dlse=None):
    """dq, dk, dv, dmask through the reference's autograd, differentiable (double backward). It
    stores the (B, H, T_q, T_k) probabilities, as the reference does; dropout replays the kernels'
    keep mask for the call's seed (drawn by the Triton kernel that defines the stream)."""
    q, k, v, mask, q_doc, k_doc, out, lse, seed = ctx.saved_tensors
    dropout_p, is_causal, scale, window_left, window_right, softcap, _ = ctx.args
    B, Hq, Tq, _ = q.shape
    keep = None
    if 0.0 < dropout_p < 1.0:
        if not _backend.triton_available():
            raise NotImplementedError("attention: a double backward with dropout replays the dropout mask with the "
                                      "Triton kernel that defines it, and Triton is not installed")
        keep = _dropout_mask(int(seed.item()), B, Hq, Tq, k.shape[2], dropout_p, device=q.device)

    def fn(q, k, v, mask):
        out, lse = reference.attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                       scale=scale, enable_gqa=k.shape[1] != Hq, dropout_mask=keep,
                                       window_size=(window_left, window_right), softcap=softcap, return_lse=True,
                                       document_ids=None if q_doc is None else (q_doc, k_doc))
        # the op's lse is +inf where the reference's is -inf (no visible key): no gradient flows there
        return out if dlse is None else (out, torch.where(torch.isinf(lse), 0.0, lse))
    grad = dout if dlse is None else (dout, dlse.to(dout.dtype))  # the reference's lse is in q's dtype, as out
    return _backend.reference_vjp(fn, (q, k, v, mask), ctx.needs_input_grad[:4], grad)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------

def _fold_to_4d(q, k, v, attn_mask):
    """SDPA's layouts, (N, ..., H, T, D) with any number of leading dims or (N, T, D), as the kernels'
    (B, H, T, D) views; the mask as a view that broadcasts to them. Returns the unfolded q's leading
    shape, for the output. Three dims: the first is the head dim, as SDPA's enable_gqa reads it."""
    for name, t in (("q", q), ("k", k), ("v", v)):  # tensors: attention() checked them first
        if t.dim() < 3 or t.dim() != q.dim():
            raise ValueError(f"attention: q, k and v must be 4-D (B, H, T, D), or like SDPA (N, ..., H, T, D) or (N, T, D) "
                             f"with the same number of dims; {name} has shape {list(t.shape)}")
    lead = q.shape[:-3]
    if q.dim() == 4:
        return q, k, v, attn_mask, None
    for name, t in (("k", k), ("v", v)):
        if t.shape[:-3] != lead:
            raise ValueError(f"attention: the leading dims of {name} {list(t.shape)} and q {list(q.shape)} differ")
    if attn_mask is not None:
        _validate.check_tensor(attn_mask, "attn_mask")
        target = (*lead, q.shape[-3], q.shape[-2], k.shape[-2])
        try:
            attn_mask = attn_mask.expand(target)  # a stride-0 view where the mask broadcasts
        except RuntimeError:
            raise ValueError(f"attention: attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                             f"{list(target)}") from None
        attn_mask = attn_mask.reshape(-1, *target[-3:])  # a view unless broadcast dims must merge
    fold = lambda t: t.reshape(-1, *t.shape[-3:])  # noqa: E731
    return fold(q), fold(k), fold(v), attn_mask, lead


def _check_args(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
    if attn_mask is not None:
        _validate.check_tensor(attn_mask, "attn_mask")
    _validate.check_same_device(q, "q", k=k, v=v, attn_mask=attn_mask)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"attention: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:  # (v's alone is padded before this)
        raise ValueError(f"attention: head dims differ: q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}; "
                         "q's and k's must be equal")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k {list(k.shape)} and v {list(v.shape)} must have the same heads and length")
    if q.shape[-1] == 0:
        raise ValueError("attention: head dim D must be at least 1")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq != Hkv:
        if not enable_gqa and Hkv != 1:  # one K/V head broadcasts over q's, as in SDPA
            raise ValueError(f"attention: q has {Hq} heads but k/v have {Hkv}; pass enable_gqa=True for GQA/MQA")
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(f"attention: with enable_gqa, q's heads ({Hq}) must be a multiple of k/v's heads ({Hkv})")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"attention: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1], got {dropout_p}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    # the backends would disagree on what NaN/inf give; not while torch.compile traces, where a
    # dynamic float is symbolic (HF passes scaling= as a float) and math.isfinite cannot be traced
    if scale is not None and not torch.compiler.is_compiling() and not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attention: attn_mask must be bool or floating point, got {attn_mask.dtype}")
        target = (q.shape[0], Hq, q.shape[2], k.shape[2])
        try:
            ok = attn_mask.dim() <= 4 and tuple(torch.broadcast_shapes(attn_mask.shape, target)) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attention: attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                             f"(B, H_q, T_q, T_k) = {list(target)}")


def _check_window(window_size, op: str = "attention") -> tuple[int, int]:
    """window_size as (left, right) ints, -1 = unbounded; FlashAttention's convention. op: the public
    function the errors name."""
    if window_size is None:
        return -1, -1
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    if ok:
        ok = all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)
    if not ok:
        raise TypeError(f"{op}: window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"{op}: window_size sides must be >= 0, or -1 for unbounded; got {window_size!r}")
    return left, right


def _check_softcap(softcap, op: str = "attention") -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{op}: softcap must be a float, got {type(softcap).__name__}")
    if torch.compiler.is_compiling():  # may be symbolic (see scale): the op checks the value it runs with
        return softcap
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"{op}: softcap must be a finite float >= 0 (0 = off), got {softcap}")
    return softcap if softcap < SOFTCAP_OFF else 0.0


def _value_dim_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap,
                         return_lse, document_ids, backend):
    """v's head dim Ev differs from q's and k's E, as SDPA allows (DeepSeek's MLA: E = 192, Ev = 128).
    The kernels take one head dim, so the smaller side is padded with zeros up to max(E, Ev): zero
    columns of q and k add nothing to the scores; zero columns of v give output columns that are
    sliced off, and the pads' backward drops their gradients. The scale stays 1/sqrt(E). The padded
    columns cost their share of the work (Ev = 128 under E = 192: the P @ V products and the output
    are 1.5x what they need to be)."""
    E, Ev = q.shape[-1], v.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    if Ev < E:
        v = torch.nn.functional.pad(v, (0, E - Ev))
    else:
        q, k = (torch.nn.functional.pad(t, (0, Ev - E)) for t in (q, k))
    res = attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size=window_size,
                    softcap=softcap, return_lse=return_lse, document_ids=document_ids, backend=backend)
    out, lse = res if return_lse else (res, None)
    if Ev < E:  # one copy to a dense output, keeping the kernels' order of heads and time (_like_layout)
        out = out[..., :Ev]
        out = (out.transpose(-3, -2).contiguous().transpose(-3, -2) if out.stride(-3) < out.stride(-2)
               else out.contiguous())
    return (out, lse) if return_lse else out


def _causal_bias_attention(q, k, v, bias, dropout_p, is_causal, scale, enable_gqa, window_size, softcap, return_lse,
                           document_ids, backend):
    """attn_mask=torch.nn.attention.bias.causal_upper_left(T_q, T_k) or causal_lower_right(T_q, T_k),
    as SDPA takes them. A CausalBias is a tensor subclass that only SDPA understands: any other op on
    it returns an unusable object, so it must be turned into the kernels' own arguments, never read.

    Upper left is is_causal. Lower right puts the diagonal at the last query and the last key (query i
    sees keys 0 .. i + T_k - T_q: a decoding step over a KV cache, a chunk of a chunked prefill): for
    T_q <= T_k that is the window's right side at T_k - T_q, which the kernels skip tiles for. For
    T_q > T_k the first T_q - T_k queries see no key and return zeros, like any row with nothing to
    attend to here (torch warns that SDPA may give NaN there); the rest are causal, top-left, over
    the last T_k queries. A window_size is combined by AND, in the query's own (top-left) coordinates."""
    if is_causal:
        raise ValueError("attention: attn_mask is a CausalBias, which is the causal mask already; "
                         "is_causal must be False (as in SDPA)")
    Tq, Tk = q.shape[-2], k.shape[-2]
    if (bias.seq_len_q, bias.seq_len_kv) != (Tq, Tk):
        raise ValueError(f"attention: attn_mask is a CausalBias for T_q={bias.seq_len_q}, T_k={bias.seq_len_kv}, "
                         f"but q and k have lengths T_q={Tq}, T_k={Tk}")
    left, right = _check_window(window_size)
    kw = dict(dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa, softcap=softcap, return_lse=return_lse,
              document_ids=document_ids, backend=backend)
    if bias.variant == CausalVariant.UPPER_LEFT or Tq == Tk:
        return attention(q, k, v, None, is_causal=True, window_size=(left, right), **kw)
    if Tq < Tk:
        shift = Tk - Tq
        return attention(q, k, v, None, window_size=(left, shift if right == -1 else min(right, shift)), **kw)
    # query i = s + i' (s = T_q - T_k) sees keys j <= i' and, in the window, j >= i - left = i' - (left - s)
    s = Tq - Tk
    mask = None
    if left != -1:
        left -= s
        if left < 0:  # the window ends before the first key each query may see: nothing is visible
            left, mask = -1, torch.zeros((), dtype=torch.bool, device=q.device)
    if document_ids is not None:  # a pair (T_q != T_k): the queries' ids sliced with them
        _documents.check_document_ids(document_ids, q.shape[:-3], Tq, Tk, q)  # raises, naming the argument
        kw["document_ids"] = (document_ids[0][..., s:], document_ids[1])
    tail = attention(q[..., s:, :], k, v, mask, is_causal=True, window_size=(left, -1), **kw)
    if return_lse:
        out, lse = tail
        return (torch.cat([out.new_zeros((*out.shape[:-2], s, out.shape[-1])), out], dim=-2),
                torch.cat([lse.new_full((*lse.shape[:-1], s), float("-inf")), lse], dim=-1))
    return torch.cat([tail.new_zeros((*tail.shape[:-2], s, tail.shape[-1])), tail], dim=-2)


def _broadcast_batch(q, k, v):
    """SDPA broadcasts the dims before (H, T, D) of q, k and v against one another (one K/V batch
    for many queries, say): the same here, as stride-0 views the kernels read in place (autograd
    sums the gradient of an expanded input)."""
    if q.dim() < 4 or not q.dim() == k.dim() == v.dim():
        return q, k, v  # three dims have no batch dims to broadcast; _fold_to_4d checks the rest
    if q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:  # the usual case: skip broadcast_shapes (~10 us a call)
        return q, k, v
    try:
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        return q, k, v  # _check_args names the mismatch
    return tuple(t if t.shape[:-3] == lead else t.expand(*lead, *t.shape[-3:]) for t in (q, k, v))


def _autocast(q, k, v):
    """Under torch.autocast, q, k and v in the autocast dtype, as SDPA takes them (it is on autocast's
    lower-precision list: fp32 inputs, or a mix of fp32 and bf16, are cast; float64 is not). The
    float mask keeps its dtype: the kernels read it in fp32 anyway."""
    device = q.device.type
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (q, k, v))


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
              window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0, return_lse: bool = False,
              document_ids=None, backend: Optional[str] = None):
    """Scaled dot-product attention with the signature and semantics of
    `torch.nn.functional.scaled_dot_product_attention`; FlashAttention-2 kernels in Triton.

    q (B, H_q, T_q, D), k and v (B, H_kv, T_k, D) -> (B, H_q, T_q, D). H_q == H_kv, or H_kv == 1, or
    with `enable_gqa=True` H_q a multiple of H_kv (query head h uses K/V head h // (H_q // H_kv)).
    Batch sizes broadcast, as in SDPA (a K/V batch of 1 serves every query batch).
    As in SDPA, more leading dims (N, ..., H, T, D) or three, (N, T, D), are taken too: they are
    folded into B (as views where the strides allow).
    D <= 256, the same for q and k; v's may differ, as in SDPA (the kernels then run the larger,
    zero-padded: see `_value_dim_attention`). float16, bfloat16 or float32 (fp32 dots use TF32 when
    `torch.backends.cuda.matmul.allow_tf32`).

    is_causal: top-left lower-triangular mask, also for T_q != T_k (row i sees keys 0..i)::

        T_q=3, T_k=5:   1 0 0 0 0
                        1 1 0 0 0
                        1 1 1 0 0

    attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
    (B, H_q, T_q, T_k), e.g. a key-padding mask (B, 1, 1, T_k) or a bias (1, H, T_q, T_k); never
    expanded in memory. It may be combined with is_causal (SDPA does not allow that). A float mask
    that requires grad receives its gradient (this costs a (B, H_q, T_q, T_k) fp32 buffer).
    A query row with every key masked returns zeros (SDPA's math backend gives NaN).

    dropout_p: applied to the attention probabilities (always, as in SDPA: pass 0.0 in eval); the
    seed comes from torch's generator, so `torch.manual_seed` makes a call reproducible. 1.0 drops
    everything (output and gradients 0, as in SDPA).
    scale: defaults to 1/sqrt(D).

    Beyond SDPA, FlashAttention's two extensions (keyword-only):

    window_size=(left, right): local (sliding-window) attention, query i sees keys
    i - left .. i + right; -1 leaves a side unbounded. Aligned top-left like is_causal (query i's
    diagonal is key i, also when T_q != T_k), and combined with is_causal and attn_mask by AND:
    Mistral's window W is `is_causal=True, window_size=(W - 1, 0)`. Key blocks outside the window
    are skipped, so the cost grows with T * window, not T^2. A query with no key in its window
    returns 0, like a fully masked row.

    softcap: logit soft-capping (Gemma 2, Grok): the scores become
    softcap * tanh(scale * q.k / softcap) before attn_mask is added; 0 (default) turns it off.

    attn_mask may also be SDPA's `torch.nn.attention.bias.causal_upper_left(T_q, T_k)` (the same as
    is_causal) or `causal_lower_right(T_q, T_k)`: the diagonal aligned to the last query and key,
    query i sees keys 0 .. i + T_k - T_q (a decoding step over a KV cache, a chunked prefill); run
    as a window, with its tile skipping. For T_q > T_k its first T_q - T_k queries see no key and
    return 0.

    return_lse=True returns (out, lse): lse (B, H_q, T_q) float32 (float64 for float64 inputs), the
    natural-log log-sum-exp of each row's scaled, capped and masked scores before dropout, -inf for
    a row with no visible key. It is differentiable (d lse / d scores = the probabilities), so
    attention over several key chunks can be merged exactly, gradients included:
    out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i(lse_i) (ring / split-KV attention).

    document_ids: packed sequences (several documents per row, as pretraining packs them): an
    integer tensor (..., T) of per-token document ids for queries and keys (T_q == T_k), or a pair
    (q_ids (..., T_q), k_ids (..., T_k)); the leading dims are q's batch dims (before H), or absent
    to share one layout across the batch. Query i sees key j only if their ids are equal, ANDed with
    is_causal, window_size and attn_mask: `is_causal=True` over a packed row is each document's own
    causal mask. A negative id is padding: it sees nothing and nothing sees it (its row returns 0).
    No (T, T) mask is built, and key blocks of other documents are skipped, so a row of documents of
    length L costs O(T * L). Ids sorted along T (packing order; padding anywhere) get exact block
    ranges; unsorted ids are correct but every block is then masked. int32 ids avoid a device sync
    (int64 ids are checked to fit int32).

    Nested tensors (layout=torch.jagged), as SDPA takes them: q (B, H_q, j, D), k and v
    (B, H_kv, j_k, D) with the sequence dim ragged, no attn_mask: each sequence is attended on its
    own (is_causal and window_size top-left per sequence), through `varlen_attention`'s packed path;
    the output is nested like q.

    backend: "triton", "cuda", "torch" or None (automatic).
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"attention: return_lse must be a bool, got {type(return_lse).__name__}")
    # numpy scalars (np.float32 from a config or an array) are Reals but not floats, which the
    # op's schema takes; a float is left as it is (under torch.compile it may be symbolic)
    if any(isinstance(t, Tensor) and t.is_nested for t in (q, k, v)):  # SDPA's jagged nested tensors
        from .varlen import jagged_attention  # (varlen imports this module)

        return jagged_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap,
                                return_lse, document_ids, backend)
    for name, t in (("q", q), ("k", k), ("v", v)):  # first: the steps below read their shapes
        _validate.check_tensor(t, name)
    if CausalBias is not None and isinstance(attn_mask, CausalBias):
        return _causal_bias_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                                      softcap, return_lse, document_ids, backend)
    if not isinstance(scale, (bool, int, float)) and isinstance(scale, numbers.Real):
        scale = float(scale)
    if not isinstance(dropout_p, (bool, int, float)) and isinstance(dropout_p, numbers.Real):
        dropout_p = float(dropout_p)
    if v.shape[-1] != q.shape[-1] and k.shape[-1] == q.shape[-1] and min(q.shape[-1], v.shape[-1]) > 0:
        return _value_dim_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap,
                                    return_lse, document_ids, backend)
    q, k, v = _broadcast_batch(*_autocast(q, k, v))
    q, k, v, attn_mask, lead = _fold_to_4d(q, k, v, attn_mask)
    docs = _documents.check_document_ids(document_ids, q.shape[:1] if lead is None else lead, q.shape[-2],
                                         k.shape[-2], q)  # (B, T) int32 pairs, B as folded
    if lead is not None:
        res = attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size=window_size,
                        softcap=softcap, return_lse=return_lse, document_ids=docs, backend=backend)
        if return_lse:
            return res[0].reshape(*lead, *res[0].shape[-3:]), res[1].reshape(*lead, *res[1].shape[-2:])
        return res.reshape(*lead, *res.shape[-3:])
    _check_args(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    window_left, window_right = _check_window(window_size)
    softcap = _check_softcap(softcap)
    D = q.shape[-1]
    unfit = f"head dim {D} exceeds the kernels' limit of {MAX_HEAD_DIM}" if D > MAX_HEAD_DIM else None
    be = _backend.resolve(backend, q, "attention", unfit, others=(k, v, attn_mask))
    _validate.check_float(q, "q", be)
    if be == "torch":
        res = reference.attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                  window_size=(window_left, window_right), softcap=softcap, return_lse=return_lse,
                                  document_ids=docs)
        return (res[0], res[1].to(torch.promote_types(q.dtype, torch.float32))) if return_lse else res
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    if unfit is not None:  # a kernel backend asked for by name
        raise ValueError(f"attention: head dim D={D} exceeds the kernels' limit of {MAX_HEAD_DIM} "
                         "(use backend='torch')")
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(B, Hq, Tq, Tk)  # a stride-0 view, not a copy
    scale_f = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    window_left, window_right = _effective_window(Tq, Tk, window_left, window_right)  # fits the op's int64
    seed = _draw_seed() if dropout_p > 0.0 else None
    q_doc, k_doc = (None, None) if docs is None else docs
    out, lse = attention_fwd(q, k, v, mask, q_doc, k_doc, dropout_p, seed, bool(is_causal), scale_f, window_left,
                             window_right, softcap, be)
    if return_lse:  # the kernels keep +inf for an empty row (their backward's P is then 0); log(0) is -inf
        return out, torch.where(lse == float("inf"), float("-inf"), lse)
    return out


# ----------------------------------------------------------------------------------------------
# quick benchmark (CUDA): python -c "from tfkernels.ops.attention import _bench; _bench()"
# (not `python -m`: that would execute this file twice and register the ops twice)
# ----------------------------------------------------------------------------------------------

def _bench(seq_lens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128), dtype=torch.bfloat16) -> None:
    """TFLOP/s of forward and backward, tfkernels vs SDPA's flash backend, at B*T = 16k tokens and
    H*D = 2048 (FLOPs 4*B*H*T^2*D forward, halved when causal; backward 2.5x forward)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  {dtype}")
    print(f"{'D':>4} {'T':>6} {'causal':>6} | {'fwd':>7} {'bwd':>7} (tfkernels) | {'fwd':>7} {'bwd':>7} (sdpa flash)")
    for D in head_dims:
        for T in seq_lens:
            B, H = max(1, 16384 // T), 2048 // D
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            for causal in (False, True):
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                row = []
                for fn in (lambda: attention(q, k, v, is_causal=causal, backend="triton"),
                           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        out = fn()
                        dout = torch.randn_like(out)
                        ms_f = do_bench(fn)
                        ms_b = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
                    row += [flops / ms_f * 1e-9, 2.5 * flops / ms_b * 1e-9]
                print(f"{D:>4} {T:>6} {str(causal):>6} | {row[0]:7.1f} {row[1]:7.1f}             | {row[2]:7.1f} {row[3]:7.1f}")
