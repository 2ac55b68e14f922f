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
`tfkernels.attention` with an additive attn_mask), as are paged KV caches (`block_table`).
One more keyword, `backend`, picks the kernels as everywhere in tfkernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate
from .ops.attention import _check_window, attention
from .ops.varlen import _packed, varlen_attention


def _refuse(fn: str, alibi_slopes, block_table=None) -> None:
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes is not supported; pass the ALiBi bias to "
                                  "tfkernels.attention as an additive attn_mask (broadcast (1, H, T_q, T_k))")
    if block_table is not None:
        raise NotImplementedError(f"{fn}: paged KV caches (block_table) are not supported")


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
    left, right = _check_window(window_size)
    B, Tq, Hq, _ = q.shape
    Tk = k.shape[1]
    kw = dict(dropout_p=dropout_p, scale=softmax_scale, enable_gqa=Hq != k.shape[2], window_size=(left, right),
              softcap=softcap, return_lse=return_attn_probs, backend=backend)
    if Tq == Tk or not (causal or left >= 0 or right >= 0):
        # both corners are one (or alignment does not matter): the kernels on (B, H, T, D) views
        res = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, **kw)
        out, lse = res if return_attn_probs else (res, None)
        out = out.transpose(1, 2).contiguous()  # (B, T_q, H, D), contiguous as FlashAttention's
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
    _refuse("flash_attn_varlen_func", alibi_slopes, block_table)
    res = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
                           scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                           return_lse=return_attn_probs, backend=backend)
    return (*res, None) if return_attn_probs else res


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


__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func"]
