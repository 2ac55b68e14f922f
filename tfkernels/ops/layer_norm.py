"""LayerNorm: `tfkernels.layer_norm`, same semantics as `torch.nn.functional.layer_norm`.

Kernels live in `_norm.py` (shared with RMSNorm). Limits: x of float16/bfloat16/float32 (weight and
bias may be another float dtype; their gradients come back in their own dtype); rows of any length
(rows over `_norm.MAX_FUSED_N` elements take the looped kernels); statistics in fp32.

Layering: `layer_norm_fwd` / `layer_norm_bwd` are `torch.library` custom ops over 2-D (M, N)
views with any strides; autograd is registered on the forward op; the public function validates,
picks the backend, flattens to 2-D and calls the op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _cuda_ext, _validate, reference
from . import _eager, _jagged


def _cuda_fwd(x, weight, bias, eps):
    return _cuda_ext.ops().layer_norm_fwd(x, weight, bias, eps)


def _cuda_bwd(dy, x, weight, mean, rstd, has_bias):
    return _cuda_ext.ops().layer_norm_bwd(dy, x, weight, mean, rstd, has_bias)


def _triton_fwd(x, weight, bias, eps):
    from . import _norm  # imported lazily: the package works without Triton

    return _norm.norm_fwd(x, weight, bias, eps, is_rms=False)


def _triton_bwd(dy, x, weight, mean, rstd, has_bias):
    from . import _norm  # imported lazily: the package works without Triton

    return _norm.norm_bwd(dy, x, weight, mean, rstd, has_bias, is_rms=False)


@_eager.op("tfkernels::layer_norm_fwd")
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, N) -> y (M, N), mean (M,) fp32, rstd (M,) fp32."""
    return _backend.run("layer_norm", backend, _triton_fwd, _cuda_fwd, x, weight, bias, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, backend):
    M, N = x.shape
    stat = x.new_empty((M,), dtype=torch.float32)
    return x.new_empty((M, N)), stat, stat.clone()


@_eager.op("tfkernels::layer_norm_bwd")
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   has_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (M, N), dw (N,) fp32 (empty without weight), db (N,) fp32 (empty without bias)."""
    return _backend.run("layer_norm", backend, _triton_bwd, _cuda_bwd, dy, x, weight, mean, rstd, has_bias)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias, backend):
    M, N = x.shape
    dw = x.new_empty((N if weight is not None else 0,), dtype=torch.float32)
    db = x.new_empty((N if has_bias else 0,), dtype=torch.float32)
    return x.new_empty((M, N)), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.eps = eps
    ctx.backend = backend
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    if _backend.differentiable_backward():  # create_graph=True: through the reference's autograd
        N = x.shape[-1]
        dx, dw = _backend.reference_vjp(lambda x, w: reference.layer_norm(x, (N,), w, None, ctx.eps), (x, weight),
                                        ctx.needs_input_grad[:2], dy)
        db = dy.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None  # the bias adds: dy summed
        return dx, dw, db, None, None
    dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd, has_bias, ctx.backend)
    dw = dw.to(weight.dtype) if weight is not None else None
    db = db.to(ctx.bias_dtype) if has_bias else None
    return dx, dw, db, None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """Layer normalization over the trailing `normalized_shape` dims of `x`.

    Same semantics as `torch.nn.functional.layer_norm`: y = (x - mean) / sqrt(var + eps) * weight + bias,
    with the biased variance. Statistics are computed in fp32; y has x's dtype.

    Args:
        x: input of shape (*, *normalized_shape), float16/bfloat16/float32.
        normalized_shape: int or sequence of ints, the trailing dims to normalize over.
        weight, bias: optional tensors of shape `normalized_shape`.
        eps: added to the variance.
        backend: "triton", "cuda", "torch" or None (automatic; see `tfkernels._backend`).

    A nested tensor (layout=torch.jagged) is normalized row by row, as F.layer_norm does it, when
    normalized_shape does not reach its ragged dim.
    """
    if isinstance(x, Tensor) and x.is_nested:
        return _jagged.rowwise(x, lambda v: layer_norm(v, normalized_shape, weight, bias, eps, backend=backend),
                               _jagged.trailing(x, normalized_shape), "layer_norm")
    _validate.check_tensor(x, "x")
    _validate.check_optional_tensors(weight=weight, bias=bias)
    be = _backend.resolve(backend, x, "layer_norm", others=(weight, bias))
    shape = _validate.check_norm_args(x, normalized_shape, weight, bias, be, "layer_norm")
    if not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if be == "torch":
        return reference.layer_norm(x, shape, weight, bias, eps)
    N = math.prod(shape)
    # a view where strides allow (the kernels take any row/column stride); rows counted explicitly,
    # as reshape(-1, N) cannot infer them when N = 0
    x2 = x.reshape(math.prod(x.shape[:x.dim() - len(shape)]), N)
    w = weight.reshape(N) if weight is not None else None
    b = bias.reshape(N) if bias is not None else None
    y, _, _ = layer_norm_fwd(x2, w, b, float(eps), be)
    return y.view(x.shape)
