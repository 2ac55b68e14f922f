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

// Number of row groups G of the weight/bias-gradient partial sums: the caller allocates
// (G, N) fp32 scratch buffers for dw and db (only those it needs).
int64_t norm_bwd_groups(int64_t M, int64_t N);

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

}  // namespace tfk
