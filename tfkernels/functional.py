"""`torch.nn.functional.scaled_dot_product_attention` on tfkernels, for models that call it directly
(nanoGPT, timm, torchtitan and most hand-written Transformers do; there is no module to replace):

    with tfkernels.sdpa_override():          # F.scaled_dot_product_attention -> tfkernels.attention
        loss = model(x)

    tfkernels.swap(model)                    # does the same around every forward of `model`

While the override is active, `torch.nn.functional.scaled_dot_product_attention` is a function with
SDPA's signature that runs `tfkernels.attention` (a superset of SDPA's semantics: the same masks,
dropout, scale, GQA, layouts; a fully masked row gives 0 where SDPA's math backend gives NaN)
where a tfkernels kernel backend runs the inputs (fp16/bf16/fp32, head dims up to 256, a device
the Triton or CUDA kernels run on), and the original SDPA elsewhere, so nothing is slower than
before (on a CPU without the interpreter, for instance, SDPA keeps its CPU kernels). With a
backend named (`sdpa_override(backend="cuda")`), every call runs that backend.

It patches the attribute on the `torch.nn.functional` module while any thread is inside an
override (nested and re-entrant: what was there before, torch's function or another library's
patch, comes back when the outermost exit runs, and serves the calls no kernel takes; a forward
that raises still restores it), but routes only the calls of the threads inside one, each with its
own backend, like torch.no_grad: another thread calling SDPA meanwhile (a second model served
beside the first) gets what was there before. Code that bound the function before
(`from torch.nn.functional import scaled_dot_product_attention`) keeps the original. Under torch.compile the patch is traced like
any other Python: the compiled graph holds the tfkernels op. Activation checkpointing recomputes
its segment in the backward, outside the override: the recomputation uses SDPA (the same math,
so the gradients agree to rounding).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend, _config
from .ops.attention import MAX_HEAD_DIM, attention

_ORIGINAL = F.scaled_dot_product_attention
_saved = [_ORIGINAL]  # what the outermost override replaced (another library's patch, maybe) and restores
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_lock = threading.Lock()
_depth = [0]  # active overrides in every thread: the patch is installed while > 0 (mutated in place)
_local = threading.local()  # per thread: .backends, its active overrides' backends, the innermost last


def _thread_backends() -> list:
    stack = getattr(_local, "backends", None)
    if stack is None:
        stack = _local.backends = []
    return stack


def _kernel_eligible(q, k, v) -> bool:
    """Whether the automatic backend would run a tfkernels kernel on these inputs."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return False
    if q.dtype not in _KERNEL_DTYPES or max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return False
    try:
        return _backend.resolve(None, q, "attention") != "torch"
    except Exception:  # noqa: BLE001 — whatever the automatic choice objects to, SDPA runs it
        return False


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """SDPA's signature; tfkernels.attention where a kernel runs it, the original SDPA elsewhere."""
    stack = _thread_backends()
    backend = stack[-1] if stack else None
    if not stack or (backend is None and not _kernel_eligible(query, key, value)):
        # not stack: a thread outside any override, while another thread is inside one, keeps SDPA
        return _saved[0](query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend)


def _enter(backend: Optional[str]) -> None:
    _locked(_push, backend)


def _exit() -> None:
    _locked(_pop)


def _push(backend) -> None:
    if _depth[0] == 0 and F.scaled_dot_product_attention is not scaled_dot_product_attention:
        _saved[0] = F.scaled_dot_product_attention
    _thread_backends().append(backend)
    _depth[0] += 1
    F.scaled_dot_product_attention = scaled_dot_product_attention


def _pop() -> None:
    _thread_backends().pop()
    _depth[0] -= 1
    if _depth[0] == 0:
        F.scaled_dot_product_attention = _saved[0]


def _locked(fn, *args) -> None:
    # threads entering and leaving together must not leave the attribute behind; torch.compile
    # traces the hooks (and cannot enter a lock), and runs the traced side effects itself
    if torch.compiler.is_compiling():
        fn(*args)
        return
    with _lock:
        fn(*args)


@contextlib.contextmanager
def sdpa_override(backend: Optional[str] = None):
    """Route `torch.nn.functional.scaled_dot_product_attention` to tfkernels inside the block (see
    the module docstring). backend: "triton", "cuda", "torch", or None (kernels where they run,
    SDPA elsewhere)."""
    backend = _config.check_backend(backend)
    _enter(backend)
    try:
        yield
    finally:
        _exit()


def active() -> bool:
    return _depth[0] > 0


__all__ = ["scaled_dot_product_attention", "sdpa_override"]
