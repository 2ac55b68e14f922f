"""Softmax kernels against a float64 reference: forward and gradient, any dim, -inf rows."""
import pytest
import torch

import tfkernels
import importlib

softmax_mod = importlib.import_module("tfkernels.ops.softmax")  # the module; tfkernels.ops.softmax is the function

from conftest import DEVICE, DTYPES, assert_close

SHAPES = [(1, 7), (3, 1000), (5, 4097), (2, 3, 257), (1, 65536)]


def _check(x, dim, dtype, backend, dy=None):
    x = x.detach().requires_grad_(True)
    y = tfkernels.softmax(x, dim, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous()  # as torch's: a model may .view() it (nn.Softmax(dim=1) then view)
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.softmax(x64, dim)
    assert_close(y, y64, dtype, "y")
    dy = torch.randn_like(y) if dy is None else dy
    (dx,) = torch.autograd.grad(y, x, dy)
    (r,) = torch.autograd.grad(y64, x64, dy.double())
    assert_close(dx, r, dtype, "dx", scale=2.0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward(shape, dtype, backend):
    torch.manual_seed(hash((shape, str(dtype))) % 2**31)
    _check(torch.randn(shape, device=DEVICE, dtype=dtype) * 3, -1, dtype, backend)


@pytest.mark.parametrize("dim", [0, 1, -3])
def test_any_dim(dim, backend):
    torch.manual_seed(5)
    _check(torch.randn(3, 17, 5, device=DEVICE), dim, torch.float32, backend)


def test_non_contiguous_and_expanded(backend):
    torch.manual_seed(6)
    _check(torch.randn(300, 6, device=DEVICE).t(), -1, torch.float32, backend)
    x = torch.randn(1, 300, device=DEVICE).expand(4, 300)
    _check(x, -1, torch.float32, backend, dy=torch.ones(1, 1, device=DEVICE).expand(4, 300))


@pytest.mark.parametrize("layout", ["fused", "looped", "cuda-registers"])
def test_neg_inf_rows(layout, monkeypatch, backend):
    """-inf entries get probability 0, a row of only -inf gives NaN, like torch.softmax.
    In the looped kernel the first block of row 1 is all -inf, which must not poison the sum.
    cuda-registers: rows of 64 fp32, which the cuda backend holds in registers, 4 rows a block."""
    if layout == "looped":
        if backend != "triton":
            pytest.skip("looped-path switch is a Triton launcher setting")
        monkeypatch.setattr(softmax_mod, "MAX_FUSED_N", 64)
        monkeypatch.setattr(softmax_mod, "LOOP_BLOCK_N", 32)
    if layout == "cuda-registers" and backend != "cuda":
        pytest.skip("the cuda backend's row layouts")
    N = 64 if layout == "cuda-registers" else 301  # 301: no whole 16-byte vectors, the generic kernel
    torch.manual_seed(7)
    x = torch.randn(4, N, device=DEVICE)
    x[0, ::3] = float("-inf")
    x[1, :N // 3] = float("-inf")
    x[2] = float("-inf")
    y = tfkernels.softmax(x, -1, backend=backend)
    ref = torch.softmax(x.double(), -1)
    assert torch.isnan(y[2]).all()
    assert (y[0, ::3] == 0).all() and (y[1, :N // 3] == 0).all()
    assert_close(y[[0, 1, 3]], ref[[0, 1, 3]], torch.float32)
    # gradients of the rows that have finite entries
    xf = x[[0, 1, 3]].clone()
    _check(xf, -1, torch.float32, backend)


@pytest.mark.parametrize("shape", [(3, 1000), (2, 3, 257)], ids=str)
def test_looped_path(shape, monkeypatch, backend):
    if backend != "triton":
        pytest.skip("looped-path switch is a Triton launcher setting")
    monkeypatch.setattr(softmax_mod, "MAX_FUSED_N", 64)
    monkeypatch.setattr(softmax_mod, "LOOP_BLOCK_N", 32)
    torch.manual_seed(8)
    _check(torch.randn(shape, device=DEVICE) * 4, -1, torch.float32, backend)


def test_scalar_and_empty(backend):
    x = torch.tensor(3.0, device=DEVICE)
    assert tfkernels.softmax(x, 0, backend=backend).item() == 1.0
    e = torch.randn(0, 5, device=DEVICE)
    assert tfkernels.softmax(e, -1, backend=backend).shape == (0, 5)


# The cuda backend's register layout (csrc/softmax.cu): contiguous rows of whole 16-byte vectors.
# Several rows a block (N = 64 fp32, 8 bf16), one 96-thread row, 2 and 4 vectors a thread, and a
# 1024-thread forward whose backward takes the generic kernel (32768 bf16).
REG_CASES = [(300, 64, torch.float32), (45, 8, torch.bfloat16), (33, 768, torch.float16),
             (5, 4096, torch.float32), (3, 16384, torch.bfloat16), (2, 32768, torch.bfloat16)]


@pytest.mark.parametrize("M,N,dtype", REG_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_register_layout(M, N, dtype, backend):
    if backend != "cuda":
        pytest.skip("the cuda backend's row layouts")
    torch.manual_seed(M + N)
    _check(torch.randn(M, N, device=DEVICE, dtype=dtype) * 3, -1, dtype, backend)


def test_cuda_register_layout_fallback(backend):
    """A row start 4 bytes off 16: the cuda backend's generic kernels, the same results."""
    if backend != "cuda":
        pytest.skip("the cuda backend's row layouts")
    torch.manual_seed(8)
    _check(torch.randn(6, 65, device=DEVICE)[:, 1:], -1, torch.float32, backend)
