"""Backend selection: which implementation serves a call.

- "triton": the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
- "cuda":   the CUDA C++ extension from csrc/ (CUDA tensors; CPU tensors when TFKERNELS_CUDA_EMULATE=1
            builds it as the host emulation, for tests without a GPU).
- "torch":  the plain-PyTorch reference in tfkernels.reference.
- None:     automatic, from TFKERNELS_BACKEND if set, else triton on CUDA tensors, then cuda,
            then torch; torch on CPU (triton there only under the interpreter).

A backend named explicitly that cannot serve the call raises BackendUnavailableError. The
automatic choice may fall back, and warns once per (op, reason) when it does — never per call.
Whatever TFKERNELS_BACKEND says, the automatic choice runs the reference for float64 and under
autodiff the kernels have no rule for (forward-mode AD, torch.func transforms; see
`autodiff_transform`).
"""
from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.autograd.forward_ad as _fwad

from . import _config


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


def _probe_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken Triton install must not break the package
        return False
    return True


# probed once at import (a plain global, so torch.compile traces resolve() without a cache wrapper)
_TRITON_OK = _probe_triton()


def triton_available() -> bool:
    return _TRITON_OK


# torch.compile runs this eagerly and takes its answer as a constant: the first call may load (or
# JIT-build) the extension under a lock, which dynamo cannot trace (fullgraph would fail on a first
# backend="cuda" call inside a compiled function).
@torch.compiler.assume_constant_result
def cuda_ext_available(load: bool = False) -> bool:
    """True when the CUDA C++ extension is (or, with load=True, can be made) importable."""
    try:
        from . import _cuda_ext
    except ImportError:
        return False
    return _cuda_ext.is_available(load=load)


def _cuda_emulated() -> bool:
    from . import _cuda_ext

    return _cuda_ext.is_emulated()


_warned: set = set()


def warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ops whose Triton kernel failed to compile on this machine: the automatic choice skips them
_triton_broken: set = set()


def autodiff_transform(tensors) -> str | None:
    """The autodiff mode active for this call that the kernel ops have no rule for, or None.

    The custom ops register a backward only. Under forward-mode AD (torch.autograd.forward_ad) a
    custom op without a forward-AD rule gives a zero tangent, silently, and under torch.func's
    differentiating transforms (jvp, grad, jacrev, jacfwd, hessian) it gives zero tangents or fails
    with a misleading error; the reference is plain torch and right under all of them. Not checked
    while torch.compile traces (dynamo cannot trace the checks; a compiled graph calls the ops).
    """
    if torch.compiler.is_compiling():
        return None
    if torch._C._functorch.peek_interpreter_stack() is not None:  # cheap; the stack only when set
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        # vmap alone is fine: torch runs the ops once per sample (its batched fallback)
        if any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters()):
            return "torch.func's grad/jvp transforms"
    if _fwad._current_level >= 0 and any(
            t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors):
        return "forward-mode AD"
    return None


def differentiable_backward() -> bool:
    """True in a backward that autograd runs with create_graph=True (it runs it in grad mode then):
    the ops then compute their gradients through the reference's autograd, as a graph that can be
    differentiated again (gradient penalties, Hessian-vector products); the kernels' backward is
    first-order only. False while torch.compile traces: it traces the backward without grad mode,
    and a compiled graph keeps the kernels."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def reference_vjp(fn, inputs, needs, grad):
    """The vector-Jacobian products grad . d fn(*inputs) / d input for the inputs whose `needs` is
    True (None for the others), built with create_graph=True so that they are differentiable."""
    wanted = [t for t, n in zip(inputs, needs) if n]
    got = iter(torch.autograd.grad(fn(*inputs), wanted, grad, create_graph=True) if wanted else ())
    return [next(got) if n else None for n in needs]


def resolve(backend: str | None, x: torch.Tensor, op: str, unfit: str | None = None, others=()) -> str:
    """Return the backend that serves `op` on tensors like `x`.

    Returns "triton", "cuda", "torch", or "auto" (= try Triton, fall back to cuda if the Triton
    kernel fails to compile; only produced when both are usable and nothing was named).
    `unfit`: why no kernel can take this call (the op's own limits, e.g. attention's head dim), or
    None; the automatic choice then runs the reference and says so once, a named kernel backend is
    returned as asked and the op raises. `others`: the op's other tensor inputs (for the autodiff
    check: any of them may carry a forward-mode tangent).
    """
    backend = _config.check_backend(backend)
    if backend == "torch":
        return "torch"
    transform = autodiff_transform((x, *others))
    if transform is not None:
        if backend is not None:
            raise BackendUnavailableError(
                f"{op}: backend={backend!r} cannot run under {transform}: the kernels define a backward "
                "only; use backend=None (runs the PyTorch reference there) or backend='torch'")
        warn_once(("transform", op, transform),
                  f"tfkernels: {op} under {transform}: the kernels define a backward only; using the PyTorch reference")
        return "torch"
    if backend is None and x.dtype == torch.float64:  # no kernel takes it: gradchecks of a swapped model run
        return "torch"
    explicit = backend if backend is not None else _config.env_backend()
    on_cuda = x.is_cuda
    if explicit == "torch":
        return "torch"
    if explicit == "triton":
        if not triton_available():
            raise BackendUnavailableError(f"{op}: backend='triton' requested but Triton is not installed")
        if not on_cuda and not _config.triton_interpret():
            raise BackendUnavailableError(
                f"{op}: backend='triton' needs CUDA tensors (got device {x.device}); "
                "set TRITON_INTERPRET=1 to run the Triton kernels on CPU"
            )
        return "triton"
    if explicit == "cuda":
        emulated = _config.cuda_emulation()
        if not on_cuda and not emulated:
            raise BackendUnavailableError(f"{op}: backend='cuda' needs CUDA tensors (got device {x.device})")
        if not cuda_ext_available(load=True):
            from . import _cuda_ext

            raise BackendUnavailableError(f"{op}: backend='cuda' requested but {_cuda_ext.unavailable_reason()}")
        if _cuda_emulated() and x.device.type != "cpu":
            raise BackendUnavailableError(
                f"{op}: backend='cuda' is the host emulation here (TFKERNELS_CUDA_EMULATE=1), which takes CPU "
                f"tensors (got device {x.device}); unset it to use the CUDA kernels on the GPU")
        return "cuda"
    # automatic
    choice = _automatic(x, op)
    if unfit is not None and choice != "torch":
        warn_once(("unfit", op, unfit), f"tfkernels: {op}: {unfit}; using the PyTorch reference")
        return "torch"
    return choice


def _automatic(x: torch.Tensor, op: str) -> str:
    """The automatic choice for `op` on tensors like `x`, as far as the backends' availability goes."""
    if x.is_cuda:
        # the emulated cuda backend (CPU tensors only) is never an automatic choice
        real_cuda = not _config.cuda_emulation()
        if triton_available() and op not in _triton_broken:
            return "auto" if real_cuda and cuda_ext_available(load=False) else "triton"
        if real_cuda and cuda_ext_available(load=True):
            warn_once(("fallback-cuda", op), f"tfkernels: Triton unavailable for {op}; using the CUDA C++ backend")
            return "cuda"
        warn_once(("fallback-torch", op), f"tfkernels: neither Triton nor the CUDA extension can run {op}; using the PyTorch reference")
        return "torch"
    if _config.triton_interpret() and triton_available():
        return "triton"
    return "torch"


def run(op: str, backend: str, triton_fn, cuda_fn, *args):
    """Run an op's kernel for a resolved backend ("triton", "cuda" or "auto")."""
    if backend == "cuda":
        return cuda_fn(*args)
    if backend == "triton":
        return triton_fn(*args)
    if backend == "auto":
        if op not in _triton_broken:
            try:
                return triton_fn(*args)
            except Exception as err:  # compilation failures surface here on first launch
                if not _is_compile_error(err):
                    raise
                _triton_broken.add(op)
                warn_once(("compile", op), f"tfkernels: Triton kernel for {op} failed to compile ({err!r}); using the CUDA C++ backend")
        return cuda_fn(*args)
    raise ValueError(f"internal: unexpected resolved backend {backend!r} for {op}")


def _is_compile_error(err: Exception) -> bool:
    try:
        from triton.compiler.errors import CompilationError
    except Exception:
        CompilationError = ()
    name = type(err).__name__
    return isinstance(err, CompilationError) or name in ("CompilationError", "OutOfResources", "PTXASError")
