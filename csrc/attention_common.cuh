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

// The masked, scaled score for query i, key j of head (b, h) from the raw q.k product; -inf when
// masked or out of bounds. RULES = false compiles the mask out (for launches without one, see
// needs_rules): bounds and causality are all that is left.
template <bool RULES = true>
__device__ __forceinline__ float score(const AttnParams& p, int b, int h, int i, int j, float qk) {
  if (i >= p.Tq || j >= p.Tk || (p.causal && j > i)) return -INFINITY;
  float s = qk * p.scale;
  if (RULES && p.mask_kind != 0) {
    const int64_t off = b * p.m_s[0] + h * p.m_s[1] + static_cast<int64_t>(i) * p.m_s[2] + static_cast<int64_t>(j) * p.m_s[3];
    if (p.mask_kind == 1) {
      if (static_cast<const uint8_t*>(p.mask)[off] == 0) return -INFINITY;
    } else {
      s += load_mask_f(p.mask, off, p.mask_dtype);
    }
  }
  return s;
}

// Dropout factor Z/(1-p) for (b, h, i, j): 1 without dropout (or with RULES = false).
template <bool RULES = true>
__device__ __forceinline__ float dropout_scale(const AttnParams& p, int b, int h, int i, int j) {
  if (!RULES || p.dropout_p <= 0.0f) return 1.0f;
  const uint64_t off = ((static_cast<uint64_t>(b) * p.Hq + h) * p.Tq + i) * static_cast<uint64_t>(p.Tk) + j;
  return philox_uniform(p.seed, off) >= p.dropout_p ? 1.0f / (1.0f - p.dropout_p) : 0.0f;
}

// Whether a launch needs a mask or dropout decision per score. The tensor-core kernels are compiled
// both ways: without them the kernels carry neither the mask loads nor Philox, in code or registers.
inline bool needs_rules(const AttnParams& p) { return p.mask_kind != 0 || p.dropout_p > 0.0f; }

// fp16/bf16 on tensor cores (attention_tc.cu); attention_bwd_tc expects delta computed.
cudaError_t attention_fwd_tc(const AttnParams& p, cudaStream_t stream);
cudaError_t attention_bwd_tc(const AttnParams& p, cudaStream_t stream);

}  // namespace tfk
