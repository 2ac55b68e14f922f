"""Packed-document causal attention (`document_ids`): time and effective TFLOP/s against what a
model gets without native document masking.

    python -m benchmarks.bench_documents [--quick] [--out DIR]    # GPU: writes DIR/documents.md
    TRITON_INTERPRET=1 python -m benchmarks.bench_documents --smoke  # CPU: tiny sizes, one rep

Shapes: bf16, D = 128, H = 16, B * T = 16k tokens, causal, each row packed with documents of
length L (all equal) or "mixed" (lengths drawn from a fixed seed, 64 .. 4096, mean about 1k; the
last one cut at T). Each token attends causally within its own document. Providers:
  tfkernels-{triton,cuda}      `document_ids=ids, is_causal=True`: tiles of other documents skipped
  tfkernels-triton-varlen      `tfkernels.varlen_attention` (FlashAttention's API: (total, H, D), cu_seqlens)
                               over the same documents: the same kernels, plus the API's layout handling
  tfkernels-triton-mask        the same as a dense (B, 1, T, T) bool mask: every causal tile visited
  tfkernels-triton-full        plain causal over the whole row (documents not separated): the cost
                               document masking saves
  sdpa-mask                    SDPA with the dense mask (what Hugging Face's "sdpa" builds for packed
                               sequences)
  flash-attn-2-varlen          `flash_attn_varlen_func` over the same documents (cu_seqlens), when
                               flash_attn is installed

Effective FLOPs count only the visible (query, key) pairs, sum over documents L (L + 1) / 2:
forward 4 * H * D * pairs, backward 2.5x, forward+backward 3.5x (as bench_window); the full
causal row counts its own pairs, so its TFLOP/s compare kernels, and its ms what the documents
save. Correctness: each provider's output and dq, dk, dv on batch 0, heads 0-1 against SDPA in
fp32 with the dense mask, within the dtype's tolerance, before timing.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from . import _masked, _util
from ._util import BenchConfig, Unavailable


def configs(quick: bool, smoke: bool):
    """(B, H, T, D, L); L an int (equal documents), "mixed", or None (plain causal: the full row)."""
    if smoke:
        return [(1, 2, 48, 32, L) for L in (16, "mixed", None)]
    out = []
    for T in ((4096, 16384) if quick else (2048, 4096, 8192, 16384)):
        for L in (512, 2048, "mixed", None):
            if L is None or L == "mixed" or L < T:
                out.append((16384 // T, 16, T, 128, L))
    return out


def lengths(T: int, L) -> list[int]:
    """Document lengths filling a row of T tokens (the last one cut)."""
    if L is None:
        return [T]
    if L == "mixed":
        g = torch.Generator().manual_seed(T)
        lo, hi = (4, 24) if T < 256 else (64, 4096)
        out = []
        while sum(out) < T:  # log-uniform lengths: many short documents, a few long ones
            u = torch.rand(1, generator=g).item()
            out.append(int(lo * (hi / lo) ** u))
    else:
        out = [L] * -(-T // L)
    out[-1] -= sum(out) - T
    return out


def document_ids(T: int, L, device) -> torch.Tensor:
    ls = lengths(T, L)
    return torch.repeat_interleave(torch.arange(len(ls), device=device, dtype=torch.int32),
                                   torch.tensor(ls, device=device))


def pairs(T: int, L) -> int:
    return sum(n * (n + 1) // 2 for n in lengths(T, L))


def dense_mask(ids: torch.Tensor) -> torch.Tensor:
    """(1, 1, T, T) bool: same document and causal."""
    T = ids.shape[-1]
    i = torch.arange(T, device=ids.device)
    return ((ids[:, None] == ids[None, :]) & (i[None, :] <= i[:, None]))[None, None]


def providers(cfg: BenchConfig) -> dict:
    """name -> fn(q, k, v, ids) in (B, H, T, D), ids (T,) int32 shared by the batch; an Unavailable
    as the value says why one is skipped."""
    import tfkernels

    out = {}
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    triton_ok = cfg.cuda or interp
    for backend in ("triton", "cuda"):
        name = f"tfkernels-{backend}"
        if backend == "triton" and not triton_ok:
            out[name] = Unavailable("Triton on CPU needs TRITON_INTERPRET=1")
        elif backend == "cuda" and not cfg.cuda:
            out[name] = Unavailable("the CUDA C++ backend needs a GPU")
        else:
            out[name] = lambda q, k, v, ids, b=backend: tfkernels.attention(q, k, v, is_causal=True, document_ids=ids,
                                                                            backend=b)
    masks = {}

    def mask_of(ids):
        key = (ids.shape[-1], ids.data_ptr())
        if key not in masks:  # built once per shape, outside the timed calls (a model builds it once per step)
            masks.clear()
            masks[key] = dense_mask(ids)
        return masks[key]

    if triton_ok:
        out["tfkernels-triton-mask"] = lambda q, k, v, ids: tfkernels.attention(q, k, v, attn_mask=mask_of(ids),
                                                                                is_causal=True, backend="triton")
        out["tfkernels-triton-full"] = lambda q, k, v, ids: tfkernels.attention(q, k, v, is_causal=True,
                                                                                backend="triton")
    else:
        out["tfkernels-triton-mask"] = out["tfkernels-triton-full"] = out["tfkernels-triton"]
    out["sdpa-mask"] = lambda q, k, v, ids: F.scaled_dot_product_attention(q, k, v, attn_mask=mask_of(ids))
    cu = {}

    def packed(q, ids):
        """(cu_seqlens (N + 1,) int32 over every document of every row, longest length): built once
        per shape, outside the timed calls (a data loader hands them over with the batch)."""
        B, _, T, _ = q.shape
        key = (B, T, ids.data_ptr())
        if key not in cu:
            cu.clear()
            starts = torch.nonzero(torch.diff(ids, prepend=ids.new_full((1,), -1))).flatten()
            per_row = torch.cat([starts, starts.new_full((1,), T)])
            offs = torch.arange(B, device=q.device)[:, None] * T
            cu[key] = (torch.cat([(per_row[:-1][None] + offs).flatten(), per_row.new_full((1,), B * T)])
                       .to(torch.int32), int(torch.diff(per_row).max()))
        return cu[key]

    def varlen(fn):
        """fn (FlashAttention's varlen signature) over (B, H, T, D) inputs, as (total, H, D)."""
        def call(q, k, v, ids):
            B, H, T, D = q.shape
            cu_seqlens, max_len = packed(q, ids)
            qt, kt, vt = (t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v))  # (total, H, D)
            o = fn(qt, kt, vt, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)
            return o.view(B, T, H, D).transpose(1, 2)
        return call

    if triton_ok:  # the same kernels through the varlen API: its cost is the layout and offsets handling
        out["tfkernels-triton-varlen"] = varlen(
            lambda *a, **kw: tfkernels.varlen_attention(*a, **kw, backend="triton"))
    try:
        if not cfg.cuda:
            raise ImportError("needs a GPU")
        from flash_attn import flash_attn_varlen_func

        fa2 = varlen(flash_attn_varlen_func)
        out["flash-attn-2-varlen"] = fa2
    except ImportError as err:
        out["flash-attn-2-varlen"] = Unavailable(f"flash_attn: {_util.short(err, 80)}")
    return out


def run(cfg: BenchConfig, log=print) -> list[dict]:
    rows = []
    provs = _masked.available(providers(cfg), log)
    for B, H, T, D, L in configs(cfg.quick, cfg.smoke):
        g = torch.Generator(device=cfg.device).manual_seed(T)
        kw = dict(device=cfg.device, dtype=cfg.dtype, generator=g)
        q, k, v, dout = (torch.randn(B, H, T, D, **kw) for _ in range(4))
        ids = document_ids(T, L, cfg.device)
        sdpa = lambda q, k, v, ids: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(ids))  # noqa: E731
        ref, tol = _masked.reference(sdpa, q, k, v, dout, ids, cfg.dtype)
        fwd_flops = 4.0 * B * H * D * pairs(T, L)
        for name, fn in provs.items():
            if isinstance(fn, Unavailable) or (name == "tfkernels-triton-full" and L is not None):
                continue
            if L is None and name not in ("tfkernels-triton-full", "sdpa-mask"):
                continue  # the full row: our plain causal kernel and SDPA's masked path, for scale
            rows += _masked.measure(name, fn, ids, q, k, v, dout, ref, tol, fwd_flops, cfg, log,
                                    f"T={T:<5d} L={L or 'full':<5} {name:22s}", dict(B=B, H=H, T=T, D=D, L=L))
    return rows


def table(rows: list[dict], info: dict, dtype_name: str) -> str:
    intro = (f"`python -m benchmarks.bench_documents`: {dtype_name}, causal within each document of length L packed "
             "into rows of T tokens (B * T = 16k, H = 16, D = 128); ms (median) and TFLOP/s over the visible "
             "(query, key) pairs only; L = full is plain causal over the row.")
    order = lambda L: (0, L) if isinstance(L, int) else ((1, 0) if L == "mixed" else (2, 0))  # noqa: E731
    return _masked.table(rows, info, "Packed-document causal attention", intro, "L", order)


def main(argv=None) -> int:
    return _masked.main(argv, __doc__, run, table, "documents.md")


if __name__ == "__main__":
    sys.exit(main())
