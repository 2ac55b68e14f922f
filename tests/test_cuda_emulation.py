"""The host emulation of CUDA (csrc/emulation, tfkernels/_cuda_emu.py) that CI runs the CUDA backend's
kernels on: it must compute what the hardware computes, and fail where the hardware fails.

Small CUDA programs are rewritten by `_cuda_emu.translate`, compiled with g++ against the emulator and
run; each checks one rule: barriers and shuffles, what a missing barrier does, deadlocks, launch
limits, dynamic shared memory limits and overflow, wmma results and alignment rules, fp16/bf16
rounding against torch's.
"""
import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from tfkernels import _cuda_emu

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "csrc" / "emulation"
CXX = shutil.which("g++") or shutil.which("c++")
FLAGS = ["-std=c++17", "-O2", "-fno-strict-aliasing", f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc'}"]

needs_cxx = pytest.mark.skipif(CXX is None or platform.system() != "Linux", reason="needs g++ on Linux")


# ------------------------------------------------------------------------------ the rewrite


def test_translate_launches_and_dynamic_shared_memory():
    src = ("k<T, 64><<<dim3(a, (n + 63) / 64), kThreads, bytes_, stream>>>(p, dp);\n"
           "sum_partials_kernel<<<grid3, 256, 0, stream>>>(dwp, dw, G, N);\n"
           "  extern __shared__ __align__(128) float4 smem_raw[];\n"
           "extern __shared__ char buf[];\n")
    out = _cuda_emu.translate(src, "x.cu")
    lines = out.splitlines()
    assert lines[0] == '#line 1 "x.cu"'
    assert lines[1] == "::tfk_emu::Launcher(dim3(a, (n + 63) / 64), kThreads, bytes_, stream)(k<T, 64>)(p, dp);"
    assert lines[2] == "::tfk_emu::Launcher(grid3, 256, 0, stream)(sum_partials_kernel)(dwp, dw, G, N);"
    assert lines[3] == "  float4* smem_raw = static_cast<float4*>(::tfk_emu::dynamic_smem());"
    assert lines[4] == "char* buf = static_cast<char*>(::tfk_emu::dynamic_smem());"
    assert len(lines) == src.count("\n") + 1  # line for line: compiler messages point at the .cu lines


def test_translate_refuses_what_it_cannot_rewrite():
    with pytest.raises(ValueError, match="x.cu"):
        _cuda_emu.translate("(*table[i])<<<1, 32>>>();", "x.cu")


# ------------------------------------------------------------------------------ programs


@pytest.fixture(scope="module")
def runtime_obj(tmp_path_factory):
    if CXX is None or platform.system() != "Linux":
        pytest.skip("needs g++ on Linux")
    obj = tmp_path_factory.mktemp("emu") / "tfk_cuda_emu.o"
    subprocess.run([CXX, *FLAGS, "-c", str(EMU / "tfk_cuda_emu.cpp"), "-o", str(obj)], check=True)
    return obj


def run_cuda(tmp_path, runtime_obj, source: str, stdin: str = "", env=None) -> str:
    cu = tmp_path / "prog.cu"
    cu.write_text("#include <cstdio>\n#include <cuda_runtime.h>\n#include <mma.h>\n" + source)
    cpp = tmp_path / "prog.cpp"
    cpp.write_text(_cuda_emu.translate(cu.read_text(), str(cu)))
    exe = tmp_path / "prog"
    proc = subprocess.run([CXX, *FLAGS, str(cpp), str(runtime_obj), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


BLOCK_SUM = r"""
// every thread adds its id into a shared slot per warp; thread 0 sums the slots
__global__ void sum(int* out, bool barrier) {
  __shared__ int part[8];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) part[warp] = 0;
  if (barrier) __syncthreads();
  int v = threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) part[warp] += v;
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int w = 0; w < (int)blockDim.x / 32; ++w) s += part[w];
    out[blockIdx.x] = s;
  }
}
int main() {
  int out[3] = {-1, -1, -1};
  sum<<<1, 256>>>(out, false);  // first: shared memory holds no earlier launch's sums
  printf("%d %d\n", (int)cudaGetLastError(), out[0]);
  sum<<<3, 256>>>(out, true);
  printf("%d %d %d %d\n", (int)cudaGetLastError(), out[0], out[1], out[2]);
}
"""


@needs_cxx
def test_barriers_and_shuffles(tmp_path, runtime_obj):
    without, with_barrier = run_cuda(tmp_path, runtime_obj, BLOCK_SUM).splitlines()
    assert with_barrier.split() == ["0", *[str(255 * 256 // 2)] * 3]
    # without the barrier thread 0 sums before the other warps have written: the emulator runs the
    # threads in order between barriers, so a missing barrier reliably gives a wrong answer
    err, got = without.split()
    assert err == "0" and int(got) != 255 * 256 // 2


SHUFFLES = r"""
__global__ void k(int* out) {
  const int l = threadIdx.x;
  out[l] = __shfl_xor_sync(0xffffffffu, l * 10, 5);
  out[32 + l] = __shfl_down_sync(0xffffffffu, l * 10, 3);
  out[64 + l] = __shfl_sync(0xffffffffu, l * 10, 7);
  out[96 + l] = __shfl_xor_sync(0xffffffffu, l * 10, 1, 16);
  float f = __shfl_xor_sync(0xffffffffu, 0.5f + l, 31);
  out[128 + l] = (int)(f * 2);
}
int main() {
  int out[160];
  k<<<1, 32>>>(out);
  for (int i = 0; i < 160; ++i) printf("%d ", out[i]);
}
"""


@needs_cxx
def test_shuffle_semantics(tmp_path, runtime_obj):
    out = [int(x) for x in run_cuda(tmp_path, runtime_obj, SHUFFLES).split()]
    lanes = range(32)
    assert out[:32] == [(l ^ 5) * 10 for l in lanes]
    assert out[32:64] == [(l + 3 if l + 3 < 32 else l) * 10 for l in lanes]  # past the end: own value
    assert out[64:96] == [70] * 32
    assert out[96:128] == [(l ^ 1) * 10 for l in lanes]
    assert out[128:] == [int((0.5 + (l ^ 31)) * 2) for l in lanes]


LIMITS = r"""
__global__ void big(float* out) {
  extern __shared__ float4 smem[];
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[31 - threadIdx.x];
}
__global__ void overflow(int n) {
  extern __shared__ float4 smem[];
  reinterpret_cast<float*>(smem)[n] = 1.0f;
}
__global__ void divergent() {
  if (threadIdx.x == 0) __syncthreads(); else __syncwarp();
}
__global__ void nop() {}
int main() {
  float out[32];
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  printf("optin %d\n", optin);
  big<<<1, 32, 64 * 1024>>>(out);                       // > 48 KiB without the attribute
  printf("no_attr %d\n", (int)cudaGetLastError());
  printf("set %d\n", (int)cudaFuncSetAttribute(big, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
  big<<<1, 32, 64 * 1024>>>(out);
  printf("with_attr %d %g %g\n", (int)cudaGetLastError(), out[0], out[31]);
  printf("set_too_much %d\n", (int)cudaFuncSetAttribute(big, cudaFuncAttributeMaxDynamicSharedMemorySize, optin + 1));
  overflow<<<1, 1, 256>>>(64);                          // one float past the end
  cudaError_t e = cudaGetLastError();
  printf("overflow %d %s\n", (int)e, cudaGetErrorString(e));
  overflow<<<1, 1, 256>>>(63);
  printf("in_bounds %d\n", (int)cudaGetLastError());
  divergent<<<1, 32>>>();
  e = cudaGetLastError();
  printf("divergent %d %s\n", (int)e, cudaGetErrorString(e));
  nop<<<1, 1025>>>();
  printf("block_1025 %d\n", (int)cudaGetLastError());
  nop<<<dim3(1, 65536), 32>>>();
  printf("grid_y_65536 %d\n", (int)cudaGetLastError());
  nop<<<dim3(2, 3, 2), dim3(4, 2, 4)>>>();
  printf("ok %d\n", (int)cudaGetLastError());
}
"""


@needs_cxx
def test_launch_limits_and_shared_memory(tmp_path, runtime_obj):
    out = dict(line.split(" ", 1) for line in run_cuda(tmp_path, runtime_obj, LIMITS).splitlines())
    assert out["optin"] == "232448"  # the H100's 227 KiB by default
    assert out["no_attr"] == "1"     # cudaErrorInvalidValue
    assert out["set"] == "0"
    assert out["with_attr"] == "0 31 0"
    assert out["set_too_much"] == "1"
    assert out["overflow"].startswith("719 ") and "past the end of dynamic shared memory" in out["overflow"]
    assert out["in_bounds"] == "0"
    assert out["divergent"].startswith("719 ") and "deadlock" in out["divergent"]
    assert out["block_1025"] == "9"     # cudaErrorInvalidConfiguration
    assert out["grid_y_65536"] == "9"
    assert out["ok"] == "0"
    small = run_cuda(tmp_path, runtime_obj, LIMITS, env={"TFKERNELS_CUDA_EMU_SMEM": "49152"})
    assert "optin 49152" in small and "set 1" in small  # 64 KiB is now above the device's limit


WMMA = r"""
using namespace nvcuda;
template <typename LA, typename LB>
__global__ void mm(const __half* a, const __half* b, float* c, int off) {
  __shared__ __align__(32) __half sa[16 * 16 + 16];
  __shared__ __align__(32) __half sb[16 * 16];
  __shared__ __align__(32) float sc[16 * 16];
  for (int i = threadIdx.x; i < 256; i += 32) { sa[i + off] = a[i]; sb[i] = b[i]; }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 1.0f);
  wmma::load_matrix_sync(fa, sa + off, 16);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(sc, fc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int i = threadIdx.x; i < 256; i += 32) c[i] = sc[i];
}
int main() {
  __half a[256], b[256];
  float c[256];
  for (int i = 0; i < 256; ++i) { a[i] = __float2half_rn((i % 7) - 3); b[i] = __float2half_rn((i % 5) * 0.5f); }
  mm<wmma::row_major, wmma::row_major><<<1, 32>>>(a, b, c, 0);
  printf("%d", (int)cudaGetLastError()); for (float v : c) printf(" %g", v); printf("\n");
  mm<wmma::col_major, wmma::col_major><<<1, 32>>>(a, b, c, 0);
  printf("%d", (int)cudaGetLastError()); for (float v : c) printf(" %g", v); printf("\n");
  mm<wmma::row_major, wmma::row_major><<<1, 32>>>(a, b, c, 8);  // 16 bytes off a 32-byte boundary
  cudaError_t e = cudaGetLastError();
  printf("%d %s\n", (int)e, cudaGetErrorString(e));
}
"""


@needs_cxx
def test_wmma_products_and_alignment(tmp_path, runtime_obj):
    rr, cc, misaligned = run_cuda(tmp_path, runtime_obj, WMMA).splitlines()
    i = torch.arange(256, dtype=torch.float64)
    a, b = ((i % 7) - 3).view(16, 16), ((i % 5) * 0.5).view(16, 16)
    rr, cc = [line.split() for line in (rr, cc)]
    assert rr[0] == "0" and cc[0] == "0"
    assert torch.equal(torch.tensor([float(x) for x in rr[1:]], dtype=torch.float64).view(16, 16), a @ b + 1)
    # col_major: the same memory read as the transposes
    assert torch.equal(torch.tensor([float(x) for x in cc[1:]], dtype=torch.float64).view(16, 16), a.T @ b.T + 1)
    assert misaligned.startswith("719 ") and "32-byte aligned" in misaligned


CONVERT = r"""
int main() {
  unsigned bits;
  while (scanf("%x", &bits) == 1) {
    float f;
    memcpy(&f, &bits, 4);
    __half h = __float2half_rn(f);
    __nv_bfloat16 b = __float2bfloat16_rn(f);
    float hf = __half2float(h), bf = __bfloat162float(b);
    unsigned hb, bb;
    memcpy(&hb, &hf, 4);
    memcpy(&bb, &bf, 4);
    printf("%04x %04x %08x %08x\n", h.__x, b.__x, hb, bb);
  }
}
"""


@needs_cxx
def test_half_and_bfloat16_rounding_match_torch(tmp_path, runtime_obj):
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([
        torch.randn(3000, generator=g) * torch.logspace(-9, 6, 3000),  # every exponent range, subnormal halves too
        torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, float("inf"), -float("inf"),
                      2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 6.1035156e-05, 6.0975552e-05,
                      1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.4e38]),
    ]).float()
    # exact midpoints between neighbours of both formats (normal and subnormal), to check ties-to-even
    hb = torch.randint(0, 0x7BFF, (500,), generator=g, dtype=torch.int32).to(torch.int16)
    h_mid = (hb.view(torch.float16).float() + (hb + 1).view(torch.float16).float()) / 2
    bb = torch.randint(0, 0x7F7F, (500,), generator=g, dtype=torch.int32).to(torch.int16)
    b_mid = (bb.view(torch.bfloat16).float() + (bb + 1).view(torch.bfloat16).float()) / 2
    vals = torch.cat([vals, h_mid, -h_mid, b_mid, -b_mid])
    bits = vals.view(torch.int32).tolist()
    stdin = "\n".join(f"{b & 0xffffffff:08x}" for b in bits)
    lines = run_cuda(tmp_path, runtime_obj, "#include <cstring>\n" + CONVERT, stdin=stdin).splitlines()
    assert len(lines) == len(bits)
    h_want = vals.half().view(torch.int16).tolist()
    b_want = vals.bfloat16().view(torch.int16).tolist()
    hf_want = vals.half().float().view(torch.int32).tolist()
    for v, line, hw, bw, hfw in zip(vals.tolist(), lines, h_want, b_want, hf_want):
        h, b, hf, bf = (int(x, 16) for x in line.split())
        assert h == hw & 0xFFFF, f"__float2half_rn({v!r}) = {h:04x}, torch {hw & 0xFFFF:04x}"
        assert b == bw & 0xFFFF, f"__float2bfloat16_rn({v!r}) = {b:04x}, torch {bw & 0xFFFF:04x}"
        assert hf == hfw & 0xFFFFFFFF, f"__half2float(half({v!r}))"
        assert bf == (b << 16), f"__bfloat162float(bfloat16({v!r}))"
    nan = struct.unpack("<I", struct.pack("<f", float("nan")))[0]
    h, b, _, _ = (int(x, 16) for x in run_cuda(tmp_path, runtime_obj, "#include <cstring>\n" + CONVERT,
                                                 stdin=f"{nan:08x}").split())
    assert (h & 0x7C00) == 0x7C00 and (h & 0x3FF) and (b & 0x7F80) == 0x7F80 and (b & 0x7F)  # NaN stays NaN
