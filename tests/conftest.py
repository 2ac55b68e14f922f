"""Shared test set-up.

Without a GPU, the Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
Triton's `@jit` decorators run, i.e. before tfkernels is imported, so it is set here.
With a GPU, tests run on CUDA tensors for every available kernel backend.
With TFKERNELS_CUDA_EMULATE=1 and no GPU, the cuda backend is the host emulation of csrc/
(tfkernels/_cuda_emu.py) and its tests run on CPU tensors too (this is how CI tests the CUDA kernels).
"""
import os
import tempfile

import torch

# Inductor caches compiled graphs across runs, keyed by the graph and torch, not by this package's
# fake implementations: a graph cached by an older checkout would replay that checkout's output
# strides (and fail its own stride asserts). A fresh cache for each test run.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tfkernels-inductor-"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tfkernels  # noqa: E402
import tfkernels.nn as tnn  # noqa: E402
from tfkernels import _backend, _config, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tolerances relative to the largest magnitude of the float64 reference: |out - ref| <= atol + rtol*max|ref|.
# fp32 kernels accumulate in fp32 (~1e-6 relative); fp16/bf16 outputs are rounded to 11/8 mantissa bits.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=3e-2),
}


# The CUDA C++ backend runs here: on the GPU when not emulated, on the CPU when emulated.
CUDA_EMULATED = _config.cuda_emulation()
CUDA_BACKEND_DEVICE = DEVICE == ("cpu" if CUDA_EMULATED else "cuda")


def kernel_backends():
    """Kernel backends that can run here: triton (interpreter on CPU), and cuda when built or emulated.

    An emulation that was asked for but does not build is not dropped: its tests then fail with the
    build error rather than silently running Triton alone."""
    out = ["triton"]
    if CUDA_BACKEND_DEVICE and (CUDA_EMULATED or _backend.cuda_ext_available(load=True)):
        out.append("cuda")
    return out


@pytest.fixture(params=kernel_backends())
def backend(request):
    return request.param


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts calls to tfkernels.attention (the list of their `backend` arguments): through the package
    (what attn_implementation="tfkernels" calls) and through tfkernels.nn, which binds the op at import."""
    fn = tfkernels.attention
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return fn(*args, **kwargs)

    monkeypatch.setattr(tfkernels, "attention", spy)
    monkeypatch.setattr(tnn, "attention", spy)
    return calls


def assert_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "", scale: float = 1.0):
    """Compare a kernel result with a float64 reference using the dtype's tolerance."""
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    a, r = actual.double().cpu(), ref.double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(r).all(), f"{name}: non-finite values differ"
    tol = TOL[dtype]
    err = (a - r).abs().max().item() if a.numel() else 0.0
    bound = scale * (tol["atol"] + tol["rtol"] * (r.abs().max().item() if r.numel() else 0.0))
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} ({dtype})"


_STOP_BACKGROUND = []  # what to end at the session's end, for the jobs started below


def _start_emulated_build(items):
    """The emulated CUDA backend is built (~1 min of g++ on 2 cores) by its first test, which would
    otherwise wait for it: build it on a thread from the start and run the Triton-only tile tests
    (test_attention_gpu_tiles, ~2 min) first, so the build overlaps them. A test that needs the
    backend before the build is done waits on _cuda_ext's lock, as it would have waited anyway."""
    if not (CUDA_EMULATED and CUDA_BACKEND_DEVICE) or not any("cuda" in item.nodeid for item in items):
        return
    import threading

    from tfkernels import _cuda_ext

    def build():
        try:  # niced like the other background jobs: on Linux a thread's nice value is its own, and the
            # compilers it starts inherit it, so the tests running meanwhile keep their core
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        _cuda_ext.is_available(load=True)

    threading.Thread(target=build, name="tfkernels-emulated-build", daemon=True).start()
    first = [item for item in items if item.path.name == "test_attention_gpu_tiles.py"]
    rest = [item for item in items if item.path.name != "test_attention_gpu_tiles.py"]
    items[:] = first + rest


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected: start only what will run
def pytest_collection_modifyitems(config, items):
    # CPU-bound checks that need no test to run first start now, in the background (niced), so that
    # they overlap the single-threaded tests on CI's second core instead of adding to the suite:
    # the Triton static reports (test_triton_static, ~1.5 min), then the nvcc compile guard
    # (test_cuda_build, minutes), whose test runs last. Not under pytest-xdist: every worker
    # collects every test, and each would start them.
    if not config.option.collectonly and "PYTEST_XDIST_WORKER" not in os.environ:
        static = [item for item in items if item.path.name == "test_triton_static.py"
                  and "report" in getattr(item, "fixturenames", ())]
        if static:
            static[0].module.start_reports()
            _STOP_BACKGROUND.append(static[0].module.stop_reports)
        _start_emulated_build(items)
        compile_guard = [item for item in items if item.name == "test_kernels_compile"]
        if compile_guard:
            items[:] = [item for item in items if item not in compile_guard] + compile_guard
            _STOP_BACKGROUND.append(compile_guard[0].module.stop_compile)
            compile_guard[0].module.start_compile()
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not `"cuda" in item.keywords`: a test parametrised with backend="cuda" has the
        # keyword "cuda" too (its id), and on the host emulation it must run
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    for stop in _STOP_BACKGROUND:
        stop()  # a run that stopped early (-x, Ctrl-C, -k) leaves no compiler behind


def visible_keys(diag, n_keys, causal, window):
    """(T_q, n_keys) bool for the float64 references of the packed and cached ops: query i, whose
    diagonal key position is diag[i] ((T_q, 1) int), sees key j when causal allows it (j <= diag) and
    j is in the window (diag - left .. diag + right, -1 unbounded)."""
    j = torch.arange(n_keys, device=diag.device)[None, :]
    keep = torch.ones(diag.shape[0], n_keys, dtype=torch.bool, device=diag.device)
    if causal:
        keep &= j <= diag
    if window[0] >= 0:
        keep &= j >= diag - window[0]
    if window[1] >= 0:
        keep &= j <= diag + window[1]
    return keep


def assert_attention_layout(t, like, name=""):
    """t is dense in like's order of heads and time (dims -3 and -2), as the kernels write their output
    and gradients (tfkernels/ops/attention.py _like_layout): (..., T, H, D) memory seen through a
    transpose when like's heads are inner to its time steps, else contiguous. Size-1 dims' strides
    do not matter (torch treats them as any)."""
    if like.shape[-3] > 1 and like.shape[-2] > 1 and like.stride(-3) < like.stride(-2):
        assert t.transpose(-3, -2).is_contiguous(), (name, t.shape, t.stride(), like.stride())
    else:
        assert t.is_contiguous(), (name, t.shape, t.stride(), like.stride())


def check_attention(q, k, v, backend, dtype, mask=None, is_causal=False, scale=None, enable_gqa=False,
                    dropout_p=0.0, dropout_mask=None, seed=None, out_scale=1.0, grad_scale=2.0, window_size=None,
                    softcap=0.0, document_ids=None):
    """tfkernels.attention vs the float64 reference on the same values: the output and every gradient
    (q, k, v and a float mask). The mask's gradient comes back in the mask's dtype, so an fp16 mask of
    fp32 inputs is held to fp16's tolerance. Returns the output."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    mask_leaf = mask.detach().requires_grad_(True) if mask is not None and mask.is_floating_point() else None
    if seed is not None:
        torch.manual_seed(seed)
    out = tfkernels.attention(*leaves, attn_mask=mask_leaf if mask_leaf is not None else mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, window_size=window_size,
                              softcap=softcap, document_ids=document_ids, backend=backend)
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == q.dtype
    assert_attention_layout(out, q, "out")
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_mask = mask.detach().double().requires_grad_(True) if mask_leaf is not None else mask
    ref = reference.attention(*ref_leaves, attn_mask=ref_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa, dropout_mask=dropout_mask, window_size=window_size,
                              softcap=softcap, document_ids=(document_ids, document_ids)
                              if isinstance(document_ids, torch.Tensor) else document_ids)
    assert_close(out, ref, dtype, "out", scale=out_scale)
    dout = torch.randn_like(out)
    extra = 1 if mask_leaf is not None else 0
    grads = torch.autograd.grad(out, leaves + [mask_leaf] * extra, dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves + [ref_mask] * extra, dout.double())
    for name, g, r in zip(["dq", "dk", "dv", "dmask"], grads, ref_grads):
        assert g.shape == r.shape, name
        tol_dtype = g.dtype if name == "dmask" and TOL[g.dtype]["rtol"] > TOL[dtype]["rtol"] else dtype
        assert_close(g, r, tol_dtype, name, scale=grad_scale)
    return out
