"""nvcc options shared by setup.py and the JIT build (`_cuda_ext`).

Standalone, no package imports: setup.py loads this file by path, before tfkernels is importable.
"""
from __future__ import annotations

import functools
import os
import subprocess


# every nvcc command of the extension's builds, at install and JIT (plus the architectures and
# parallel_flags); -lineinfo so that compute-sanitizer and ncu can name source lines
COMMON_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


@functools.lru_cache(maxsize=None)
def _help(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def parallel_flags(nvcc: str) -> list[str]:
    """`--split-compile=0` where this nvcc has it: cicc and ptxas then optimise on every CPU.

    `attention_tc.cu` (each tensor-core kernel for 2 dtypes, 6 head dims, 1-2 pipeline depths, with
    and without mask/dropout rules) takes about 110 s per architecture on one core and is the
    build's long pole; ninja's jobs run files in parallel, not the kernels of one file.
    """
    return ["--split-compile=0"] if "--split-compile" in _help(nvcc) else []


def cxx() -> str:
    """The C++ compiler that torch.utils.cpp_extension (and setuptools under setup.py) link with."""
    return os.environ.get("CXX") or "c++"


@functools.lru_cache(maxsize=None)
def shared_libstdcxx(compiler: str) -> list[str]:
    """The shared libstdc++ by path, as a link input, where `compiler` can name it; else nothing.

    A compiler whose library path offers only libstdc++.a (the GPU machines' /opt/gcc/bin/g++ wrapper)
    linked a private static copy of libstdc++ into the extension, beside the shared one torch loads:
    two copies of the iostream locale machinery in one process, and every TORCH_CHECK message that
    formats a number (a size, a head dim) crashed with SIGSEGV instead of raising (H100, 2026-11-24:
    5 of the 11 bad-argument calls tried; on this CPU machine, with -static-libstdc++, the message just stopped
    at the first number). Named before the compiler's own -lstdc++, the shared library defines every
    libstdc++ symbol, so an archive after it adds nothing; where -lstdc++ finds the shared library
    anyway, this repeats it, which changes nothing.
    """
    try:
        out = subprocess.run([compiler, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [out] if os.path.isabs(out) and os.path.isfile(out) else []
