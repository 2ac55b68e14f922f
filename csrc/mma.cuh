// Warp-level tensor-core and async-copy primitives for sm_80+ (PTX: mma.sync m16n8k16, ldmatrix,
// cp.async) and the operand-tile products built on them, for the fp16/bf16 attention kernels
// (attention_tc.cu) and the decoding kernel (kvcache.cu). Under
// TFKERNELS_CUDA_EMULATION the same functions run on the host emulator (csrc/emulation), which
// implements each instruction from the PTX ISA's description of its fragment layout, so the kernels'
// index arithmetic is tested in CI without a GPU.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", 16-bit A/B, fp32 C/D), for lane
// l, g = l / 4 (the group), t = l % 4:
//   A (16x16, row-major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..2t+1), a[2] = (g, 2t+8..2t+9),
//                         a[3] = (g+8, 2t+8..2t+9)         two 16-bit values per 32-bit register,
//   B (16x8, "col"):      b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)       low half first
//   C, D (16x8, fp32):    c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// So the C fragments of two adjacent n-tiles, rounded to 16 bits and paired, are exactly the A
// fragment of the next product (FlashAttention-2's register-resident P): see c_to_a.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace tfk {

// Two values as one 32-bit register of 16-bit elements, `lo` in the low half (element order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_f<T>(lo), h = from_f<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

// The A fragment (16 x 16 slice k0..k0+15 of a 16-row product) from the fp32 C fragments of its
// two 8-column n-tiles c0 (columns k0..k0+7) and c1 (k0+8..k0+15).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

#if !defined(TFKERNELS_CUDA_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800

// Compiled for an older GPU (a JIT build for the local sm_70/sm_75 card): the tensor-core kernels
// still compile, and are never launched there (attention.cu checks the compute capability).
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&)[4], const void*) { __trap(); }
template <typename T>
__device__ __forceinline__ void mma_16816(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void cp_async_16(void*, const void*, bool) { __trap(); }
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}

#elif !defined(TFKERNELS_CUDA_EMULATION)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices from shared memory: lanes 8j..8j+7 give the 16-byte rows of matrix j;
// r[j] is this lane's fragment of matrix j (row l/4, columns 2(l%4)..+1; transposed with Trans).
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}

// c (16x8 fp32) += a (16x16) * b (16x8) on tensor cores.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid (src is
// then not read, but must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

#else  // the host emulator's versions: same contracts, checked

template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  tfk_emu::ldmatrix_x4(r, row, Trans);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  tfk_emu::mma_16816(c, a, b0, b1, std::is_same<T, __nv_bfloat16>::value);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  tfk_emu::cp_async(dst, src, 16, valid);
}
__device__ __forceinline__ void cp_async_commit() { tfk_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { tfk_emu::cp_async_wait(N); }

#endif

// ------------------------------------------------------------------------------ tiles
// Shared-memory operand tiles are row-major with rows padded by kPad elements (16 bytes), so the eight
// rows an ldmatrix reads fall in different banks. Used by attention_tc.cu and kvcache.cu.

constexpr int kPad = 8;

// acc (16 x 8*NT) += A (16 x DP) B^T, B (8*NT x DP): A's 16 rows and B's rows are row-major shared
// tiles (the A fragment address `arow` from a_row(), B's tile `b`). Q K^T, dO V^T, K Q^T, V dO^T.
template <typename T, int DP, int NT>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* arow, const T* b, int lane) {
  constexpr int LD = DP + kPad;
  // ldmatrix x4 over B: matrices (rows 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) of a
  // 16-row slab = b0, b1 of n-tile 2n and b0, b1 of n-tile 2n+1
  const T* brow = b + ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4<false>(a, arow + kk * 16);
#pragma unroll
    for (int n = 0; n < NT / 2; ++n) {
      uint32_t bf[4];
      ldmatrix_x4<false>(bf, brow + n * 16 * LD + kk * 16);
      mma_16816<T>(acc[2 * n], a, bf[0], bf[1]);
      mma_16816<T>(acc[2 * n + 1], a, bf[2], bf[3]);
    }
  }
}

// acc (16 x DP) += P B, P (16 x 8*NT) given as the fp32 C fragments `p` of the product that made
// it (rounded to T here), B (8*NT x DP) a row-major shared tile read transposed. P V, dS K, P^T dO,
// dS^T Q.
template <typename T, int DP, int NT>
__device__ __forceinline__ void mma_pb(float (&acc)[DP / 8][4], const float (&p)[NT][4], const T* b, int lane) {
  constexpr int LD = DP + kPad;
  // ldmatrix x4 .trans: matrices (k 0-7, n 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = b0, b1 of
  // n-tile 2d and b0, b1 of n-tile 2d+1
  const T* brow = b + (lane & 15) * LD + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    uint32_t a[4];
    c_to_a<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int d = 0; d < DP / 16; ++d) {
      uint32_t bf[4];
      ldmatrix_x4<true>(bf, brow + kk * 16 * LD + d * 16);
      mma_16816<T>(acc[2 * d], a, bf[0], bf[1]);
      mma_16816<T>(acc[2 * d + 1], a, bf[2], bf[3]);
    }
  }
}

// Rows g and g + 8 of a 16 x DP fp32 fragment accumulator (this lane's two rows) times f[0], f[1]:
// the online softmax's rescale of O when a row's running max moves.
template <int DP>
__device__ __forceinline__ void scale_rows(float (&acc)[DP / 8][4], const float (&f)[2]) {
#pragma unroll
  for (int d = 0; d < DP / 8; ++d) {
    acc[d][0] *= f[0];
    acc[d][1] *= f[0];
    acc[d][2] *= f[1];
    acc[d][3] *= f[1];
  }
}

// This lane's ldmatrix row address for the A fragments of rows r0..r0+15 of a shared tile.
template <int DP, typename T>
__device__ __forceinline__ const T* a_row(const T* tile, int r0, int lane) {
  return tile + (r0 + (lane & 15)) * (DP + kPad) + (lane >> 4) * 8;
}

// The two-stage pipeline shared by the kernels: before step `it` is computed, its tile is in
// shared memory (stage it % STAGES) and, with two stages, the next one is on its way.
// `load(step, stage)` issues the copies of one step.
template <int STAGES, typename Load>
__device__ __forceinline__ void pipeline_step(int it, int steps, Load&& load) {
  __syncthreads();  // every warp is done with the stage refilled below
  if (STAGES == 1) {
    load(it, 0);
    cp_async_commit();
    cp_async_wait<0>();
  } else if (it + 1 < steps) {
    load(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // all but the copies just issued: step it's tile has landed
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();  // the tile is visible to every warp
}

}  // namespace tfk
