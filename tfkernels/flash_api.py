"""FlashAttention's Python API on tfkernels' kernels, for code written against `flash_attn`:

    from tfkernels import flash_attn_func, flash_attn_varlen_func   # was: from flash_attn import ...

(and the packed forms: flash_attn_qkvpacked_func, flash_attn_kvpacked_func and their varlen twins,
which split the packed tensor into views).

The signatures and semantics are flash_attn 2's: (B, T, H, D) inputs (the varlen one (total, H, D)
with cu_seqlens), `softmax_scale`, `causal` and `window_size` aligned to the bottom right when
T_q != T_k (query i of T_q sees keys up to i + T_k - T_q), GQA by head count, the lse (B, H, T_q)
(varlen: (H, total_q)) returned with `return_attn_probs=True` (as (out, lse, None): the third,
FlashAttention's debugging-only probabilities, is never formed). `deterministic` is accepted: the
backward has no atomics and is always deterministic. `alibi_slopes` is refused (use
`tfkernels.attention` with an additive attn_mask).
`flash_attn_with_kvcache` (decoding against a KV cache, in place, paged or not, left-padded rows,
rotary embedding of the new tokens) runs `tfkernels.kvcache_attention`'s split-KV kernels; a `block_table` given to
`flash_attn_varlen_func` gathers the sequences' pages into packed keys first (a copy of the used
pages). One more keyword, `backend`, picks the kernels as everywhere in tfkernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate
from .ops.attention import _check_window, attention
from .ops.kvcache import _check_index, kvcache_attention
from .ops.varlen import _check_cu, _packed, varlen_attention


def _refuse(fn: str, alibi_slopes) -> None:
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes is not supported; pass the ALiBi bias to "
                                  "tfkernels.attention as an additive attn_mask (broadcast (1, H, T_q, T_k))")


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, backend: Optional[str] = None):
    """flash_attn.flash_attn_func: q (B, T_q, H_q, D), k and v (B, T_k, H_kv, D) -> (B, T_q, H_q, D);
    with return_attn_probs, (out, lse (B, H_q, T_q) float32, None). See the module docstring."""
    _refuse("flash_attn_func", alibi_slopes)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"flash_attn_func: {name} must be (batch, seqlen, heads, head_dim), got shape "
                             f"{list(t.shape)}")
    left, right = _check_window(window_size, "flash_attn_func")
    B, Tq, Hq, _ = q.shape
    Tk = k.shape[1]
    kw = dict(dropout_p=dropout_p, scale=softmax_scale, enable_gqa=Hq != k.shape[2], window_size=(left, right),
              softcap=softcap, return_lse=return_attn_probs, backend=backend)
    if Tq == Tk or not (causal or left >= 0 or right >= 0):
        # both corners are one (or alignment does not matter): the kernels on (B, H, T, D) views
        res = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, **kw)
        out, lse = res if return_attn_probs else (res, None)
        out = out.transpose(1, 2).contiguous()  # (B, T_q, H, D) as FlashAttention's; the kernels wrote it so
    else:  # each batch row a sequence of varlen's bottom-right path; its offsets are known here
        if k.shape[0] != B or v.shape[0] != B:
            raise ValueError(f"flash_attn_func: q, k and v must have the same batch size, got {B}, {k.shape[0]} and "
                             f"{v.shape[0]}")
        if v.shape[1] != Tk:
            raise ValueError(f"flash_attn_func: k and v must have the same length, got {Tk} and {v.shape[1]}")
        host_q, host_k = list(range(0, B * Tq + 1, Tq)), list(range(0, B * Tk + 1, Tk))
        cu_q, cu_k = (torch.tensor(h, device=q.device, dtype=torch.int64) for h in (host_q, host_k))
        res = _packed(q.reshape(B * Tq, Hq, q.shape[-1]), k.reshape(B * Tk, *k.shape[2:]),
                      v.reshape(B * Tk, *v.shape[2:]), cu_q, cu_k, host_q, host_k, False, causal, True, kw)
        out, lse = res if return_attn_probs else (res, None)
        out = out.reshape(B, Tq, Hq, out.shape[-1])
        lse = None if lse is None else lse.reshape(Hq, B, Tq).transpose(0, 1)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Optional[Tensor] = None, *,
                           backend: Optional[str] = None):
    """flash_attn.flash_attn_varlen_func: `tfkernels.varlen_attention` with FlashAttention's positional
    signature; with return_attn_probs, (out, lse (H_q, total_q) float32, None)."""
    _refuse("flash_attn_varlen_func", alibi_slopes)
    if block_table is not None:
        k, v = _unpage(k, v, block_table, cu_seqlens_k)
    res = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
                           scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                           return_lse=return_attn_probs, backend=backend)
    return (*res, None) if return_attn_probs else res


def _unpage(k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
    """flash_attn_varlen_func's paged keys: k_cache, v_cache (num_pages, page_size, H_kv, D), sequence i's
    keys in pages block_table[i] (in order), its length from cu_seqlens_k -> packed (total_k, H_kv, D)."""
    for name, t in (("k", k_cache), ("v", v_cache)):
        _validate.check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"flash_attn_varlen_func: with block_table, {name} must be the paged cache "
                             f"(num_pages, page_size, heads_kv, head_dim), got shape {list(t.shape)}")
    cu = _check_cu(cu_seqlens_k, "cu_seqlens_k", k_cache)
    table = _check_index(block_table, "block_table", (cu.numel() - 1, None), k_cache).long()
    page_size = k_cache.shape[1]
    if not torch.compiler.is_compiling():  # host copies read once per tensor version (varlen reads cu again)
        cu_host, pages = _validate.host_values(cu_seqlens_k), _validate.host_values(block_table)
        for i, n in enumerate(b - a for a, b in zip(cu_host, cu_host[1:])):
            if n < 0:
                raise ValueError(f"flash_attn_varlen_func: cu_seqlens_k must be non-decreasing, got {cu_host}")
            if n > table.shape[1] * page_size:
                raise ValueError(f"flash_attn_varlen_func: a sequence of {n} keys needs more than block_table's "
                                 f"{table.shape[1]} pages of {page_size}")
            if any(not 0 <= pg < k_cache.shape[0] for pg in pages[i][:-(-n // page_size)]):
                raise ValueError(f"flash_attn_varlen_func: block_table names pages outside the cache's "
                                 f"{k_cache.shape[0]}")
    lengths = cu.diff()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)  # (total_k,)
    p = torch.arange(seq.numel(), device=cu.device) - cu[seq]                                 # position in its sequence
    rows = table[seq, p // page_size], p % page_size
    return k_cache[rows], v_cache[rows]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, interleaved: bool) -> Tensor:
    """flash_attn's rotary embedding of x (B, T, H, D) at positions pos (B, T): the first rotary_dim =
    2 * cos.shape[1] features rotated in pairs (interleaved: (x0, x1), (x2, x3), ...; else GPT-NeoX's
    halves), computed in fp32, the rest passed through."""
    half = cos.shape[1]
    c = cos[pos].float().unsqueeze(2)  # (B, T, 1, rotary_dim / 2)
    s_ = sin[pos].float().unsqueeze(2)
    xr = x[..., :2 * half].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s_, x1 * s_ + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat([x1 * c - x2 * s_, x1 * s_ + x2 * c], dim=-1)
    return torch.cat([rot.to(x.dtype), x[..., 2 * half:]], dim=-1)


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens=None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False, *, backend: Optional[str] = None):
    """flash_attn.flash_attn_with_kvcache: q (B, T_q, H_q, D) against k_cache, v_cache (B_cache, S, H_kv, D)
    or paged (num_pages, page_size, H_kv, D) with block_table; k, v (B, T_new, H_kv, D) are written into
    the cache in place at cache_seqlens (an int or (B,); None: the cache is full) first. rotary_cos /
    rotary_sin (seqlen_ro, rotary_dim / 2): the new keys are rotated at positions cache_seqlens + i, q
    likewise when causal or windowed, else every query at cache_seqlens. cache_leftpad (B,): row b's keys
    start at that slot (left padding; positions, rotary ones too, stay the cache's, as in flash_attn).
    Returns out (B, T_q, H_q, D),
    with return_softmax_lse also lse (B, H_q, T_q) float32. See tfkernels.kvcache_attention."""
    _refuse("flash_attn_with_kvcache", alibi_slopes)
    if cache_seqlens is None:  # FlashAttention: every row's cache is full
        _validate.check_tensor(k_cache, "k_cache")
        cap = k_cache.shape[1] * (block_table.shape[1] if isinstance(block_table, Tensor) else 1)
        cache_seqlens = cap - (0 if k is None else k.shape[1])
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("flash_attn_with_kvcache: pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        for name, t in (("q", q), ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _validate.check_tensor(t, name)
        if rotary_cos.dim() != 2 or rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"flash_attn_with_kvcache: rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2), "
                             f"got {list(rotary_cos.shape)} and {list(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > q.shape[-1]:
            raise ValueError(f"flash_attn_with_kvcache: rotary_dim {2 * rotary_cos.shape[1]} exceeds the head dim "
                             f"{q.shape[-1]}")
        B, Tq = q.shape[:2]
        if not torch.compiler.is_compiling():  # a position past the table: an index error on the GPU
            lens = _validate.host_values(cache_seqlens) if isinstance(cache_seqlens, Tensor) else [int(cache_seqlens)]
            last = max(lens, default=0) + max(Tq, 0 if k is None else k.shape[1]) - 1
            if last >= rotary_cos.shape[0]:
                raise ValueError(f"flash_attn_with_kvcache: rotary_cos has {rotary_cos.shape[0]} positions, but a "
                                 f"token sits at position {last}")
        base = (cache_seqlens.long() if isinstance(cache_seqlens, Tensor)
                else torch.full((B,), int(cache_seqlens), dtype=torch.long, device=q.device))[:, None]
        left, right = _check_window(window_size)
        step = torch.arange(Tq, device=q.device) if (causal or left >= 0 or right >= 0) else torch.zeros(
            Tq, dtype=torch.long, device=q.device)
        q = _rotate(q, rotary_cos, rotary_sin, base + step, rotary_interleaved)
        if k is not None:
            k = _rotate(k, rotary_cos, rotary_sin, base + torch.arange(k.shape[1], device=q.device), rotary_interleaved)
    return kvcache_attention(q, k_cache, v_cache, cache_seqlens, k, v, block_table=block_table,
                             cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, scale=softmax_scale,
                             causal=causal, window_size=window_size, softcap=softcap, num_splits=num_splits,
                             return_lse=return_softmax_lse, backend=backend)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False, *, backend: Optional[str] = None):
    """flash_attn.flash_attn_qkvpacked_func: qkv (B, T, 3, H, D) -> (B, T, H, D) (views, no copy in)."""
    _check_packed(qkv, 5, 2, 3, "qkv", "(batch, seqlen, 3, heads, head_dim)")
    return flash_attn_func(*qkv.unbind(2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False, *, backend: Optional[str] = None):
    """flash_attn.flash_attn_kvpacked_func: q (B, T_q, H_q, D), kv (B, T_k, 2, H_kv, D)."""
    _check_packed(kv, 5, 2, 2, "kv", "(batch, seqlen, 2, heads, head_dim)")
    return flash_attn_func(q, *kv.unbind(2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int] = None,
                                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                     deterministic: bool = False, return_attn_probs: bool = False, *,
                                     backend: Optional[str] = None):
    """flash_attn.flash_attn_varlen_qkvpacked_func: qkv (total, 3, H, D), one cu_seqlens."""
    _check_packed(qkv, 4, 1, 3, "qkv", "(total, 3, heads, head_dim)")
    return flash_attn_varlen_func(*qkv.unbind(1), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                                    dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                    causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                    deterministic: bool = False, return_attn_probs: bool = False, *,
                                    backend: Optional[str] = None):
    """flash_attn.flash_attn_varlen_kvpacked_func: q (total_q, H_q, D), kv (total_k, 2, H_kv, D)."""
    _check_packed(kv, 4, 1, 2, "kv", "(total, 2, heads, head_dim)")
    return flash_attn_varlen_func(q, *kv.unbind(1), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


def _check_packed(t, ndim: int, dim: int, n: int, name: str, layout: str) -> None:
    _validate.check_tensor(t, name)
    if t.dim() != ndim or t.shape[dim] != n:
        raise ValueError(f"{name} must be {layout}, got shape {list(t.shape)}")


__all__ = ["flash_attn_func", "flash_attn_with_kvcache", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func"]
