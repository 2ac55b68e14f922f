// A host emulation of the slice of CUDA that csrc/*.cu uses, so the CUDA backend's kernels run (and
// are tested against float64 references) on a machine with no GPU: `TFKERNELS_CUDA_EMULATE=1`
// builds csrc/ with g++ against this header (tfkernels/_cuda_emu.py) and registers the ops for CPU
// tensors. It is a test harness, not a fast path.
//
// Execution model: a launch runs its blocks one after another; the threads of a block are fibers
// on one OS thread, each running until it reaches a barrier (__syncthreads, or a warp collective:
// shuffle, ldmatrix, mma), in thread order. So a run is deterministic, and a missing barrier shows
// up as a read of data that later threads have not written yet. cp.async copies land only when a
// cp.async.wait_group covers them, so a missing wait reads stale data. Dynamic shared memory starts
// each block filled with NaN bytes, as a reminder that it is never zeroed. Checked like the
// hardware (the launch then fails with an error naming the cause): grid and block limits, dynamic
// shared memory above 48 KiB without cudaFuncSetAttribute or above the device's opt-in limit,
// barriers that not every thread reaches (a deadlock), ldmatrix and cp.async addresses (16-byte
// aligned, inside dynamic shared memory), cp.async copies still in flight when a thread exits,
// writes past the end of dynamic shared memory.
//
// Device: TFKERNELS_CUDA_EMU_SMEM (bytes, default 232448 = H100) is the opt-in shared memory limit,
// read at each query, so tests can shrink it to reach the kernels' smaller tile configurations.
// TFKERNELS_CUDA_EMU_CC (default 90) is the compute capability it reports; an instruction newer
// than it (mma.sync m16n8k16 and cp.async: 80, ldmatrix: 75) fails the launch, as on such a GPU.
// TFKERNELS_CUDA_EMU_TRACE=1 prints every launch's configuration to stderr, and after it the bytes its
// cp.async copies read from global memory (which tiles a kernel loads shows there).
// TFKERNELS_CUDA_EMU_SANITIZE=address,undefined builds all of it with AddressSanitizer / UBSan: then
// out-of-bounds global accesses, reads past dynamic shared memory and misaligned vector accesses stop
// the process with a report (csrc/README.md; the fiber switches are annotated for ASan).
#pragma once

#include <cmath>
#include <math.h>  // expf, logf, fmaxf, ... in the global namespace, as device code has them
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // blocks run one at a time, so one static copy is the block's shared memory

// ------------------------------------------------------------------ vector types
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };

// ------------------------------------------------------------------ runtime API
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace tfk_emu {

struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  const void* func;
};

// What the kernel code reads as threadIdx & co: the scheduler sets them before resuming a fiber.
// (Plain globals: every switch goes through an opaque call, so the compiler reloads them after it.)
extern uint3 g_threadIdx, g_blockIdx;
extern dim3 g_blockDim, g_gridDim;

cudaError_t launch(const LaunchCfg& cfg, const std::function<void()>& body);
void set_error(cudaError_t err, const char* what);  // the first error of a launch is kept
void syncthreads();
void syncwarp();
uint64_t warp_exchange(uint64_t mine, int src_lane);  // every lane posts `mine`, gets lane src_lane's
int lane_id();
void* dynamic_smem();
// sm_80 warp-level instructions (csrc/mma.cuh), from the PTX ISA's fragment layouts; see the .cpp.
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans);
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void cp_async(void* dst, const void* src, int bytes, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
int smem_optin();
int compute_capability();  // TFKERNELS_CUDA_EMU_CC, e.g. 90 (default) or 75
void set_func_smem(const void* func, int bytes);

template <typename... P>
struct Bound {
  void (*kernel)(P...);
  LaunchCfg cfg;
  template <typename... A>
  void operator()(A&&... args) const {
    // the arguments are converted to the parameter types once, as a launch copies them
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    launch(cfg, [&params, k] { std::apply(k, params); });
  }
};

// `kernel<<<grid, block, smem, stream>>>(args)` is rewritten to
// `::tfk_emu::Launcher(grid, block, smem, stream)(kernel)(args)` by tfkernels/_cuda_emu.py.
struct Launcher {
  LaunchCfg cfg;
  Launcher(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) : cfg{grid, block, smem, nullptr} {}
  template <typename... P>
  Bound<P...> operator()(void (*kernel)(P...)) const {
    LaunchCfg c = cfg;
    c.func = reinterpret_cast<const void*>(kernel);
    return Bound<P...>{kernel, c};
  }
};

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace tfk_emu

#define threadIdx ::tfk_emu::g_threadIdx
#define blockIdx ::tfk_emu::g_blockIdx
#define blockDim ::tfk_emu::g_blockDim
#define gridDim ::tfk_emu::g_gridDim

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > tfk_emu::smem_optin())
    return cudaErrorInvalidValue;  // not sticky, as on the device: the launch that follows fails instead
  tfk_emu::set_func_smem(reinterpret_cast<const void*>(func), value);
  return cudaSuccess;
}

// One resident block per SM: the emulation has no occupancy to report, and small grids make the
// persistent kernels (norm.cu's backward) walk several rows per block even on the tests' small inputs.
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F*, int block_size, size_t) {
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  *blocks = 1;
  return cudaSuccess;
}

// ------------------------------------------------------------------ device functions
// The fences keep the compiler from moving shared-memory accesses (static in the emulation) across a
// barrier, whatever it may prove about who else can reach those statics.
inline void __syncthreads() {
  asm volatile("" ::: "memory");
  tfk_emu::syncthreads();
  asm volatile("" ::: "memory");
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  asm volatile("" ::: "memory");
  tfk_emu::syncwarp();
  asm volatile("" ::: "memory");
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const int lane = tfk_emu::lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the segment: own value
  return tfk_emu::from_bits<T>(tfk_emu::warp_exchange(tfk_emu::to_bits(v), src));
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = tfk_emu::lane_id();
  int src = lane + static_cast<int>(delta);
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return tfk_emu::from_bits<T>(tfk_emu::warp_exchange(tfk_emu::to_bits(v), src));
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  const int lane = tfk_emu::lane_id();
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return tfk_emu::from_bits<T>(tfk_emu::warp_exchange(tfk_emu::to_bits(v), src));
}

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline int __float_as_int(float x) { return tfk_emu::from_bits<int>(tfk_emu::to_bits(x)); }
inline float __int_as_float(int x) { return tfk_emu::from_bits<float>(tfk_emu::to_bits(x)); }

// CUDA's min/max take mixed integer types
template <typename A, typename B>
inline constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? static_cast<std::common_type_t<A, B>>(b) : static_cast<std::common_type_t<A, B>>(a);
}
template <typename A, typename B>
inline constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? static_cast<std::common_type_t<A, B>>(b) : static_cast<std::common_type_t<A, B>>(a);
}

// ------------------------------------------------------------------ fp16 / bf16 (storage types)
namespace tfk_emu {

inline uint32_t f32_bits(float f) { return from_bits<uint32_t>(to_bits(f)); }
inline float bits_f32(uint32_t u) { return from_bits<float>(u); }

// IEEE binary16 <-> binary32, round to nearest even (as __float2half_rn).
inline uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));  // NaN / inf
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // value = ax_float; half subnormal unit = 2^-24. Round |f| / 2^-24 to nearest even.
    const float a = bits_f32(ax);
    const float scaled = a * 16777216.0f;  // exact (power of two)
    float r = std::nearbyint(scaled);       // default rounding mode: nearest even
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(r));  // r == 1024 gives the smallest normal
  }
  uint32_t mant = ax & 0x7fffffu;
  const uint32_t exp = (ax >> 23) - 127 + 15;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
  return static_cast<uint16_t>(sign | h);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;  // mant * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding) >> 16);
}
inline float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

}  // namespace tfk_emu

struct __half {
  uint16_t __x;
  __half() = default;
  explicit __half(float f) : __x(tfk_emu::f32_to_f16(f)) {}
};
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) : __x(tfk_emu::f32_to_bf16(f)) {}
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage types");

inline float __half2float(__half h) { return tfk_emu::f16_to_f32(h.__x); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return tfk_emu::bf16_to_f32(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
