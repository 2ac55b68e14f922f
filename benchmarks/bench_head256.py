"""Attention at head dim 256 (Gemma's): the cuda backend's backward as two dK/dV launches (the
default: dV then dK, no register spills) against the one-launch kernel (TFKERNELS_CUDA_DKDV_PASSES=1:
~1 KB spilled a thread), next to the Triton backend, SDPA's flash backend and FlashAttention.

    python -m benchmarks.bench_head256 [--quick] [--out DIR]     # GPU: DIR/head256.md, head256.json
    TFKERNELS_CUDA_EMULATE=1 TRITON_INTERPRET=1 python -m benchmarks.bench_head256 --smoke  # CPU

Shapes: bf16, D = 256, H = 8 (H * D = 2048), B * T = 16k tokens; T in {1k, 4k} (--quick: 4k),
causal and not. Forward and forward+backward in TFLOP/s (bench_attention's FLOP counts), each
provider checked against SDPA in fp32 first (out, dq, dk, dv). benchmarks/NOTES.md has the
prediction (two launches 1.3-1.8x faster in the backward than one).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from . import _masked, _util
from ._util import BenchConfig, Unavailable

KNOB = "TFKERNELS_CUDA_DKDV_PASSES"


def configs(cfg: BenchConfig):
    """(B, H, T, D)."""
    if cfg.smoke:
        return [(1, 2, 40, 256)]
    return [(16384 // T, 8, T, 256) for T in ((4096,) if cfg.quick else (1024, 4096))]


def providers(cfg: BenchConfig) -> dict:
    """name -> (fn(q, k, v, causal), env): env is set while the provider is checked and timed."""
    import tfkernels
    from tfkernels import _cuda_ext

    out = {}
    cuda_ok = cfg.cuda or os.environ.get("TFKERNELS_CUDA_EMULATE", "0") not in ("", "0")
    cuda = lambda q, k, v, c: tfkernels.attention(q, k, v, is_causal=c, backend="cuda")  # noqa: E731
    if cuda_ok and _cuda_ext.is_available(load=True):
        out["tfkernels-cuda"] = (cuda, {KNOB: None})
        out["tfkernels-cuda-1launch"] = (cuda, {KNOB: "1"})
    else:
        out["tfkernels-cuda"] = out["tfkernels-cuda-1launch"] = (Unavailable("the CUDA C++ backend is not built"), {})
    if cfg.cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        out["tfkernels-triton"] = (lambda q, k, v, c: tfkernels.attention(q, k, v, is_causal=c, backend="triton"), {})
    else:
        out["tfkernels-triton"] = (Unavailable("Triton on CPU needs TRITON_INTERPRET=1"), {})
    if cfg.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v, c):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=c)

        out["sdpa-flash"] = (flash, {})
        try:
            from flash_attn import flash_attn_func

            out["flash-attn-2"] = (lambda q, k, v, c: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                      v.transpose(1, 2), causal=c).transpose(1, 2), {})
        except ImportError as err:
            out["flash-attn-2"] = (Unavailable(f"flash_attn: {_util.short(err, 80)}"), {})
    return out


def _with_env(env: dict):
    """Set env (None: unset); returns what to restore."""
    old = {k: os.environ.get(k) for k in env}
    for k, val in env.items():
        if val is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = val
    return old


def run(cfg: BenchConfig, log=print) -> list[dict]:
    rows = []
    provs = providers(cfg)
    for name, (fn, _) in provs.items():
        if isinstance(fn, Unavailable):
            log(f"  {name}: skipped ({fn})")
    sdpa = lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c)  # noqa: E731
    dtype = torch.bfloat16  # on CPU too (--smoke): fp32 would take the cuda backend's FMA path, not these kernels
    for B, H, T, D in configs(cfg):
        for causal in (False, True):
            g = torch.Generator(device=cfg.device).manual_seed(T + causal)
            q, k, v, dout = (torch.randn(B, H, T, D, device=cfg.device, generator=g).to(dtype) for _ in range(4))
            ref, tol = _masked.reference(sdpa, q, k, v, dout, causal, dtype)
            fwd_flops = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
            for name, (fn, env) in provs.items():
                if isinstance(fn, Unavailable) or name in cfg.skip:
                    continue
                old = _with_env(env)
                try:
                    rows += _masked.measure(name, fn, causal, q, k, v, dout, ref, tol, fwd_flops, cfg, log,
                                            f"T={T:<5d} {'causal' if causal else 'full':6s} {name:24s}",
                                            dict(T=T, B=B, H=H, D=D, mode="causal" if causal else ""))
                finally:
                    _with_env(old)
            del q, k, v, dout
            _util.empty_cache(cfg)
    return rows


def table(rows: list[dict], info: dict, dtype_name: str) -> str:
    intro = ("`python -m benchmarks.bench_head256`: bfloat16, D = 256, H = 8, B * T = 16k; median times. "
             "tfkernels-cuda: dK/dV as two launches (default at D = 256); tfkernels-cuda-1launch: "
             f"{KNOB}=1, the one-launch kernel that spills.")
    return _masked.table(rows, info, "Attention at head dim 256", intro, "mode", lambda m: m)


def main(argv=None) -> int:
    return _masked.main(argv, __doc__, run, table, "head256.md", "head256.json")


if __name__ == "__main__":
    sys.exit(main())
