"""Softmax: `tfkernels.softmax`, same semantics as `torch.softmax`, over any dim.

Math, per row x:  y = exp(x - max(x)) / sum(exp(x - max(x)));   backward: dx = y * (dy - sum(dy*y)).
Rows with -inf behave like torch's: -inf entries get 0, a row of only -inf gives NaN (0/0), NaN
propagates. Accumulation in fp32; exp is computed as exp2((x - max) * log2(e)).

Regimes:
- fused (N <= MAX_FUSED_N): a tile of BLOCK_M rows x next_pow2(N) columns in registers; one read,
  one write.
- looped (longer rows, any length): one row per program; an online pass keeps the running max and
  the rescaled running sum (as in FlashAttention), then a second pass writes y. The backward loops
  twice (sum(dy*y), then dx).
The op works on a 2-D (M, N) view with any strides (the softmax dim moved last); int64 offsets.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _cuda_ext, _validate, reference
from . import _eager, _grid, _jagged

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch and cuda backends still work
    triton = None

MAX_FUSED_N = 16384  # rows up to this length stay in registers; tests lower it to reach the loop
LOOP_BLOCK_N = 4096
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the hardware instruction

if triton is not None:

    @triton.jit
    def _softmax_fwd_fused(
        X,  # pointer to input, shape (M, N), strides (stride_xm, stride_xn)
        Y,  # pointer to output, shape (M, N), contiguous
        M, N, stride_xm, stride_xn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask,
                    other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        e = tl.exp2((x - m[:, None]) * 1.4426950408889634)  # log2(e)
        y = e / tl.sum(e, axis=1)[:, None]
        tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _softmax_fwd_looped(
        X, Y,  # as in _softmax_fwd_fused
        N, stride_xm, stride_xn,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_xm
        # online pass: running max m and running sum l of exp(x - m)
        m = -float("inf")
        l = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x = tl.load(x_row + cols * stride_xn, mask=cols < N, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # while every value seen is -inf, m_new is -inf and (x - m_new) is NaN: keep l at 0
            # so that a later finite block still gives the right answer
            finite = m_new > -float("inf")
            alpha = tl.where(finite, tl.exp2((m - m_new) * 1.4426950408889634), 1.0)
            blk = tl.sum(tl.exp2((x - m_new) * 1.4426950408889634), axis=0)
            l = l * alpha + tl.where(finite, blk, 0.0)
            m = m_new
        # a row of only -inf ends with l = 0: y = 0/0 = NaN as in torch
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cmask = cols < N
            x = tl.load(x_row + cols * stride_xn, mask=cmask, other=-float("inf")).to(tl.float32)
            y = tl.exp2((x - m) * 1.4426950408889634) / l
            tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=cmask)

    @triton.jit
    def _softmax_bwd_fused(
        DY,  # pointer to upstream gradient, shape (M, N), strides (stride_dym, stride_dyn) (may be 0)
        Y,  # pointer to saved output, shape (M, N), strides (stride_ym, stride_yn)
        DX,  # pointer to input gradient, shape (M, N), contiguous
        M, N, stride_dym, stride_dyn, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(dy * y, axis=1)
        dx = y * (dy - dot[:, None])
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _softmax_bwd_looped(
        DY, Y, DX,  # as in _softmax_bwd_fused
        N, stride_dym, stride_dyn, stride_ym, stride_yn,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        dot = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cmask = cols < N
            dy = tl.load(DY + row * stride_dym + cols * stride_dyn, mask=cmask, other=0.0).to(tl.float32)
            y = tl.load(Y + row * stride_ym + cols * stride_yn, mask=cmask, other=0.0).to(tl.float32)
            dot += tl.sum(dy * y, axis=0)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cmask = cols < N
            dy = tl.load(DY + row * stride_dym + cols * stride_dyn, mask=cmask, other=0.0).to(tl.float32)
            y = tl.load(Y + row * stride_ym + cols * stride_yn, mask=cmask, other=0.0).to(tl.float32)
            tl.store(DX + row * N + cols, (y * (dy - dot)).to(DX.dtype.element_ty), mask=cmask)


def _fused_config(N: int, elem_bytes: int):
    block_n = _grid.next_power_of_2(N)
    block_m = max(1, min(64, 4096 // block_n))
    num_warps = min(16, max(1, block_n * block_m * elem_bytes // 2048))
    return block_m, block_n, num_warps


def _triton_fwd(x: Tensor) -> Tensor:
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if N <= MAX_FUSED_N:
        block_m, block_n, num_warps = _fused_config(N, x.element_size())
        _softmax_fwd_fused[(_grid.cdiv(M, block_m),)](
            x, y, M, N, x.stride(0), x.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    else:
        _softmax_fwd_looped[(M,)](
            x, y, N, x.stride(0), x.stride(1), BLOCK_N=min(LOOP_BLOCK_N, _grid.next_power_of_2(N)), num_warps=8)
    return y


def _triton_bwd(dy: Tensor, y: Tensor) -> Tensor:
    M, N = y.shape
    dx = torch.empty((M, N), dtype=y.dtype, device=y.device)
    if M == 0 or N == 0:
        return dx
    if N <= MAX_FUSED_N:
        block_m, block_n, num_warps = _fused_config(N, y.element_size())
        _softmax_bwd_fused[(_grid.cdiv(M, block_m),)](
            dy, y, dx, M, N, dy.stride(0), dy.stride(1), y.stride(0), y.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    else:
        _softmax_bwd_looped[(M,)](
            dy, y, dx, N, dy.stride(0), dy.stride(1), y.stride(0), y.stride(1),
            BLOCK_N=min(LOOP_BLOCK_N, _grid.next_power_of_2(N)), num_warps=8)
    return dx


def _cuda_fwd(x):
    return _cuda_ext.ops().softmax_fwd(x)


def _cuda_bwd(dy, y):
    return _cuda_ext.ops().softmax_bwd(dy, y)


@_eager.op("tfkernels::softmax_fwd")
def softmax_fwd(x: Tensor, backend: str) -> Tensor:
    """x (M, N), any strides -> softmax over the last dim, (M, N) contiguous."""
    return _backend.run("softmax", backend, _triton_fwd, _cuda_fwd, x)


@softmax_fwd.register_fake
def _(x, backend):
    return x.new_empty(x.shape)


@_eager.op("tfkernels::softmax_bwd")
def softmax_bwd(dy: Tensor, y: Tensor, backend: str) -> Tensor:
    return _backend.run("softmax", backend, _triton_bwd, _cuda_bwd, dy, y)


@softmax_bwd.register_fake
def _(dy, y, backend):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.backend = inputs[1]


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    if _backend.differentiable_backward():  # create_graph=True: the same formula in torch ops
        return y * (dy - (dy * y).sum(-1, keepdim=True)), None
    return softmax_bwd(dy, y, ctx.backend), None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


def softmax(x: Tensor, dim: int = -1, *, backend: Optional[str] = None) -> Tensor:
    """Softmax of `x` along `dim`; same semantics as `torch.softmax(x, dim)`.

    Any dim and any strides: the dim is moved last as a view and the kernels read rows with their
    strides. y is contiguous, as torch's is (over a dim that is not the last, that costs a copy of
    y: a model may `view` the result). fp32 accumulation; y has x's dtype. A nested tensor
    (layout=torch.jagged) takes a dim other than its batch and ragged dims, as torch.softmax.
    """
    if isinstance(x, Tensor) and x.is_nested:
        d = _validate.check_dim(dim, x.dim())
        return _jagged.rowwise(x, lambda v: softmax(v, d - 1, backend=backend), (d,), "softmax")
    _validate.check_tensor(x, "x")
    be = _backend.resolve(backend, x, "softmax")
    _validate.check_float(x, "x", be)
    d = _validate.check_dim(dim, x.dim())
    if be == "torch":
        return reference.softmax(x, d)
    if x.dim() == 0:
        return softmax(x.reshape(1), 0, backend=be).reshape(())
    xt = x.movedim(d, -1)  # (..., N), a view
    N = xt.shape[-1]
    # rows counted explicitly: reshape(-1, N) cannot infer them when N = 0
    y = softmax_fwd(xt.reshape(math.prod(xt.shape[:-1]), N), be)
    return y.view(xt.shape).movedim(-1, d).contiguous()
