"""The ops' eager shortcut (tfkernels/ops/_eager.py): plain eager calls skip torch.library's dispatch
and run the implementation through an autograd.Function built from the op's own setup_context and
backward; every other context (torch.compile, dispatch and function modes, tensor subclasses,
functorch transforms, keyword calls) calls the registered op. Both must give the same values and
gradients, bit for bit: they run the same kernels on the same arguments."""
import importlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import tfkernels
from tfkernels.ops import _eager

# the modules (tfkernels.ops' attributes of these names are the public functions)
attention_mod, kvcache_mod, layer_norm_mod, rms_norm_mod, softmax_mod = (
    importlib.import_module(f"tfkernels.ops.{m}") for m in ("attention", "kvcache", "layer_norm", "rms_norm", "softmax"))

from conftest import DEVICE

EAGER_OPS = [layer_norm_mod.layer_norm_fwd, layer_norm_mod.layer_norm_bwd, rms_norm_mod.rms_norm_fwd,
             rms_norm_mod.rms_norm_bwd, softmax_mod.softmax_fwd, softmax_mod.softmax_bwd,
             attention_mod.attention_fwd, attention_mod.attention_bwd, kvcache_mod.kvcache_attention_fwd]


@pytest.fixture
def registered_calls(monkeypatch):
    """Names of the registered ops called (through each EagerOp's `op`), in order."""
    calls = []
    for eop in EAGER_OPS:
        real = eop.op

        def spy(*args, _real=real, _name=eop.name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(eop, "op", spy)
    return calls


def _cases(backend):
    """name -> (leaves, fn(*leaves) -> output tensors): each public op, forward and backward."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()

    x, w, b = rand(6, 33), rand(33), rand(33)
    q, k, v = rand(2, 4, 7, 16), rand(2, 2, 9, 16), rand(2, 2, 9, 16)
    mask = rand(1, 4, 7, 9)
    return {
        "layer_norm": ((x, w, b), lambda x, w, b: (tfkernels.layer_norm(x, (33,), w, b, backend=backend),)),
        "rms_norm": ((x, w), lambda x, w: (tfkernels.rms_norm(x, (33,), w, backend=backend),)),
        "softmax": ((x,), lambda x: (tfkernels.softmax(x.t(), 0, backend=backend),)),
        "attention": ((q, k, v), lambda q, k, v: (tfkernels.attention(
            q, k, v, is_causal=True, enable_gqa=True, backend=backend),)),
        "attention_mask_lse": ((q, k, v, mask), lambda q, k, v, m: tfkernels.attention(
            q, k, v, attn_mask=m, enable_gqa=True, return_lse=True, backend=backend)),
    }


def _run(leaves, fn):
    outs = fn(*leaves)
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("case", ["layer_norm", "rms_norm", "softmax", "attention", "attention_mask_lse"])
def test_shortcut_matches_registered_op(case, backend, registered_calls, monkeypatch):
    leaves, fn = _cases(backend)[case]
    out, grads = _run(leaves, fn)
    assert registered_calls == [], "a plain eager call went through torch.library's dispatch"
    monkeypatch.setattr(_eager, "plain", lambda tensors: False)  # every call through the registered op
    ref_out, ref_grads = _run(leaves, fn)
    assert registered_calls, "the registered op was not called"
    for a, r in zip([*out, *grads], [*ref_out, *ref_grads]):
        assert a.shape == r.shape and a.stride() == r.stride() and a.dtype == r.dtype
        assert torch.equal(a, r)


def test_shortcut_without_grad_and_in_inference_mode(backend, registered_calls):
    x = torch.randn(4, 20, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        y = tfkernels.layer_norm(x, (20,), backend=backend)
    assert not y.requires_grad
    with torch.inference_mode():
        z = tfkernels.rms_norm(x, (20,), backend=backend)
    assert z.is_inference() and not z.requires_grad
    assert torch.equal(y, tfkernels.layer_norm(x.detach(), (20,), backend=backend))
    assert registered_calls == []


def test_shortcut_double_backward(backend, registered_calls):
    """create_graph=True through the shortcut's autograd.Function: the backward then runs the
    reference's differentiable graph, as the registered op's does (a gradient penalty)."""
    x = torch.randn(3, 17, device=DEVICE, dtype=torch.float32, requires_grad=True)
    w = torch.randn(17, device=DEVICE, requires_grad=True)
    dx, = torch.autograd.grad(tfkernels.layer_norm(x, (17,), w, backend=backend).pow(2).sum(), x, create_graph=True)
    gw, = torch.autograd.grad(dx.pow(2).sum(), w)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    dxr, = torch.autograd.grad(torch.nn.functional.layer_norm(xr, (17,), wr).pow(2).sum(), xr, create_graph=True)
    gwr, = torch.autograd.grad(dxr.pow(2).sum(), wr)
    torch.testing.assert_close(gw.double(), gwr, atol=1e-4, rtol=1e-4)
    assert registered_calls == []


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def test_observed_calls_take_the_registered_op(backend, registered_calls):
    """A dispatch mode sees the op itself (not the aten ops inside it), as do function modes, tensor
    subclasses, vmap and keyword calls: all go through torch.library."""
    x = torch.randn(4, 24, device=DEVICE)
    expect = tfkernels.layer_norm(x, (24,), backend=backend)
    assert registered_calls == []

    with _Log() as log:
        y = tfkernels.layer_norm(x, (24,), backend=backend)
    assert any("tfkernels.layer_norm_fwd" in n for n in log.names), log.names
    assert not any("aten.native_layer_norm" in n for n in log.names)
    assert torch.equal(y, expect) and registered_calls == ["tfkernels::layer_norm_fwd"]

    with _PassThrough():
        assert torch.equal(tfkernels.layer_norm(x, (24,), backend=backend), expect)
    assert registered_calls[-1] == "tfkernels::layer_norm_fwd" and len(registered_calls) == 2

    assert not _eager.plain([x.as_subclass(_Sub)])
    assert _eager.plain([x, None, torch.nn.Parameter(x)])

    ys = torch.vmap(lambda r: tfkernels.softmax(r, -1, backend=backend))(x.view(2, 2, 24))
    assert torch.equal(ys.view(4, 24), tfkernels.softmax(x, -1, backend=backend))
    assert "tfkernels::softmax_fwd" in registered_calls

    n = len(registered_calls)
    y2, _, _ = layer_norm_mod.layer_norm_fwd(x, None, None, eps=1e-5, backend=backend)  # keywords: the schema binds them
    assert torch.equal(y2, expect) and len(registered_calls) == n + 1


def test_compile_traces_the_registered_op(backend):
    """torch.compile sees the custom op (the shortcut is off while dynamo traces): no graph break,
    one tfkernels node in the graph, the same values and gradients as eager."""
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    graphs = []

    def backend_fn(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    f = lambda x, w: tfkernels.rms_norm(x, (40,), w, backend=backend)  # noqa: E731
    y = torch.compile(f, backend=backend_fn, fullgraph=True)(x, w)
    assert len(graphs) == 1 and "tfkernels.rms_norm_fwd" in graphs[0]
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    ey = f(x, w)
    ex, ew = torch.autograd.grad(ey.sum(), (x, w))
    assert torch.equal(y, ey) and torch.equal(gx, ex) and torch.equal(gw, ew)


def test_profiler_keeps_the_op_names(backend):
    x = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tfkernels.layer_norm(x, (24,), backend=backend).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"tfkernels::layer_norm_fwd", "tfkernels::layer_norm_bwd"} <= names, sorted(names)
