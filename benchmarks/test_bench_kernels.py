"""pytest-benchmark entry points for the same kernels as `python -m benchmarks`:

    pytest benchmarks/ --benchmark-only                       # needs CUDA; skips without it
    pytest benchmarks/ --benchmark-only -k "layer_norm and triton" --benchmark-json out.json

Wall-clock timing of `fn(); torch.cuda.synchronize()` by pytest-benchmark (so it includes launch
overhead), with GB/s or TFLOP/s from the median in `extra_info`. The suite's own numbers
(`python -m benchmarks`, CUDA events, L2 flushed) are the ones to quote; these are for tracking a
kernel from the pytest side. Not collected by CI: pytest's testpaths is `tests`.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")

from . import _util, bench_attention, bench_norms  # noqa: E402

M = 4096
DTYPE = torch.bfloat16


def _cfg():
    return _util.BenchConfig(device="cuda", dtype=DTYPE, dtype_name="bf16", quick=True, smoke=False,
                             warmup_ms=10, rep_ms=50)


def _run(benchmark, fn, rounds=50):
    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=5, iterations=1)
    return benchmark.stats.stats.median  # seconds


@pytest.mark.parametrize("N", [4096, 16384])
@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("provider", ["tfkernels-triton", "tfkernels-cuda", "torch", "torch.compile", "liger"])
@pytest.mark.parametrize("op", bench_norms.OPS)
def test_norm(benchmark, op, provider, pass_, N):
    cfg = _cfg()
    try:
        fn = bench_norms.make_provider(op, provider, cfg)
        x, w, b, dy = bench_norms._inputs(op, M, N, cfg)
        fn(x, w, b)
    except Exception as err:  # missing provider or backend not built: a skip, never an error
        pytest.skip(f"{provider}: {_util.short(err)}")
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                fn(x, w, b)
    else:
        xs, ws, bs = bench_norms._leaves(x, w, b)
        inputs = [t for t in (xs, ws, bs) if t is not None]
        y = fn(xs, ws, bs)

        def call():
            torch.autograd.grad(y, inputs, dy, retain_graph=True)
    median = _run(benchmark, call)
    nbytes = bench_norms.bytes_moved(op, M, N, x.element_size())[0 if pass_ == "fwd" else 1]
    benchmark.extra_info.update(op=op, provider=provider, pass_=pass_, M=M, N=N, bytes=nbytes,
                                GBps=nbytes / median / 1e9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1024, 4096])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["tfkernels-triton", "tfkernels-cuda", "sdpa-flash", "sdpa-cudnn", "flash-attn-2"])
def test_attention(benchmark, provider, pass_, T, causal, D=128):
    cfg = _cfg()
    B, H = bench_attention.TOKENS // T, bench_attention.HIDDEN // D
    try:
        p = bench_attention.make_provider(provider, cfg)
        q, k, v, dout = (torch.randn(B, H, T, D, device="cuda", dtype=DTYPE) for _ in range(4))
        q, k, v, dout = bench_attention._to(p.layout, q, k, v, dout)
        with p.context():
            p.fn(q, k, v, causal)
    except Exception as err:
        pytest.skip(f"{provider}: {_util.short(err)}")
    qs, ks, vs = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]

    def call():
        with p.context():
            if pass_ == "fwd":
                with torch.no_grad():
                    p.fn(q, k, v, causal)
            else:
                torch.autograd.grad(p.fn(qs, ks, vs, causal), (qs, ks, vs), dout)

    median = _run(benchmark, call, rounds=30)
    fl = bench_attention.flops(B, H, T, D, causal)[pass_]
    benchmark.extra_info.update(provider=provider, pass_=pass_, B=B, H=H, T=T, D=D, causal=causal,
                                TFLOPs=fl / median / 1e12)
