"""Fused attention against a float64 reference with SDPA's semantics: forward, dQ/dK/dV and d(mask)
with one shared random dO; causal and not, T_q < T_k and T_q > T_k, ragged lengths (1, 37, 91, 129:
1 is the degenerate row, 37/91 are not multiples of any block, 129 is one past a power of two),
head dims 16..256 incl. non-powers of two (40, 96, 160), GQA/MQA, every mask kind, dropout replayed
through the kernels' own keep mask, bad input, opcheck, torch.compile; MultiheadAttention against
torch's. CUDA-only tests apply FlashAttention's rule to fp16/bf16.
"""
import importlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tfkernels
from tfkernels import reference

from conftest import DEVICE, assert_attention_layout, assert_close, check_attention

attn_mod = importlib.import_module("tfkernels.ops.attention")  # the module (ops.attention is the function)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _check(q, k, v, backend, dtype=torch.float32, grad_scale=2.0, **kwargs):
    """Kernel vs float64 reference on the same values: out and every gradient (q, k, v, float mask)."""
    return check_attention(q, k, v, backend, dtype, grad_scale=grad_scale, **kwargs)


# (B, H_q, H_kv, T_q, T_k, D, is_causal): each line covers a length, a head dim and a regime
CASES = [
    (1, 2, 2, 1, 1, 16, False),  # single query, single key
    (1, 2, 2, 1, 37, 64, True),  # T_q=1 causal: the row sees key 0 only
    (2, 2, 2, 37, 37, 40, True),  # square causal, D=40
    (2, 1, 1, 37, 37, 40, False),
    (1, 2, 2, 37, 91, 96, False),  # T_q < T_k
    (1, 1, 1, 37, 91, 96, True),  # T_q < T_k causal: keys past T_q never seen
    (1, 2, 2, 91, 37, 128, True),  # T_q > T_k causal: rows past T_k see every key
    (1, 1, 1, 91, 37, 128, False),
    (1, 1, 1, 129, 129, 64, True),  # one past a block multiple
    (1, 2, 2, 129, 37, 16, False),
    (1, 1, 1, 17, 33, 160, False),  # D=160 (BLOCK_D 256, 96 padded lanes)
    (1, 1, 1, 20, 24, 256, True),  # the largest head dim
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}-{}_Tq{}_Tk{}_D{}{}".format(*c[:6], "_causal" if c[6] else ""))
def test_forward_backward_fp32(case, backend):
    B, Hq, Hkv, Tq, Tk, D, causal = case
    torch.manual_seed(hash(case) % 2**31)
    _check(_rand(B, Hq, Tq, D), _rand(B, Hkv, Tk, D), _rand(B, Hkv, Tk, D), backend, is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(2, 2, 2, 37, 45, 64, True), (1, 2, 1, 50, 33, 40, False)], ids=str)
def test_low_precision(case, dtype, backend):
    B, Hq, Hkv, Tq, Tk, D, causal = case
    torch.manual_seed(11)
    _check(_rand(B, Hq, Tq, D, dtype=dtype), _rand(B, Hkv, Tk, D, dtype=dtype), _rand(B, Hkv, Tk, D, dtype=dtype),
           backend, is_causal=causal, enable_gqa=Hq != Hkv, dtype=dtype, grad_scale=4.0)


@pytest.mark.parametrize("case", [(2, 4, 2, 37, 45, 32, True), (1, 4, 1, 33, 20, 16, False)], ids=["gqa_causal", "mqa"])
def test_gqa(case, backend):
    """dK/dV of a shared head sum over its group of query heads (looped in-kernel)."""
    B, Hq, Hkv, Tq, Tk, D, causal = case
    torch.manual_seed(12)
    _check(_rand(B, Hq, Tq, D), _rand(B, Hkv, Tk, D), _rand(B, Hkv, Tk, D), backend, is_causal=causal, enable_gqa=True)


def _masks(B, H, Tq, Tk):
    g = torch.Generator().manual_seed(13)
    lens = torch.tensor([Tk, Tk // 3])[:B]
    return {
        "key_padding_bool": (torch.arange(Tk)[None, :] < lens[:, None]).view(B, 1, 1, Tk),
        "full_bool": torch.rand(B, H, Tq, Tk, generator=g) > 0.4,
        "additive": torch.randn(1, H, Tq, Tk, generator=g) * 2,
        "additive_2d": torch.randn(Tq, Tk, generator=g),
        "additive_neg_inf": torch.where(torch.rand(B, 1, Tq, Tk, generator=g) > 0.3, 0.0, float("-inf")),
    }


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("kind", ["key_padding_bool", "full_bool", "additive", "additive_2d", "additive_neg_inf"])
def test_masks(kind, causal, backend):
    """Bool keeps True, float is added (and gets its gradient, summed over broadcast dims); masks
    combine with is_causal. Shapes 29 x 41 are ragged in both directions."""
    B, H, Tq, Tk, D = 2, 2, 29, 41, 32
    torch.manual_seed(14)
    mask = _masks(B, H, Tq, Tk)[kind].to(DEVICE)
    if kind == "additive_neg_inf":  # keep every row alive so the comparison stays finite
        mask[..., 0] = 0.0
    _check(_rand(B, H, Tq, D), _rand(B, H, Tk, D), _rand(B, H, Tk, D), backend, mask=mask, is_causal=causal)


def test_fully_masked_row_returns_zero(backend):
    """A query row with every key masked returns 0 and gets 0 gradient (documented behaviour)."""
    B, H, Tq, Tk, D = 1, 2, 21, 37, 16
    torch.manual_seed(15)
    mask = torch.rand(B, H, Tq, Tk, device=DEVICE) > 0.5
    mask[:, :, 3] = False
    mask[:, 1, 20] = False  # the last, ragged row too
    q = _rand(B, H, Tq, D).requires_grad_(True)
    out = _check(q, _rand(B, H, Tk, D), _rand(B, H, Tk, D), backend, mask=mask)
    assert (out[:, :, 3] == 0).all() and (out[:, 1, 20] == 0).all()
    # the same with an additive -inf mask, combined with causal
    fmask = torch.zeros(B, H, Tq, Tk, device=DEVICE)
    fmask[:, :, 5, :6] = float("-inf")  # causal leaves keys 0..5 for row 5: all gone
    out = tfkernels.attention(_rand(B, H, Tq, D), _rand(B, H, Tk, D), _rand(B, H, Tk, D), fmask, is_causal=True,
                              backend=backend)
    assert (out[:, :, 5] == 0).all() and torch.isfinite(out).all()


def test_batch_and_single_head_broadcast_like_sdpa(backend):
    """SDPA broadcasts batch dims (one K/V batch for every query batch, and the reverse) and a single
    K/V head over q's heads without enable_gqa; so does tfkernels.attention (stride-0 views), with
    the gradients of the broadcast inputs summed."""
    torch.manual_seed(22)
    _check(_rand(3, 2, 13, 16), _rand(1, 2, 17, 16), _rand(1, 2, 17, 16), backend, is_causal=True)
    _check(_rand(2, 4, 13, 16), _rand(2, 1, 17, 16), _rand(1, 1, 17, 16), backend)  # MQA by broadcast
    q, k, v = _rand(1, 2, 5, 8), _rand(2, 2, 6, 8), _rand(2, 2, 6, 8)  # the output takes k's batch
    assert_close(tfkernels.attention(q, k, v, backend=backend),
                 F.scaled_dot_product_attention(q.double(), k.double(), v.double()), torch.float32)
    q5 = _rand(2, 3, 2, 5, 8)  # (N, ..., H, T, D) with broadcast leading dims
    k5, v5 = _rand(1, 3, 2, 6, 8), _rand(2, 1, 2, 6, 8)
    assert_close(tfkernels.attention(q5, k5, v5, backend=backend),
                 F.scaled_dot_product_attention(q5.double(), k5.double(), v5.double()), torch.float32)


def test_autocast_casts_like_sdpa(backend):
    """Under torch.autocast, SDPA casts fp32 (and mixed fp32/bf16) q, k, v to the autocast dtype; so
    does tfkernels.attention, instead of rejecting the mix."""
    torch.manual_seed(21)
    q, k, v = _rand(1, 2, 9, 16), _rand(1, 2, 11, 16, dtype=torch.bfloat16), _rand(1, 2, 11, 16)
    want = tfkernels.attention(q.bfloat16(), k, v.bfloat16(), is_causal=True, backend=backend)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = tfkernels.attention(q, k, v, is_causal=True, backend=backend)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.dtype == sdpa.dtype == torch.bfloat16
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="k has dtype"):  # outside autocast the mix is still an error
        tfkernels.attention(q, k, v, backend=backend)


def test_custom_scale(backend):
    torch.manual_seed(16)
    _check(_rand(1, 2, 33, 48), _rand(1, 2, 40, 48), _rand(1, 2, 40, 48), backend, scale=0.37, is_causal=True)
    # numpy scalars, as SDPA takes them (a config's np.float32, np.sqrt of a head dim)
    q, k, v = _rand(1, 2, 9, 16), _rand(1, 2, 11, 16), _rand(1, 2, 11, 16)
    want = tfkernels.attention(q, k, v, scale=0.25, backend=backend)
    assert torch.equal(tfkernels.attention(q, k, v, scale=np.float32(0.25), backend=backend), want)
    assert torch.equal(tfkernels.attention(q, k, v, scale=1 / np.sqrt(np.float64(16)), backend=backend), want)
    torch.manual_seed(3)
    a = tfkernels.attention(q, k, v, dropout_p=np.float32(0.5), backend=backend)
    torch.manual_seed(3)
    assert torch.equal(a, tfkernels.attention(q, k, v, dropout_p=0.5, backend=backend))


def test_non_contiguous_and_expanded(backend):
    """q/k/v from a (B, T, H, D) projection (transposed views), k expanded over heads (stride 0), and
    the stride-0 gradient that sum() produces."""
    torch.manual_seed(17)
    B, H, Tq, Tk, D = 2, 3, 37, 30, 40
    q = _rand(B, Tq, H, D).transpose(1, 2)
    k = _rand(B, 1, Tk, D).expand(B, H, Tk, D)
    v = _rand(B, Tk, H, D).transpose(1, 2)
    _check(q, k, v, backend, is_causal=True)
    # the window's masked and skipped blocks read the same strided, stride-0 inputs
    _check(q, k, v, backend, is_causal=True, window_size=(9, 0), softcap=2.0)
    _check(q, k, v, backend, window_size=(5, 17))
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    tfkernels.attention(qq, kk, vv, backend=backend).sum().backward()
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference.attention(*ref).sum().backward()
    for a, r in zip((qq, kk, vv), ref):
        assert_close(a.grad, r.grad, torch.float32, scale=2.0)


def test_output_and_gradient_layouts(backend):
    """The kernels write out, dq, dk and dv in their inputs' order of heads and time (_like_layout): for
    q from a (B, T, H, D) projection the caller's out.transpose(1, 2).reshape(B, T, H * D) is a view,
    not a copy, and each gradient comes back in its input's order; contiguous (B, H, T, D) inputs get
    contiguous results. The fake implementations (torch.compile) predict the same strides as the
    real ones, and the values still match the reference."""
    torch.manual_seed(29)
    ops = torch.ops.tfkernels
    B, H, Hkv, T, D = 2, 4, 2, 23, 16
    q = _rand(B, T, H, D).transpose(1, 2).requires_grad_(True)  # a (B, T, H, D) projection's view
    k = _rand(B, Hkv, T, D).requires_grad_(True)  # contiguous (B, H, T, D)
    v = _rand(B, T, Hkv, D).transpose(1, 2).requires_grad_(True)
    out = tfkernels.attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
    assert_attention_layout(out, q, "out")
    y = out.transpose(1, 2).reshape(B, T, H * D)
    assert y.data_ptr() == out.data_ptr()  # a view: the model's re-layout costs nothing
    dq, dk, dv = torch.autograd.grad(y, (q, k, v), torch.randn_like(y))
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert_attention_layout(g, like, name)
    check_attention(q, k, v, backend, torch.float32, is_causal=True, enable_gqa=True)  # the values
    # the ops themselves, real against fake, forward and backward
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = lambda q, k, v: (q, k, v, None, None, None, 0.0, None, True, 0.25, -1, -1, 0.0, backend)  # noqa: E731
    qd, kd, vd = (t.detach() for t in (q, k, v))
    real = ops.attention_fwd(*args(qd, kd, vd))
    dout = torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2)
    bwd_args = lambda dout, q, k, v, o, lse: (dout, q, k, v, None, None, None, o, lse, None, 0.0, None, True, 0.25,  # noqa: E731
                                              -1, -1, 0.0, False, backend)
    real_bwd = ops.attention_bwd(*bwd_args(dout, qd, kd, vd, *real))
    with FakeTensorMode() as mode:
        fq, fk, fv, fdo = (mode.from_tensor(t) for t in (qd, kd, vd, dout))
        fake = ops.attention_fwd(*args(fq, fk, fv))
        fake_bwd = ops.attention_bwd(*bwd_args(fdo, fq, fk, fv, *fake))
    for r, f in zip((*real, *real_bwd[:3]), (*fake, *fake_bwd[:3])):
        assert r.shape == f.shape and r.stride() == f.stride()
    torch.library.opcheck(ops.attention_fwd.default, args(q, k, v))


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------

def test_dropout_reproducible(backend):
    torch.manual_seed(18)
    q, k, v = _rand(1, 2, 37, 32), _rand(1, 2, 45, 32), _rand(1, 2, 45, 32)
    torch.manual_seed(123)
    a = tfkernels.attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(123)
    b = tfkernels.attention(q, k, v, dropout_p=0.3, backend=backend)
    c = tfkernels.attention(q, k, v, dropout_p=0.3, backend=backend)  # the generator moved on
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, tfkernels.attention(q, k, v, backend=backend))


def test_dropout_statistics(backend):
    """Keep rate 1-p, and E[out] = out without dropout (mean preserved by the 1/(1-p) rescale)."""
    p = 0.25
    B, H, Tq, Tk, D = 2, 2, 64, 80, 16
    keep = attn_mod._dropout_mask(987654, B, H, Tq, Tk, p, device=DEVICE)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, rate  # 5 sigma
    # q = 0 makes P uniform; v = 1 then makes every output 1 without dropout
    q = torch.zeros(B, H, Tq, D, device=DEVICE)
    k, v = _rand(B, H, Tk, D), torch.ones(B, H, Tk, D, device=DEVICE)
    torch.manual_seed(19)
    out = tfkernels.attention(q, k, v, dropout_p=p, backend=backend)
    mean = out.mean().item()
    assert abs(mean - 1.0) < 0.03, mean
    assert out.std().item() > 0.01  # it did drop something


def _philox_uniform(seed: int, offset: int) -> np.float32:
    """The dropout contract written out in plain Python: Philox-4x32, 10 rounds, key (lo, hi) of the
    seed, counter (lo, hi, 0, 0) of the offset; c0 as int32 (negatives to -x - 1) times 2^-31."""
    m32 = 0xFFFFFFFF
    c0, c1, c2, c3 = offset & m32, (offset >> 32) & m32, 0, 0
    k0, k1 = seed & m32, (seed >> 32) & m32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & m32, (p0 >> 32) ^ c3 ^ k1, p0 & m32
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    x = c0 - (1 << 32) if c0 >> 31 else c0
    return np.float32(-x - 1 if x < 0 else x) * np.float32(4.6566127342e-10)


def test_dropout_stream_is_the_contract():
    """The keep mask is a fixed function of (seed, offset), whatever Triton is installed (3.2's
    tl.rand drew another stream for int64 offsets); the cuda backend's tests check that it matches
    the Triton kernels. Offsets past 2^32 (B*H*T_q*T_k > 4G elements) use the counter's high word;
    seeds past 2^32 the key's."""
    p = 0.5
    for seed, base in [(987654, 0), (2**31 - 2, 5 * 2**32 - 40), (2**40 + 12345, 3 * 2**32 + 7)]:
        got = attn_mod._dropout_keep_at(seed, base, 64, p, device=DEVICE).cpu().tolist()
        want = [bool(_philox_uniform(seed, base + i) >= p) for i in range(64)]
        assert got == want, (seed, base)


@pytest.mark.parametrize("case", [(1, 2, 2, 37, 45, 32, False), (1, 4, 2, 29, 37, 40, True)], ids=["plain", "gqa_causal"])
def test_dropout_backward_replayed(case, backend):
    """The kernels' keep mask, materialised by _dropout_mask for the seed a call draws, replayed in
    the reference: forward and every gradient must match (the backward regenerates the mask)."""
    if backend != "triton":
        pytest.skip("the keep-mask helper replays the Triton kernels' RNG")
    B, Hq, Hkv, Tq, Tk, D, causal = case
    p = 0.3
    torch.manual_seed(20)
    q, k, v = _rand(B, Hq, Tq, D), _rand(B, Hkv, Tk, D), _rand(B, Hkv, Tk, D)
    torch.manual_seed(77)
    seed = int(attn_mod._draw_seed().item())
    keep = attn_mod._dropout_mask(seed, B, Hq, Tq, Tk, p, device=DEVICE)
    mask = torch.randn(1, Hq, Tq, Tk, device=DEVICE)
    _check(q, k, v, backend, mask=mask, is_causal=causal, enable_gqa=Hq != Hkv, dropout_p=p, dropout_mask=keep,
           seed=77)


# ---------------------------------------------------------------------------------------------
# sliding window, soft-capping, dropout_p = 1
# ---------------------------------------------------------------------------------------------

# (T_q, T_k, window_size, is_causal): lower edge only, upper edge only, both, zero width, wider than
# the sequence, and the Mistral form (W - 1, 0) + causal; T_q != T_k both ways. The lengths span
# several 16-row tiles (the interpreter's), so whole tiles are skipped and both edges cross tiles.
WINDOW_CASES = [
    (53, 53, (7, -1), False),
    (53, 53, (-1, 5), False),
    (37, 61, (3, 20), False),
    (61, 37, (17, 2), False),
    (53, 53, (0, 0), False),
    (53, 53, (15, 0), True),
    (37, 61, (9, 3), True),
    (61, 37, (-1, 4), True),  # causal wins over the wider right side
    (45, 45, (100, 100), False),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "Tq{}_Tk{}_w{}_{}{}".format(c[0], c[1], *c[2], "causal" if c[3] else "plain"))
def test_window(case, backend):
    Tq, Tk, window, causal = case
    torch.manual_seed(40)
    q, k, v = _rand(2, 2, Tq, 32), _rand(2, 1, Tk, 32), _rand(2, 1, Tk, 32)
    _check(q, k, v, backend, is_causal=causal, window_size=window, enable_gqa=True)


def test_window_empty_rows(backend):
    """With a left window and T_q > T_k + left, rows past the last key see nothing: output 0 and zero
    gradients, as for fully masked rows, and no NaN (those rows' first tile is all -inf)."""
    torch.manual_seed(41)
    q, k, v = _rand(1, 2, 70, 16), _rand(1, 2, 20, 16), _rand(1, 2, 20, 16)
    out = _check(q, k, v, backend, window_size=(5, 5))
    assert torch.all(out[:, :, 26:] == 0) and torch.all(out[:, :, :25].abs().sum(-1) > 0)


def test_window_matches_mask(backend):
    """A window is the same as the equivalent bool mask (what Hugging Face builds for Mistral)."""
    torch.manual_seed(42)
    Tq = Tk = 45
    q, k, v = _rand(1, 2, Tq, 32), _rand(1, 2, Tk, 32), _rand(1, 2, Tk, 32)
    i, j = torch.arange(Tq, device=DEVICE)[:, None], torch.arange(Tk, device=DEVICE)[None, :]
    mask = (j <= i) & (j > i - 8)
    a = tfkernels.attention(q, k, v, is_causal=True, window_size=(7, 0), backend=backend)
    b = tfkernels.attention(q, k, v, attn_mask=mask, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_window_softcap_low_precision(dtype, backend):
    torch.manual_seed(43)
    q, k, v = (_rand(1, 4, 50, 64, dtype=dtype), _rand(1, 2, 58, 64, dtype=dtype), _rand(1, 2, 58, 64, dtype=dtype))
    _check(q, k, v, backend, dtype=dtype, is_causal=True, window_size=(12, 0), softcap=3.0, scale=0.5, enable_gqa=True)


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_softcap(causal, backend):
    """scale 1.0 on D = 40 makes scores of size ~6, so a cap of 2.5 bites (tanh saturates)."""
    torch.manual_seed(44)
    q, k, v = _rand(2, 2, 37, 40), _rand(2, 2, 45, 40), _rand(2, 2, 45, 40)
    _check(q, k, v, backend, is_causal=causal, softcap=2.5, scale=1.0)


def test_softcap_with_float_mask_gradient(backend):
    """The mask is added after capping (Gemma 2's order): its gradient is dS of the capped scores,
    while dq/dk carry the extra (1 - tanh^2) factor."""
    torch.manual_seed(45)
    q, k, v = _rand(1, 2, 29, 32), _rand(1, 2, 35, 32), _rand(1, 2, 35, 32)
    mask = torch.randn(1, 2, 29, 35, device=DEVICE)
    _check(q, k, v, backend, mask=mask, softcap=1.5, scale=0.8, window_size=(10, 10))


def test_softcap_is_off_at_zero_and_saturates(backend):
    torch.manual_seed(46)
    q, k, v = _rand(1, 1, 20, 16), _rand(1, 1, 20, 16), _rand(1, 1, 20, 16)
    plain = tfkernels.attention(q, k, v, backend=backend)
    torch.testing.assert_close(tfkernels.attention(q, k, v, softcap=0.0, backend=backend), plain)
    # a cap far above every score changes nothing measurable, up to fp32's limit (1e35, 3e38: off)
    for cap in (1e4, 1e6, 1e35, 3e38):
        torch.testing.assert_close(tfkernels.attention(q, k, v, softcap=cap, backend=backend), plain,
                                   rtol=2e-5, atol=1e-5, msg=f"softcap={cap}")


def test_softcap_large_cap_accuracy(backend):
    """A large cap makes every tanh argument small, where 1 - exp(-2x) cancels: the kernels' tanh
    must stay accurate there (fp32 tolerances against float64, every gradient)."""
    torch.manual_seed(49)
    q, k, v = _rand(1, 2, 23, 16), _rand(1, 2, 29, 16), _rand(1, 2, 29, 16)
    for cap in (1e3, 1e5):
        _check(q, k, v, backend, softcap=cap, scale=1.0)


def test_window_wider_than_the_sequence(backend):
    """Sides reaching past every key are no bound: huge values (2**31 - 1 or beyond int64, as
    "unbounded") give the unwindowed result instead of overflowing the kernels' int32 bounds."""
    torch.manual_seed(50)
    q, k, v = (_rand(1, 2, 40, 16).requires_grad_(True) for _ in range(3))
    for causal, windows in ((True, [(2**31 - 1, 0), (2**63 + 5, 2**40)]),
                            (False, [(-1, 2**31 - 1), (2**31 - 1, -1), (2**64, 2**64), (39, 39)])):
        want = tfkernels.attention(q, k, v, is_causal=causal, backend=backend)
        dwant = torch.autograd.grad(want.sum(), (q, k, v))
        for w in windows:
            got = tfkernels.attention(q, k, v, is_causal=causal, window_size=w, backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"window {w}")
            for g, d in zip(torch.autograd.grad(got.sum(), (q, k, v)), dwant):
                torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-6, msg=f"window {w}")
    # a large finite window next to a narrow one: the kernels' bounds stay in range
    _check(q, k, v, backend, window_size=(10, 2**31 - 30))


def test_softcap_checked_under_compile(backend):
    """Under torch.compile (where attention() cannot check a possibly symbolic float) the op checks
    the softcap it runs with, as eager does; a valid one still traces with dynamic=True."""
    torch._dynamo.reset()
    q = _rand(1, 1, 8, 16)
    for bad in (-1.0, float("inf")):
        fn = torch.compile(lambda q, c: tfkernels.attention(q, q, q, softcap=c, backend=backend), fullgraph=True,
                           backend="aot_eager")
        with pytest.raises(Exception, match="softcap"):
            fn(q, bad)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, c: tfkernels.attention(q, q, q, softcap=c, backend=backend), fullgraph=True,
                       dynamic=True, backend="aot_eager")
    assert_close(fn(q, 2.0), tfkernels.attention(q, q, q, softcap=2.0, backend=backend).double(), torch.float32)


def test_window_dropout_replayed(backend):
    if backend != "triton":
        pytest.skip("the keep-mask helper replays the Triton kernels' RNG")
    B, Hq, Tq, Tk, D, p = 1, 2, 41, 47, 32, 0.25
    torch.manual_seed(47)
    q, k, v = _rand(B, Hq, Tq, D), _rand(B, Hq, Tk, D), _rand(B, Hq, Tk, D)
    torch.manual_seed(78)
    keep = attn_mod._dropout_mask(int(attn_mod._draw_seed().item()), B, Hq, Tq, Tk, p, device=DEVICE)
    _check(q, k, v, backend, is_causal=True, window_size=(9, 0), softcap=2.0, dropout_p=p, dropout_mask=keep, seed=78)


# SDPA's attn_mask=causal_lower_right(T_q, T_k) / causal_upper_left: (T_q, T_k, window, variant). A
# decoding step (T_q = 1) and a prefill chunk over a KV cache, square, and T_q > T_k (the first
# T_q - T_k queries see nothing); with windows in the query's own coordinates, one of which leaves
# no query anything to see.
CAUSAL_BIAS_CASES = [
    (1, 45, None, "lower_right"),
    (19, 53, None, "lower_right"),
    (37, 37, None, "lower_right"),
    (53, 21, None, "lower_right"),
    (19, 53, (30, -1), "lower_right"),
    (19, 53, (40, 10), "lower_right"),
    (53, 21, (40, 3), "lower_right"),
    (53, 21, (20, -1), "lower_right"),
    (19, 53, None, "upper_left"),
]


@pytest.mark.parametrize("case", CAUSAL_BIAS_CASES, ids=lambda c: "Tq{}_Tk{}_w{}_{}".format(*c))
def test_causal_bias(case, backend):
    from torch.nn.attention import bias as sdpa_bias

    Tq, Tk, window, variant = case
    torch.manual_seed(51)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that SDPA may give NaN for T_q > T_k (we give 0)
        bias = getattr(sdpa_bias, f"causal_{variant}")(Tq, Tk)
    q, k, v = _rand(2, 2, Tq, 32), _rand(2, 1, Tk, 32), _rand(2, 1, Tk, 32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = tfkernels.attention(*leaves, attn_mask=bias, window_size=window, enable_gqa=True, backend=backend)
    assert type(out) is torch.Tensor and out.shape == (2, 2, Tq, 32)
    i, j = torch.arange(Tq, device=DEVICE)[:, None], torch.arange(Tk, device=DEVICE)[None, :]
    visible = j <= i + (Tk - Tq if variant == "lower_right" else 0)  # the bias, written out
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = reference.attention(*ref_leaves, attn_mask=visible, window_size=window, enable_gqa=True)
    assert_close(out, ref, torch.float32, "out")
    dout = torch.randn_like(out)
    for name, g, r in zip("qkv", torch.autograd.grad(out, leaves, dout),
                          torch.autograd.grad(ref, ref_leaves, dout.double())):
        assert_close(g, r, torch.float32, f"d{name}", scale=2.0)
    left, right = window or (-1, -1)
    seen = (visible & ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))).any(-1)
    assert torch.all(out[:, :, ~seen] == 0) and torch.all(out[:, :, seen].abs().sum(-1) > 0)
    if window is None:  # SDPA itself, on the rows it defines: its math backend, which materialises the
        # bias (on CUDA its memory-efficient kernel gets the lower-right rows wrong when T_q > T_k)
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH):
            warnings.simplefilter("ignore")
            sdpa = F.scaled_dot_product_attention(q, k.expand(2, 2, Tk, 32), v.expand(2, 2, Tk, 32), attn_mask=bias)
        torch.testing.assert_close(out[:, :, seen], sdpa[:, :, seen], rtol=1e-4, atol=1e-5)


def test_causal_bias_errors():
    from torch.nn.attention.bias import causal_lower_right

    q, k = _rand(1, 1, 4, 16), _rand(1, 1, 6, 16)
    assert type(tfkernels.attention(q, k, k, attn_mask=causal_lower_right(4, 6), backend="torch")) is torch.Tensor
    with pytest.raises(ValueError, match="is_causal"):
        tfkernels.attention(q, k, k, attn_mask=causal_lower_right(4, 6), is_causal=True)
    with pytest.raises(ValueError, match="CausalBias for T_q=4, T_k=5"):
        tfkernels.attention(q, k, k, attn_mask=causal_lower_right(4, 5))


# return_lse=True: (T_q, T_k, window, softcap, is_causal, mask): plain, causal, window + softcap, rows
# that see nothing (past the window: lse = -inf), a float mask (with its gradient), a bool mask with a
# fully masked row.
LSE_CASES = [
    (37, 45, None, 0.0, False, None),
    (45, 45, None, 0.0, True, None),
    (40, 40, (5, 5), 2.0, False, None),
    (61, 20, (5, 5), 0.0, False, None),
    (29, 35, None, 0.0, True, "float"),
    (29, 35, None, 0.0, False, "bool"),
]


@pytest.mark.parametrize("case", LSE_CASES, ids=lambda c: "Tq{}_Tk{}_w{}_cap{}_causal{}_{}".format(*c))
def test_return_lse(case, backend):
    """lse against float64 (-inf exactly where a row sees nothing), and the gradients of a loss that uses
    both outputs: d lse / d scores = P enters the kernels' backward as delta - dlse."""
    Tq, Tk, window, softcap, causal, mask_kind = case
    torch.manual_seed(52)
    q, k, v = _rand(2, 2, Tq, 32), _rand(2, 1, Tk, 32), _rand(2, 1, Tk, 32)
    mask = None
    if mask_kind == "float":
        mask = torch.randn(1, 2, Tq, Tk, device=DEVICE)
    elif mask_kind == "bool":
        mask = torch.rand(Tq, Tk, device=DEVICE) > 0.3
        mask[3] = False
    kw = dict(is_causal=causal, window_size=window, softcap=softcap, enable_gqa=True, scale=0.3)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)] + ([mask.clone().requires_grad_(True)]
                                                                     if mask_kind == "float" else [])
    ref_leaves = [t.double().requires_grad_(True) for t in leaves]
    m, rm = (leaves[3], ref_leaves[3]) if mask_kind == "float" else (mask, mask)
    out, lse = tfkernels.attention(*leaves[:3], attn_mask=m, return_lse=True, backend=backend, **kw)
    ref, ref_lse = reference.attention(*ref_leaves[:3], attn_mask=rm, return_lse=True, **kw)
    assert lse.shape == (2, 2, Tq) and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(ref_lse).cpu()) and not torch.isposinf(lse).any()
    if torch.isneginf(ref_lse).any():
        assert torch.all(out[torch.isneginf(lse)] == 0)
    finite = lambda t: torch.where(torch.isinf(t), 0.0, t)  # noqa: E731
    assert_close(finite(lse), finite(ref_lse), torch.float32, "lse")
    assert_close(out, ref, torch.float32, "out")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (finite(lse) * dlse).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * dout.double()).sum() + (finite(ref_lse) * dlse.double()).sum(), ref_leaves)
    for name, g, r in zip(["dq", "dk", "dv", "dmask"], grads, ref_grads):
        assert_close(g, r, torch.float32, name, scale=2.0)
    # only lse used: out's gradient is absent (None or zeros) and nothing breaks
    out, lse = tfkernels.attention(*leaves[:3], attn_mask=m, return_lse=True, backend=backend, **kw)
    g = torch.autograd.grad((finite(lse) * dlse).sum(), leaves[0])[0]
    r = torch.autograd.grad((finite(reference.attention(*ref_leaves[:3], attn_mask=rm, return_lse=True, **kw)[1])
                             * dlse.double()).sum(), ref_leaves[0])[0]
    assert_close(g, r, torch.float32, "dq (lse only)", scale=2.0)


def test_return_lse_non_contiguous_and_expanded(backend):
    """lse and its gradient with q a transposed view of (B, T, H, D), k broadcast over the batch
    (stride 0) and v sliced from a wider tensor; odd lengths, a head dim of 24, causal with T_q < T_k."""
    torch.manual_seed(54)
    q = _rand(2, 37, 2, 24).transpose(1, 2).requires_grad_(True)
    k0 = _rand(1, 2, 53, 24).requires_grad_(True)
    v0 = _rand(2, 2, 53, 40).requires_grad_(True)
    k, v = k0.expand(2, 2, 53, 24), v0[..., 5:29]
    assert not q.is_contiguous() and k.stride(0) == 0 and not v.is_contiguous()
    out, lse = tfkernels.attention(q, k, v, is_causal=True, return_lse=True, backend=backend)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k0, v0)]
    ref, ref_lse = reference.attention(leaves[0], leaves[1].expand(2, 2, 53, 24), leaves[2][..., 5:29],
                                       is_causal=True, return_lse=True)
    assert_close(lse, ref_lse, torch.float32, "lse")
    assert_close(out, ref, torch.float32, "out")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k0, v0))
    ref_grads = torch.autograd.grad((ref * dout.double()).sum() + (ref_lse * dlse.double()).sum(), leaves)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, torch.float32, name, scale=2.0)


def test_lse_merges_key_chunks(backend):
    """What return_lse is for: attention over two halves of the keys, merged by their lse, is
    attention over all keys, forward and backward (ring / split-KV attention)."""
    torch.manual_seed(53)
    q, k, v = (_rand(1, 2, 33, 32).requires_grad_(True), _rand(1, 2, 50, 32).requires_grad_(True),
               _rand(1, 2, 50, 32).requires_grad_(True))
    full = tfkernels.attention(q, k, v, softcap=3.0, backend=backend)
    o1, l1 = tfkernels.attention(q, k[:, :, :21], v[:, :, :21], softcap=3.0, return_lse=True, backend=backend)
    o2, l2 = tfkernels.attention(q, k[:, :, 21:], v[:, :, 21:], softcap=3.0, return_lse=True, backend=backend)
    lse = torch.logaddexp(l1, l2)
    merged = (torch.exp(l1 - lse)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(full)
    for g, want in zip(torch.autograd.grad(merged, (q, k, v), dout), torch.autograd.grad(full, (q, k, v), dout)):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


def test_return_lse_layouts_and_reference_backend():
    """lse follows SDPA's extra leading dims, a causal_lower_right with T_q > T_k (-inf on the rows that
    see nothing), and the torch backend (float32 lse for fp32 inputs)."""
    from torch.nn.attention.bias import causal_lower_right

    q, k = _rand(3, 2, 4, 9, 16), _rand(3, 2, 4, 6, 16)
    out, lse = tfkernels.attention(q, k, k, return_lse=True, backend="torch")
    assert out.shape == (3, 2, 4, 9, 16) and lse.shape == (3, 2, 4, 9) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, (q @ k.transpose(-1, -2) / 4).logsumexp(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bias = causal_lower_right(9, 6)
    out, lse = tfkernels.attention(q[0], k[0], k[0], attn_mask=bias, return_lse=True, backend="torch")
    assert torch.isneginf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all() and lse.shape == (2, 4, 9)
    with pytest.raises(TypeError, match="return_lse"):
        tfkernels.attention(q, k, k, return_lse=1)


# (H_q, H_kv, T_q, T_k, E, Ev, extras): v's head dim differs from q's and k's, as SDPA allows
VALUE_DIM_CASES = [
    (2, 2, 37, 45, 64, 32, dict(is_causal=True)),  # Ev < E: v padded, the output sliced
    (4, 2, 29, 33, 32, 48, dict(enable_gqa=True, window_size=(5, 2))),  # Ev > E: q and k padded, GQA
    (2, 1, 20, 20, 40, 24, dict(mask="additive", softcap=10.0, scale=0.3)),  # a float mask's gradient
]


@pytest.mark.parametrize("case", VALUE_DIM_CASES, ids=["ev_lt_e", "ev_gt_e_gqa_window", "mask_softcap"])
def test_value_head_dim_differs(case, backend):
    Hq, Hkv, Tq, Tk, E, Ev, extras = case
    extras = dict(extras)
    if extras.pop("mask", None):
        extras["mask"] = _rand(1, Hq, Tq, Tk)
    _check(_rand(2, Hq, Tq, E), _rand(2, Hkv, Tk, E), _rand(2, Hkv, Tk, Ev), backend, **extras)


def test_value_head_dim_differs_lse_and_half(backend):
    """The lse is the unpadded one; low precision and SDPA itself agree on the values."""
    q, k, v = _rand(1, 2, 21, 96, dtype=torch.bfloat16), _rand(1, 2, 30, 96, dtype=torch.bfloat16), \
        _rand(1, 2, 30, 64, dtype=torch.bfloat16)
    out, lse = tfkernels.attention(q, k, v, is_causal=True, return_lse=True, backend=backend)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), is_causal=True, return_lse=True)
    assert_close(out, ref, torch.bfloat16, "out")
    assert_close(lse, ref_lse, torch.bfloat16, "lse")
    assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True),
                 torch.bfloat16, "sdpa")


def test_dropout_one_drops_everything(backend):
    """dropout_p = 1 as in SDPA: output 0 and zero gradients (the kernels' kept scale 1/(1-p) would be inf)."""
    torch.manual_seed(48)
    q, k, v = (_rand(1, 2, 19, 16).requires_grad_(True) for _ in range(3))
    mask = torch.randn(1, 2, 19, 19, device=DEVICE, requires_grad=True)
    out = tfkernels.attention(q, k, v, attn_mask=mask, dropout_p=1.0, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, (q, k, v, mask), torch.randn_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    # SDPA's math backend (its definition; its CUDA memory-efficient kernel returns NaN at p = 1)
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, dropout_p=1.0), out)


# ---------------------------------------------------------------------------------------------
# document_ids: packed sequences
# ---------------------------------------------------------------------------------------------

def _doc_ids(lengths, T, pad=-1):
    """(T,) int64 ids: documents of the given lengths back to back, `pad` after them; a negative
    length is that many padding tokens in place (padding between documents)."""
    ids, d = [], 0
    for n in lengths:
        if n < 0:
            ids += [pad] * -n
        else:
            ids += [d] * n
            d += 1
    ids += [pad] * (T - len(ids))
    assert len(ids) == T
    return torch.tensor(ids, device=DEVICE)


# (B, H_q, H_kv, T_q, T_k, per-row document lengths (T_q == T_k: one list for both; else q, k
# lists), is_causal, window, mask kind, D): documents shorter and longer than a block, crossing
# blocks, padding at the end / start / between documents, one document, all padding, T_q != T_k.
DOC_CASES = [
    (2, 2, 2, 53, 53, [[20, 17, 10], [5, 40]], True, None, None, 24),
    (2, 2, 2, 53, 53, [[20, 17, 10], [5, 40]], False, None, None, 24),
    (1, 4, 2, 70, 70, [[-7, 33, 30]], True, None, None, 32),  # padding first, GQA
    (1, 2, 2, 61, 61, [[16, -16, 16, 3]], True, None, None, 16),  # padding between documents
    (2, 2, 1, 45, 45, [[45], [-45]], True, None, None, 16),  # one document; all padding
    (1, 2, 2, 67, 67, [[30, 37]], True, (9, 0), None, 40),  # a sliding window inside documents
    (1, 2, 2, 50, 50, [[12, 25, 13]], False, None, "float", 16),  # a float mask and its gradient
    (1, 2, 2, 50, 50, [[12, 25, 13]], True, None, "bool", 16),
    (1, 2, 2, 37, 59, [[10, 27], [25, 30, 4]], False, None, None, 24),  # T_q < T_k, ids per side
    (1, 2, 2, 59, 37, [[30, 29], [20, 17]], True, None, None, 24),  # T_q > T_k
]


@pytest.mark.parametrize("case", DOC_CASES, ids=lambda c: "Tq{}_Tk{}_{}{}{}_{}".format(
    c[3], c[4], "causal" if c[6] else "plain", "_win" if c[7] else "", f"_{c[8]}" if c[8] else "", len(c[5])))
def test_documents(case, backend):
    B, Hq, Hkv, Tq, Tk, lengths, causal, window, mask_kind, D = case
    torch.manual_seed(61)
    if Tq == Tk:
        ids = torch.stack([_doc_ids(lengths[b % len(lengths)], Tq) for b in range(B)])
    else:
        ids = (torch.stack([_doc_ids(lengths[0], Tq)] * B), torch.stack([_doc_ids(lengths[1], Tk)] * B))
    mask = None
    if mask_kind == "float":
        mask = torch.randn(1, Hq, Tq, Tk, device=DEVICE)
    elif mask_kind == "bool":
        mask = torch.rand(B, 1, Tq, Tk, device=DEVICE) > 0.3
    out = _check(_rand(B, Hq, Tq, D), _rand(B, Hkv, Tk, D), _rand(B, Hkv, Tk, D), backend, is_causal=causal,
                 enable_gqa=Hq != Hkv, window_size=window, mask=mask, document_ids=ids)
    q_ids = ids if isinstance(ids, torch.Tensor) else ids[0]
    assert (out.transpose(1, 2)[q_ids < 0] == 0).all()  # padding queries see nothing: rows of 0


def test_documents_equal_separate_runs(backend):
    """Packed documents with causal attention give, for each document, what attention over that
    document alone gives (the point of the feature), gradients included."""
    torch.manual_seed(62)
    lengths, H, D = [23, 9, 31], 2, 32
    T = sum(lengths)
    q, k, v = (_rand(1, H, T, D).requires_grad_(True) for _ in range(3))
    ids = _doc_ids(lengths, T).to(torch.int32)
    out = tfkernels.attention(q, k, v, is_causal=True, document_ids=ids, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        parts = [t.detach()[:, :, sl].double().requires_grad_(True) for t in (q, k, v)]
        ref = reference.attention(*parts, is_causal=True)
        assert_close(out[:, :, sl], ref, torch.float32, "out")
        for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, parts, dout[:, :, sl].double())):
            assert_close(g[:, :, sl], r, torch.float32, f"d{name}", scale=2.0)
        start += n


def test_documents_skip_other_documents(backend):
    """Key blocks that hold none of a query block's documents are never read (nor query blocks of
    other documents by the dK/dV kernel): padding tiles filled with NaN leave every output and
    gradient finite and equal to the reference with those values zeroed. The padding gap [3 blk, 7 blk)
    is whole tiles: 16 rows in the interpreter, 128 (the largest block of either backend) on a GPU;
    tiles that shared a block with real tokens would let masked NaN values reach the P.V product
    (0 * NaN), as with SDPA and any masked key."""
    torch.manual_seed(63)
    H, D, blk = 2, 16, (128 if DEVICE == "cuda" else 16)
    lengths = [2 * blk + 5, blk - 5, -(4 * blk), 3 * blk + 7, -(blk - 7)]  # a padding gap of 4 tiles
    T = sum(abs(n) for n in lengths)
    ids = _doc_ids(lengths, T)
    gap = slice(3 * blk, 7 * blk)
    assert (ids[gap] == -1).all()
    q, k, v = (_rand(1, H, T, D) for _ in range(3))
    poisoned = [t.clone() for t in (q, k, v)]
    for t in poisoned:
        t[:, :, gap] = float("nan")
    for causal in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in poisoned]
        out = tfkernels.attention(*leaves, is_causal=causal, document_ids=ids, backend=backend)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
        clean = [t.clone() for t in (q, k, v)]
        for t in clean:
            t[:, :, gap] = 0.0
        ref_leaves = [t.double().requires_grad_(True) for t in clean]
        ref = reference.attention(*ref_leaves, is_causal=causal, document_ids=(ids, ids))
        assert_close(out, ref, torch.float32, "out")
        for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, ref_leaves, dout.double())):
            assert_close(g, r, torch.float32, f"d{name}", scale=2.0)
            assert (g[:, :, gap] == 0).all(), name


def test_documents_unsorted_ids(backend):
    """Ids in any order (interleaved documents) are still exact: every block is then masked."""
    torch.manual_seed(64)
    B, H, T, D = 2, 2, 45, 16
    ids = torch.randint(-1, 4, (B, T), device=DEVICE)
    _check(_rand(B, H, T, D), _rand(B, H, T, D), _rand(B, H, T, D), backend, is_causal=True, document_ids=ids)
    _check(_rand(B, H, T, D), _rand(B, H, T, D), _rand(B, H, T, D), backend, document_ids=ids.flip(-1))


def test_documents_match_the_dense_mask(backend):
    """document_ids gives what the equivalent (B, 1, T, T) bool mask gives, with dropout replayed:
    both draw the same keep mask for the seed."""
    torch.manual_seed(65)
    B, H, T, D = 2, 2, 40, 16
    ids = torch.stack([_doc_ids([15, 20], T), _doc_ids([-3, 30], T)])
    q, k, v = (_rand(B, H, T, D) for _ in range(3))
    dense = (ids[:, None, :, None] == ids[:, None, None, :]) & (ids >= 0)[:, None, :, None]
    for p in (0.0, 0.3):
        torch.manual_seed(7)
        a = tfkernels.attention(q, k, v, dropout_p=p, is_causal=True, document_ids=ids, backend=backend)
        torch.manual_seed(7)
        b = tfkernels.attention(q, k, v, attn_mask=dense, dropout_p=p, is_causal=True, backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_documents_ranges_remembered_across_calls(backend, monkeypatch):
    """A model passes the same ids to every layer: the converted ids and the ranges are computed once
    per ids tensor and version (tfkernels.ops._documents, _validate.eager_memo), an in-place change
    recomputes them, and the memo holds no reference that keeps the ids alive."""
    import gc
    import weakref

    from tfkernels.ops import _documents

    computed = []
    real = _documents._ranges
    monkeypatch.setattr(_documents, "_ranges", lambda r, c: computed.append(1) or real(r, c))
    torch.manual_seed(66)
    B, H, T, D = 2, 2, 40, 16
    ids = torch.stack([_doc_ids([15, 20], T), _doc_ids([-3, 30], T)]).to(torch.int32)
    q, k, v = (_rand(B, H, T, D).requires_grad_(True) for _ in range(3))

    def dense(ids):
        return (ids[:, None, :, None] == ids[:, None, None, :]) & (ids >= 0)[:, None, :, None]

    def layer():
        out = tfkernels.attention(q, k, v, is_causal=True, document_ids=ids, backend=backend)
        return out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    out1, g1 = layer()
    n = len(computed)
    out2, g2 = layer()  # "the next layer": the same ids
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    if backend == "triton":  # the cuda backend finds the ranges in its own kernels
        # one ids tensor for queries and keys: keys over queries are queries over keys, so the
        # forward's ranges serve both backward kernels; nothing is computed the second time
        assert n == 1 and len(computed) == 1
    ids[1, :10] = 5  # in place: a new version, new ranges and a different result
    out3 = tfkernels.attention(q, k, v, is_causal=True, document_ids=ids, backend=backend)
    ref = tfkernels.attention(q, k, v, attn_mask=dense(ids), is_causal=True, backend=backend)
    torch.testing.assert_close(out3, ref, rtol=1e-5, atol=1e-6)
    if backend == "triton":
        assert len(computed) == 2
    alive = weakref.ref(ids)
    del ids, out1, out2, out3
    gc.collect()
    assert alive() is None, "the memo keeps the ids tensor alive"


def test_documents_layouts_lse_and_torch_backend(backend):
    """ids broadcast over batch dims, SDPA's 5-D and 3-D layouts, return_lse (-inf on padding rows),
    the torch backend, and a causal_lower_right bias with T_q > T_k (the queries' ids are sliced)."""
    torch.manual_seed(66)
    T, D = 33, 16
    ids = _doc_ids([10, 13, -10], T)
    q5, k5, v5 = (_rand(2, 3, 2, T, D) for _ in range(3))
    ref_ids = ids.expand(2, 3, T)
    ref = reference.attention(q5.double(), k5.double(), v5.double(), is_causal=True, document_ids=(ref_ids, ref_ids))
    for ids_in in (ids, ids.expand(2, 3, T), ids.expand(3, T).to(torch.int16)):
        out = tfkernels.attention(q5, k5, v5, is_causal=True, document_ids=ids_in, backend=backend)
        assert_close(out, ref, torch.float32, "out 5-D")
    out3 = tfkernels.attention(q5[0, 0], k5[0, 0], v5[0, 0], is_causal=True, document_ids=ids, backend=backend)
    assert_close(out3, ref[0, 0], torch.float32, "out 3-D")
    out, lse = tfkernels.attention(q5, k5, v5, is_causal=True, document_ids=ids, return_lse=True, backend=backend)
    _, ref_lse = reference.attention(q5.double(), k5.double(), v5.double(), is_causal=True,
                                     document_ids=(ref_ids, ref_ids), return_lse=True)
    assert (lse[..., ids < 0] == float("-inf")).all()
    assert_close(lse[..., ids >= 0], ref_lse[..., ids >= 0], torch.float32, "lse")
    torch_out = tfkernels.attention(q5, k5, v5, is_causal=True, document_ids=ids, backend="torch")
    assert_close(torch_out, ref, torch.float32, "torch backend")
    from torch.nn.attention.bias import causal_lower_right
    Tq, Tk = 29, 20
    q, k, v = _rand(1, 2, Tq, D), _rand(1, 2, Tk, D), _rand(1, 2, Tk, D)
    qi, ki = _doc_ids([15, 14], Tq), _doc_ids([6, 14], Tk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tfkernels.attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), document_ids=(qi, ki), backend=backend)
    i, j = torch.arange(Tq, device=DEVICE)[:, None], torch.arange(Tk, device=DEVICE)[None, :]
    ref = reference.attention(q.double(), k.double(), v.double(), attn_mask=j <= i + Tk - Tq, document_ids=(qi, ki))
    assert_close(out, ref, torch.float32, "causal_lower_right")


def test_document_ranges_are_exact_for_sorted_ids():
    """The granules' key ranges against brute force: for sorted ids (padding anywhere but inside a
    document) exactly the keys of the granule's documents, `single` the one id of a one-document
    granule; unsorted rows get the whole range and no `single`."""
    from tfkernels.ops import _documents as docs

    g = torch.Generator().manual_seed(67)
    rows = []
    for _ in range(6):
        lengths = []
        while sum(abs(n) for n in lengths) < 150:
            n = int(torch.randint(1, 40, (1,), generator=g))
            lengths.append(-n if torch.rand(1, generator=g) < 0.25 else n)
        rows.append(_doc_ids(lengths, sum(abs(n) for n in lengths))[:150].cpu())
    rows.append(torch.randint(-1, 5, (150,), generator=g))  # unsorted
    row_doc = torch.stack(rows).to(torch.int32)
    col_doc = row_doc[:, 7:127].contiguous()  # fewer columns than rows, shifted
    r = docs.ranges(row_doc.to(DEVICE), col_doc.to(DEVICE)).cpu()
    G = docs.GRAN
    for b in range(row_doc.shape[0]):
        key, ok = docs.search_key(col_doc[b:b + 1])
        for gi in range(r.shape[2]):
            gr = row_doc[b, gi * G:(gi + 1) * G]
            real = gr[gr >= 0]
            lo, hi, single = (int(x) for x in r[:, b, gi])
            if bool(ok):
                seen = torch.nonzero(torch.isin(col_doc[b], real)).flatten()
                if len(seen):
                    assert (lo, hi) == (int(seen[0]), int(seen[-1]) + 1), (b, gi)
                else:
                    assert lo >= hi, (b, gi)
                one = len(real) == len(gr) and len(real) and bool((real == real[0]).all())
                assert single == (int(real[0]) if one else -1), (b, gi)
            else:
                assert b == row_doc.shape[0] - 1 and (lo, hi, single) == ((0, 120, -1) if len(real) else (120, 0, -1))


def test_documents_compile_and_opcheck(backend):
    torch.manual_seed(68)
    q, k, v = (_rand(1, 2, 21, 16).requires_grad_(True) for _ in range(3))
    ids = _doc_ids([8, 13], 21).to(torch.int32)[None]
    fn = lambda q, k, v, ids: tfkernels.attention(q, k, v, is_causal=True, document_ids=ids, backend=backend)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y, ye = compiled(q, k, v, ids), fn(q, k, v, ids)
    assert_close(y, ye.detach().double(), torch.float32)
    dy = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(ye, (q, k, v), dy)):
        assert_close(a, e.double(), torch.float32, scale=2.0)
    ops = torch.ops.tfkernels
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, None, ids, ids, 0.0, None, True, 0.25, -1, -1, 0.0, backend))
    out, lse = ops.attention_fwd(q.detach(), k.detach(), v.detach(), None, ids, ids, 0.0, None, True, 0.25, -1, -1, 0.0,
                                 backend)
    torch.library.opcheck(ops.attention_bwd.default, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), None,
                                                      ids, ids, out, lse, None, 0.0, None, True, 0.25, -1, -1, 0.0,
                                                      False, backend))


# ---------------------------------------------------------------------------------------------
# bad input, backends
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    q, k, v = _rand(2, 4, 8, 16), _rand(2, 4, 10, 16), _rand(2, 4, 10, 16)
    return [
        ("q", TypeError, lambda: tfkernels.attention(q.numpy() if DEVICE == "cpu" else None, k, v)),
        ("k has shape", ValueError, lambda: tfkernels.attention(q[0], k, v)),
        ("k has shape", ValueError, lambda: tfkernels.attention(q, k[0], v)),
        ("q has shape", ValueError, lambda: tfkernels.attention(q[0, 0], k[0, 0], v[0, 0])),
        ("leading dims of k", ValueError, lambda: tfkernels.attention(q[None], k[None].expand(2, -1, -1, -1, -1), v[None].expand(3, -1, -1, -1, -1))),
        ("attn_mask", ValueError, lambda: tfkernels.attention(q[None], k[None], v[None], attn_mask=torch.ones(3, 1, 1, 1, 10, device=DEVICE))),
        ("head dims", ValueError, lambda: tfkernels.attention(q, _rand(2, 4, 10, 8), v)),
        ("k has dtype", TypeError, lambda: tfkernels.attention(q, k.half(), v)),
        ("v has dtype", TypeError, lambda: tfkernels.attention(q, k, v.double())),
        ("batch", ValueError, lambda: tfkernels.attention(q, _rand(3, 4, 10, 16), _rand(3, 4, 10, 16))),
        ("same heads and length", ValueError, lambda: tfkernels.attention(q, k, _rand(2, 4, 9, 16))),
        ("enable_gqa", ValueError, lambda: tfkernels.attention(q, _rand(2, 2, 10, 16), _rand(2, 2, 10, 16))),
        ("multiple", ValueError, lambda: tfkernels.attention(q, _rand(2, 3, 10, 16), _rand(2, 3, 10, 16), enable_gqa=True)),
        ("attn_mask", ValueError, lambda: tfkernels.attention(q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.bool, device=DEVICE))),
        ("attn_mask", ValueError, lambda: tfkernels.attention(q, k, v, attn_mask=torch.ones(3, 4, 8, 10, dtype=torch.bool, device=DEVICE))),
        ("attn_mask", ValueError, lambda: tfkernels.attention(q, k, v, attn_mask=torch.ones(1, 1, 2, 4, 8, 10, dtype=torch.bool, device=DEVICE))),
        ("attn_mask", TypeError, lambda: tfkernels.attention(q, k, v, attn_mask=torch.ones(8, 10, dtype=torch.int32, device=DEVICE))),
        ("attn_mask", TypeError, lambda: tfkernels.attention(q, k, v, attn_mask=[[True]])),
        ("dropout_p", ValueError, lambda: tfkernels.attention(q, k, v, dropout_p=1.5)),
        ("window_size", TypeError, lambda: tfkernels.attention(q, k, v, window_size=4)),
        ("window_size", TypeError, lambda: tfkernels.attention(q, k, v, window_size=(4,))),
        ("window_size", TypeError, lambda: tfkernels.attention(q, k, v, window_size=(4.0, 0))),
        ("window_size", TypeError, lambda: tfkernels.attention(q, k, v, window_size=(True, 0))),
        ("window_size", ValueError, lambda: tfkernels.attention(q, k, v, window_size=(-2, 0))),
        ("softcap", TypeError, lambda: tfkernels.attention(q, k, v, softcap="1")),
        ("softcap", TypeError, lambda: tfkernels.attention(q, k, v, softcap=True)),
        ("softcap", ValueError, lambda: tfkernels.attention(q, k, v, softcap=-1.0)),
        ("softcap", ValueError, lambda: tfkernels.attention(q, k, v, softcap=float("nan"))),
        ("softcap", ValueError, lambda: tfkernels.attention(q, k, v, softcap=float("inf"))),
        ("dropout_p", ValueError, lambda: tfkernels.attention(q, k, v, dropout_p=-0.1)),
        ("dropout_p", TypeError, lambda: tfkernels.attention(q, k, v, dropout_p="0.1")),
        ("scale", TypeError, lambda: tfkernels.attention(q, k, v, scale="x")),
        ("scale must be finite", ValueError, lambda: tfkernels.attention(q, k, v, scale=float("nan"))),
        ("scale must be finite", ValueError, lambda: tfkernels.attention(q, k, v, scale=float("inf"))),
        ("head dim D=288", ValueError, lambda: tfkernels.attention(_rand(1, 1, 4, 288), _rand(1, 1, 4, 288), _rand(1, 1, 4, 288), backend="triton")),
        ("backend", ValueError, lambda: tfkernels.attention(q, k, v, backend="nope")),
        ("document_ids must be an integer", TypeError, lambda: tfkernels.attention(q, q, q, document_ids=torch.zeros(2, 8, device=DEVICE))),
        ("document_ids must be an integer", TypeError, lambda: tfkernels.attention(q, q, q, document_ids=torch.zeros(2, 8, dtype=torch.bool, device=DEVICE))),
        ("document_ids must be an integer tensor", TypeError, lambda: tfkernels.attention(q, q, q, document_ids=[0] * 8)),
        ("only when T_q == T_k", ValueError, lambda: tfkernels.attention(q, k, v, document_ids=torch.zeros(2, 8, dtype=torch.int64, device=DEVICE))),
        ("must end in the sequence length 10", ValueError, lambda: tfkernels.attention(q, k, v, document_ids=(torch.zeros(2, 8, dtype=torch.int32, device=DEVICE), torch.zeros(2, 8, dtype=torch.int32, device=DEVICE)))),
        ("does not broadcast", ValueError, lambda: tfkernels.attention(q, q, q, document_ids=torch.zeros(3, 8, dtype=torch.int32, device=DEVICE))),
        ("fit in int32", ValueError, lambda: tfkernels.attention(q, q, q, document_ids=torch.full((8,), 2**40, device=DEVICE))),
        ("document_ids\\[1\\]", TypeError, lambda: tfkernels.attention(q, k, v, document_ids=(torch.zeros(8, dtype=torch.int32, device=DEVICE), torch.zeros(10, device=DEVICE)))),
    ]


@pytest.mark.parametrize("i", range(len(_bad_cases())))
def test_bad_input(i):
    expected, exc, fn = _bad_cases()[i]
    with pytest.raises(exc, match=expected):
        fn()


def test_head_dim_over_the_kernels_limit(monkeypatch):
    """D > 256: a kernel backend asked for by name refuses (test_bad_input); the automatic choice
    falls back to the PyTorch reference and says so once."""
    from tfkernels import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("TFKERNELS_BACKEND", raising=False)
    q, k, v = (_rand(1, 2, 5, 288) for _ in range(3))
    kernel_chosen = _backend.resolve(None, q, "attention") != "torch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tfkernels.attention(q, k, v, is_causal=True)
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), is_causal=True), torch.float32)
    assert any("head dim 288" in str(w.message) for w in caught) == kernel_chosen


def test_bad_device():
    if DEVICE != "cuda":
        pytest.skip("needs two devices")
    q = _rand(1, 1, 4, 16)
    with pytest.raises(ValueError, match="k is on"):
        tfkernels.attention(q, q.cpu(), q)


def test_torch_backend_matches_reference():
    torch.manual_seed(21)
    q, k, v = _rand(1, 2, 9, 16), _rand(1, 2, 11, 16), _rand(1, 2, 11, 16)
    mask = torch.rand(9, 11, device=DEVICE) > 0.3
    mask[:, 0] = True
    out = tfkernels.attention(q, k, v, mask, backend="torch")
    sdpa = F.scaled_dot_product_attention(q, k, v, mask)
    assert_close(out, sdpa.double(), torch.float32)
    # D over the kernel limit still works on the reference backend
    x = _rand(1, 1, 3, 288)
    assert tfkernels.attention(x, x, x, backend="torch").shape == x.shape


def test_matches_sdpa(backend):
    """Drop-in: the same numbers as torch's SDPA for the semantics both support."""
    torch.manual_seed(22)
    q, k, v = _rand(2, 4, 23, 32), _rand(2, 2, 31, 32), _rand(2, 2, 31, 32)
    for kw in (dict(is_causal=True), dict(attn_mask=torch.randn(2, 1, 23, 31, device=DEVICE)), dict(scale=0.1)):
        ours = tfkernels.attention(q, k, v, enable_gqa=True, backend=backend, **kw)
        theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        assert_close(ours, theirs.double(), torch.float32, str(kw))


def test_sdpa_layouts_with_more_or_fewer_dims(backend):
    """SDPA also takes (N, ..., H, T, D) and (N, T, D): folded into the kernels' (B, H, T, D) and back,
    with a broadcast mask (and its gradient) and GQA over dim -3, against SDPA in float64."""
    torch.manual_seed(41)
    cases = [((2, 3, 4, 9, 16), (2, 3, 2, 11, 16), (1, 3, 1, 9, 11), True),   # 5-D, GQA, mask over dim 1
             ((4, 9, 16), (2, 11, 16), (9, 11), True),                        # 3-D: dim 0 is the heads
             ((4, 9, 16), (4, 11, 16), (4, 1, 11), False)]
    for q_shape, kv_shape, m_shape, gqa in cases:
        q = _rand(*q_shape).requires_grad_(True)
        k, v = (_rand(*kv_shape).requires_grad_(True) for _ in range(2))
        mask = torch.randn(m_shape, device=DEVICE).requires_grad_(True)
        out = tfkernels.attention(q, k, v, attn_mask=mask, enable_gqa=gqa, backend=backend)
        leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, mask)]
        ref = F.scaled_dot_product_attention(*leaves64[:3], attn_mask=leaves64[3], enable_gqa=gqa)
        assert out.shape == ref.shape
        assert_close(out, ref, torch.float32, "out")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v, mask), dout)
        refs = torch.autograd.grad(ref, leaves64, dout.double())
        for name, g, r in zip(["dq", "dk", "dv", "dmask"], grads, refs):
            assert g.shape == r.shape, name
            assert_close(g, r, torch.float32, name, scale=2.0)


@pytest.mark.parametrize("which", ["kernel", "torch"])
def test_empty_keys_and_queries(backend, which):
    """No keys: every row is empty and returns zeros (the documented rule for fully masked rows), on
    the kernels and on the torch reference alike; no queries: an empty output."""
    backend = backend if which == "kernel" else "torch"
    q = _rand(1, 2, 5, 16, dtype=torch.float32).requires_grad_(True)
    k = _rand(1, 2, 0, 16).requires_grad_(True)
    ids = torch.zeros(5, dtype=torch.int32, device=DEVICE), torch.zeros(0, dtype=torch.int32, device=DEVICE)
    for kw in ({}, dict(is_causal=True), dict(attn_mask=torch.zeros(5, 0, device=DEVICE, dtype=torch.bool)),
               dict(document_ids=ids)):
        out = tfkernels.attention(q, k, k, backend=backend, **kw)
        assert out.shape == q.shape and (out == 0).all(), kw
        (gq,) = torch.autograd.grad(out.sum(), q)
        assert (gq == 0).all(), kw
    e = _rand(1, 2, 0, 16)
    assert tfkernels.attention(e, q.detach(), q.detach(), backend=backend).shape == e.shape
    assert tfkernels.attention(e, q.detach(), q.detach(), document_ids=ids[::-1], backend=backend).shape == e.shape


# ---------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

def test_opcheck(backend):
    torch.manual_seed(23)
    ops = torch.ops.tfkernels
    B, Hq, Hkv, Tq, Tk, D = 1, 2, 1, 19, 21, 16
    q = _rand(B, Hq, Tq, D).requires_grad_(True)
    k = _rand(B, Hkv, Tk, D).requires_grad_(True)
    v = _rand(B, Hkv, Tk, D).requires_grad_(True)
    bmask = (torch.rand(B, 1, 1, Tk, device=DEVICE) > 0.3).expand(B, Hq, Tq, Tk)
    fmask = torch.randn(1, Hq, Tq, Tk, device=DEVICE).expand(B, Hq, Tq, Tk)
    seed = torch.tensor([1234], dtype=torch.int64)
    fwd_cases = [
        (q, k, v, None, None, None, 0.0, None, False, 0.25, -1, -1, 0.0, backend),
        (q, k, v, bmask, None, None, 0.0, None, True, 0.25, -1, -1, 0.0, backend),
        (q, k, v, fmask.detach().requires_grad_(True), None, None, 0.2, seed, False, 0.25, -1, -1, 0.0, backend),  # + dropout
        (q, k, v, None, None, None, 0.0, None, True, 0.25, 5, -1, 2.0, backend),  # window + softcap
    ]
    for args in fwd_cases:
        torch.library.opcheck(ops.attention_fwd.default, args)
    for window, softcap in (((-1, -1), 0.0), ((4, 3), 1.5)):
        out, lse = ops.attention_fwd(q.detach(), k.detach(), v.detach(), fmask, None, None, 0.0, None, True, 0.25,
                                     *window, softcap, backend)
        dout = torch.randn_like(out)
        for dlse in (None, torch.randn_like(lse)):
            torch.library.opcheck(ops.attention_bwd.default, (dout, q.detach(), k.detach(), v.detach(), fmask, None,
                                                              None, out, lse, dlse, 0.0, None, True, 0.25, *window, softcap, True,
                                                              backend))


def _layer(q, k, v, bias, backend):
    h = tfkernels.attention(q, k, v, attn_mask=bias, is_causal=True, enable_gqa=True, backend=backend)
    return tfkernels.attention(h, k, v, dropout_p=0.1, enable_gqa=True, backend=backend)


def test_torch_compile_fullgraph(backend):
    torch.manual_seed(24)
    torch._dynamo.reset()
    q = _rand(1, 4, 21, 16).requires_grad_(True)
    k = _rand(1, 2, 27, 16).requires_grad_(True)
    v = _rand(1, 2, 27, 16).requires_grad_(True)
    bias = torch.randn(4, 21, 27, device=DEVICE).requires_grad_(True)
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    y = compiled(q, k, v, bias, backend)
    torch.manual_seed(5)
    y_eager = _layer(q, k, v, bias, backend)
    assert_close(y, y_eager.detach().double(), torch.float32)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (q, k, v, bias), dy)
    ge = torch.autograd.grad(y_eager, (q, k, v, bias), dy)
    for a, e in zip(g, ge):
        assert_close(a, e.double(), torch.float32, scale=2.0)


def test_torch_compile_dynamic_float_scale(backend):
    """dynamic=True makes a Python-float scale symbolic (Hugging Face passes scaling= as one): the
    op must still trace with fullgraph, and give eager's result at two lengths."""
    torch._dynamo.reset()
    fn = lambda q, k, v, s: tfkernels.attention(q, k, v, scale=s, is_causal=True, backend=backend)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for T, s in ((9, 0.3), (14, 0.7)):
        q, k, v = (_rand(1, 2, T, 16) for _ in range(3))
        assert_close(compiled(q, k, v, s), fn(q, k, v, s).double(), torch.float32)


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------

def _mha_pair(seed, **kw):
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(**kw).to(DEVICE)
    ours = tfkernels.nn.MultiheadAttention(**kw).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _compare_mha(ref, ours, args, kwargs, param_names=("in_proj_weight", "out_proj.weight")):
    out_r, _ = ref(*args, need_weights=False, **kwargs)
    out_o, w = ours(*args, need_weights=False, **kwargs)
    assert w is None
    assert_close(out_o, out_r.detach().double(), torch.float32, "out", scale=2.0)
    dy = torch.randn_like(out_r)
    pr, po = dict(ref.named_parameters()), dict(ours.named_parameters())
    names = [n for n in param_names if n in pr]
    gr = torch.autograd.grad(out_r, [pr[n] for n in names] + [a for a in args if a.requires_grad], dy)
    go = torch.autograd.grad(out_o, [po[n] for n in names] + [a for a in args if a.requires_grad], dy)
    for a, r in zip(go, gr):
        assert_close(a, r.double(), torch.float32, "grad", scale=4.0)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, on the bool+float case
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_masks(batch_first, backend):
    E, H, B, L, S = 32, 4, 2, 13, 17
    ref, ours = _mha_pair(25, embed_dim=E, num_heads=H, batch_first=batch_first)
    ours.backend = backend
    shape_q = (B, L, E) if batch_first else (L, B, E)
    shape_k = (B, S, E) if batch_first else (S, B, E)
    x = _rand(*shape_q).requires_grad_(True)
    kv = _rand(*shape_k).requires_grad_(True)
    kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    kpm[1, 11:] = True  # True = padding (ignored), torch's convention
    bool_mask = torch.rand(L, S, device=DEVICE) > 0.8  # True = not allowed
    float_mask = torch.randn(B * H, L, S, device=DEVICE)
    _compare_mha(ref, ours, (x, kv, kv), dict(key_padding_mask=kpm))
    _compare_mha(ref, ours, (x, kv, kv), dict(attn_mask=bool_mask, key_padding_mask=kpm))
    _compare_mha(ref, ours, (x, kv, kv), dict(attn_mask=float_mask, key_padding_mask=kpm))


def test_mha_causal_kdim_bias(backend):
    E, H, B, L = 24, 3, 2, 11
    ref, ours = _mha_pair(26, embed_dim=E, num_heads=H, batch_first=True)
    ours.backend = backend
    x = _rand(B, L, E).requires_grad_(True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    _compare_mha(ref, ours, (x, x, x), dict(attn_mask=causal, is_causal=True))
    ref, ours = _mha_pair(27, embed_dim=E, num_heads=H, batch_first=True, kdim=10, vdim=14, bias=False)
    ours.backend = backend
    k, v = _rand(B, 7, 10), _rand(B, 7, 14)
    _compare_mha(ref, ours, (x, k, v), {}, param_names=("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"))
    # unbatched (L, E) input
    ref, ours = _mha_pair(28, embed_dim=E, num_heads=H)
    ours.backend = backend
    _compare_mha(ref, ours, (x[0], x[0], x[0]), {})


def test_mha_mask_shapes_are_checked():
    """A mask with the right number of elements but another layout (a (S, B) key_padding_mask, an
    (S, L) attn_mask) would be silently scrambled by a view: like torch, it is refused, by name."""
    E, H, B, L, S = 16, 2, 3, 4, 6
    _, ours = _mha_pair(31, embed_dim=E, num_heads=H, batch_first=True)
    x, kv = _rand(B, L, E), _rand(B, S, E)
    bad = [("key_padding_mask", torch.zeros(S, B, dtype=torch.bool, device=DEVICE)),
           ("key_padding_mask", torch.zeros(B, 1, S, dtype=torch.bool, device=DEVICE)),
           ("attn_mask", torch.zeros(S, L, device=DEVICE)),
           ("attn_mask", torch.zeros(L, S + 1, device=DEVICE)),
           ("attn_mask", torch.zeros(B, L, S, device=DEVICE))]  # 3-D must be (B*H, L, S)
    for name, mask in bad:
        with pytest.raises(ValueError, match=name):
            ours(x, kv, kv, need_weights=False, **{name: mask})
    with pytest.raises(ValueError, match="attn_mask"):  # checked with the is_causal hint too
        ours(x, x, x, need_weights=False, attn_mask=torch.zeros(L + 1, L, device=DEVICE), is_causal=True)
    # unbatched: key_padding_mask (S,), attn_mask (L, S) or (H, L, S)
    out = ours(x[0], kv[0], kv[0], need_weights=False, key_padding_mask=torch.zeros(S, dtype=torch.bool, device=DEVICE),
               attn_mask=torch.zeros(H, L, S, device=DEVICE))[0]
    assert out.shape == (L, E)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(x[0], kv[0], kv[0], need_weights=False, key_padding_mask=torch.zeros(1, S, dtype=torch.bool, device=DEVICE))


def test_mha_drop_in(backend):
    """Same state_dict keys; need_weights=True and add_bias_kv take torch's path; from_torch shares
    parameters."""
    ref, ours = _mha_pair(29, embed_dim=16, num_heads=2, batch_first=True)
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert isinstance(ours, torch.nn.MultiheadAttention)
    x = _rand(2, 5, 16)
    out_r, w_r = ref(x, x, x)
    out_o, w_o = ours(x, x, x)  # need_weights defaults to True: torch's implementation
    assert torch.equal(out_r, out_o) and torch.equal(w_r, w_o)
    wrapped = tfkernels.nn.MultiheadAttention.from_torch(ref, backend=backend)
    assert wrapped.in_proj_weight is ref.in_proj_weight and wrapped.out_proj.weight is ref.out_proj.weight
    assert_close(wrapped(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0].double(), torch.float32)
    ref, ours = _mha_pair(30, embed_dim=16, num_heads=2, add_bias_kv=True, add_zero_attn=True)
    y = _rand(5, 2, 16)
    torch.testing.assert_close(ours(y, y, y, need_weights=False)[0], ref(y, y, y, need_weights=False)[0])
    with pytest.raises(TypeError, match="module"):
        tfkernels.nn.MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# CUDA: FlashAttention's accuracy rule for fp16/bf16
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    (2, 8, 8, 1024, 1024, 128, True),
    (2, 8, 8, 1024, 1024, 128, False),
    (4, 8, 8, 512, 512, 64, True),
    (2, 8, 2, 777, 1111, 96, False),  # GQA, ragged
    (1, 4, 4, 300, 300, 256, True),
    (2, 4, 4, 513, 129, 40, True),
], ids=str)
def test_cuda_flash_rule(case, dtype, backend):
    """The kernel's error against an fp32 reference is at most 2x PyTorch SDPA's own error in the
    same dtype, plus a small atol (FlashAttention's test rule), for out, dq, dk, dv."""
    B, Hq, Hkv, Tq, Tk, D, causal = case
    torch.manual_seed(31)
    q = torch.randn(B, Hq, Tq, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype, requires_grad=True)
    gqa = Hq != Hkv
    dout = torch.randn(B, Hq, Tq, D, device="cuda", dtype=dtype)
    out = tfkernels.attention(q, k, v, is_causal=causal, enable_gqa=gqa, backend=backend)
    g = torch.autograd.grad(out, (q, k, v), dout)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    gs = torch.autograd.grad(sdpa, (q, k, v), dout)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        ref = reference.attention(q32, k32, v32, is_causal=causal, enable_gqa=gqa)
        gr = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for name, a, s, r in zip(["out", "dq", "dk", "dv"], (out,) + g, (sdpa,) + gs, (ref,) + gr):
        ours_err = (a.float() - r).abs().max().item()
        torch_err = (s.float() - r).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-3 * max(1.0, r.abs().max().item()), \
            f"{name}: {ours_err:.3e} vs SDPA {torch_err:.3e}"


@pytest.mark.cuda
def test_cuda_fp32_tf32_flag(backend):
    """fp32 follows torch.backends.cuda.matmul.allow_tf32: IEEE when off (tight), TF32 when on."""
    torch.manual_seed(32)
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda") for _ in range(3))
    ref = reference.attention(q.double(), k.double(), v.double(), is_causal=True)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = tfkernels.attention(q, k, v, is_causal=True, backend=backend)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = tfkernels.attention(q, k, v, is_causal=True, backend=backend)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert (ieee.double() - ref).abs().max().item() < 1e-5
    assert (tf32.double() - ref).abs().max().item() < 5e-3


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: one TF32 API")
def test_tf32_flag_read_through_either_api():
    """The fp32 dot precision follows PyTorch's flag set through either API; reading the legacy
    allow_tf32 after the new fp32_precision was set raises in torch >= 2.11, so the op must not."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision  # restored below
    try:
        matmul.fp32_precision = "tf32"
        assert attn_mod._dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert attn_mod._dot_precision(torch.float32) == "ieee"
        matmul.fp32_precision = "none"
        matmul.allow_tf32 = True
        assert attn_mod._dot_precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert attn_mod._dot_precision(torch.float32) == "ieee"
        assert attn_mod._dot_precision(torch.bfloat16) == "tf32"  # 16-bit: native tensor-core dots
    finally:
        matmul.fp32_precision = saved
    x = torch.randn(1, 2, 20, 16, device=DEVICE)
    matmul.fp32_precision = "tf32"
    try:  # the whole op with the new API set (the Triton kernels read the flag on every call)
        out = tfkernels.attention(x, x, x, is_causal=True)
    finally:
        matmul.fp32_precision = saved
    torch.testing.assert_close(out, reference.attention(x, x, x, is_causal=True), atol=5e-3, rtol=0)
