// LayerNorm and RMSNorm forward and backward (one kernel family; IS_RMS selects the statistics).
//
// Math, per row x of length N (statistics in fp32 for numerical stability):
//   LayerNorm:  mu = mean(x),  rstd = 1/sqrt(mean((x-mu)^2) + eps),  xhat = (x-mu)*rstd
//   RMSNorm:    mu = 0,        rstd = 1/sqrt(mean(x^2) + eps),       xhat = x*rstd
//   y = xhat * w + b                                 (w, b optional, passed as fp32)
// Backward, with g = dy*w (or dy without a weight):
//   dx = rstd * (g - xhat*mean(g*xhat) - mean(g))    (RMSNorm drops the mean(g) term)
//   dw = sum_rows(dy*xhat),  db = sum_rows(dy)
//
// Layout: one block per row (rows of any length; ~8 elements per thread, up to 1024 threads),
// 16-byte vector accesses when a row is contiguous and aligned. The forward reads x three times
// (mean, centred variance, normalise; the re-reads mostly hit L1/L2): the two-pass variance stays
// accurate when |mean| >> std. dw/db use a two-stage reduction: a column-parallel kernel writes
// per-row-group partial sums (G, N), a second kernel sums the G partials. No atomics, so results
// are deterministic. Offsets are int64; any row/column strides (0 included).
#include "common.cuh"

namespace tfk {
namespace {

template <typename T, bool IS_RMS>
__global__ void norm_fwd_kernel(
    const T* __restrict__ x, int64_t sxm, int64_t sxn,  // input (M, N), strides
    const float* __restrict__ w,                         // weight (N,) fp32 or nullptr
    const float* __restrict__ b,                         // bias (N,) fp32 or nullptr
    T* __restrict__ y,                                   // output (M, N) contiguous
    float* __restrict__ mean_out,                        // (M,) fp32
    float* __restrict__ rstd_out,                        // (M,) fp32
    int64_t M, int64_t N, float eps) {
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * sxm;
    float mu = 0.0f;
    if (!IS_RMS) {
      float s[1] = {0.0f};
      row_read1(xr, sxn, N, [&](int64_t, float v) { s[0] += v; });
      block_sum(s);
      mu = s[0] * inv_n;
    }
    float q[1] = {0.0f};
    row_read1(xr, sxn, N, [&](int64_t, float v) { const float d = v - mu; q[0] += d * d; });
    block_sum(q);
    const float rstd = 1.0f / sqrtf(q[0] * inv_n + eps);
    if (threadIdx.x == 0) {
      mean_out[row] = mu;
      rstd_out[row] = rstd;
    }
    row_map1(xr, sxn, y + row * N, N, [&](int64_t i, float v) {
      float o = (v - mu) * rstd;
      if (w != nullptr) o *= w[i];
      if (b != nullptr) o += b[i];
      return o;
    });
  }
}

template <typename T, bool IS_RMS>
__global__ void norm_bwd_dx_kernel(
    const T* __restrict__ dy, int64_t sdym, int64_t sdyn,  // upstream gradient (M, N), strides (may be 0)
    const T* __restrict__ x, int64_t sxm, int64_t sxn,     // input (M, N), strides
    const float* __restrict__ w,                            // weight (N,) fp32 or nullptr
    const float* __restrict__ mean,                         // (M,) fp32 (unused for RMS)
    const float* __restrict__ rstd,                         // (M,) fp32
    T* __restrict__ dx,                                     // (M, N) contiguous
    int64_t M, int64_t N) {
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * sxm;
    const T* dyr = dy + row * sdym;
    const float mu = IS_RMS ? 0.0f : mean[row];
    const float rs = rstd[row];
    float c[2] = {0.0f, 0.0f};  // sum(g*xhat), sum(g)
    row_read2(xr, sxn, dyr, sdyn, N, [&](int64_t i, float xv, float g) {
      if (w != nullptr) g *= w[i];
      c[0] += g * ((xv - mu) * rs);
      c[1] += g;
    });
    block_sum(c);
    const float c1 = c[0] * inv_n;
    const float c2 = IS_RMS ? 0.0f : c[1] * inv_n;
    row_map2(xr, sxn, dyr, sdyn, dx + row * N, N, [&](int64_t i, float xv, float g) {
      if (w != nullptr) g *= w[i];
      const float xhat = (xv - mu) * rs;
      return (g - xhat * c1 - c2) * rs;
    });
  }
}

constexpr int DW_COLS = 32;  // columns per block of the dw/db kernel (one warp wide)
constexpr int DW_ROWS = 8;   // row lanes per block

// Stage one of dw/db: block (column block, row group) sums dy*xhat and dy over its rows.
template <typename T, bool IS_RMS>
__global__ void norm_bwd_dwdb_kernel(
    const T* __restrict__ dy, int64_t sdym, int64_t sdyn,
    const T* __restrict__ x, int64_t sxm, int64_t sxn,
    const float* __restrict__ mean, const float* __restrict__ rstd,
    float* __restrict__ dw_part,  // (G, N) fp32 or nullptr
    float* __restrict__ db_part,  // (G, N) fp32 or nullptr
    int64_t M, int64_t N, int64_t rows_per_group) {
  __shared__ float sw[DW_ROWS][DW_COLS + 1];
  __shared__ float sb[DW_ROWS][DW_COLS + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * DW_COLS + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t r1 = r0 + rows_per_group < M ? r0 + rows_per_group : M;
  float aw = 0.0f, ab = 0.0f;
  if (col < N) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += DW_ROWS) {
      const float g = to_f(dy[r * sdym + col * sdyn]);
      if (dw_part != nullptr) {
        const float mu = IS_RMS ? 0.0f : mean[r];
        aw += g * ((to_f(x[r * sxm + col * sxn]) - mu) * rstd[r]);
      }
      ab += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float tw = 0.0f, tb = 0.0f;
#pragma unroll
    for (int k = 0; k < DW_ROWS; ++k) {
      tw += sw[k][threadIdx.x];
      tb += sb[k][threadIdx.x];
    }
    if (dw_part != nullptr) dw_part[blockIdx.y * N + col] = tw;
    if (db_part != nullptr) db_part[blockIdx.y * N + col] = tb;
  }
}

// Stage two: out[c] = sum_g part[g, c].
__global__ void sum_partials_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t G, int64_t N) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= N) return;
  float s = 0.0f;
  for (int64_t g = 0; g < G; ++g) s += part[g * N + col];
  out[col] = s;
}

// Rows per group so that (column blocks) x (groups) fills the GPU a few times over.
int64_t rows_per_group(int64_t M, int64_t N) {
  const int64_t col_blocks = (N + DW_COLS - 1) / DW_COLS;
  int64_t G = (8 * static_cast<int64_t>(num_sms()) + col_blocks - 1) / col_blocks;
  if (G > 65535) G = 65535;  // gridDim.y limit
  if (G > M) G = M;
  if (G < 1) G = 1;
  return (M + G - 1) / G;
}

}  // namespace

int64_t norm_bwd_groups(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 1;
  const int64_t rpg = rows_per_group(M, N);
  return (M + rpg - 1) / rpg;
}

cudaError_t norm_fwd(DType dtype, bool is_rms, const void* x, int64_t stride_xm, int64_t stride_xn,
                     const float* w, const float* b, void* y, float* mean, float* rstd,
                     int64_t M, int64_t N, float eps, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(row_blocks(M)), block(row_threads(N));
  TFK_DISPATCH(dtype, [&] {
    if (is_rms)
      norm_fwd_kernel<scalar_t, true><<<grid, block, 0, stream>>>(
          static_cast<const scalar_t*>(x), stride_xm, stride_xn, w, b, static_cast<scalar_t*>(y), mean, rstd, M, N, eps);
    else
      norm_fwd_kernel<scalar_t, false><<<grid, block, 0, stream>>>(
          static_cast<const scalar_t*>(x), stride_xm, stride_xn, w, b, static_cast<scalar_t*>(y), mean, rstd, M, N, eps);
  });
  return cudaGetLastError();
}

cudaError_t norm_bwd(DType dtype, bool is_rms, const void* dy, int64_t stride_dym, int64_t stride_dyn,
                     const void* x, int64_t stride_xm, int64_t stride_xn, const float* w,
                     const float* mean, const float* rstd, void* dx, float* dw, float* db,
                     float* dw_part, float* db_part, int64_t M, int64_t N, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(row_blocks(M)), block(row_threads(N));
  const bool need_dwdb = dw != nullptr || db != nullptr;
  const int64_t rpg = rows_per_group(M, N);
  const int64_t G = (M + rpg - 1) / rpg;
  const dim3 grid2(static_cast<unsigned>((N + DW_COLS - 1) / DW_COLS), static_cast<unsigned>(G));
  const dim3 block2(DW_COLS, DW_ROWS);
  float* dwp = dw != nullptr ? dw_part : nullptr;
  float* dbp = db != nullptr ? db_part : nullptr;
  TFK_DISPATCH(dtype, [&] {
    const scalar_t* dyp = static_cast<const scalar_t*>(dy);
    const scalar_t* xp = static_cast<const scalar_t*>(x);
    if (is_rms) {
      norm_bwd_dx_kernel<scalar_t, true><<<grid, block, 0, stream>>>(
          dyp, stride_dym, stride_dyn, xp, stride_xm, stride_xn, w, mean, rstd, static_cast<scalar_t*>(dx), M, N);
      if (need_dwdb)
        norm_bwd_dwdb_kernel<scalar_t, true><<<grid2, block2, 0, stream>>>(
            dyp, stride_dym, stride_dyn, xp, stride_xm, stride_xn, mean, rstd, dwp, dbp, M, N, rpg);
    } else {
      norm_bwd_dx_kernel<scalar_t, false><<<grid, block, 0, stream>>>(
          dyp, stride_dym, stride_dyn, xp, stride_xm, stride_xn, w, mean, rstd, static_cast<scalar_t*>(dx), M, N);
      if (need_dwdb)
        norm_bwd_dwdb_kernel<scalar_t, false><<<grid2, block2, 0, stream>>>(
            dyp, stride_dym, stride_dyn, xp, stride_xm, stride_xn, mean, rstd, dwp, dbp, M, N, rpg);
    }
  });
  const dim3 grid3(static_cast<unsigned>((N + 255) / 256));
  if (dwp != nullptr) sum_partials_kernel<<<grid3, 256, 0, stream>>>(dwp, dw, G, N);
  if (dbp != nullptr) sum_partials_kernel<<<grid3, 256, 0, stream>>>(dbp, db, G, N);
  return cudaGetLastError();
}

}  // namespace tfk
