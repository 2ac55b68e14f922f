// Device helpers shared by the tfkernels CUDA kernels: dtype conversion, warp/block reductions,
// and row iteration with 16-byte vectorised accesses. CUDA headers only.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace tfk {

// ------------------------------------------------------------------------- conversion

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls `body` with `scalar_t` set to the C++ type of `dtype`.
#define TFK_DISPATCH(dtype, ...)                                  \
  switch (dtype) {                                                \
    case ::tfk::DType::F32: { using scalar_t = float; __VA_ARGS__(); break; }          \
    case ::tfk::DType::F16: { using scalar_t = __half; __VA_ARGS__(); break; }         \
    case ::tfk::DType::BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__(); break; } \
    default: return cudaErrorInvalidValue;                        \
  }

// ------------------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sums K values over each row's threads (threadIdx.x, one row per threadIdx.y); every thread gets
// its row's totals, in the same order on every thread. blockDim.x must be a multiple of 32, and
// every thread of the block must call it.
template <int K>
__device__ __forceinline__ void row_sum(float (&v)[K]) {
  __shared__ float sh[K][32];
  const int wpr = blockDim.x >> 5;  // warps per row, the same for the whole block
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (wpr == 1) return;
  const int lane = threadIdx.x & 31, warp = (threadIdx.y * blockDim.x + threadIdx.x) >> 5;
  __syncthreads();  // a previous call's readers are done with sh
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sh[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < wpr ? sh[k][threadIdx.y * wpr + lane] : 0.0f);
}

// Maximum over each row's threads (NaN-ignoring, as fmaxf); same rules as row_sum.
__device__ __forceinline__ float row_max(float v) {
  __shared__ float sh[32];
  const int wpr = blockDim.x >> 5;
  v = warp_max(v);
  if (wpr == 1) return v;
  const int lane = threadIdx.x & 31, warp = (threadIdx.y * blockDim.x + threadIdx.x) >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  return warp_max(lane < wpr ? sh[threadIdx.y * wpr + lane] : -INFINITY);
}

// Sums K values over the whole block (one-dimensional, blockDim.x a multiple of 32, at most 1024);
// every thread gets the totals and every thread of the block must call it.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) { row_sum(v); }

// Maximum over the whole block (NaN-ignoring, as fmaxf); same rules as block_sum.
__device__ __forceinline__ float block_max(float v) { return row_max(v); }

// ------------------------------------------------------------------------- row iteration
// One block walks one row of n elements; each thread visits a subset of the columns. When the
// row is contiguous and its start 16-byte aligned, elements move in 16-byte vectors (4 fp32 or
// 8 fp16/bf16); the tail and strided/expanded rows (stride 0 included) go element by element.
// `f` gets the column index and the value(s) as fp32.

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);  // elements per 16-byte access
  alignas(16) T e[N];
  __device__ __forceinline__ void load(const T* p) { *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(e); }
};

// f(i, a[i])
template <typename T, typename F>
__device__ __forceinline__ void row_read1(const T* a, int64_t sa, int64_t n, F&& f) {
  constexpr int V = Vec<T>::N;
  if (sa == 1 && aligned16(a)) {
    const int64_t nv = n / V;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Vec<T> va;
      va.load(a + i * V);
#pragma unroll
      for (int j = 0; j < V; ++j) f(i * V + j, to_f(va.e[j]));
    }
    for (int64_t i = nv * V + threadIdx.x; i < n; i += blockDim.x) f(i, to_f(a[i]));
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i, to_f(a[i * sa]));
  }
}

// f(i, a[i], b[i])
template <typename T, typename F>
__device__ __forceinline__ void row_read2(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, F&& f) {
  constexpr int V = Vec<T>::N;
  if (sa == 1 && sb == 1 && aligned16(a) && aligned16(b)) {
    const int64_t nv = n / V;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Vec<T> va, vb;
      va.load(a + i * V);
      vb.load(b + i * V);
#pragma unroll
      for (int j = 0; j < V; ++j) f(i * V + j, to_f(va.e[j]), to_f(vb.e[j]));
    }
    for (int64_t i = nv * V + threadIdx.x; i < n; i += blockDim.x) f(i, to_f(a[i]), to_f(b[i]));
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i, to_f(a[i * sa]), to_f(b[i * sb]));
  }
}

// out[i] = f(i, a[i]); out is contiguous
template <typename T, typename F>
__device__ __forceinline__ void row_map1(const T* a, int64_t sa, T* out, int64_t n, F&& f) {
  constexpr int V = Vec<T>::N;
  if (sa == 1 && aligned16(a) && aligned16(out)) {
    const int64_t nv = n / V;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Vec<T> va, vo;
      va.load(a + i * V);
#pragma unroll
      for (int j = 0; j < V; ++j) vo.e[j] = from_f<T>(f(i * V + j, to_f(va.e[j])));
      vo.store(out + i * V);
    }
    for (int64_t i = nv * V + threadIdx.x; i < n; i += blockDim.x) out[i] = from_f<T>(f(i, to_f(a[i])));
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = from_f<T>(f(i, to_f(a[i * sa])));
  }
}

// out[i] = f(i, a[i], b[i]); out is contiguous
template <typename T, typename F>
__device__ __forceinline__ void row_map2(const T* a, int64_t sa, const T* b, int64_t sb, T* out, int64_t n, F&& f) {
  constexpr int V = Vec<T>::N;
  if (sa == 1 && sb == 1 && aligned16(a) && aligned16(b) && aligned16(out)) {
    const int64_t nv = n / V;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Vec<T> va, vb, vo;
      va.load(a + i * V);
      vb.load(b + i * V);
#pragma unroll
      for (int j = 0; j < V; ++j) vo.e[j] = from_f<T>(f(i * V + j, to_f(va.e[j]), to_f(vb.e[j])));
      vo.store(out + i * V);
    }
    for (int64_t i = nv * V + threadIdx.x; i < n; i += blockDim.x) out[i] = from_f<T>(f(i, to_f(a[i]), to_f(b[i])));
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = from_f<T>(f(i, to_f(a[i * sa]), to_f(b[i * sb])));
  }
}

// ------------------------------------------------------------------------- rows in registers
// The fast layout, for rows that are contiguous, start 16-byte aligned and hold a whole number of
// vectors: a block of (blockDim.x, blockDim.y) threads holds blockDim.y rows, one per threadIdx.y,
// and thread x of a row keeps vectors x, x + blockDim.x, ... (VPT of them) in registers as fp32.
// Each row then crosses global memory once; the row_* helpers above re-read it once per pass
// (three reads of x for a LayerNorm forward, which at large N spill out of L1 and cost bandwidth).

// Vector k of this thread's share of a row: its index in the row (in vectors).
__device__ __forceinline__ int64_t reg_vec(int k) { return threadIdx.x + static_cast<int64_t>(k) * blockDim.x; }

// Calls f(row, ok) for each row this thread's block holds: row blockIdx.x * blockDim.y + threadIdx.y,
// then a grid's rows further, while the block has rows below M; ok = row < M. The whole block runs
// the loop together (the rows' reductions have barriers), so rows past M still take part.
template <typename F>
__device__ __forceinline__ void for_reg_rows(int64_t M, F&& f) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; r0 < M; r0 += step) {
    const int64_t row = r0 + threadIdx.y;
    f(row, row < M);
  }
}

// v[k][:] = vector reg_vec(k) of row `row` (at base + row * stride) as fp32 when ok and the vector
// exists (< nvec), else `fill`; nothing is read for a row that is not ok.
template <typename T, int VPT>
__device__ __forceinline__ void reg_load(const T* base, int64_t row, int64_t stride, int64_t nvec, bool ok, float fill,
                                         float (&v)[VPT][Vec<T>::N]) {
  constexpr int V = Vec<T>::N;
  const T* p = ok ? base + row * stride : base;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t i = reg_vec(k);
    if (ok && i < nvec) {
      Vec<T> t;
      t.load(p + i * V);
#pragma unroll
      for (int j = 0; j < V; ++j) v[k][j] = to_f(t.e[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[k][j] = fill;
    }
  }
}

// Stores v[k][:] (converted to T) as vector reg_vec(k) of contiguous row `row` of out (n = nvec
// vectors a row), for the vectors that exist; nothing for a row that is not ok.
template <typename T, int VPT>
__device__ __forceinline__ void reg_store(T* out, int64_t row, int64_t nvec, bool ok, const float (&v)[VPT][Vec<T>::N]) {
  constexpr int V = Vec<T>::N;
  if (!ok) return;
  T* p = out + row * nvec * V;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t i = reg_vec(k);
    if (i < nvec) {
      Vec<T> t;
#pragma unroll
      for (int j = 0; j < V; ++j) t.e[j] = from_f<T>(v[k][j]);
      t.store(p + i * V);
    }
  }
}

// out[0..V) = p[0..V), fp32, in 16-byte loads (p 16-byte aligned; V a multiple of 4).
template <int V>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[V]) {
#pragma unroll
  for (int j = 0; j < V; j += 4) {
    const float4 q = *reinterpret_cast<const float4*>(p + j);
    out[j] = q.x; out[j + 1] = q.y; out[j + 2] = q.z; out[j + 3] = q.w;
  }
}

// ------------------------------------------------------------------------- launch helpers

// Threads for a block that walks a row of n elements: ~8 elements per thread, 32..1024.
inline unsigned row_threads(int64_t n) {
  int64_t t = (n + 7) / 8;
  t = (t + 31) / 32 * 32;
  return static_cast<unsigned>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

// Blocks for a row-per-block kernel (each block strides over rows when M exceeds the cap).
inline unsigned row_blocks(int64_t M) { return static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20)); }

// How a row-per-(blockDim.y) kernel holds rows of n elements of `elem` bytes in registers:
// vpt vectors per thread, tpr threads per row (a multiple of 32), rows per block; ok = false when
// the rows do not fit in max_threads threads with at most max_elems elements per thread.
struct RegPlan {
  bool ok = false;
  int vpt = 0, tpr = 0, rows = 0;
};

// The smallest vpt (1, 2, 4) that needs at most 256 threads a row (short rows: several per block,
// 128 threads in all), else the largest that fits: ~16-32 bytes of a row per thread in flight.
inline RegPlan reg_plan(int64_t n, int elem, int max_threads, int max_elems) {
  RegPlan p;
  const int V = 16 / elem;
  if (n <= 0 || n % V != 0) return p;
  const int64_t nvec = n / V;
  for (int target : {256, max_threads}) {
    for (int vpt = 1; vpt <= 4 && vpt * V <= max_elems; vpt *= 2) {
      const int64_t tpr = (nvec + vpt - 1) / vpt;
      if (tpr <= target) {
        p.ok = true;
        p.vpt = vpt;
        p.tpr = static_cast<int>((tpr + 31) / 32 * 32);
        p.rows = p.tpr >= 128 ? 1 : 128 / p.tpr;
        return p;
      }
    }
  }
  return p;
}

// A row-major operand the register layout can read: unit column stride (or one column), rows
// starting 16-byte aligned (base aligned, row stride a whole number of 16 bytes; 0 included).
inline bool reg_rows_ok(const void* p, int64_t stride_m, int64_t stride_n, int64_t n, int elem) {
  return (stride_n == 1 || n == 1) && (reinterpret_cast<uintptr_t>(p) & 15) == 0 && (stride_m * elem) % 16 == 0;
}

inline bool aligned16_or_null(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Calls f(std::integral_constant<int, VPT>) for vpt in {1, 2, 4}, VPT <= MAX_VPT: only the kernels a
// reg_plan with that element budget can ask for are instantiated.
template <int MAX_VPT, typename F>
void with_vpt(int vpt, F&& f) {
  if (vpt == 1) f(std::integral_constant<int, 1>{});
  if constexpr (MAX_VPT >= 2) if (vpt == 2) f(std::integral_constant<int, 2>{});
  if constexpr (MAX_VPT >= 4) if (vpt == 4) f(std::integral_constant<int, 4>{});
}

inline int elem_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

// Whether the current device has sm_80's tensor-core instructions for fp16 and bf16 (mma.sync
// m16n8k16, ldmatrix, cp.async): an attribute query, cheap next to a launch.
inline bool has_tensor_cores() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 8;
}

inline int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 108;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 108;
  return sms;
}

}  // namespace tfk
