"""Build script. The Python package needs no compilation; the optional CUDA extension from csrc/
(the "cuda" backend) is built here when a CUDA toolkit and a CUDA build of torch are present.

Environment:
  TFKERNELS_BUILD_CUDA=1   force the build (fail loudly if it cannot be done)
  TFKERNELS_BUILD_CUDA=0   skip it (the cuda backend then JIT-compiles on first use, if it can)
  (unset)                  build it when torch is a CUDA build and a CUDA toolkit is found, else skip
  TFKERNELS_CUDA_ARCHS     compute capabilities, default "80;90" (sm_90 builds the Hopper target)
  MAX_JOBS                 parallel compile jobs (ninja)
CUDA builds need torch in the build environment: `pip install --no-build-isolation -e .`
"""
import glob
import importlib.util
import os

from setuptools import setup


def _cuda_extension():
    flag = os.environ.get("TFKERNELS_BUILD_CUDA")
    if flag == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("TFKERNELS_BUILD_CUDA=1 but torch is not importable in the build environment; "
                               "use pip install --no-build-isolation")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if flag == "1":
            raise RuntimeError("TFKERNELS_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (CUDA_HOME)")
        return [], {}
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc)
        # gives a root without the toolkit's headers, and the build would die deep inside g++
        msg = (f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime_api.h; set CUDA_HOME to the CUDA toolkit's "
               "root (e.g. /usr/local/cuda)")
        if flag == "1":
            raise RuntimeError(f"TFKERNELS_BUILD_CUDA=1: {msg}")
        print(f"tfkernels: skipping the CUDA extension build: {msg}")
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join(here, "csrc", "*.cu")) + glob.glob(os.path.join(here, "csrc", "*.cpp")))
    if not sources:
        raise RuntimeError("TFKERNELS_BUILD_CUDA=1 but csrc/ has no sources")
    archs = os.environ.get("TFKERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs)):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # tfkernels/_nvcc.py by path: the package itself is not importable while it is being built
    spec = importlib.util.spec_from_file_location("_tfk_nvcc", os.path.join(here, "tfkernels", "_nvcc.py"))
    nvcc_flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nvcc_flags)
    ext = CUDAExtension(
        name="tfkernels._C",
        sources=[os.path.relpath(s, here) for s in sources],
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": nvcc_flags.COMMON_FLAGS + gencode
                                    + nvcc_flags.parallel_flags(os.path.join(CUDA_HOME, "bin", "nvcc"))},
        extra_link_args=nvcc_flags.shared_libstdcxx(nvcc_flags.cxx()),
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
