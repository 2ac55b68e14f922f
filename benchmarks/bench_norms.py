"""Softmax, LayerNorm and RMSNorm, forward and backward, in GB/s and % of measured copy bandwidth.

Sweep: M = 4096 rows, N from 512 to 65,536 (powers of two, plus 1000 -- a row that is not a
multiple of any block -- and 50,257 -- GPT-2's vocabulary, the softmax that matters). --quick keeps
N in {1024, 4096, 16384, 65536}; --smoke runs M = 32, N in {128, 300} on CPU.

Bytes moved (s = bytes per element of the benchmark dtype; weight and bias in the same dtype):
inputs read once plus outputs written once; the per-row statistics (mean / rstd, fp32, M of
each) are saved and re-read by backward but left out: at N >= 512 they are < 0.2% of the traffic.

    op          forward                         backward
    layer_norm  x, w, b read; y written         x, dy, w read; dx, dw, db written
                = (2MN + 2N) s                  = (3MN + 3N) s
    rms_norm    x, w read; y written            x, dy, w read; dx, dw written
                = (2MN + N) s                   = (3MN + 2N) s
    softmax     x read; y written = 2MN s       y, dy read; dx written = 3MN s

Forward is timed under torch.no_grad() (inference: nothing saved beyond what the op always
computes). Backward is timed alone: forward runs once with inputs that require grad, then
`torch.autograd.grad(y, inputs, dy, retain_graph=True)` is what do_bench times.

On CUDA the tfkernels and torch calls at N <= 16384 are also replayed from a CUDA graph
(`_util.bench_device`, ~0.3 s a case): the same work with no host side, so `ms_graph` against `ms`
says how much of a row's time is the host's (Python, launches, the autograd engine) rather than its
kernels'. The graph replays run without an L2 flush, so at N <= ~2048 (under 50 MB moved) they may
read from L2.

Providers: tfkernels-triton, tfkernels-cuda, torch (eager), torch.compile (of the eager function,
`dynamic=False`, compiled per shape after a dynamo reset and warmed up by the correctness check),
liger (Liger-Kernel), apex (LayerNorm/RMSNorm only: apex has no plain row softmax). Each is checked
against an fp32 reference on the same inputs (forward and every gradient) before it is timed.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _util
from ._util import BenchConfig, Unavailable

OPS = ("layer_norm", "rms_norm", "softmax")
GRAPH_PROVIDERS = ("tfkernels-triton", "tfkernels-cuda", "torch")  # device time alone: where host time is the question
GRAPH_MAX_N = 16384
PROVIDERS = ("tfkernels-triton", "tfkernels-cuda", "torch", "torch.compile", "liger", "apex")
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}


def sweep_sizes(cfg: BenchConfig) -> tuple[int, list[int]]:
    if cfg.smoke:
        return 32, [128, 300]
    if cfg.quick:
        return 4096, [1024, 4096, 16384, 65536]
    return 4096, [512, 1000, 1024, 2048, 4096, 8192, 16384, 32768, 50257, 65536]


def bytes_moved(op: str, M: int, N: int, elem: int) -> tuple[int, int]:
    """(forward bytes, backward bytes) as in the module docstring."""
    if op == "layer_norm":
        return (2 * M * N + 2 * N) * elem, (3 * M * N + 3 * N) * elem
    if op == "rms_norm":
        return (2 * M * N + N) * elem, (3 * M * N + 2 * N) * elem
    return 2 * M * N * elem, 3 * M * N * elem


# ----------------------------------------------------------------------------- providers


def eager(op: str):
    """The plain PyTorch function each provider is measured against (and torch.compile compiles)."""
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS[op])
    if op == "rms_norm":
        if hasattr(F, "rms_norm"):
            return lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, EPS[op])
        from tfkernels import reference

        return lambda x, w, b: reference.rms_norm(x, (x.shape[-1],), w, EPS[op])
    return lambda x, w, b: torch.softmax(x, dim=-1)


def reference_fn(op: str):
    """fp32 oracle: tfkernels.reference on fp32 copies."""
    from tfkernels import reference

    if op == "layer_norm":
        return lambda x, w, b: reference.layer_norm(x, (x.shape[-1],), w, b, EPS[op])
    if op == "rms_norm":
        return lambda x, w, b: reference.rms_norm(x, (x.shape[-1],), w, EPS[op])
    return lambda x, w, b: reference.softmax(x, dim=-1)


def make_provider(op: str, provider: str, cfg: BenchConfig):
    """Return fn(x, w, b) -> y for one provider, or raise Unavailable."""
    if provider.startswith("tfkernels-"):
        try:
            import tfkernels
        except Exception as err:  # pragma: no cover - the package is what we benchmark
            raise Unavailable(f"tfkernels does not import: {_util.short(err)}")
        backend = provider.split("-", 1)[1]
        if backend == "triton" and not cfg.cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise Unavailable("Triton on CPU needs TRITON_INTERPRET=1")
        if backend == "cuda" and not cfg.cuda:
            raise Unavailable("the CUDA C++ backend needs a GPU")
        if op == "layer_norm":
            return lambda x, w, b: tfkernels.layer_norm(x, (x.shape[-1],), w, b, EPS[op], backend=backend)
        if op == "rms_norm":
            return lambda x, w, b: tfkernels.rms_norm(x, (x.shape[-1],), w, EPS[op], backend=backend)
        return lambda x, w, b: tfkernels.softmax(x, -1, backend=backend)
    if provider == "torch":
        return eager(op)
    if provider == "torch.compile":
        import torch._dynamo

        torch._dynamo.reset()  # a fresh compile for this shape; no fallback to a dynamic graph
        _allow_retain_graph()
        if cfg.smoke and not cfg.cuda:
            # inductor's C++ codegen costs tens of seconds on CI's 2 cores; aot_eager still runs
            # dynamo + AOTAutograd, which is the path the smoke test is there to keep alive
            return torch.compile(eager(op), dynamic=False, backend="aot_eager")
        return torch.compile(eager(op), dynamic=False)
    if provider == "liger":
        if not cfg.cuda:
            raise Unavailable("Liger-Kernel needs a GPU")
        try:
            if op == "layer_norm":
                from liger_kernel.ops.layer_norm import LigerLayerNormFunction

                return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS[op])
            if op == "rms_norm":
                from liger_kernel.ops.rms_norm import LigerRMSNormFunction

                # offset 0, "llama" casting (fp32 statistics), in_place=False: dy is not overwritten
                return lambda x, w, b: LigerRMSNormFunction.apply(x, w, EPS[op], 0.0, "llama", False)
            from liger_kernel.ops.softmax import LigerSoftmaxFunction

            return lambda x, w, b: LigerSoftmaxFunction.apply(x)
        except ImportError as err:
            raise Unavailable(f"Liger-Kernel not installed ({_util.short(err, 80)})")
    if provider == "apex":
        if not cfg.cuda:
            raise Unavailable("Apex needs a GPU")
        if op == "softmax":
            raise Unavailable("Apex has no plain row softmax")
        try:
            from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
        except ImportError as err:
            raise Unavailable(f"Apex (with its CUDA extensions) not installed ({_util.short(err, 80)})")
        if op == "layer_norm":
            return lambda x, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), EPS[op])
        return lambda x, w, b: fused_rms_norm_affine(x, w, (x.shape[-1],), EPS[op])
    raise ValueError(f"unknown provider {provider!r}")


# ----------------------------------------------------------------------------- sweep


def _inputs(op: str, M: int, N: int, cfg: BenchConfig):
    """Random inputs (never zeros): x, w (~1), b, dy."""
    g = torch.Generator(device=cfg.device).manual_seed(M * 100003 + N)
    kw = dict(device=cfg.device, dtype=cfg.dtype, generator=g)
    x = torch.randn(M, N, **kw)
    dy = torch.randn(M, N, **kw)
    w = b = None
    if op != "softmax":
        w = 1.0 + 0.1 * torch.randn(N, **kw)
    if op == "layer_norm":
        b = 0.1 * torch.randn(N, **kw)
    return x, w, b, dy


def _leaves(x, w, b):
    return [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]


def _fwd_bwd(fn, x, w, b, dy):
    """Forward and every gradient, for the correctness check."""
    with torch.no_grad():
        y = fn(x, w, b)
    xs, ws, bs = _leaves(x, w, b)
    inputs = [t for t in (xs, ws, bs) if t is not None]
    yg = fn(xs, ws, bs)
    grads = torch.autograd.grad(yg, inputs, dy.clone())
    return y, list(grads)


def run(cfg: BenchConfig, ops, copy_gbps: float, notes: dict, log=print) -> list[dict]:
    M, Ns = sweep_sizes(cfg)
    rows = []
    for op in ops:
        for N in Ns:
            if cfg.out_of_time():
                notes.setdefault("norms/budget", "time budget (--budget) reached: later shapes not run")
                notes["norms/budget"] += f"; {op} N={N}"
                continue
            rows += _run_shape(op, M, N, cfg, copy_gbps, notes, log)
            _util.empty_cache(cfg)
    return rows


def _run_shape(op, M, N, cfg, copy_gbps, notes, log) -> list[dict]:
    x, w, b, dy = _inputs(op, M, N, cfg)
    f32 = [t.float() if t is not None else None for t in (x, w, b)]
    ref_y, ref_grads = _fwd_bwd(reference_fn(op), *f32, dy.float())
    base_y, base_grads = _fwd_bwd(eager(op), x, w, b, dy)
    tol_f = _util.tolerance(cfg.dtype, _util.rel_err(base_y, ref_y))
    tol_b = _util.tolerance(cfg.dtype, _util.max_rel_err(base_grads, ref_grads))
    del base_y, base_grads, f32
    fwd_bytes, bwd_bytes = bytes_moved(op, M, N, x.element_size())
    rows = []

    def row(provider, pass_, status, err=None, tol=None, t=None, note=""):
        nbytes = fwd_bytes if pass_ == "fwd" else bwd_bytes
        r = dict(suite="norms", op=op, provider=provider, **{"pass": pass_}, dtype=cfg.dtype_name,
                 shape=f"{M}x{N}", M=M, N=N, x=N, bytes=nbytes, metric="GB/s", status=status,
                 err=err, tol=tol, note=note)
        if t is not None:
            gbs = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
            r.update(ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, value=gbs(t.ms),
                     value_p20=gbs(t.ms_p80), value_p80=gbs(t.ms_p20))
            r["pct_copy"] = 100.0 * r["value"] / copy_gbps if copy_gbps else None
        rows.append(r)
        return r

    for provider in PROVIDERS:
        if provider in cfg.skip:
            notes.setdefault(f"{op}/{provider}", "skipped: --skip")
            continue
        try:
            fn = make_provider(op, provider, cfg)
            y, grads = _fwd_bwd(fn, x, w, b, dy)  # also the warm-up / compile
        except Unavailable as err:
            notes.setdefault(f"{op}/{provider}", f"skipped: {err}")
            continue
        except Exception as err:
            if _is_backend_unavailable(err):
                notes.setdefault(f"{op}/{provider}", f"skipped: {_util.short(err)}")
                continue
            status = "oom" if _util.is_oom(err) else "failed"
            for p in ("fwd", "bwd"):
                row(provider, p, status, note=_util.short(err))
            log(f"  {op:10s} N={N:<6d} {provider:17s} {status}: {_util.short(err)}")
            _util.empty_cache(cfg)
            continue
        err_f, err_b = _util.rel_err(y, ref_y), _util.max_rel_err(grads, ref_grads)
        del y, grads
        for pass_, err, tol in (("fwd", err_f, tol_f), ("bwd", err_b, tol_b)):
            if not err <= tol:
                row(provider, pass_, "failed", err, tol, note=f"mismatch: rel err {err:.2e} > tol {tol:.2e}")
                log(f"  {op:10s} N={N:<6d} {provider:17s} {pass_}  FAILED correctness ({err:.2e} > {tol:.2e})")
                continue
            try:
                t = _time(fn, pass_, x, w, b, dy, cfg)
            except Exception as e:
                status = "oom" if _util.is_oom(e) else "failed"
                row(provider, pass_, status, err, tol, note=_util.short(e))
                _util.empty_cache(cfg)
                continue
            r = row(provider, pass_, "ok", err, tol, t)
            _device_time(r, fn, pass_, x, w, b, dy, cfg, copy_gbps)
            log(f"  {op:10s} N={N:<6d} {provider:17s} {pass_}  {r['ms']*1e3:9.1f} us  {r['value']:8.1f} GB/s"
                + (f"  {r['pct_copy']:5.1f}% of copy" if r.get("pct_copy") is not None else ""))
    return rows


def _time(fn, pass_, x, w, b, dy, cfg):
    if pass_ == "fwd":
        with torch.no_grad():
            return _util.bench(lambda: fn(x, w, b), cfg)
    xs, ws, bs = _leaves(x, w, b)
    inputs = [t for t in (xs, ws, bs) if t is not None]
    y = fn(xs, ws, bs)
    dyp = dy.clone()  # a provider that writes into dy in place cannot disturb the others
    return _util.bench(lambda: torch.autograd.grad(y, inputs, dyp, retain_graph=True), cfg)


def _device_time(r, fn, pass_, x, w, b, dy, cfg, copy_gbps) -> None:
    """Adds ms_graph / value_graph / pct_copy_graph to row r (or graph_note: why the call could not
    be captured -- itself a finding, e.g. a host sync in the op)."""
    if not cfg.cuda or r["provider"] not in GRAPH_PROVIDERS or r["N"] > GRAPH_MAX_N:
        return
    try:
        if pass_ == "fwd":
            with torch.no_grad():
                t = _util.bench_device(lambda: fn(x, w, b), cfg)
        else:
            xs, ws, bs = _leaves(x, w, b)
            inputs = [v for v in (xs, ws, bs) if v is not None]
            y = fn(xs, ws, bs)
            dyp = dy.clone()
            t = _util.bench_device(lambda: torch.autograd.grad(y, inputs, dyp, retain_graph=True), cfg)
    except Exception as e:  # noqa: BLE001 -- recorded; the do_bench time above stands
        r["graph_note"] = _util.short(e)
        torch.cuda.synchronize()
        return
    r["ms_graph"] = t.ms
    r["value_graph"] = r["bytes"] / (t.ms * 1e-3) / 1e9
    r["pct_copy_graph"] = 100.0 * r["value_graph"] / copy_gbps if copy_gbps else None


def _allow_retain_graph() -> None:
    """AOTAutograd "donates" saved buffers to the compiled backward, which then refuses
    retain_graph=True -- and timing backward alone needs it. Donation only lets backward reuse
    that memory in place; it does not change the kernels, so it is switched off for the benchmark."""
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except Exception:
        pass


def _is_backend_unavailable(err: BaseException) -> bool:
    try:
        from tfkernels import BackendUnavailableError
    except Exception:
        return False
    return isinstance(err, BackendUnavailableError)
