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

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _util
from ._util import BenchConfig, Unavailable

PASSES = ("fwd", "fwd+bwd")


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


def _grads(fn, q, k, v, dout, W):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, W)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def run(cfg: BenchConfig, log=print) -> list[dict]:
    rows = []
    provs = providers(cfg)
    for name, fn in provs.items():
        if isinstance(fn, Unavailable):
            log(f"  {name}: skipped ({fn})")
    for B, H, T, D, W in configs(cfg.quick, cfg.smoke):
        g = torch.Generator(device=cfg.device).manual_seed(T + (W or 0))
        kw = dict(device=cfg.device, dtype=cfg.dtype, generator=g)
        q, k, v, dout = (torch.randn(B, H, T, D, **kw) for _ in range(4))
        sl = lambda t: t[:1, :2].float()  # noqa: E731
        ref = _grads(lambda q, k, v, W: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(T, W, q.device)),
                     sl(q), sl(k), sl(v), sl(dout), W)
        base = _grads(lambda q, k, v, W: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(T, W, q.device)),
                      q[:1, :2], k[:1, :2], v[:1, :2], dout[:1, :2], W)
        tol = _util.tolerance(cfg.dtype, _util.max_rel_err(base, ref))
        fwd_flops = 4.0 * B * H * D * pairs(T, W)
        for name, fn in provs.items():
            if isinstance(fn, Unavailable) or (name == "tfkernels-triton-full" and W is not None):
                continue
            if W is None and name != "tfkernels-triton-full" and name != "sdpa-mask":
                continue  # the full row: our plain causal kernel and SDPA's masked path, for scale
            tag = f"T={T:<5d} W={W or 'full':<5} {name:22s}"
            try:
                got = _grads(fn, q, k, v, dout, W)
                err = _util.max_rel_err([t[:1, :2] for t in got], ref)
                del got
                if not err <= tol:
                    log(f"  {tag} FAILED correctness (rel err {err:.2e} > tol {tol:.2e})")
                    rows.append(dict(T=T, W=W, provider=name, status="failed", err=err, tol=tol))
                    continue
                for pass_ in PASSES:
                    if pass_ == "fwd":
                        with torch.no_grad():
                            t = _util.bench(lambda: fn(q, k, v, W), cfg)
                    else:
                        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                        t = _util.bench(lambda: torch.autograd.grad(fn(*leaves, W), leaves, dout), cfg)
                    fl = fwd_flops * (1.0 if pass_ == "fwd" else 3.5)
                    tflops = fl / (t.ms * 1e-3) / 1e12
                    rows.append(dict(B=B, H=H, T=T, D=D, W=W, provider=name, status="ok", err=err, tol=tol,
                                     **{"pass": pass_}, ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, tflops=tflops))
                    log(f"  {tag} {pass_:7s} {t.ms:9.3f} ms {tflops:8.4g} TFLOP/s")
            except Exception as e:  # noqa: BLE001 — recorded, the other providers still run
                status = "oom" if _util.is_oom(e) else "failed"
                rows.append(dict(T=T, W=W, provider=name, status=status, note=_util.short(e)))
                log(f"  {tag} {status}: {_util.short(e)}")
            _util.empty_cache(cfg)
    return rows


def table(rows: list[dict], info: dict, dtype_name: str) -> str:
    lines = [f"# Sliding-window causal attention, {info.get('gpu')}", "",
             "Environment: " + ", ".join(f"{k} {info[k]}" for k in ("gpu", "driver", "cuda", "torch", "triton", "commit")
                                         if k in info), "",
             f"`python -m benchmarks.bench_window`: {dtype_name}, causal, window W (each query sees W keys, itself "
             "included); B, H, D per row's shape in the module docstring; ms (median) and TFLOP/s over the visible "
             "(query, key) pairs only.", "",
             "| T | W | provider | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | status |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    by = {}
    for r in rows:  # windows narrowest first, then the full causal rows
        by.setdefault((r["T"], r["W"] or float("inf"), r["provider"]), {})[r.get("pass", "-")] = r
    for (T, W, name), passes in sorted(by.items()):
        W = None if W == float("inf") else W
        f, fb = passes.get("fwd"), passes.get("fwd+bwd")
        status = next(iter(passes.values()))["status"]
        cell = lambda r, key, fmt: (fmt.format(r[key]) if r else "")  # noqa: E731
        lines.append(f"| {T} | {W or 'full'} | {name} | {cell(f, 'ms', '{:.3f}')} | {cell(f, 'tflops', '{:.1f}')} "
                     f"| {cell(fb, 'ms', '{:.3f}')} | {cell(fb, 'tflops', '{:.1f}')} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T in {4k, 16k}")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU sizes (TRITON_INTERPRET=1), one rep")
    ap.add_argument("--out", type=Path, help="write window.md (and print it)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = BenchConfig(device="cuda" if cuda else "cpu", dtype=dtype, dtype_name=str(dtype).split(".")[-1],
                      quick=args.quick, smoke=not cuda, warmup_ms=25, rep_ms=100)
    info = _util.env_info(cfg.device)
    rows = run(cfg)
    md = table(rows, info, cfg.dtype_name)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "window.md").write_text(md)
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
