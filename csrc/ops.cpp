// Torch glue for the tfkernels CUDA kernels: schemas (TORCH_LIBRARY) and CUDA implementations
// (TORCH_LIBRARY_IMPL) of the torch.ops.tfkernels_cuda.* ops that tfkernels/ops/*.py call for
// backend="cuda". Each op returns the same outputs, dtypes and shapes as its Triton launcher.
// Only a CUDA build of torch compiles this file (it needs ATen/cuda and c10/cuda headers); the
// kernels themselves live in the *.cu files behind the plain launch functions of kernels.h.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

using at::Tensor;

tfk::DType dtype_of(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return tfk::DType::F32;
    case at::kHalf: return tfk::DType::F16;
    case at::kBFloat16: return tfk::DType::BF16;
    default: TORCH_CHECK(false, "tfkernels_cuda.", op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return tfk::DType::F32;  // unreachable
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "tfkernels_cuda.", op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_2d(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "tfkernels_cuda.", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, "tfkernels_cuda.", op, ": ", name, " must be 2-D (M, N), got ", t.dim(), "-D");
}

// An optional (N,) parameter as a contiguous fp32 vector (undefined when absent).
Tensor fp32_vec(const std::optional<Tensor>& t, int64_t N, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->numel() == N, "tfkernels_cuda.", op, ": ", name, " must have ", N, " elements, got ", t->numel());
  return t->reshape({N}).to(at::kFloat).contiguous();
}

const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
float* fptr_mut(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr; }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// ------------------------------------------------------------------------------ norms

std::tuple<Tensor, Tensor, Tensor> norm_fwd_impl(const Tensor& x, const std::optional<Tensor>& weight,
                                                 const std::optional<Tensor>& bias, double eps, bool is_rms,
                                                 const char* op) {
  check_2d(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const tfk::DType dt = dtype_of(x, op, "x");
  const int64_t M = x.size(0), N = x.size(1);
  const Tensor w = fp32_vec(weight, N, op, "weight");
  const Tensor b = fp32_vec(bias, N, op, "bias");
  Tensor y = at::empty({M, N}, x.options());
  Tensor mean = at::zeros({M}, x.options().dtype(at::kFloat));
  Tensor rstd = at::zeros({M}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0) {
    check_launch(tfk::norm_fwd(dt, is_rms, x.data_ptr(), x.stride(0), x.stride(1), fptr(w), fptr(b), y.data_ptr(),
                               mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N, static_cast<float>(eps), stream()),
                 op);
  }
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_impl(const Tensor& dy_in, const Tensor& x, const std::optional<Tensor>& weight,
                                                 const Tensor& mean_in, const Tensor& rstd_in, bool has_bias, bool is_rms,
                                                 const char* op) {
  check_2d(x, op, "x");
  check_2d(dy_in, op, "dy");
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "tfkernels_cuda.", op, ": dy must have x's shape ", x.sizes(), ", got ", dy_in.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const tfk::DType dt = dtype_of(x, op, "x");
  const int64_t M = x.size(0), N = x.size(1);
  const Tensor dy = dy_in.scalar_type() == x.scalar_type() ? dy_in : dy_in.to(x.scalar_type());
  const Tensor w = fp32_vec(weight, N, op, "weight");
  const bool has_w = w.defined();
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({M, N}, x.options());
  Tensor dw = has_w ? at::zeros({N}, f32) : at::empty({0}, f32);
  Tensor db = has_bias ? at::zeros({N}, f32) : at::empty({0}, f32);
  if (M == 0 || N == 0) return {dx, dw, db};
  const Tensor rstd = rstd_in.to(at::kFloat).contiguous();
  const Tensor mean = is_rms ? rstd : mean_in.to(at::kFloat).contiguous();  // unused for RMS
  TORCH_CHECK(rstd.numel() == M && mean.numel() == M, "tfkernels_cuda.", op, ": mean/rstd must have ", M, " elements");
  const int64_t G = tfk::norm_bwd_groups(M, N);
  const Tensor dw_part = has_w ? at::empty({G, N}, f32) : Tensor();
  const Tensor db_part = has_bias ? at::empty({G, N}, f32) : Tensor();
  check_launch(tfk::norm_bwd(dt, is_rms, dy.data_ptr(), dy.stride(0), dy.stride(1), x.data_ptr(), x.stride(0), x.stride(1),
                             fptr(w), mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                             has_w ? dw.data_ptr<float>() : nullptr, has_bias ? db.data_ptr<float>() : nullptr,
                             fptr_mut(dw_part), fptr_mut(db_part), M, N, stream()),
               op);
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, double eps) {
  return norm_fwd_impl(x, weight, bias, eps, /*is_rms=*/false, "layer_norm_fwd");
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                                  const Tensor& mean, const Tensor& rstd, bool has_bias) {
  return norm_bwd_impl(dy, x, weight, mean, rstd, has_bias, /*is_rms=*/false, "layer_norm_bwd");
}

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight, double eps) {
  auto out = norm_fwd_impl(x, weight, std::nullopt, eps, /*is_rms=*/true, "rms_norm_fwd");
  return {std::get<0>(out), std::get<2>(out)};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                        const Tensor& rstd) {
  auto out = norm_bwd_impl(dy, x, weight, rstd, rstd, /*has_bias=*/false, /*is_rms=*/true, "rms_norm_bwd");
  return {std::get<0>(out), std::get<1>(out)};
}

// ------------------------------------------------------------------------------ softmax

Tensor softmax_fwd(const Tensor& x) {
  check_2d(x, "softmax_fwd", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const tfk::DType dt = dtype_of(x, "softmax_fwd", "x");
  const int64_t M = x.size(0), N = x.size(1);
  Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    check_launch(tfk::softmax_fwd(dt, x.data_ptr(), x.stride(0), x.stride(1), y.data_ptr(), M, N, stream()), "softmax_fwd");
  }
  return y;
}

Tensor softmax_bwd(const Tensor& dy_in, const Tensor& y) {
  check_2d(y, "softmax_bwd", "y");
  check_2d(dy_in, "softmax_bwd", "dy");
  TORCH_CHECK(dy_in.sizes() == y.sizes(), "tfkernels_cuda.softmax_bwd: dy must have y's shape ", y.sizes(), ", got ", dy_in.sizes());
  const c10::cuda::CUDAGuard guard(y.device());
  const tfk::DType dt = dtype_of(y, "softmax_bwd", "y");
  const Tensor dy = dy_in.scalar_type() == y.scalar_type() ? dy_in : dy_in.to(y.scalar_type());
  const int64_t M = y.size(0), N = y.size(1);
  Tensor dx = at::empty({M, N}, y.options());
  if (M > 0 && N > 0) {
    check_launch(tfk::softmax_bwd(dt, dy.data_ptr(), dy.stride(0), dy.stride(1), y.data_ptr(), y.stride(0), y.stride(1),
                                  dx.data_ptr(), M, N, stream()),
                 "softmax_bwd");
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY(tfkernels_cuda, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("softmax_fwd(Tensor x) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y) -> Tensor");
}

TORCH_LIBRARY_IMPL(tfkernels_cuda, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

// Importable as a Python module (tfkernels._C from setup.py, or the JIT build); the ops register
// themselves with the dispatcher when the library loads.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "tfkernels CUDA kernels: see torch.ops.tfkernels_cuda"; }
