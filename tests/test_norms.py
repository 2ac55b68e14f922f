"""LayerNorm and RMSNorm kernels against a float64 reference: forward and every gradient."""
import pytest
import torch
import torch.nn.functional as F

import tfkernels
from tfkernels import reference
from tfkernels.ops import _norm

from conftest import DEVICE, DTYPES, assert_close

# (1, 7): tiny row, one program; (3, 1000): non-power-of-two; (5, 4097): one past a power of two;
# (2, 3, 257): 3-D leading shape; (1, 65536): a single row longer than MAX_FUSED_N -> looped kernels.
SHAPES = [(1, 7), (3, 1000), (5, 4097), (2, 3, 257), (1, 65536)]
OPS = ["layer_norm", "rms_norm"]


def _run(op, x, shape, w, b, backend, eps=1e-5):
    if op == "layer_norm":
        return tfkernels.layer_norm(x, shape, w, b, eps, backend=backend)
    return tfkernels.rms_norm(x, shape, w, eps, backend=backend)


def _ref(op, x, shape, w, b, eps=1e-5):
    if op == "layer_norm":
        return F.layer_norm(x, shape, w, b, eps)
    return reference.rms_norm(x, shape, w, eps)


def _check(op, x, shape, affine, dtype, backend, dy=None, eps=1e-5):
    """Run op and the float64 reference on the same values; compare y and every gradient."""
    N = shape[-1] if len(shape) == 1 else None
    w = torch.randn(shape, device=DEVICE, dtype=dtype) * 0.5 + 1 if affine else None
    b = torch.randn(shape, device=DEVICE, dtype=dtype) if affine and op == "layer_norm" else None
    inputs = [t for t in (x, w, b) if t is not None]
    for t in inputs:
        t.requires_grad_(True)
    y = _run(op, x, shape, w, b, backend, eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    x64, w64, b64 = (t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b))
    y64 = _ref(op, x64, shape, w64, b64, eps)
    assert_close(y, y64, dtype, "y")
    if dy is None:
        dy = torch.randn_like(y)  # one shared random upstream gradient
    grads = torch.autograd.grad(y, inputs, dy)
    refs = torch.autograd.grad(y64, [t for t in (x64, w64, b64) if t is not None], dy.double())
    for name, g, r in zip(["dx", "dw", "db"], grads, refs):
        assert g.dtype == dtype
        # dw/db sum over rows: their error grows with the number of rows summed
        assert_close(g, r, dtype, name, scale=1.0 if name == "dx" else 4.0)
    return y


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("op", OPS)
def test_forward_backward(op, shape, dtype, affine, backend):
    torch.manual_seed(hash((op, shape, str(dtype), affine)) % 2**31)
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 2 + 0.5
    _check(op, x, (shape[-1],), affine, dtype, backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(3, 1000), (2, 3, 257), (4, 129)], ids=str)
def test_looped_path(op, shape, monkeypatch, backend):
    """Rows longer than MAX_FUSED_N take the looped kernels; shrink the limit to reach them cheaply.
    A large mean (|mean| >> std) checks the blockwise variance merge is stable."""
    if backend != "triton":
        pytest.skip("looped-path switch is a Triton launcher setting")
    monkeypatch.setattr(_norm, "MAX_FUSED_N", 64)
    monkeypatch.setattr(_norm, "LOOP_BLOCK_N", 32)
    torch.manual_seed(1)
    x = torch.randn(shape, device=DEVICE) + 100.0
    _check(op, x, (shape[-1],), True, torch.float32, backend)


@pytest.mark.parametrize("op", OPS)
def test_multi_dim_normalized_shape(op, backend):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 7, device=DEVICE)
    _check(op, x, (5, 7), True, torch.float32, backend)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_and_expanded_inputs(op, backend):
    torch.manual_seed(3)
    # transposed: rows are strided, columns contiguous across rows
    x = torch.randn(300, 6, device=DEVICE).t()
    _check(op, x, (300,), True, torch.float32, backend)
    # a column slice of a wider tensor (row stride != N)
    x = torch.randn(5, 400, device=DEVICE)[:, 50:350]
    _check(op, x, (300,), True, torch.float32, backend)
    # expanded input (stride 0 rows) and the expanded gradient of sum()
    x = torch.randn(1, 300, device=DEVICE).expand(4, 300)
    dy = torch.ones(1, 1, device=DEVICE).expand(4, 300)
    _check(op, x, (300,), True, torch.float32, backend, dy=dy)


@pytest.mark.parametrize("op", OPS)
def test_sum_backward_expanded_grad(op, backend):
    """y.sum().backward() hands the kernel a (M, N) gradient with strides (0, 0)."""
    torch.manual_seed(4)
    x = torch.randn(7, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(33, device=DEVICE, requires_grad=True)
    _run(op, x, (33,), w, None, backend).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    _ref(op, x64, (33,), w64, None).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, "dx")
    assert_close(w.grad, w64.grad, torch.float32, "dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps(backend, dtype):
    """eps=None is what the installed torch's F.rms_norm takes (torch 2.6: x's dtype's eps; later:
    float32's for fp16/bf16): activations of RMS 0.05 make the two differ by O(1) in the output, and a
    swapped nn.RMSNorm(eps=None) must keep its outputs."""
    torch.manual_seed(6)
    x = torch.randn(4, 64, device=DEVICE, dtype=dtype) * 0.05
    torch_y = F.rms_norm(x, (64,))
    assert_close(tfkernels.rms_norm(x, (64,), backend=backend), torch_y.double(), dtype)
    model = torch.nn.Sequential(torch.nn.RMSNorm(64, device=DEVICE, dtype=dtype))
    before = model(x)
    tfkernels.swap(model, backend=backend)
    assert isinstance(model[0], tfkernels.nn.RMSNorm)
    assert_close(model(x), before.double(), dtype)


def test_mixed_dtype_weight(backend):
    """bf16 activations with fp32 weights (mixed precision): gradients come back in each dtype."""
    x = torch.randn(6, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(128, device=DEVICE, requires_grad=True)
    b = torch.randn(128, device=DEVICE, requires_grad=True)
    y = tfkernels.layer_norm(x, (128,), w, b, backend=backend)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = F.layer_norm(x.detach().double(), (128,), w.detach().double(), b.detach().double())
    assert_close(y, ref, torch.bfloat16)


def test_empty_input(backend):
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    y = tfkernels.layer_norm(x, (16,), w, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16, device=DEVICE))


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_over_2_31_elements(op, backend):
    """int64 offsets: a bf16 tensor past 2^31 elements; the last rows must be right."""
    N = 8192
    M = (2**31) // N + 16
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    y = _run(op, x, (N,), None, None, backend)
    tail = x[-16:].double()
    assert_close(y[-16:], _ref(op, tail, (N,), None, None), torch.bfloat16)
    del y
    x.requires_grad_(True)
    y = _run(op, x, (N,), None, None, backend)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    t64 = tail.requires_grad_(True)
    (r,) = torch.autograd.grad(_ref(op, t64, (N,), None, None), t64, torch.ones_like(t64))
    assert_close(dx[-16:], r, torch.bfloat16, scale=4.0)


@pytest.mark.parametrize("op", OPS)
def test_strided_and_expanded_weight(op, backend):
    """weight/bias as views: a column of a wider tensor (stride 2) and an expanded scalar (stride 0),
    in the fused and the looped kernels' row lengths; gradients reach the viewed tensors."""
    torch.manual_seed(5)
    for N in (33, 20000):
        x = torch.randn(3, N, device=DEVICE) * 2 + 0.5
        packed = torch.randn(N, 2, device=DEVICE) * 0.5 + 1  # weight = packed[:, 0]
        scalar = torch.randn(1, device=DEVICE)  # bias = scalar.expand(N)
        leaves = [t.requires_grad_(True) for t in (x, packed, scalar)]
        leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
        outs = []
        for (xx, pp, ss), run in ((leaves, _run), (leaves64, _ref)):
            args = (xx, (N,), pp[:, 0], ss.expand(N) if op == "layer_norm" else None)
            outs.append(run(op, *args, backend) if run is _run else run(op, *args))
        y, y64 = outs
        assert_close(y, y64, torch.float32, "y")
        dy = torch.randn_like(y)
        used = 3 if op == "layer_norm" else 2
        grads = torch.autograd.grad(y, leaves[:used], dy)
        refs = torch.autograd.grad(y64, leaves64[:used], dy.double())
        for name, g, r in zip(["dx", "dweight", "dbias"], grads, refs):
            assert_close(g, r, torch.float32, name, scale=1.0 if name == "dx" else 4.0)


@pytest.mark.parametrize("op", OPS + ["softmax"])
def test_zero_length_rows(op, backend):
    """A normalized dim of size 0 (rows with no elements) gives an empty result, as torch does."""
    x = torch.randn(3, 0, device=DEVICE, requires_grad=True)
    if op == "softmax":
        y = tfkernels.softmax(x, -1, backend=backend)
        assert tfkernels.softmax(torch.randn(0, 3, device=DEVICE), 0, backend=backend).shape == (0, 3)
    else:
        w = torch.randn(0, device=DEVICE, requires_grad=True)
        y = _run(op, x, (0,), w, None, backend)
    assert y.shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == (3, 0)


@pytest.mark.parametrize("op", OPS + ["softmax"])
@pytest.mark.parametrize("transposed", [False, True], ids=["ragged1", "ragged2"])
def test_jagged_nested_tensors(op, transposed, backend):
    """A jagged nested tensor (as an NJT model feeds its norms) is normalized row by row, like torch's
    own ops on it: float64 reference on the same rows, forward and every gradient; the result shares
    the input's ragged structure."""
    leaf = torch.nested.nested_tensor([torch.randn(5, 3, 24), torch.randn(1, 3, 24), torch.randn(9, 3, 24)],
                                      layout=torch.jagged, device=DEVICE, requires_grad=True)
    x = leaf.transpose(1, 2) if transposed else leaf  # (B, 3, j, 24), ragged dim 2, or (B, j, 3, 24)
    w = (torch.randn(24, device=DEVICE) + 1).requires_grad_(True)
    b = torch.randn(24, device=DEVICE).requires_grad_(True)
    if op == "softmax":
        y, ref = tfkernels.softmax(x, -1, backend=backend), (lambda x, w, b: torch.softmax(x, -1))
    elif op == "layer_norm":
        y, ref = tfkernels.layer_norm(x, (24,), w, b, backend=backend), (lambda x, w, b: F.layer_norm(x, (24,), w, b))
    else:
        y, ref = tfkernels.rms_norm(x, (24,), w, 1e-6, backend=backend), (lambda x, w, b: F.rms_norm(x, (24,), w, 1e-6))
    assert y.is_nested and y.shape == x.shape and y._ragged_idx == x._ragged_idx
    # the reference on the dense rows (values: (total, 3, 24) or (3, total, 24)), in float64
    v64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (leaf.values(), w, b))
    y64 = ref(v64.transpose(0, 1) if transposed else v64, w64, b64)
    assert_close(y.values(), y64, torch.float32, "y")
    dy = torch.randn_like(y64)
    inputs = (leaf, w, b) if op != "softmax" else (leaf,)
    grads = torch.autograd.grad(y.values(), inputs, dy.float(), allow_unused=True)
    refs = torch.autograd.grad(y64, (v64, w64, b64)[:len(inputs)], dy, allow_unused=True)
    for name, g, r in zip(("dx", "dw", "db"), grads, refs):
        if r is None:  # rms_norm has no bias
            continue
        assert_close(g.values() if g.is_nested else g, r, torch.float32, name, scale=4.0)


# The cuda backend's register layout (csrc/norm.cu): contiguous rows of whole 16-byte vectors, up to
# 32768 fp16/bf16 (16384 fp32) elements forward and 8192 backward. (M, N, dtype): several rows a
# block (N = 64 fp32, 8 bf16), one row of 96 threads (GPT-2's 768), 2 and 4 vectors a thread, the
# 512-thread backward (8192 bf16) and a 1024-thread forward whose backward takes the generic kernels
# (16384 bf16); M not a multiple of the rows a block, and more rows than persistent blocks.
REG_CASES = [(300, 64, torch.float32), (45, 8, torch.bfloat16), (301, 768, torch.bfloat16), (7, 1000, torch.float16),
             (5, 4096, torch.float32), (3, 8192, torch.bfloat16), (2, 16384, torch.bfloat16)]


@pytest.mark.parametrize("M,N,dtype", REG_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("op", OPS)
def test_cuda_register_layout(op, M, N, dtype, backend):
    """Forward, dx, dw and db of the register-resident kernels against float64, with a large mean
    (the variance is two-pass from the registers) and rows of different scales."""
    if backend != "cuda":
        pytest.skip("the cuda backend's row layouts")
    torch.manual_seed(M * N)
    scale = torch.rand(M, 1, device=DEVICE) * 3 + 0.1
    x = (torch.randn(M, N, device=DEVICE) * scale + 20.0).to(dtype)
    _check(op, x, (N,), True, dtype, backend)


@pytest.mark.parametrize("op", OPS)
def test_cuda_register_layout_fallbacks(op, backend):
    """Operands the register layout cannot read take the generic kernels with the same results: a row
    start off 16 bytes, a row stride that is not whole vectors, a strided weight's misaligned copy."""
    if backend != "cuda":
        pytest.skip("the cuda backend's row layouts")
    torch.manual_seed(5)
    base = torch.randn(40, 264, device=DEVICE, dtype=torch.bfloat16)
    _check(op, base[:, 1:257], (256,), True, torch.bfloat16, backend)  # start 2 bytes off
    _check(op, torch.randn(40, 258, device=DEVICE)[:, :256], (256,), True, torch.float32, backend)  # 1032-byte rows
    x = torch.randn(40, 256, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(40, 512, device=DEVICE, dtype=torch.bfloat16)[:, 1:257]  # only dy is off
    _check(op, x, (256,), True, torch.bfloat16, backend, dy=dy)
