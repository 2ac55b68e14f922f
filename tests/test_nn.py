"""Drop-in modules: same outputs, parameters and state_dict keys as the torch modules."""
import pytest
import torch
from torch import nn

import tfkernels

from conftest import DEVICE, assert_close

PAIRS = [
    (lambda **kw: nn.LayerNorm(48, **kw), lambda **kw: tfkernels.nn.LayerNorm(48, **kw)),
    (lambda **kw: nn.LayerNorm((4, 48), bias=False, **kw), lambda **kw: tfkernels.nn.LayerNorm((4, 48), bias=False, **kw)),
    (lambda **kw: nn.RMSNorm(48, eps=1e-6, **kw), lambda **kw: tfkernels.nn.RMSNorm(48, eps=1e-6, **kw)),
    (lambda **kw: nn.RMSNorm(48, elementwise_affine=False, **kw), lambda **kw: tfkernels.nn.RMSNorm(48, elementwise_affine=False, **kw)),
]


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_state_dict_and_outputs_match(pair, backend):
    make_torch, make_tk = PAIRS[pair]
    torch.manual_seed(0)
    ref = make_torch(device=DEVICE)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours = make_tk(device=DEVICE, backend=backend)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())  # a torch checkpoint loads into ours ...
    ref.load_state_dict(ours.state_dict())  # ... and ours into torch
    x = torch.randn(3, 4, 48, device=DEVICE)
    assert_close(ours(x), ref(x).double(), torch.float32)
    assert isinstance(ours, type(ref))


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_from_torch_shares_parameters(pair, backend):
    make_torch, make_tk = PAIRS[pair]
    ref = make_torch(device=DEVICE)
    cls = type(make_tk(device="meta"))
    ours = cls.from_torch(ref, backend=backend)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1 is p2
    x = torch.randn(2, 4, 48, device=DEVICE, requires_grad=True)
    ours(x).square().sum().backward()
    g_ours = [p.grad.clone() for p in ref.parameters()]
    for p in ref.parameters():
        p.grad = None
    ref(x).square().sum().backward()
    for a, b in zip(g_ours, ref.parameters()):
        assert_close(a, b.grad.double(), torch.float32, scale=4.0)


def test_from_torch_type_check():
    with pytest.raises(TypeError, match="module must be a torch.nn.LayerNorm"):
        tfkernels.nn.LayerNorm.from_torch(nn.RMSNorm(4))


@pytest.mark.parametrize("dim", [None, 0, -1])
def test_softmax_module(dim, backend):
    x = torch.randn(3, 5, 7, device=DEVICE)
    ours = tfkernels.nn.Softmax(dim, backend=backend)
    ref = nn.Softmax(dim)
    with pytest.warns(UserWarning) if dim is None else _nullcontext():
        expected = ref(x)
    assert_close(ours(x), expected.double(), torch.float32)
    assert tfkernels.nn.Softmax.from_torch(ref).dim == dim


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
