"""Configuration read from the environment, in one place.

TFKERNELS_BACKEND   default backend for every op: "triton", "cuda" or "torch" (unset = automatic)
TRITON_INTERPRET    "1" runs Triton kernels on CPU tensors (numpy underneath); the automatic
                    backend then picks Triton for CPU tensors too (this is how CI tests kernels)
TFKERNELS_BUILD_CUDA, TFKERNELS_CUDA_ARCHS, MAX_JOBS   read by setup.py and the JIT loader
TFKERNELS_CUDA_JIT  "0" never JIT-compiles the CUDA extension on first use (only a prebuilt one loads)
TFKERNELS_CUDA_EMULATE  "1" builds the cuda backend for the host instead (csrc/emulation): it then
                    runs the CUDA kernels' code on CPU tensors, for testing without a GPU
TFKERNELS_CUDA_EMU_SANITIZE  "address", "undefined" or both: the emulation built with those sanitizers
                    (csrc/README.md has the command)
"""
from __future__ import annotations

import os

BACKENDS = ("triton", "cuda", "torch")


def env_backend() -> str | None:
    """The default backend from TFKERNELS_BACKEND (read at call time, so tests can set it)."""
    value = os.environ.get("TFKERNELS_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"TFKERNELS_BACKEND={value!r} is not a backend; expected one of {BACKENDS} or unset"
        )
    return value


def check_backend(backend) -> str | None:
    """A `backend=` argument as the ops read it (lower case), or None; TypeError / ValueError naming it."""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend.lower() not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend; expected one of {BACKENDS} or None")
    return backend.lower()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_archs() -> str:
    return os.environ.get("TFKERNELS_CUDA_ARCHS", "80;90")


def build_cuda_flag() -> str | None:
    """'1' forces the CUDA extension build, '0' skips it, None decides by what is installed."""
    value = os.environ.get("TFKERNELS_BUILD_CUDA")
    return value if value in ("0", "1") else None


def cuda_jit_allowed() -> bool:
    """False when TFKERNELS_CUDA_JIT=0: only a prebuilt CUDA extension may load."""
    return os.environ.get("TFKERNELS_CUDA_JIT", "").strip() != "0"


def cuda_emulation() -> bool:
    """True when TFKERNELS_CUDA_EMULATE=1: the cuda backend is the host emulation of csrc/ (CPU tensors)."""
    return os.environ.get("TFKERNELS_CUDA_EMULATE", "").strip() not in ("", "0")
