"""torch.library registration: opcheck on every op, torch.compile(fullgraph=True) with no graph
breaks, forward and backward."""
import pytest
import torch

import tfkernels

from conftest import DEVICE, assert_close


def _opcheck_cases(backend):
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(33, device=DEVICE, requires_grad=True)
    b = torch.randn(33, device=DEVICE, requires_grad=True)
    ops = torch.ops.tfkernels
    y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5, backend)
    _, rrstd = ops.rms_norm_fwd(x, w, 1e-6, backend)
    dy = torch.randn(5, 33, device=DEVICE)
    s = ops.softmax_fwd(x, backend)
    xd = x.detach()
    return [
        (ops.layer_norm_fwd.default, (x, w, b, 1e-5, backend)),
        (ops.layer_norm_fwd.default, (x, None, None, 1e-5, backend)),
        (ops.layer_norm_bwd.default, (dy, xd, w.detach(), mean, rstd, True, backend)),
        (ops.rms_norm_fwd.default, (x, w, 1e-6, backend)),
        (ops.rms_norm_bwd.default, (dy, xd, w.detach(), rrstd, backend)),
        (ops.softmax_fwd.default, (x, backend)),
        (ops.softmax_fwd.default, (x.detach().t(), backend)),  # strided input
        (ops.softmax_bwd.default, (dy, s.detach(), backend)),
    ]


def test_opcheck(backend):
    torch.manual_seed(0)
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


def _block(x, w, b, backend):
    h = tfkernels.layer_norm(x, (x.shape[-1],), w, b, backend=backend)
    h = tfkernels.rms_norm(h * 2, (x.shape[-1],), w, backend=backend)
    return tfkernels.softmax(h, dim=1, backend=backend)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, backend):
    torch.manual_seed(1)
    torch._dynamo.reset()
    x = torch.randn(4, 6, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    compiled = torch.compile(_block, fullgraph=True, backend=compile_backend)
    y = compiled(x, w, b, backend)
    y_eager = _block(x, w, b, backend)
    assert_close(y, y_eager.detach().double(), torch.float32)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, w, b), dy)
    ge = torch.autograd.grad(y_eager, (x, w, b), dy)
    for a, e in zip(g, ge):
        assert_close(a, e.double(), torch.float32, scale=4.0)


def test_compile_nn_modules(backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(tfkernels.nn.LayerNorm(24, backend=backend), torch.nn.Linear(24, 24),
                                tfkernels.nn.RMSNorm(24, backend=backend), tfkernels.nn.Softmax(-1, backend=backend)).to(DEVICE)
    x = torch.randn(3, 24, device=DEVICE)
    y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert_close(y, model(x).double(), torch.float32)
