// Fused attention forward and backward (FlashAttention-2 style), same semantics as the Triton op
// in tfkernels/ops/attention.py (see its module docstring for the math and the op contract).
//
//   X = scale * Q K^T;  C = X, or c * tanh(X / c) with softcap c > 0;  S = C + M_add
//                                       (-inf where a bool mask is False, j >= Tk, or j outside
//                                       [i - window_left, i + window_right], causal: j > i)
//   P = softmax(S),  LSE = logsumexp(S) (fp32, natural log, +inf for a row that sees no key -> O = 0)
//   Pd = Z * P / (1 - p),  O = Pd V     Z: keep mask, Philox as Triton's tl.rand(seed, offset) with
//                                       offset = ((b*Hq + h)*Tq + i)*Tk + j, keep = u >= p (p = 1: 0)
// Backward: delta = rowsum(dO * O); dV = Pd^T dO; dP = Z * (dO V^T) / (1 - p);
//           dC = P * (dP - delta) (= d mask); dS = dC (1 - tanh^2) when capped, else dC;
//           dQ = scale * dS K; dK = scale * dS^T Q.
// Every kernel visits only the tiles of the band a sliding window (or causality) leaves visible,
// so the cost follows the window, not Tq x Tk (attention_common.cuh: key_range, query_range).
// Documents (packed sequences, q_doc/k_doc): query i sees key j only if their ids are equal and
// not negative. attn_doc_spans_kernel finds, per granule of 16 rows, the columns its documents
// hold; every kernel then walks only those of its rows (doc_range), so documents of length L cost
// O(T L). Keys (queries) past the end of a block's range are loaded as zeros rather than read, and
// a masked pair's dS is exactly 0: padding or other documents' tokens the tiles hold never reach a
// product, whatever they contain (NaN in uninitialised padding included).
//
// fp16 and bf16 run on tensor cores with register-resident tiles (attention_tc.cu) on sm_80 and
// newer. This file holds the entry points, the delta kernel both paths use, and the FMA path: fp32
// (IEEE FMAs, like the Triton op without allow_tf32), and fp16/bf16 on GPUs before sm_80, whose
// tiles are converted to fp32 as they are loaded. It works from shared-memory tiles, blocks of BM
// query rows x BN = BM keys, 4 warps, BM = 64, 32 or 16, the largest that fits the device for the
// head dim. Its output accumulator stays in shared memory so the online-softmax rescale can address
// its rows, and its probability and dS tiles overwrite the score tiles they come from, which keeps
// D = 256 within the 99 KiB of sm_86/sm_89. Head dims 1..256 (padded to a multiple of 16 with
// zeros); any Tq, Tk; any input strides (0 too). The backward is two kernels (dK/dV per key block,
// looping over the group's query heads and query blocks, so GQA sums in-kernel without atomics; dQ
// per query block) after delta.
#include "attention_common.cuh"

namespace tfk {
namespace {

constexpr int kThreads = 128;  // 4 warps per block

// ------------------------------------------------------------------------------ tile loads

// dst[r][d] (ld = dp) = src[(row0 + r) * s_t + d * s_d] for r < rows, zero outside (nrows, D).
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, const T* src, int64_t s_t, int64_t s_d, int row0, int rows,
                                          int nrows, int D, int dp) {
  for (int idx = threadIdx.x; idx < rows * dp; idx += blockDim.x) {
    const int r = idx / dp, d = idx - r * dp;
    const int i = row0 + r;
    dst[idx] = (i < nrows && d < D) ? to_f(src[static_cast<int64_t>(i) * s_t + d * s_d]) : 0.0f;
  }
}

// ------------------------------------------------------------------------------ shared-memory GEMM

// C (M x N, ldc) = [C +] A (M x K) * B (K x N); A(i,k) = A_T ? A[k*lda + i] : A[i*lda + k],
// B(k,j) = B_T ? B[j*ldb + k] : B[k*ldb + j]; all operands in shared memory, one output element
// per thread at a time.
template <bool A_T, bool B_T>
__device__ __forceinline__ void smem_gemm(float* C, int ldc, const float* A, int lda, const float* B, int ldb,
                                          int M, int N, int K, bool accumulate) {
  for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
    const int i = idx / N, j = idx - i * N;
    float s = accumulate ? C[i * ldc + j] : 0.0f;
    for (int k = 0; k < K; ++k) {
      const float a = A_T ? A[k * lda + i] : A[i * lda + k];
      const float b = B_T ? B[j * ldb + k] : B[k * ldb + j];
      s = fmaf(a, b, s);
    }
    C[i * ldc + j] = s;
  }
}

// ------------------------------------------------------------------------------ forward

template <int BM>
size_t fwd_smem(int dp) {
  return (3 * BM * dp + BM * BM + BM * dp + 2 * BM) * sizeof(float);
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const AttnParams p, int dp) {
  constexpr int BN = BM;
  constexpr int CPL = (BN + 31) / 32;  // score columns per lane
  extern __shared__ __align__(128) float4 smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);  // (BM, dp)
  float* sK = sQ + BM * dp;                // (BN, dp)
  float* sV = sK + BN * dp;                // (BN, dp)
  float* sS = sV + BN * dp;                // (BM, BN) raw q.k
  // (BM, BN) dropped, unnormalised probabilities: over sS, each row by the warp that read it
  float* sP = sS;
  float* sO = sS + BM * BN;                // (BM, dp) fp32 output accumulator
  float* sMax = sO + BM * dp;              // (BM,) running max
  float* sSum = sMax + BM;                 // (BM,) running sum of exp

  const int bh = blockIdx.x, b = bh / p.Hq, h = bh - b * p.Hq, hk = h / (p.Hq / p.Hkv);
  const int m0 = blockIdx.y * BM;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const T* q = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_s[0] + hk * p.k_s[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_s[0] + hk * p.v_s[1];

  load_tile(sQ, q, p.q_s[2], p.q_s[3], m0, BM, p.Tq, p.D, dp);
  for (int idx = threadIdx.x; idx < BM * dp; idx += blockDim.x) sO[idx] = 0.0f;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    sMax[r] = -INFINITY;
    sSum[r] = 0.0f;
  }
  // only the keys some row of the block sees (causal: none past its last row; documents: only theirs)
  int n_begin, n_end;
  key_range<kAll>(p, m0, m0 + BM - 1, n_begin, n_end);
  doc_range<kAll>(p, p.q_spans, b, p.Tq, m0, m0 + BM - 1, n_begin, n_end);
  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    if (!doc_tile_meets<kAll>(p, p.q_spans, b, p.Tq, m0, m0 + BM - 1, n0, n0 + BN)) continue;  // block-uniform
    __syncthreads();  // the previous block's products are done with sK, sV, sP
    load_tile(sK, k, p.k_s[2], p.k_s[3], n0, BN, n_end, p.D, dp);  // keys past n_end: zeros (no row sees them)
    load_tile(sV, v, p.v_s[2], p.v_s[3], n0, BN, n_end, p.D, dp);
    __syncthreads();
    smem_gemm<false, true>(sS, BN, sQ, dp, sK, dp, BM, BN, dp, false);  // S = Q K^T
    __syncthreads();
    // online softmax, one warp per row: new max, rescale factor, probabilities, running sum
    for (int r = warp; r < BM; r += nwarps) {
      const int i = m0 + r;
      float s[CPL];
      float mx = -INFINITY;
#pragma unroll
      for (int t = 0; t < CPL; ++t) {
        const int c = lane + 32 * t;
        s[t] = c < BN ? score(p, b, h, i, n0 + c, sS[r * BN + c], same_doc<kAll>(p, b, i, n0 + c)) : -INFINITY;
        mx = fmaxf(mx, s[t]);
      }
      mx = warp_max(mx);
      const float m_old = sMax[r];
      const float m_new = fmaxf(m_old, mx);
      // exp(-inf) = 0 on the row's first tile with a visible key; a row that has seen none keeps m = -inf
      const float alpha = m_new == -INFINITY ? 1.0f : expf(m_old - m_new);
      float lsum = 0.0f;
#pragma unroll
      for (int t = 0; t < CPL; ++t) {
        const int c = lane + 32 * t;
        const float pr = m_new == -INFINITY ? 0.0f : expf(s[t] - m_new);
        lsum += pr;
        if (c < BN) sP[r * BN + c] = pr == 0.0f ? 0.0f : pr * dropout_scale(p, b, h, i, n0 + c);
      }
      lsum = warp_sum(lsum);
      for (int d = lane; d < dp; d += 32) sO[r * dp + d] *= alpha;
      if (lane == 0) {
        sMax[r] = m_new;
        sSum[r] = sSum[r] * alpha + lsum;
      }
    }
    __syncthreads();
    smem_gemm<false, false>(sO, dp, sP, BN, sV, dp, BM, dp, BN, true);  // O += Pd V
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + b * p.out_s[0] + h * p.out_s[1];
  for (int idx = threadIdx.x; idx < BM * dp; idx += blockDim.x) {
    const int r = idx / dp, d = idx - r * dp, i = m0 + r;
    if (i < p.Tq && d < p.D) {
      const float l = sSum[r];
      out[i * p.out_s[2] + d] = from_f<T>(l > 0.0f ? sO[idx] / l : 0.0f);
    }
  }
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const int i = m0 + r;
    if (i < p.Tq) {
      const float l = sSum[r];
      p.lse[static_cast<int64_t>(bh) * p.Tq + i] = l > 0.0f ? sMax[r] + logf(l) : INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------ backward

// delta[bh, i] = sum_d dO * O (- dlse[bh, i] when lse was used), one warp per row.
template <typename T>
__global__ void attn_bwd_delta_kernel(const AttnParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t bh = row / p.Tq;
  const int i = static_cast<int>(row - bh * p.Tq);
  const int b = static_cast<int>(bh / p.Hq), h = static_cast<int>(bh % p.Hq);
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_s[0] + h * p.do_s[1] + i * p.do_s[2];
  const T* o = static_cast<const T*>(p.o) + b * p.o_s[0] + h * p.o_s[1] + i * p.o_s[2];
  float s = 0.0f;
  for (int d = lane; d < p.D; d += 32) s += to_f(dout[d * p.do_s[3]]) * to_f(o[d * p.o_s[3]]);
  s = warp_sum(s);
  if (lane == 0) p.delta[row] = p.dlse != nullptr ? s - p.dlse[row] : s;
}

// Shared by both backward kernels: from sS = Q K^T and sDP = dO V^T of one (BM, BN) tile, the
// dropped probabilities Pd and dS for the next products, and dC (the gradient of the capped score,
// = dS uncapped) into dmask when asked. sPd and sDS are sS and sDP themselves: each element is read
// before the same thread overwrites it.
template <int BM>
__device__ __forceinline__ void bwd_tile_ds(const AttnParams& p, int b, int h, int m0, int n0,
                                            const float* sS, const float* sDP, const float* sLse,
                                            const float* sDelta, float* sPd, float* sDS) {
  constexpr int BN = BM;
  for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
    const int r = idx / BN, c = idx - r * BN, i = m0 + r, j = n0 + c;
    float t;
    const float s = score(p, b, h, i, j, sS[idx], t, same_doc<kAll>(p, b, i, j));
    const float prob = s == -INFINITY ? 0.0f : expf(s - sLse[r]);  // lse = +inf (empty row) -> 0
    const float z = prob == 0.0f ? 0.0f : dropout_scale(p, b, h, i, j);
    // a masked pair gives exactly 0, even when a value it was computed from is not finite (padding
    // or another document's token read with the tile: 0 * NaN)
    const float dc = prob == 0.0f ? 0.0f : prob * (sDP[idx] * z - sDelta[r]);
    if (sPd != nullptr) sPd[idx] = prob * z;
    sDS[idx] = caps<kAll>(p) ? dc * (1.0f - t * t) : dc;
    if (p.dmask != nullptr && i < p.Tq && j < p.Tk)
      p.dmask[((static_cast<int64_t>(b) * p.Hq + h) * p.Tq + i) * p.Tk + j] = dc;
  }
}

template <int BM>
size_t dkdv_smem(int dp) {
  return (4 * BM * dp + 2 * BM * BM + 2 * BM * dp + 2 * BM) * sizeof(float);
}

// One block per (BN keys, b * Hkv + hk): dK, dV over every query head of the group and query block.
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const AttnParams p, int dp) {
  constexpr int BN = BM;
  extern __shared__ __align__(128) float4 smem_raw[];
  float* sK = reinterpret_cast<float*>(smem_raw);  // (BN, dp)
  float* sV = sK + BN * dp;                // (BN, dp)
  float* sQ = sV + BN * dp;                // (BM, dp)
  float* sdO = sQ + BM * dp;               // (BM, dp)
  float* sS = sdO + BM * dp;               // (BM, BN)
  float* sDP = sS + BM * BN;               // (BM, BN)
  float* sPd = sS;                         // in place (bwd_tile_ds)
  float* sDS = sDP;
  float* sdK = sDP + BM * BN;              // (BN, dp)
  float* sdV = sdK + BN * dp;              // (BN, dp)
  float* sLse = sdV + BN * dp;             // (BM,)
  float* sDelta = sLse + BM;               // (BM,)

  const int bhk = blockIdx.x, b = bhk / p.Hkv, hk = bhk - b * p.Hkv, group = p.Hq / p.Hkv;
  const int n0 = blockIdx.y * BN;
  const T* k = static_cast<const T*>(p.k) + b * p.k_s[0] + hk * p.k_s[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_s[0] + hk * p.v_s[1];
  load_tile(sK, k, p.k_s[2], p.k_s[3], n0, BN, p.Tk, p.D, dp);
  load_tile(sV, v, p.v_s[2], p.v_s[3], n0, BN, p.Tk, p.D, dp);
  for (int idx = threadIdx.x; idx < BN * dp; idx += blockDim.x) {
    sdK[idx] = 0.0f;
    sdV[idx] = 0.0f;
  }
  // only the query rows that see some of these keys (causal: none before n0; documents: only theirs)
  int m_start, m_end;
  query_range<kAll>(p, n0, n0 + BN - 1, m_start, m_end);
  doc_range<kAll>(p, p.k_spans, b, p.Tk, n0, n0 + BN - 1, m_start, m_end);
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1];
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_s[0] + h * p.do_s[1];
    const float* lse = p.lse + (static_cast<int64_t>(b) * p.Hq + h) * p.Tq;
    const float* delta = p.delta + (static_cast<int64_t>(b) * p.Hq + h) * p.Tq;
    // (no per-tile doc_tile_meets here, unlike the forward and dQ: it made ptxas spill at BM = 16 on
    // sm_90, and within a self-attention hull every query tile meets some key granule anyway)
    for (int m0 = m_start; m0 < m_end; m0 += BM) {
      __syncthreads();  // the previous tile's products are done with sQ, sdO, sPd, sDS
      load_tile(sQ, q, p.q_s[2], p.q_s[3], m0, BM, m_end, p.D, dp);  // queries past m_end: zeros (see none of these keys)
      load_tile(sdO, dout, p.do_s[2], p.do_s[3], m0, BM, m_end, p.D, dp);
      for (int r = threadIdx.x; r < BM; r += blockDim.x) {
        const int i = m0 + r;
        sLse[r] = i < p.Tq ? lse[i] : INFINITY;
        sDelta[r] = i < p.Tq ? delta[i] : 0.0f;
      }
      __syncthreads();
      smem_gemm<false, true>(sS, BN, sQ, dp, sK, dp, BM, BN, dp, false);    // S = Q K^T
      smem_gemm<false, true>(sDP, BN, sdO, dp, sV, dp, BM, BN, dp, false);  // dP = dO V^T
      __syncthreads();
      bwd_tile_ds<BM>(p, b, h, m0, n0, sS, sDP, sLse, sDelta, sPd, sDS);
      __syncthreads();
      smem_gemm<true, false>(sdV, dp, sPd, BN, sdO, dp, BN, dp, BM, true);  // dV += Pd^T dO
      smem_gemm<true, false>(sdK, dp, sDS, BN, sQ, dp, BN, dp, BM, true);   // dK += dS^T Q
    }
  }
  __syncthreads();
  T* dk = static_cast<T*>(p.dk) + b * p.dk_s[0] + hk * p.dk_s[1];
  T* dv = static_cast<T*>(p.dv) + b * p.dv_s[0] + hk * p.dv_s[1];
  for (int idx = threadIdx.x; idx < BN * dp; idx += blockDim.x) {
    const int r = idx / dp, d = idx - r * dp, j = n0 + r;
    if (j < p.Tk && d < p.D) {
      dk[j * p.dk_s[2] + d] = from_f<T>(sdK[idx] * p.scale);
      dv[j * p.dv_s[2] + d] = from_f<T>(sdV[idx]);
    }
  }
}

template <int BM>
size_t dq_smem(int dp) {
  return (4 * BM * dp + 2 * BM * BM + BM * dp + 2 * BM) * sizeof(float);
}

// One block per (BM queries, b * Hq + h): dQ over the key blocks.
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const AttnParams p, int dp) {
  constexpr int BN = BM;
  extern __shared__ __align__(128) float4 smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);  // (BM, dp)
  float* sdO = sQ + BM * dp;               // (BM, dp)
  float* sK = sdO + BM * dp;               // (BN, dp)
  float* sV = sK + BN * dp;                // (BN, dp)
  float* sS = sV + BN * dp;                // (BM, BN)
  float* sDP = sS + BM * BN;               // (BM, BN)
  float* sDS = sDP;                        // in place (bwd_tile_ds)
  float* sdQ = sDP + BM * BN;              // (BM, dp)
  float* sLse = sdQ + BM * dp;             // (BM,)
  float* sDelta = sLse + BM;               // (BM,)

  const int bh = blockIdx.x, b = bh / p.Hq, h = bh - b * p.Hq, hk = h / (p.Hq / p.Hkv);
  const int m0 = blockIdx.y * BM;
  const T* q = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_s[0] + h * p.do_s[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_s[0] + hk * p.k_s[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_s[0] + hk * p.v_s[1];
  load_tile(sQ, q, p.q_s[2], p.q_s[3], m0, BM, p.Tq, p.D, dp);
  load_tile(sdO, dout, p.do_s[2], p.do_s[3], m0, BM, p.Tq, p.D, dp);
  for (int idx = threadIdx.x; idx < BM * dp; idx += blockDim.x) sdQ[idx] = 0.0f;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const int i = m0 + r;
    sLse[r] = i < p.Tq ? p.lse[static_cast<int64_t>(bh) * p.Tq + i] : INFINITY;
    sDelta[r] = i < p.Tq ? p.delta[static_cast<int64_t>(bh) * p.Tq + i] : 0.0f;
  }
  int n_begin, n_end;
  key_range<kAll>(p, m0, m0 + BM - 1, n_begin, n_end);
  doc_range<kAll>(p, p.q_spans, b, p.Tq, m0, m0 + BM - 1, n_begin, n_end);
  AttnParams pq = p;
  pq.dmask = nullptr;  // the dK/dV kernel writes dmask
  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    if (!doc_tile_meets<kAll>(p, p.q_spans, b, p.Tq, m0, m0 + BM - 1, n0, n0 + BN)) continue;  // as in the forward
    __syncthreads();
    load_tile(sK, k, p.k_s[2], p.k_s[3], n0, BN, n_end, p.D, dp);
    load_tile(sV, v, p.v_s[2], p.v_s[3], n0, BN, n_end, p.D, dp);
    __syncthreads();
    smem_gemm<false, true>(sS, BN, sQ, dp, sK, dp, BM, BN, dp, false);    // S = Q K^T
    smem_gemm<false, true>(sDP, BN, sdO, dp, sV, dp, BM, BN, dp, false);  // dP = dO V^T
    __syncthreads();
    bwd_tile_ds<BM>(pq, b, h, m0, n0, sS, sDP, sLse, sDelta, nullptr, sDS);
    __syncthreads();
    smem_gemm<false, false>(sdQ, dp, sDS, BN, sK, dp, BM, dp, BN, true);  // dQ += dS K
  }
  __syncthreads();
  T* dq = static_cast<T*>(p.dq) + b * p.dq_s[0] + h * p.dq_s[1];
  for (int idx = threadIdx.x; idx < BM * dp; idx += blockDim.x) {
    const int r = idx / dp, d = idx - r * dp, i = m0 + r;
    if (i < p.Tq && d < p.D) dq[i * p.dq_s[2] + d] = from_f<T>(sdQ[idx] * p.scale);
  }
}

// ------------------------------------------------------------------------------ document spans

constexpr int kDocThreads = 512;

// The largest v of the threads before this one in the block (-1 for thread 0); every thread calls it.
__device__ __forceinline__ int block_exclusive_max(int v) {
  __shared__ int warp_max_[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;  // inclusive scan within the warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_sync(0xffffffffu, incl, lane >= o ? lane - o : lane);
    if (lane >= o) incl = max(incl, u);
  }
  if (lane == 31) warp_max_[warp] = incl;
  const int before_in_warp = __shfl_sync(0xffffffffu, incl, lane > 0 ? lane - 1 : 0);
  __syncthreads();
  int before = lane > 0 ? before_in_warp : -1;
  for (int w = 0; w < warp; ++w) before = max(before, warp_max_[w]);
  return before;
}

// First index in [0, n) whose key is >= x (upper: > x), n if none; keys non-decreasing.
__device__ __forceinline__ int search(const int64_t* key, int n, int64_t x, bool upper) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (upper ? key[mid] <= x : key[mid] < x)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// One block per (batch row b = blockIdx.x, direction blockIdx.y): 0 the query granules' spans over
// the keys (q_spans, for the forward and dQ kernels), 1 the key granules' over the queries (k_spans,
// for dK/dV). The spans are those of the Triton kernels (tfkernels/ops/_documents.py, whose module
// docstring explains them): a binary search over the columns' search key S, S[j] = 2 id for a real
// id, 2 m + 1 for padding after largest id m (-1 before any), which brackets exactly the columns of
// an id x between the first S >= 2x and the first S > 2x. A row whose S is not non-decreasing (ids
// unsorted, or padding inside a document) gets [0, n) for every granule: correct, every tile masked.
__global__ void __launch_bounds__(kDocThreads) attn_doc_spans_kernel(const AttnParams p) {
  const bool rows_q = blockIdx.y == 0;
  const int b = blockIdx.x;
  const int n_rows = rows_q ? p.Tq : p.Tk, n_cols = rows_q ? p.Tk : p.Tq;
  const int* row_doc = (rows_q ? p.q_doc : p.k_doc) + static_cast<int64_t>(b) * n_rows;
  const int* col_doc = (rows_q ? p.k_doc : p.q_doc) + static_cast<int64_t>(b) * n_cols;
  int64_t* key = (rows_q ? p.key_of_k : p.key_of_q) + static_cast<int64_t>(b) * n_cols;
  const int n_gran = (n_rows + kDocGran - 1) / kDocGran;
  int4* spans = (rows_q ? p.q_spans : p.k_spans) + static_cast<int64_t>(b) * n_gran;

  // S over one chunk of columns per thread (few barriers, whatever the length), with the largest id
  // before the chunk from a scan of the chunks' largest ids
  const int chunk = (n_cols + kDocThreads - 1) / kDocThreads;
  const int c0 = min(static_cast<int>(threadIdx.x) * chunk, n_cols), c1 = min(c0 + chunk, n_cols);
  int top = -1;
  for (int j = c0; j < c1; ++j) top = max(top, col_doc[j]);
  int m = block_exclusive_max(top);  // the largest real id before c0, -1 if none
  int64_t prev = INT64_MIN;          // S[c0 - 1]
  if (c0 > 0) prev = col_doc[c0 - 1] >= 0 ? 2 * static_cast<int64_t>(col_doc[c0 - 1]) : 2 * static_cast<int64_t>(m) + 1;
  bool ordered = true;
  for (int j = c0; j < c1; ++j) {
    const int d = col_doc[j];
    m = max(m, d);
    const int64_t s = d >= 0 ? 2 * static_cast<int64_t>(d) : 2 * static_cast<int64_t>(m) + 1;
    ordered = ordered && s >= prev;
    prev = s;
    key[j] = s;
  }
  __shared__ int unsorted;
  if (threadIdx.x == 0) unsorted = 0;
  __syncthreads();
  if (!ordered) unsorted = 1;
  __syncthreads();  // also makes every thread's key[] visible to the block
  const bool sorted = unsorted == 0;

  for (int g = threadIdx.x; g < n_gran; g += kDocThreads) {
    const int r0 = g * kDocGran, r1 = min(r0 + kDocGran, n_rows);
    const int first = row_doc[r0];
    int lo_id = INT32_MAX, hi_id = -1;  // over the real ids
    bool one = true;
    for (int r = r0; r < r1; ++r) {
      const int d = row_doc[r];
      one = one && d == first;
      if (d >= 0) {
        lo_id = min(lo_id, d);
        hi_id = max(hi_id, d);
      }
    }
    int4 s;
    if (hi_id < 0)  // padding only: sees nothing
      s = int4{n_cols, 0, -1, 0};
    else if (!sorted)
      s = int4{0, n_cols, -1, 0};
    else
      s = int4{search(key, n_cols, 2 * static_cast<int64_t>(lo_id), false),
               search(key, n_cols, 2 * static_cast<int64_t>(hi_id), true), one ? first : -1, 0};
    spans[g] = s;
  }
}

// Fills the document spans a launch's kernels read (q_spans; k_spans too for the backward).
cudaError_t doc_spans(const AttnParams& p, bool backward, cudaStream_t stream) {
  if (p.q_doc == nullptr) return cudaSuccess;
  if (p.doc_scratch == nullptr) return cudaErrorInvalidValue;
  attn_doc_spans_kernel<<<dim3(static_cast<unsigned>(p.B), backward ? 2 : 1), kDocThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------ launch

// Launches the FMA path's KERNEL<T, BM> with the largest BM in {64, 32, 16} whose shared memory fits
// (the launch fails with "invalid argument" when not even 16 does; the glue explains that error).
#define TFK_ATTN_LAUNCH(KERNEL, SMEM, GRID_X, ROWS, T)                                              \
  do {                                                                                           \
    const int limit_ = max_smem_optin();                                                         \
    if (SMEM<64>(dp) <= static_cast<size_t>(limit_)) {                                           \
      const size_t bytes_ = SMEM<64>(dp);                                                        \
      cudaFuncSetAttribute(KERNEL<T, 64>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes_); \
      KERNEL<T, 64><<<dim3(GRID_X, (ROWS + 63) / 64), kThreads, bytes_, stream>>>(p, dp);           \
    } else if (SMEM<32>(dp) <= static_cast<size_t>(limit_)) {                                    \
      const size_t bytes_ = SMEM<32>(dp);                                                        \
      cudaFuncSetAttribute(KERNEL<T, 32>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes_); \
      KERNEL<T, 32><<<dim3(GRID_X, (ROWS + 31) / 32), kThreads, bytes_, stream>>>(p, dp);           \
    } else {                                                                                     \
      const size_t bytes_ = SMEM<16>(dp);                                                        \
      cudaFuncSetAttribute(KERNEL<T, 16>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes_); \
      KERNEL<T, 16><<<dim3(GRID_X, (ROWS + 15) / 16), kThreads, bytes_, stream>>>(p, dp);           \
    }                                                                                            \
  } while (0)

int padded_dim(int D) { return (D + 15) / 16 * 16; }

// The tensor-core kernels need sm_80 (has_tensor_cores); before that fp16/bf16 take the FMA path
// too (converted to fp32 as the tiles are loaded).

}  // namespace

cudaError_t attention_fwd(const AttnParams& params, cudaStream_t stream) {
  const AttnParams p = prepared(params);
  if (p.B == 0 || p.Hq == 0 || p.Tq == 0 || p.Tk == 0) return cudaSuccess;  // the glue fills those
  if (p.D <= 0 || p.D > ATTN_MAX_HEAD_DIM || p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.Tq > 65535 * 16)
    return cudaErrorInvalidValue;
  const cudaError_t err = doc_spans(p, false, stream);
  if (err != cudaSuccess) return err;
  if (p.dtype != DType::F32 && has_tensor_cores()) return attention_fwd_tc(p, stream);
  const int dp = padded_dim(p.D);
  const unsigned grid_x = static_cast<unsigned>(p.B) * p.Hq;
  TFK_DISPATCH(p.dtype, [&] { TFK_ATTN_LAUNCH(attn_fwd_kernel, fwd_smem, grid_x, p.Tq, scalar_t); });
  return cudaGetLastError();
}

cudaError_t attention_bwd(const AttnParams& params, cudaStream_t stream) {
  const AttnParams p = prepared(params);
  if (p.B == 0 || p.Hq == 0 || p.Tq == 0 || p.Tk == 0) return cudaSuccess;  // the glue zero-fills
  if (p.D <= 0 || p.D > ATTN_MAX_HEAD_DIM || p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.Tq > 65535 * 16 ||
      p.Tk > 65535 * 16)
    return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
  const unsigned delta_blocks = static_cast<unsigned>((rows + kThreads / 32 - 1) / (kThreads / 32));
  TFK_DISPATCH(p.dtype, [&] { attn_bwd_delta_kernel<scalar_t><<<delta_blocks, kThreads, 0, stream>>>(p); });
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = doc_spans(p, true, stream);
  if (err != cudaSuccess) return err;
  if (p.dtype != DType::F32 && has_tensor_cores()) return attention_bwd_tc(p, stream);
  const int dp = padded_dim(p.D);
  TFK_DISPATCH(p.dtype, [&] {
    TFK_ATTN_LAUNCH(attn_bwd_dkdv_kernel, dkdv_smem, static_cast<unsigned>(p.B) * p.Hkv, p.Tk, scalar_t);
    TFK_ATTN_LAUNCH(attn_bwd_dq_kernel, dq_smem, static_cast<unsigned>(p.B) * p.Hq, p.Tq, scalar_t);
  });
  return cudaGetLastError();
}

size_t attention_doc_scratch_bytes(const AttnParams& p, bool backward) {
  if (p.q_doc == nullptr || p.B <= 0 || p.Tq <= 0 || p.Tk <= 0) return 0;
  size_t at[5];
  doc_scratch_layout(p, at);
  return backward ? at[4] : at[2];
}

}  // namespace tfk
