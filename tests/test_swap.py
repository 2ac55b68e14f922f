"""tfkernels.swap / unswap on plain PyTorch models: norms, softmax, nn.MultiheadAttention (through
nn.TransformerEncoder, fast paths included), parameter sharing, state_dict, torch.compile, unswap."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tfkernels
import tfkernels.nn as tnn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "triton"  # the interpreter on CPU (conftest sets TRITON_INTERPRET=1)

pytestmark = pytest.mark.usefixtures("attention_calls")  # conftest's spy on tfkernels.attention, in every test


# ---- models ------------------------------------------------------------------------------------

class Mixer(nn.Module):
    """Norms, a softmax, one module object used twice, and a LayerNorm subclass with its own forward."""

    class ScaledLN(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self, d=24):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.proj = nn.Linear(d, d)
        self.shared = nn.LayerNorm(d)
        self.again = self.shared  # same object, two names
        self.odd = Mixer.ScaledLN(d)
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x):
        h = self.proj(self.ln(x))
        h = self.rms(h) + self.shared(h)
        h = self.again(h) * self.sm(h)
        return self.odd(h)


def _mixer():
    torch.manual_seed(0)
    m = Mixer().to(DEVICE)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _encoder(norm_first=False, dtype=torch.float32):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=48, dropout=0.0,
                                       batch_first=True, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(32), enable_nested_tensor=not norm_first)
    return enc.to(DEVICE, dtype).eval()


def _padded(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 32, generator=g).to(DEVICE, dtype)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True  # True = padding (ignored key)
    pad[2, 4:] = True
    return x, pad.to(DEVICE)


def _close(a, b, tol, name):
    err = (a.double() - b.double()).abs().max().item()
    bound = tol * (1.0 + b.double().abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(model, ref, tol):
    """Every parameter gradient of the swapped model matches the reference model's."""
    g_ref, g = _grads(ref), _grads(model)
    assert g.keys() == g_ref.keys()
    for n in g:
        _close(g[n], g_ref[n], tol, f"grad {n}")


# ---- tests -------------------------------------------------------------------------------------

def test_norms_and_softmax_replaced_sharing_parameters():
    model = _mixer()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    _, report = tfkernels.swap(model, backend=BACKEND, return_report=True)

    assert type(model.ln) is tnn.LayerNorm and type(model.rms) is tnn.RMSNorm and type(model.sm) is tnn.Softmax
    assert model.shared is model.again and type(model.shared) is tnn.LayerNorm  # still one object
    assert type(model.odd) is Mixer.ScaledLN  # a subclass with its own forward is not ours to replace
    assert all(p is params[n] for n, p in model.named_parameters())
    names = {r[0]: (r[1], r[2]) for r in report}
    assert names["ln"] == ("torch.nn.LayerNorm", "tfkernels.nn.LayerNorm")
    assert names["rms"] == ("torch.nn.RMSNorm", "tfkernels.nn.RMSNorm")
    assert names["sm"] == ("torch.nn.Softmax", "tfkernels.nn.Softmax")
    assert "odd" not in names

    x = torch.randn(4, 5, 24, device=DEVICE, requires_grad=True)
    gy = torch.randn(4, 5, 24, device=DEVICE)
    y_ref = ref(x)
    y = model(x)
    _close(y, y_ref, 1e-5, "output")
    (y_ref * gy).sum().backward()
    (y * gy).sum().backward()
    _assert_same_grads(model, ref, 1e-5)


def test_flags_select_what_is_swapped():
    model = _mixer()
    tfkernels.swap(model, norms=False, backend=BACKEND)
    assert type(model.ln) is nn.LayerNorm and type(model.sm) is tnn.Softmax
    tfkernels.swap(model, softmax=False, backend=BACKEND)
    assert type(model.ln) is tnn.LayerNorm
    tfkernels.unswap(model)  # undoes both swaps
    assert type(model.ln) is nn.LayerNorm and type(model.sm) is nn.Softmax and type(model.rms) is nn.RMSNorm


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_with_key_padding(norm_first, attention_calls):
    ref = _encoder(norm_first)
    model = copy.deepcopy(ref)
    _, report = tfkernels.swap(model, backend=BACKEND, return_report=True)
    assert sum(r[1] == "torch.nn.MultiheadAttention" for r in report) == 2
    x, pad = _padded()
    keep = ~pad

    # inference: the unswapped model takes PyTorch's fused fast path (and nested tensors when
    # norm_first=False); the swapped one must not, yet give the same values on real tokens
    with torch.no_grad():
        y_ref = ref(x, src_key_padding_mask=pad)
        y = model(x, src_key_padding_mask=pad)
    assert len(attention_calls) == 2
    _close(y[keep], y_ref[keep], 2e-5, "inference output")

    # training-style: outputs and every parameter gradient
    attention_calls.clear()
    gy = torch.randn_like(x)
    y_ref = ref(x, src_key_padding_mask=pad)
    y = model(x, src_key_padding_mask=pad)
    assert len(attention_calls) == 2
    _close(y[keep], y_ref[keep], 2e-5, "output")
    (y_ref * gy * keep[..., None]).sum().backward()
    (y * gy * keep[..., None]).sum().backward()
    _assert_same_grads(model, ref, 5e-5)


def test_unswap_restores_bit_identical_outputs_and_fast_paths():
    ref = _encoder()
    model = copy.deepcopy(ref)
    layer = model.layers[0]
    before = (layer.activation_relu_or_gelu, model.use_nested_tensor)
    originals = [m for m in model.modules()]
    tfkernels.swap(model, backend=BACKEND)
    assert layer.activation_relu_or_gelu == 0 and model.use_nested_tensor is False
    tfkernels.unswap(model)
    assert (layer.activation_relu_or_gelu, model.use_nested_tensor) == before
    assert all(a is b for a, b in zip(model.modules(), originals))
    x, pad = _padded()
    with torch.no_grad():
        assert torch.equal(model(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad))
    m = _mixer()
    m_ref = copy.deepcopy(m)
    tfkernels.unswap(tfkernels.swap(m, backend=BACKEND))
    x = torch.randn(2, 3, 24, device=DEVICE)
    assert torch.equal(m(x), m_ref(x))
    assert tfkernels.unswap(m) is m  # unswapping an unswapped model is a no-op


def test_transformer_decoder_layer_and_seq_first_mha():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0).to(DEVICE).eval()
    ref = copy.deepcopy(dec)
    _, report = tfkernels.swap(dec, backend=BACKEND, return_report=True)
    assert {r[0] for r in report} >= {"self_attn", "multihead_attn", "norm1", "norm2", "norm3"}
    tgt, mem = torch.randn(5, 2, 16, device=DEVICE), torch.randn(7, 2, 16, device=DEVICE)  # (T, B, E)
    causal = nn.Transformer.generate_square_subsequent_mask(5, device=DEVICE)
    with torch.no_grad():
        _close(dec(tgt, mem, tgt_mask=causal), ref(tgt, mem, tgt_mask=causal), 2e-5, "decoder output")


def test_state_dict_round_trip():
    plain = _encoder()
    swapped = tfkernels.swap(copy.deepcopy(plain), backend=BACKEND)
    assert list(swapped.state_dict().keys()) == list(plain.state_dict().keys())

    other = _encoder()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(swapped.state_dict())  # swapped -> plain
    target = tfkernels.swap(_encoder(), backend=BACKEND)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    target.load_state_dict(plain.state_dict())  # plain -> swapped
    for n, t in plain.state_dict().items():
        assert torch.equal(other.state_dict()[n], t) and torch.equal(target.state_dict()[n], t), n


def test_optimizer_keeps_training_swapped_parameters():
    model = _mixer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    tfkernels.swap(model, backend=BACKEND)
    w0 = model.ln.weight.detach().clone()
    model(torch.randn(2, 3, 24, device=DEVICE)).square().sum().backward()
    opt.step()
    assert not torch.equal(model.ln.weight, w0)


def test_swap_then_torch_compile():
    model = _mixer()
    ref = copy.deepcopy(model)
    tfkernels.swap(model, backend=BACKEND)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 24, device=DEVICE, requires_grad=True)
    y = compiled(x)
    _close(y, ref(x), 1e-5, "compiled output")
    y.sum().backward()
    ref(x).sum().backward()
    g, g_ref = _grads(model), _grads(ref)
    for n in g:
        _close(g[n], g_ref[n], 1e-5, f"compiled grad {n}")


def test_convergence_plain_encoder():
    torch.manual_seed(0)
    head = nn.Linear(32, 5)
    enc = _encoder()
    del enc.layers[1:]  # one layer: the interpreter runs every kernel on CPU
    enc.num_layers = 1
    ref = nn.ModuleDict({"enc": enc, "head": head}).to(DEVICE).train()
    model = copy.deepcopy(ref)
    tfkernels.swap(model, backend=BACKEND)
    x, pad = _padded()
    x, pad = x[1:, :8], pad[1:, :8]  # small: the interpreter runs every kernel on CPU
    target = torch.randint(0, 5, (2,), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def run(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses = []
        for _ in range(12):
            h = m["enc"](x, src_key_padding_mask=pad)
            logits = m["head"]((h * (~pad)[..., None]).sum(1) / (~pad).sum(1, keepdim=True))
            loss = F.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref_losses, losses = run(ref), run(model)
    assert ref_losses[-1] < 0.5 * ref_losses[0]
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), f"step {i}: {a} vs {b}"


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        tfkernels.swap("not a model")
    with pytest.raises(TypeError, match="backend"):
        tfkernels.swap(nn.LayerNorm(4), backend=3)
    model = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="backend='bogus'"):  # at swap time, not at the first forward
        tfkernels.swap(model, backend="bogus")
    assert type(model[0]) is nn.LayerNorm  # nothing was replaced


def test_backend_name_is_read_as_the_ops_read_it():
    model = tfkernels.swap(nn.Sequential(nn.LayerNorm(4)), backend="TRITON")
    assert type(model[0]) is tnn.LayerNorm and model[0].backend == "triton"


def test_hooks_keep_firing_and_their_handles_still_remove_them():
    """Forward, pre-forward and full backward hooks on replaced modules stay registered (the
    replacement shares the hook tables): outputs stay the original model's, and a handle taken
    before the swap removes its hook after it."""
    model = _mixer()
    calls = []
    zero = model.ln.register_forward_hook(lambda m, i, o: torch.zeros_like(o))  # changes the output
    model.rms.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.sm.register_full_backward_hook(lambda m, gin, gout: calls.append("sm-backward"))
    x = torch.randn(3, 5, 24, device=DEVICE, requires_grad=True)
    want = model(x)
    want.sum().backward()
    tfkernels.swap(model, backend=BACKEND)
    assert type(model.ln) is tnn.LayerNorm and type(model.rms) is tnn.RMSNorm and type(model.sm) is tnn.Softmax
    calls.clear()
    got = model(x)
    got.sum().backward()
    assert calls == ["sm-backward"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    zero.remove()  # the handle from before the swap
    assert not model.ln._forward_hooks
    assert model(x).abs().sum() > 0 and not torch.allclose(model(x), want)


def test_parametrized_and_instance_forward_modules_are_left_alone(caplog):
    """A parametrized norm computes its weight at every access, so a replacement would freeze it;
    a forward set on the instance (accelerate's offload hooks do that) would be lost."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.LayerNorm(8), nn.RMSNorm(8), nn.LayerNorm(8), nn.LayerNorm(8))
    parametrize.register_parametrization(model[0], "weight", Double())
    parametrize.register_parametrization(model[1], "weight", Double())
    model[2].forward = lambda x: x  # noqa: E731 (what a hook library does)
    with caplog.at_level("WARNING", logger="tfkernels.swap"):
        tfkernels.swap(model, backend=BACKEND)
    assert [type(m) for m in model] == [type(model[0]), type(model[1]), nn.LayerNorm, tnn.LayerNorm]
    assert parametrize.is_parametrized(model[0]) and parametrize.is_parametrized(model[1])
    assert "parametrization" in caplog.text and "instance" in caplog.text


def test_import_is_cheap_and_works_without_transformers():
    code = (
        "import sys\n"
        "import tfkernels\n"
        "assert 'transformers' not in sys.modules, 'import tfkernels imported transformers'\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "import torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))\n"
        "_, rep = tfkernels.swap(m, backend='torch', return_report=True)\n"
        "assert type(m[1]).__module__ == 'tfkernels.nn', rep\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- CUDA: bf16 ---------------------------------------------------------------------------------

@pytest.mark.cuda
def test_transformer_encoder_bf16_cuda():
    ref = _encoder(dtype=torch.bfloat16)
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    oracle = copy.deepcopy(ref).float()
    x, pad = _padded(torch.bfloat16)
    keep = ~pad
    outs = {}
    for name, m in (("ref", ref), ("swap", model), ("oracle", oracle)):
        y = m(x.to(next(m.parameters()).dtype), src_key_padding_mask=pad)
        (y.float() * keep[..., None]).square().sum().backward()
        outs[name] = (y.detach().float(), _grads(m))
    for n, g in outs["oracle"][1].items():
        e_ref = (outs["ref"][1][n].float() - g).abs().max().item()
        e = (outs["swap"][1][n].float() - g).abs().max().item()
        assert e <= 2 * e_ref + 1e-2 * (1 + g.abs().max().item()), n
    e_ref = (outs["ref"][0] - outs["oracle"][0])[keep].abs().max().item()
    assert (outs["swap"][0] - outs["oracle"][0])[keep].abs().max().item() <= 2 * e_ref + 1e-2
