"""Host (Python) time of one op call, the Triton kernels' launches replaced by no-ops: no GPU needed.

    python -m benchmarks.host_overhead            # layer_norm, attention, softmax against torch's own
    python -m benchmarks.host_overhead --device cuda [--backend cuda]   # on a GPU: launches included

On a GPU, a call whose host side takes longer than its kernels shows up in do_bench's event timings
as GPU time (the events wait for the launch): the floor under every small-shape row of the suite.
This measures that host side alone, on any machine: every `triton.jit` function's launch is patched
to return at once (inputs are tiny CPU tensors, so torch's own ops cost next to nothing), and each
call is timed over `--calls` repetitions after a warm-up. torch's functions are timed the same way,
computing for real on those tiny tensors (for the document rows, SDPA over 256 tokens with the dense
mask: compute, not only overhead). The Triton launch itself (tens of microseconds on Triton
3.6) is not included: add it per kernel launched.

`--device cuda` (a GPU machine) runs the same calls for real on tiny CUDA tensors, launches
included, and times `--calls` of them between two synchronisations: the kernels take a few
microseconds, so the time per call is the host's (Python, dispatch, the autograd engine's device
thread for a backward, the launches), the floor that do_bench reports for a small shape. Where
this is far below the suite's small-shape rows, the floor is on the device side instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _stub_triton_launches() -> None:
    """Make `kernel[grid](...)` a no-op for every @triton.jit function (compiled or interpreted)."""
    import triton.runtime.jit as jit

    jit.JITFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    try:
        import triton.runtime.interpreter as interp

        interp.InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    except (ImportError, AttributeError):
        pass


_SYNC = [lambda: None]  # torch.cuda.synchronize with --device cuda


def per_call_us(fn, calls: int) -> float:
    for _ in range(max(10, calls // 20)):
        fn()
    _SYNC[0]()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _SYNC[0]()
    return (time.perf_counter() - t0) / calls * 1e6


def _fwd_bwd_rows(name: str, ours, theirs, leaves, grad_out, calls: int) -> list[tuple[str, float, float]]:
    """Forward without and with grad, then backward (retain_graph), for one op and its torch twin."""
    import torch

    def backward(fn):
        out = fn()
        return per_call_us(lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True), calls)

    with torch.no_grad():
        rows = [(f"{name} forward, no grad", per_call_us(ours, calls), per_call_us(theirs, calls))]
    rows.append((f"{name} forward, grad", per_call_us(ours, calls), per_call_us(theirs, calls)))
    rows.append((f"{name} backward", backward(ours), backward(theirs)))
    return rows


def measure(calls: int, device: str = "cpu", backend: str = "triton") -> list[tuple[str, float, float]]:
    """(case, tfkernels us, torch us) per call."""
    import torch
    import torch.nn.functional as F

    import tfkernels

    dev = torch.device(device)  # explicit: torch.set_default_device is a function mode, which costs every call

    x, w, b = (torch.randn(*shape, requires_grad=True, device=dev) for shape in ((4, 8), (8,), (8,)))
    rows = _fwd_bwd_rows("layer_norm", lambda: tfkernels.layer_norm(x, (8,), w, b, backend=backend),
                         lambda: F.layer_norm(x, (8,), w, b), (x, w, b), torch.randn(4, 8, device=dev), calls)
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True, device=dev) for _ in range(3))
    rows += _fwd_bwd_rows("attention (causal)", lambda: tfkernels.attention(q, k, v, is_causal=True, backend=backend),
                          lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v),
                          torch.randn(1, 2, 64, 16, device=dev), calls)
    # packed documents (4 of 64 tokens), against SDPA with the equivalent dense mask
    qd, kd, vd = (torch.randn(1, 2, 256, 16, requires_grad=True, device=dev) for _ in range(3))
    ids = (torch.arange(256, device=dev) // 64)[None].int()
    dense = (ids[0, :, None] == ids[0, None, :]) & torch.ones(256, 256, dtype=torch.bool, device=dev).tril()
    rows += _fwd_bwd_rows("attention (document_ids)",
                          lambda: tfkernels.attention(qd, kd, vd, is_causal=True, document_ids=ids, backend=backend),
                          lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dense), (qd, kd, vd),
                          torch.randn(1, 2, 256, 16, device=dev), calls)
    # the same ids in every call are a model's layers 2..L (the ids' conversion and ranges are
    # remembered per ids tensor); a new ids tensor each call is the first layer of each step
    with torch.no_grad():
        rows.append(("attention (document_ids), new ids each call, forward, no grad",
                     per_call_us(lambda: tfkernels.attention(qd, kd, vd, is_causal=True, document_ids=ids.clone(),
                                                             backend=backend), calls),
                     per_call_us(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dense.clone()), calls)))
    qv, kv, vv = (t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (qd, kd, vd))
    cu = torch.tensor([0, 64, 128, 192, 256], dtype=torch.int32, device=dev)
    rows += _fwd_bwd_rows("varlen_attention", lambda: tfkernels.varlen_attention(qv, kv, vv, cu, cu, 64, 64, causal=True,
                                                                                  backend=backend),
                          lambda: F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qv, kv, vv)),
                                                                 attn_mask=dense)[0].transpose(0, 1),
                          (qv, kv, vv), torch.randn(256, 2, 16, device=dev), calls)
    with torch.no_grad():
        rows.append(("varlen_attention, new offsets each call, forward, no grad",
                     per_call_us(lambda: tfkernels.varlen_attention(qv, kv, vv, cu.clone(), None, 64, 64, causal=True,
                                                                    backend=backend), calls),
                     per_call_us(lambda: F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qv, kv, vv)),
                                                                        attn_mask=dense.clone())[0].transpose(0, 1),
                                 calls)))
    # one decoding step: B = 1, 4 heads, 100 cached keys of 512 slots, the new token's key and value
    # appended in place (cache_seqlens an int: no host read), against SDPA over the filled slots
    kc, vc = torch.randn(1, 512, 4, 16, device=dev), torch.randn(1, 512, 4, 16, device=dev)
    qn, kn, vn = (torch.randn(1, 1, 4, 16, device=dev) for _ in range(3))
    with torch.no_grad():
        rows.append(("kvcache_attention decode step (B = 1), no grad",
                     per_call_us(lambda: tfkernels.kvcache_attention(qn, kc, vc, 100, kn, vn, backend=backend), calls),
                     per_call_us(lambda: F.scaled_dot_product_attention(
                         qn.transpose(1, 2), kc[:, :101].transpose(1, 2), vc[:, :101].transpose(1, 2)), calls)))
    with torch.no_grad():
        rows.append(("softmax forward, no grad", per_call_us(lambda: tfkernels.softmax(x, -1, backend=backend), calls),
                     per_call_us(lambda: torch.softmax(x, -1), calls)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="timed calls per case")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: real launches on a GPU (default: cpu, Triton launches stubbed)")
    p.add_argument("--backend", default="triton", choices=("triton", "cuda"),
                   help="tfkernels backend (with --device cuda)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("host_overhead: --device cuda needs a GPU", file=sys.stderr)
            return 2
        _SYNC[0] = torch.cuda.synchronize
        print(f"| call ({torch.cuda.get_device_name()}, backend {args.backend}, launches included) "
              "| tfkernels us | torch us |\n|---|---:|---:|")
        for name, ours, theirs in measure(args.calls, "cuda", args.backend):
            print(f"| {name} | {ours:.1f} | {theirs:.1f} |")
        return 0
    # CPU tensors reach the Triton launchers only with the interpreter on; the launches are no-ops anyway
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "tfkernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("host_overhead: tfkernels was imported without TRITON_INTERPRET=1; run it in a fresh process",
              file=sys.stderr)
        return 2
    _stub_triton_launches()
    print("| call | tfkernels host us | torch us |\n|---|---:|---:|")
    for name, ours, theirs in measure(args.calls):
        print(f"| {name} | {ours:.1f} | {theirs:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
