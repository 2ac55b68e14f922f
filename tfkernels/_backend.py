"""Backend selection: which implementation serves a call.

- "triton": the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
- "cuda":   the CUDA C++ extension from csrc/ (CUDA tensors; CPU tensors when TFKERNELS_CUDA_EMULATE=1
            builds it as the host emulation, for tests without a GPU).
- "torch":  the plain-PyTorch reference in tfkernels.reference.
- None:     automatic, from TFKERNELS_BACKEND if set, else triton on CUDA tensors, then cuda,
            then torch; torch on CPU (triton there only under the interpreter).

A backend named explicitly that cannot serve the call raises BackendUnavailableError. The
automatic choice may fall back, and warns once per (op, reason) when it does — never per call.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

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


def resolve(backend: str | None, x: torch.Tensor, op: str, unfit: str | None = None) -> str:
    """Return the backend that serves `op` on tensors like `x`.

    Returns "triton", "cuda", "torch", or "auto" (= try Triton, fall back to cuda if the Triton
    kernel fails to compile; only produced when both are usable and nothing was named).
    `unfit`: why no kernel can take this call (the op's own limits, e.g. attention's head dim), or
    None; the automatic choice then runs the reference and says so once, a named kernel backend is
    returned as asked and the op raises.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend is not None:
        backend = backend.lower()
        if backend not in _config.BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; expected one of {_config.BACKENDS} or None")
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
    if x.dtype == torch.float64:  # no kernel takes it: gradchecks and references of a swapped model run
        return "torch"
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
