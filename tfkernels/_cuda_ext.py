"""Loader for the optional CUDA C++ extension built from csrc/ (the "cuda" backend).

The extension registers its kernels as `torch.ops.tfkernels_cuda.<name>`; each op file calls them
through `ops()` with the same arguments as its Triton launcher. Two ways to get it:

1. prebuilt: `TFKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .` builds `tfkernels._C`;
2. JIT: otherwise the first `is_available(load=True)` (the first call with backend="cuda", or the
   automatic backend falling back to cuda) compiles csrc/ with `torch.utils.cpp_extension.load`
   (ninja) into ~/.cache/tfkernels/<torch version>-<hash of sources and flags>/ and reuses that
   build on later runs. Archs: TFKERNELS_CUDA_ARCHS when set, else the current GPU's.
   TFKERNELS_CUDA_JIT=0 turns this off (the cuda backend is then unavailable unless prebuilt).
3. emulated: with TFKERNELS_CUDA_EMULATE=1 (read at the first load), neither of the above: csrc/ is
   built for the host by tfkernels/_cuda_emu.py and the ops run the CUDA kernels' code on CPU
   tensors (`is_emulated()`), which is how the cuda backend is tested without a GPU.

Nothing here raises on import of tfkernels; when the extension cannot be had, `is_available`
returns False and `unavailable_reason()` says why (CPU-only torch, no GPU, nvcc missing, build error).
"""
from __future__ import annotations

import hashlib
import os
import threading

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_JIT_NAME = "tfkernels_cuda_jit"

_lock = threading.Lock()
_state = {"ops": None, "error": "the CUDA C++ extension is not loaded", "prebuilt_tried": False, "jit_tried": False,
          "emulated": None}


def is_available(load: bool = False) -> bool:
    """True when torch.ops.tfkernels_cuda is registered; with load=True, JIT-compile it if needed."""
    if _state["ops"] is not None:
        return True
    with _lock:
        if _state["emulated"] is None:
            from . import _config

            _state["emulated"] = _config.cuda_emulation()
        if _state["emulated"]:
            if _state["ops"] is None and load and not _state["jit_tried"]:
                _state["jit_tried"] = True
                _try(_load_emulated)
            return _state["ops"] is not None
        if _state["ops"] is None and not _state["prebuilt_tried"]:
            _state["prebuilt_tried"] = True
            _try(_load_prebuilt)
        if _state["ops"] is None and load and not _state["jit_tried"]:
            _state["jit_tried"] = True
            _try(_load_jit)
    return _state["ops"] is not None


def is_emulated() -> bool:
    """True when the cuda backend is the host emulation (TFKERNELS_CUDA_EMULATE=1, read at the first load)."""
    if _state["emulated"] is None:
        from . import _config

        return _config.cuda_emulation()
    return bool(_state["emulated"])


def unavailable_reason() -> str:
    return _state["error"]


def ops():
    """torch.ops.tfkernels_cuda (loading the extension first if needed)."""
    if _state["ops"] is None and not is_available(load=True):
        raise RuntimeError(unavailable_reason())
    return _state["ops"]


def _try(fn) -> None:
    try:
        fn()
    except Exception as err:  # never let a build problem escape into an op call or the import
        _state["error"] = f"the CUDA C++ extension could not be loaded: {type(err).__name__}: {err}"


def _registered():
    import torch

    ns = torch.ops.tfkernels_cuda
    ns.softmax_fwd  # raises when the library did not register its ops
    return ns


def _load_prebuilt() -> None:
    try:
        from . import _C  # noqa: F401  (built by setup.py with TFKERNELS_BUILD_CUDA=1)
    except ImportError as err:
        _state["error"] = f"the CUDA C++ extension is not built (import tfkernels._C: {err})"
        return
    _state["ops"] = _registered()


def _load_emulated() -> None:
    from . import _cuda_emu

    _cuda_emu.build()
    _state["ops"] = _registered()


def _source_files() -> list[str]:
    if not os.path.isdir(_CSRC):
        return []
    return sorted(os.path.join(_CSRC, f) for f in os.listdir(_CSRC) if f.endswith((".cu", ".cpp", ".h", ".cuh")))


def locked_load(build_dir: str, **kwargs):
    """torch.utils.cpp_extension.load(build_directory=build_dir, **kwargs) under an OS file lock.

    torch's own build lock is a plain file (`lock` in the build directory): a build that is killed
    leaves it behind, and every later build then waits for it forever, or gives up and fails to
    import a module that was never built. An flock dies with its process, so whoever holds it knows
    that any `lock` file left in the directory is stale and removes it.
    """
    from torch.utils import cpp_extension

    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        return cpp_extension.load(build_directory=build_dir, **kwargs)
    with open(os.path.join(build_dir, "tfkernels-build.flock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # held until this build ends; released by the OS if it dies
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            os.remove(stale)
        return cpp_extension.load(build_directory=build_dir, **kwargs)


def _arch_flags() -> list[str]:
    import torch

    from . import _config

    archs = os.environ.get("TFKERNELS_CUDA_ARCHS")
    if archs:
        archs = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    else:
        major, minor = torch.cuda.get_device_capability()
        archs = [f"{major}{minor}"] if major else [a for a in _config.cuda_archs().split(";") if a]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def _load_jit() -> None:
    import torch

    from . import _config

    if not _config.cuda_jit_allowed():
        # timed runs on a fresh machine (benchmarks/gpu_session.sh) must not spend minutes in nvcc on first use
        _state["error"] = f"{_state['error']}; TFKERNELS_CUDA_JIT=0 forbids compiling it on first use"
        return
    if torch.version.cuda is None:
        _state["error"] = f"torch {torch.__version__} is a CPU-only build (the cuda backend needs a CUDA build of torch)"
        return
    if not torch.cuda.is_available():
        _state["error"] = "no CUDA device is available"
        return
    from torch.utils import cpp_extension

    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        _state["error"] = ("nvcc was not found (set CUDA_HOME to a CUDA toolkit), so the CUDA C++ extension cannot be "
                           "JIT-compiled; or build it at install: TFKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .")
        return
    if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime_api.h")):
        _state["error"] = (f"CUDA_HOME={cpp_extension.CUDA_HOME} has no include/cuda_runtime_api.h (an nvcc wrapper "
                           "on PATH?); set CUDA_HOME to the CUDA toolkit's root, e.g. /usr/local/cuda")
        return
    files = _source_files()
    sources = [f for f in files if f.endswith((".cu", ".cpp"))]
    if not sources:
        _state["error"] = f"the csrc/ sources are not available (looked in {_CSRC}); install from a source checkout"
        return
    from ._nvcc import COMMON_FLAGS, cxx, parallel_flags, shared_libstdcxx

    cuda_flags = COMMON_FLAGS + _arch_flags() + parallel_flags(nvcc)
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(os.path.basename(f).encode() + b"\0" + fh.read())
    h.update(" ".join(cuda_flags).encode())
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    build_dir = os.path.join(cache, "tfkernels", f"{torch.__version__}-{h.hexdigest()[:16]}")
    os.makedirs(build_dir, exist_ok=True)
    locked_load(
        build_dir,
        name=_JIT_NAME,
        sources=sources,
        extra_include_paths=[_CSRC],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=shared_libstdcxx(cxx()),
        verbose=os.environ.get("TFKERNELS_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    _state["ops"] = _registered()
