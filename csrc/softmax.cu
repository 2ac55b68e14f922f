// Softmax over the last dim of a 2-D (M, N) tensor, forward and backward.
//
//   y = exp(x - max(x)) / sum(exp(x - max(x)));    dx = y * (dy - sum(dy * y))
// Same -inf/NaN behaviour as torch: -inf entries get 0, a row of only -inf gives NaN (0/0 through
// exp(-inf - -inf)), a NaN anywhere in a row makes the row NaN (through the sum). Accumulation fp32.
//
// Two layouts, as in norm.cu: rows held in registers (contiguous, 16-byte aligned rows of whole
// vectors, up to 32768 fp16/bf16 or 16384 fp32 elements forward, 16384 backward; several
// rows a block when short): x is read once, where the generic layout reads it three times (max,
// sum, write; the re-reads mostly hit L1/L2). Generic: one block per row, rows of any length
// (~8 elements per thread, up to 1024 threads), 16-byte vector accesses on contiguous aligned rows,
// any strides otherwise (0 included).
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

template <typename T, int VPT>
__global__ void __launch_bounds__(1024) softmax_fwd_regs_kernel(
    const T* __restrict__ x, int64_t sxm,  // input (M, N), unit column stride
    T* __restrict__ y,                      // output (M, N) contiguous
    int64_t M, int64_t N) {
  constexpr int V = Vec<T>::N;
  const int64_t nvec = N / V;
  for_reg_rows(M, [&](int64_t row, bool ok) {
    float v[VPT][V];
    reg_load<T, VPT>(x, row, sxm, nvec, ok, -INFINITY, v);  // -inf: no effect on the max
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) m = fmaxf(m, v[k][j]);
    m = row_max(m);
    float s[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const bool here = reg_vec(k) < nvec;  // padding adds nothing (exp(-inf - m) is NaN when m = -inf)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[k][j] = expf(v[k][j] - m);
        if (here) s[0] += v[k][j];
      }
    }
    row_sum(s);
    const float inv = 1.0f / s[0];
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) v[k][j] *= inv;
    reg_store<T, VPT>(y, row, nvec, ok, v);
  });
}

template <typename T, int VPT>
__global__ void __launch_bounds__(1024) softmax_bwd_regs_kernel(
    const T* __restrict__ dy, int64_t sdym,  // upstream gradient (M, N), unit column stride
    const T* __restrict__ y, int64_t sym,    // saved output (M, N), unit column stride
    T* __restrict__ dx,                       // (M, N) contiguous
    int64_t M, int64_t N) {
  constexpr int V = Vec<T>::N;
  const int64_t nvec = N / V;
  for_reg_rows(M, [&](int64_t row, bool ok) {
    float g[VPT][V], p[VPT][V];
    reg_load<T, VPT>(dy, row, sdym, nvec, ok, 0.0f, g);
    reg_load<T, VPT>(y, row, sym, nvec, ok, 0.0f, p);
    float d[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) d[0] += g[k][j] * p[k][j];
    row_sum(d);
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) g[k][j] = p[k][j] * (g[k][j] - d[0]);
    reg_store<T, VPT>(dx, row, nvec, ok, g);
  });
}

constexpr int kFwdRegElems = 32;  // elements of a row a thread holds: x (forward)
constexpr int kBwdRegElems = 16;  // dy and y (backward)

}  // namespace

cudaError_t softmax_fwd(DType dtype, const void* x, int64_t stride_xm, int64_t stride_xn,
                        void* y, int64_t M, int64_t N, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const int elem = elem_size(dtype);
  const RegPlan rp = reg_plan(N, elem, 1024, kFwdRegElems);
  if (rp.ok && reg_rows_ok(x, stride_xm, stride_xn, N, elem) && aligned16_or_null(y)) {
    const dim3 grid(row_blocks((M + rp.rows - 1) / rp.rows)), block(rp.tpr, rp.rows);
    TFK_DISPATCH(dtype, [&] {
      with_vpt<kFwdRegElems / Vec<scalar_t>::N>(rp.vpt, [&](auto vpt) {
        constexpr int VPT = decltype(vpt)::value;
        softmax_fwd_regs_kernel<scalar_t, VPT><<<grid, block, 0, stream>>>(
            static_cast<const scalar_t*>(x), stride_xm, static_cast<scalar_t*>(y), M, N);
      });
    });
    return cudaGetLastError();
  }
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
  const int elem = elem_size(dtype);
  const RegPlan rp = reg_plan(N, elem, 1024, kBwdRegElems);
  if (rp.ok && reg_rows_ok(dy, stride_dym, stride_dyn, N, elem) && reg_rows_ok(y, stride_ym, stride_yn, N, elem) &&
      aligned16_or_null(dx)) {
    const dim3 grid(row_blocks((M + rp.rows - 1) / rp.rows)), block(rp.tpr, rp.rows);
    TFK_DISPATCH(dtype, [&] {
      with_vpt<kBwdRegElems / Vec<scalar_t>::N>(rp.vpt, [&](auto vpt) {
        constexpr int VPT = decltype(vpt)::value;
        softmax_bwd_regs_kernel<scalar_t, VPT><<<grid, block, 0, stream>>>(
            static_cast<const scalar_t*>(dy), stride_dym, static_cast<const scalar_t*>(y), stride_ym,
            static_cast<scalar_t*>(dx), M, N);
      });
    });
    return cudaGetLastError();
  }
  const dim3 grid(row_blocks(M)), block(row_threads(N));
  TFK_DISPATCH(dtype, [&] {
    softmax_bwd_kernel<scalar_t><<<grid, block, 0, stream>>>(
        static_cast<const scalar_t*>(dy), stride_dym, stride_dyn, static_cast<const scalar_t*>(y),
        stride_ym, stride_yn, static_cast<scalar_t*>(dx), M, N);
  });
  return cudaGetLastError();
}

}  // namespace tfk
