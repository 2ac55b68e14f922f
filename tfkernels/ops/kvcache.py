"""`tfkernels.kvcache_attention`: attention of new queries against a KV cache, for decoding
(FlashAttention's `flash_attn_with_kvcache`), with split-KV ("flash-decoding") kernels.

Layout, FlashAttention's: q (B, T_q, H_q, D); the cache k_cache, v_cache (B_cache, S, H_kv, D), or
paged (num_pages, page_size, H_kv, D) with block_table (B, max_pages) int32: key j of batch row b
is at page block_table[b, j // page_size], slot j % page_size (vLLM's layout). cache_seqlens (B,)
(or an int): how many keys row b holds. New keys/values k, v (B, T_new, H_kv, D), when given, are
written into the cache in place at positions cache_seqlens[b] .. + T_new - 1 first (the caller
advances its own cache_seqlens, as with FlashAttention), and attended to with the cached ones.

Semantics: row b has L = cache_seqlens[b] (+ T_new) keys; query t sits at position L - T_q + t
(bottom-right, the new tokens are the last ones). causal: it sees keys j <= L - T_q + t; window
(left, right): keys L - T_q + t - left .. + right (-1 unbounded); softcap as in attention. A query
that sees no key returns 0 (lse -inf). GQA/MQA by head count; the cache's batch rows picked by
cache_batch_idx (B,) (not with a block_table). cache_leftpad (B,) (FlashAttention's): row b's keys
start at cache_leftpad[b], the slots before it are left padding (a batch of prompts of different
lengths, right-aligned): keys j < cache_leftpad[b] are never read. Positions stay the cache's
(query t at L - T_q + t, the window around it), as in FlashAttention.

Why a kernel of its own: the training kernel runs one program per (query block, b * H_q + h). At
decode, T_q is 1: B * H_q programs (12 for a batch-1 GPT-2 small; an H100 has 132 SMs), each
walking the whole cache alone, and a GQA group's H_q / H_kv heads each reading the same K/V. Here:
- a program takes one K/V head and all the query rows of its group: row r = t * GROUP + g (T_q *
  GROUP rows, at least 16 for tl.dot), so K/V is read once per group, not once per query head;
- the key range [lo, hi) of a program (the window's, or [0, L)) is cut into num_splits chunks, one
  program each (grid (row blocks, B * H_kv, splits)); each writes its rows' partial output and
  log-sum-exp in fp32, and `_kvcache_combine` merges them: out = sum_s w_s o_s with
  w_s = exp(lse_s - lse) and lse = logsumexp_s lse_s. With one split the kernel writes the output;
- paged caches are gathered per key (page id from the block table): any page size, no copy.

The split count (num_splits=0: `_auto_splits`) fills the GPU: about two programs per SM when
B * H_kv row blocks do not, with at least 256 keys per split (the combine's read is then small).

Eager calls read cache_seqlens (and the block table, cache_batch_idx) on the host once per tensor
and version to check them (the cache's capacity, the pages); an int cache_seqlens needs no read.
Under torch.compile and while a CUDA graph captures nothing is read (a captured decode step can be
replayed with cache_seqlens updated in place); the kernel clamps lengths to the capacity and page
ids to the pages, so that a bad value never reads outside the cache.

The "cuda" backend has the same kernels in CUDA C++ (csrc/kvcache.cu: 16 query rows a block, on
tensor cores for fp16/bf16 up to D = 128 and fp32 FMAs otherwise, the same split ranges and combine)
for up to CUDA_DECODE_ROWS query rows per K/V head; a longer T_q (chunked prefill) runs its
tensor-core attention on the gathered cache.

Backward: this op is for inference. A query or cache that requires grad (in grad mode) runs
`attention` on the gathered cache with the equivalent bool mask, which has autograd (so does the
"torch" backend, the reference).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _backend, _cuda_ext, _validate
from . import _eager, _grid
from .attention import (MAX_HEAD_DIM, _check_softcap, _check_window, _dot_precision,
                        _gpu_major, _launch_first_fit, _softcap_args, _upcast, attention)

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
else:
    from .attention import _block_d, _dot, _dot_acc, _scores

MIN_KEYS_PER_SPLIT = 256  # below this a split's partial-output write and the combine cost more than it hides
MAX_SPLITS = 128

if triton is not None:

    @triton.jit
    def _kvcache_fwd(Q, K, V, Seqlens, BlockTable, BatchIdx, LeftPad, O, LSE, OPart, LSEPart,
                     qk_scale, cap2,
                     stride_qb, stride_qt, stride_qh, stride_qd,
                     stride_kb, stride_ks, stride_kh, stride_kd,
                     stride_vb, stride_vs, stride_vh, stride_vd,
                     stride_tb, stride_tn,
                     stride_ob, stride_ot, stride_oh, stride_od,
                     B, Tq, Hq, Hkv, D, GROUP, CAP, N_PAGES, win_l, win_r, N_SPLITS,
                     WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                     PAGED: tl.constexpr, PAGE: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                     SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        bk = tl.program_id(1)
        split = tl.program_id(2)
        b = bk // Hkv
        hk = bk % Hkv
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # r = t * GROUP + g
        n_rows = Tq * GROUP
        row_ok = rows < n_rows
        t = rows // GROUP
        h = hk * GROUP + rows % GROUP
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        L = tl.minimum(tl.load(Seqlens + b), CAP)  # clamped: a length past the cache never reads past it
        pos = L - Tq + t  # the rows' key positions (bottom-right)
        # the block's key range: [0, L), narrowed by the window of its first and last rows, the lower
        # end rounded down to a key block (aligned tiles; the window test masks the extra keys), and
        # never below the left padding (whose slots may hold anything: they are not even loaded)
        lo = 0
        hi = L
        if WIN_LEFT:
            lo = tl.maximum(L - Tq + (pid_m * BLOCK_M) // GROUP - win_l, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        if HAS_LEFTPAD:
            lo = tl.maximum(lo, tl.minimum(tl.maximum(tl.load(LeftPad + b), 0), L))
        if WIN_RIGHT:
            last_t = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, n_rows - 1) // GROUP
            hi = tl.minimum(L - Tq + last_t + win_r + 1, L)
        n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
        per_split = tl.cdiv(n_blocks, N_SPLITS)
        start = lo + split * per_split * BLOCK_N
        end = tl.minimum(start + per_split * BLOCK_N, hi)

        q_ptrs = (Q + b.to(tl.int64) * stride_qb + t[:, None].to(tl.int64) * stride_qt
                  + h[:, None].to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_BATCH_IDX:
            cb = tl.load(BatchIdx + b).to(tl.int64)
        else:
            cb = b.to(tl.int64)
        K_h = K + hk.to(tl.int64) * stride_kh
        V_h = V + hk.to(tl.int64) * stride_vh

        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            if PAGED:  # gathered per key: any page size
                page = tl.load(BlockTable + b.to(tl.int64) * stride_tb + (offs_n // PAGE) * stride_tn, mask=n_ok, other=0)
                page = tl.minimum(tl.maximum(page, 0), N_PAGES - 1).to(tl.int64)  # never outside the pages
                k_row = page * stride_kb + (offs_n % PAGE).to(tl.int64) * stride_ks
                v_row = page * stride_vb + (offs_n % PAGE).to(tl.int64) * stride_vs
            else:
                k_row = cb * stride_kb + offs_n.to(tl.int64) * stride_ks
                v_row = cb * stride_vb + offs_n.to(tl.int64) * stride_vs
            kt = tl.load(K_h + k_row[None, :] + offs_d[:, None] * stride_kd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s, _t = _scores(_dot(q, kt, DOT_PRECISION, UPCAST), qk_scale, cap2, SOFTCAP)  # (BLOCK_M, BLOCK_N), base 2
            valid = n_ok[None, :]
            if WIN_RIGHT:
                valid = valid & (offs_n[None, :] <= pos[:, None] + win_r)
            if WIN_LEFT:
                valid = valid & (offs_n[None, :] >= pos[:, None] - win_l)
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row that has seen no key yet
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(V_h + v_row[:, None] + offs_d[None, :] * stride_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = _dot_acc(p.to(vt.dtype), vt, acc * alpha[:, None], DOT_PRECISION, UPCAST)
            m_i = m_new

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key: 0
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, -float("inf"))
        row_bh = (b * Hq + h).to(tl.int64) * Tq + t  # the (b, h, t) row of LSE (B, H_q, T_q)
        if SPLIT:  # partials (N_SPLITS, B, H_q, T_q, D) and (N_SPLITS, B, H_q, T_q), fp32
            part = split.to(tl.int64) * B * Hq * Tq + row_bh
            tl.store(OPart + part[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(LSEPart + part, lse, mask=row_ok)
        else:
            o_ptrs = (O + b.to(tl.int64) * stride_ob + t[:, None].to(tl.int64) * stride_ot
                      + h[:, None].to(tl.int64) * stride_oh + offs_d[None, :] * stride_od)
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            tl.store(LSE + row_bh, lse, mask=row_ok)

    @triton.jit
    def _kvcache_combine(OPart, LSEPart, O, LSE, n_rows, Tq, Hq, D, N_SPLITS,
                         stride_ob, stride_ot, stride_oh, stride_od,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per (b, h, t) row: the splits' partial outputs weighted by exp(lse_s - lse)."""
        row = tl.program_id(0).to(tl.int64)  # b * H_q * T_q + h * T_q + t
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < N_SPLITS
        lse_s = tl.load(LSEPart + offs_s.to(tl.int64) * n_rows + row, mask=s_ok, other=-float("inf"))
        m = tl.max(lse_s, 0)
        m_safe = tl.where(m == -float("inf"), 0.0, m)
        w = tl.math.exp2((lse_s - m_safe) * 1.4426950408889634)  # 0 for empty splits
        total = tl.sum(w, 0)
        o_s = tl.load(OPart + (offs_s.to(tl.int64) * n_rows + row)[:, None] * D + offs_d[None, :],
                      mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        out = tl.sum(o_s * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
        lse = tl.where(total > 0.0, m_safe + tl.math.log2(tl.where(total > 0.0, total, 1.0)) * 0.6931471805599453,
                       -float("inf"))
        t = row % Tq
        h = (row // Tq) % Hq
        b = row // (Tq * Hq)
        tl.store(O + b * stride_ob + t * stride_ot + h * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty),
                 mask=offs_d < D)
        tl.store(LSE + row, lse)


# ---------------------------------------------------------------------------------------------- configs

_INTERP_KV = (16, 16, 1, 1)  # BLOCK_M, BLOCK_N, warps, stages: the interpreter runs tiles as numpy arrays
# (GPU major, D bucket) -> (BLOCK_N, warps, stages). Memory-bound: wide key blocks, deep pipelines.
_KV_CONFIGS = {
    (9, 64): (128, 4, 3), (9, 128): (128, 4, 3), (9, 256): (64, 4, 2),
    (8, 64): (128, 4, 3), (8, 128): (64, 4, 3), (8, 256): (32, 4, 2),
}


def _kv_config(q: Tensor, rows: int) -> tuple:
    """(BLOCK_M, BLOCK_N, warps, stages) for T_q * GROUP query rows per K/V head."""
    major = _gpu_major(q)
    if major is None:
        return _INTERP_KV
    D = q.shape[-1]
    bucket = 64 if D <= 64 else (128 if D <= 128 else 256)
    bn, w, s = _KV_CONFIGS[(major, bucket)]
    if _dot_precision(q.dtype) == "ieee":  # FMA dots: at BLOCK_N = 64, 4 warps, D = 128 spills 568 B/thread
        bn, w = max(16, bn // 4), 8        # (sm_90); 32 keys and 8 warps spill none (`benchmarks.static`)
    elif q.dtype == torch.float32:         # TF32: twice the bytes per tile
        bn, s = max(16, bn // 2), 2
    bm = min(64, max(16, _grid.next_power_of_2(rows)))  # tl.dot's minimum is 16 rows
    return bm, bn, w, s


def _auto_splits(programs: int, key_blocks: int, sms: int) -> int:
    """Splits of the key range per program for `programs` (row block, K/V head) programs over
    `key_blocks` blocks of 128 keys on `sms` SMs: 1 when the programs fill the GPU (or no SM count,
    the interpreter), else about two programs per SM, each split at least MIN_KEYS_PER_SPLIT keys."""
    if sms <= 0 or programs >= sms:
        return 1
    most = max(1, key_blocks * 128 // MIN_KEYS_PER_SPLIT)
    return max(1, min(math.ceil(2 * sms / programs), most, MAX_SPLITS))


def _window_keys(cap: int, Tq: int, win_l: int, win_r: int, both_sides: bool) -> int:
    """Keys a program may visit, for the split count: the capacity, or a window bounded on both
    sides (T_q + left + right keys at most)."""
    return min(cap, Tq + win_l + win_r) if both_sides else cap


def _sm_count(x: Tensor) -> int:
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 0


# ---------------------------------------------------------------------------------------------- kernels

def _triton_fwd(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, scale, causal, window_left,
                window_right, softcap, num_splits):
    B, Tq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty((B, Tq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 1
    cap = block_table.shape[1] * page if paged else k_cache.shape[1]
    win_left = window_left >= 0
    win_right = causal or window_right >= 0
    win_l = max(window_left, 0)
    win_r = 0 if causal else max(window_right, 0)
    qk_scale, cap2 = _softcap_args(float(scale), float(softcap))
    bm, bn, warps, stages = _kv_config(q, Tq * group)
    if num_splits <= 0:
        keys = _window_keys(cap, Tq, win_l, win_r, win_left and win_right)
        num_splits = _auto_splits(_grid.cdiv(Tq * group, bm) * B * Hkv, _grid.cdiv(keys, 128), _sm_count(q))
    num_splits = max(1, min(num_splits, _grid.cdiv(max(cap, 1), bn)))  # never more splits than key blocks
    split = num_splits > 1
    o_part = lse_part = lse  # dummies when not split (never touched)
    if split:
        o_part = torch.empty((num_splits, B, Hq, Tq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, B, Hq, Tq), dtype=torch.float32, device=q.device)
    table = block_table if paged else seqlens
    idx = batch_idx if batch_idx is not None else seqlens
    pad = leftpad if leftpad is not None else seqlens
    n_pages = k_cache.shape[0]
    key = ("kvcache", q.device, q.dtype, D, page, paged, batch_idx is not None, leftpad is not None, win_left,
           win_right, softcap > 0.0, split, _dot_precision(q.dtype))

    def launch(bm, bn, warps, stages):
        _kvcache_fwd[(_grid.cdiv(Tq * group, bm), B * Hkv, num_splits)](
            q, k_cache, v_cache, seqlens, table, idx, pad, out, lse, o_part, lse_part, qk_scale, cap2,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *(table.stride() if paged else (0, 0)), *out.stride(),
            B, Tq, Hq, Hkv, D, group, cap, n_pages, win_l, win_r, num_splits,
            WIN_LEFT=win_left, WIN_RIGHT=win_right, SOFTCAP=softcap > 0.0, PAGED=paged, PAGE=page,
            HAS_BATCH_IDX=batch_idx is not None, HAS_LEFTPAD=leftpad is not None, SPLIT=split,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D),
            DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_upcast(q), num_warps=warps, num_stages=stages)

    _launch_first_fit(key, _kv_fallbacks(bm, bn, warps, stages), launch)
    if split:
        _kvcache_combine[(B * Hq * Tq,)](o_part, lse_part, out, lse, B * Hq * Tq, Tq, Hq, D, num_splits,
                                         *out.stride(), BLOCK_S=max(2, _grid.next_power_of_2(num_splits)),
                                         BLOCK_D=_grid.next_power_of_2(D), num_warps=4 if D >= 128 else 2)
    return out, lse


def _kv_fallbacks(bm: int, bn: int, warps: int, stages: int) -> tuple:
    """The config, then fewer stages, then half the key block (shared memory on sm_86/89)."""
    out = [(bm, bn, warps, s) for s in range(stages, 0, -1)]
    while bn > 16:
        bn //= 2
        out.append((bm, bn, warps, min(stages, 2)))
    return tuple(out)


def _gather_cache(cache: Tensor, block_table: Optional[Tensor], batch_idx: Optional[Tensor], B: int) -> Tensor:
    """The cache as dense (B, capacity, H_kv, D): the pages of each row in order, or the picked rows."""
    if block_table is not None:
        pages = cache[block_table.long()]                           # (B, max_pages, page, H_kv, D)
        return pages.flatten(1, 2)
    if batch_idx is not None:
        return cache[batch_idx.long()]
    return cache


def _held(seqlens: Tensor, leftpad: Optional[Tensor], S: int) -> Tensor:
    """(B, S) bool: slot j holds one of row b's keys (past the left padding, before the length)."""
    j = torch.arange(S, device=seqlens.device)
    keep = j < seqlens.long()[:, None]
    if leftpad is not None:
        keep = keep & (j >= leftpad.long()[:, None])
    return keep


def _visible(held: Tensor, seqlens: Tensor, Tq: int, causal: bool, window_left: int, window_right: int) -> Tensor:
    """(B, 1, T_q, S) bool: key j is one of row b's keys (held (B, S), `_held`) and in query t's
    causal/window range."""
    S = held.shape[1]
    j = torch.arange(S, device=seqlens.device)
    L = seqlens.long().clamp(max=S)[:, None, None]                   # (B, 1, 1)
    pos = L - Tq + torch.arange(Tq, device=seqlens.device)[None, :, None]  # (B, T_q, 1)
    keep = held[:, None, :]
    if causal:
        keep = keep & (j <= pos)
    if window_left >= 0:
        keep = keep & (j >= pos - window_left)
    if window_right >= 0:
        keep = keep & (j <= pos + window_right)
    return keep.unsqueeze(1)


def _composed(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, scale, causal, window_left, window_right,
              softcap, backend):
    """The op as `attention` on the gathered cache with a bool mask: the reference ("torch"), the
    "cuda" backend's path past CUDA_DECODE_ROWS, and the differentiable one. (out (B, T_q, H_q, D),
    lse (B, H_q, T_q) fp32)."""
    B, Tq, Hq, D = q.shape
    k = _gather_cache(k_cache, block_table, batch_idx, B)
    v = _gather_cache(v_cache, block_table, batch_idx, B)
    # the slots past a row's length (and the left padding) were never written (torch.empty: any bits,
    # NaN included), and a masked key still meets P = 0 in P @ V, where 0 * NaN = NaN: zero them (the
    # kernels never load them)
    held = _held(seqlens, leftpad, k.shape[1])                      # (B, S)
    k, v = torch.where(held[:, :, None, None], k, 0.0), torch.where(held[:, :, None, None], v, 0.0)
    mask = _visible(held, seqlens, Tq, causal, window_left, window_right)
    out, lse = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
                         enable_gqa=Hq != k.shape[2], softcap=softcap, return_lse=True, backend=backend)
    return out.transpose(1, 2).contiguous(), lse.to(torch.promote_types(q.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------- op

@_eager.op("tfkernels::kvcache_attention_fwd")
def kvcache_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, block_table: Optional[Tensor],
                          batch_idx: Optional[Tensor], leftpad: Optional[Tensor], scale: float, causal: bool,
                          window_left: int, window_right: int, softcap: float, num_splits: int,
                          backend: str) -> tuple[Tensor, Tensor]:
    """q (B, T_q, H_q, D), caches (B_cache, S, H_kv, D) or paged (pages, page, H_kv, D), seqlens (B,)
    int32 (the keys per row, new ones included), block_table (B, max_pages) int32 or None,
    batch_idx (B,) int32 or None, leftpad (B,) int32 (row b's first key) or None -> (out (B, T_q,
    H_q, D) contiguous, lse (B, H_q, T_q) fp32, -inf for a row with no visible key)."""
    return _backend.run("kvcache_attention", backend, _triton_fwd, _cuda_fwd, q, k_cache, v_cache, seqlens,
                        block_table, batch_idx, leftpad, scale, causal, window_left, window_right, softcap, num_splits)


# Query rows per K/V head (T_q * GROUP) up to which the cuda backend runs its decoding kernel
# (csrc/kvcache.cu, 16-row blocks); past it (a chunked prefill) every 16 rows would
# read the cache again, and the tensor-core attention on the gathered cache does the work better.
CUDA_DECODE_ROWS = 64


def _cuda_fwd(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, scale, causal, window_left, window_right,
              softcap, num_splits):
    B, Tq, Hq, _ = q.shape
    Hkv = k_cache.shape[2]
    rows = Tq * (Hq // Hkv)
    if rows > CUDA_DECODE_ROWS:
        return _composed(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, scale, causal, window_left,
                         window_right, softcap, backend="cuda")
    cap = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    if num_splits <= 0:  # as the Triton kernel picks them (16-row blocks; blocks of 128 keys)
        keys = _window_keys(cap, Tq, max(window_left, 0), 0 if causal else max(window_right, 0),
                            window_left >= 0 and (causal or window_right >= 0))
        num_splits = _auto_splits(_grid.cdiv(rows, 16) * B * Hkv, _grid.cdiv(keys, 128), _sm_count(q))
    num_splits = max(1, min(num_splits, MAX_SPLITS))
    return _cuda_ext.ops().kvcache_attention_fwd(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad,
                                                 float(scale), bool(causal), window_left, window_right, float(softcap),
                                                 num_splits)


@kvcache_attention_fwd.register_fake
def _(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, scale, causal, window_left, window_right, softcap,
      num_splits, backend):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- checks

def _check_index(t, name: str, shape: tuple, q: Tensor) -> Tensor:
    _validate.check_tensor(t, name)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"kvcache_attention: {name} must be an integer tensor (int32 or int64), got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"kvcache_attention: {name} must have shape ({want}), got {list(t.shape)}")
    _validate.check_same_device(q, "q", **{name: t})
    return t.to(torch.int32).contiguous()


def _check_caches(q, k_cache, v_cache, k, v, paged: bool):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is None:
            continue
        _validate.check_tensor(t, name)
        if t.dim() != 4:
            layout = "(batch, seqlen, heads, head_dim)" if name in ("q", "k", "v") else (
                "(num_pages, page_size, heads_kv, head_dim)" if paged else "(batch_cache, seqlen_cache, heads_kv, head_dim)")
            raise ValueError(f"kvcache_attention: {name} must be {layout}, got shape {list(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"kvcache_attention: {name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    _validate.check_same_device(q, "q", k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    B, _, Hq, D = q.shape
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ValueError(f"kvcache_attention: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} "
                         "must have the same shape")
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"kvcache_attention: the cache's head dim {k_cache.shape[3]} differs from q's {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"kvcache_attention: q's {Hq} heads must be a multiple of the cache's {Hkv} (GQA/MQA)")
    if (k is None) != (v is None):
        raise ValueError("kvcache_attention: pass both k and v (the new keys and values), or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if t.shape[0] != B or t.shape[2] != Hkv or t.shape[3] != D:
                raise ValueError(f"kvcache_attention: {name} must be (B={B}, T_new, H_kv={Hkv}, D={D}), got "
                                 f"{list(t.shape)}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"kvcache_attention: k has {k.shape[1]} new tokens but v has {v.shape[1]}")


def _check_values(lengths: list, t_new: int, cap: int, table: Optional[list], page: int, n_pages: int,
                  idx: Optional[list], batch_cache: int, leftpad: Optional[list]) -> None:
    for b, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"kvcache_attention: cache_seqlens[{b}] = {n} is negative")
        if leftpad is not None and not 0 <= leftpad[b] <= n + t_new:
            raise ValueError(f"kvcache_attention: cache_leftpad[{b}] = {leftpad[b]} must be in [0, {n + t_new}] "
                             f"(row {b}'s first key; it holds {n + t_new} slots)")
        if n + t_new > cap:
            raise ValueError(f"kvcache_attention: row {b} would hold {n} + {t_new} keys, more than the cache's "
                             f"capacity of {cap}")
        if table is not None:
            used = table[b][:-(-(n + t_new) // page)]
            bad = [p for p in used if not 0 <= p < n_pages]
            if bad:
                raise ValueError(f"kvcache_attention: block_table[{b}] names page {bad[0]}, outside the cache's "
                                 f"{n_pages} pages")
    if idx is not None:
        bad = [i for i in idx if not 0 <= i < batch_cache]
        if bad:
            raise ValueError(f"kvcache_attention: cache_batch_idx has {bad[0]}, outside the cache's {batch_cache} rows")


# ---------------------------------------------------------------------------------------------- public

def _append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, block_table: Optional[Tensor],
            batch_idx: Optional[Tensor], start: Optional[int] = None) -> None:
    """Write the new keys and values (B, T_new, H_kv, D) at positions seqlens[b] .. + T_new - 1.
    start: the one length of every row when the caller gave an int (a model's decode loop, at every
    layer): a plain slice copy then, without building and scattering through index tensors."""
    B, T = k.shape[:2]
    if start is not None and block_table is None and batch_idx is None:
        k_cache[:, start:start + T] = k
        v_cache[:, start:start + T] = v
        return
    pos = seqlens.long()[:, None] + torch.arange(T, device=k.device)       # (B, T_new)
    if block_table is not None:
        page = k_cache.shape[1]
        rows = block_table.long().gather(1, pos // page), pos % page        # page ids, slots
    else:
        rows = (batch_idx.long() if batch_idx is not None else torch.arange(B, device=k.device))[:, None], pos
    k_cache[rows] = k
    v_cache[rows] = v


def kvcache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Union[Tensor, int],
                      k: Optional[Tensor] = None, v: Optional[Tensor] = None, *, block_table: Optional[Tensor] = None,
                      cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                      scale: Optional[float] = None, causal: bool = False,
                      window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0, num_splits: int = 0,
                      return_lse: bool = False, backend: Optional[str] = None):
    """Attention of q (B, T_q, H_q, D) to a KV cache; see the module docstring for the layouts.

    cache_seqlens: (B,) integer tensor or an int: the keys each row holds before this call. With k
    and v (B, T_new, H_kv, D), those are written into k_cache / v_cache in place at positions
    cache_seqlens .. + T_new - 1 and attended to (the caller advances cache_seqlens).
    block_table (B, max_pages): a paged cache. cache_batch_idx (B,): the cache row of each batch row.
    cache_leftpad (B,) integer: row b's keys start at that slot (left padding before it is never read;
    0 <= cache_leftpad[b] <= cache_seqlens[b] + T_new).
    scale (default 1/sqrt(D)), causal and window_size (left, right) aligned to the bottom right,
    softcap: as in flash_attn_with_kvcache. num_splits: key-range splits per program (0: automatic,
    1: none). Returns out (B, T_q, H_q, D) and, with return_lse, lse (B, H_q, T_q) float32."""
    paged = block_table is not None
    _check_caches(q, k_cache, v_cache, k, v, paged)
    B, Tq, Hq, D = q.shape
    if paged and cache_batch_idx is not None:
        raise ValueError("kvcache_attention: cache_batch_idx cannot be combined with block_table "
                         "(the block table already picks each row's pages)")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"kvcache_attention: num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    left, right = _check_window(window_size, "kvcache_attention")
    softcap = _check_softcap(softcap, "kvcache_attention")
    table = _check_index(block_table, "block_table", (B, None), q) if paged else None
    idx = _check_index(cache_batch_idx, "cache_batch_idx", (B,), q) if cache_batch_idx is not None else None
    pad = _check_index(cache_leftpad, "cache_leftpad", (B,), q) if cache_leftpad is not None else None
    if not paged and idx is None and k_cache.shape[0] != B:
        raise ValueError(f"kvcache_attention: k_cache has {k_cache.shape[0]} rows but q has batch {B} "
                         "(pass cache_batch_idx to pick rows of a larger cache)")
    t_new = 0 if k is None else k.shape[1]
    page = k_cache.shape[1] if paged else 1
    cap = table.shape[1] * page if paged else k_cache.shape[1]
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (numbers.Integral, Tensor)):
        raise TypeError(f"kvcache_attention: cache_seqlens must be an int or an integer tensor (B,), got "
                        f"{type(cache_seqlens).__name__}")
    # the values are checked on the host in eager calls (a sync, once per tensor and version); under
    # torch.compile and while a CUDA graph captures (a decode step replayed with lengths updated in
    # place, where a host read would raise) only an int cache_seqlens is: the kernels clamp the rest,
    # so a bad value never reads outside the cache
    compiling = torch.compiler.is_compiling() or _validate.capturing(q)

    def read(t):
        return None if t is None or compiling else _validate.host_values(t)

    if isinstance(cache_seqlens, Tensor):
        seqlens = _check_index(cache_seqlens, "cache_seqlens", (B,), q)
        host = read(cache_seqlens)
    else:
        host = [int(cache_seqlens)] * B
        seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    if host is not None:
        _check_values(host, t_new, cap, read(block_table), page, k_cache.shape[0], read(cache_batch_idx),
                      k_cache.shape[0], read(cache_leftpad))
    be = _backend.resolve(backend, q, "kvcache_attention", None, others=(k_cache, v_cache, k, v))
    _validate.check_float(q, "q", be)
    if D > MAX_HEAD_DIM and be != "torch":
        if backend is not None:
            raise ValueError(f"kvcache_attention: head dim D={D} exceeds the kernels' limit of {MAX_HEAD_DIM} "
                             "(use backend='torch')")
        be = "torch"
    # every check done: only now is the cache written
    if k is not None:
        _append(k_cache, v_cache, k, v, seqlens, table, idx,
                None if isinstance(cache_seqlens, Tensor) else int(cache_seqlens))
        seqlens = seqlens + t_new
    scale_f = 1.0 / math.sqrt(D) if scale is None else float(scale)
    args = (q, k_cache, v_cache, seqlens, table, idx, pad, scale_f, bool(causal), left, right, softcap)
    # after the append: new keys that require grad make the cache part of the graph
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    if be == "torch" or grad:  # the reference, or attention's autograd
        out, lse = _composed(*args, backend=be if be != "auto" else None)
    else:
        out, lse = kvcache_attention_fwd(*args, int(num_splits), be)
    return (out, lse) if return_lse else out
