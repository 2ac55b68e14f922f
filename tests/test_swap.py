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
from tfkernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "triton"  # the interpreter on CPU (conftest sets TRITON_INTERPRET=1)


# ---- TEMPORARY stand-ins until the attention branch is merged -------------------------------------
# tfkernels.attention and tfkernels.nn.MultiheadAttention are written on another branch. Until it is
# merged, the reference attention (same contract) and a minimal MultiheadAttention built on
# tfkernels.attention stand in, so swap's own logic (replacement, fast-path switches, sharing) is
# tested now. After the merge the real ones are used and _ShimMHA can be deleted.

def _reference_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, *, backend=None):
    return reference.attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


class _ShimMHA(nn.MultiheadAttention):
    """Self-contained MultiheadAttention on tfkernels.attention (packed in-projection, no weights out)."""

    @classmethod
    def from_torch(cls, module, *, backend=None):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in module.__dict__.items()
                             if k not in ("_parameters", "_buffers", "_modules")})
        for k, v in module._parameters.items():
            new._parameters[k] = v
        for k, v in module._modules.items():
            new._modules[k] = v
        new.backend = backend
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, T, E = query.shape
        H = self.num_heads
        w, b = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(t, w_, b_) for t, w_, b_ in zip((query, key, value), w, b))
        q, k, v = (t.reshape(B, -1, H, E // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        mask = None
        if key_padding_mask is not None:  # True / -inf = ignore
            kpm = key_padding_mask
            mask = (torch.zeros(kpm.shape, dtype=q.dtype, device=q.device).masked_fill(kpm, float("-inf"))
                    if kpm.dtype == torch.bool else kpm.to(q.dtype))[:, None, None, :]
        if attn_mask is not None:
            am = (torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, float("-inf"))
                  if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype))
            mask = am if mask is None else mask + am
        out = tfkernels.attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                  backend=self.backend)  # (B, H, T, D)
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, E))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


@pytest.fixture(autouse=True)
def attention_calls(monkeypatch):
    """Counts calls to tfkernels.attention (and installs the temporary stand-ins when missing)."""
    fn = getattr(tfkernels, "attention", None) or _reference_attention
    if getattr(tnn, "MultiheadAttention", None) is None:
        monkeypatch.setattr(tnn, "MultiheadAttention", _ShimMHA, raising=False)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return fn(*args, **kwargs)

    monkeypatch.setattr(tfkernels, "attention", spy, raising=False)
    return calls


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
    g_ref, g = _grads(ref), _grads(model)
    assert g.keys() == g_ref.keys()
    for n in g:
        _close(g[n], g_ref[n], 1e-5, f"grad {n}")


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
    g_ref, g = _grads(ref), _grads(model)
    assert g.keys() == g_ref.keys()
    for n in g:
        _close(g[n], g_ref[n], 5e-5, f"grad {n}")


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
    ref = nn.ModuleDict({"enc": _encoder(), "head": head}).to(DEVICE).train()
    model = copy.deepcopy(ref)
    tfkernels.swap(model, backend=BACKEND)
    x, pad = _padded()
    target = torch.randint(0, 5, (3,), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def run(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses = []
        for _ in range(16):
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
