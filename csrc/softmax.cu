// Softmax over the last dim of a 2-D (M, N) tensor, forward and backward.
//
//   y = exp(x - max(x)) / sum(exp(x - max(x)));    dx = y * (dy - sum(dy * y))
// Same -inf/NaN behaviour as torch: -inf entries get 0, a row of only -inf gives NaN (0/0 through
// exp(-inf - -inf)), a NaN anywhere in a row makes the row NaN (through the sum). Accumulation fp32.
//
// One block per row, rows of any length (~8 elements per thread, up to 1024 threads), 16-byte
// vector accesses on contiguous aligned rows, any strides otherwise (0 included). The forward
// reads x three times (max, sum, write); re-reads mostly hit L1/L2.
#include "common.cuh"

namespace tfk {
namespace {

template <typename T>
__global__ void softmax_fwd_kernel(
    const T* __restrict__ x, int64_t sxm, int64_t sxn,  // input (M, N), strides
    T* __restrict__ y,                                   // output (M, N) contiguous
    int64_t M, int64_t N) {
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * sxm;
    float m = -INFINITY;
    row_read1(xr, sxn, N, [&](int64_t, float v) { m = fmaxf(m, v); });
    m = block_max(m);
    float s[1] = {0.0f};
    row_read1(xr, sxn, N, [&](int64_t, float v) { s[0] += expf(v - m); });
    block_sum(s);
    const float inv = 1.0f / s[0];
    row_map1(xr, sxn, y + row * N, N, [&](int64_t, float v) { return expf(v - m) * inv; });
  }
}

template <typename T>
__global__ void softmax_bwd_kernel(
    const T* __restrict__ dy, int64_t sdym, int64_t sdyn,  // upstream gradient (M, N), strides (may be 0)
    const T* __restrict__ y, int64_t sym, int64_t syn,     // saved output (M, N), strides
    T* __restrict__ dx,                                     // (M, N) contiguous
    int64_t M, int64_t N) {
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* dyr = dy + row * sdym;
    const T* yr = y + row * sym;
    float d[1] = {0.0f};
    row_read2(dyr, sdyn, yr, syn, N, [&](int64_t, float g, float p) { d[0] += g * p; });
    block_sum(d);
    const float dot = d[0];
    row_map2(dyr, sdyn, yr, syn, dx + row * N, N, [&](int64_t, float g, float p) { return p * (g - dot); });
  }
}

}  // namespace

cudaError_t softmax_fwd(DType dtype, const void* x, int64_t stride_xm, int64_t stride_xn,
                        void* y, int64_t M, int64_t N, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(row_blocks(M)), block(row_threads(N));
  TFK_DISPATCH(dtype, [&] {
    softmax_fwd_kernel<scalar_t><<<grid, block, 0, stream>>>(
        static_cast<const scalar_t*>(x), stride_xm, stride_xn, static_cast<scalar_t*>(y), M, N);
  });
  return cudaGetLastError();
}

cudaError_t softmax_bwd(DType dtype, const void* dy, int64_t stride_dym, int64_t stride_dyn,
                        const void* y, int64_t stride_ym, int64_t stride_yn,
                        void* dx, int64_t M, int64_t N, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(row_blocks(M)), block(row_threads(N));
  TFK_DISPATCH(dtype, [&] {
    softmax_bwd_kernel<scalar_t><<<grid, block, 0, stream>>>(
        static_cast<const scalar_t*>(dy), stride_dym, stride_dyn, static_cast<const scalar_t*>(y),
        stride_ym, stride_yn, static_cast<scalar_t*>(dx), M, N);
  });
  return cudaGetLastError();
}

}  // namespace tfk
