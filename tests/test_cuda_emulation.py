"""The host emulation of CUDA (csrc/emulation, tfkernels/_cuda_emu.py) that CI runs the CUDA backend's
kernels on: it must compute what the hardware computes, and fail where the hardware fails.

Small CUDA programs are rewritten by `_cuda_emu.translate`, compiled with g++ against the emulator and
run; each checks one rule: barriers and shuffles, what a missing barrier does, deadlocks, launch
limits, dynamic shared memory limits and overflow, tensor-core fragments (ldmatrix, mma.sync) and
cp.async against the PTX ISA's rules, fp16/bf16 rounding against torch's.
"""
import os
import platform
import re
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
FLAGS = ["-std=c++17", "-O2", "-fno-strict-aliasing", "-DTFKERNELS_CUDA_EMULATION", f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc'}"]

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


def build_cuda(tmp_path, runtime_obj, source: str, flags=FLAGS) -> Path:
    """A CUDA program (prog.cu) rewritten for the emulator and linked with it; returns the executable."""
    cu = tmp_path / "prog.cu"
    cu.write_text("#include <cstdio>\n#include <cuda_runtime.h>\n" + source)
    cpp = tmp_path / "prog.cpp"
    cpp.write_text(_cuda_emu.translate(cu.read_text(), str(cu)))
    exe = tmp_path / "prog"
    proc = subprocess.run([CXX, *flags, str(cpp), str(runtime_obj), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def run_cuda(tmp_path, runtime_obj, source: str, stdin: str = "", env=None) -> str:
    exe = build_cuda(tmp_path, runtime_obj, source)
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


TENSOR_CORES = r"""
#include "mma.cuh"
using namespace tfk;
constexpr int LD = 24;  // padded rows, as the attention kernels use
// C = A B^T from ldmatrix fragments; D = half(C) V with C's registers reused as the A fragment.
template <typename T>
__global__ void products(const T* a, const T* bt, const T* v, float* out) {
  extern __shared__ __align__(128) float4 smem_raw[];
  T* sa = reinterpret_cast<T*>(smem_raw);
  T* sb = sa + 16 * LD;
  T* sv = sb + 16 * LD;
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 256; i += 32) {
    sa[(i / 16) * LD + i % 16] = a[i];
    sb[(i / 16) * LD + i % 16] = bt[i];
    sv[(i / 16) * LD + i % 16] = v[i];
  }
  __syncwarp();
  uint32_t fa[4], fb[4], fv[4], pa[4];
  ldmatrix_x4<false>(fa, sa + (lane & 15) * LD + (lane >> 4) * 8);
  ldmatrix_x4<false>(fb, sb + ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8);
  float c[2][4] = {}, d[2][4] = {};
  mma_16816<T>(c[0], fa, fb[0], fb[1]);
  mma_16816<T>(c[1], fa, fb[2], fb[3]);
  c_to_a<T>(pa, c[0], c[1]);
  ldmatrix_x4<true>(fv, sv + (lane & 15) * LD + (lane >> 4) * 8);
  mma_16816<T>(d[0], pa, fv[0], fv[1]);
  mma_16816<T>(d[1], pa, fv[2], fv[3]);
  for (int n = 0; n < 2; ++n)
    for (int e = 0; e < 4; ++e) {
      const int idx = (g + 8 * (e >> 1)) * 16 + n * 8 + 2 * t + (e & 1);
      out[idx] = c[n][e];
      out[256 + idx] = d[n][e];
    }
}
// cp.async: mode 0 reads before the wait, 1 after it, 2 exits without waiting, 3 a misaligned
// copy, 4 a misaligned ldmatrix.
__global__ void copies(const float* src, float* out, int mode) {
  extern __shared__ __align__(128) float4 smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int lane = threadIdx.x;
  if (mode == 3) cp_async_16(s + 2, src, true);
  if (mode == 4) {
    uint32_t r[4];
    ldmatrix_x4<false>(r, s + 2);
  }
  if (mode >= 3) return;
  cp_async_16(s + 4 * lane, src + 4 * lane, lane % 2 == 0);  // odd lanes zero-fill
  cp_async_commit();
  if (mode == 2) return;
  if (mode == 1) cp_async_wait<0>();
  __syncwarp();
  for (int c = 0; c < 4; ++c) out[4 * lane + c] = s[4 * lane + c];
  if (mode == 0) cp_async_wait<0>();
}
template <typename T>
void run_products(float scale) {
  T a[256], bt[256], v[256];
  float out[512];
  for (int i = 0; i < 256; ++i) {
    a[i] = T((i * 7 % 11) - 5.0f);
    bt[i] = T(((i * 5) % 9) * 0.5f - 2.0f);
    v[i] = T(((i * 3) % 13) * scale - 3.0f);
  }
  products<T><<<1, 32, 3 * 16 * LD * sizeof(T)>>>(a, bt, v, out);
  printf("%d", (int)cudaGetLastError());
  for (float x : out) printf(" %.9g", x);
  printf("\n");
}
int main() {
  run_products<__half>(0.25f);
  run_products<__nv_bfloat16>(0.5f);
  float src[128], out[128];
  for (int i = 0; i < 128; ++i) src[i] = i + 1.0f;
  for (int mode = 0; mode < 5; ++mode) {
    copies<<<1, 32, 512>>>(src, out, mode);
    cudaError_t e = cudaGetLastError();
    printf("%d %s", (int)e, e ? cudaGetErrorString(e) : "");
    if (mode < 2) for (float x : out) printf(" %g", x);
    printf("\n");
  }
}
"""


def _values(dtype, scale):
    i = torch.arange(256)
    a = ((i * 7 % 11) - 5.0).to(dtype)
    bt = (((i * 5) % 9) * 0.5 - 2.0).to(dtype)
    v = (((i * 3) % 13) * scale - 3.0).to(dtype)
    return [x.double().view(16, 16) for x in (a, bt, v)]


@needs_cxx
def test_tensor_core_fragments_and_async_copies(tmp_path, runtime_obj):
    """ldmatrix (plain and .trans), mma.sync m16n8k16 and the C-to-A register reuse give the
    products the PTX ISA's fragment layouts define; cp.async lands only at its wait, zero-fills,
    and misuse fails the launch."""
    lines = run_cuda(tmp_path, runtime_obj, TENSOR_CORES).splitlines()
    for line, dtype, scale in ((lines[0], torch.float16, 0.25), (lines[1], torch.bfloat16, 0.5)):
        err, *vals = line.split()
        assert err == "0"
        got = torch.tensor([float(x) for x in vals], dtype=torch.float64)
        a, bt, v = _values(dtype, scale)
        c = a @ bt.T
        assert torch.equal(got[:256].view(16, 16), c)
        assert torch.equal(got[256:].view(16, 16), c.to(dtype).double() @ v)  # P rounded to 16 bits
    before, after, exited, bad_copy, bad_ldmatrix = lines[2:]
    before, after = before.split(), after.split()
    assert before[0] == "0" and all(x.lstrip("-") == "nan" for x in before[1:])  # not landed: the NaN fill
    want = [str(i + 1) if (i // 4) % 2 == 0 else "0" for i in range(128)]
    assert after[0] == "0" and after[1:] == want
    assert exited.startswith("719 ") and "in flight at thread exit" in exited
    assert bad_copy.startswith("719 ") and "cp.async" in bad_copy
    assert bad_ldmatrix.startswith("719 ") and "ldmatrix" in bad_ldmatrix
    # on an emulated sm_75 GPU the sm_80 instructions fail the launch
    old_gpu = run_cuda(tmp_path, runtime_obj, TENSOR_CORES, env={"TFKERNELS_CUDA_EMU_CC": "75"}).splitlines()
    assert old_gpu[0].startswith("719 ") and old_gpu[1].startswith("719 ")  # the products
    assert old_gpu[3].startswith("719 ") and "cp.async: needs an sm_80 GPU" in old_gpu[3]
    assert "ldmatrix: row address not 16-byte aligned" in old_gpu[6]  # ldmatrix itself exists on sm_75


@needs_cxx
def test_trace_counts_what_cp_async_reads(tmp_path, runtime_obj):
    """TFKERNELS_CUDA_EMU_TRACE=1 reports, after each launch, the bytes its cp.async copies read from
    global memory: valid copies only, counted when issued (the attention tests read tile skipping off it)."""
    exe = build_cuda(tmp_path, runtime_obj, TENSOR_CORES)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TFKERNELS_CUDA_EMU_TRACE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tfk_emu ")]
    assert [line.split(":")[0] for line in lines] == ["tfk_emu launch", "tfk_emu cp.async"] * 7
    reads = [int(re.search(r"(\d+) bytes read", line).group(1)) for line in lines[1::2]]
    # the two products copy nothing; modes 0-2: 16 even lanes x 16 bytes (odd lanes zero-fill, mode 2
    # issues them and exits); modes 3-4 fail before any valid copy
    assert reads == [0, 0, 256, 256, 256, 0, 0]


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


# ------------------------------------------------------------------------------ sanitizers

SANITIZED = r"""
#include <cstdlib>
#include <cstring>
#include <vector>
// 0: a correct program (three blocks of eight warps, barriers, shuffles, a per-thread array live across
//    barriers): nothing to report, so fiber stacks that are reused and switched under the sanitizer
//    raise no false alarm. 1: a read one element past a heap buffer. 2: a 16-byte vector load from an
//    address that is only 4-byte aligned. 3: a read past the end of dynamic shared memory.
__global__ void clean(const float* x, float* out, int n) {
  __shared__ float part[8];
  float local[4];
  for (int i = 0; i < 4; ++i) local[i] = x[(blockIdx.x * blockDim.x + threadIdx.x + i) % n];
  __syncthreads();
  float v = local[0] + local[1] + local[2] + local[3];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < 8; ++w) s += part[w];
    out[blockIdx.x] = s;
  }
}
__global__ void past_the_end(const float* x, float* out, int n) { out[threadIdx.x] = x[threadIdx.x + n - 31]; }
__global__ void misaligned(const float* x, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(x + 1);
  out[threadIdx.x] = static_cast<float>(v.x);
}
__global__ void smem_overrun(float* out) {
  extern __shared__ float s[];
  s[threadIdx.x] = 1.0f;
  __syncwarp();
  out[threadIdx.x] = s[threadIdx.x + 1];  // lane 31 reads one float past the 128 bytes
}
int main(int argc, char** argv) {
  const int mode = std::atoi(argv[1]), n = 1000;
  float* x = new float[n];
  for (int i = 0; i < n; ++i) x[i] = 1.0f;
  std::vector<float> out(768);
  if (mode == 0) clean<<<3, 256>>>(x, out.data(), n);
  if (mode == 1) past_the_end<<<1, 32>>>(x, out.data(), n);
  if (mode == 2) misaligned<<<1, 32>>>(x, out.data());
  if (mode == 3) smem_overrun<<<1, 32, 32 * sizeof(float)>>>(out.data());
  printf("%d %g %g %g\n", (int)cudaGetLastError(), out[0], out[1], out[2]);
  delete[] x;
}
"""


@needs_cxx
def test_sanitizers_catch_what_the_gpu_would_fault_on(tmp_path):
    """TFKERNELS_CUDA_EMU_SANITIZE builds the emulation with AddressSanitizer / UBSan: out-of-bounds global
    reads, misaligned vector loads and shared-memory overruns then stop the program with a report, and
    the emulator's fiber switches are annotated so that a correct program gets none."""
    flags = [*FLAGS, *_cuda_emu.sanitize_flags(["address", "undefined"])]
    obj = tmp_path / "tfk_cuda_emu_san.o"
    proc = subprocess.run([CXX, *flags, "-c", str(EMU / "tfk_cuda_emu.cpp"), "-o", str(obj)], capture_output=True, text=True)
    if proc.returncode != 0 and "sanitizer" in proc.stderr.lower():
        pytest.skip(f"this compiler cannot build with sanitizers: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    exe = build_cuda(tmp_path, obj, SANITIZED, flags)

    def run(mode):
        return subprocess.run([str(exe), str(mode)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})

    ok = run(0)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr[-4000:]
    assert ok.stdout.split() == ["0", "1024", "1024", "1024"]  # 256 threads x 4 ones per block
    for mode, report in ((1, "heap-buffer-overflow"), (2, "misaligned address"), (3, "use-after-poison")):
        bad = run(mode)
        assert bad.returncode != 0 and report in bad.stderr, (mode, bad.stderr[-4000:])
        assert "prog.cu" in bad.stderr  # the report points into the kernel's own source


def test_sanitize_setting(monkeypatch):
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_SANITIZE", " undefined, Address ")
    assert _cuda_emu.sanitizers() == ["address", "undefined"]
    flags = _cuda_emu.sanitize_flags(_cuda_emu.sanitizers())
    assert "-fsanitize=address,undefined" in flags and "-fno-sanitize-recover=undefined" in flags
    for off in ("", "0"):
        monkeypatch.setenv("TFKERNELS_CUDA_EMU_SANITIZE", off)
        assert _cuda_emu.sanitizers() == [] and _cuda_emu.sanitize_flags([]) == []
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_SANITIZE", "thread")
    with pytest.raises(ValueError, match="TFKERNELS_CUDA_EMU_SANITIZE"):
        _cuda_emu.sanitizers()
    # ASan's runtime cannot be loaded into a running Python: say how to start it, before compiling anything
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_SANITIZE", "address")
    monkeypatch.setattr(_cuda_emu, "_asan_runtime_loaded", lambda: False)
    with pytest.raises(RuntimeError, match="LD_PRELOAD"):
        _cuda_emu.build()
