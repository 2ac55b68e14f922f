"""Host emulation of the CUDA C++ backend: the csrc/ kernels, run on the CPU (TFKERNELS_CUDA_EMULATE=1).

Machines without a GPU (CI) cannot run the CUDA kernels, and `nvcc -c` only proves they compile.
With TFKERNELS_CUDA_EMULATE=1 the cuda backend is instead built from the same csrc/*.cu files with
the host C++ compiler against csrc/emulation/tfk_cuda_emu.h, a small stand-in for the CUDA runtime,
fp16/bf16 types, warp shuffles and the sm_80 tensor-core instructions csrc/mma.cuh wraps
(ldmatrix, mma.sync, cp.async), whose scheduler runs each block's threads as fibers
switched at barriers. The ops (`torch.ops.tfkernels_cuda.*`, the same glue in csrc/ops.cpp) are
then registered for CPU tensors, and `backend="cuda"` takes CPU tensors: the whole op test suite
runs on the kernels' own code paths (tile loops, masks, GQA, dropout's Philox, the smaller tile
configurations, the two-stage weight gradients) against float64 references.

The only source change the host compiler needs is the launch syntax: `k<<<g, b, s, st>>>(args)`
becomes `::tfk_emu::Launcher(g, b, s, st)(k)(args)`, and `extern __shared__ T name[];` a pointer to
the launch's dynamic shared memory (done here, on copies, line for line, so compiler messages keep
the original line numbers). The build is cached like the JIT build.

TFKERNELS_CUDA_EMU_SANITIZE=address (and/or undefined) builds it with the compiler's sanitizers:
AddressSanitizer then checks every global-memory access of the kernels against the tensors torch
allocated (a read one element past a row, a vector load past the end of a buffer: on a GPU these
return garbage or fault only sometimes), and reads as well as writes past the end of dynamic shared
memory; UndefinedBehaviorSanitizer checks, among others, the alignment of every typed access (a
16-byte vector load from an address that is not 16-byte aligned, a misaligned-address fault on the
GPU) and signed integer overflow in index arithmetic.

What it cannot show: speed, memory-model races beyond missing barriers, tensor-core rounding
details, anything about the real device's resources beyond the launch limits it checks.
"""
from __future__ import annotations

import hashlib
import os
import re

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_EMU = os.path.join(_CSRC, "emulation")
NAME = "tfkernels_cuda_emu"
# -fno-strict-aliasing: CUDA code moves data through type-punned vectors (common.cuh's Vec loads 16
# bytes of fp16 as a uint4), which nvcc honours and g++ -O2 would otherwise optimise away
FLAGS = ["-O2", "-fno-strict-aliasing", "-DTFKERNELS_CUDA_EMULATION"]

# kernel<tmpl, args><<<config>>>   (the kernel name may carry one level of template arguments)
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>", re.S)
# extern __shared__ __align__(16) float4 smem[];
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def translate(source: str, filename: str = "<cuda>") -> str:
    """CUDA C++ source as host C++ for the emulator (launches and dynamic shared memory rewritten)."""
    out = _LAUNCH.sub(lambda m: f"::tfk_emu::Launcher({m.group(2)})({m.group(1)})", source)
    out = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(::tfk_emu::dynamic_smem());", out)
    if "<<<" in out or ">>>" in out:
        raise ValueError(f"{filename}: a kernel launch the emulator's rewrite does not understand")
    return f'#line 1 "{filename}"\n' + out


SANITIZERS = ("address", "undefined")
# what a process needs before it loads an AddressSanitizer build: the ASan runtime first in the library
# list, and libstdc++ with it (so ASan's __cxa_throw interceptor finds the real one: without it the first
# C++ exception, a TORCH_CHECK, aborts the process); and no leak report at exit (Python leaks on purpose)
ASAN_ENV = 'ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"'


def sanitizers() -> list[str]:
    """The sanitizers TFKERNELS_CUDA_EMU_SANITIZE asks for ("address", "undefined", or both, comma-separated)."""
    value = os.environ.get("TFKERNELS_CUDA_EMU_SANITIZE", "").strip().lower()
    if value in ("", "0"):
        return []
    kinds = sorted({k.strip() for k in value.split(",") if k.strip()})
    bad = [k for k in kinds if k not in SANITIZERS]
    if bad:
        raise ValueError(f"TFKERNELS_CUDA_EMU_SANITIZE={value!r}: expected a comma-separated subset of {SANITIZERS}")
    return kinds


def sanitize_flags(kinds: list[str]) -> list[str]:
    """Compiler and linker flags for the sanitizers `kinds`."""
    if not kinds:
        return []
    flags = [f"-fsanitize={','.join(kinds)}", "-fno-omit-frame-pointer", "-g1"]  # -g1: file:line in reports
    if "undefined" in kinds:
        flags.append("-fno-sanitize-recover=undefined")  # a report ends the process: no test passes over one
    return flags


def _asan_runtime_loaded() -> bool:
    try:
        with open("/proc/self/maps") as fh:
            return "libasan" in fh.read()
    except OSError:  # not Linux: let the loader say what is wrong
        return True


def _inputs() -> list[str]:
    files = [os.path.join(_CSRC, f) for f in os.listdir(_CSRC) if f.endswith((".cu", ".cpp", ".h", ".cuh"))]
    for root, _, names in os.walk(_EMU):
        files += [os.path.join(root, f) for f in names if f.endswith((".cpp", ".h"))]
    return sorted(files)


def build():
    """Compile (or reuse the cached build of) the emulated extension; returns its module."""
    import torch

    from ._cuda_ext import locked_load

    if not os.path.isdir(_EMU):
        raise RuntimeError(f"the csrc/ sources are not available (looked in {_CSRC}); install from a source checkout")
    files = _inputs()
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(os.path.relpath(f, _CSRC).encode() + b"\0" + fh.read())
    kinds = sanitizers()
    if "address" in kinds and not _asan_runtime_loaded():
        raise RuntimeError("TFKERNELS_CUDA_EMU_SANITIZE=address: the AddressSanitizer runtime must be loaded before "
                           f"Python starts; run the command with {ASAN_ENV}")
    from ._nvcc import cxx, shared_libstdcxx

    flags, ldflags = FLAGS + sanitize_flags(kinds), sanitize_flags(kinds) + shared_libstdcxx(cxx())
    h.update(" ".join(flags + ldflags).encode())
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    build_dir = os.path.join(cache, "tfkernels", f"emu-{torch.__version__}-{h.hexdigest()[:16]}")
    src_dir = os.path.join(build_dir, "src")
    os.makedirs(src_dir, exist_ok=True)
    sources = []
    for f in files:
        if f.endswith(".cu"):
            with open(f) as fh:
                text = translate(fh.read(), f)
            dst = os.path.join(src_dir, os.path.basename(f)[:-3] + "_emu.cpp")
            old = open(dst).read() if os.path.exists(dst) else None
            if old != text:  # rewrite only on change, so ninja's timestamps stay useful
                with open(dst, "w") as fh:
                    fh.write(text)
            sources.append(dst)
    sources += [os.path.join(_CSRC, "ops.cpp"), os.path.join(_EMU, "tfk_cuda_emu.cpp")]
    return locked_load(
        build_dir,
        name=NAME,
        sources=sources,
        # the stand-in CUDA headers come first; csrc/ for kernels.h and common.cuh
        extra_include_paths=[os.path.join(_EMU, "include"), _CSRC],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        verbose=os.environ.get("TFKERNELS_VERBOSE_BUILD", "0") not in ("", "0"),
    )
