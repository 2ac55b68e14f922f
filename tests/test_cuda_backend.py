"""The CUDA C++ backend (csrc/) against float64 references: every op, forward and every gradient,
every dtype, awkward shapes, strided and expanded inputs. On a GPU the extension is JIT-compiled on
first use unless it was prebuilt (TFKERNELS_BUILD_CUDA=1 pip install ...); without one,
TFKERNELS_CUDA_EMULATE=1 runs the same kernels on CPU tensors through csrc/emulation (as CI does).

The rest of the suite (test_norms, test_softmax, test_attention, ...) also runs every test with
backend="cuda" when the extension is available (the `backend` fixture); this file adds the cases
aimed at the C++ code paths: vectorised vs strided rows, misaligned row starts, stride-0 inputs,
rows longer than one block's sweep, the shared-memory tile sizes of attention, dropout parity
with the Triton kernels.
"""
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tfkernels
from tfkernels import _cuda_ext, reference

from conftest import CUDA_BACKEND_DEVICE, CUDA_EMULATED, DEVICE, DTYPES, assert_close, check_attention

DEV = DEVICE  # "cpu" when the backend is emulated


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if not CUDA_BACKEND_DEVICE:
        pytest.skip("needs a CUDA GPU, or TFKERNELS_CUDA_EMULATE=1 without one")
    if not _cuda_ext.is_available(load=True):
        reason = _cuda_ext.unavailable_reason()
        if "TFKERNELS_CUDA_JIT=0" in reason or "nvcc was not found" in reason:
            pytest.skip(f"the CUDA extension cannot be had here: {reason}")  # a setting or a missing toolkit
        pytest.fail(f"the CUDA extension is unavailable: {reason}")          # a build or load error is a failure


def _grads(out, inputs, dy):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], dy)


# ----------------------------------------------------------------------------- norms

# (rows, N): tiny row (one warp), odd lengths (scalar tail after the 16-byte vectors), a power of
# two, rows longer than 1024 threads x 8 (several sweeps per thread), a single very long row.
NORM_SHAPES = [(1, 7), (3, 1000), (4, 1023), (5, 4097), (2, 8192), (3, 12345), (1, 65536)]


def _make_input(shape, dtype, layout):
    """x of `shape` laid out contiguous, transposed-strided, misaligned (offset by one element) or expanded."""
    M, N = shape
    if layout == "contiguous":
        return torch.randn(M, N, device=DEV, dtype=dtype) * 2 + 0.5
    if layout == "strided":  # column stride != 1
        return (torch.randn(N, M, device=DEV, dtype=dtype) * 2 + 0.5).t()
    if layout == "misaligned":  # contiguous rows starting one element past a 16-byte boundary
        return (torch.randn(M * N + 1, device=DEV, dtype=dtype) * 2 + 0.5)[1:].view(M, N)
    if layout == "expanded":  # row stride 0
        return (torch.randn(1, N, device=DEV, dtype=dtype) * 2 + 0.5).expand(M, N)
    raise ValueError(layout)


def _norm_case(op, shape, dtype, layout, affine, w_dtype=None):
    torch.manual_seed(hash((op, shape, str(dtype), layout, affine)) % 2**31)
    N = shape[-1]
    x = _make_input(shape, dtype, layout).requires_grad_(True)
    w_dtype = w_dtype or dtype
    w = (torch.randn(N, device=DEV, dtype=w_dtype) * 0.5 + 1).requires_grad_(True) if affine else None
    b = (torch.randn(N, device=DEV, dtype=w_dtype)).requires_grad_(True) if affine and op == "layer_norm" else None
    x64, w64, b64 = (t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b))
    if op == "layer_norm":
        y = tfkernels.layer_norm(x, (N,), w, b, 1e-5, backend="cuda")
        ref = F.layer_norm(x64, (N,), w64, b64, 1e-5)
    else:
        y = tfkernels.rms_norm(x, (N,), w, 1e-5, backend="cuda")
        ref = reference.rms_norm(x64, (N,), w64, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, ref, dtype, "y")
    dy = torch.randn_like(y)
    got = _grads(y, (x, w, b), dy)
    want = _grads(ref, (x64, w64, b64), dy.double())
    for name, g, r in zip(["dx", "dw", "db"], got, want):
        assert_close(g, r, dtype if name == "dx" else w_dtype, name, scale=1.0 if name == "dx" else 4.0)


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm(op, shape, dtype, affine):
    _norm_case(op, shape, dtype, "contiguous", affine)


@pytest.mark.parametrize("layout", ["strided", "misaligned", "expanded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_layouts(op, dtype, layout):
    _norm_case(op, (6, 1000), dtype, layout, True)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_mixed_weight_dtype(op):
    _norm_case(op, (4, 520), torch.bfloat16, "contiguous", True, w_dtype=torch.float32)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_expanded_grad(op):
    """The gradient of sum() reaches the backward as a stride-0 tensor."""
    x = torch.randn(64, 300, device=DEV, requires_grad=True)
    w = torch.randn(300, device=DEV, requires_grad=True)
    fn = tfkernels.layer_norm if op == "layer_norm" else tfkernels.rms_norm
    (fn(x, (300,), w, eps=1e-5, backend="cuda") * 1.0).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = F.layer_norm(x64, (300,), w64, None, 1e-5) if op == "layer_norm" else reference.rms_norm(x64, (300,), w64, 1e-5)
    ref.sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, "dx")
    assert_close(w.grad, w64.grad, torch.float32, "dw", scale=4.0)


def test_norm_large_mean():
    """|mean| >> std: the two-pass variance stays accurate."""
    x = torch.randn(8, 3000, device=DEV) + 1000.0
    y = tfkernels.layer_norm(x, (3000,), backend="cuda")
    assert_close(y, F.layer_norm(x.double(), (3000,)), torch.float32, "y", scale=10.0)


def test_norm_many_rows():
    """Many short rows: several row groups in the two-stage dw/db reduction."""
    _norm_case("layer_norm", (20000, 64), torch.float16, "contiguous", True)


# ----------------------------------------------------------------------------- softmax

SOFTMAX_SHAPES = [(1, 1), (3, 7), (4, 1000), (5, 4097), (2, 10000), (1, 70000)]


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
def test_softmax(shape, dtype, layout):
    torch.manual_seed(hash((shape, str(dtype), layout)) % 2**31)
    x = _make_input(shape, dtype, layout).requires_grad_(True)
    y = tfkernels.softmax(x, -1, backend="cuda")
    x64 = x.detach().double().requires_grad_(True)
    ref = torch.softmax(x64, -1)
    assert_close(y, ref, dtype, "y")
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, dy)
    (r,) = torch.autograd.grad(ref, x64, dy.double())
    assert_close(g, r, dtype, "dx")


def test_softmax_inf_rows():
    x = torch.randn(4, 33, device=DEV)
    x[0] = float("-inf")  # all -inf -> NaN, as torch
    x[1, :10] = float("-inf")
    x[2, 5] = float("nan")
    y = tfkernels.softmax(x, -1, backend="cuda")
    ref = torch.softmax(x, -1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.allclose(y[ok], ref[ok], atol=1e-6)


def test_softmax_other_dim_and_expanded_grad():
    x = torch.randn(3, 50, 7, device=DEV, requires_grad=True)
    y = tfkernels.softmax(x, 1, backend="cuda")
    y.sum().backward()  # dy expanded (stride 0): the gradient is ~0
    assert_close(y, torch.softmax(x.detach().double(), 1), torch.float32, "y")
    assert x.grad.abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- attention

ATT_TOL_SCALE = {torch.float32: 2.0, torch.float16: 2.0, torch.bfloat16: 2.0}

# (B, Hq, Hkv, Tq, Tk, D, causal): lengths not multiples of 16/32/64, Tq != Tk both ways, GQA/MQA,
# head dims 16..256 incl. non-multiples of 16 (40, 72, 100), which select the 64/32/16 tile sizes
ATT_CASES = [
    (1, 2, 2, 1, 1, 16, False),
    (1, 2, 2, 1, 37, 64, True),
    (2, 3, 3, 37, 37, 32, True),
    (1, 4, 2, 91, 129, 64, False),
    (1, 4, 1, 129, 65, 96, True),
    (2, 2, 2, 65, 130, 128, True),
    (1, 2, 2, 33, 70, 40, False),
    (1, 2, 2, 50, 50, 72, True),
    (1, 1, 1, 77, 41, 100, False),
    (1, 2, 2, 70, 70, 160, True),
    (1, 2, 1, 40, 90, 256, True),
]


def _att_check(q, k, v, dtype, **kwargs):
    check_attention(q, k, v, "cuda", dtype, out_scale=ATT_TOL_SCALE[dtype], grad_scale=2 * ATT_TOL_SCALE[dtype], **kwargs)


@pytest.mark.parametrize("case", ATT_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention(case, dtype):
    B, Hq, Hkv, Tq, Tk, D, causal = case
    torch.manual_seed(hash((case, str(dtype))) % 2**31)
    q = torch.randn(B, Hq, Tq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, device=DEV, dtype=dtype)
    _att_check(q, k, v, dtype, is_causal=causal, enable_gqa=Hq != Hkv)


@pytest.mark.parametrize("shape", [(2, 2, 200, 200, 64), (4, 2, 136, 200, 128)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_16bit_plain_tiles(dtype, causal, shape):
    """The lean path for tiles that need no per-score rule (no mask, no dropout, every score in
    range and, when causal, visible), next to tiles that do, in all three kernels. T = 200 is three
    full 64-key tiles and a ragged one; causal rows from 64 on see full key tiles (forward, dQ), and
    the dK/dV kernel's key warps see full query tiles (64 at D = 64, 32 at D = 128) past their last
    key; T_q = 136 leaves the dK/dV kernel a ragged query tile."""
    Hq, Hkv, Tq, Tk, D = shape
    torch.manual_seed(31 + causal + D)
    q = torch.randn(1, Hq, Tq, D, device=DEV, dtype=dtype)
    k, v = (torch.randn(1, Hkv, Tk, D, device=DEV, dtype=dtype) for _ in range(2))
    _att_check(q, k, v, dtype, is_causal=causal, enable_gqa=Hq != Hkv)


def _launch_tiles(trace: str) -> set:
    """The fp32 attention tile heights BM seen in a TFKERNELS_CUDA_EMU_TRACE log: every attention kernel
    runs 128 threads on a (heads, ceil(T / BM)) grid; the test shapes below tell the BMs apart."""
    rows = {8: 45, 4: 70}  # grid.x -> the length its grid.y covers: B*Hq -> Tq, B*Hkv -> Tk
    tiles = set()
    for m in re.finditer(r"grid \((\d+), (\d+), 1\), block \(128, 1, 1\)", trace):
        gx, gy = int(m.group(1)), int(m.group(2))
        if gx in rows:
            tiles |= {bm for bm in (64, 32, 16) if -(-rows[gx] // bm) == gy}
    return tiles


def _launch_smem(trace: str) -> set:
    """The dynamic shared memory sizes of the launches in a TFKERNELS_CUDA_EMU_TRACE log (the delta
    kernel's 0 left out): for the 16-bit kernels they tell one pipeline stage from two."""
    return {int(b) for b in re.findall(r"block \(128, 1, 1\), (\d+) bytes", trace)} - {0}


# sm_86/sm_89 GPUs (RTX 30xx/40xx, A10, L4) allow 99 KiB of shared memory per block, an A100 163 KiB:
# there the fp32 kernels fall back to 32- and 16-row tiles, which an H100's 227 KiB rarely needs.
@pytest.mark.skipif(not CUDA_EMULATED, reason="the emulated device's shared-memory limit is settable; a GPU's is not")
@pytest.mark.parametrize("smem, D, tiles", [
    (101376, 64, {64, 32}),
    (101376, 256, {16}),   # fp32 keeps its probability tiles in the score tiles to fit
    (166912, 128, {64, 32}),
], ids=str)
def test_attention_fp32_small_shared_memory_tiles(monkeypatch, capfd, smem, D, tiles):
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_SMEM", str(smem))
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_TRACE", "1")
    assert _launch_tiles(_check_gqa_and_mask(capfd, D, torch.float32)) == tiles


# The 16-bit kernels copy the next K/V (or Q/dO) tile while computing on the current one when two
# tiles fit, and fall back to one stage where they do not (dQ and dK/dV at D >= 128 on 99 KiB GPUs).
# Bytes: (rows of Q [+ dO] + stages * 2 * key or query tile) * (D + 8) * 2.
@pytest.mark.skipif(not CUDA_EMULATED, reason="the emulated device's shared-memory limit is settable; a GPU's is not")
@pytest.mark.parametrize("smem, D, dtype, sizes", [
    (232448, 256, torch.bfloat16, {101376, 135168}),        # fwd 2 stages of 32 keys; dQ, dK/dV 2 stages
    (101376, 256, torch.bfloat16, {101376}),                # fwd 2 stages; dQ, dK/dV 1 stage
    (166912, 128, torch.float16, {87040, 104448, 69632}),   # fwd, dQ 2 stages of 64 keys; dK/dV 2 of 32 queries
    (101376, 128, torch.float16, {87040, 69632}),           # dQ drops to 1 stage
], ids=str)
def test_attention_16bit_pipeline_stages(monkeypatch, capfd, smem, D, dtype, sizes):
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_SMEM", str(smem))
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_TRACE", "1")
    assert _launch_smem(_check_gqa_and_mask(capfd, D, dtype)) == sizes


# At D = 256 the dK/dV gradients are two launches on the (B * H_kv, T_k / 64) grid, dV then dK (each
# holds one fp32 accumulator: no spills); TFKERNELS_CUDA_DKDV_PASSES=1 runs the one-launch kernel
# (to time both). Both against float64, a float mask's gradient (written by the dK pass) included.
@pytest.mark.skipif(not CUDA_EMULATED, reason="counts launches in the emulator's trace")
@pytest.mark.parametrize("passes", ["2", "1"])
def test_attention_d256_dkdv_passes(monkeypatch, capfd, passes):
    if passes == "1":
        monkeypatch.setenv("TFKERNELS_CUDA_DKDV_PASSES", "1")
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_TRACE", "1")
    trace = _check_gqa_and_mask(capfd, 256, torch.bfloat16)
    assert len(re.findall(r"grid \(4, 2, 1\), block \(128, 1, 1\)", trace)) == int(passes)  # B * H_kv = 4


def _check_gqa_and_mask(capfd, D, dtype) -> str:
    """Causal GQA, then a float mask, on the shapes _launch_tiles knows; returns the GQA launches' trace."""
    torch.manual_seed(D)
    q = torch.randn(2, 4, 45, D, device=DEV, dtype=dtype)
    k = torch.randn(2, 2, 70, D, device=DEV, dtype=dtype)
    v = torch.randn(2, 2, 70, D, device=DEV, dtype=dtype)
    capfd.readouterr()
    _att_check(q, k, v, dtype, is_causal=True, enable_gqa=True)
    trace = capfd.readouterr().err
    mask = torch.randn(1, 4, 45, 70, device=DEV, dtype=dtype)
    _att_check(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), dtype, mask=mask)
    return trace


# Before sm_80 (T4, RTX 20xx: where Triton's support ends, so where this backend matters most) there
# is no mma.sync m16n8k16 or cp.async: fp16/bf16 attention takes the FMA path, tiles converted to fp32.
# The emulated sm_75 fails any launch that uses the sm_80 instructions, so passing here proves the path.
@pytest.mark.skipif(not CUDA_EMULATED, reason="the emulated device's compute capability is settable; a GPU's is not")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_16bit_before_sm80(monkeypatch, capfd, dtype):
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_CC", "75")
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_TRACE", "1")
    assert _launch_tiles(_check_gqa_and_mask(capfd, 72, dtype)) == {64}
    q = torch.randn(2, 2, 33, 256, device=DEV, dtype=dtype)
    _att_check(q, q.flip(2), q.flip(1), dtype, is_causal=True)


@pytest.mark.skipif(not CUDA_EMULATED, reason="the emulated device's shared-memory limit is settable; a GPU's is not")
@pytest.mark.parametrize("dtype, what", [
    (torch.float32, "head dim 256 in float32 needs more shared memory"),   # 64 KiB: sm_75
    (torch.bfloat16, "head dim 256 in bfloat16 needs more shared memory"),
])
def test_attention_tiles_too_big_for_the_device(monkeypatch, dtype, what):
    """Where not even the smallest tiles fit, the error says so."""
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_SMEM", str(64 * 1024))
    q = torch.randn(1, 1, 20, 256, device=DEV, dtype=dtype)
    with pytest.raises(RuntimeError, match=what):
        tfkernels.attention(q, q, q, backend="cuda")


# Sliding windows and soft-capping on the kernels' own paths: shapes of several tiles, so a query
# block skips key tiles on both sides of its band, the dK/dV kernel's key blocks skip query tiles,
# warps skip tiles their rows miss, and full tiles inside the band take the lean path (soft-capped
# or not); a float mask brings the mask/dropout + window/softcap variant; T_q > T_k + left leaves
# rows (and whole query blocks) that see nothing. Run on the default device, with 99 KiB of shared
# memory (fp32 32/16-row tiles, 16-bit one-stage pipelines at D = 128) and before sm_80 (fp16 and
# bf16 on the FMA path).
WINDOW_CASES = [
    # (Hq, Hkv, Tq, Tk, D, causal, window, softcap, mask)
    (2, 1, 200, 200, 64, True, (70, 0), 0.0, False),
    (2, 2, 150, 210, 128, False, (30, 45), 3.0, False),
    (2, 1, 210, 150, 40, False, (0, 0), 0.0, False),
    (1, 1, 190, 60, 64, False, (20, -1), 2.0, False),
    (2, 1, 130, 170, 96, True, (-1, -1), 4.0, False),
    (2, 2, 140, 100, 64, False, (25, 10), 2.5, True),
    # windows whose edge falls one key past a tile's first or last key for some warp: an off-by-one
    # in the plain-tile test (window_covers) shows only there
    (1, 1, 150, 140, 64, False, (-1, 30), 0.0, False),
    (1, 1, 150, 140, 192, True, (62, 0), 2.0, False),
]


def _emulated_device(monkeypatch, device, dtype):
    """The emulated device a tile test runs on: "default", "smem_99k" (sm_86/89's shared memory) or
    "sm75" (no cp.async / bf16 tensor cores); skips what a real GPU or the fp32 path cannot vary."""
    if device != "default" and not CUDA_EMULATED:
        pytest.skip("the emulated device's limits are settable; a GPU's are not")
    if device == "sm75" and dtype == torch.float32:
        pytest.skip("fp32 takes the FMA path on every device")
    if device == "smem_99k":
        monkeypatch.setenv("TFKERNELS_CUDA_EMU_SMEM", "101376")
    elif device == "sm75":
        monkeypatch.setenv("TFKERNELS_CUDA_EMU_CC", "75")


@pytest.mark.parametrize("device", ["default", "smem_99k", "sm75"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_window_softcap_tiles(monkeypatch, device, case, dtype):
    _emulated_device(monkeypatch, device, dtype)
    Hq, Hkv, Tq, Tk, D, causal, window, softcap, with_mask = case
    torch.manual_seed(Tq * Tk + D)
    q = torch.randn(1, Hq, Tq, D, device=DEV, dtype=dtype)
    k, v = (torch.randn(1, Hkv, Tk, D, device=DEV, dtype=dtype) for _ in range(2))
    mask = torch.randn(1, Hq, Tq, Tk, device=DEV, dtype=dtype) if with_mask else None
    _att_check(q, k, v, dtype, is_causal=causal, enable_gqa=Hq != Hkv, window_size=window, softcap=softcap,
               scale=0.5 if softcap else None, mask=mask)


def test_attention_window_softcap_dropout_replay():
    """The cuda kernels' keep mask (the Triton kernels' Philox stream) replayed through the reference
    with a window and soft-capping, forward and every gradient; and dropout_p = 1 drops everything."""
    pytest.importorskip("triton")
    import importlib

    attn_mod = importlib.import_module("tfkernels.ops.attention")
    torch.manual_seed(6)
    B, H, Tq, Tk, D, p = 1, 2, 70, 90, 32, 0.3
    q = torch.randn(B, H, Tq, D, device=DEV)
    k, v = (torch.randn(B, H, Tk, D, device=DEV) for _ in range(2))
    torch.manual_seed(41)
    keep = attn_mod._dropout_mask(int(attn_mod._draw_seed().item()), B, H, Tq, Tk, p, device=DEV)
    _att_check(q, k, v, torch.float32, window_size=(12, 20), softcap=2.0, scale=0.5, dropout_p=p,
               dropout_mask=keep, seed=41)
    for dtype in DTYPES:
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = tfkernels.attention(*leaves, dropout_p=1.0, window_size=(12, 20), softcap=2.0, backend="cuda")
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        for t in (out, *grads):
            assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool_padding", "bool_full", "float_bias", "float_bias_causal", "float_half_mask"])
def test_attention_masks(dtype, kind):
    torch.manual_seed(7)
    B, H, Tq, Tk, D = 2, 3, 45, 70, 64
    q = torch.randn(B, H, Tq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, H, Tk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, H, Tk, D, device=DEV, dtype=dtype)
    causal = kind.endswith("causal")
    if kind == "bool_padding":  # (B, 1, 1, Tk): broadcast with stride-0 dims; one batch fully masked rows
        mask = torch.rand(B, 1, 1, Tk, device=DEV) > 0.3
        mask[1] = False
    elif kind == "bool_full":
        mask = torch.rand(B, H, Tq, Tk, device=DEV) > 0.5
    elif kind == "float_half_mask":  # mask dtype != q dtype
        mask = torch.randn(1, H, Tq, Tk, device=DEV, dtype=torch.float16)
    else:
        mask = torch.randn(1, H, Tq, Tk, device=DEV, dtype=dtype)
    _att_check(q, k, v, dtype, mask=mask, is_causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_strided_inputs(dtype):
    """q/k/v as non-contiguous views (B, T, H, D) -> (B, H, T, D), and an expanded k/v."""
    torch.manual_seed(3)
    B, H, T, D = 2, 4, 53, 64
    qkv = torch.randn(B, T, 3, H, D, device=DEV, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    _att_check(q, k, v, dtype, is_causal=True, scale=0.3)
    k1 = torch.randn(B, 1, T, D, device=DEV, dtype=dtype).expand(B, H, T, D)
    v1 = torch.randn(B, 1, T, D, device=DEV, dtype=dtype).expand(B, H, T, D)
    _att_check(q, k1, v1, dtype)


def test_attention_expanded_dout():
    q, k, v = (torch.randn(1, 2, 33, 64, device=DEV, requires_grad=True) for _ in range(3))
    tfkernels.attention(q, k, v, is_causal=True, backend="cuda").sum().backward()
    r = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference.attention(*r, is_causal=True).sum().backward()
    for t, rt, n in zip((q, k, v), r, "qkv"):
        assert_close(t.grad, rt.grad, torch.float32, "d" + n, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_dropout_matches_triton(dtype):
    """Same seed, same keep mask as the Triton kernels (Philox tl.rand contract); gradients too."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 64, device=DEV, dtype=dtype) for _ in range(3))
    outs, grads = [], []
    for be in ("triton", "cuda"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        torch.manual_seed(123)
        out = tfkernels.attention(*leaves, dropout_p=0.3, is_causal=True, backend=be)
        outs.append(out)
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    assert_close(outs[1], outs[0].double(), dtype, "out", scale=2.0)
    for g1, g0, n in zip(grads[1], grads[0], "qkv"):
        assert_close(g1, g0.double(), dtype, "d" + n, scale=4.0)


def test_attention_dropout_replay():
    """The kernel's keep mask replayed through the reference (via the Triton mask kernel)."""
    pytest.importorskip("triton")
    import importlib

    attn_mod = importlib.import_module("tfkernels.ops.attention")
    torch.manual_seed(5)
    B, H, T, D, p = 1, 2, 45, 32, 0.25
    q, k, v = (torch.randn(B, H, T, D, device=DEV) for _ in range(3))
    torch.manual_seed(99)
    seed = int(attn_mod._draw_seed().item())
    keep = attn_mod._dropout_mask(seed, B, H, T, T, p, device=DEV)
    torch.manual_seed(99)
    out = tfkernels.attention(q, k, v, dropout_p=p, backend="cuda")
    ref = reference.attention(q.double(), k.double(), v.double(), dropout_p=p, dropout_mask=keep)
    assert_close(out, ref, torch.float32, "out", scale=2.0)


def test_attention_fully_masked_and_empty():
    q, k, v = (torch.randn(1, 1, 5, 32, device=DEV) for _ in range(3))
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool, device=DEV)
    out = tfkernels.attention(q, k, v, attn_mask=mask, backend="cuda")
    assert torch.equal(out, torch.zeros_like(out))
    k0, v0 = (torch.randn(1, 1, 0, 32, device=DEV) for _ in range(2))
    assert tfkernels.attention(q, k0, v0, backend="cuda").abs().sum().item() == 0


# ----------------------------------------------------------------------------- attention: documents

def _doc_row(runs):
    """Document ids (T,) int32 from (id, length) runs; a negative id is padding."""
    return torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in runs]).to(DEV)


# Per-batch-row layouts of T = 300 tokens as (id, length) runs: lengths off every tile (16, 32, 64),
# a one-token document, padding at the end, at the start and between documents, unsorted ids (the
# kernels' spans then cover every key and every tile is tested per score), padding inside a
# document (unsorted search key, the same fallback), one document, nothing but padding.
DOC_LAYOUTS = {
    "packed": [(0, 70), (1, 1), (2, 100), (3, 45), (4, 84)],
    "pad_end": [(0, 90), (1, 64), (2, 57), (-1, 89)],
    "pad_start": [(-1, 40), (0, 100), (1, 70), (2, 90)],
    "pad_between": [(0, 80), (-1, 30), (1, 93), (-1, 1), (2, 96)],
    "unsorted": [(3, 50), (1, 60), (2, 40), (1, 50), (0, 100)],
    "pad_inside": [(0, 50), (-1, 10), (0, 140), (1, 100)],
    "single": [(7, 300)],
    "all_padding": [(-1, 300)],
}


# every layout in fp32 (the FMA path) and bf16 (tensor cores); fp16 (the bf16 kernels but for the
# mma.sync type) on the three whose tiles take the most paths: a ragged pack, unsorted ids, padding
# inside a document
DOC_DTYPE_LAYOUTS = [(dtype, layout) for dtype in (torch.float32, torch.bfloat16) for layout in DOC_LAYOUTS] + [
    (torch.float16, layout) for layout in ("packed", "unsorted", "pad_inside")]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,layout", DOC_DTYPE_LAYOUTS, ids=lambda x: str(x))
def test_attention_documents(dtype, layout, causal):
    """Forward and every gradient with document ids against float64 (GQA, D = 72: padded head dim),
    batch row 1 packed the usual way next to row 0's layout (spans are per row)."""
    torch.manual_seed(len(layout) * 7 + causal)
    ids = torch.stack([_doc_row(DOC_LAYOUTS[layout]), _doc_row(DOC_LAYOUTS["packed"])])
    q = torch.randn(2, 4, 300, 72, device=DEV, dtype=dtype)
    k, v = (torch.randn(2, 2, 300, 72, device=DEV, dtype=dtype) for _ in range(2))
    out = check_attention(q, k, v, "cuda", dtype, out_scale=ATT_TOL_SCALE[dtype], grad_scale=2 * ATT_TOL_SCALE[dtype],
                          is_causal=causal, enable_gqa=True, document_ids=ids)
    assert torch.all(out.transpose(1, 2)[ids < 0] == 0)  # padding rows return 0
    if layout == "single":  # one document everywhere: attention without ids, bit for bit
        plain = tfkernels.attention(q, k, v, is_causal=causal, enable_gqa=True, backend="cuda")
        assert torch.equal(out[0], plain[0])


# Documents with the other rules, on the kernels' own paths (shapes of several tiles), on the default
# device, with 99 KiB of shared memory and before sm_80, as the window cases above:
# (Hq, Hkv, Tq, Tk, D, causal, window, softcap, mask, q runs, k runs (None: the q runs))
_P200 = [(0, 37), (1, 64), (2, 3), (3, 60), (4, 36)]
DOC_RULE_CASES = [
    (2, 1, 200, 200, 64, True, None, 0.0, None, _P200, None),
    (2, 2, 180, 180, 128, False, (30, 20), 2.0, None, [(0, 100), (-1, 20), (1, 60)], None),
    # T_q != T_k, a pair of id tensors: queries of two documents over keys of three, padding keys
    (2, 1, 150, 210, 40, True, None, 0.0, None, [(0, 60), (2, 90)], [(0, 70), (1, 40), (2, 80), (-1, 20)]),
    (2, 1, 210, 150, 64, False, (40, -1), 0.0, None, [(-1, 10), (0, 100), (1, 100)], [(0, 90), (1, 60)]),
    (2, 2, 190, 190, 64, False, None, 0.0, "bool", [(0, 64), (1, 64), (2, 62)], None),
    (1, 1, 170, 170, 96, True, None, 0.0, "float", [(0, 30), (1, 90), (-1, 6), (2, 44)], None),
    (1, 1, 160, 160, 192, True, (40, 0), 0.0, None, [(0, 33), (1, 95), (2, 32)], None),
    (1, 1, 130, 130, 256, False, None, 3.0, "float", [(5, 70), (2, 60)], None),  # unsorted
]


@pytest.mark.parametrize("device", ["default", "smem_99k", "sm75"])
@pytest.mark.parametrize("case", DOC_RULE_CASES, ids=lambda c: "D{}_Tq{}_Tk{}_{}".format(
    c[4], c[2], c[3], "_".join(x for x in ("causal" if c[5] else "", "win" if c[6] else "", "cap" if c[7] else "",
                                           c[8] or "") if x) or "docs"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_documents_with_rules(monkeypatch, device, case, dtype):
    _emulated_device(monkeypatch, device, dtype)
    Hq, Hkv, Tq, Tk, D, causal, window, softcap, mask_kind, q_runs, k_runs = case
    torch.manual_seed(Tq * Tk + D)
    q = torch.randn(1, Hq, Tq, D, device=DEV, dtype=dtype)
    k, v = (torch.randn(1, Hkv, Tk, D, device=DEV, dtype=dtype) for _ in range(2))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, Tq, Tk, device=DEV) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(1, Hq, Tq, Tk, device=DEV, dtype=dtype)
    docs = _doc_row(q_runs)[None] if k_runs is None else (_doc_row(q_runs)[None], _doc_row(k_runs)[None])
    _att_check(q, k, v, dtype, is_causal=causal, enable_gqa=Hq != Hkv, window_size=window, softcap=softcap,
               scale=0.5 if softcap else None, mask=mask, document_ids=docs)


def test_attention_documents_dropout_replay():
    """Dropout with documents: the keep mask replayed through the reference, forward and every
    gradient (fp32, and causal fp16 on tensor cores); dropout_p = 1 gives zeros."""
    pytest.importorskip("triton")
    import importlib

    attn_mod = importlib.import_module("tfkernels.ops.attention")
    B, H, T, D, p = 2, 2, 150, 32, 0.3
    ids = torch.stack([_doc_row([(0, 50), (1, 70), (-1, 30)]), _doc_row([(3, 20), (4, 130)])])
    for dtype, causal in ((torch.float32, False), (torch.float16, True)):
        torch.manual_seed(8)
        q, k, v = (torch.randn(B, H, T, D, device=DEV, dtype=dtype) for _ in range(3))
        torch.manual_seed(43)
        keep = attn_mod._dropout_mask(int(attn_mod._draw_seed().item()), B, H, T, T, p, device=DEV)
        _att_check(q, k, v, dtype, is_causal=causal, dropout_p=p, dropout_mask=keep, seed=43, document_ids=ids)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = tfkernels.attention(*leaves, dropout_p=1.0, document_ids=ids, backend="cuda")
    for t in (out, *torch.autograd.grad(out, leaves, torch.ones_like(out))):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("device", ["default", "smem_99k", "sm75"])
@pytest.mark.parametrize("D", [64, 192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_documents_skip_other_tiles(monkeypatch, dtype, D, device):
    """What the kernels do not need they never read into a product: padding tokens hold NaN in Q, K
    and V, at the start, between documents (a gap longer than a 64-row block, so that no block's
    range spans it) and at the end, and not aligned to any tile, so padding shares granules and
    tiles with real tokens. Any visit would spread the NaN (0 * NaN in P V, dS K, dS^T Q or dP).
    Output and every gradient stay finite and equal the reference without those tokens; the
    padding rows and keys get zeros."""
    _emulated_device(monkeypatch, device, dtype)
    ids = _doc_row([(-1, 50), (0, 100), (1, 27), (-1, 90), (2, 70), (3, 47), (-1, 30)])[None]  # T = 414
    pad = ids[0] < 0
    torch.manual_seed(D)
    q = torch.randn(1, 2, 414, D, device=DEV, dtype=dtype)
    k, v = (torch.randn(1, 1, 414, D, device=DEV, dtype=dtype) for _ in range(2))
    for t in (q, k, v):
        t[:, :, pad] = float("nan")
    dout = torch.randn(1, 2, 414, D, device=DEV, dtype=dtype)
    for causal in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = tfkernels.attention(*leaves, is_causal=causal, enable_gqa=True, document_ids=ids, backend="cuda")
        grads = torch.autograd.grad(out, leaves, dout)
        ref_leaves = [t[:, :, ~pad].double().requires_grad_(True) for t in (q, k, v)]
        kept = ids[:, ~pad]
        ref = reference.attention(*ref_leaves, is_causal=causal, enable_gqa=True, document_ids=(kept, kept))
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout[:, :, ~pad].double())
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            assert torch.isfinite(got).all(), name
            assert torch.all(got[:, :, pad] == 0), name
            assert_close(got[:, :, ~pad], want, dtype, name, scale=2 * ATT_TOL_SCALE[dtype])


def _cp_async_reads(trace: str) -> int:
    """The bytes read by cp.async over every launch of a TFKERNELS_CUDA_EMU_TRACE log."""
    return sum(int(n) for n in re.findall(r"tfk_emu cp\.async: (\d+) bytes read", trace))


@pytest.mark.skipif(not CUDA_EMULATED, reason="counts the emulator's cp.async reads")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_documents_load_only_their_tiles(monkeypatch, capfd, causal):
    """Tile skipping, measured in bytes: with 8 documents of 64 tokens the tensor-core kernels load
    (cp.async) each document's own tiles only. Per 64-row block, at D = 64 (64-row tiles throughout):
    forward Q + one K and V tile; dQ Q, dO + one K and V tile; dK/dV K, V + per query head of the
    group one Q and dO tile. All in one document, ids in reverse order (unsorted: the documented
    fallback) and causal without ids load every tile their rules allow."""
    monkeypatch.setenv("TFKERNELS_CUDA_EMU_TRACE", "1")
    Hq, Hkv, T, D = 2, 1, 512, 64
    torch.manual_seed(9)
    q = torch.randn(1, Hq, T, D, device=DEV, dtype=torch.float16)
    k, v = (torch.randn(1, Hkv, T, D, device=DEV, dtype=torch.float16) for _ in range(2))
    dout = torch.randn_like(q)
    packed = (torch.arange(T, device=DEV, dtype=torch.int32) // 64)[None]

    def reads(ids):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        capfd.readouterr()
        out = tfkernels.attention(*leaves, is_causal=causal, enable_gqa=True, document_ids=ids, backend="cuda")
        fwd = _cp_async_reads(capfd.readouterr().err)
        torch.autograd.grad(out, leaves, dout)
        return fwd, _cp_async_reads(capfd.readouterr().err)

    tile = 64 * D * 2  # bytes of a 64-row fp16 tile
    blocks = T // 64
    assert reads(packed) == (Hq * blocks * 3 * tile, Hq * blocks * 4 * tile + blocks * (2 + 2 * Hq) * tile)
    n_tiles = blocks * (blocks + 1) // 2 if causal else blocks * blocks  # (query block, key tile) pairs
    dense = (Hq * (blocks + 2 * n_tiles) * tile,
             Hq * (2 * blocks + 2 * n_tiles) * tile + (2 * blocks + 2 * Hq * n_tiles) * tile)
    assert reads(None) == dense
    assert reads(torch.zeros_like(packed)) == dense  # one document: the plain kernels' tiles
    assert reads(packed.flip(-1)) == dense  # unsorted ids: every tile (each tested per score)


def test_attention_documents_bad_direct_calls():
    """The op itself (the public API checks first) refuses bad ids with an error naming them."""
    ops = _cuda_ext.ops()
    q = torch.randn(2, 2, 20, 16, device=DEV)
    k = torch.randn(2, 2, 24, 16, device=DEV)
    qd = torch.zeros(2, 20, dtype=torch.int32, device=DEV)
    kd = torch.zeros(2, 24, dtype=torch.int32, device=DEV)
    fwd = lambda a, b: ops.attention_fwd(q, k, k, None, a, b, 0.0, None, False, 0.25, -1, -1, 0.0)  # noqa: E731
    for a, b, what in [
        (qd.long(), kd, "q_doc must be int32"),
        (qd, kd.float(), "k_doc must be int32"),
        (qd[:1], kd, r"q_doc must be \(B, T\) = \(2, 20\)"),
        (qd, kd[:, :20], r"k_doc must be \(B, T\) = \(2, 24\)"),
        (qd[None], kd, "q_doc must be"),
        (qd, None, "q_doc and k_doc go together"),
        (None, kd, "q_doc and k_doc go together"),
    ]:
        with pytest.raises(RuntimeError, match=what):
            fwd(a, b)
    if DEV == "cuda":  # (emulated, every tensor is a CPU tensor)
        with pytest.raises(RuntimeError, match="q_doc must be on q's device"):
            fwd(qd.cpu(), kd)
    out, lse = fwd(qd.t().contiguous().t(), kd)  # any strides: the op makes them contiguous
    dout = torch.randn_like(out)
    with pytest.raises(RuntimeError, match="k_doc must be int32"):
        ops.attention_bwd(dout, q, k, k, None, qd, kd.to(torch.int16), out, lse, None, 0.0, None, False, 0.25, -1, -1,
                          0.0, False)


NUMBERS_IN_ERRORS = """
import torch
from tfkernels import _cuda_ext
ops, dev = _cuda_ext.ops(), {dev!r}
q = torch.randn(1, 1, 4, 300, device=dev)
qd, kd = torch.zeros(1, 4, dtype=torch.int32, device=dev), torch.zeros(1, 4, dtype=torch.int32, device=dev)
k = torch.randn(1, 1, 4, 16, device=dev)
for args in [(q, q, q, None, None, None), (k, k, k, None, qd[:, :3], kd)]:
    try:
        ops.attention_fwd(*args, 0.0, None, False, 0.25, -1, -1, 0.0)
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0])
"""


def test_errors_with_numbers_raise_whole():
    """The C++ glue's errors that format numbers (a head dim, a shape) raise whole. Built with a
    static libstdc++ (the GPU machines' g++, before setup.py named the shared one), each of them
    crashed the process with SIGSEGV: run in a subprocess, so that a crash fails this test alone."""
    proc = subprocess.run([sys.executable, "-c", NUMBERS_IN_ERRORS.format(dev=DEV)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "head dim must be in [1, 256], got 300" in proc.stdout, proc.stdout
    assert "q_doc must be (B, T) = (1, 4), got [1, 3]" in proc.stdout, proc.stdout


def test_opcheck_cuda_ops():
    """The tfkernels:: custom ops stay opcheck-clean with backend='cuda'."""
    from torch.library import opcheck

    x = torch.randn(5, 33, device=DEV, requires_grad=True)
    w = torch.randn(33, device=DEV, requires_grad=True)
    opcheck(torch.ops.tfkernels.layer_norm_fwd, (x, w, None, 1e-5, "cuda"))
    opcheck(torch.ops.tfkernels.rms_norm_fwd, (x, w, 1e-5, "cuda"))
    opcheck(torch.ops.tfkernels.softmax_fwd, (x, "cuda"))
    q, k, v = (torch.randn(1, 2, 17, 32, device=DEV, requires_grad=True) for _ in range(3))
    opcheck(torch.ops.tfkernels.attention_fwd, (q, k, v, None, None, None, 0.0, None, True, 1 / math.sqrt(32), -1, -1,
                                                0.0, "cuda"))
    ids = _doc_row([(0, 5), (-1, 2), (1, 10)])[None]
    opcheck(torch.ops.tfkernels.attention_fwd, (q, k, v, None, ids, ids, 0.0, None, True, 1 / math.sqrt(32), -1, -1,
                                                0.0, "cuda"))
