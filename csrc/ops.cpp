// Torch glue for the tfkernels CUDA kernels: schemas (TORCH_LIBRARY) and CUDA implementations
// (TORCH_LIBRARY_IMPL) of the torch.ops.tfkernels_cuda.* ops that tfkernels/ops/*.py call for
// backend="cuda". Each op returns the same outputs, dtypes and shapes as its Triton launcher.
// Only a CUDA build of torch compiles this file (it needs c10/cuda headers); the kernels themselves
// live in the *.cu files behind the plain launch functions of kernels.h.
// ATen, the op registry and pybind11 (for the module's PyInit), not <torch/extension.h>: that one
// also pulls in the whole C++ frontend (nn, optim, data, autograd's Python bindings), which this file
// does not use and which doubled its compile time (28 s -> 16 s for the emulated build here).
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#ifdef TFKERNELS_CUDA_EMULATION
// The host emulation of the kernels (csrc/emulation, tfkernels/_cuda_emu.py): the same ops, for CPU
// tensors, with no stream and no device guard.
#define TFK_DISPATCH_KEY CPU
#define TFK_DEVICE_GUARD(t) (void)(t)
#else
// c10/cuda only, not ATen/cuda/CUDAContext.h: that one includes the cuBLAS, cuSPARSE and cuSOLVER
// headers, which a minimal CUDA toolkit (nvcc and the runtime) does not have, and we use none of them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define TFK_DISPATCH_KEY CUDA
#define TFK_DEVICE_GUARD(t) const c10::cuda::CUDAGuard guard_((t).device())
#endif

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

using at::Tensor;

#ifdef TFKERNELS_CUDA_EMULATION
cudaStream_t stream() { return nullptr; }
bool on_device(const Tensor& t) { return t.is_cpu(); }
constexpr const char* kDeviceName = "a CPU tensor (the CUDA backend is emulated)";
#else
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
bool on_device(const Tensor& t) { return t.is_cuda(); }
constexpr const char* kDeviceName = "a CUDA tensor";
#endif

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

// Attention launches fail with "invalid argument" when even the smallest tiles of this head dim and
// dtype need more shared memory per block than the GPU allows; say so.
void check_attn_launch(cudaError_t err, const char* op, const tfk::AttnParams& p) {
  const bool fp32 = p.dtype == tfk::DType::F32;
  TORCH_CHECK(err != cudaErrorInvalidValue, "tfkernels_cuda.", op, ": CUDA error: ", cudaGetErrorString(err),
              " (head dim ", p.D, " in ", fp32 ? "float32" : p.dtype == tfk::DType::F16 ? "float16" : "bfloat16",
              " needs more shared memory per block than this GPU allows, even with the smallest tiles; "
              "use the triton backend", fp32 ? ", or a 16-bit dtype on an sm_80 or newer GPU)" : ")");
  check_launch(err, op);
}

void check_2d(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(on_device(t), "tfkernels_cuda.", op, ": ", name, " must be ", kDeviceName);
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


// ------------------------------------------------------------------------------ norms

std::tuple<Tensor, Tensor, Tensor> norm_fwd_impl(const Tensor& x, const std::optional<Tensor>& weight,
                                                 const std::optional<Tensor>& bias, double eps, bool is_rms,
                                                 const char* op) {
  check_2d(x, op, "x");
  TFK_DEVICE_GUARD(x);
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
  TFK_DEVICE_GUARD(x);
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
  const int64_t G = tfk::norm_bwd_groups(dt, is_rms, M, N);
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
  TFK_DEVICE_GUARD(x);
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
  TFK_DEVICE_GUARD(y);
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

// ------------------------------------------------------------------------------ attention

void fill_strides(int64_t (&dst)[4], const Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

// An output's or a gradient's (batch, head, time) strides; its dim stride is 1 (like_layout).
void fill_strides3(int64_t (&dst)[3], const Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

// An empty (B, H, T, D) tensor like x for the attention kernels to write: (B, T, H, D) memory seen
// through transpose(1, 2) when x's heads are inner to its time steps, else contiguous. The same
// rule, stride for stride, as tfkernels/ops/attention.py _like_layout, which the fake
// implementations use (torch.compile and opcheck compare them with these).
Tensor like_layout(const Tensor& x) {
  if (x.stride(1) < x.stride(2)) return at::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options()).transpose(1, 2);
  return at::empty(x.sizes(), x.options());
}

void check_4d(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(on_device(t), "tfkernels_cuda.", op, ": ", name, " must be ", kDeviceName);
  TORCH_CHECK(t.dim() == 4, "tfkernels_cuda.", op, ": ", name, " must be 4-D (B, H, T, D), got ", t.dim(), "-D");
}

// What keeps the tensors an AttnParams points into alive for the duration of a call: a converted
// mask, contiguous copies of the document ids, the document scratch.
struct AttnKeep {
  Tensor mask, q_doc, k_doc, doc_scratch;
};

// One document id tensor (B, T) int32 as the kernels read it (contiguous), with errors that name it.
Tensor doc_ids(const Tensor& ids, int64_t B, int64_t T, const Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(ids.scalar_type() == at::kInt, "tfkernels_cuda.", op, ": ", name, " must be int32 document ids, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.device() == q.device(), "tfkernels_cuda.", op, ": ", name, " must be on q's device (", q.device(),
              "), got ", ids.device());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && ids.size(1) == T, "tfkernels_cuda.", op, ": ", name,
              " must be (B, T) = (", B, ", ", T, "), got ", ids.sizes());
  return ids.contiguous();
}

// Fills the parts of AttnParams shared by forward and backward (the document scratch included:
// `backward` sizes it); `keep` holds what they point into.
tfk::AttnParams attn_params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                            const std::optional<Tensor>& q_doc, const std::optional<Tensor>& k_doc,
                            double dropout_p, const std::optional<Tensor>& seed, bool is_causal, double scale,
                            int64_t window_left, int64_t window_right, double softcap, bool backward,
                            AttnKeep& keep, const char* op) {
  check_4d(q, op, "q");
  check_4d(k, op, "k");
  check_4d(v, op, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "tfkernels_cuda.", op, ": q, k and v must share a dtype");
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D && v.size(1) == Hkv &&
                  v.size(2) == Tk,
              "tfkernels_cuda.", op, ": q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, "tfkernels_cuda.", op, ": q's heads (", Hq,
              ") must be a multiple of k/v's heads (", Hkv, ")");
  TORCH_CHECK(D >= 1 && D <= tfk::ATTN_MAX_HEAD_DIM, "tfkernels_cuda.", op, ": head dim must be in [1, ",
              tfk::ATTN_MAX_HEAD_DIM, "], got ", D);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "tfkernels_cuda.", op, ": dropout_p must be in [0, 1], got ", dropout_p);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "tfkernels_cuda.", op,
              ": window_left and window_right must be -1 (unbounded) or >= 0, got (", window_left, ", ", window_right, ")");
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "tfkernels_cuda.", op,
              ": softcap must be finite and >= 0 (0: off), got ", softcap);
  tfk::AttnParams p{};
  p.dtype = dtype_of(q, op, "q");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  fill_strides(p.q_s, q);
  fill_strides(p.k_s, k);
  fill_strides(p.v_s, v);
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.Tq = static_cast<int>(Tq);
  p.Tk = static_cast<int>(Tk);
  p.D = static_cast<int>(D);
  p.causal = is_causal;
  p.scale = static_cast<float>(scale);
  // a window wider than kNoWindow reaches past any supported sequence: unbounded
  p.window_left = window_left < 0 || window_left >= tfk::kNoWindow ? -1 : static_cast<int>(window_left);
  p.window_right = window_right < 0 || window_right >= tfk::kNoWindow ? -1 : static_cast<int>(window_right);
  p.softcap = static_cast<float>(softcap);
  p.dropout_p = static_cast<float>(dropout_p);
  p.mask_kind = 0;
  p.mask = nullptr;
  if (mask.has_value() && mask->defined()) {
    Tensor m = *mask;
    TORCH_CHECK(on_device(m), "tfkernels_cuda.", op, ": mask must be ", kDeviceName);
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == Tq && m.size(3) == Tk,
                "tfkernels_cuda.", op, ": mask must be (B, Hq, Tq, Tk) = (", B, ", ", Hq, ", ", Tq, ", ", Tk,
                ") (an expanded view is fine), got ", m.sizes());
    if (m.scalar_type() == at::kBool) {
      p.mask_kind = 1;
    } else {
      TORCH_CHECK(m.is_floating_point(), "tfkernels_cuda.", op, ": mask must be bool or floating point, got ", m.scalar_type());
      if (m.scalar_type() != at::kFloat && m.scalar_type() != at::kHalf && m.scalar_type() != at::kBFloat16)
        m = m.to(at::kFloat);  // e.g. float64: rare, converted (materialised)
      p.mask_kind = 2;
      p.mask_dtype = dtype_of(m, op, "mask");
    }
    keep.mask = m;
    p.mask = m.data_ptr();
    fill_strides(p.m_s, m);
  }
  const bool has_q_doc = q_doc.has_value() && q_doc->defined(), has_k_doc = k_doc.has_value() && k_doc->defined();
  TORCH_CHECK(has_q_doc == has_k_doc, "tfkernels_cuda.", op, ": q_doc and k_doc go together (both or neither), got ",
              has_q_doc ? "q_doc only" : "k_doc only");
  p.q_doc = p.k_doc = nullptr;
  p.doc_scratch = nullptr;
  if (has_q_doc) {
    keep.q_doc = doc_ids(*q_doc, B, Tq, q, op, "q_doc");
    keep.k_doc = doc_ids(*k_doc, B, Tk, q, op, "k_doc");
    p.q_doc = keep.q_doc.data_ptr<int>();
    p.k_doc = keep.k_doc.data_ptr<int>();
    const size_t bytes = tfk::attention_doc_scratch_bytes(p, backward);
    if (bytes > 0) {  // (none when a length or the batch is 0: the callers return before any launch)
      keep.doc_scratch = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
      p.doc_scratch = keep.doc_scratch.data_ptr();
    }
  }
  p.seed = 0;
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1,
                "tfkernels_cuda.", op, ": dropout_p > 0 needs a seed tensor of one element");
    p.seed = static_cast<uint64_t>(seed->to(at::kCPU).to(at::kLong).item<int64_t>());
  }
  TORCH_CHECK(Tq <= 65535 * 16 && Tk <= 65535 * 16, "tfkernels_cuda.", op, ": sequence lengths over ", 65535 * 16,
              " are not supported");
  return p;
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const std::optional<Tensor>& mask, const std::optional<Tensor>& q_doc,
                                         const std::optional<Tensor>& k_doc, double dropout_p,
                                         const std::optional<Tensor>& seed, bool is_causal, double scale,
                                         int64_t window_left, int64_t window_right, double softcap) {
  const char* op = "attention_fwd";
  check_4d(q, op, "q");
  TFK_DEVICE_GUARD(q);
  AttnKeep keep;
  tfk::AttnParams p = attn_params(q, k, v, mask, q_doc, k_doc, dropout_p, seed, is_causal, scale, window_left,
                                  window_right, softcap, /*backward=*/false, keep, op);
  Tensor out = like_layout(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || p.Tk == 0) {  // no queries, or no keys: every row fully masked
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  p.out = out.data_ptr();
  fill_strides3(p.out_s, out);
  p.lse = lse.data_ptr<float>();
  check_attn_launch(tfk::attention_fwd(p, stream()), op, p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout_in, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const std::optional<Tensor>& mask,
                                                         const std::optional<Tensor>& q_doc,
                                                         const std::optional<Tensor>& k_doc,
                                                         const Tensor& out, const Tensor& lse_in,
                                                         const std::optional<Tensor>& dlse_in, double dropout_p,
                                                         const std::optional<Tensor>& seed, bool is_causal,
                                                         double scale, int64_t window_left,
                                                         int64_t window_right, double softcap, bool mask_grad) {
  const char* op = "attention_bwd";
  check_4d(q, op, "q");
  check_4d(dout_in, op, "dout");
  check_4d(out, op, "out");
  TORCH_CHECK(dout_in.sizes() == q.sizes() && out.sizes() == q.sizes(), "tfkernels_cuda.", op,
              ": dout and out must have q's shape ", q.sizes());
  TFK_DEVICE_GUARD(q);
  AttnKeep keep;
  tfk::AttnParams p = attn_params(q, k, v, mask, q_doc, k_doc, dropout_p, seed, is_causal, scale, window_left,
                                  window_right, softcap, /*backward=*/true, keep, op);
  const Tensor dout = dout_in.scalar_type() == q.scalar_type() ? dout_in : dout_in.to(q.scalar_type());
  const Tensor o = out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), Tk = k.size(2);
  Tensor dq = like_layout(q), dk = like_layout(k), dv = like_layout(v);
  const auto f32 = q.options().dtype(at::kFloat);
  // dS is zero on the tiles the kernels skip (outside the causal triangle, the window or the
  // documents), so the buffer starts at zero
  Tensor dmask = mask_grad ? at::zeros({B, Hq, Tq, Tk}, f32) : at::empty({0}, f32);
  if (B * Hq * Tq == 0 || Tk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask};
  }
  TORCH_CHECK(lse.numel() == B * Hq * Tq, "tfkernels_cuda.", op, ": lse must have B*Hq*Tq elements");
  Tensor delta = at::empty({B, Hq, Tq}, f32);
  p.dout = dout.data_ptr();
  fill_strides(p.do_s, dout);
  p.o = o.data_ptr();
  fill_strides(p.o_s, o);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  Tensor dlse;  // kept alive until the launch is queued
  if (dlse_in.has_value() && dlse_in->defined()) {
    TORCH_CHECK(dlse_in->numel() == B * Hq * Tq && dlse_in->device() == q.device(), "tfkernels_cuda.", op,
                ": dlse must have B*Hq*Tq elements on q's device");
    dlse = dlse_in->to(at::kFloat).contiguous();
    p.dlse = dlse.data_ptr<float>();
  }
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  fill_strides3(p.dq_s, dq);
  fill_strides3(p.dk_s, dk);
  fill_strides3(p.dv_s, dv);
  p.dmask = mask_grad && p.mask_kind == 2 ? dmask.data_ptr<float>() : nullptr;
  check_attn_launch(tfk::attention_bwd(p, stream()), op, p);
  return {dq, dk, dv, dmask};
}

// Whether t's (..., D) rows can be read as 16-byte vectors: dim stride 1, the other strides and D
// multiples of a vector's elements, the base 16-byte aligned.
bool rows_vectorizable(const Tensor& t) {
  const int64_t v = 16 / static_cast<int64_t>(t.element_size());
  if (t.stride(-1) != 1 || t.size(-1) % v != 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < t.dim() - 1; ++i)
    if (t.stride(i) % v != 0) return false;
  return true;
}

// tfkernels/ops/kvcache.py's op for backend="cuda" (its Python side checked the values: lengths
// within the cache, page ids, batch indices; the kernels clamp them anyway, so a bad value never
// reads outside the cache). num_splits >= 1: the caller picks it (kvcache.py _auto_splits).
std::tuple<Tensor, Tensor> kvcache_attention_fwd(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                                 const Tensor& seqlens, const std::optional<Tensor>& block_table,
                                                 const std::optional<Tensor>& batch_idx,
                                                 const std::optional<Tensor>& leftpad, double scale, bool causal,
                                                 int64_t window_left, int64_t window_right, double softcap,
                                                 int64_t num_splits) {
  const char* op = "kvcache_attention_fwd";
  TORCH_CHECK(on_device(q) && on_device(k_cache) && on_device(v_cache) && on_device(seqlens), "tfkernels_cuda.", op,
              ": q, the caches and seqlens must be ", kDeviceName);
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "tfkernels_cuda.", op,
              ": q must be (B, T_q, H_q, D) and the caches (B_cache or pages, S, H_kv, D) alike");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "tfkernels_cuda.", op, ": the caches must have q's dtype");
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0 && D <= tfk::ATTN_MAX_HEAD_DIM, "tfkernels_cuda.",
              op, ": the caches must have q's head dim (at most ", tfk::ATTN_MAX_HEAD_DIM, ") and H_q % H_kv == 0");
  TORCH_CHECK(seqlens.scalar_type() == at::kInt && seqlens.dim() == 1 && seqlens.size(0) == B && seqlens.is_contiguous(),
              "tfkernels_cuda.", op, ": seqlens must be (B,) int32 contiguous");
  TORCH_CHECK(num_splits >= 1 && num_splits <= tfk::KV_MAX_SPLITS, "tfkernels_cuda.", op, ": num_splits must be in 1..",
              tfk::KV_MAX_SPLITS);
  TFK_DEVICE_GUARD(q);
  tfk::KvParams p{};
  p.dtype = dtype_of(q, op, "q");
  p.q = q.data_ptr();
  fill_strides(p.q_s, q);
  p.k = k_cache.data_ptr();
  fill_strides(p.k_s, k_cache);
  p.v = v_cache.data_ptr();
  fill_strides(p.v_s, v_cache);
  p.k_vec = rows_vectorizable(k_cache);
  p.v_vec = rows_vectorizable(v_cache);
  p.seqlens = seqlens.data_ptr<int>();
  const bool paged = block_table.has_value() && block_table->defined();
  if (paged) {
    TORCH_CHECK(on_device(*block_table) && block_table->scalar_type() == at::kInt && block_table->dim() == 2 &&
                    block_table->size(0) == B, "tfkernels_cuda.", op, ": block_table must be (B, max_pages) int32");
    p.block_table = block_table->data_ptr<int>();
    p.bt_s[0] = block_table->stride(0);
    p.bt_s[1] = block_table->stride(1);
  }
  if (batch_idx.has_value() && batch_idx->defined()) {
    TORCH_CHECK(on_device(*batch_idx) && batch_idx->scalar_type() == at::kInt && batch_idx->dim() == 1 &&
                    batch_idx->size(0) == B && batch_idx->is_contiguous(), "tfkernels_cuda.", op,
                ": batch_idx must be (B,) int32 contiguous");
    p.batch_idx = batch_idx->data_ptr<int>();
  }
  if (leftpad.has_value() && leftpad->defined()) {
    TORCH_CHECK(on_device(*leftpad) && leftpad->scalar_type() == at::kInt && leftpad->dim() == 1 &&
                    leftpad->size(0) == B && leftpad->is_contiguous(), "tfkernels_cuda.", op,
                ": leftpad must be (B,) int32 contiguous");
    p.leftpad = leftpad->data_ptr<int>();
  }
  p.B = static_cast<int>(B);
  p.Tq = static_cast<int>(Tq);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.D = static_cast<int>(D);
  p.page = paged ? static_cast<int>(k_cache.size(1)) : 1;
  const int64_t cap = paged ? block_table->size(1) * k_cache.size(1) : k_cache.size(1);
  TORCH_CHECK(cap < (int64_t{1} << 31) && k_cache.size(0) > 0, "tfkernels_cuda.", op,
              ": the cache must hold fewer than 2^31 keys a row, and at least one row");
  p.cap = static_cast<int>(cap);
  p.cache_rows = static_cast<int>(k_cache.size(0));
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.causal = causal;
  p.window_left = static_cast<int>(window_left);
  p.window_right = static_cast<int>(window_right);
  p.num_splits = static_cast<int>(num_splits);
  Tensor out = at::empty({B, Tq, Hq, D}, q.options());
  Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  Tensor o_part, lse_part;  // kept alive until the launches are queued
  if (num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    o_part = at::empty({num_splits, B, Hq, Tq, D}, f32);
    lse_part = at::empty({num_splits, B, Hq, Tq}, f32);
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_launch(tfk::kvcache_attention_fwd(p, stream()), op);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(tfkernels_cuda, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("softmax_fwd(Tensor x) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? q_doc, Tensor? k_doc, float dropout_p, "
        "Tensor? seed, bool is_causal, float scale, int window_left, int window_right, float softcap) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? q_doc, Tensor? k_doc, "
        "Tensor out, Tensor lse, Tensor? dlse, float dropout_p, Tensor? seed, bool is_causal, float scale, "
        "int window_left, int window_right, float softcap, bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kvcache_attention_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor? block_table, "
        "Tensor? batch_idx, Tensor? leftpad, float scale, bool causal, int window_left, int window_right, float softcap, "
        "int num_splits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tfkernels_cuda, TFK_DISPATCH_KEY, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("kvcache_attention_fwd", &kvcache_attention_fwd);
}

// Importable as a Python module (tfkernels._C from setup.py, or the JIT build); the ops register
// themselves with the dispatcher when the library loads.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "tfkernels CUDA kernels: see torch.ops.tfkernels_cuda"; }
