"""F.scaled_dot_product_attention routed to tfkernels: `sdpa_override` and `swap` on models that call
the functional SDPA themselves (nanoGPT-style), outputs and gradients against the unswapped model."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tfkernels
from tfkernels import functional

from conftest import DEVICE, assert_close

ORIGINAL = F.scaled_dot_product_attention


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: the functional SDPA, no module to replace."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(64)
        self.attn = CausalSelfAttention()

    def forward(self, x):
        return x + self.attn(self.ln(x))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls the override makes to tfkernels.attention (their backend argument)."""
    calls = []
    fn = functional.attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return fn(*args, **kwargs)

    monkeypatch.setattr(functional, "attention", spy)
    return calls


def test_swap_routes_functional_sdpa(backend, kernel_calls):
    torch.manual_seed(0)
    ref = nn.Sequential(Block(), Block()).to(DEVICE)
    model = tfkernels.swap(copy.deepcopy(ref), backend=backend)
    x = torch.randn(2, 19, 64, device=DEVICE)
    out = model(x)
    assert kernel_calls == [backend, backend] and F.scaled_dot_product_attention is ORIGINAL
    expect = ref(x)
    assert_close(out, expect, torch.float32, "out")
    out.square().sum().backward()
    expect.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, torch.float32, name, scale=2.0)
    tfkernels.unswap(model)
    model(x)
    assert len(kernel_calls) == 2  # the hooks are gone with unswap


def test_swap_restores_sdpa_when_the_forward_raises(kernel_calls):
    class Boom(nn.Module):
        def forward(self, x):
            assert F.scaled_dot_product_attention is functional.scaled_dot_product_attention
            raise RuntimeError("boom")

    model = tfkernels.swap(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.zeros(1))
    assert F.scaled_dot_product_attention is ORIGINAL and not functional.active()


def test_sdpa_override_rules(kernel_calls):
    q = torch.randn(1, 2, 9, 16, device=DEVICE)
    with tfkernels.sdpa_override():
        assert F.scaled_dot_product_attention is functional.scaled_dot_product_attention
        with tfkernels.sdpa_override(backend="torch"):  # nested: the inner backend, every call
            F.scaled_dot_product_attention(q.double(), q.double(), q.double())
        assert kernel_calls == ["torch"]
        assert F.scaled_dot_product_attention is functional.scaled_dot_product_attention  # still the outer one
        # the automatic choice: a float64 input has no kernel, SDPA itself runs it
        out = F.scaled_dot_product_attention(q.double(), q.double(), q.double(), is_causal=True)
        assert len(kernel_calls) == 1
        torch.testing.assert_close(out, ORIGINAL(q.double(), q.double(), q.double(), is_causal=True))
        # SDPA's keywords and its extensions' defaults
        mask = torch.rand(9, 9, device=DEVICE) > 0.2
        mask[:, 0] = True
        out = F.scaled_dot_product_attention(query=q, key=q, value=q, attn_mask=mask, scale=0.3)
        assert kernel_calls == ["torch", None]
        assert_close(out, ORIGINAL(q.double(), q.double(), q.double(), attn_mask=mask, scale=0.3), torch.float32)
    assert F.scaled_dot_product_attention is ORIGINAL
    with pytest.raises(ValueError, match="not a backend"):
        with tfkernels.sdpa_override(backend="tpu"):
            pass
    assert F.scaled_dot_product_attention is ORIGINAL


def test_sdpa_override_keeps_another_patch(monkeypatch, kernel_calls):
    """A patch installed before the override (another library's) serves what no kernel takes and
    comes back afterwards."""
    seen = []

    def other(*args, **kwargs):
        seen.append(1)
        return ORIGINAL(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", other)
    x = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with tfkernels.sdpa_override():
        F.scaled_dot_product_attention(x, x, x)  # float64: no kernel
    assert seen == [1] and not kernel_calls and F.scaled_dot_product_attention is other


def test_swapped_functional_sdpa_compiles(kernel_calls):
    """torch.compile traces the hooks' patch: the graph holds tfkernels' op, not SDPA."""
    torch._dynamo.reset()
    model = tfkernels.swap(Block().to(DEVICE))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x = torch.randn(2, 11, 64, device=DEVICE)
    out = torch.compile(model, backend=capture, fullgraph=True)(x)
    assert_close(out, model(x), torch.float32, "compiled")
    assert graphs and any("tfkernels.attention_fwd" in g for g in graphs)
    assert not any("scaled_dot_product_attention" in g for g in graphs)
    assert F.scaled_dot_product_attention is ORIGINAL


def test_sdpa_override_is_per_thread(kernel_calls):
    """An override routes its own thread's calls: another thread calling F.sdpa meanwhile (a server
    running a second model) keeps SDPA, and its own override has its own backend."""
    import threading

    q = torch.randn(1, 2, 9, 16, device=DEVICE)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        inside.wait()
        seen["plain"] = F.scaled_dot_product_attention(q, q, q)  # the main thread's override is active
        with tfkernels.sdpa_override(backend="torch"):  # its own, with its own backend
            F.scaled_dot_product_attention(q, q, q)
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with tfkernels.sdpa_override(backend="triton" if DEVICE == "cpu" else None):
        inside.set()
        assert done.wait(60)
        F.scaled_dot_product_attention(q, q, q)
    t.join()
    assert kernel_calls == ["torch", "triton" if DEVICE == "cpu" else None]
    torch.testing.assert_close(seen["plain"], ORIGINAL(q, q, q))
    assert F.scaled_dot_product_attention is ORIGINAL
