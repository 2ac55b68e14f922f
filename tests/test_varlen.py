"""tfkernels.varlen_attention (FlashAttention's varlen API) against a float64 reference that runs
each sequence on its own with FlashAttention's bottom-right causal/window alignment."""
import pytest
import torch
import torch.nn.functional as F

import tfkernels
from tfkernels.ops import varlen as varlen_mod

from conftest import DEVICE, assert_close, visible_keys


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def reference(q, k, v, lens_q, lens_k, causal=False, window=(-1, -1), scale=None, softcap=0.0, bottom_right=True):
    """Per sequence, float64: out (total_q, H_q, D), lse (H_q, total_q) (-inf for a row that sees nothing).
    Causal and the window aligned to each sequence's bottom right (FlashAttention) or top left (SDPA)."""
    q, k, v = q.double(), k.double(), v.double()
    Hq, D = q.shape[1], q.shape[2]
    scale = D ** -0.5 if scale is None else scale
    outs, lses = [], []
    cq = ck = 0
    for lq, lk in zip(lens_q, lens_k):
        qi = q[cq:cq + lq].transpose(0, 1)
        ki = k[ck:ck + lk].transpose(0, 1).repeat_interleave(Hq // k.shape[1], 0)
        vi = v[ck:ck + lk].transpose(0, 1).repeat_interleave(Hq // k.shape[1], 0)
        s = qi @ ki.transpose(-1, -2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        diag = torch.arange(lq, device=q.device)[:, None] + (lk - lq if bottom_right else 0)
        s = s.masked_fill(~visible_keys(diag, lk, causal, window), float("-inf"))
        lse = torch.logsumexp(s, -1)  # -inf for an empty row
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append((p @ vi).transpose(0, 1))
        lses.append(lse)
        cq, ck = cq + lq, ck + lk
    return torch.cat(outs, 0), torch.cat(lses, -1)


# (lens_q, lens_k (None: cu_seqlens_k not passed), causal, window): every route through the frame
CASES = {
    "shared-causal-empty-seq": ([5, 0, 12, 3], None, True, (-1, -1)),
    "shared-window": ([7, 9], None, False, (2, 1)),
    "kv-cache-causal": ([3, 1, 6], [7, 9, 6], True, (-1, -1)),  # every lk >= lq: only q moves
    "more-queries-causal": ([6, 5], [2, 5], True, (-1, -1)),  # every lq >= lk: only k and v move
    "mixed-causal-window": ([5, 2, 4], [3, 6, 0], True, (3, -1)),  # both move, an empty key set
    "mixed-window-only": ([6, 2], [4, 8], False, (2, 1)),
    "pair-no-alignment": ([4, 7], [9, 3], False, (-1, -1)),
}


def _inputs(lens_q, lens_k, Hq, Hkv, D, dtype):
    lens_k = lens_q if lens_k is None else lens_k
    q = torch.randn(sum(lens_q), Hq, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), Hkv, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), Hkv, D, device=DEVICE, dtype=dtype, requires_grad=True)
    return q, k, v


def _check(backend, lens_q, lens_k, causal, window, dtype=torch.float32, Hq=4, Hkv=2, D=32, softcap=0.0,
           scale=None):
    q, k, v = _inputs(lens_q, lens_k, Hq, Hkv, D, dtype)
    cu_k = None if lens_k is None else _cu(lens_k)
    out, lse = tfkernels.varlen_attention(q, k, v, _cu(lens_q), cu_k, causal=causal, window_size=window,
                                          softcap=softcap, scale=scale, return_lse=True, backend=backend)
    ref_out, ref_lse = reference(q, k, v, lens_q, lens_q if lens_k is None else lens_k, causal, window, scale,
                                 softcap)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, ref_out, dtype, "out")
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse).cpu())
    fin = torch.isfinite(ref_lse)
    assert_close(lse[fin], ref_lse[fin], torch.float32 if dtype == torch.float32 else dtype, "lse")
    # a loss through both outputs: the lse's gradient is the softmax (merging chunks needs it)
    dout = torch.randn_like(ref_out)
    w = torch.randn_like(ref_lse)
    loss = (out.double() * dout).sum() + (torch.where(fin, lse.double(), 0.0) * w).sum()
    ref_loss = (ref_out * dout).sum() + (torch.where(fin, ref_lse, 0.0) * w).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, dtype, name, scale=2.0)


@pytest.mark.parametrize("case", list(CASES))
def test_varlen_matches_per_sequence_reference(backend, case):
    lens_q, lens_k, causal, window = CASES[case]
    _check(backend, lens_q, lens_k, causal, window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_half_precision_softcap(backend, dtype):
    _check(backend, [9, 4], [5, 11], True, (4, -1), dtype=dtype, Hq=2, Hkv=1, D=64, softcap=5.0, scale=0.2)


def test_varlen_torch_backend():
    _check("torch", *CASES["mixed-causal-window"])


def test_reference_is_sdpa_causal_lower_right():
    """The reference's bottom-right alignment is SDPA's causal_lower_right (and FlashAttention's)."""
    from torch.nn.attention.bias import causal_lower_right

    for lq, lk in ((3, 7), (7, 3)):
        q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64) for n in (lq, lk, lk))
        ref, _ = reference(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), [lq], [lk], True)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk))
        rows = slice(max(0, lq - lk), None)  # SDPA gives NaN for the rows that see nothing (ours: 0)
        torch.testing.assert_close(ref[rows], sdpa[0].transpose(0, 1)[rows])
        assert (ref[:max(0, lq - lk)] == 0).all()


def test_varlen_equals_document_ids_attention(backend):
    """With shared offsets, varlen is `attention(..., document_ids=...)` on the packed row, bit for bit."""
    lens = [6, 3, 8]
    q, k, v = _inputs(lens, None, 2, 2, 32, torch.float32)
    ids = torch.repeat_interleave(torch.arange(3, device=DEVICE), torch.tensor(lens, device=DEVICE))
    a = tfkernels.varlen_attention(q, k, v, _cu(lens), causal=True, backend=backend)
    b = tfkernels.attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, document_ids=ids,
                            backend=backend)
    assert torch.equal(a, b[0].transpose(0, 1))


def test_varlen_static_frame(backend, monkeypatch):
    """Under torch.compile the offsets are not read: the frame has the static size total_q + total_k
    and both sides move. Same answer (the route is forced here, in eager)."""
    lens_q, lens_k, causal, window = CASES["mixed-causal-window"]
    q, k, v = _inputs(lens_q, lens_k, 2, 2, 32, torch.float32)
    args = (q, k, v, _cu(lens_q), _cu(lens_k))
    eager = tfkernels.varlen_attention(*args, causal=causal, window_size=window, backend=backend)
    monkeypatch.setattr(varlen_mod.torch.compiler, "is_compiling", lambda: True)
    static = tfkernels.varlen_attention(*args, causal=causal, window_size=window, backend=backend)
    assert_close(static, eager, torch.float32, "static frame")


@pytest.mark.parametrize("shared", [True, False])
def test_varlen_compiles(shared):
    lens_q, lens_k = [5, 11], ([5, 11] if shared else [8, 12])
    q, k, v = _inputs(lens_q, lens_k, 2, 2, 32, torch.float32)
    cu_q, cu_k = _cu(lens_q), (None if shared else _cu(lens_k))
    fn = torch.compile(lambda q, k, v: tfkernels.varlen_attention(q, k, v, cu_q, cu_k, causal=True), fullgraph=True)
    out = fn(q, k, v)
    ref, _ = reference(q, k, v, lens_q, lens_k, True)
    assert_close(out, ref, torch.float32, "compiled")
    out.sum().backward()
    assert q.grad is not None and k.grad is not None


def test_varlen_dropout(backend):
    lens_q, lens_k = [4, 9], [7, 9]
    q, k, v = _inputs(lens_q, lens_k, 2, 2, 32, torch.float32)
    args = (q, k, v, _cu(lens_q), _cu(lens_k))
    torch.manual_seed(3)
    a = tfkernels.varlen_attention(*args, dropout_p=0.3, causal=True, backend=backend)
    torch.manual_seed(3)
    b = tfkernels.varlen_attention(*args, dropout_p=0.3, causal=True, backend=backend)
    assert torch.equal(a, b)
    clean = tfkernels.varlen_attention(*args, causal=True, backend=backend)
    assert not torch.allclose(a, clean)
    assert (tfkernels.varlen_attention(*args, dropout_p=1.0, causal=True, backend=backend) == 0).all()


def test_varlen_packed_qkv_views(backend):
    """q, k, v as strided views of one packed (total, 3, H, D) projection, as FlashAttention's qkvpacked
    callers hold them: no copy needed, same answer as contiguous inputs."""
    lens = [7, 12]
    qkv = torch.randn(sum(lens), 3, 2, 32, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(1)
    out = tfkernels.varlen_attention(q, k, v, _cu(lens), causal=True, backend=backend)
    ref, _ = reference(q, k, v, lens, lens, True)
    assert_close(out, ref, torch.float32, "out")
    dout = torch.randn_like(ref)
    (g,) = torch.autograd.grad((out.double() * dout).sum(), qkv)
    (r,) = torch.autograd.grad((ref * dout).sum(), qkv)
    assert_close(g, r, torch.float32, "dqkv", scale=2.0)


@pytest.mark.parametrize("lens", [([0], [0]), ([], []), ([3], [0]), ([0], [4]), ([0, 3], [2, 0])],
                         ids=["empty", "no-sequences", "no-keys", "no-queries", "one-side-each"])
def test_varlen_empty(backend, lens):
    """Empty sequences and empty batches: zero rows, -inf lse, zero gradients, no error."""
    lens_q, lens_k = lens
    q, k, v = _inputs(lens_q, lens_k, 2, 2, 16, torch.float32)
    out, lse = tfkernels.varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), causal=True, return_lse=True,
                                          backend=backend)
    assert out.shape == q.shape and lse.shape == (2, q.shape[0]) and (out == 0).all() and torch.isinf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, (q, k, v)))


def test_varlen_reads_offsets_once_per_tensor_version(monkeypatch):
    """The host read (a sync) happens once per offsets tensor, as a model's layers share it; an
    in-place change is read again (and checked)."""
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    for _ in range(3):
        tfkernels.varlen_attention(q, q, q, cu, causal=True, backend="torch")
    assert len(reads) == 1
    cu[1] = 11
    with pytest.raises(ValueError, match="non-decreasing"):
        tfkernels.varlen_attention(q, q, q, cu, causal=True, backend="torch")
    with torch.inference_mode():
        cu_inf = torch.tensor([0, 4, 10])
        out = tfkernels.varlen_attention(q, q, q, cu_inf, causal=True, backend="torch")
    assert out.shape == q.shape


def _nested(lens, H, D, dtype=torch.float32):
    """A jagged nested (B, H, j, D) as SDPA takes it, and its leaf (B, j, H * D)."""
    leaf = torch.nested.nested_tensor([torch.randn(n, H * D, dtype=dtype) for n in lens], layout=torch.jagged,
                                      device=DEVICE, requires_grad=True)
    return leaf.unflatten(-1, (H, D)).transpose(1, 2), leaf


@pytest.mark.parametrize("case", ["self-causal", "cross-window"])
def test_attention_takes_jagged_nested_tensors(backend, case):
    """attention() on SDPA's jagged layout: each sequence on its own, is_causal and the window
    top-left per sequence (SDPA's convention); the output shares q's ragged structure."""
    if case == "self-causal":
        lens_q = lens_k = [5, 12, 1]
        causal, window, Hkv = True, (-1, -1), 1
    else:
        lens_q, lens_k = [6, 3, 9], [4, 8, 9]
        causal, window, Hkv = False, (2, 1), 2
    q, qleaf = _nested(lens_q, 4, 32)
    k, kleaf = _nested(lens_k, Hkv, 32)
    v, vleaf = _nested(lens_k, Hkv, 32)
    out, lse = tfkernels.attention(q, k, v, is_causal=causal, window_size=window, enable_gqa=Hkv > 1,
                                   return_lse=True, backend=backend)
    assert out.is_nested and out.shape[:2] == (3, 4) and out._ragged_idx == 2 and lse.shape[:2] == (3, 4)
    flat = lambda t: t.values().transpose(0, 1)  # noqa: E731 (B, H, j, D) nested -> (total, H, D)
    ref_out, ref_lse = reference(flat(q), flat(k), flat(v), lens_q, lens_k, causal, window, bottom_right=False)
    assert_close(out.values().transpose(0, 1), ref_out, torch.float32, "out")
    fin = torch.isfinite(ref_lse)
    assert_close(lse.values()[fin], ref_lse[fin], torch.float32, "lse")
    dout = torch.randn_like(ref_out)
    loss = (out.values().transpose(0, 1).double() * dout).sum()
    ref_loss = (ref_out * dout).sum()
    for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(loss, (qleaf, kleaf, vleaf), retain_graph=True),
                          torch.autograd.grad(ref_loss, (qleaf, kleaf, vleaf))):
        assert_close(g.values(), r.values(), torch.float32, name, scale=2.0)


def test_attention_jagged_bad_input():
    q, _ = _nested([3, 5], 2, 16)
    with pytest.raises(TypeError, match="v is .*not nested"):
        tfkernels.attention(q, q, torch.randn(2, 2, 5, 16))
    with pytest.raises(ValueError, match=r"\(B, H, j, D\)"):
        tfkernels.attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))
    with pytest.raises(ValueError, match="no attn_mask"):
        tfkernels.attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    k, _ = _nested([3], 2, 16)
    with pytest.raises(ValueError, match="same batch size"):
        tfkernels.attention(q, k, k)


def test_varlen_bad_input():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    call = tfkernels.varlen_attention
    with pytest.raises(ValueError, match="q must be"):
        call(q[None], q, q, cu)
    with pytest.raises(TypeError, match="cu_seqlens_q must be an integer"):
        call(q, q, q, cu.float())
    with pytest.raises(ValueError, match="cu_seqlens_q must be 1-D"):
        call(q, q, q, cu[None])
    with pytest.raises(ValueError, match="must start at 0"):
        call(q, q, q, cu + 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        call(q, q, q, torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 9"):
        call(q, q, q, torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="same length"):
        call(q, q, q, cu, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="cu_seqlens_k ends at 10, but k has 7"):
        call(q, q[:7], q[:7], cu, cu)
    with pytest.raises(ValueError, match="without cu_seqlens_k"):
        call(q, q[:7], q[:7], cu)
    with pytest.raises(ValueError, match="k and v"):
        call(q, q, q[:7], cu)
    with pytest.raises(ValueError, match="max_seqlen_q=5 is less than the longest sequence, 6"):
        call(q, q, q, cu, cu, 5, 6)
    with pytest.raises(TypeError, match="causal must be a bool"):
        call(q, q, q, cu, causal=1)
    with pytest.raises(TypeError, match="window_size"):
        call(q, q, q, cu, window_size=3)


def test_attention_jagged_compiles():
    """A model over nested tensors under torch.compile: the offsets are not read, and the frame-free
    self-attention path needs nothing from the host."""
    x, _ = _nested([5, 3], 2, 16)
    x = x.transpose(1, 2).flatten(-2).detach().requires_grad_()  # the (B, j, H * D) leaf

    def f(x):
        q = x.unflatten(-1, (2, 16)).transpose(1, 2)
        return tfkernels.attention(q, q, q, is_causal=True).transpose(1, 2).flatten(-2)

    eager = f(x)
    compiled = torch.compile(f)(x)
    assert_close(compiled.values(), eager.values(), torch.float32, "compiled")
    (g,) = torch.autograd.grad(compiled.values().sum(), x)
    (ge,) = torch.autograd.grad(eager.values().sum(), x)
    assert_close(g.values(), ge.values(), torch.float32, "grad")


# ----------------------------------------------------------------------------------------------
# flash_attn_func / flash_attn_varlen_func: FlashAttention's own signatures
# ----------------------------------------------------------------------------------------------

# (B, T_q, T_k, H_q, H_kv, causal, window): bottom-right alignment when T_q != T_k
DENSE_CASES = {
    "square-causal-gqa": (2, 19, 19, 4, 2, True, (-1, -1)),  # both corners agree: the (B, H, T, D) views
    "decode-chunk-causal": (2, 5, 23, 2, 2, True, (-1, -1)),  # T_q < T_k: each row over its KV cache
    "more-queries-window": (1, 21, 9, 2, 1, True, (4, 0)),  # T_q > T_k: the first 12 rows see nothing
    "cross-no-alignment": (2, 7, 13, 2, 2, False, (-1, -1)),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_flash_attn_func_matches_flash_attention_semantics(backend, case):
    B, Tq, Tk, Hq, Hkv, causal, window = DENSE_CASES[case]
    q = torch.randn(B, Tq, Hq, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Tk, Hkv, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(B, Tk, Hkv, 32, device=DEVICE, requires_grad=True)
    out, lse, probs = tfkernels.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                                                return_attn_probs=True, deterministic=True, backend=backend)
    assert out.shape == (B, Tq, Hq, 32) and lse.shape == (B, Hq, Tq) and probs is None and out.is_contiguous()
    # the packed reference: each batch row one sequence, bottom-right
    ref_out, ref_lse = reference(q.reshape(B * Tq, Hq, 32), k.reshape(B * Tk, Hkv, 32), v.reshape(B * Tk, Hkv, 32),
                                 [Tq] * B, [Tk] * B, causal, window, scale=0.3)
    assert_close(out.reshape(B * Tq, Hq, 32), ref_out, torch.float32, "out")
    ref_lse = ref_lse.reshape(Hq, B, Tq).transpose(0, 1)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse).cpu(), (~fin).cpu())
    assert_close(lse[fin], ref_lse[fin], torch.float32, "lse")
    dout = torch.randn_like(ref_out)
    grads = torch.autograd.grad((out.reshape(B * Tq, Hq, 32).double() * dout).sum(), (q, k, v), retain_graph=True)
    ref_grads = torch.autograd.grad((ref_out * dout).sum(), (q, k, v))
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, torch.float32, name, scale=2.0)


def test_flash_attn_varlen_func_is_varlen_attention(backend):
    lens_q, lens_k = [3, 8], [6, 8]
    q, k, v = _inputs(lens_q, lens_k, 2, 2, 32, torch.float32)
    args = (q, k, v, _cu(lens_q), _cu(lens_k), 8, 8)
    out, lse, probs = tfkernels.flash_attn_varlen_func(*args, 0.0, 0.25, True, (2, 0), 0.0, None, False, True,
                                                       backend=backend)
    ref, ref_lse = tfkernels.varlen_attention(*args, scale=0.25, causal=True, window_size=(2, 0), return_lse=True,
                                              backend=backend)
    assert probs is None and torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_flash_api_refuses_what_it_lacks():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        tfkernels.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="flash_attn_func: q must be"):
        tfkernels.flash_attn_func(q[0], q, q)


def test_flash_attn_packed_forms(backend):
    """The qkvpacked / kvpacked forms are the unpacked functions on views of the packed tensor."""
    torch.manual_seed(5)
    qkv = torch.randn(2, 11, 3, 2, 32, device=DEVICE, requires_grad=True)
    out = tfkernels.flash_attn_qkvpacked_func(qkv, causal=True, backend=backend)
    ref = tfkernels.flash_attn_func(*qkv.unbind(2), causal=True, backend=backend)
    assert torch.equal(out, ref)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    assert g.shape == qkv.shape and torch.isfinite(g).all() and g[:, :, 2].abs().sum() > 0
    q, kv = qkv[:, :4, 0].detach(), qkv[:, :, 1:].detach()
    out = tfkernels.flash_attn_kvpacked_func(q, kv, causal=True, window_size=(3, 0), backend=backend)
    assert torch.equal(out, tfkernels.flash_attn_func(q, *kv.unbind(2), causal=True, window_size=(3, 0),
                                                      backend=backend))
    lens = [4, 7]
    flat = qkv.detach()[0]  # (11, 3, 2, 32): two packed sequences
    out = tfkernels.flash_attn_varlen_qkvpacked_func(flat, _cu(lens), 7, causal=True, backend=backend)
    assert torch.equal(out, tfkernels.varlen_attention(*flat.unbind(1), _cu(lens), causal=True, backend=backend))
    out, lse, _ = tfkernels.flash_attn_varlen_kvpacked_func(flat[:5, 0], flat[:, 1:], _cu([2, 3]), _cu(lens), 3, 7,
                                                            causal=True, return_attn_probs=True, backend=backend)
    ref, ref_lse = tfkernels.varlen_attention(flat[:5, 0], *flat[:, 1:].unbind(1), _cu([2, 3]), _cu(lens),
                                              causal=True, return_lse=True, backend=backend)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, heads, head_dim\)"):
        tfkernels.flash_attn_qkvpacked_func(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"kv must be \(total, 2, heads, head_dim\)"):
        tfkernels.flash_attn_varlen_kvpacked_func(flat[:, 0], flat, _cu(lens), _cu(lens))
