// What both attention implementations share: the op's score, mask and dropout rules (so the fp32
// path in attention.cu and the fp16/bf16 tensor-core path in attention_tc.cu cannot drift apart),
// and the device's shared-memory limit. CUDA headers only.
#pragma once

#include "common.cuh"

namespace tfk {

// The smallest opt-in shared memory per block of the GPUs the kernels target (sm_86/sm_89/sm_120:
// 99 KiB; sm_80 has 163 KiB, sm_90 227 KiB): configurations within it need no smaller fallback.
constexpr int kMinSmemOptin = 101376;

inline int max_smem_optin() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 48 * 1024;
  return bytes;
}

// ------------------------------------------------------------------------------ dropout RNG

// The Triton kernels' dropout draw (`_keep` in tfkernels/ops/attention.py; Triton 3.6's tl.rand for
// an int64 offset): Philox-4x32, 10 rounds, counter (lo(offset), hi(offset), 0, 0), key (lo(seed),
// hi(seed)); first word -> float in [0, 1).
__device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = __umulhi(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = __umulhi(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;  // -x - 1 without overflow
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// ------------------------------------------------------------------------------ score helpers

__device__ __forceinline__ float load_mask_f(const void* m, int64_t off, DType dt) {
  switch (dt) {
    case DType::F16: return __half2float(static_cast<const __half*>(m)[off]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(m)[off]);
    default: return static_cast<const float*>(m)[off];
  }
}

// Which rules a kernel variant carries, as bits of a template argument, so that what a launch does
// not need costs neither code nor registers: kMaskDropout the mask and dropout; kWindowCap the
// sliding window, soft-capping and documents (each decided at run time within the variant).
// Without kWindowCap, visibility is bounds and causality only, exactly the kernels before windows
// existed. Documents ride on kWindowCap rather than a bit of their own (which would double the
// tensor-core kernels' variants and compile time): they are a window's kind of rule, a range of
// columns per block, a skip per warp and tile, and a per-score test on the tiles that need one.
enum Rules : int { kPlain = 0, kMaskDropout = 1, kWindowCap = 2, kAll = 3 };

template <int R>
__device__ __forceinline__ bool caps(const AttnParams& p) {
  return (R & kWindowCap) && p.softcap > 0.0f;
}

// ------------------------------------------------------------------------------ documents

// Whether the launch has documents (packed sequences; only kWindowCap variants carry them).
template <int R>
__device__ __forceinline__ bool has_docs(const AttnParams& p) {
  return (R & kWindowCap) && p.q_doc != nullptr;
}

// Whether query i and key j are in one document: equal ids, not padding (false out of range).
template <int R>
__device__ __forceinline__ bool same_doc(const AttnParams& p, int b, int i, int j) {
  if (!has_docs<R>(p)) return true;
  if (i >= p.Tq || j >= p.Tk) return false;
  const int d = p.q_doc[static_cast<int64_t>(b) * p.Tq + i];
  return d >= 0 && d == p.k_doc[static_cast<int64_t>(b) * p.Tk + j];
}

// The span (see AttnParams) of the granule holding row `row` of batch b: of a query (spans =
// q_spans, n_rows = Tq) or of a key (k_spans, Tk). A row past the end sees nothing.
__device__ __forceinline__ int4 doc_span(const int4* spans, int b, int n_rows, int row) {
  if (row >= n_rows) return int4{1, 0, -1, 0};
  const int n_gran = (n_rows + kDocGran - 1) / kDocGran;
  return spans[static_cast<int64_t>(b) * n_gran + row / kDocGran];
}

// Whether some of the columns [c_lo, c_hi) lie in a granule's span; whether all do and the span is
// one document's (then every pair of the granule's rows and these columns is in one document).
__device__ __forceinline__ bool span_meets(const int4& s, int c_lo, int c_hi) { return c_lo < s.y && s.x < c_hi; }
__device__ __forceinline__ bool span_covers(const int4& s, int c_lo, int c_hi) {
  return s.z >= 0 && s.x <= c_lo && c_hi <= s.y;
}

// Narrows [lo, hi), the columns that rows [r_lo, r_hi] (r_lo a multiple of kDocGran) visit, to the
// hull of their granules' spans: a block walks only the keys (queries) of its rows' documents, so
// packed documents of length L cost O(T L), not O(T^2). Nothing without documents.
template <int R>
__device__ __forceinline__ void doc_range(const AttnParams& p, const int4* spans, int b, int n_rows, int r_lo,
                                          int r_hi, int& lo, int& hi) {
  if (!has_docs<R>(p)) return;
  int s_lo = kNoWindow, s_hi = 0;  // an empty hull when every row is padding
  for (int r = r_lo; r <= r_hi && r < n_rows; r += kDocGran) {
    const int4 s = doc_span(spans, b, n_rows, r);
    s_lo = min(s_lo, s.x);
    s_hi = max(s_hi, s.y);
  }
  lo = max(lo, s_lo);
  hi = min(hi, s_hi);
}

// Whether some granule of rows [r_lo, r_hi] has columns of [c_lo, c_hi) in its span (a tile inside
// the hull that none of the rows' documents reaches is skipped). True without documents.
template <int R>
__device__ __forceinline__ bool doc_tile_meets(const AttnParams& p, const int4* spans, int b, int n_rows, int r_lo,
                                               int r_hi, int c_lo, int c_hi) {
  if (!has_docs<R>(p)) return true;
  for (int r = r_lo; r <= r_hi && r < n_rows; r += kDocGran)
    if (span_meets(doc_span(spans, b, n_rows, r), c_lo, c_hi)) return true;
  return false;
}

// ------------------------------------------------------------------------------ visibility

// Whether query i sees key j: both in range and j within i's window (causal folded in, see
// AttnParams), or without kWindowCap, not after i when causal.
template <int R>
__device__ __forceinline__ bool visible(const AttnParams& p, int i, int j) {
  if (R & kWindowCap) return i < p.Tq && j < p.Tk && static_cast<unsigned>(j - i + p.win_left) <= p.win_span;
  return !(i >= p.Tq || j >= p.Tk || (p.causal && j > i));
}

// Whether some query in [r_lo, r_hi] sees some key in [c_lo, c_hi] (bounds aside). Always true
// without a window: causal blocks are never wholly above the diagonal (see key_range).
template <int R>
__device__ __forceinline__ bool window_meets(const AttnParams& p, int r_lo, int r_hi, int c_lo, int c_hi) {
  return !(R & kWindowCap) || (c_hi - r_lo >= -p.win_left && c_lo - r_hi <= p.win_right);
}

// Whether every query in [r_lo, r_hi] sees every key in [c_lo, c_hi] (bounds aside).
template <int R>
__device__ __forceinline__ bool window_covers(const AttnParams& p, int r_lo, int r_hi, int c_lo, int c_hi) {
  if (R & kWindowCap) return c_lo - r_hi >= -p.win_left && c_hi - r_lo <= p.win_right;
  return !p.causal || c_hi <= r_lo;
}

// The keys [lo, hi) that some query of [r_lo, r_hi] sees, and the queries [lo, hi) that see some
// key of [c_lo, c_hi] (hi <= lo: none): the kernels skip the tiles outside, so the work follows
// the window's width, not Tq x Tk. Causal: no key past r_hi, no query before c_lo.
template <int R>
__device__ __forceinline__ void key_range(const AttnParams& p, int r_lo, int r_hi, int& lo, int& hi) {
  if (R & kWindowCap) {
    lo = max(0, r_lo - p.win_left);
    hi = min(p.Tk, r_hi + p.win_right + 1);
  } else {
    lo = 0;
    hi = p.causal ? min(p.Tk, r_hi + 1) : p.Tk;
  }
}
template <int R>
__device__ __forceinline__ void query_range(const AttnParams& p, int c_lo, int c_hi, int& lo, int& hi) {
  if (R & kWindowCap) {
    lo = max(0, c_lo - p.win_right);
    hi = min(p.Tq, c_hi + p.win_left + 1);
  } else {
    lo = p.causal ? min(c_lo, p.Tq) : 0;
    hi = p.Tq;
  }
}

// The capped (or only scaled) score from the raw q.k product; `t` receives tanh(x / softcap), whose
// 1 - t^2 is the cap's derivative for the backward.
template <bool CAP>
__device__ __forceinline__ float capped(const AttnParams& p, float qk, float& t) {
  if (!CAP) return qk * p.scale;
  t = tanhf(qk * p.cap_scale);  // accurate tanhf: tanh.approx's 2^-11 relative error would show in P
  return p.softcap * t;
}

// The score for query i, key j of head (b, h) from the raw q.k product: scaled, soft-capped, the
// mask added (in that order, as Gemma 2 does); -inf where not visible, not `in_doc` (the caller's
// same_doc, or the tensor-core kernels' doc_bits), or masked. `t` as in capped(), 0 where not
// computed.
template <int R = kAll>
__device__ __forceinline__ float score(const AttnParams& p, int b, int h, int i, int j, float qk, float& t,
                                       bool in_doc) {
  t = 0.0f;
  if (!in_doc || !visible<R>(p, i, j)) return -INFINITY;
  float s = caps<R>(p) ? capped<true>(p, qk, t) : capped<false>(p, qk, t);
  if ((R & kMaskDropout) && p.mask_kind != 0) {
    const int64_t off = b * p.m_s[0] + h * p.m_s[1] + static_cast<int64_t>(i) * p.m_s[2] + static_cast<int64_t>(j) * p.m_s[3];
    if (p.mask_kind == 1) {
      if (static_cast<const uint8_t*>(p.mask)[off] == 0) return -INFINITY;
    } else {
      s += load_mask_f(p.mask, off, p.mask_dtype);
    }
  }
  return s;
}

template <int R = kAll>
__device__ __forceinline__ float score(const AttnParams& p, int b, int h, int i, int j, float qk, bool in_doc) {
  float t;
  return score<R>(p, b, h, i, j, qk, t, in_doc);
}

// Dropout factor Z/(1-p) for (b, h, i, j): 1 without dropout (or without kMaskDropout).
template <int R = kAll>
__device__ __forceinline__ float dropout_scale(const AttnParams& p, int b, int h, int i, int j) {
  if (!(R & kMaskDropout) || p.dropout_p <= 0.0f) return 1.0f;
  const uint64_t off = ((static_cast<uint64_t>(b) * p.Hq + h) * p.Tq + i) * static_cast<uint64_t>(p.Tk) + j;
  return philox_uniform(p.seed, off) >= p.dropout_p ? p.keep_scale : 0.0f;
}

// Byte offsets of the parts of doc_scratch, each 16-byte aligned: at[0] q_spans, at[1] key_of_k
// (the forward's, whose end is at[2]), at[2] k_spans, at[3] key_of_q; at[4] the end.
inline void doc_scratch_layout(const AttnParams& p, size_t (&at)[5]) {
  auto up = [](size_t n) { return (n + 15) / 16 * 16; };
  const size_t B = static_cast<size_t>(p.B);
  const size_t gq = (static_cast<size_t>(p.Tq) + kDocGran - 1) / kDocGran;
  const size_t gk = (static_cast<size_t>(p.Tk) + kDocGran - 1) / kDocGran;
  at[0] = 0;
  at[1] = at[0] + up(B * gq * sizeof(int4));
  at[2] = at[1] + up(B * static_cast<size_t>(p.Tk) * sizeof(int64_t));
  at[3] = at[2] + up(B * gk * sizeof(int4));
  at[4] = at[3] + up(B * static_cast<size_t>(p.Tq) * sizeof(int64_t));
}

// p with the kernels' fields (win_*, cap_scale, keep_scale, the document spans) filled in from the
// caller's.
inline AttnParams prepared(const AttnParams& p) {
  AttnParams r = p;
  r.q_spans = r.k_spans = nullptr;
  r.key_of_k = r.key_of_q = nullptr;
  if (p.q_doc != nullptr) {
    size_t at[5];
    doc_scratch_layout(p, at);
    char* base = static_cast<char*>(p.doc_scratch);
    r.q_spans = reinterpret_cast<int4*>(base + at[0]);
    r.key_of_k = reinterpret_cast<int64_t*>(base + at[1]);
    r.k_spans = reinterpret_cast<int4*>(base + at[2]);  // the backward's (past a forward's scratch)
    r.key_of_q = reinterpret_cast<int64_t*>(base + at[3]);
  }
  // A side that reaches past every key is no bound (so such a launch needs no window tests);
  // causal is a right edge at the diagonal, within any right window.
  const int left = p.window_left < 0 || p.window_left >= p.Tq - 1 ? kNoWindow : p.window_left;
  const int right = p.causal ? 0 : p.window_right < 0 || p.window_right >= p.Tk - 1 ? kNoWindow : p.window_right;
  r.win_left = left;
  r.win_right = right;
  r.win_span = static_cast<unsigned>(left) + static_cast<unsigned>(right);
  r.cap_scale = p.softcap > 0.0f ? p.scale / p.softcap : 0.0f;
  // dropout_p = 1 drops everything: Z = 0 for every score, so O and every gradient are 0, not inf
  r.keep_scale = p.dropout_p < 1.0f ? 1.0f / (1.0f - p.dropout_p) : 0.0f;
  return r;
}

// The variant a prepared launch needs. The tensor-core kernels are compiled for each: without
// kMaskDropout they carry neither the mask loads nor Philox, without kWindowCap neither window
// tests nor tanh, in code or registers.
inline Rules rules_of(const AttnParams& p) {
  const bool md = p.mask_kind != 0 || p.dropout_p > 0.0f;
  const bool window = p.win_left != kNoWindow || (!p.causal && p.win_right != kNoWindow);
  const bool wc = window || p.softcap > 0.0f || p.q_doc != nullptr;
  return static_cast<Rules>((md ? kMaskDropout : 0) | (wc ? kWindowCap : 0));
}

// fp16/bf16 on tensor cores (attention_tc.cu); attention_bwd_tc expects delta computed.
cudaError_t attention_fwd_tc(const AttnParams& p, cudaStream_t stream);
cudaError_t attention_bwd_tc(const AttnParams& p, cudaStream_t stream);

}  // namespace tfk
