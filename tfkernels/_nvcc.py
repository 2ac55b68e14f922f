"""nvcc options shared by setup.py and the JIT build (`_cuda_ext`).

Standalone, no package imports: setup.py loads this file by path, before tfkernels is importable.
"""
from __future__ import annotations

import functools
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
