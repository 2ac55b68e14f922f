"""CI guard for the CUDA fallback: compile the csrc/ sources with the machine's toolchain, no GPU needed.

- every csrc/*.cu with nvcc, compile only (-c), for sm_75, sm_80 and sm_90 (skipped only without nvcc);
- csrc/ops.cpp (the torch glue) syntax-checked against the installed torch headers and the CUDA
  runtime headers alone. A CPU build of torch ships the c10/cuda headers but not the cmake-generated
  macros header they include, so an empty one stands in for it. No stand-ins for cuBLAS/cuSPARSE/
  cuSOLVER: the glue must not need them (ATen/cuda/CUDAContext.h does), because a minimal CUDA
  toolkit, like this machine's, does not have them. Skipped when the torch or CUDA runtime headers
  are missing.

The compiles take minutes of CPU, so the suite's conftest starts them in the background right after
collection and runs test_kernels_compile last: they overlap the single-threaded tests on CI's
second core instead of adding to the suite's time.

The nvcc flags are the real build's (tfkernels._nvcc.COMMON_FLAGS) plus the ones torch's
CUDAExtension adds (no implicit half/bfloat16 conversions or operators), so a kernel that compiles
here also compiles in the real build. For sm_80 and sm_90, ptxas reports each kernel's register
spills (-Xptxas -v): none is allowed beyond a few bytes, except where the README documents it (the
tensor-core dK/dV kernel at head dims 192 and 256, whose two accumulators exceed the register
file), so a change that makes a kernel spill fails here, not on the first GPU that times it.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tfkernels import _nvcc

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ARCHS = ["75", "80", "90"]  # 75: a JIT build on a T4 / RTX 20 card, where Triton support ends
# what torch.utils.cpp_extension adds to every nvcc command (COMMON_NVCC_FLAGS)
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]

NICE = ["nice", "-n", "10"] if shutil.which("nice") else []
VERBOSE_ARCHS = ("80", "90")  # spills checked where the tensor-core kernels are built for real
SPILL_BYTES = 16  # a few registers' worth, parked outside the hot loop (dQ at D = 32 with rules: 8 on sm_80)


def _documented_spill(mangled: str) -> bool:
    """The spills the README documents: the one-launch tensor-core dK/dV kernel at head dims 192 and 256
    (its first template int is the padded head dim DP; at 256 it runs only with
    TFKERNELS_CUDA_DKDV_PASSES=1, the two-pass kernels attn_bwd_dv/dk_tc_kernel spill none)."""
    return "attn_bwd_dkdv_tc_kernel" in mangled and re.search(r"Li(\d+)E", mangled).group(1) in ("192", "256")


def _spills(ptxas_output: str) -> list:
    """(kernel, spill-store bytes) of every function ptxas -v reports."""
    rows = re.findall(r"Function properties for (\S+)\n\s+\d+ bytes stack frame, (\d+) bytes spill stores",
                      ptxas_output)
    return [(name, int(n)) for name, n in rows]


NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
if NVCC and not os.path.exists(NVCC):
    NVCC = None


def _compile_one(job, out_dir):
    src, arch = job
    verbose = ["-Xptxas", "-v"] if arch in VERBOSE_ARCHS else []
    cmd = [NVCC, *_nvcc.COMMON_FLAGS, "-c", str(src), "-o", str(Path(out_dir) / f"{src.stem}.sm{arch}.o"),
           "-I", str(CSRC), "-Xcompiler", "-Wall", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           *TORCH_NVCC_FLAGS, *verbose]
    # niced: started early (below), these compiles take the core the single-threaded tests leave idle
    # rather than slowing those tests down
    with _LOCK:  # not after stop_compile: it would not kill this one
        if not _EARLY.get("running"):
            return f"{src.name} (sm_{arch})", -1, "stopped before it started"
        proc = subprocess.Popen(NICE + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # a process group: stop_compile ends cicc/ptxas too
        _EARLY["procs"].append(proc)
    out, _ = proc.communicate()
    return f"{src.name} (sm_{arch})", proc.returncode, out


_EARLY = {}  # the compile jobs, once started: {"futures", "procs", "pool", "dir", "files", "running"}
_LOCK = threading.Lock()


def start_compile():
    """Start the nvcc jobs (idempotent). The suite's conftest calls this right after collection when
    test_kernels_compile is selected, so that the compiles (minutes of CPU) overlap the rest of the
    suite on CI's second core, and moves the test to the end, where it collects the results."""
    if _EARLY or NVCC is None:
        return
    files = sorted(CSRC.glob("*.cu"))
    # one job per (file, architecture), largest first: the tensor-core attention dominates
    jobs = sorted(((f, a) for f in files for a in ARCHS), key=lambda j: -j[0].stat().st_size)
    out_dir = tempfile.mkdtemp(prefix="tfk-nvcc-")
    pool = ThreadPoolExecutor(max_workers=2)  # CI has 2 cores
    _EARLY.update(procs=[], pool=pool, dir=out_dir, files=files, running=True)
    _EARLY["futures"] = [pool.submit(_compile_one, job, out_dir) for job in jobs]


def stop_compile():
    """End what start_compile started (a session that stops before the test kills the compiles)."""
    if not _EARLY:
        return
    with _LOCK:
        _EARLY["running"] = False
        for proc in _EARLY["procs"]:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (OSError, AttributeError):  # gone already, or no process groups here
                    proc.kill()
    _EARLY["pool"].shutdown(wait=True)
    shutil.rmtree(_EARLY["dir"], ignore_errors=True)
    _EARLY.clear()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_kernels_compile():
    start_compile()
    assert _EARLY["files"], "csrc/ has no .cu files"
    try:
        results = [f.result() for f in _EARLY["futures"]]
    finally:
        stop_compile()
    failed = [f"{name}:\n{out}" for name, rc, out in results if rc != 0]
    assert not failed, "nvcc failed:\n" + "\n".join(failed)
    reported = [(name, kernel, n) for name, _, out in results for kernel, n in _spills(out)]
    assert any("attn_fwd_tc_kernel" in kernel for _, kernel, _ in reported), "ptxas -v reported no tensor-core kernel"
    spilled = [f"{name}: {kernel} spills {n} bytes" for name, kernel, n in reported
               if n > SPILL_BYTES and not _documented_spill(kernel)]
    assert not spilled, "register spills (ptxas -v):\n" + "\n".join(spilled)


def test_spill_report_parsing():
    """The ptxas -v format the guard reads, and which kernels may spill."""
    info = "ptxas info    : Function properties for _ZN3tfk12_GLOBAL__N_1"
    out = (f"{info}23attn_bwd_dkdv_tc_kernelI6__halfLi256ELi2ELb1EEEvNS_10AttnParamsEb\n"
           "    496 bytes stack frame, 1060 bytes spill stores, 1000 bytes spill loads\n"
           f"{info}18attn_fwd_tc_kernelI6__halfLi128ELi2ELb0EEEvNS_10AttnParamsEb\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    (dkdv, n1), (fwd, n2) = _spills(out)
    assert (n1, n2) == (1060, 0)
    assert _documented_spill(dkdv) and not _documented_spill(fwd)
    assert not _documented_spill(dkdv.replace("Li256E", "Li128E"))


_STUBS = {"c10/cuda/impl/cuda_cmake_macros.h": ""}  # generated at torch's build; absent from its CPU wheels


def _cuda_include():
    for base in filter(None, [os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(NVCC)) if NVCC else None,
                              "/usr/local/cuda"]):
        inc = Path(base) / "include"
        if (inc / "cuda_runtime.h").exists():
            return inc
    return None


def test_glue_compiles(tmp_path):
    torch = pytest.importorskip("torch")
    cxx = shutil.which("g++") or shutil.which("c++")
    tinc = Path(torch.__file__).parent / "include"
    cinc = _cuda_include()
    if cxx is None or cinc is None or not (tinc / "c10" / "cuda" / "CUDAStream.h").exists():
        pytest.skip("needs g++, the CUDA runtime headers and torch's c10/cuda headers")
    stubs = tmp_path / "stubs"  # searched after torch's own include dir, so a real header wins
    for name, text in _STUBS.items():
        path = stubs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#pragma once\n" + text)
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
           f"-I{tinc}", f"-I{tinc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{cinc}", f"-I{stubs}", f"-I{CSRC}", str(CSRC / "ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, "ops.cpp does not compile:\n" + proc.stderr[-6000:]


def test_a_killed_build_does_not_block_the_next(tmp_path, monkeypatch):
    """torch's build lock is a plain file that a killed build leaves behind; the next build (JIT or
    emulated) would wait on it forever. locked_load holds an flock instead and clears the stale file."""
    from torch.utils import cpp_extension

    from tfkernels import _cuda_ext

    (tmp_path / "lock").write_text("")  # what a build killed mid-compile leaves
    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs, lock_left=(tmp_path / "lock").exists())
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _cuda_ext.locked_load(str(tmp_path), name="x", sources=["a.cpp"]) == "module"
    assert seen == {"build_directory": str(tmp_path), "name": "x", "sources": ["a.cpp"], "lock_left": False}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_parallel_flags_are_accepted(tmp_path):
    """The build adds tfkernels._nvcc.parallel_flags (--split-compile) only where nvcc takes them."""
    from tfkernels import _nvcc

    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] = 1.0f; }\n")
    flags = _nvcc.parallel_flags(NVCC)
    proc = subprocess.run([NVCC, "-c", str(src), "-o", str(tmp_path / "k.o"), *flags], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _nvcc.parallel_flags(str(tmp_path / "no-such-nvcc")) == []


def test_shared_libstdcxx_is_named_where_the_compiler_finds_it(tmp_path):
    """_nvcc.shared_libstdcxx: the path the compiler prints for libstdc++.so.6 when it is a file,
    else nothing (a bare name means not found; a missing compiler adds no flag)."""
    lib = tmp_path / "libstdc++.so.6"
    lib.write_text("")
    for name, printed, want in [("found", lib, [str(lib)]), ("bare", "libstdc++.so.6", []),
                                ("gone", tmp_path / "none" / "libstdc++.so.6", [])]:
        fake = tmp_path / f"cxx-{name}"
        fake.write_text(f"#!/bin/sh\necho '{printed}'\n")
        fake.chmod(0o755)
        assert _nvcc.shared_libstdcxx(str(fake)) == want, name
    assert _nvcc.shared_libstdcxx(str(tmp_path / "no-such-c++")) == []


STATIC_REPRO = r'''
import os, sys, torch
from torch.utils.cpp_extension import load
# torch/library.h alone, at -O0 (not load_inline, which puts the whole <torch/extension.h> first):
# a third of the compile time, and TORCH_CHECK's message formatting is the same code
src = os.path.join(sys.argv[1], "repro.cpp")
with open(src, "w") as f:
    f.write("""
#include <torch/library.h>
void boom(int64_t n) { TORCH_CHECK(false, "n is ", n, ", sizes ", c10::IntArrayRef({2, n})); }
TORCH_LIBRARY(tfk_static_repro, m) { m.def("boom(int n) -> ()", &boom); }
""")
load(name="tfk_static_repro", sources=[src], extra_cflags=["-O0"], extra_ldflags=sys.argv[2:],
     is_python_module=False, build_directory=sys.argv[1])
try:
    torch.ops.tfk_static_repro.boom(7)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
'''


@pytest.mark.skipif(shutil.which(_nvcc.cxx()) is None, reason="no C++ compiler")
def test_an_extension_linked_with_a_static_libstdcxx_still_formats_numbers(tmp_path):
    """The GPU machines' g++ linked libstdc++ statically into the extension, and a TORCH_CHECK message
    with a number in it then crashed the process (or, here, stopped at the number). A torch extension
    linked the same way (-static-libstdc++) but with _nvcc.shared_libstdcxx's flag ahead of it raises
    the whole message, as the extension's builds (setup.py, JIT, emulation) now link."""
    flags = _nvcc.shared_libstdcxx(_nvcc.cxx())
    if not flags:
        pytest.skip("the compiler names no shared libstdc++")
    script = tmp_path / "repro.py"
    script.write_text(STATIC_REPRO)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), *flags, "-static-libstdc++"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "cannot find -lstdc++" in proc.stderr:
        pytest.skip(f"no static libstdc++ to link here: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and "raised: n is 7, sizes [2, 7]" in proc.stdout, proc.stdout + proc.stderr
