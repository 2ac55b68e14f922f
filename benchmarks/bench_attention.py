"""Attention forward, backward and forward+backward in TFLOP/s, and peak memory of fwd+bwd.

Grid (FlashAttention's): B*T = 16,384 tokens, H*D = 2048, so B = 16384 / T and H = 2048 / D;
T in {512, 1k, 2k, 4k, 8k, 16k}, D in {64, 128}, causal and not. --quick keeps T in {1k, 4k, 16k}
(short, middle, long; factor 4 apart) -- 12 configurations, about 2 minutes on an H100.
GQA (Llama's grouping, H_kv = H / 4, causal; its own tables): T in {1k, 4k, 16k} (--quick: 4k),
D in {64, 128}; the FLOPs are the query heads' (as MHA with H heads).
--smoke runs B*T = 64, H = 2, D = 32, T in {16, 32} (and GQA 2:1 at T = 32) on CPU.

FLOPs: forward 4*B*H*T*T*D (two matmuls, 2 FLOPs per multiply-add), halved when causal; backward
2.5x forward (five matmuls, one recomputing QK^T); forward+backward 3.5x forward.

Timing: forward under torch.no_grad(); backward alone: one forward with inputs that require grad,
then `torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)` is timed; fwd+bwd: both in the
timed call. Peak memory: `torch.cuda.max_memory_allocated()` minus what was allocated before one
forward+backward (inputs excluded; output, gradients and everything the provider keeps included),
in MiB; an out-of-memory error is recorded as "oom".

Providers: tfkernels-triton, tfkernels-cuda, SDPA forced to one backend through
`torch.nn.attention.sdpa_kernel` (sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math), and
FlashAttention 2 (`flash_attn`) / 3 (`flash_attn_interface`) when importable. sdpa-math
materialises the (T, T) scores: it is timed only at T <= 2048, its memory is measured at every T
(that is where it runs out). torch.compile is not a provider here: compiling SDPA calls the same
SDPA kernels. FlashAttention takes (B, T, H, D): its inputs are made in that layout before timing.

Correctness: output and dq, dk, dv of batch 0, heads 0-1 (attention is independent per (b, h); with
GQA the first K/V head and its group of query heads) against SDPA on fp32 copies of that slice,
before anything is timed.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import _util
from ._util import BenchConfig, Unavailable

PROVIDERS = ("tfkernels-triton", "tfkernels-cuda", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
             "flash-attn-2", "flash-attn-3")
PASSES = ("fwd", "bwd", "fwd+bwd")
TOKENS, HIDDEN = 16384, 2048
MATH_MAX_T = 2048  # sdpa-math: timed up to here, memory measured everywhere


@dataclass
class Provider:
    name: str
    fn: object  # fn(q, k, v, causal) -> out, in `layout`; k and v may have fewer heads (GQA)
    layout: str = "bhtd"  # or "bthd"
    context: object = field(default=contextlib.nullcontext)  # entered around every call and timing


GQA_GROUP = 4  # query heads per K/V head in the GQA configs (Llama 2 70B, Llama 3: 8; Mistral 7B: 4)


def sweep_configs(cfg: BenchConfig):
    """(B, H, H_kv, T, D, causal) in sweep order: MHA, then GQA."""
    if cfg.smoke:
        Ts, Ds, tokens, hidden, gqa_Ts, group = [16, 32], [32], 64, 64, [32], 2
    else:
        Ts = [1024, 4096, 16384] if cfg.quick else [512, 1024, 2048, 4096, 8192, 16384]
        Ds, tokens, hidden = [64, 128], TOKENS, HIDDEN
        gqa_Ts, group = ([4096] if cfg.quick else [1024, 4096, 16384]), GQA_GROUP
    for D in Ds:
        for causal in (False, True):
            for T in Ts:
                yield tokens // T, hidden // D, hidden // D, T, D, causal
    for D in Ds:
        for T in gqa_Ts:
            yield tokens // T, hidden // D, hidden // D // group, T, D, True


def flops(B, H, T, D, causal) -> dict:
    fwd = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


# ----------------------------------------------------------------------------- providers


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
              "math": "MATH"}[backend_name]
    if not hasattr(SDPBackend, member):
        raise Unavailable(f"this torch has no SDPBackend.{member}")
    backend = getattr(SDPBackend, member)
    return Provider(f"sdpa-{backend_name}",
                    lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c, enable_gqa=_gqa(q, k)),
                    context=lambda: sdpa_kernel([backend]))


def _gqa(q, k) -> bool:
    return k.shape[1] != q.shape[1]  # (B, H, T, D) inputs


def make_provider(name: str, cfg: BenchConfig) -> Provider:
    if name.startswith("tfkernels-"):
        import tfkernels

        if not hasattr(tfkernels, "attention"):
            raise Unavailable("tfkernels.attention is not in this build")
        backend = name.split("-", 1)[1]
        if backend == "triton" and not cfg.cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise Unavailable("Triton on CPU needs TRITON_INTERPRET=1")
        if backend == "cuda" and not cfg.cuda:
            raise Unavailable("the CUDA C++ backend needs a GPU")
        return Provider(name, lambda q, k, v, c: tfkernels.attention(q, k, v, is_causal=c, enable_gqa=_gqa(q, k),
                                                                     backend=backend))
    if name.startswith("sdpa-"):
        return _sdpa(name.split("-", 1)[1])
    if name in ("flash-attn-2", "flash-attn-3"):
        if not cfg.cuda:
            raise Unavailable("FlashAttention needs a GPU")
        try:
            if name == "flash-attn-2":
                from flash_attn import flash_attn_func
            else:
                from flash_attn_interface import flash_attn_func
        except ImportError as err:
            raise Unavailable(f"not installed ({_util.short(err, 80)})")

        def fa(q, k, v, c):
            out = flash_attn_func(q, k, v, causal=c)
            return out[0] if isinstance(out, tuple) else out  # some FA3 versions return (out, lse)

        return Provider(name, fa, layout="bthd")
    raise ValueError(f"unknown provider {name!r}")


# ----------------------------------------------------------------------------- sweep


def _unsupported(err: BaseException) -> bool:
    """SDPA's 'no kernel for this input' and tfkernels' 'backend not built' are skips, not failures."""
    msg = str(err)
    if any(s in msg for s in ("No available kernel", "No viable backend")) or "not supported" in msg.lower():
        return True
    try:
        from tfkernels import BackendUnavailableError
    except Exception:
        return False
    return isinstance(err, BackendUnavailableError)


def _to(layout, *ts):
    return [t.transpose(1, 2).contiguous() if layout == "bthd" else t for t in ts]


def _from(layout, *ts):
    return [t.transpose(1, 2) if layout == "bthd" else t for t in ts]


def _heads(q, k) -> tuple[int, int]:
    """The checked slice's query and K/V heads: heads 0-1, or with GQA the first K/V head and its
    whole group (its dK, dV sum over all of them)."""
    group = q.shape[1] // k.shape[1]
    return (2, 2) if group == 1 else (group, 1)


def _slice(q, k, v, dout):
    nq, nk = _heads(q, k)
    return q[:1, :nq], k[:1, :nk], v[:1, :nk], dout[:1, :nq]


def _reference(q, k, v, dout, causal):
    """fp32 output and gradients on batch 0, the checked heads (SDPA's default backend for fp32)."""
    q, k, v, dout = _slice(q, k, v, dout)
    sl = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*sl, is_causal=causal, enable_gqa=_gqa(q, k))
    grads = torch.autograd.grad(out, sl, dout.float())
    return [out.detach(), *grads]


def _baseline_err(q, k, v, dout, causal, ref) -> float:
    """PyTorch's own error in the benchmark dtype on the same slice (default SDPA backend)."""
    q, k, v, dout = _slice(q, k, v, dout)
    sl = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*sl, is_causal=causal, enable_gqa=_gqa(q, k))
    grads = torch.autograd.grad(out, sl, dout.clone())
    return _util.max_rel_err([out, *grads], ref)


def _check(p: Provider, q, k, v, dout, causal):
    """Provider's output and gradients on the full inputs, sliced like the reference."""
    qs, ks, vs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = p.fn(qs, ks, vs, causal)
    grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    out, dq, dk, dv = _from(p.layout, out.detach(), *grads)
    ref_q, ref_k = (t.transpose(1, 2) if p.layout == "bthd" else t for t in (qs, ks))
    nq, nk = _heads(ref_q, ref_k)
    return [out[:1, :nq], dq[:1, :nq], dk[:1, :nk], dv[:1, :nk]]


def _peak_mib(p: Provider, q, k, v, dout, causal) -> float:
    qs, ks, vs = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = p.fn(qs, ks, vs, causal)
    grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out, grads
    return peak / 2**20


def run(cfg: BenchConfig, notes: dict, log=print) -> list[dict]:
    providers = []
    for name in PROVIDERS:
        if name in cfg.skip:
            notes.setdefault(f"attention/{name}", "skipped: --skip")
            continue
        try:
            providers.append(make_provider(name, cfg))
        except Unavailable as err:
            notes.setdefault(f"attention/{name}", f"skipped: {err}")
    rows = []
    for B, H, Hkv, T, D, causal in sweep_configs(cfg):
        if cfg.out_of_time():
            notes.setdefault("attention/budget", "time budget (--budget) reached: later configs not run")
            notes["attention/budget"] += f"; D={D} causal={causal} T={T}" + (f" H_kv={Hkv}" if Hkv != H else "")
            continue
        rows += _run_config(providers, B, H, Hkv, T, D, causal, cfg, notes, log)
        _util.empty_cache(cfg)
    return rows


def _run_config(providers, B, H, Hkv, T, D, causal, cfg, notes, log) -> list[dict]:
    g = torch.Generator(device=cfg.device).manual_seed(T * 131 + D * 7 + int(causal) + (Hkv if Hkv != H else 0))
    kw = dict(device=cfg.device, dtype=cfg.dtype, generator=g)
    q, k, v, dout = (torch.randn(B, h, T, D, **kw) for h in (H, Hkv, Hkv, H))
    ref = _reference(q, k, v, dout, causal)
    tol = _util.tolerance(cfg.dtype, _baseline_err(q, k, v, dout, causal, ref))
    fl = flops(B, H, T, D, causal)
    tag = f"D={D:<3d} {'causal' if causal else 'full  '} T={T:<5d}" + (f" GQA {H // Hkv}:1" if Hkv != H else "")
    rows = []

    def row(provider, pass_, status, err=None, t=None, mib=None, note=""):
        r = dict(suite="attention", op="attention", provider=provider, **{"pass": pass_}, dtype=cfg.dtype_name,
                 shape=f"{B}x{H}x{T}x{D}" + (f" kv{Hkv}" if Hkv != H else ""), B=B, H=H, Hkv=Hkv, T=T, D=D,
                 causal=causal, x=T, status=status, err=err,
                 tol=tol, note=note)
        if pass_ == "mem":
            r.update(metric="MiB", value=mib)
        else:
            r.update(metric="TFLOP/s", flops=fl[pass_])
        if t is not None:
            tf = lambda ms: fl[pass_] / (ms * 1e-3) / 1e12  # noqa: E731
            r.update(ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, value=tf(t.ms), value_p20=tf(t.ms_p80),
                     value_p80=tf(t.ms_p20))
        rows.append(r)
        return r

    for p in providers:
        timed = not (p.name == "sdpa-math" and T > MATH_MAX_T and not cfg.smoke)
        qp, kp, vp, dp = _to(p.layout, q, k, v, dout)
        try:
            with p.context():
                err = _util.max_rel_err(_check(p, qp, kp, vp, dp, causal), ref) if timed else None
                if err is not None and not err <= tol:
                    for pass_ in PASSES:
                        row(p.name, pass_, "failed", err, note=f"mismatch: rel err {err:.2e} > tol {tol:.2e}")
                    log(f"  {tag} {p.name:16s} FAILED correctness ({err:.2e} > {tol:.2e})")
                    continue
                for pass_ in PASSES if timed else ():
                    try:
                        t = _time(p, pass_, qp, kp, vp, dp, causal, cfg)
                    except Exception as e:
                        if _unsupported(e):
                            raise
                        row(p.name, pass_, "oom" if _util.is_oom(e) else "failed", err, note=_util.short(e))
                        _util.empty_cache(cfg)
                        continue
                    r = row(p.name, pass_, "ok", err, t)
                    log(f"  {tag} {p.name:16s} {pass_:7s} {r['ms']:8.3f} ms {r['value']:8.4g} TFLOP/s")
                if cfg.cuda:
                    try:
                        mib = _peak_mib(p, qp, kp, vp, dp, causal)
                        row(p.name, "mem", "ok", err, mib=mib)
                    except Exception as e:
                        if _unsupported(e):
                            raise
                        status = "oom" if _util.is_oom(e) else "failed"
                        row(p.name, "mem", status, err, note="out of memory" if status == "oom" else _util.short(e))
                        log(f"  {tag} {p.name:16s} mem     {status}")
                        _util.empty_cache(cfg)
                    else:
                        log(f"  {tag} {p.name:16s} mem     {mib:8.0f} MiB")
        except Exception as e:
            if _unsupported(e):
                notes.setdefault(f"attention/{p.name}/D={D}", f"skipped where unsupported: {_util.short(e)}")
                continue
            status = "oom" if _util.is_oom(e) else "failed"
            for pass_ in PASSES:
                row(p.name, pass_, status, note=_util.short(e))
            log(f"  {tag} {p.name:16s} {status}: {_util.short(e)}")
            _util.empty_cache(cfg)
        finally:
            del qp, kp, vp, dp
    return rows


def _time(p: Provider, pass_, q, k, v, dout, causal, cfg):
    if pass_ == "fwd":
        with torch.no_grad():
            return _util.bench(lambda: p.fn(q, k, v, causal), cfg)
    qs, ks, vs = [t.detach().requires_grad_() for t in (q, k, v)]
    if pass_ == "bwd":
        out = p.fn(qs, ks, vs, causal)
        return _util.bench(lambda: torch.autograd.grad(out, (qs, ks, vs), dout, retain_graph=True), cfg)

    def fwd_bwd():
        out = p.fn(qs, ks, vs, causal)
        return torch.autograd.grad(out, (qs, ks, vs), dout)

    return _util.bench(fwd_bwd, cfg)
