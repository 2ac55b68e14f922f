// Plain C++ launch functions for the tfkernels CUDA kernels.
//
// The kernels (csrc/*.cu) include only CUDA headers, so they compile with a bare CUDA toolkit (CI
// compiles them with nvcc -c and no GPU). The torch glue (csrc/ops.cpp) allocates outputs, reads
// sizes/strides, gets the current stream and calls these functions.
//
// Conventions shared by every launcher:
// - 2-D (M, N) inputs are given as a base pointer plus row/column strides in elements (any value,
//   0 included: expanded tensors are read in place). Outputs are contiguous (M, N).
// - Weights and biases are passed as fp32 (the glue converts them; they are (N,) vectors).
// - Statistics (mean, rstd) and weight/bias gradients are fp32.
// - Every launcher returns cudaGetLastError() after its launches (cudaSuccess when all went well).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace tfk {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// ---------------------------------------------------------------- LayerNorm / RMSNorm (norm.cu)

// y = (x - mean) * rstd * w + b   (RMS: mean = 0, rstd = 1/sqrt(mean(x^2) + eps); mean is written as 0)
cudaError_t norm_fwd(DType dtype, bool is_rms,
                     const void* x, int64_t stride_xm, int64_t stride_xn,  // (M, N)
                     const float* w, const float* b,                       // (N,) or nullptr
                     void* y,                                              // (M, N) contiguous
                     float* mean, float* rstd,                             // (M,)
                     int64_t M, int64_t N, float eps, cudaStream_t stream);

// Rows G of the weight/bias-gradient partial sums of norm_bwd for these arguments (an upper bound:
// the layout norm_bwd takes also depends on the pointers): the caller allocates (G, N) fp32
// scratch buffers for dw and db (only those it needs).
int64_t norm_bwd_groups(DType dtype, bool is_rms, int64_t M, int64_t N);

// dx = rstd * (g - xhat*mean(g*xhat) - mean(g)),  g = dy*w  (RMS drops mean(g));
// dw = sum_rows(dy*xhat), db = sum_rows(dy), reduced in two stages through dw_part/db_part.
cudaError_t norm_bwd(DType dtype, bool is_rms,
                     const void* dy, int64_t stride_dym, int64_t stride_dyn,  // (M, N)
                     const void* x, int64_t stride_xm, int64_t stride_xn,     // (M, N)
                     const float* w,                                          // (N,) or nullptr
                     const float* mean, const float* rstd,                    // (M,) (mean unused for RMS)
                     void* dx,                                                // (M, N) contiguous
                     float* dw, float* db,                                    // (N,) or nullptr
                     float* dw_part, float* db_part,                          // (G, N) scratch or nullptr
                     int64_t M, int64_t N, cudaStream_t stream);

// ---------------------------------------------------------------- softmax (softmax.cu)

// y = softmax over the last dim of x (M, N); torch semantics for -inf / NaN.
cudaError_t softmax_fwd(DType dtype, const void* x, int64_t stride_xm, int64_t stride_xn,
                        void* y, int64_t M, int64_t N, cudaStream_t stream);

// dx = y * (dy - sum(dy * y))
cudaError_t softmax_bwd(DType dtype, const void* dy, int64_t stride_dym, int64_t stride_dyn,
                        const void* y, int64_t stride_ym, int64_t stride_yn,
                        void* dx, int64_t M, int64_t N, cudaStream_t stream);

// ---------------------------------------------------------------- attention (attention.cu)

// Everything the attention kernels need; strides in elements, [0..3] = (batch, head, time, dim)
// for q/k/v/dout/out and (batch, head, query, key) for the mask. Query head h reads K/V head
// h / (Hq / Hkv) (GQA). Outputs are contiguous: out/dq (B, Hq, Tq, D), dk/dv (B, Hkv, Tk, D),
// lse/delta (B, Hq, Tq) fp32, dmask (B, Hq, Tq, Tk) fp32.
struct AttnParams {
  DType dtype;                  // of q, k, v, dout, out, dq, dk, dv
  const void* q; int64_t q_s[4];
  const void* k; int64_t k_s[4];
  const void* v; int64_t v_s[4];
  int mask_kind;                // 0: none, 1: bool (read as uint8, 0 = masked), 2: float (added)
  DType mask_dtype;             // for mask_kind == 2
  const void* mask; int64_t m_s[4];
  int B, Hq, Hkv, Tq, Tk, D;
  bool causal;                  // top-left: query i sees keys j <= i
  float scale;                  // softmax scale applied to q.k
  // Sliding window, top-left aligned like causal: query i sees keys i - window_left .. i +
  // window_right (-1: unbounded on that side), intersected with causal and [0, Tk).
  int window_left, window_right;
  float softcap;                // > 0: score = softcap * tanh(scale * q.k / softcap), before the mask
  float dropout_p;              // 0: no dropout; 1: everything dropped
  uint64_t seed;                // Philox key, as tl.rand(seed, ((b*Hq + h)*Tq + i)*Tk + j)
  // Documents (packed sequences): both nullptr, or (B, Tq) and (B, Tk) int32 contiguous; query i of
  // batch b sees key j only if q_doc[b, i] == k_doc[b, j] >= 0 (negative: padding), ANDed with the
  // rest. With them, doc_scratch points to attention_doc_scratch_bytes(*this, backward) bytes,
  // 16-byte aligned, that the launchers fill with the rows' document spans before the attention
  // kernels read them.
  const int* q_doc; const int* k_doc;
  void* doc_scratch;
  // forward outputs; out, dq, dk, dv (below) in any (batch, head, time) strides with dim stride 1
  // (the glue gives them their input's order of heads and time, tfkernels/ops/attention.py
  // _like_layout), lse (B, Hq, Tq) contiguous
  void* out; int64_t out_s[3]; float* lse;
  // backward inputs / outputs
  const void* dout; int64_t do_s[4];
  const void* o; int64_t o_s[4];
  float* delta;                 // (B, Hq, Tq) scratch
  // (B, Hq, Tq) fp32 contiguous or nullptr: the gradient of lse when the caller used lse (0 on fully
  // masked rows); d lse / d S = P, so it enters as delta - dlse
  const float* dlse;
  void* dq; int64_t dq_s[3];
  void* dk; int64_t dk_s[3];
  void* dv; int64_t dv_s[3];
  float* dmask;                 // nullptr unless the float mask needs its gradient (zero-filled)

  // Set by attention_fwd/bwd from the fields above (callers leave them): what the kernels read.
  // Key j is visible to query i iff -win_left <= j - i <= win_right (kNoWindow when unbounded; causal
  // is win_right = 0), tested as one unsigned compare: unsigned(j - i + win_left) <= win_span.
  int win_left, win_right;
  unsigned win_span;            // win_left + win_right
  float cap_scale;              // scale / softcap (softcap > 0)
  float keep_scale;             // 1 / (1 - dropout_p), 0 when dropout_p >= 1
  // With documents, in doc_scratch: per granule of kDocGran query rows (q_spans, (B, cdiv(Tq,
  // kDocGran))) the keys [x, y) its rows' documents hold (x >= y: none) and z, the one id all its
  // rows share or -1 (w unused); per granule of keys (k_spans, backward only) the queries the same
  // way; and the search keys the spans are found with (attention.cu, attn_doc_spans_kernel).
  int4* q_spans; int4* k_spans;
  int64_t* key_of_k; int64_t* key_of_q;
};

// Rows per document granule: the 16 rows of a tensor-core warp, a divisor of every tile height.
constexpr int kDocGran = 16;

// An unbounded window side: larger than any sequence, small enough that i + kNoWindow, j - i +
// kNoWindow and win_left + win_right (unsigned) cannot overflow.
constexpr int kNoWindow = 1 << 30;

// out = softmax(cap(scale * q k^T) + mask) v with dropout; lse = logsumexp (natural log, +inf for a
// row that sees no key, whose output is 0). Head dims up to 256.
cudaError_t attention_fwd(const AttnParams& p, cudaStream_t stream);

// dq, dk, dv (and dmask) from dout, recomputing the probabilities from lse.
cudaError_t attention_bwd(const AttnParams& p, cudaStream_t stream);

// Bytes of doc_scratch a launch with documents needs (0 without them).
size_t attention_doc_scratch_bytes(const AttnParams& p, bool backward);

constexpr int ATTN_MAX_HEAD_DIM = 256;

// ---------------------------------------------------------------- decoding (kvcache.cu)

// Attention of new queries against a KV cache, tfkernels/ops/kvcache.py's semantics: row b holds
// L = min(seqlens[b], cap) keys, from leftpad[b] on (the slots before it are left padding, never
// read); query t sits at key position L - Tq + t (bottom-right); causal: keys j <= that; window
// (left, right), -1 unbounded, around it; softcap > 0 caps the scores.
struct KvParams {
  DType dtype;                  // of q, k, v, out
  const void* q; int64_t q_s[4];  // (B, Tq, Hq, D), strides in elements
  // (B_cache, S, Hkv, D), or the pages (n_pages, page, Hkv, D) with block_table
  const void* k; int64_t k_s[4];
  const void* v; int64_t v_s[4];
  bool k_vec, v_vec;            // rows read as 16-byte vectors: dim stride 1, D and the other strides
                                // multiples of 16 bytes' elements, base 16-byte aligned
  const int* seqlens;           // (B,) int32
  const int* block_table; int64_t bt_s[2];  // (B, max_pages) int32, or nullptr (dense cache)
  const int* batch_idx;         // (B,) int32: the cache row of batch row b, or nullptr (row b)
  const int* leftpad;           // (B,) int32: row b's first key, or nullptr (0)
  int B, Tq, Hq, Hkv, D;
  int cap;                      // keys a row can hold: S, or max_pages * page
  int page;                     // keys per page (1 when dense)
  int cache_rows;               // k.size(0): page ids and batch_idx are clamped to [0, cache_rows)
  float scale, softcap;
  bool causal; int window_left, window_right;
  int num_splits;               // 1 .. KV_MAX_SPLITS: chunks of the key range, one block each
  void* out;                    // (B, Tq, Hq, D) contiguous
  float* lse;                   // (B, Hq, Tq) contiguous, natural log, -inf for a row that sees no key
  float* o_part; float* lse_part;  // num_splits > 1: (num_splits, B, Hq, Tq, D), (num_splits, B, Hq, Tq)
};

constexpr int KV_MAX_SPLITS = 128;

cudaError_t kvcache_attention_fwd(const KvParams& p, cudaStream_t stream);

}  // namespace tfk
