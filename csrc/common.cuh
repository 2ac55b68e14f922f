// Device helpers shared by the tfkernels CUDA kernels: dtype conversion, warp/block reductions,
// and row iteration with 16-byte vectorised accesses. CUDA headers only.
#pragma once

#include <cstdint>
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

// Sums K values over the whole block; every thread gets the totals. blockDim.x must be a multiple
// of 32 (at most 1024) and every thread of the block must call it.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
  __shared__ float sh[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();  // a previous call's readers are done with sh
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sh[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < nwarps ? sh[k][lane] : 0.0f);
}

// Maximum over the block (NaN-ignoring, as fmaxf); same rules as block_sum.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  return warp_max(lane < nwarps ? sh[lane] : -INFINITY);
}

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

// ------------------------------------------------------------------------- launch helpers

// Threads for a block that walks a row of n elements: ~8 elements per thread, 32..1024.
inline unsigned row_threads(int64_t n) {
  int64_t t = (n + 7) / 8;
  t = (t + 31) / 32 * 32;
  return static_cast<unsigned>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

// Blocks for a row-per-block kernel (each block strides over rows when M exceeds the cap).
inline unsigned row_blocks(int64_t M) { return static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20)); }

inline int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 108;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 108;
  return sms;
}

}  // namespace tfk
