"""Sliding-window (local) causal attention: time and effective TFLOP/s of the kernels' native window
against what a model gets without one.

    python -m benchmarks.bench_window [--quick] [--out DIR]    # GPU: writes DIR/window.md
    TRITON_INTERPRET=1 python -m benchmarks.bench_window --smoke  # CPU: tiny sizes, one rep

Shapes: bf16, D = 128, H = 16, B * T = 16k tokens, causal, window W (Mistral's form: each query sees
itself and the W - 1 keys before it). Providers:
  tfkernels-{triton,cuda}        `window_size=(W - 1, 0)`: tiles outside the window are skipped
  tfkernels-triton-full          plain causal, no window: the cost the window saves
  sdpa-mask                      SDPA with the dense (T, T) bool mask, what Hugging Face's "sdpa"
                                 builds for a sliding layer longer than its window
  flash-attn-2                   `window_size=(W - 1, 0)`, when flash_attn is installed

Effective FLOPs count only the visible (query, key) pairs: forward 4 * B * H * D * pairs, with
pairs = sum_i min(i + 1, W); backward 2.5x; forward+backward 3.5x (as bench_attention). The full
causal row uses its own pairs (T (T + 1) / 2), so its TFLOP/s compare kernels, and its ms what
the window saves. Correctness: each provider's output and dq, dk, dv on batch 0, heads 0-1 against
SDPA in fp32 with the dense mask, within the dtype's tolerance (as bench_attention), before timing.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from . import _masked, _util
from ._util import BenchConfig, Unavailable


def configs(quick: bool, smoke: bool):
    """(B, H, T, D, W); W = None: plain causal attention (the full row)."""
    if smoke:
        return [(1, 2, 48, 32, W) for W in (8, None)]  # 3 tiles of 16: the window skips one
    out = []
    for T in ((4096, 16384) if quick else (2048, 4096, 8192, 16384)):
        for W in (1024, 4096, None):
            if W is None or W < T:
                out.append((16384 // T, 16, T, 128, W))
    return out


def pairs(T: int, W: int | None) -> int:
    if W is None or W >= T:
        return T * (T + 1) // 2
    return W * (W + 1) // 2 + (T - W) * W  # rows i < W see i + 1 keys, later ones W


def dense_mask(T: int, W: int | None, device) -> torch.Tensor:
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    keep = j <= i
    return keep if W is None else keep & (j > i - W)


def providers(cfg: BenchConfig) -> dict:
    """name -> fn(q, k, v, W) in (B, H, T, D); an Unavailable as the value says why one is skipped."""
    import tfkernels

    out = {}
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for backend in ("triton", "cuda"):
        name = f"tfkernels-{backend}"
        if backend == "triton" and not (cfg.cuda or interp):
            out[name] = Unavailable("Triton on CPU needs TRITON_INTERPRET=1")
        elif backend == "cuda" and not cfg.cuda:
            out[name] = Unavailable("the CUDA C++ backend needs a GPU")
        else:
            out[name] = lambda q, k, v, W, b=backend: tfkernels.attention(
                q, k, v, is_causal=True, window_size=(-1, -1) if W is None else (W - 1, 0), backend=b)
    out["tfkernels-triton-full"] = (out["tfkernels-triton"] if isinstance(out["tfkernels-triton"], Unavailable) else
                                    lambda q, k, v, W: tfkernels.attention(q, k, v, is_causal=True, backend="triton"))
    masks = {}

    def sdpa_mask(q, k, v, W):
        key = (q.shape[2], W)
        if key not in masks:  # built once per shape, outside the timed calls (a model builds it once per step)
            masks.clear()
            masks[key] = dense_mask(q.shape[2], W, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[key])

    out["sdpa-mask"] = sdpa_mask
    try:
        if not cfg.cuda:
            raise ImportError("needs a GPU")
        from flash_attn import flash_attn_func

        def fa2(q, k, v, W):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D) views; FA wants contiguous
            o = flash_attn_func(qt.contiguous(), kt.contiguous(), vt.contiguous(), causal=True,
                                window_size=(-1, -1) if W is None else (W - 1, 0))
            return o.transpose(1, 2)

        out["flash-attn-2"] = fa2
    except ImportError as err:
        out["flash-attn-2"] = Unavailable(f"flash_attn: {_util.short(err, 80)}")
    return out


def run(cfg: BenchConfig, log=print) -> list[dict]:
    rows = []
    provs = _masked.available(providers(cfg), log)
    for B, H, T, D, W in configs(cfg.quick, cfg.smoke):
        g = torch.Generator(device=cfg.device).manual_seed(T + (W or 0))
        kw = dict(device=cfg.device, dtype=cfg.dtype, generator=g)
        q, k, v, dout = (torch.randn(B, H, T, D, **kw) for _ in range(4))
        sdpa = lambda q, k, v, W: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(T, W, q.device))  # noqa: E731
        ref, tol = _masked.reference(sdpa, q, k, v, dout, W, cfg.dtype)
        fwd_flops = 4.0 * B * H * D * pairs(T, W)
        for name, fn in provs.items():
            if isinstance(fn, Unavailable) or (name == "tfkernels-triton-full" and W is not None):
                continue
            if W is None and name != "tfkernels-triton-full" and name != "sdpa-mask":
                continue  # the full row: our plain causal kernel and SDPA's masked path, for scale
            rows += _masked.measure(name, fn, W, q, k, v, dout, ref, tol, fwd_flops, cfg, log,
                                    f"T={T:<5d} W={W or 'full':<5} {name:22s}", dict(B=B, H=H, T=T, D=D, W=W))
    return rows


def table(rows: list[dict], info: dict, dtype_name: str) -> str:
    intro = (f"`python -m benchmarks.bench_window`: {dtype_name}, causal, window W (each query sees W keys, itself "
             "included); B, H, D per row's shape in the module docstring; ms (median) and TFLOP/s over the visible "
             "(query, key) pairs only.")
    # windows narrowest first, then the full causal rows
    return _masked.table(rows, info, "Sliding-window causal attention", intro, "W",
                         lambda W: float("inf") if W is None else W)


def main(argv=None) -> int:
    return _masked.main(argv, __doc__, run, table, "window.md")


if __name__ == "__main__":
    sys.exit(main())
