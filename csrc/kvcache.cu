// Decoding attention against a KV cache (tfkernels.kvcache_attention's "cuda" backend): split-KV
// ("flash-decoding") kernels with the semantics of tfkernels/ops/kvcache.py's Triton kernels.
//
// One block per (16 query rows, b * H_kv + h_kv, split). A block's rows are the group's query rows
// r = t * GROUP + g (t < T_q, g < GROUP = H_q / H_kv): the K/V of a head is read once for all the
// query heads that share it. fp16/bf16 at head dims up to 128 on sm_80+ take the tensor-core kernel
// (kvcache_split_tc_kernel, below); fp32, D > 128 and older GPUs the FMA kernel, whose dot products
// are fp32 FMAs from shared memory. Per key tile of the FMA kernel (BN keys of K and V, gathered per
// key from the pages when paged):
//   1. S = scale q.k (soft-capped), -inf where the key is outside the row's range: one thread per
//      (key, row group), each dotting its key's row against its rows;
//   2. the online softmax, one warp per row: running max m, sum l, P = exp2(S - m) (in place of S);
//   3. O = alpha O + P V, one thread per (column, row group), fp32 accumulators in registers.
// Splits cut the key range into num_splits chunks; each writes its rows' fp32 partial output and
// log-sum-exp, and kvcache_combine_kernel merges them (out = sum_s exp(lse_s - lse) o_s).
#include <cmath>
#include <cstdlib>
#include <string>

#include "mma.cuh"

namespace tfk {
namespace {

constexpr int kKvThreads = 128;
constexpr int kKvRows = 16;  // query rows per block
constexpr float kKvLog2e = 1.4426950408889634f, kKvLn2 = 0.6931471805599453f;

// Static shared memory of a block with BN-key tiles: q, K and V rows padded by 16 bytes (a
// quarter-warp's 16-byte reads of 8 rows then hit distinct banks), the scores, the row statistics.
template <typename T, int DP>
__host__ __device__ constexpr int kv_smem_bytes(int bn) {
  return (kKvRows + 2 * bn) * (DP + 16 / static_cast<int>(sizeof(T))) * static_cast<int>(sizeof(T)) +
         kKvRows * bn * 4 + 3 * kKvRows * 4;
}

// Keys per tile: the most (<= 64) that keep the block within the 48 KB of static shared memory
// (bf16: 64 keys up to D = 128, 32 at 256; fp32: 64 / 32 / 8 keys at D = 64 / 128 / 256).
template <typename T, int DP>
__host__ __device__ constexpr int kv_tile_keys() {
  return kv_smem_bytes<T, DP>(64) <= 48 * 1024 ? 64
         : kv_smem_bytes<T, DP>(32) <= 48 * 1024 ? 32
         : kv_smem_bytes<T, DP>(16) <= 48 * 1024 ? 16 : 8;
}

// Offset of key n's row (head 0) in a cache with strides s: its page's slot, or its batch row's.
__device__ __forceinline__ int64_t kv_key_offset(const KvParams& p, const int64_t (&s)[4], int b, int64_t cb, int n) {
  if (p.block_table != nullptr) {
    const int page = min(max(p.block_table[b * p.bt_s[0] + (n / p.page) * p.bt_s[1]], 0), p.cache_rows - 1);
    return page * s[0] + (n % p.page) * s[1];
  }
  return cb * s[0] + n * s[1];
}

// The (first, one-past-last) key of this block's split: [0, L) narrowed by the window of the
// block's first and last rows (the lower end rounded down to a tile, as the Triton kernel does) and
// by the left padding (never loaded: its slots may hold anything), cut into num_splits chunks of
// whole tiles.
__device__ __forceinline__ void kv_split_range(const KvParams& p, int b, int L, int row0, int n_rows, int group,
                                               int bn, int& start, int& end) {
  int lo = 0, hi = L;
  if (p.window_left >= 0) {
    lo = max(L - p.Tq + row0 / group - p.window_left, 0);
    lo = lo / bn * bn;
  }
  if (p.leftpad != nullptr) lo = max(lo, min(max(p.leftpad[b], 0), L));
  const int win_r = p.causal ? 0 : p.window_right;
  if (p.causal || p.window_right >= 0) {
    const int last_t = min(row0 + kKvRows - 1, n_rows - 1) / group;
    hi = min(L - p.Tq + last_t + win_r + 1, L);
  }
  const int n_tiles = (max(hi - lo, 0) + bn - 1) / bn;
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  start = lo + static_cast<int>(blockIdx.z) * per_split * bn;
  end = min(start + per_split * bn, hi);
}

// Copies key rows [n0, n0 + BN) of head hk (those < end; zeros past it) into sX (BN, DP + pad),
// zeros in the columns past D. Paged: each key's page from the block table, clamped to the pages.
// ASYNC (the tensor-core kernel): the 16-byte pieces by cp.async, which the caller commits and waits for.
template <typename T, int DP, int BN, bool ASYNC = false>
__device__ __forceinline__ void kv_load_tile(T* sX, const KvParams& p, const T* X, const int64_t (&s)[4], int b,
                                             int64_t cb, int hk, int n0, int end, bool vec) {
  constexpr int V = Vec<T>::N, LD = DP + V;
  const T* Xh = X + hk * s[2];
  if (vec) {
    for (int idx = threadIdx.x; idx < BN * (DP / V); idx += kKvThreads) {
      const int c = idx / (DP / V), d = (idx - c * (DP / V)) * V, n = n0 + c;
      if constexpr (ASYNC) {
        const bool ok = n < end && d < p.D;  // zeros otherwise: a masked key's P is 0, and 0 * V must be 0
        cp_async_16(sX + c * LD + d, ok ? Xh + kv_key_offset(p, s, b, cb, n) + d : X, ok);
      } else {
        Vec<T> x;
        if (n < end && d < p.D) {
          x.load(Xh + kv_key_offset(p, s, b, cb, n) + d);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) x.e[e] = from_f<T>(0.0f);
        }
        x.store(sX + c * LD + d);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < BN * DP; idx += kKvThreads) {
      const int c = idx / DP, d = idx - c * DP, n = n0 + c;
      sX[c * LD + d] = n < end && d < p.D ? Xh[kv_key_offset(p, s, b, cb, n) + d * s[3]] : from_f<T>(0.0f);
    }
  }
}

// What a block of either kernel works on: 16 rows of batch row b's query rows for K/V head hk, and the
// keys [start, end) of its split (tiles of bn keys).
struct KvBlock {
  int group, n_rows, row0, b, hk, L, rows, start, end;
  int64_t cb;  // the cache row (batch_idx) of batch row b
  __device__ KvBlock(const KvParams& p, int bn) {
    group = p.Hq / p.Hkv;
    n_rows = p.Tq * group;
    row0 = blockIdx.y * kKvRows;
    b = blockIdx.x / p.Hkv;
    hk = blockIdx.x - b * p.Hkv;
    // clamped: a bad length, page id or batch index never reads outside the cache
    L = min(max(p.seqlens[b], 0), p.cap);
    cb = p.batch_idx != nullptr ? min(max(p.batch_idx[b], 0), p.cache_rows - 1) : b;
    rows = min(kKvRows, n_rows - row0);
    kv_split_range(p, b, L, row0, n_rows, group, bn, start, end);
  }
};

template <typename T, int DP>
__global__ void __launch_bounds__(kKvThreads) kvcache_split_kernel(const KvParams p) {
  constexpr int V = Vec<T>::N, LD = DP + V, BN = kv_tile_keys<T, DP>();
  constexpr int G1 = kKvThreads / BN;                  // phase 1: row groups (a thread per key and group)
  constexpr int RG = DP >= kKvThreads ? 1 : kKvThreads / DP;  // phase 3: row groups
  constexpr int CPT = DP >= kKvThreads ? DP / kKvThreads : 1;  // phase 3: columns per thread
  constexpr int RPT = kKvRows / RG;                    // phase 3: rows per thread
  static_assert(kKvRows % G1 == 0 && kKvRows % RG == 0, "row groups must divide the block's rows");
  static_assert(kv_smem_bytes<T, DP>(BN) <= 48 * 1024, "static shared memory over 48 KB");
  __shared__ __align__(16) T sQ[kKvRows * LD];
  __shared__ __align__(16) T sK[BN * LD];
  __shared__ __align__(16) T sV[BN * LD];
  __shared__ float sS[kKvRows][BN];
  __shared__ float sM[kKvRows], sL[kKvRows], sAlpha[kKvRows];

  const KvBlock blk(p, BN);
  const int group = blk.group, row0 = blk.row0, b = blk.b, hk = blk.hk, L = blk.L, rows = blk.rows;
  const int start = blk.start, end = blk.end;
  const int64_t cb = blk.cb;

  // the rows' queries (zeros past the rows and past D), running max and sum
  const T* q = static_cast<const T*>(p.q);
  for (int idx = threadIdx.x; idx < kKvRows * DP; idx += kKvThreads) {
    const int r = idx / DP, d = idx - r * DP, rr = row0 + r, t = rr / group, h = hk * group + rr % group;
    sQ[r * LD + d] = r < rows && d < p.D ? q[b * p.q_s[0] + t * p.q_s[1] + h * p.q_s[2] + d * p.q_s[3]]
                                         : from_f<T>(0.0f);
  }
  if (threadIdx.x < kKvRows) {
    sM[threadIdx.x] = -INFINITY;
    sL[threadIdx.x] = 0.0f;
  }
  float acc[RPT][CPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i)
#pragma unroll
    for (int c = 0; c < CPT; ++c) acc[i][c] = 0.0f;

  const float qk_scale = p.softcap > 0.0f ? p.scale / p.softcap : p.scale * kKvLog2e;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int win_r = p.causal ? 0 : p.window_right;
  const bool right = p.causal || p.window_right >= 0, left = p.window_left >= 0;
  for (int n0 = start; n0 < end; n0 += BN) {
    __syncthreads();  // the previous tile's readers are done with sK, sV, sS
    kv_load_tile<T, DP, BN>(sK, p, static_cast<const T*>(p.k), p.k_s, b, cb, hk, n0, end, p.k_vec);
    kv_load_tile<T, DP, BN>(sV, p, static_cast<const T*>(p.v), p.v_s, b, cb, hk, n0, end, p.v_vec);
    __syncthreads();
    {  // 1. scores, base 2
      // rows g, g + G1, ...: only the block's real rows (decoding: GROUP of 16), warp-uniform for BN >= 32
      const int c = threadIdx.x % BN, g = threadIdx.x / BN, n = n0 + c, my_rows = (rows - g + G1 - 1) / G1;
      float dot[kKvRows / G1];
#pragma unroll
      for (int i = 0; i < kKvRows / G1; ++i) dot[i] = 0.0f;
      for (int d = 0; d < DP; d += V) {
        Vec<T> kx;
        kx.load(sK + c * LD + d);
#pragma unroll
        for (int i = 0; i < kKvRows / G1; ++i) {
          if (i >= my_rows) break;
          Vec<T> qx;
          qx.load(sQ + (g + i * G1) * LD + d);
#pragma unroll
          for (int e = 0; e < V; ++e) dot[i] = fmaf(to_f(qx.e[e]), to_f(kx.e[e]), dot[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < kKvRows / G1; ++i) {
        if (i >= my_rows) break;
        const int r = g + i * G1, pos = L - p.Tq + (row0 + r) / group;  // the row's key position
        bool ok = n < end;
        if (right) ok = ok && n <= pos + win_r;
        if (left) ok = ok && n >= pos - p.window_left;
        float s = dot[i] * qk_scale;
        if (p.softcap > 0.0f) s = p.softcap * kKvLog2e * tanhf(s);
        sS[r][c] = ok ? s : -INFINITY;
      }
    }
    __syncthreads();
    for (int r = warp; r < rows; r += kKvThreads / 32) {  // 2. online softmax, a warp per row
      float mx = -INFINITY;
      for (int c = lane; c < BN; c += 32) mx = fmaxf(mx, sS[r][c]);
      const float m_old = sM[r], m_new = fmaxf(m_old, warp_max(mx));
      const float m_safe = m_new == -INFINITY ? 0.0f : m_new;  // a row that has seen no key yet
      float sum = 0.0f;
      for (int c = lane; c < BN; c += 32) {
        const float pr = exp2f(sS[r][c] - m_safe);
        sS[r][c] = pr;
        sum += pr;
      }
      sum = warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_safe);
        sAlpha[r] = alpha;
        sL[r] = sL[r] * alpha + sum;
        sM[r] = m_new;
      }
    }
    __syncthreads();
    {  // 3. O = alpha O + P V
      const int col = threadIdx.x % (DP / CPT), g = threadIdx.x / (DP / CPT);
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = g + i * RG;
        const float alpha = r < rows ? sAlpha[r] : 0.0f;
#pragma unroll
        for (int cc = 0; cc < CPT; ++cc) acc[i][cc] *= alpha;
      }
      for (int c = 0; c < BN; ++c) {
        float vx[CPT];
#pragma unroll
        for (int cc = 0; cc < CPT; ++cc) vx[cc] = to_f(sV[c * LD + col + cc * kKvThreads]);
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
          if (g + i * RG >= rows) break;  // warp-uniform: g is
          const float pr = sS[g + i * RG][c];
#pragma unroll
          for (int cc = 0; cc < CPT; ++cc) acc[i][cc] = fmaf(pr, vx[cc], acc[i][cc]);
        }
      }
    }
  }
  __syncthreads();  // sL, sM final (also when the split had no key: the loop never ran)

  // the rows' outputs: O / l (0 for a row that saw no key), lse = (m + log2 l) ln 2 (-inf there)
  const int col = threadIdx.x % (DP / CPT), g = threadIdx.x / (DP / CPT);
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int r = g + i * RG;
    if (r >= rows) continue;
    const int rr = row0 + r, t = rr / group, h = hk * group + rr % group;
    const float l = sL[r], inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + t;  // (b, h, t) of lse (B, H_q, T_q)
    if (p.num_splits > 1) {
      const int64_t part = static_cast<int64_t>(blockIdx.z) * p.B * p.Hq * p.Tq + row;
#pragma unroll
      for (int cc = 0; cc < CPT; ++cc) {
        const int d = col + cc * kKvThreads;
        if (d < p.D) p.o_part[part * p.D + d] = acc[i][cc] * inv;
      }
      if (col == 0) p.lse_part[part] = l > 0.0f ? (sM[r] + log2f(l)) * kKvLn2 : -INFINITY;
    } else {
      T* o = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Tq + t) * p.Hq + h) * p.D;
#pragma unroll
      for (int cc = 0; cc < CPT; ++cc) {
        const int d = col + cc * kKvThreads;
        if (d < p.D) o[d] = from_f<T>(acc[i][cc] * inv);
      }
      if (col == 0) p.lse[row] = l > 0.0f ? (sM[r] + log2f(l)) * kKvLn2 : -INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------ tensor cores

// fp16/bf16 at head dims up to 128 on sm_80+: the same blocks (16 query rows, one K/V head, one
// split) with the products on tensor cores. The FMA kernel above reads every K and V element from
// shared memory once per row group and does 2 x 16 x D FMAs per key: at 16 rows that, not the cache
// read, bounds it (the H100 run of 2026-11-24: 1.13 TB/s at B = 16, against 3.02 for the Triton
// kernel, whose tl.dot is a tensor-core product). Here each of the 4 warps owns 16 keys of every
// 64-key tile and runs FlashAttention's loop on them alone: S = Q K^T (mma.sync, 16 rows x 16 keys),
// its own online softmax in registers (row max and sum over the 4 lanes of a group), O += P V with
// P rounded to 16 bits as the A fragment (attention_tc.cu's register-resident P). No warp waits for
// another within a tile; the K/V tiles are double-buffered with cp.async, the next one copied while
// this one is used. At the end the 4 warps' (max, sum, O) are merged through shared memory (the
// tiles' space, no longer needed) as the splits are merged by the combine kernel.
constexpr int kKvTcKeys = 64;  // keys per tile, 16 per warp

template <int DP>
constexpr size_t kv_tc_smem() {
  constexpr size_t tiles = (kKvRows + 2 * 2 * kKvTcKeys) * (DP + kPad) * 2;          // sQ, 2 x (sK, sV)
  constexpr size_t merge = (4 * kKvRows * DP + 2 * 4 * kKvRows) * sizeof(float);    // O, max, sum per warp
  return tiles > merge ? tiles : merge;
}

template <typename T, int DP>
__global__ void __launch_bounds__(kKvThreads) kvcache_split_tc_kernel(const KvParams p) {
  static_assert(kKvThreads == 128 && kKvRows == 16, "4 warps of 16 keys; 16 rows = one m16 tile");
  constexpr int LD = DP + kPad, BN = kKvTcKeys, DT = DP / 8;
  extern __shared__ __align__(128) float4 kv_smem[];
  T* sQ = reinterpret_cast<T*>(kv_smem);  // (16, LD), then 2 stages of K (BN, LD), then 2 of V
  T* sK = sQ + kKvRows * LD;
  T* sV = sK + 2 * BN * LD;

  const KvBlock blk(p, BN);
  const int group = blk.group, row0 = blk.row0, b = blk.b, hk = blk.hk, L = blk.L, rows = blk.rows;
  const int start = blk.start, end = blk.end;
  const int64_t cb = blk.cb;
  const int steps = end > start ? (end - start + BN - 1) / BN : 0;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  auto load = [&](int it, int stage) {
    kv_load_tile<T, DP, BN, true>(sK + stage * BN * LD, p, k, p.k_s, b, cb, hk, start + it * BN, end, p.k_vec);
    kv_load_tile<T, DP, BN, true>(sV + stage * BN * LD, p, v, p.v_s, b, cb, hk, start + it * BN, end, p.v_vec);
  };
  if (steps > 0) load(0, 0);
  cp_async_commit();
  // the rows' queries (zeros past the rows and past D), element-wise: 16 rows, read once
  const T* q = static_cast<const T*>(p.q);
  for (int idx = threadIdx.x; idx < kKvRows * DP; idx += kKvThreads) {
    const int r = idx / DP, d = idx - r * DP, rr = row0 + r, t = rr / group, h = hk * group + rr % group;
    sQ[r * LD + d] = r < rows && d < p.D ? q[b * p.q_s[0] + t * p.q_s[1] + h * p.q_s[2] + d * p.q_s[3]]
                                         : from_f<T>(0.0f);
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const float qk_scale = p.softcap > 0.0f ? p.scale / p.softcap : p.scale * kKvLog2e;
  const float cap_log2 = p.softcap * kKvLog2e;
  const int win_r = p.causal ? 0 : p.window_right;
  const bool right = p.causal || p.window_right >= 0, left = p.window_left >= 0;
  int pos[2];  // key positions of this lane's rows g and g + 8 (padding rows past `rows` included: unused)
#pragma unroll
  for (int r = 0; r < 2; ++r) pos[r] = L - p.Tq + (row0 + g + 8 * r) / group;
  const T* qrow = a_row<DP>(sQ, 0, lane);
  float o[DT][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // base 2 (scores carry log2 e)
  float row_sum[2] = {0.0f, 0.0f};            // this lane's part; the group's 4 lanes are summed at the end
  for (int it = 0; it < steps; ++it) {
    pipeline_step<2>(it, steps, load);  // also makes sQ visible on the first step
    const int n0 = start + it * BN + warp * 16;  // this warp's 16 keys
    if (n0 >= end) continue;  // all past the split (warp-uniform): nothing to add
    float s[2][4] = {};
    mma_abt<T, DP, 2>(s, qrow, sK + (it & 1) * BN * LD + warp * 16 * LD, lane);  // S = Q K^T
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + n * 8 + 2 * t + (e & 1), r = e >> 1;
        bool ok = key < end;
        if (right) ok = ok && key <= pos[r] + win_r;
        if (left) ok = ok && key >= pos[r] - p.window_left;
        float x = s[n][e] * qk_scale;
        if (p.softcap > 0.0f) x = cap_log2 * tanhf(x);
        s[n][e] = ok ? x : -INFINITY;
        mx[r] = fmaxf(mx[r], s[n][e]);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(row_max[r], mx[r]);
      alpha[r] = m_new == -INFINITY ? 1.0f : exp2f(row_max[r] - m_new);  // a row with no key yet keeps -inf
      row_max[r] = m_new;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pr = row_max[r] == -INFINITY ? 0.0f : exp2f(s[n][e] - row_max[r]);
        row_sum[r] += pr;
        s[n][e] = pr;
      }
    scale_rows<DP>(o, alpha);
    mma_pb<T, DP, 2>(o, s, sV + (it & 1) * BN * LD + warp * 16 * LD, lane);  // O += P V
  }
  cp_async_wait<0>();  // with no tile the first (empty) group is still outstanding
  __syncthreads();     // every warp is done with the tiles: their memory holds the merge now

  // each warp's rows: O unnormalised, the base-2 max and the sum (over the group's 4 lanes)
  float* sO = reinterpret_cast<float*>(kv_smem);  // (4 warps, 16 rows, DP)
  float* sMw = sO + 4 * kKvRows * DP;             // (4, 16)
  float* sLw = sMw + 4 * kKvRows;                 // (4, 16)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (t == 0) {
      sMw[warp * kKvRows + g + 8 * r] = row_max[r];
      sLw[warp * kKvRows + g + 8 * r] = l;
    }
  }
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) sO[(warp * kKvRows + g + 8 * (e >> 1)) * DP + d * 8 + 2 * t + (e & 1)] = o[d][e];
  __syncthreads();

  // a thread per (row, column): out = sum_w 2^(m_w - m) O_w / sum_w 2^(m_w - m) l_w (0 for a row that saw
  // no key), lse = (m + log2 l) ln 2 (-inf there), as the FMA kernel writes them
  for (int idx = threadIdx.x; idx < rows * DP; idx += kKvThreads) {
    const int r = idx / DP, d = idx - r * DP;
    if (d >= p.D) continue;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w) m = fmaxf(m, sMw[w * kKvRows + r]);
    const float m_safe = m == -INFINITY ? 0.0f : m;
    float l = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float wt = exp2f(sMw[w * kKvRows + r] - m_safe);  // 0 for a warp that saw no key of the row
      l = fmaf(wt, sLw[w * kKvRows + r], l);
      acc = fmaf(wt, sO[(w * kKvRows + r) * DP + d], acc);
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse = l > 0.0f ? (m + log2f(l)) * kKvLn2 : -INFINITY;
    const int rr = row0 + r, tq = rr / group, h = hk * group + rr % group;
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + tq;  // (b, h, t) of lse (B, H_q, T_q)
    if (p.num_splits > 1) {
      const int64_t part = static_cast<int64_t>(blockIdx.z) * p.B * p.Hq * p.Tq + row;
      p.o_part[part * p.D + d] = acc * inv;
      if (d == 0) p.lse_part[part] = lse;
    } else {
      T* out = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Tq + tq) * p.Hq + h) * p.D;
      out[d] = from_f<T>(acc * inv);
      if (d == 0) p.lse[row] = lse;
    }
  }
}

// TFKERNELS_CUDA_DECODE=fma: the FMA kernel for fp16/bf16 too (read at every call: a benchmark can
// flip it between timings, as TFKERNELS_CUDA_DKDV_PASSES).
bool kv_fma_forced() {
  const char* v = std::getenv("TFKERNELS_CUDA_DECODE");
  return v != nullptr && std::string(v) == "fma";
}

// One block per (b, h, t) row: the splits' partial outputs weighted by exp(lse_s - lse). The
// weights are computed once into shared memory, not once per column.
template <typename T>
__global__ void kvcache_combine_kernel(const KvParams p) {
  __shared__ float sW[KV_MAX_SPLITS];
  const int64_t row = blockIdx.x, n_rows = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
  float m = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) m = fmaxf(m, p.lse_part[s * n_rows + row]);
  const float m_safe = m == -INFINITY ? 0.0f : m;
  for (int s = threadIdx.x; s < p.num_splits; s += blockDim.x)
    sW[s] = expf(p.lse_part[s * n_rows + row] - m_safe);  // 0 for empty splits
  __syncthreads();
  float total = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) total += sW[s];
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const int t = static_cast<int>(row % p.Tq), h = static_cast<int>(row / p.Tq % p.Hq);
  const int64_t b = row / (static_cast<int64_t>(p.Tq) * p.Hq);
  T* o = static_cast<T*>(p.out) + ((b * p.Tq + t) * p.Hq + h) * p.D;
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < p.num_splits; ++s)
      if (sW[s] > 0.0f) sum = fmaf(sW[s], p.o_part[(s * n_rows + row) * p.D + d], sum);
    o[d] = from_f<T>(sum * inv);
  }
  if (threadIdx.x == 0) p.lse[row] = total > 0.0f ? m_safe + logf(total) : -INFINITY;
}

template <typename T, int DP>
cudaError_t kvcache_launch(const KvParams& p, cudaStream_t stream) {
  // (b, h_kv) on x (no 65535 limit), the row blocks on y, the splits on z
  const dim3 grid(p.B * p.Hkv, (p.Tq * (p.Hq / p.Hkv) + kKvRows - 1) / kKvRows, p.num_splits);
  bool tc = false;
  if constexpr (sizeof(T) == 2 && DP <= 128) tc = has_tensor_cores() && !kv_fma_forced();
  if (tc) {
    if constexpr (sizeof(T) == 2 && DP <= 128) {
      constexpr size_t bytes = kv_tc_smem<DP>();  // 74 KB at DP = 128: within every sm_80+ opt-in
      if (bytes > 48 * 1024)
        cudaFuncSetAttribute(kvcache_split_tc_kernel<T, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
      kvcache_split_tc_kernel<T, DP><<<grid, kKvThreads, bytes, stream>>>(p);
    }
  } else {
    kvcache_split_kernel<T, DP><<<grid, kKvThreads, 0, stream>>>(p);
  }
  if (p.num_splits > 1) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    kvcache_combine_kernel<T><<<static_cast<unsigned>(static_cast<int64_t>(p.B) * p.Hq * p.Tq),
                                p.D > 64 ? 128 : 64, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t kvcache_attention_fwd(const KvParams& p, cudaStream_t stream) {
  if (p.D <= 0 || p.D > ATTN_MAX_HEAD_DIM || p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.num_splits < 1 ||
      p.num_splits > KV_MAX_SPLITS || p.page < 1 || p.cache_rows < 1)
    return cudaErrorInvalidValue;
  if (static_cast<int64_t>(p.B) * p.Hq * p.Tq == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  TFK_DISPATCH(p.dtype, [&] {
    if (p.D <= 32) err = kvcache_launch<scalar_t, 32>(p, stream);
    else if (p.D <= 64) err = kvcache_launch<scalar_t, 64>(p, stream);
    else if (p.D <= 128) err = kvcache_launch<scalar_t, 128>(p, stream);
    else err = kvcache_launch<scalar_t, 256>(p, stream);
  });
  return err;
}

}  // namespace tfk
