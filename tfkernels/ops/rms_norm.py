"""RMSNorm: `tfkernels.rms_norm`, same semantics as `torch.nn.functional.rms_norm`.

y = x / sqrt(mean(x^2) + eps) * weight, eps=None meaning what F.rms_norm takes. Kernels live in
`_norm.py` (shared with LayerNorm); limits as there: float16/bfloat16/float32, rows of any length,
fp32 statistics.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _cuda_ext, _validate, reference
from . import _eager, _jagged


def _cuda_fwd(x, weight, eps):
    return _cuda_ext.ops().rms_norm_fwd(x, weight, eps)


def _cuda_bwd(dy, x, weight, rstd):
    return _cuda_ext.ops().rms_norm_bwd(dy, x, weight, rstd)


def _triton_fwd(x, weight, eps):
    from . import _norm  # imported lazily: the package works without Triton

    y, _, rstd = _norm.norm_fwd(x, weight, None, eps, is_rms=True)
    return y, rstd


def _triton_bwd(dy, x, weight, rstd):
    from . import _norm

    dx, dw, _ = _norm.norm_bwd(dy, x, weight, rstd, rstd, False, is_rms=True)
    return dx, dw


@_eager.op("tfkernels::rms_norm_fwd")
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """x (M, N) -> y (M, N), rstd (M,) fp32."""
    return _backend.run("rms_norm", backend, _triton_fwd, _cuda_fwd, x, weight, eps)


@rms_norm_fwd.register_fake
def _(x, weight, eps, backend):
    M, N = x.shape
    return x.new_empty((M, N)), x.new_empty((M,), dtype=torch.float32)


@_eager.op("tfkernels::rms_norm_bwd")
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """-> dx (M, N), dw (N,) fp32 (empty without weight)."""
    return _backend.run("rms_norm", backend, _triton_bwd, _cuda_bwd, dy, x, weight, rstd)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, backend):
    M, N = x.shape
    return x.new_empty((M, N)), x.new_empty((N if weight is not None else 0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps = eps
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if _backend.differentiable_backward():  # create_graph=True: through the reference's autograd
        N = x.shape[-1]
        dx, dw = _backend.reference_vjp(lambda x, w: reference.rms_norm(x, (N,), w, ctx.eps), (x, weight),
                                        ctx.needs_input_grad[:2], dy)
        return dx, dw, None, None
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.backend)
    return dx, (dw.to(weight.dtype) if weight is not None else None), None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None,
             *, backend: Optional[str] = None) -> Tensor:
    """Root-mean-square normalization over the trailing `normalized_shape` dims of `x`.

    Same semantics as `torch.nn.functional.rms_norm`: y = x / sqrt(mean(x^2) + eps) * weight, where
    eps=None means what it means to the installed torch's F.rms_norm (`reference.rms_norm_default_eps`:
    float32's eps for fp16/bf16 on current torch, x's dtype's on torch 2.6). Statistics in fp32; y
    has x's dtype. A nested tensor (layout=torch.jagged) is normalized row by row, as F.rms_norm
    does it, when normalized_shape does not reach its ragged dim.
    """
    if isinstance(x, Tensor) and x.is_nested:
        return _jagged.rowwise(x, lambda v: rms_norm(v, normalized_shape, weight, eps, backend=backend),
                               _jagged.trailing(x, normalized_shape), "rms_norm")
    _validate.check_tensor(x, "x")
    _validate.check_optional_tensors(weight=weight)
    be = _backend.resolve(backend, x, "rms_norm", others=(weight,))
    shape = _validate.check_norm_args(x, normalized_shape, weight, None, be, "rms_norm")
    if eps is not None and not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float or None, got {type(eps).__name__}")
    if eps is None:
        eps = reference.rms_norm_default_eps(x.dtype)
    if be == "torch":
        return reference.rms_norm(x, shape, weight, eps)
    N = math.prod(shape)
    w = weight.reshape(N) if weight is not None else None
    y, _ = rms_norm_fwd(x.reshape(math.prod(x.shape[:x.dim() - len(shape)]), N), w, float(eps), be)  # N may be 0
    return y.view(x.shape)
