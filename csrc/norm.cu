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
// Two layouts:
// - registers (contiguous, 16-byte aligned rows of whole vectors, up to 32768 fp16/bf16 or 16384
//   fp32 elements forward, 8192 backward; common.cuh's reg_plan): each row is read once into
//   registers (blockDim.y rows per block for short rows), so the forward moves x in and y out and
//   nothing else, and the backward x and dy in, dx out. The backward blocks are persistent (a few
//   per SM, each walking a strided set of rows) and keep their columns' dw/db partial sums in
//   registers across rows: one (G, N) partial row per block instead of a second pass over x and dy.
// - generic (any length and strides, 0 included): one block per row, 16-byte vector accesses
//   where the row allows; the forward re-reads x for each statistic (mostly from L1/L2; the
//   two-pass variance stays accurate when |mean| >> std) and dw/db come from a column-parallel
//   kernel that re-reads x and dy.
// Both reduce dw/db in two stages (partials (G, N), then a column sum): no atomics, so results
// are deterministic. Offsets are int64.
#include "common.cuh"

namespace tfk {
namespace {

// ------------------------------------------------------------------------- generic layout

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

constexpr int SUM_COLS = 32;  // columns per block of the partial sums' kernel
constexpr int SUM_ROWS = 16;  // partial rows summed in parallel per column

// Stage two: out[c] = sum_g part[g, c]. Lane y of a column sums rows y, y + SUM_ROWS, ..., then the
// lanes are added in order (deterministic); G can be several hundred (a few blocks per SM).
__global__ void sum_partials_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t G, int64_t N) {
  __shared__ float sh[SUM_ROWS][SUM_COLS + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * SUM_COLS + threadIdx.x;
  float s = 0.0f;
  if (col < N)
    for (int64_t g = threadIdx.y; g < G; g += SUM_ROWS) s += part[g * N + col];
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float t = 0.0f;
#pragma unroll
    for (int k = 0; k < SUM_ROWS; ++k) t += sh[k][threadIdx.x];
    out[col] = t;
  }
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

// ------------------------------------------------------------------------- register layout

template <typename T, bool IS_RMS, int VPT>
__global__ void __launch_bounds__(1024) norm_fwd_regs_kernel(
    const T* __restrict__ x, int64_t sxm,               // input (M, N), unit column stride
    const float* __restrict__ w,                         // weight (N,) fp32 or nullptr (16-byte aligned)
    const float* __restrict__ b,                         // bias (N,) fp32 or nullptr (16-byte aligned)
    T* __restrict__ y,                                   // output (M, N) contiguous
    float* __restrict__ mean_out, float* __restrict__ rstd_out,  // (M,) fp32
    int64_t M, int64_t N, float eps) {
  constexpr int V = Vec<T>::N;
  const int64_t nvec = N / V;
  const float inv_n = 1.0f / static_cast<float>(N);
  for_reg_rows(M, [&](int64_t row, bool ok) {
    float v[VPT][V];
    reg_load<T, VPT>(x, row, sxm, nvec, ok, 0.0f, v);
    float mu = 0.0f;
    if (!IS_RMS) {
      float s[1] = {0.0f};
#pragma unroll
      for (int k = 0; k < VPT; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) s[0] += v[k][j];
      row_sum(s);
      mu = s[0] * inv_n;
    }
    float q[1] = {0.0f};  // centred second moment, from the registers: exact two-pass variance
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (reg_vec(k) < nvec) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = v[k][j] - mu;
          q[0] += d * d;
        }
      }
    }
    row_sum(q);
    const float rstd = 1.0f / sqrtf(q[0] * inv_n + eps);
    if (ok && threadIdx.x == 0) {
      mean_out[row] = mu;
      rstd_out[row] = rstd;
    }
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = reg_vec(k);
      if (i >= nvec) continue;
      float wv[V], bv[V];  // defined either way: a conditionally written array ends up in local memory
#pragma unroll
      for (int j = 0; j < V; ++j) wv[j] = 1.0f, bv[j] = 0.0f;
      if (w != nullptr) load_f32<V>(w + i * V, wv);
      if (b != nullptr) load_f32<V>(b + i * V, bv);
#pragma unroll
      for (int j = 0; j < V; ++j) v[k][j] = (v[k][j] - mu) * rstd * wv[j] + bv[j];
    }
    reg_store<T, VPT>(y, row, nvec, ok, v);
  });
}

constexpr int kBwdRegThreads = 512;  // the backward's register budget: 128 per thread at 512 threads

// dx for rows blockIdx.x * blockDim.y + threadIdx.y, stepping by gridDim.x * blockDim.y; the block's
// dw/db partial sums for its columns stay in registers and land in row blockIdx.x of dw_part/db_part.
template <typename T, bool IS_RMS, int VPT>
__global__ void __launch_bounds__(kBwdRegThreads) norm_bwd_regs_kernel(
    const T* __restrict__ dy, int64_t sdym,             // upstream gradient (M, N), unit column stride
    const T* __restrict__ x, int64_t sxm,               // input (M, N), unit column stride
    const float* __restrict__ w,                         // weight (N,) fp32 or nullptr (16-byte aligned)
    const float* __restrict__ mean, const float* __restrict__ rstd,  // (M,) fp32 (mean unused for RMS)
    T* __restrict__ dx,                                  // (M, N) contiguous
    float* __restrict__ dw_part, float* __restrict__ db_part,  // (gridDim.x, N) fp32 or nullptr
    int64_t M, int64_t N) {
  constexpr int V = Vec<T>::N;
  const int64_t nvec = N / V;
  const float inv_n = 1.0f / static_cast<float>(N);
  float aw[VPT][V], ab[VPT][V];
#pragma unroll
  for (int k = 0; k < VPT; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) aw[k][j] = ab[k][j] = 0.0f;
  for_reg_rows(M, [&](int64_t row, bool ok) {
    float xv[VPT][V], g[VPT][V];
    reg_load<T, VPT>(x, row, sxm, nvec, ok, 0.0f, xv);
    reg_load<T, VPT>(dy, row, sdym, nvec, ok, 0.0f, g);  // dy = 0 where nothing is loaded
    // a row past M: rs = 0 makes its xhat 0, and its dy is 0, so it adds nothing anywhere
    const float mu = (IS_RMS || !ok) ? 0.0f : mean[row];
    const float rs = ok ? rstd[row] : 0.0f;
    float c[2] = {0.0f, 0.0f};  // sum(g*xhat), sum(g)
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = reg_vec(k);
      float wv[V];  // defined either way: a conditionally written array ends up in local memory
#pragma unroll
      for (int j = 0; j < V; ++j) wv[j] = 1.0f;
      if (w != nullptr && i < nvec) load_f32<V>(w + i * V, wv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xhat = (xv[k][j] - mu) * rs;
        aw[k][j] += g[k][j] * xhat;  // dw and db take dy, before the weight
        ab[k][j] += g[k][j];
        g[k][j] *= wv[j];
        xv[k][j] = xhat;  // x is not needed again
        c[0] += g[k][j] * xhat;
        c[1] += g[k][j];
      }
    }
    row_sum(c);
    const float c1 = c[0] * inv_n;
    const float c2 = IS_RMS ? 0.0f : c[1] * inv_n;
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) g[k][j] = (g[k][j] - xv[k][j] * c1 - c2) * rs;
    reg_store<T, VPT>(dx, row, nvec, ok, g);
  });
  if (dw_part == nullptr && db_part == nullptr) return;
  // the block's rows (threadIdx.y) hold partials for the same columns: row 0 adds the others' in
  // row order (deterministic), 4 columns a round through shared memory, then writes the block's row
  if (blockDim.y > 1) {
    __shared__ float4 red[kBwdRegThreads];
    const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      float (&acc)[VPT][V] = a == 0 ? aw : ab;
#pragma unroll
      for (int k = 0; k < VPT; ++k)
#pragma unroll
        for (int j = 0; j < V; j += 4) {
          __syncthreads();  // the previous round's readers are done with red
          red[t] = make_float4(acc[k][j], acc[k][j + 1], acc[k][j + 2], acc[k][j + 3]);
          __syncthreads();
          if (threadIdx.y == 0) {
            for (int r = 1; r < static_cast<int>(blockDim.y); ++r) {
              const float4 q = red[r * blockDim.x + threadIdx.x];
              acc[k][j] += q.x, acc[k][j + 1] += q.y, acc[k][j + 2] += q.z, acc[k][j + 3] += q.w;
            }
          }
        }
    }
  }
  if (threadIdx.y != 0) return;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t i = reg_vec(k);
    if (i >= nvec) continue;
    const int64_t at = static_cast<int64_t>(blockIdx.x) * N + i * V;  // 16-byte aligned: N is whole vectors
#pragma unroll
    for (int j = 0; j < V; j += 4) {
      if (dw_part != nullptr) *reinterpret_cast<float4*>(dw_part + at + j) = make_float4(aw[k][j], aw[k][j + 1], aw[k][j + 2], aw[k][j + 3]);
      if (db_part != nullptr) *reinterpret_cast<float4*>(db_part + at + j) = make_float4(ab[k][j], ab[k][j + 1], ab[k][j + 2], ab[k][j + 3]);
    }
  }
}

// ------------------------------------------------------------------------- launchers


constexpr int kFwdRegElems = 32;  // elements a thread holds in the forward (x; 32 fp32 registers)
constexpr int kBwdRegElems = 16;  // and in the backward (x, dy and the dw/db partials: 64 registers)

// The backward's register plan and its number of persistent blocks (= partial rows): those resident
// at once (the occupancy calculator knows the kernel's registers), at most two an SM, at most one
// per row group. Whether the operands allow the layout is the caller's test.
struct BwdRegs {
  RegPlan plan;
  int64_t blocks = 0;
};

template <typename T, bool IS_RMS>
BwdRegs bwd_regs_plan(int64_t M, int64_t N) {
  BwdRegs r;
  r.plan = reg_plan(N, sizeof(T), kBwdRegThreads, kBwdRegElems);
  if (!r.plan.ok) return r;
  // short rows: as many to a block as fill kBwdRegThreads, so that few, large blocks keep the
  // GPU's bandwidth busy and the (G, N) partials stay small next to x and dy
  r.plan.rows = r.plan.tpr <= kBwdRegThreads / 2 ? kBwdRegThreads / r.plan.tpr : 1;
  const int threads = r.plan.tpr * r.plan.rows;
  int per_sm = 0;
  with_vpt<kBwdRegElems / Vec<T>::N>(r.plan.vpt, [&](auto vpt) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, norm_bwd_regs_kernel<T, IS_RMS, decltype(vpt)::value>,
                                                      threads, 0) != cudaSuccess)
      per_sm = 1;
  });
  // at most two blocks an SM: each partial row costs 8N bytes written and read again, against the
  // 6N (fp16/bf16) a row of x, dy and dx moves (G = 264 partials at M = 16384 rows: ~4 %)
  per_sm = per_sm < 1 ? 1 : (per_sm > 2 ? 2 : per_sm);
  const int64_t groups = (M + r.plan.rows - 1) / r.plan.rows;
  const int64_t resident = static_cast<int64_t>(num_sms()) * per_sm;
  r.blocks = groups < resident ? groups : resident;
  return r;
}

BwdRegs bwd_regs_plan(DType dtype, bool is_rms, int64_t M, int64_t N) {
  BwdRegs r;
  [&]() -> cudaError_t {
    TFK_DISPATCH(dtype, [&] { r = is_rms ? bwd_regs_plan<scalar_t, true>(M, N) : bwd_regs_plan<scalar_t, false>(M, N); });
    return cudaSuccess;
  }();
  return r;
}

}  // namespace

int64_t norm_bwd_groups(DType dtype, bool is_rms, int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 1;
  const int64_t rpg = rows_per_group(M, N);
  const int64_t generic = (M + rpg - 1) / rpg;
  const BwdRegs r = bwd_regs_plan(dtype, is_rms, M, N);
  return r.plan.ok && r.blocks > generic ? r.blocks : generic;  // either layout fits
}

cudaError_t norm_fwd(DType dtype, bool is_rms, const void* x, int64_t stride_xm, int64_t stride_xn,
                     const float* w, const float* b, void* y, float* mean, float* rstd,
                     int64_t M, int64_t N, float eps, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const int elem = elem_size(dtype);
  const RegPlan rp = reg_plan(N, elem, 1024, kFwdRegElems);
  if (rp.ok && reg_rows_ok(x, stride_xm, stride_xn, N, elem) && aligned16_or_null(w) && aligned16_or_null(b) &&
      aligned16_or_null(y)) {
    const dim3 grid(row_blocks((M + rp.rows - 1) / rp.rows)), block(rp.tpr, rp.rows);
    TFK_DISPATCH(dtype, [&] {
      with_vpt<kFwdRegElems / Vec<scalar_t>::N>(rp.vpt, [&](auto vpt) {
        constexpr int VPT = decltype(vpt)::value;
        const scalar_t* xp = static_cast<const scalar_t*>(x);
        scalar_t* yp = static_cast<scalar_t*>(y);
        if (is_rms)
          norm_fwd_regs_kernel<scalar_t, true, VPT><<<grid, block, 0, stream>>>(xp, stride_xm, w, b, yp, mean, rstd, M, N, eps);
        else
          norm_fwd_regs_kernel<scalar_t, false, VPT><<<grid, block, 0, stream>>>(xp, stride_xm, w, b, yp, mean, rstd, M, N, eps);
      });
    });
    return cudaGetLastError();
  }
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
  float* dwp = dw != nullptr ? dw_part : nullptr;
  float* dbp = db != nullptr ? db_part : nullptr;
  const int elem = elem_size(dtype);
  int64_t G = 0;
  const BwdRegs r = bwd_regs_plan(dtype, is_rms, M, N);
  if (r.plan.ok && reg_rows_ok(x, stride_xm, stride_xn, N, elem) && reg_rows_ok(dy, stride_dym, stride_dyn, N, elem) &&
      aligned16_or_null(w) && aligned16_or_null(dx) && aligned16_or_null(dwp) && aligned16_or_null(dbp)) {
    G = r.blocks;
    const dim3 grid(static_cast<unsigned>(G)), block(r.plan.tpr, r.plan.rows);
    TFK_DISPATCH(dtype, [&] {
      with_vpt<kBwdRegElems / Vec<scalar_t>::N>(r.plan.vpt, [&](auto vpt) {
        constexpr int VPT = decltype(vpt)::value;
        const scalar_t* dyp = static_cast<const scalar_t*>(dy);
        const scalar_t* xp = static_cast<const scalar_t*>(x);
        scalar_t* dxp = static_cast<scalar_t*>(dx);
        if (is_rms)
          norm_bwd_regs_kernel<scalar_t, true, VPT><<<grid, block, 0, stream>>>(
              dyp, stride_dym, xp, stride_xm, w, mean, rstd, dxp, dwp, dbp, M, N);
        else
          norm_bwd_regs_kernel<scalar_t, false, VPT><<<grid, block, 0, stream>>>(
              dyp, stride_dym, xp, stride_xm, w, mean, rstd, dxp, dwp, dbp, M, N);
      });
    });
  } else {
    const dim3 grid(row_blocks(M)), block(row_threads(N));
    const int64_t rpg = rows_per_group(M, N);
    G = (M + rpg - 1) / rpg;
    const dim3 grid2(static_cast<unsigned>((N + DW_COLS - 1) / DW_COLS), static_cast<unsigned>(G));
    const dim3 block2(DW_COLS, DW_ROWS);
    const bool need_dwdb = dwp != nullptr || dbp != nullptr;
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
  }
  const dim3 grid3(static_cast<unsigned>((N + SUM_COLS - 1) / SUM_COLS)), block3(SUM_COLS, SUM_ROWS);
  if (dwp != nullptr) sum_partials_kernel<<<grid3, block3, 0, stream>>>(dwp, dw, G, N);
  if (dbp != nullptr) sum_partials_kernel<<<grid3, block3, 0, stream>>>(dbp, db, G, N);
  return cudaGetLastError();
}

}  // namespace tfk
