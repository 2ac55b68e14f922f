"""Triton kernels for LayerNorm and RMSNorm (one kernel family, `IS_RMS` selects the statistics).

Math, per row x of length N (statistics in fp32 for numerical stability):
    LayerNorm:  mu = mean(x),  rstd = 1/sqrt(mean((x-mu)^2) + eps),  xhat = (x-mu)*rstd
    RMSNorm:    mu = 0,        rstd = 1/sqrt(mean(x^2) + eps),       xhat = x*rstd
    y = xhat * w + b                                   (w, b optional)
Backward, with g = dy*w (or dy without a weight):
    dx = rstd * (g - xhat*mean(g*xhat) - mean(g))      (RMSNorm drops the mean(g) term)
    dw = sum_rows(dy*xhat),  db = sum_rows(dy)

Two regimes:
- fused (N <= MAX_FUSED_N): a tile of BLOCK_M rows x next_pow2(N) columns lives in registers,
  one read of x and one write of y. The backward kernel is persistent: each program walks a
  strided set of row tiles and keeps its dw/db partial sums in registers, then writes one row of
  a (G, N) fp32 buffer; torch sums the G partials (stage two). No atomics.
- looped (N > MAX_FUSED_N, any length): one row per program, column blocks in a loop; the
  forward merges per-block (mean, M2) with Chan's parallel formula so x is read twice (stats,
  then normalise) instead of three times; dw/db come from a column-parallel kernel that
  recomputes xhat.

Offsets are int64 (row index cast before multiplying by the stride), so tensors with more than
2^31 elements are safe. Inputs may have any row/column strides, including 0 (expanded).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _grid

# Rows up to this many elements are kept in registers (num_warps up to 16 keeps it spill-free
# on sm_80/sm_90); longer rows take the looped kernels. Tests lower it to reach the looped path.
MAX_FUSED_N = 16384
LOOP_BLOCK_N = 4096  # column block of the looped kernels


@triton.jit
def _norm_fwd_fused(
    X,  # pointer to input, shape (M, N), strides (stride_xm, stride_xn)
    Y,  # pointer to output, shape (M, N), contiguous
    W,  # pointer to weight, shape (N,) (unused when HAS_W is False)
    B,  # pointer to bias, shape (N,) (unused when HAS_B is False)
    Mean,  # pointer to saved mean, shape (M,) fp32 (unused for RMS)
    Rstd,  # pointer to saved 1/std, shape (M,) fp32
    M, N, stride_xm, stride_xn, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(Mean + rows, mean, mask=rmask)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + rows, rstd, mask=rmask)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_looped(
    X, Y, W, B, Mean, Rstd,  # as in _norm_fwd_fused
    N, stride_xm, stride_xn, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    y_row = Y + row * N
    # pass 1: statistics. Each block's (count, mean, M2) is merged into the running ones
    # (Chan et al.), which stays accurate when |mean| >> std, unlike sum/sum-of-squares.
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        x = tl.load(x_row + cols * stride_xn, mask=cmask, other=0.0).to(tl.float32)
        n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
        if IS_RMS:
            m2 += tl.sum(x * x, axis=0)
        else:
            mean_b = tl.sum(x, axis=0) / n_b
            d = tl.where(cmask, x - mean_b, 0.0)
            m2_b = tl.sum(d * d, axis=0)
            total = count + n_b
            delta = mean_b - mean
            mean += delta * (n_b / total)
            m2 += m2_b + delta * delta * (count * n_b / total)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    # pass 2: normalise and write
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        x = tl.load(x_row + cols * stride_xn, mask=cmask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cmask)


@triton.jit
def _xhat_tile(x, Mean, Rstd, rows, rmask, mask, IS_RMS: tl.constexpr):
    """(xhat, rstd) of a (BLOCK_M, BLOCK_N) tile x from the saved statistics of its rows."""
    rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    return xhat, rstd


@triton.jit
def _norm_bwd_fused(
    DY,  # pointer to upstream gradient, shape (M, N), strides (stride_dym, stride_dyn) (may be 0)
    X,  # pointer to input, shape (M, N), strides (stride_xm, stride_xn)
    W,  # pointer to weight, shape (N,)
    Mean, Rstd,  # pointers to saved statistics, shape (M,) fp32
    DX,  # pointer to input gradient, shape (M, N), contiguous
    DWp,  # pointer to per-program dw partial sums, shape (G, N) fp32
    DBp,  # pointer to per-program db partial sums, shape (G, N) fp32
    M, N, G, tiles_per_prog,  # cdiv(M, BLOCK_M) row tiles shared by G programs
    stride_xm, stride_xn, stride_dym, stride_dyn,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # persistent loop over row tiles pid, pid+G, ...: dw/db partials stay in registers
    for i in range(0, tiles_per_prog):
        tile = pid + i * G  # tiles past the end have every row masked
        rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = _xhat_tile(x, Mean, Rstd, rows, rmask, mask, IS_RMS)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=1) / N
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / N
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db_acc += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(DWp + pid * N + cols, dw_acc, mask=cmask)
    if HAS_B:
        tl.store(DBp + pid * N + cols, db_acc, mask=cmask)


@triton.jit
def _bwd_row_block(x_row, dy_row, W, start, N, stride_xn, stride_dyn,
                   HAS_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns [start, start + BLOCK_N) of one row: (cols, cmask, x, g = dy*w or dy), fp32, 0 past N."""
    cols = start + tl.arange(0, BLOCK_N)
    cmask = cols < N
    x = tl.load(x_row + cols * stride_xn, mask=cmask, other=0.0).to(tl.float32)
    g = tl.load(dy_row + cols * stride_dyn, mask=cmask, other=0.0).to(tl.float32)
    if HAS_W:
        g = g * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    return cols, cmask, x, g


@triton.jit
def _norm_bwd_dx_looped(
    DY, X, W, Mean, Rstd, DX,  # as in _norm_bwd_fused
    N, stride_xm, stride_xn, stride_dym, stride_dyn,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    dy_row = DY + row * stride_dym
    rstd = tl.load(Rstd + row)
    if IS_RMS:
        mean = 0.0
    else:
        mean = tl.load(Mean + row)
    # pass 1: the two row reductions
    c1 = 0.0
    c2 = 0.0
    for start in range(0, N, BLOCK_N):
        cols, cmask, x, g = _bwd_row_block(x_row, dy_row, W, start, N, stride_xn, stride_dyn, HAS_W, BLOCK_N)
        xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
        c1 += tl.sum(g * xhat, axis=0)
        c2 += tl.sum(g, axis=0)
    c1 = c1 / N
    c2 = c2 / N
    if IS_RMS:
        c2 = 0.0
    # pass 2: write dx
    for start in range(0, N, BLOCK_N):
        cols, cmask, x, g = _bwd_row_block(x_row, dy_row, W, start, N, stride_xn, stride_dyn, HAS_W, BLOCK_N)
        xhat = (x - mean) * rstd
        dx = (g - xhat * c1 - c2) * rstd
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=cmask)


@triton.jit
def _norm_bwd_dwdb_looped(
    DY, X, Mean, Rstd,  # as in _norm_bwd_fused
    DWp, DBp,  # pointers to partial sums, shape (G, N) fp32
    M, N, rows_per_group, stride_xm, stride_xn, stride_dym, stride_dyn,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program (column block, row group): sums dy*xhat and dy over its rows for its columns
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    cmask = cols < N
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = group.to(tl.int64) * rows_per_group
    for r in range(0, rows_per_group, BLOCK_M):
        rows = row_start + r + tl.arange(0, BLOCK_M)
        rmask = (rows < M) & (r + tl.arange(0, BLOCK_M) < rows_per_group)
        mask = rmask[:, None] & cmask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            xhat, rstd = _xhat_tile(x, Mean, Rstd, rows, rmask, mask, IS_RMS)
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db_acc += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(DWp + group * N + cols, dw_acc, mask=cmask)
    if HAS_B:
        tl.store(DBp + group * N + cols, db_acc, mask=cmask)


# ----------------------------------------------------------------------------- launchers


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs still exercise the persistent loop


def _fused_config(N: int, elem_bytes: int):
    """Tile shape and warps for the fused kernels: ~16 KB of x per tile, 16-byte accesses."""
    block_n = _grid.next_power_of_2(N)
    block_m = max(1, min(64, 4096 // block_n))  # small rows: several per program
    num_warps = min(16, max(1, block_n * block_m * elem_bytes // 2048))
    return block_m, block_n, num_warps


def _bwd_fused_config(N: int, elem_bytes: int):
    """The backward's tile (the forward's) and warps: it holds x, dy, xhat, g and the dw/db partial
    sums of a tile at once, so the forward's warps leave 128-230 registers a thread on sm_90 (1-4
    programs an SM); ~8 elements a thread keep it near 64 (`python -m benchmarks.static`)."""
    block_m, block_n, _ = _fused_config(N, elem_bytes)
    return block_m, block_n, min(16, max(4, block_m * block_n // 256))


def norm_fwd(x: torch.Tensor, weight, bias, eps: float, is_rms: bool):
    """x: (M, N) any strides -> y (M, N) contiguous, mean (M,) fp32, rstd (M,) fp32."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        mean.zero_(); rstd.zero_()
        return y, mean, rstd
    # the kernels read W and B with unit stride: a strided or expanded (stride-0) view is copied,
    # N elements against the (M, N) input
    w = weight.contiguous() if weight is not None else y  # y: a dummy pointer, never read
    b = bias.contiguous() if bias is not None else y
    if N <= MAX_FUSED_N:
        block_m, block_n, num_warps = _fused_config(N, x.element_size())
        _norm_fwd_fused[(_grid.cdiv(M, block_m),)](
            x, y, w, b, mean, rstd, M, N, x.stride(0), x.stride(1), eps,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    else:
        _norm_fwd_looped[(M,)](
            x, y, w, b, mean, rstd, N, x.stride(0), x.stride(1), eps,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_N=min(LOOP_BLOCK_N, _grid.next_power_of_2(N)), num_warps=8,
        )
    if is_rms:
        mean.zero_()
    return y, mean, rstd


def norm_bwd(dy, x, weight, mean, rstd, has_bias: bool, is_rms: bool):
    """-> dx (M, N) in x's dtype, dw (N,) fp32 or empty, db (N,) fp32 or empty."""
    M, N = x.shape
    dev = x.device
    dx = torch.empty((M, N), dtype=x.dtype, device=dev)
    has_w = weight is not None

    def empty():  # a fresh tensor each time: custom-op outputs must not alias one another
        return torch.empty(0, dtype=torch.float32, device=dev)

    if M == 0 or N == 0:
        z = torch.zeros(N, dtype=torch.float32, device=dev)
        return dx, (z if has_w else empty()), (z.clone() if has_bias else empty())
    w = weight.contiguous() if has_w else dx  # unit stride, as in norm_fwd; dx: a dummy pointer
    if N <= MAX_FUSED_N:
        block_m, block_n, num_warps = _bwd_fused_config(N, x.element_size())
        # persistent programs, as many as are resident at once (~64 registers a thread: 32 warps an
        # SM): each writes one (N,) row of dw/db partials, 8N bytes written and read again, so a
        # second wave of programs would only add partials (528 of them were 35 % of the traffic at
        # M = 4096, N = 1024)
        num_tiles = _grid.cdiv(M, block_m)
        G = max(1, min(num_tiles, max(1, 32 // num_warps) * _num_sms(dev)))
        dwp = torch.empty((G, N), dtype=torch.float32, device=dev) if has_w else empty()
        dbp = torch.empty((G, N), dtype=torch.float32, device=dev) if has_bias else empty()
        _norm_bwd_fused[(G,)](
            dy, x, w, mean, rstd, dx, dwp if has_w else dx, dbp if has_bias else dx,
            M, N, G, _grid.cdiv(num_tiles, G), x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    else:
        block_n = min(LOOP_BLOCK_N, _grid.next_power_of_2(N))
        _norm_bwd_dx_looped[(M,)](
            dy, x, w, mean, rstd, dx, N, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            IS_RMS=is_rms, HAS_W=has_w, BLOCK_N=block_n, num_warps=8,
        )
        if has_w or has_bias:
            col_block = 256
            G = max(1, min(M, _grid.cdiv(4 * _num_sms(dev), _grid.cdiv(N, col_block))))
            rows_per_group = _grid.cdiv(M, G)
            G = _grid.cdiv(M, rows_per_group)
            dwp = torch.empty((G, N), dtype=torch.float32, device=dev) if has_w else empty()
            dbp = torch.empty((G, N), dtype=torch.float32, device=dev) if has_bias else empty()
            _norm_bwd_dwdb_looped[(_grid.cdiv(N, col_block), G)](
                dy, x, mean, rstd, dwp if has_w else dx, dbp if has_bias else dx,
                M, N, rows_per_group, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias, BLOCK_M=16, BLOCK_N=col_block, num_warps=4,
            )
    dw = dwp.sum(0) if has_w else empty()  # stage two of the weight-gradient reduction
    db = dbp.sum(0) if has_bias else empty()
    return dx, dw, db
