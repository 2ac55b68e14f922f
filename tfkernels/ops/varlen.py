"""`tfkernels.varlen_attention`: FlashAttention's variable-length API (`flash_attn_varlen_func`,
`torch.nn.attention.varlen.varlen_attn`) on the document-masked attention kernels.

The sequences of a batch are concatenated without padding: q (total_q, H_q, D), k and v
(total_k, H_kv, D); sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and
cu_seqlens_k[i]:cu_seqlens_k[i+1] of k and v. Each sequence attends only to itself.

FlashAttention aligns `causal` and `window_size` per sequence to the bottom right: with
lq = len_q(i), lk = len_k(i), query p of a sequence sits on the diagonal at key p + lk - lq (the
last query sees the last key; a decoding step or a chunked prefill over a KV cache). The kernels
take document ids (`attention(..., document_ids=(q_ids, k_ids))`) and align is_causal and the
window to the top left of the whole packed row, which is the per-sequence bottom right only when
every sequence has lq == lk. So:

- cu_seqlens_q == cu_seqlens_k (training on packed sequences, the common case), or neither causal
  nor a window: the packed rows are the kernels' rows, ids = the sequence index; no copy at all.
- otherwise the rows are placed in a shared *frame*: sequence i gets max(lq, lk) slots, its
  queries the last lq of them and its keys the last lk, so frame slot differences are exactly
  FlashAttention's bottom-right offsets and the kernels' top-left causal/window is theirs. The
  slots a side leaves empty get id -1 (padding: no query sees such a key, such a query row is 0).
  When every lk >= lq (a KV cache), only q moves into the frame (k's frame is k itself); when
  every lq >= lk, only k and v move. Empty slots are zeros, and whole padding tiles are skipped by
  the kernels' document ranges, so the frame costs the copies, not attention work.

Eager calls read cu_seqlens on the host (a device sync, tiny) to check them and size the frame
exactly, once per offsets tensor: a model passes the same tensors to every layer, and the later
layers find them in a cache (keyed weakly by the tensor and its version, so an in-place change is
read again) and queue their kernels without waiting. Under torch.compile nothing is read: the
offsets are trusted and a frame, when needed, has the static size total_q + total_k.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _validate
from .attention import _check_window, attention


def _check_cu(cu, name: str, q: Tensor) -> Tensor:
    _validate.check_tensor(cu, name)
    if cu.dtype == torch.bool or cu.is_floating_point() or cu.is_complex():
        raise TypeError(f"varlen_attention: {name} must be an integer tensor (int32 or int64), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"varlen_attention: {name} must be 1-D (batch + 1,), got shape {list(cu.shape)}")
    # one converted tensor per offsets tensor and version, so that every layer hands `_packed` the
    # same one and finds its document ids there (detach: a result that is cu itself must not hold it)
    return _validate.eager_memo(cu, ("varlen_cu", q.device), lambda c: c.to(device=q.device, dtype=torch.int64).detach())


def _check_offsets(cu: list, name: str, total: int, tensor_name: str) -> None:
    if cu[0] != 0:
        raise ValueError(f"varlen_attention: {name} must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"varlen_attention: {name} must be non-decreasing, got {cu}")
    if cu[-1] != total:
        raise ValueError(f"varlen_attention: {name} ends at {cu[-1]}, but {tensor_name} has {total} rows "
                         "(the last offset is the total length)")


def _check_max(max_seqlen, cu: list, name: str) -> None:
    if max_seqlen is None:
        return
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"varlen_attention: {name} must be an int, got {type(max_seqlen).__name__}")
    longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
    if max_seqlen < longest:  # FlashAttention's kernels size their grid by it and silently drop rows
        raise ValueError(f"varlen_attention: {name}={max_seqlen} is less than the longest sequence, {longest}")


def _seq_index(cu: Tensor, lens: Tensor, total: int) -> Tensor:
    """(total,) int64: the sequence each packed row belongs to (no host sync)."""
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=total)


def _ids(cu: Tensor, total: int) -> Tensor:
    """(total,) int32 document ids of the packed rows: the sequence index of each."""
    return _seq_index(cu, cu[1:] - cu[:-1], total).to(torch.int32)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor] = None,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *,
                     dropout_p: float = 0.0, scale: Optional[float] = None, causal: bool = False,
                     window_size: Optional[tuple[int, int]] = None, softcap: float = 0.0, return_lse: bool = False,
                     backend: Optional[str] = None):
    """Attention over variable-length sequences packed without padding, FlashAttention's varlen API.

    q (total_q, H_q, D), k and v (total_k, H_kv, D), H_q a multiple of H_kv (GQA);
    cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32/int64 offsets, 0 = cu[0] <= cu[1] <= ... = total
    (cu_seqlens_k None: k and v share q's offsets). max_seqlen_q / max_seqlen_k are taken for
    compatibility and checked (at least the longest sequence); the kernels do not need them.
    -> out (total_q, H_q, D); with return_lse=True, (out, lse (H_q, total_q) float32), as
    flash_attn_varlen_func returns them.

    causal and window_size=(left, right) (-1 = unbounded) are aligned per sequence to the bottom
    right, as in FlashAttention >= 2.1: query p of a sequence of lq queries over lk keys sees keys
    up to p + lk - lq (and at least p + lk - lq - left); with lq > lk its first lq - lk queries see
    nothing and return 0 (lse -inf). dropout_p, scale, softcap: as in `tfkernels.attention`.
    Differentiable in q, k and v; runs on every backend (see the module docstring for how).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.check_tensor(t, name)
        if t.dim() != 3:
            raise ValueError(f"varlen_attention: {name} must be (total, heads, head_dim), got shape {list(t.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"varlen_attention: k and v must have the same number of rows, got {k.shape[0]} and "
                         f"{v.shape[0]}")
    if not isinstance(causal, bool):
        raise TypeError(f"varlen_attention: causal must be a bool, got {type(causal).__name__}")
    left, right = _check_window(window_size, "varlen_attention")
    total_q, total_k = q.shape[0], k.shape[0]
    if cu_seqlens_k is None and total_k != total_q:
        raise ValueError(f"varlen_attention: without cu_seqlens_k, k must have q's {total_q} rows, got {total_k}")
    shared = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q
    cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q", q)
    cu_k = cu_q if shared else _check_cu(cu_seqlens_k, "cu_seqlens_k", q)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"varlen_attention: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_q.numel()} and {cu_k.numel()}")
    host_q = host_k = None
    if not torch.compiler.is_compiling():
        host_q = _validate.host_values(cu_seqlens_q)  # the checks and the frame's size (a sync, once per tensor)
        host_k = host_q if shared else _validate.host_values(cu_seqlens_k)
        _check_offsets(host_q, "cu_seqlens_q", total_q, "q")
        _check_offsets(host_k, "cu_seqlens_k", total_k, "k")
        _check_max(max_seqlen_q, host_q, "max_seqlen_q")
        _check_max(max_seqlen_k, host_k, "max_seqlen_k")
    kw = dict(dropout_p=dropout_p, scale=scale, enable_gqa=q.shape[1] != k.shape[1], window_size=(left, right),
              softcap=softcap, return_lse=return_lse, backend=backend)
    return _packed(q, k, v, cu_q, cu_k, host_q, host_k, shared, causal, True, kw)


def _packed(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, host_q: Optional[list],
            host_k: Optional[list], shared: bool, causal: bool, bottom_right: bool, kw: dict):
    """Attention of packed sequences q (total_q, H_q, D), k, v (total_k, H_kv, D) with int64 offsets
    cu_q, cu_k (and their host copies, None under torch.compile); causal and kw['window_size']
    aligned per sequence to the bottom right (FlashAttention) or the top left (SDPA, applied to each
    sequence on its own). kw: attention()'s other keywords."""
    total_q, total_k = q.shape[0], k.shape[0]
    return_lse = kw["return_lse"]
    left, right = kw["window_size"]
    if host_q is not None:
        shared = host_q == host_k

    def run(qf: Tensor, kf: Tensor, vf: Tensor, ids, is_causal: bool):
        # (T, H, D) -> (1, H, T, D) views; the kernels take the strides as they are
        res = attention(qf.transpose(0, 1).unsqueeze(0), kf.transpose(0, 1).unsqueeze(0),
                        vf.transpose(0, 1).unsqueeze(0), is_causal=is_causal, document_ids=ids, **kw)
        out, lse = res if return_lse else (res, None)
        # (T, H_q, D) contiguous, as FlashAttention returns it (callers `view` it as (T, H_q * D)),
        # and (H_q, T). The kernels wrote (1, T, H_q, D) memory already (q's order of heads and time,
        # attention._like_layout): contiguous() copies only for the torch backend's output
        return out[0].transpose(0, 1).contiguous(), (None if lse is None else lse[0])

    if shared or not (causal or left >= 0 or right >= 0):
        # the packed rows are the kernels' rows: when the offsets agree every sequence has lq == lk
        # and the row's top-left alignment is each sequence's (either corner), and alignment does
        # not matter without causal or a window. The ids are remembered per offsets tensor: every
        # layer then passes attention() the same ids, and it finds their ranges from the first layer
        ids_q = _validate.eager_memo(cu_q, ("varlen_ids", total_q), lambda cu: _ids(cu, total_q))
        if shared:
            out, lse = run(q, k, v, ids_q, causal)
        else:
            ids_k = _validate.eager_memo(cu_k, ("varlen_ids", total_k), lambda cu: _ids(cu, total_k))
            out, lse = run(q, k, v, (ids_q, ids_k), causal)
        return (out, lse) if return_lse else out

    lens_q = cu_q[1:] - cu_q[:-1]
    doc_q = _seq_index(cu_q, lens_q, total_q)
    lens_k = cu_k[1:] - cu_k[:-1]
    doc_k = _seq_index(cu_k, lens_k, total_k)
    slots = torch.maximum(lens_q, lens_k)
    start = torch.cumsum(slots, 0) - slots  # each sequence's first frame slot
    if host_q is not None:
        hq = [b - a for a, b in zip(host_q, host_q[1:])]
        hk = [b - a for a, b in zip(host_k, host_k[1:])]
        frame = sum(max(a, b) for a, b in zip(hq, hk))
        q_moves = any(a < b for a, b in zip(hq, hk))  # some sequence has more keys than queries
        k_moves = any(b < a for a, b in zip(hq, hk))
    else:  # under torch.compile: a static bound, and both sides move
        frame, q_moves, k_moves = total_q + total_k, True, True

    def place(x: Tensor, doc: Tensor, lens: Tensor, cu: Tensor, moves: bool):
        """x's frame (frame, H, D), its ids (frame,) int32 and the frame slot of each row (or None)."""
        if not moves:  # x's frame is x: its sequences already fill their segments
            return x, doc.to(torch.int32), None
        first = start + slots - lens if bottom_right else start  # the sequence's first slot
        slot = (first - cu[:-1])[doc] + torch.arange(doc.numel(), device=doc.device)
        xf = x.new_zeros((frame, *x.shape[1:])).index_copy(0, slot, x)  # differentiable in x
        ids = torch.full((frame,), -1, dtype=torch.int32, device=doc.device).index_copy(0, slot, doc.to(torch.int32))
        return xf, ids, slot

    qf, ids_q, slot_q = place(q, doc_q, lens_q, cu_q, q_moves)
    kf, ids_k, slot_k = place(k, doc_k, lens_k, cu_k, k_moves)
    vf = v if slot_k is None else v.new_zeros((frame, *v.shape[1:])).index_copy(0, slot_k, v)
    out, lse = run(qf, kf, vf, (ids_q, ids_k), causal)
    if slot_q is not None:
        out = out.index_select(0, slot_q)
        lse = None if lse is None else lse.index_select(1, slot_q)
    return (out, lse) if return_lse else out


def jagged_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     window_size, softcap, return_lse: bool, document_ids, backend):
    """`tfkernels.attention` on nested tensors of the jagged layout, as SDPA takes them: q
    (B, H_q, j_q, D), k and v (B, H_kv, j_k, D), the sequence dim ragged (made from (B, j, H, D)
    by .transpose(1, 2)). Each sequence is its own SDPA call: is_causal and window_size top-left
    per sequence (SDPA's convention; SDPA itself runs no causal nested attention). -> a nested
    (B, H_q, j_q, D) sharing q's ragged structure; with return_lse, also lse (B, H_q, j_q) nested."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not (isinstance(t, Tensor) and t.is_nested and t.layout == torch.jagged):
            raise TypeError(f"attention: with nested tensors, q, k and v must all be nested with layout=torch.jagged; "
                            f"{name} is {type(t).__name__ if not isinstance(t, Tensor) else t.layout}"
                            f"{' (not nested)' if isinstance(t, Tensor) and not t.is_nested else ''}")
        if t.dim() != 4 or t._ragged_idx != 2:
            raise ValueError(f"attention: nested {name} must be (B, H, j, D) with the sequence dim ragged, as SDPA "
                             f"takes them (from (B, j, H, D): .transpose(1, 2)); got shape {tuple(t.shape)} "
                             f"ragged in dim {t._ragged_idx}")
        if t._lengths is not None:  # a narrow()ed nested tensor: its sequences have holes
            raise ValueError(f"attention: nested {name} has holes (lengths besides offsets, e.g. from narrow()); "
                             "make it contiguous first")
    if attn_mask is not None:
        raise ValueError("attention: nested q, k and v take no attn_mask (each sequence's length is its mask; "
                         "is_causal and window_size apply per sequence)")
    if document_ids is not None:
        raise ValueError("attention: nested q, k and v take no document_ids (each sequence is its own document)")
    if not (q.size(0) == k.size(0) == v.size(0)):
        raise ValueError(f"attention: nested q, k and v must have the same batch size, got {q.size(0)}, {k.size(0)} "
                         f"and {v.size(0)}")
    cu_q, cu_k, cu_v = q.offsets(), k.offsets(), v.offsets()
    host_q = host_k = None
    if not torch.compiler.is_compiling():
        host_q, host_k = _validate.host_values(cu_q), _validate.host_values(cu_k)
        if cu_v is not cu_k and _validate.host_values(cu_v) != host_k:
            raise ValueError("attention: nested k and v must have the same sequence lengths")
    left, right = _check_window(window_size)
    kw = dict(dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa, window_size=(left, right), softcap=softcap,
              return_lse=return_lse, backend=backend)
    # the buffers behind the nested tensors: values() of (B, H, j, D) is (H, total, D)
    res = _packed(q.values().transpose(0, 1), k.values().transpose(0, 1), v.values().transpose(0, 1),
                  cu_q.to(torch.int64), cu_k.to(torch.int64), host_q, host_k, cu_k is cu_q, bool(is_causal),
                  False, kw)
    out, lse = res if return_lse else (res, None)
    out = torch.nested.nested_tensor_from_jagged(out, cu_q).transpose(1, 2)  # (B, j, H, D) -> (B, H, j, D)
    if not return_lse:
        return out
    return out, torch.nested.nested_tensor_from_jagged(lse.transpose(0, 1), cu_q).transpose(1, 2)


__all__ = ["jagged_attention", "varlen_attention"]
