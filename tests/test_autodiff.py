"""Autodiff beyond one reverse pass: forward-mode AD, torch.func transforms and double backward.

The custom ops register a backward only. Without care, forward-mode AD (torch.autograd.forward_ad,
torch.func.jvp) gets a zero tangent from them, silently, and torch.func.grad fails with a
misleading error. The automatic backend therefore runs the reference under those modes (a named
kernel backend raises); and a backward run with create_graph=True goes through the reference's
autograd, so that gradients of gradients (gradient penalties, Hessian-vector products) are right.
Every result here is compared with torch's own functions in float64.
"""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import tfkernels
from tfkernels import BackendUnavailableError

from conftest import DEVICE, assert_close, kernel_backends

def _sdpa_math(q, k, v, mask, with_lse=False):
    """SDPA's math for the case below (causal top-left, GQA 2, additive mask), written out: torch's
    CPU SDPA kernels have no forward-mode AD. with_lse: out.sum(-1) + the rows' log-sum-exp, what
    the attention_lse case returns (both outputs in one tensor)."""
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + mask
    s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, -1) @ v
    return out.sum(-1) + s.logsumexp(-1) if with_lse else out


_DOCS = torch.tensor([0] * 5 + [1] * 6)  # two packed documents of an 11-token row


def _attention_docs(q, k, v, m, backend=None):
    return tfkernels.attention(q, k, v, attn_mask=m, is_causal=True, enable_gqa=True,
                               document_ids=_DOCS.to(q.device), backend=backend)


def _sdpa_math_docs(q, k, v, m):
    """_sdpa_math with the documents' mask added (-inf across documents; every row keeps its diagonal)."""
    other = _DOCS[:, None] != _DOCS[None, :]
    return _sdpa_math(q, k, v, m.masked_fill(other, float("-inf")))


def _attention_lse(q, k, v, m, backend=None):
    out, lse = tfkernels.attention(q, k, v, attn_mask=m, is_causal=True, enable_gqa=True, return_lse=True,
                                   backend=backend)
    return out.sum(-1) + lse


# (name, tfkernels op, torch's op, input shapes): the op's differentiable inputs are all the shapes
OPS = [
    ("softmax", lambda x, backend=None: tfkernels.softmax(x, 1, backend=backend),
     lambda x: torch.softmax(x, 1), [(3, 7, 5)]),
    ("layer_norm", lambda x, w, b, backend=None: tfkernels.layer_norm(x, (9,), w, b, eps=1e-5, backend=backend),
     lambda x, w, b: F.layer_norm(x, (9,), w, b, eps=1e-5), [(2, 5, 9), (9,), (9,)]),
    ("rms_norm", lambda x, w, backend=None: tfkernels.rms_norm(x, (9,), w, eps=1e-5, backend=backend),
     lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w, [(2, 5, 9), (9,)]),
    ("attention", lambda q, k, v, m, backend=None: tfkernels.attention(q, k, v, attn_mask=m, is_causal=True,
                                                                       enable_gqa=True, backend=backend),
     lambda q, k, v, m: _sdpa_math(q, k, v, m),
     [(1, 4, 7, 16), (1, 2, 11, 16), (1, 2, 11, 16), (1, 4, 7, 11)]),  # GQA, T_q != T_k, float mask
    ("attention_lse", _attention_lse, lambda q, k, v, m: _sdpa_math(q, k, v, m, with_lse=True),
     [(1, 4, 7, 16), (1, 2, 11, 16), (1, 2, 11, 16), (1, 4, 7, 11)]),  # return_lse=True: both outputs used
    ("attention_docs", _attention_docs, _sdpa_math_docs,
     [(1, 4, 11, 16), (1, 2, 11, 16), (1, 2, 11, 16), (1, 4, 11, 11)]),  # document_ids (packed rows)
]
IDS = [op[0] for op in OPS]


def _inputs(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time "using the PyTorch reference"
        return fn(*args)


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_jvp_runs_the_reference(op):
    """torch.func.jvp and torch.autograd.forward_ad: the tangent equals torch's (it was 0 before)."""
    _, ours, theirs, shapes = op
    primals, tangents = _inputs(shapes, 1), _inputs(shapes, 2)
    want = torch.func.jvp(theirs, tuple(primals), tuple(tangents))[1]
    f32 = [t.float().to(DEVICE) for t in primals], [t.float().to(DEVICE) for t in tangents]
    got = _quiet(torch.func.jvp, ours, tuple(f32[0]), tuple(f32[1]))[1]
    assert_close(got, want, torch.float32, "jvp tangent", scale=4.0)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(*f32)]
        got = fwAD.unpack_dual(_quiet(ours, *duals)).tangent
    assert got is not None
    assert_close(got, want, torch.float32, "forward_ad tangent", scale=4.0)


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_func_grad_runs_the_reference(op):
    """torch.func.grad over every input (it failed with "must override setup_context")."""
    _, ours, theirs, shapes = op
    xs = _inputs(shapes, 3)
    argnums = tuple(range(len(xs)))
    want = torch.func.grad(lambda *a: theirs(*a).pow(2).sum(), argnums)(*xs)
    got = _quiet(torch.func.grad(lambda *a: ours(*a).pow(2).sum(), argnums), *[x.float().to(DEVICE) for x in xs])
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.float32, f"grad {i}", scale=4.0)


@pytest.mark.parametrize("backend", kernel_backends())
def test_named_kernel_backend_refuses_forward_ad(backend):
    """A kernel backend named explicitly never falls back: under jvp it says why, not a zero tangent."""
    x = torch.randn(3, 5, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="define a backward only"):
        torch.func.jvp(lambda a: tfkernels.softmax(a, -1, backend=backend), (x,), (torch.ones_like(x),))
    with fwAD.dual_level(), pytest.raises(BackendUnavailableError, match="forward-mode AD"):
        tfkernels.layer_norm(fwAD.make_dual(x, torch.ones_like(x)), (5,), backend=backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_vmap_keeps_the_kernels(backend):
    """vmap alone is no autodiff transform: a named backend still runs (torch loops over the batch)."""
    x = torch.randn(4, 3, 6, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "no batching rule ... performance drop"
        got = torch.func.vmap(lambda a: tfkernels.softmax(a, -1, backend=backend))(x)
    assert_close(got, torch.softmax(x.double(), -1), torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_double_backward(op, backend):
    """A gradient penalty: d/d(inputs) of |d loss / d(inputs)|^2 with create_graph=True, on a kernel
    backend (its first backward goes through the reference's autograd) against torch in float64."""
    _, ours, theirs, shapes = op
    xs = _inputs(shapes, 4)

    def penalty(fn, leaves):
        out = fn(*leaves)
        grads = torch.autograd.grad(out.sin().sum(), leaves, create_graph=True)
        return sum(g.pow(2).sum() for g in grads)

    want_leaves = [x.clone().requires_grad_(True) for x in xs]
    penalty(theirs, want_leaves).backward()
    leaves = [x.float().to(DEVICE).requires_grad_(True) for x in xs]
    penalty(lambda *a: ours(*a, backend=backend), leaves).backward()
    for i, (g, w) in enumerate(zip(leaves, want_leaves)):
        assert_close(g.grad, w.grad, torch.float32, f"second-order grad {i}", scale=8.0)


def test_double_backward_with_dropout_replays_the_mask():
    """Dropout in a double backward: the reference replays the keep mask of the call's seed, so the
    first-order gradients built with create_graph=True equal the kernels' own."""
    q, k, v = (torch.randn(1, 2, 13, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    out = tfkernels.attention(q, k, v, dropout_p=0.3, backend="triton")
    first = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    torch.manual_seed(5)
    out = tfkernels.attention(q, k, v, dropout_p=0.3, backend="triton")
    graph = torch.autograd.grad(out.pow(2).sum(), (q, k, v), create_graph=True)
    for a, b in zip(first, graph):
        assert b.requires_grad
        assert_close(b.detach(), a, torch.float32, scale=4.0)
