"""Loader for the optional CUDA C++ extension built from csrc/ (the "cuda" backend).

The extension registers its kernels as `torch.ops.tfkernels_cuda.<name>`; each op file calls them
through `ops()` with the same arguments as its Triton launcher.
"""
from __future__ import annotations

_state = {"ops": None, "error": "the CUDA C++ extension is not built (the cuda backend is not implemented yet)"}


def is_available(load: bool = False) -> bool:
    return _state["ops"] is not None


def unavailable_reason() -> str:
    return _state["error"]


def ops():
    if _state["ops"] is None:
        raise RuntimeError(unavailable_reason())
    return _state["ops"]
