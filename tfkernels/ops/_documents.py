"""Document masking for `tfkernels.attention(..., document_ids=...)`: packed sequences.

Pretraining packs documents back to back into fixed-length rows; a token should attend only to
tokens of its own document (Llama 3; FlashAttention's varlen API for the same purpose). Each
query and key carries a document id (int32, per batch row): query i may see key j iff
q_doc[i] == k_doc[j] and q_doc[i] >= 0. A negative id is padding: it sees nothing and nothing
sees it (its output row is 0, like a fully masked row). This ANDs with is_causal, the window and
attn_mask; with is_causal (top-left) over a packed row, it is each document's own causal mask.

Cost: the kernels skip the key blocks a query block cannot see, so packed documents of length L
cost O(T * L), not O(T^2), and no (T, T) mask is ever built. Per batch row and per granule of
GRAN = 16 rows (queries for the forward and dQ kernels, keys for the dK/dV kernel),
`_doc_ranges_kernel` finds

    lo, hi   the columns (keys, or queries) [lo, hi) that the granule's rows may see
    single   the granule's one document id when all its rows share it, else -1

and a kernel program reduces its BLOCK / GRAN granules (`_doc_stages`): it visits only [lo, hi),
and when all its rows are one document the blocks wholly inside that document's columns need no
masking at all (they stay on the kernels' unmasked fast path); the rest compare ids.

The ranges come from a binary search over a search key S of the columns (int64):
S[j] = 2 * doc[j] for a real id, 2 * m + 1 for padding (m = the largest id before it, -1 if none),
so a search for 2x brackets exactly the columns whose id is x, and padding never falls inside
one. When a row's S is not non-decreasing (ids not sorted, or padding inside a document) the
search does not apply: that row's granules see [0, T) and every block is masked, which is
correct but not faster than a dense mask. Sorted ids (the packed case) get the exact ranges.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _validate
from . import _grid

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

GRAN = 16  # rows per granule: every kernel block size is a multiple of it
INT32_MAX = 2**31 - 1

if triton is not None:
    # kernels may read module globals only as constexprs (the interpreter is laxer)
    _GRAN = tl.constexpr(GRAN)
    _I32_MAX = tl.constexpr(INT32_MAX)

    @triton.jit
    def _doc_ranges_kernel(RowDoc, ColKey, ColSorted, Out, B, n_rows, n_cols, n_gran, n_steps,
                           GRAN: tl.constexpr, GROUPS: tl.constexpr):
        """Out (3, B, n_gran) int32: lo, hi, single of granules [g, g + GROUPS) of batch row b (see
        the module docstring). RowDoc (B, n_rows) int32; ColKey (B, n_cols) int64 the search key S;
        ColSorted (B,) int8. A binary search per granule, n_steps = bit_length(n_cols) + 1 halvings."""
        b = tl.program_id(1)
        g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
        r = g[:, None] * GRAN + tl.arange(0, GRAN)[None, :]  # (GROUPS, GRAN) row indices
        in_rows = r < n_rows
        d = tl.load(RowDoc + b.to(tl.int64) * n_rows + r, mask=in_rows, other=-1)
        d_max = tl.max(d, 1)
        d_min = tl.min(tl.where(d >= 0, d, _I32_MAX), 1)  # over the real ids
        d_min_in = tl.min(tl.where(in_rows, d, _I32_MAX), 1)  # over every row that exists
        single = tl.where((d_min_in == d_max) & (d_max >= 0), d_max, -1)
        # first column with S >= 2 * d_min, and first with S > 2 * d_max
        x_lo = d_min.to(tl.int64) * 2
        x_hi = d_max.to(tl.int64) * 2
        Key_b = ColKey + b.to(tl.int64) * n_cols
        a_lo = g * 0
        a_hi = a_lo + n_cols
        c_lo = a_lo
        c_hi = a_hi
        for _ in range(n_steps):
            m_a = (a_lo + a_hi) // 2
            s_a = tl.load(Key_b + m_a, mask=m_a < n_cols, other=0)
            go_a = (a_lo < a_hi) & (s_a < x_lo)
            stop_a = (a_lo < a_hi) & (s_a >= x_lo)
            a_lo = tl.where(go_a, m_a + 1, a_lo)
            a_hi = tl.where(stop_a, m_a, a_hi)
            m_c = (c_lo + c_hi) // 2
            s_c = tl.load(Key_b + m_c, mask=m_c < n_cols, other=0)
            go_c = (c_lo < c_hi) & (s_c <= x_hi)
            stop_c = (c_lo < c_hi) & (s_c > x_hi)
            c_lo = tl.where(go_c, m_c + 1, c_lo)
            c_hi = tl.where(stop_c, m_c, c_hi)
        is_sorted = tl.load(ColSorted + b) != 0
        lo = tl.where(is_sorted, a_lo, 0)
        hi = tl.where(is_sorted, c_lo, n_cols)
        single = tl.where(is_sorted, single, -1)
        empty = d_max < 0  # no real id: sees nothing; (n_cols, 0) leaves a block's hull unchanged
        lo = tl.where(empty, n_cols, lo)
        hi = tl.where(empty, 0, hi)
        ok = g < n_gran
        base = b.to(tl.int64) * n_gran + g
        tl.store(Out + base, lo, mask=ok)
        tl.store(Out + B * n_gran + base, hi, mask=ok)
        tl.store(Out + 2 * B * n_gran + base, single, mask=ok)

    @triton.jit
    def _doc_stages(lo, u_lo, u_hi, hi, Ranges, b, B, n_gran, r0, n_cols,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, GRAN: tl.constexpr):
        """The stage bounds (lo, u_lo, u_hi, hi) of a program over rows [r0, r0 + ROWS) (see
        _kv_stages / _q_stages) narrowed to the columns its rows' documents hold: [lo, hi) within
        the documents' hull; [u_lo, u_hi), the unmasked stage, kept only where every row is one
        document and the blocks lie wholly inside its columns; else empty, and the masked stages
        take the rest. lo, u_lo, u_hi stay multiples of BLOCK (or all equal)."""
        gi = r0 // GRAN + tl.arange(0, ROWS // GRAN)
        ok = gi < n_gran
        base = b.to(tl.int64) * n_gran + gi
        d_lo = tl.min(tl.load(Ranges + base, mask=ok, other=n_cols), 0)
        d_hi = tl.max(tl.load(Ranges + B * n_gran + base, mask=ok, other=0), 0)
        s = tl.load(Ranges + 2 * B * n_gran + base, mask=ok, other=-1)
        s_max = tl.max(s, 0)
        s_min = tl.min(tl.where(ok, s, _I32_MAX), 0)
        lo2 = tl.maximum(lo, (d_lo // BLOCK) * BLOCK)
        hi2 = tl.minimum(hi, d_hi)
        u_lo2 = tl.maximum(u_lo, ((d_lo + BLOCK - 1) // BLOCK) * BLOCK)
        u_hi2 = tl.minimum(u_hi, (d_hi // BLOCK) * BLOCK)
        whole = (s_min == s_max) & (s_max >= 0) & (u_lo2 < u_hi2)
        u_lo2 = tl.where(whole, u_lo2, lo2)
        u_hi2 = tl.where(whole, u_hi2, lo2)
        return lo2, u_lo2, u_hi2, hi2

    @triton.jit
    def _doc_valid(row_doc, col_doc, ROWS_ARE_QUERIES: tl.constexpr):
        """Whether the pair may attend: equal ids and a real (non-negative) query id. A tile
        (rows, cols) of queries x keys, or keys x queries."""
        if ROWS_ARE_QUERIES:
            valid = (row_doc[:, None] == col_doc[None, :]) & (row_doc >= 0)[:, None]
        else:
            valid = (row_doc[:, None] == col_doc[None, :]) & (col_doc >= 0)[None, :]
        return valid


def search_key(doc: Tensor) -> tuple[Tensor, Tensor]:
    """(S (B, T) int64, sorted (B,) int8) for doc ids (B, T) int32: see the module docstring."""
    real = doc >= 0
    run_max = torch.cummax(torch.where(real, doc, -1), dim=-1).values.to(torch.int64)
    key = torch.where(real, doc.to(torch.int64) * 2, run_max * 2 + 1)
    if doc.shape[-1] > 1:
        is_sorted = (key[:, 1:] >= key[:, :-1]).all(dim=-1)
    else:
        is_sorted = torch.ones(doc.shape[0], dtype=torch.bool, device=doc.device)
    return key.contiguous(), is_sorted.to(torch.int8)


def ranges(row_doc: Tensor, col_doc: Tensor) -> Tensor:
    """(3, B, cdiv(n_rows, GRAN)) int32: lo, hi, single of each granule of row_doc's rows over
    col_doc's columns (queries over keys for the forward and dQ, keys over queries for dK/dV).

    Remembered per (row_doc, col_doc) and their versions (`_validate.eager_memo`): every layer of a
    model passes the same ids, and `check_document_ids` hands each layer the same converted tensors,
    so the forward's ranges serve the later layers and the backward's dQ, and the search key's
    ~8 small ops and the ranges launch run once per direction and step instead of per layer."""
    return _validate.eager_memo(row_doc, "doc_ranges", lambda _: _ranges(row_doc, col_doc), partner=col_doc)


def _ranges(row_doc: Tensor, col_doc: Tensor) -> Tensor:
    B, n_rows = row_doc.shape
    n_cols = col_doc.shape[1]
    n_gran = _grid.cdiv(n_rows, GRAN)
    out = torch.empty((3, B, n_gran), dtype=torch.int32, device=row_doc.device)
    if B * n_gran == 0:
        return out
    key, is_sorted = search_key(col_doc)
    groups = 16
    _doc_ranges_kernel[(_grid.cdiv(n_gran, groups), B)](
        row_doc, key, is_sorted, out, B, n_rows, n_cols, n_gran, max(n_cols, 1).bit_length() + 1,
        GRAN=GRAN, GROUPS=groups)
    return out


# ----------------------------------------------------------------------------------------------
# the public argument
# ----------------------------------------------------------------------------------------------

def _one(ids, name: str, lead: tuple, T: int, ref: Tensor) -> Tensor:
    _validate.check_tensor(ids, name)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"attention: {name} must be an integer tensor of document ids, got {ids.dtype}")
    _validate.check_same_device(ref, "q", **{name: ids})
    target = (*lead, T)
    if ids.dim() == 0 or ids.shape[-1] != T:
        raise ValueError(f"attention: {name} of shape {list(ids.shape)} must end in the sequence length {T}")
    try:
        ids.expand(target)  # the check; _as_rows expands again (a view: free)
    except RuntimeError:
        raise ValueError(f"attention: {name} of shape {list(ids.shape)} does not broadcast to the batch dims of q: "
                         f"expected {list(target)}") from None
    # the conversion is remembered per ids tensor and version, so every layer gets the same (B, T)
    # tensor and `ranges` finds its results from the first layer (and the int64 check's sync runs once)
    return _validate.eager_memo(ids, ("document_ids", lead, T), lambda ids: _as_rows(ids, name, lead, T))


def _as_rows(ids: Tensor, name: str, lead: tuple, T: int) -> Tensor:
    """ids, which broadcast to (*lead, T), as (prod(lead), T) int32 contiguous."""
    if ids.dtype == torch.int64 and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(ids)  # a device sync (once per ids tensor): pass int32 ids to skip it
        if int(lo) < -INT32_MAX - 1 or int(hi) > INT32_MAX:
            raise ValueError(f"attention: {name} must fit in int32, got values in [{int(lo)}, {int(hi)}]")
    out = ids.expand(*lead, T).reshape(math.prod(lead), T).to(torch.int32).contiguous()  # (not -1: T may be 0)
    # a view of ids would hold ids itself (its _base) and keep the memo's weak reference from ever
    # dying; detach() shares the storage and version counter but not the reference
    return out.detach()


def check_document_ids(document_ids, lead: tuple, Tq: int, Tk: int, q: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """document_ids (one tensor for queries and keys, T_q == T_k, or a pair (q_ids, k_ids)) as
    (q_doc (B, T_q), k_doc (B, T_k)) int32 contiguous, B = prod(lead), q's batch dims (all dims
    before (H, T, D)); ids broadcast over those dims. None -> None."""
    if document_ids is None:
        return None
    if isinstance(document_ids, Tensor):
        if Tq != Tk:
            raise ValueError(f"attention: one document_ids tensor serves queries and keys only when T_q == T_k "
                             f"(got T_q={Tq}, T_k={Tk}); pass a pair (q_ids, k_ids)")
        d = _one(document_ids, "document_ids", lead, Tq, q)
        return d, d
    if not (isinstance(document_ids, (tuple, list)) and len(document_ids) == 2):
        raise TypeError("attention: document_ids must be an integer tensor (..., T) or a pair (q_ids, k_ids), "
                        f"got {type(document_ids).__name__}")
    return (_one(document_ids[0], "document_ids[0]", lead, Tq, q),
            _one(document_ids[1], "document_ids[1]", lead, Tk, q))


def doc_mask(q_doc: Tensor, k_doc: Tensor) -> Tensor:
    """The bool mask (B, 1, T_q, T_k) the ids stand for (the reference backend's and tests' view)."""
    return ((q_doc[:, :, None] == k_doc[:, None, :]) & (q_doc >= 0)[:, :, None]).unsqueeze(1)


__all__ = ["GRAN", "check_document_ids", "doc_mask", "ranges", "search_key"]
