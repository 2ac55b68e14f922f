// fp16/bf16 attention forward and backward on tensor cores, FlashAttention-2 style, with the op's
// semantics from attention_common.cuh (see attention.cu for the math and the contract). sm_80 and newer
// (mma.sync m16n8k16, cp.async); attention.cu sends older GPUs to its FMA path.
//
// Each warp owns 16 rows of a 64-row block and keeps its products in registers as mma.sync
// m16n8k16 fragments (csrc/mma.cuh): S = Q K^T is an fp32 C fragment; the online softmax works on it
// in place (a lane holds two rows, g and g+8, so row reductions are two shuffles among the 4 lanes
// of a group); the probabilities, rounded to 16 bits, become the A fragment of P V without touching
// shared memory; the output accumulator never leaves registers until the end. Only the operand
// tiles go through shared memory: filled with 16-byte cp.async copies (element-wise for inputs
// whose rows are not 16-byte aligned and contiguous), the next K/V (or Q/dO) tile copied while
// the current one is used when two stages fit, rows padded by 16 bytes so that the eight rows an
// ldmatrix reads fall in different banks.
//
// Kernels (DP = head dim padded to 32, 64, 96, 128, 192 or 256; padding columns are zeros):
//   forward  grid (B*Hq, Tq/64):  per key tile S, online softmax, O += P V; writes O and LSE.
//   dQ       grid (B*Hq, Tq/64):  per key tile S, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//   dK, dV   grid (B*Hkv, Tk/64): the warp's 16 keys are rows: S^T = K Q^T, dP^T = V dO^T over
//            every query tile of every query head of the GQA group (so no atomics), dV += P^T dO,
//            dK += dS^T Q; writes the float mask's gradient when asked. At DP = 256 as two kernels
//            on the same grid, dV then dK (see kPassDV).
// Each kernel is compiled four times, one per Rules variant (attention_common.cuh): with or without
// the mask and dropout rules (kMaskDropout), with or without the sliding window, soft-capping and
// documents (kWindowCap), so a launch carries only the code and registers of what it uses; without either,
// the kernels are what they were before windows existed. Without kMaskDropout, tiles that need no
// per-score check at all (is_plain) take a lean path (soft-capped or not) and only the ragged tiles
// and those on a window's edge (the causal diagonal is one) test bounds and the window per score.
// Sliding windows: a query block walks only the keys its rows see (key_range), a key block only the
// queries that see its keys (query_range); within a tile, a warp none of whose rows meets the
// window skips the products, so the work follows the band's width, not Tq x Tk.
// Documents (in the kWindowCap variants) the same way: a block walks only the columns of its rows'
// documents (doc_range), from the first one, so a tile starts where a document does; a warp's 16
// rows are one granule, whose span (attention_common.cuh) says whether the warp skips a tile (none
// of its documents' columns) and whether the tile may be plain (all its columns in the warp's one
// document); the other tiles test the ids per score from one word of bits per lane (doc_bits).
// In the kWindowCap variants the columns past the block's range load as zeros (the range's end is
// kept in shared memory: key_end) and a masked pair's dS is exactly 0, so padding or another
// document's tokens that share a tile never reach a product, whatever they hold.
// Register budget: S and dP take BN/2 fp32 per lane, O / dQ DP/2, dK + dV DP. For DP > 128 the
// key tile shrinks to 32; dK + dV at DP 192 spill ~100 bytes a thread, and at DP 256 (~1 KB) the
// gradients are two launches, dV then dK (kPassDV), which spill none.
#include "attention_common.cuh"
#include "mma.cuh"

#include <cstdlib>
#include <string>
#include <type_traits>

namespace tfk {
namespace {

constexpr int kWarps = 4;
constexpr int kTcThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // rows of the block's own tile: queries (fwd, dQ) or keys (dK/dV)
constexpr float kLog2e = 1.4426950408889634f;

template <int DP>
struct Tile {
  static constexpr int LD = DP + kPad;            // shared-memory row stride, elements
  static constexpr int BN = DP <= 128 ? 64 : 32;  // keys per step of the forward and dQ kernels
  static constexpr int BQ = DP <= 64 ? 64 : 32;   // queries per step of the dK/dV kernel
  static constexpr size_t fwd_smem(int stages) { return (kRows + 2 * stages * BN) * LD * 2; }
  static constexpr size_t dq_smem(int stages) { return (2 * kRows + 2 * stages * BN) * LD * 2; }
  static constexpr size_t dkdv_smem(int stages) { return (2 * kRows + 2 * stages * BQ) * LD * 2; }
};

// Rows row0 .. row0+ROWS-1 of a (nrows, D) matrix with strides (s_t, s_d) into a (ROWS, DP + kPad)
// shared tile; zeros for rows >= nrows and columns >= D. With `vec` (s_d == 1, D % 8 == 0, every row
// 16-byte aligned) by cp.async 16-byte copies (the caller commits and waits), else element-wise.
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t s_t, int64_t s_d, int row0, int nrows,
                                          int D, bool vec) {
  constexpr int LD = DP + kPad;
  if (vec) {
    constexpr int kChunks = DP / 8;
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kTcThreads) {
      const int r = idx / kChunks, c = (idx - r * kChunks) * 8, i = row0 + r;
      const bool ok = i < nrows && c < D;
      cp_async_16(dst + r * LD + c, ok ? src + static_cast<int64_t>(i) * s_t + c : src, ok);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * DP; idx += kTcThreads) {
      const int r = idx / DP, d = idx - r * DP, i = row0 + r;
      dst[r * LD + d] = (i < nrows && d < D) ? src[static_cast<int64_t>(i) * s_t + d * s_d] : from_f<T>(0.0f);
    }
  }
}

// The kPad elements after a shared tile's first row, which no ldmatrix reads (nor any copy writes):
// 16 bytes of scratch in shared memory the kernels have anyway (see QueryBlock::key_end).
template <int DP, typename T>
__device__ __forceinline__ volatile int* row_padding(T* tile) {
  static_assert(kPad * sizeof(T) >= sizeof(int) && DP * sizeof(T) % sizeof(int) == 0, "an aligned int");
  return reinterpret_cast<volatile int*>(tile + DP);
}

// Whether every row of a (B, H, T, D) tensor can be copied in 16-byte pieces.
bool rows_vectorisable(const void* ptr, const int64_t (&s)[4], int D) {
  return s[3] == 1 && D % 8 == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s[0] % 8 == 0 &&
         s[1] % 8 == 0 && s[2] % 8 == 0;
}

// What the query-block kernels (forward, dQ) share: the block's head and 64 query rows, and the K/V
// tiles (BN keys, STAGES buffers each, from sK on) it walks.
template <typename T, int DP, int STAGES, int R>
struct QueryBlock {
  static constexpr int BN = Tile<DP>::BN, LD = Tile<DP>::LD;
  const AttnParams& p;
  T* sK;
  T* sV;
  bool vec;
  int bh, b, h, m0, n_first, steps;
  const T* k;
  const T* v;

  __device__ QueryBlock(const AttnParams& params, T* key_tiles, bool vectorised)
      : p(params), sK(key_tiles), sV(key_tiles + STAGES * BN * LD), vec(vectorised) {
    bh = blockIdx.x;
    b = bh / p.Hq;
    h = bh - b * p.Hq;
    const int hk = h / (p.Hq / p.Hkv);
    m0 = blockIdx.y * kRows;
    k = static_cast<const T*>(p.k) + b * p.k_s[0] + hk * p.k_s[1];
    v = static_cast<const T*>(p.v) + b * p.v_s[0] + hk * p.v_s[1];
    // only the keys some row of the block sees (causal: none past its last row; documents: theirs)
    int n_end;
    key_range<R>(p, m0, m0 + kRows - 1, n_first, n_end);
    doc_range<R>(p, p.q_spans, b, p.Tq, m0, m0 + kRows - 1, n_first, n_end);
    steps = n_end > n_first ? (n_end - n_first + BN - 1) / BN : 0;
    if constexpr ((R & kWindowCap) != 0) *key_end() = n_end;  // each thread writes what it will read
  }
  // With kWindowCap, the end of the block's keys: load_kv loads the keys past it (no row of the block
  // sees them) as zeros, so whatever they hold (padding, other documents, even NaN) never reaches a
  // product. As a register live through the key loop it cost the dQ kernel ~70 registers, so it is
  // kept in the padding of the first K tile's first row (16 bytes no ldmatrix reads; a static
  // __shared__ variable would not fit beside the D = 256 forward's 99 KiB on sm_86/sm_89, and it
  // changed the other variants' code), read volatile.
  __device__ volatile int* key_end() const { return row_padding<DP>(sK); }
  // Copies this block's 64 rows of a (B, Hq, Tq, D) input (q or dout) into `dst`.
  __device__ void load_query_rows(T* dst, const void* src, const int64_t (&s)[4]) const {
    load_rows<T, kRows, DP>(dst, static_cast<const T*>(src) + b * s[0] + h * s[1], s[2], s[3], m0, p.Tq, p.D, vec);
  }
  __device__ int key0(int it) const { return (R & kWindowCap ? n_first : 0) + it * BN; }
  __device__ void load_kv(int it, int stage) const {
    if constexpr ((R & kWindowCap) != 0) {
      const int end = *key_end();
      load_rows<T, BN, DP>(sK + stage * BN * LD, k, p.k_s[2], p.k_s[3], key0(it), end, p.D, vec);
      load_rows<T, BN, DP>(sV + stage * BN * LD, v, p.v_s[2], p.v_s[3], key0(it), end, p.D, vec);
    } else {  // written out twice: the other variants compile exactly as they did before documents
      load_rows<T, BN, DP>(sK + stage * BN * LD, k, p.k_s[2], p.k_s[3], key0(it), p.Tk, p.D, vec);
      load_rows<T, BN, DP>(sV + stage * BN * LD, v, p.v_s[2], p.v_s[3], key0(it), p.Tk, p.D, vec);
    }
  }
  __device__ const T* key_tile(int it) const { return sK + (STAGES == 1 ? 0 : it & 1) * BN * LD; }
  __device__ const T* value_tile(int it) const { return sV + (STAGES == 1 ? 0 : it & 1) * BN * LD; }
};

// Rows r0 and r0 + 8 (those < nrows) of a 16 x DP fragment accumulator, row r times factor[r], into
// columns < D of an (nrows, D) output whose rows are ld elements apart (its columns adjacent).
template <typename T, int DP>
__device__ __forceinline__ void store_rows(T* out, int64_t ld, const float (&acc)[DP / 8][4], int r0, int nrows,
                                           int D, const float (&factor)[2]) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r0 + r * 8;
    if (i >= nrows) continue;
#pragma unroll
    for (int d = 0; d < DP / 8; ++d)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = d * 8 + 2 * t + e;
        if (col < D) out[i * ld + col] = from_f<T>(acc[d][2 * r + e] * factor[r]);
      }
  }
}

// Whether the key tile [n0, n0 + bn) needs no per-score rule for the 16 query rows from row0 on: no
// mask or dropout (see rules_of), every key in range and within every row's window (causal: at or
// before row0). Such tiles take a lean path: at fp16/bf16 tensor-core rates the FP32/integer work
// per score bounds the loop, and the general rules cost ~20 instructions a score. row0 is the
// warp's first row, so the test is warp-uniform and the two paths never diverge.
template <int R>
__device__ __forceinline__ bool is_plain(const AttnParams& p, int n0, int bn, int row0) {
  return !(R & kMaskDropout) && n0 + bn <= p.Tk && window_covers<R>(p, row0, row0 + 15, n0, n0 + bn - 1);
}

// Documents, for the warp whose 16 rows (one granule) start at row0, and the columns [c0, c0 + n)
// of a tile: false when none of its rows' documents holds one of them (the warp skips the tile,
// as outside a window); `plain` becomes false unless every pair is in the warp's one document.
// spans/n_rows: q_spans, Tq for query rows; k_spans, Tk for key rows. Always true without documents.
template <int R>
__device__ __forceinline__ bool docs_meet(const AttnParams& p, const int4* spans, int b, int n_rows, int row0, int c0,
                                          int n, bool& plain) {
  if (!has_docs<R>(p)) return true;
  const int4 span = doc_span(spans, b, n_rows, row0);
  plain = span_covers(span, c0, c0 + n);
  return span_meets(span, c0, c0 + n);
}

// Documents on a tile that is not plain: whether each of this lane's fragment elements pairs a
// query and a key of one document, as bit 2 NT r + 2 n + c for the element of row r0 + 8 r and
// column c0 + 8 n + c (c0 = the tile's first column + 2 (lane & 3)); rows are queries and columns
// keys, or (dK/dV) the other way round: equal ids, not padding, either way. One word per tile
// rather than an id load per score keeps the registers of the kWindowCap variants that do not use
// documents near what they were. All ones without documents.
template <int R, int NT>
__device__ __forceinline__ uint32_t doc_bits(const AttnParams& p, const int* row_doc, int n_rows, int r0,
                                             const int* col_doc, int n_cols, int c0) {
  static_assert(NT <= 8, "32 bits: two rows of 2 NT columns");
  if (!has_docs<R>(p)) return ~0u;
  const int rd0 = r0 < n_rows ? row_doc[r0] : -1, rd1 = r0 + 8 < n_rows ? row_doc[r0 + 8] : -1;
  uint32_t bits = 0;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = c0 + 8 * n + c;
      const int cd = col < n_cols ? col_doc[col] : -1;
      bits |= static_cast<uint32_t>(cd >= 0 && rd0 == cd) << (2 * n + c);
      bits |= static_cast<uint32_t>(cd >= 0 && rd1 == cd) << (2 * NT + 2 * n + c);
    }
  return bits;
}

// A plain tile's scores (S in place, raw q.k in), scaled or soft-capped, and the rows' maxima.
template <bool CAP, int NT>
__device__ __forceinline__ void plain_scores(const AttnParams& p, float (&s)[NT][4], float (&mx)[2]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float th;
      s[n][e] = capped<CAP>(p, s[n][e], th);
      mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
    }
}

// ------------------------------------------------------------------------------ forward

template <typename T, int DP, int STAGES, int R>
__global__ void __launch_bounds__(kTcThreads) attn_fwd_tc_kernel(const AttnParams p, bool vec) {
  using Block = QueryBlock<T, DP, STAGES, R>;
  constexpr int NT = Block::BN / 8, DT = DP / 8;
  extern __shared__ __align__(128) float4 smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kRows, LD), then STAGES x (BN, LD) for K and for V
  const Block blk(p, sQ + kRows * Block::LD, vec);
  const int b = blk.b, h = blk.h, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  blk.load_query_rows(sQ, p.q, p.q_s);
  if (STAGES == 2) blk.load_kv(0, 0);
  cp_async_commit();

  const int i0 = blk.m0 + warp * 16 + (lane >> 2);  // this lane's rows: i0 and i0 + 8
  const T* qrow = a_row<DP>(sQ, warp * 16, lane);
  const int warp_row0 = blk.m0 + warp * 16;
  float o[DT][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this lane's part; the group's 4 lanes are summed at the end
  for (int it = 0; it < blk.steps; ++it) {
    pipeline_step<STAGES>(it, blk.steps, [&](int step, int stage) { blk.load_kv(step, stage); });
    const int n0 = blk.key0(it);
    // a tile past the window of every row of this warp changes none of them (the block's other rows
    // need it); without a window this never happens
    if (!window_meets<R>(p, warp_row0, warp_row0 + 15, n0, n0 + Block::BN - 1)) continue;
    bool doc_plain = true;
    if (!docs_meet<R>(p, p.q_spans, b, p.Tq, warp_row0, n0, Block::BN, doc_plain)) continue;
    const bool plain = doc_plain && is_plain<R>(p, n0, Block::BN, warp_row0);
    float s[NT][4] = {};
    mma_abt<T, DP, NT>(s, qrow, blk.key_tile(it), lane);  // S = Q K^T
    float mx[2] = {-INFINITY, -INFINITY};
    if (plain) {
      if (caps<R>(p))
        plain_scores<true>(p, s, mx);
      else
        plain_scores<false>(p, s, mx);
    } else {
      const uint32_t in_doc = doc_bits<R, NT>(p, p.q_doc + static_cast<int64_t>(b) * p.Tq, p.Tq, i0,
                                              p.k_doc + static_cast<int64_t>(b) * p.Tk, p.Tk, n0 + 2 * t);
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool doc_ok = (in_doc >> ((e >> 1) * 2 * NT + 2 * n + (e & 1))) & 1u;
          s[n][e] = score<R>(p, b, h, i0 + (e >> 1) * 8, n0 + n * 8 + 2 * t + (e & 1), s[n][e], doc_ok);
          mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        }
    }
    float alpha[2], max_log2[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(row_max[r], mx[r]);
      // exp(x - m) as exp2(x log2e - m log2e): one FFMA and ex2, where expf costs ~8 instructions
      // 0 on the row's first tile with a visible key; a row that has seen none keeps m = -inf
      alpha[r] = m_new == -INFINITY ? 1.0f : exp2f((row_max[r] - m_new) * kLog2e);
      row_max[r] = m_new;
      max_log2[r] = m_new * kLog2e;
      row_sum[r] *= alpha[r];
    }
    // P (unnormalised; dropped and rescaled for P V, not for the sum) in place of S
    if (plain) {  // this tile's scores are finite, so the row max is too
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = exp2f(fmaf(s[n][e], kLog2e, -max_log2[e >> 1]));
          row_sum[e >> 1] += pr;
          s[n][e] = pr;
        }
    } else {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const float pr = row_max[r] == -INFINITY ? 0.0f : exp2f(fmaf(s[n][e], kLog2e, -max_log2[r]));
          row_sum[r] += pr;
          s[n][e] = pr == 0.0f ? 0.0f : pr * dropout_scale<R>(p, b, h, i0 + r * 8, n0 + n * 8 + 2 * t + (e & 1));
        }
    }
    scale_rows<DP>(o, alpha);
    mma_pb<T, DP, NT>(o, s, blk.value_tile(it), lane);  // O += P V
  }
  if (R & kWindowCap) cp_async_wait<0>();  // with no key tile (a window past Tk) Q was never waited for

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.0f ? 1.0f / l : 0.0f;  // a row that sees no key has l = 0: O = 0
    const int i = i0 + r * 8;
    if (t == 0 && i < p.Tq)
      p.lse[static_cast<int64_t>(blk.bh) * p.Tq + i] = l > 0.0f ? row_max[r] + logf(l) : INFINITY;
  }
  store_rows<T, DP>(static_cast<T*>(p.out) + b * p.out_s[0] + h * p.out_s[1], p.out_s[2], o, i0, p.Tq, p.D, inv);
}

// ------------------------------------------------------------------------------ backward

// One fragment element of the backward: from the raw q.k product `s` and dP = dO.v `dp`, with P
// recomputed from the row's LSE (given as lse log2(e), the forward's exp2 form), the dropped
// probability Pd (into s) and dS = dC d cap/dx (into dp), where dC = P (Z dP - delta) is the
// gradient of the capped score, the float mask's gradient (returned).
template <int R>
__device__ __forceinline__ float ds_element(const AttnParams& p, int b, int h, int i, int j, bool in_doc,
                                            float lse_log2, float delta, float& s, float& dp) {
  float th;
  const float sc = score<R>(p, b, h, i, j, s, th, in_doc);
  // lse = +inf (an empty or padding row) gives 0
  const float prob = sc == -INFINITY ? 0.0f : exp2f(fmaf(sc, kLog2e, -lse_log2));
  const float z = prob == 0.0f ? 0.0f : dropout_scale<R>(p, b, h, i, j);
  // with kWindowCap a masked pair gives exactly 0, even when a value it was computed from is not
  // finite (padding or another document's token read with the tile: 0 * NaN)
  const float dc = (R & kWindowCap) && prob == 0.0f ? 0.0f : prob * (dp * z - delta);
  s = prob * z;  // Pd
  dp = caps<R>(p) ? dc * (1.0f - th * th) : dc;
  return dc;
}

// The same for a plain tile (is_plain): every score real and visible, no mask or dropout. `mul_log2`
// is scale log2(e), or softcap log2(e) when capped (the tanh gets scale / softcap).
template <bool CAP>
__device__ __forceinline__ void ds_plain(const AttnParams& p, float mul_log2, float lse_log2, float delta, float& s,
                                         float& dp) {
  if (CAP) {
    const float th = tanhf(s * p.cap_scale);
    const float prob = exp2f(fmaf(th, mul_log2, -lse_log2));
    dp = prob * (dp - delta) * (1.0f - th * th);
    s = prob;
  } else {
    const float prob = exp2f(fmaf(s, mul_log2, -lse_log2));
    dp = prob * (dp - delta);
    s = prob;
  }
}

template <typename T, int DP, int STAGES, int R>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dq_tc_kernel(const AttnParams p, bool vec) {
  using Block = QueryBlock<T, DP, STAGES, R>;
  constexpr int NT = Block::BN / 8, DT = DP / 8, LD = Block::LD;
  extern __shared__ __align__(128) float4 smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kRows, LD)
  T* sdO = sQ + kRows * LD;                // (kRows, LD), then STAGES x (BN, LD) for K and for V
  const Block blk(p, sdO + kRows * LD, vec);
  const int b = blk.b, h = blk.h, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  blk.load_query_rows(sQ, p.q, p.q_s);
  blk.load_query_rows(sdO, p.dout, p.do_s);
  if (STAGES == 2) blk.load_kv(0, 0);
  cp_async_commit();

  const int i0 = blk.m0 + warp * 16 + (lane >> 2), warp_row0 = blk.m0 + warp * 16;
  const bool cap = caps<R>(p);
  const float mul_log2 = (cap ? p.softcap : p.scale) * kLog2e;
  float lse_log2[2], delta[2];  // rows past Tq: lse = +inf, so P = 0 there
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + r * 8;
    lse_log2[r] = i < p.Tq ? p.lse[static_cast<int64_t>(blk.bh) * p.Tq + i] * kLog2e : INFINITY;
    delta[r] = i < p.Tq ? p.delta[static_cast<int64_t>(blk.bh) * p.Tq + i] : 0.0f;
  }
  const T* qrow = a_row<DP>(sQ, warp * 16, lane);
  const T* dorow = a_row<DP>(sdO, warp * 16, lane);
  float dq[DT][4] = {};
  for (int it = 0; it < blk.steps; ++it) {
    pipeline_step<STAGES>(it, blk.steps, [&](int step, int stage) { blk.load_kv(step, stage); });
    const int n0 = blk.key0(it);
    if (!window_meets<R>(p, warp_row0, warp_row0 + 15, n0, n0 + Block::BN - 1)) continue;  // dS = 0 (forward)
    bool doc_plain = true;
    if (!docs_meet<R>(p, p.q_spans, b, p.Tq, warp_row0, n0, Block::BN, doc_plain)) continue;  // dS = 0 too
    float s[NT][4] = {}, dp[NT][4] = {};
    mma_abt<T, DP, NT>(s, qrow, blk.key_tile(it), lane);      // S = Q K^T
    mma_abt<T, DP, NT>(dp, dorow, blk.value_tile(it), lane);  // dP = dO V^T
    if (doc_plain && is_plain<R>(p, n0, Block::BN, warp_row0)) {
      auto plain = [&](auto cap_c) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            ds_plain<decltype(cap_c)::value>(p, mul_log2, lse_log2[e >> 1], delta[e >> 1], s[n][e], dp[n][e]);
      };
      if (cap)
        plain(std::true_type{});
      else
        plain(std::false_type{});
    } else {
      const uint32_t in_doc = doc_bits<R, NT>(p, p.q_doc + static_cast<int64_t>(b) * p.Tq, p.Tq, i0,
                                              p.k_doc + static_cast<int64_t>(b) * p.Tk, p.Tk, n0 + 2 * t);
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          ds_element<R>(p, b, h, i0 + (e >> 1) * 8, n0 + n * 8 + 2 * t + (e & 1),
                        (in_doc >> ((e >> 1) * 2 * NT + 2 * n + (e & 1))) & 1u, lse_log2[e >> 1], delta[e >> 1],
                        s[n][e], dp[n][e]);
    }
    mma_pb<T, DP, NT>(dq, dp, blk.key_tile(it), lane);  // dQ += dS K
  }
  if (R & kWindowCap) cp_async_wait<0>();  // with no key tile (a window past Tk) Q, dO were never waited for
  const float scale[2] = {p.scale, p.scale};
  store_rows<T, DP>(static_cast<T*>(p.dq) + b * p.dq_s[0] + h * p.dq_s[1], p.dq_s[2], dq, i0, p.Tq, p.D, scale);
}

// Which gradients a dK/dV launch accumulates. Both: dK and dV, 2 x DP/2 fp32 per lane. At DP = 256
// that is 256 registers before anything else and the kernel spilled ~1 KB a thread inside its loop,
// so there it runs as two launches: dV (S^T = K Q^T, dV += Pd^T dO; no V, no dP) and then dK (S^T,
// dP^T = V dO^T, dK += dS^T Q; the float mask's gradient): one more K Q^T product a tile (5 products
// instead of 4) and Q, dO read twice, for half the accumulator registers. TFKERNELS_CUDA_DKDV_PASSES=1
// runs the one-launch kernel instead (to time both on a GPU).
constexpr int kPassDV = 1, kPassDK = 2, kPassBoth = kPassDV | kPassDK;

template <typename T, int DP, int STAGES, int R, int PASS>
__device__ __forceinline__ void dkdv_tc(const AttnParams& p, bool vec) {
  using C = Tile<DP>;
  constexpr int BQ = C::BQ, LD = C::LD, NT = BQ / 8, DT = DP / 8;
  extern __shared__ __align__(128) float4 smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // (kRows, LD)
  T* sV = sK + kRows * LD;                 // (kRows, LD)
  T* sQ = sV + kRows * LD;                 // STAGES x (BQ, LD)
  T* sdO = sQ + STAGES * BQ * LD;          // STAGES x (BQ, LD)

  const int bhk = blockIdx.x, b = bhk / p.Hkv, hk = bhk - b * p.Hkv, group = p.Hq / p.Hkv;
  const int n0 = blockIdx.y * kRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const T* k = static_cast<const T*>(p.k) + b * p.k_s[0] + hk * p.k_s[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_s[0] + hk * p.v_s[1];
  // only the query rows that see some of these keys (causal: none before n0; documents: theirs)
  int m_start, m_end;
  query_range<R>(p, n0, n0 + kRows - 1, m_start, m_end);
  doc_range<R>(p, p.k_spans, b, p.Tk, n0, n0 + kRows - 1, m_start, m_end);
  const int q_tiles = m_end > m_start ? (m_end - m_start + BQ - 1) / BQ : 0;
  const int steps = group * q_tiles;  // (query head of the group, query tile) pairs
  // with kWindowCap, queries past m_end (which see none of these keys) load as zeros; m_end is kept
  // in the K tile's first row padding, as QueryBlock::key_end and for the same reasons
  if constexpr ((R & kWindowCap) != 0) *row_padding<DP>(sK) = m_end;
  auto load_q = [&](int it, int stage) {
    const int h = hk * group + it / q_tiles, m0 = m_start + (it % q_tiles) * BQ;
    const T* q = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1];
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_s[0] + h * p.do_s[1];
    if constexpr ((R & kWindowCap) != 0) {
      const int end = *row_padding<DP>(sK);
      load_rows<T, BQ, DP>(sQ + stage * BQ * LD, q, p.q_s[2], p.q_s[3], m0, end, p.D, vec);
      load_rows<T, BQ, DP>(sdO + stage * BQ * LD, dout, p.do_s[2], p.do_s[3], m0, end, p.D, vec);
    } else {  // as in QueryBlock::load_kv
      load_rows<T, BQ, DP>(sQ + stage * BQ * LD, q, p.q_s[2], p.q_s[3], m0, p.Tq, p.D, vec);
      load_rows<T, BQ, DP>(sdO + stage * BQ * LD, dout, p.do_s[2], p.do_s[3], m0, p.Tq, p.D, vec);
    }
  };
  load_rows<T, kRows, DP>(sK, k, p.k_s[2], p.k_s[3], n0, p.Tk, p.D, vec);
  if constexpr ((PASS & kPassDK) != 0) load_rows<T, kRows, DP>(sV, v, p.v_s[2], p.v_s[3], n0, p.Tk, p.D, vec);
  if (STAGES == 2 && steps > 0) load_q(0, 0);
  cp_async_commit();

  const int j0 = n0 + warp * 16 + g;  // this lane's keys: j0 and j0 + 8
  const int warp_key0 = n0 + warp * 16;
  // is_plain with rows and columns swapped: no mask or dropout, the warp's 16 keys in range, and per
  // query tile: all its queries in range and each sees all 16 keys (causal: the first query at or
  // past the warp's last key).
  const bool keys_plain = !(R & kMaskDropout) && warp_key0 + 16 <= p.Tk;
  const bool cap = caps<R>(p);
  const float mul_log2 = (cap ? p.softcap : p.scale) * kLog2e;
  const T* krow = a_row<DP>(sK, warp * 16, lane);
  const T* vrow = a_row<DP>(sV, warp * 16, lane);
  // the pass's accumulators (the other pass's is size 1 and untouched: no registers)
  float dk[(PASS & kPassDK) ? DT : 1][4] = {}, dv[(PASS & kPassDV) ? DT : 1][4] = {};
  for (int it = 0; it < steps; ++it) {
    pipeline_step<STAGES>(it, steps, load_q);
    const int stage = STAGES == 1 ? 0 : (it & 1);
    const int h = hk * group + it / q_tiles, m0 = m_start + (it % q_tiles) * BQ;
    // none of this tile's queries sees the warp's keys: dS = 0, Pd = 0 (dmask stays 0)
    if (!window_meets<R>(p, m0, m0 + BQ - 1, warp_key0, warp_key0 + 15)) continue;
    bool doc_plain = true;  // the warp's 16 keys are a granule: its span is over queries
    if (!docs_meet<R>(p, p.k_spans, b, p.Tk, warp_key0, m0, BQ, doc_plain)) continue;
    const T* tq = sQ + stage * BQ * LD;
    const T* tdo = sdO + stage * BQ * LD;
    float s[NT][4] = {}, dp[NT][4] = {};
    mma_abt<T, DP, NT>(s, krow, tq, lane);                                       // S^T = K Q^T
    if constexpr ((PASS & kPassDK) != 0) mma_abt<T, DP, NT>(dp, vrow, tdo, lane);  // dP^T = V dO^T
    const int64_t bh = static_cast<int64_t>(b) * p.Hq + h;
    const float* lse_row = p.lse + bh * p.Tq;
    const float* delta_row = p.delta + bh * p.Tq;
    if (doc_plain && keys_plain && m0 + BQ <= p.Tq &&
        window_covers<R>(p, m0, m0 + BQ - 1, warp_key0, warp_key0 + 15)) {
      auto plain = [&](auto cap_c) {
        constexpr bool CAP = decltype(cap_c)::value;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int i = m0 + n * 8 + 2 * t + c;  // the fragment's column is the query
            const float lse_log2 = lse_row[i] * kLog2e, delta = delta_row[i];
            ds_plain<CAP>(p, mul_log2, lse_log2, delta, s[n][c], dp[n][c]);
            ds_plain<CAP>(p, mul_log2, lse_log2, delta, s[n][2 + c], dp[n][2 + c]);
          }
      };
      if (cap)
        plain(std::true_type{});
      else
        plain(std::false_type{});
    } else {
      // rows are this lane's keys, columns queries
      const uint32_t in_doc = doc_bits<R, NT>(p, p.k_doc + static_cast<int64_t>(b) * p.Tk, p.Tk, j0,
                                              p.q_doc + static_cast<int64_t>(b) * p.Tq, p.Tq, m0 + 2 * t);
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int i = m0 + n * 8 + 2 * t + c;
          const float lse_log2 = i < p.Tq ? lse_row[i] * kLog2e : INFINITY;
          const float delta = i < p.Tq ? delta_row[i] : 0.0f;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int j = j0 + r * 8, e = 2 * r + c;
            const bool doc_ok = (in_doc >> (r * 2 * NT + 2 * n + c)) & 1u;
            const float dc = ds_element<R>(p, b, h, i, j, doc_ok, lse_log2, delta, s[n][e], dp[n][e]);
            if ((R & kMaskDropout) && (PASS & kPassDK) && p.dmask != nullptr && i < p.Tq && j < p.Tk)
              p.dmask[(bh * p.Tq + i) * p.Tk + j] = dc;
          }
        }
    }
    if constexpr ((PASS & kPassDV) != 0) mma_pb<T, DP, NT>(dv, s, tdo, lane);  // dV += Pd^T dO
    if constexpr ((PASS & kPassDK) != 0) mma_pb<T, DP, NT>(dk, dp, tq, lane);  // dK += dS^T Q
  }
  cp_async_wait<0>();  // with no query tile (causal or a window, past Tq) the K/V copies were never waited for

  const float scale[2] = {p.scale, p.scale}, one[2] = {1.0f, 1.0f};
  if constexpr ((PASS & kPassDK) != 0)
    store_rows<T, DP>(static_cast<T*>(p.dk) + b * p.dk_s[0] + hk * p.dk_s[1], p.dk_s[2], dk, j0, p.Tk, p.D, scale);
  if constexpr ((PASS & kPassDV) != 0)
    store_rows<T, DP>(static_cast<T*>(p.dv) + b * p.dv_s[0] + hk * p.dv_s[1], p.dv_s[2], dv, j0, p.Tk, p.D, one);
}

template <typename T, int DP, int STAGES, int R>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dkdv_tc_kernel(const AttnParams p, bool vec) {
  dkdv_tc<T, DP, STAGES, R, kPassBoth>(p, vec);
}

template <typename T, int DP, int STAGES, int R>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dv_tc_kernel(const AttnParams p, bool vec) {
  dkdv_tc<T, DP, STAGES, R, kPassDV>(p, vec);
}

template <typename T, int DP, int STAGES, int R>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dk_tc_kernel(const AttnParams p, bool vec) {
  dkdv_tc<T, DP, STAGES, R, kPassDK>(p, vec);
}

// ------------------------------------------------------------------------------ launch

using TcKernel = void (*)(const AttnParams, bool);

// Two stages when they fit the device, else one; an error when neither does.
cudaError_t launch_tc(TcKernel two, TcKernel one, size_t smem2, size_t smem1, dim3 grid, const AttnParams& p,
                      bool vec, cudaStream_t stream) {
  const size_t limit = static_cast<size_t>(max_smem_optin());
  const TcKernel kernel = smem2 <= limit ? two : one;
  const size_t bytes = smem2 <= limit ? smem2 : smem1;
  if (bytes > limit) return cudaErrorInvalidValue;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  kernel<<<grid, kTcThreads, bytes, stream>>>(p, vec);
  return cudaGetLastError();
}

// The one-stage variants exist only for head dims whose two stages can exceed kMinSmemOptin; the
// Rules variant is the launch's (rules_of).
#define TFK_TC_LAUNCH(KERNEL, SMEM, GRID)                                                               \
  do {                                                                                                \
    auto launch = [&](auto rules) -> cudaError_t {                                                    \
      constexpr int R = decltype(rules)::value;                                                       \
      if constexpr (Tile<DP>::SMEM(2) <= static_cast<size_t>(kMinSmemOptin))                          \
        return launch_tc(KERNEL<T, DP, 2, R>, KERNEL<T, DP, 2, R>, Tile<DP>::SMEM(2), Tile<DP>::SMEM(2), GRID, p, \
                         vec, stream);                                                                \
      else                                                                                            \
        return launch_tc(KERNEL<T, DP, 2, R>, KERNEL<T, DP, 1, R>, Tile<DP>::SMEM(2), Tile<DP>::SMEM(1), GRID, p, \
                         vec, stream);                                                                \
    };                                                                                                \
    switch (rules_of(p)) {                                                                            \
      case kAll: return launch(std::integral_constant<int, kAll>{});                                  \
      case kMaskDropout: return launch(std::integral_constant<int, kMaskDropout>{});                  \
      case kWindowCap: return launch(std::integral_constant<int, kWindowCap>{});                      \
      default: return launch(std::integral_constant<int, kPlain>{});                                  \
    }                                                                                                 \
  } while (0)

// Calls f(std::integral_constant<int, DP>) with the head dim padded to the nearest compiled size.
template <typename F>
cudaError_t with_padded_head_dim(int D, F&& f) {
  if (D <= 32) return f(std::integral_constant<int, 32>{});
  if (D <= 64) return f(std::integral_constant<int, 64>{});
  if (D <= 96) return f(std::integral_constant<int, 96>{});
  if (D <= 128) return f(std::integral_constant<int, 128>{});
  if (D <= 192) return f(std::integral_constant<int, 192>{});
  return f(std::integral_constant<int, 256>{});
}

template <typename T>
cudaError_t fwd_tc(const AttnParams& p, cudaStream_t stream) {
  const bool vec = rows_vectorisable(p.q, p.q_s, p.D) && rows_vectorisable(p.k, p.k_s, p.D) &&
                   rows_vectorisable(p.v, p.v_s, p.D);
  const dim3 grid(static_cast<unsigned>(p.B) * p.Hq, (p.Tq + kRows - 1) / kRows);
  return with_padded_head_dim(p.D, [&](auto dp) -> cudaError_t {
    constexpr int DP = decltype(dp)::value;
    TFK_TC_LAUNCH(attn_fwd_tc_kernel, fwd_smem, grid);
  });
}

// TFKERNELS_CUDA_DKDV_PASSES=1: the one-launch dK/dV kernel at DP = 256 too (read at every backward:
// a getenv is nothing next to the launch, and a benchmark can flip it between timings).
bool one_dkdv_launch() {
  const char* v = std::getenv("TFKERNELS_CUDA_DKDV_PASSES");
  return v != nullptr && std::string(v) == "1";
}

template <typename T>
cudaError_t bwd_tc(const AttnParams& p, cudaStream_t stream) {
  const bool vec = rows_vectorisable(p.q, p.q_s, p.D) && rows_vectorisable(p.k, p.k_s, p.D) &&
                   rows_vectorisable(p.v, p.v_s, p.D) && rows_vectorisable(p.dout, p.do_s, p.D);
  const dim3 grid_kv(static_cast<unsigned>(p.B) * p.Hkv, (p.Tk + kRows - 1) / kRows);
  const dim3 grid_q(static_cast<unsigned>(p.B) * p.Hq, (p.Tq + kRows - 1) / kRows);
  const cudaError_t err = with_padded_head_dim(p.D, [&](auto dp) -> cudaError_t {
    constexpr int DP = decltype(dp)::value;
    if constexpr (DP == 256) {  // two passes (see kPassDV), unless asked for one
      if (!one_dkdv_launch()) {
        const cudaError_t e = [&]() -> cudaError_t { TFK_TC_LAUNCH(attn_bwd_dv_tc_kernel, dkdv_smem, grid_kv); }();
        if (e != cudaSuccess) return e;
        TFK_TC_LAUNCH(attn_bwd_dk_tc_kernel, dkdv_smem, grid_kv);
      }
    }
    TFK_TC_LAUNCH(attn_bwd_dkdv_tc_kernel, dkdv_smem, grid_kv);
  });
  if (err != cudaSuccess) return err;
  return with_padded_head_dim(p.D, [&](auto dp) -> cudaError_t {
    constexpr int DP = decltype(dp)::value;
    TFK_TC_LAUNCH(attn_bwd_dq_tc_kernel, dq_smem, grid_q);
  });
}

}  // namespace

cudaError_t attention_fwd_tc(const AttnParams& p, cudaStream_t stream) {
  if (p.dtype == DType::F16) return fwd_tc<__half>(p, stream);
  if (p.dtype == DType::BF16) return fwd_tc<__nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t attention_bwd_tc(const AttnParams& p, cudaStream_t stream) {
  if (p.dtype == DType::F16) return bwd_tc<__half>(p, stream);
  if (p.dtype == DType::BF16) return bwd_tc<__nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace tfk
