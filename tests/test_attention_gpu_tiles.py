"""The Triton attention kernels at the tile sizes a GPU runs, executed in the interpreter.

Everywhere else on CPU the interpreter runs the kernels with 16 x 16 tiles (`_INTERP_FWD/_BWD`),
so the tile-dependent paths of the GPU configs were only ever compiled (test_triton_static.py),
never run: BLOCK_M != BLOCK_N (the forward's causal split into off-diagonal and diagonal key
tiles, `_kv_stages`), the backward's tall/thin blocks (32 x 128 dK/dV, 128 x 32 dQ), EVEN_M/EVEN_N
at 128-row tiles, and a causal diagonal that crosses a tile. Here every distinct tile shape the
launchers can pick on sm_80/sm_86/sm_90 — the tuned configs and every fallback in their chains —
runs forward and backward against the float64 reference (num_warps/num_stages do not exist in the
interpreter; they are checked by compiling in test_triton_static.py).

Lengths are ragged against every tile (T = 2 * BLOCK + 37 etc.) with T_q != T_k both ways; the
cases add GQA, a float mask with its gradient, a bool mask, a sliding window whose edges cross
tiles (with soft-capping), and dropout replayed from the kernels' own keep mask.
"""
import importlib

import pytest
import torch

from conftest import DEVICE, check_attention

A = importlib.import_module("tfkernels.ops.attention")  # tfkernels.ops exports a function of that name

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU every test runs the real configs already")


def _tile_configs():
    """Every (BLOCK_M, BLOCK_N) and (M1, N1, M2, N2) in the chains the launchers build for a GPU
    (but 16 x 16, the interpreter's own, which the rest of the suite runs), each mapped to a head
    dim from the largest bucket it is chosen for: 64, 128, or 160 for the 256 bucket (padded lanes)."""
    real_major, real_tf32 = A._gpu_major, A._tf32_allowed
    fwd, bwd = {}, {}
    try:
        for major in (8, 9):
            A._gpu_major = lambda x, major=major: major
            for D in (64, 128, 256):
                for dtype in (torch.bfloat16, torch.float32):
                    for tf32 in ((False, True) if dtype == torch.float32 else (True,)):
                        A._tf32_allowed = lambda tf32=tf32: tf32
                        q = torch.empty(1, 1, 1, D, dtype=dtype)
                        for chain in (A._fwd_configs(q, False), A._fwd_configs(q, True), A._fwd_configs(q, False, True)):
                            for cfg in chain:
                                fwd[cfg[:2]] = max(fwd.get(cfg[:2], 0), D)
                        for docs, grouped in ((False, False), (True, False), (False, True)):
                            for cfg in A._bwd_configs(q, docs, grouped):
                                bwd[cfg[:4]] = max(bwd.get(cfg[:4], 0), D)
    finally:
        A._gpu_major, A._tf32_allowed = real_major, real_tf32
    head_dim = {64: 64, 128: 128, 256: 160}
    fwd = {t: head_dim[D] for t, D in fwd.items() if t != (16, 16)}
    bwd = {t: head_dim[D] for t, D in bwd.items() if t != (16, 16, 16, 16)}
    return fwd, bwd


FWD_TILES, BWD_TILES = _tile_configs()


def _force(monkeypatch, fwd=(16, 16), bwd=(16, 16, 16, 16)):
    monkeypatch.setattr(A, "_fwd_configs", lambda q, has_rules, has_docs=False: (fwd + (4, 2),))
    monkeypatch.setattr(A, "_bwd_configs", lambda q, has_docs=False, grouped=False: (bwd + (4, 2),))
    monkeypatch.setattr(A, "_FIRST_FIT", {})  # an index remembered for the real chains means nothing here


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def _cases(block: int):
    """(B, Hq, Hkv, Tq, Tk, causal, mask kind, window_size, softcap, document lengths): lengths
    ragged against a block of `block` rows."""
    t1, t2 = 2 * block + 37, block + 5
    return [
        (1, 4, 2, t1, t2, True, None, None, 0.0, None),  # T_q > T_k causal, GQA: rows past T_k see every key
        (1, 2, 2, t2, t1, True, "float", None, 0.0, None),  # T_q < T_k causal with a float mask (and its gradient)
        (2, 1, 1, t1, t1, False, "bool", None, 0.0, None),  # square, a bool mask broadcast over heads
        # a window a little wider than a block on the left, narrower on the right: both edges
        # cross tiles, whole tiles below and above are skipped, and the middle stage is reached
        (1, 2, 1, t1, t1 + 9, False, None, (block + 3, block // 2 + 1), 2.0, None),
        # packed documents: a block boundary inside a document, a block holding two documents whose
        # 16-row granules are each one document (the unmasked stage must not take it), one
        # document wider than a block (the unmasked stage is reached), padding between and after
        (1, 2, 1, t1, t1, True, None, None, 0.0, [block // 2, block + 16, -16, block // 2 + 5]),
    ]


def _run(case, D, seed):
    B, Hq, Hkv, Tq, Tk, causal, mask_kind, window, softcap, doc_lengths = case
    torch.manual_seed(seed)
    q, k, v = _rand(B, Hq, Tq, D), _rand(B, Hkv, Tk, D), _rand(B, Hkv, Tk, D)
    mask = None
    if mask_kind == "float":
        mask = torch.randn(1, Hq, Tq, Tk)
    elif mask_kind == "bool":
        mask = torch.rand(B, 1, Tq, Tk) > 0.3
        mask[..., 0] = True  # no fully masked row: it is tested elsewhere, and keeps the reference finite
    docs = None
    if doc_lengths is not None:
        ids = [i for d, n in enumerate(doc_lengths) for i in ([d] * n if n > 0 else [-1] * -n)]
        docs = torch.tensor(ids + [-1] * (Tq - len(ids)))
    check_attention(q, k, v, "triton", torch.float32, mask=mask, is_causal=causal, enable_gqa=Hq != Hkv,
                    window_size=window, softcap=softcap, scale=0.5 if softcap else None, document_ids=docs)


def _pairs():
    """Each forward tile shape with a backward one, the shorter list stretched over the longer (some
    of its shapes run twice), so that every shape of both runs at least once; largest with largest,
    smallest with smallest, since the lengths grow with the largest block and the interpreter's time
    with the number of programs."""
    fwd = sorted(FWD_TILES, key=lambda t: (t[0] * t[1], t), reverse=True)
    bwd = sorted(BWD_TILES, key=lambda t: (t[0] * t[1], t), reverse=True)
    n = max(len(fwd), len(bwd))
    return [(fwd[i * len(fwd) // n], bwd[i * len(bwd) // n]) for i in range(n)]


@pytest.mark.parametrize("tiles", _pairs(), ids=lambda t: "fwd{}x{}-dkdv{}x{}-dq{}x{}".format(*t[0], *t[1]))
def test_tiles(tiles, monkeypatch):
    """Forward at BLOCK_M x BLOCK_N; backward at dK/dV BLOCK_M1 x BLOCK_N1 and dQ BLOCK_M2 x BLOCK_N2."""
    fwd, bwd = tiles
    _force(monkeypatch, fwd=fwd, bwd=bwd)
    D = max(FWD_TILES[fwd], BWD_TILES[bwd])
    for i, case in enumerate(_cases(max(fwd + bwd))):
        _run(case, D, seed=100 + i)


def test_tuned_tiles_with_dropout(monkeypatch):
    """Hopper's tuned tiles (masked forward 128 x 64; backward 32 x 128 / 128 x 32) with dropout,
    replayed in the reference from the keep mask the kernels draw for the seed."""
    _force(monkeypatch, fwd=(128, 64), bwd=(32, 128, 128, 32))
    B, Hq, Hkv, Tq, Tk, D, p = 1, 2, 1, 139, 150, 64, 0.25
    torch.manual_seed(300)
    q, k, v = _rand(B, Hq, Tq, D), _rand(B, Hkv, Tk, D), _rand(B, Hkv, Tk, D)
    mask = torch.randn(1, Hq, Tq, Tk)
    torch.manual_seed(77)
    keep = A._dropout_mask(int(A._draw_seed().item()), B, Hq, Tq, Tk, p)
    check_attention(q, k, v, "triton", torch.float32, mask=mask, is_causal=True, enable_gqa=True, dropout_p=p,
                    dropout_mask=keep, seed=77)


def test_tuned_tiles_causal_window(monkeypatch):
    """Hopper's tuned tiles with Mistral's form of window (W - 1, 0) + causal, W not a multiple of
    any block, T long enough for the unmasked middle stage in every kernel."""
    _force(monkeypatch, fwd=(128, 128), bwd=(32, 128, 128, 32))
    torch.manual_seed(301)
    q, k, v = _rand(1, 2, 400, 64), _rand(1, 1, 400, 64), _rand(1, 1, 400, 64)
    check_attention(q, k, v, "triton", torch.float32, is_causal=True, enable_gqa=True, window_size=(299, 0))


def test_the_sets_cover_the_tuned_configs():
    """The shapes above include the tables' tuned entries (guards the enumeration itself)."""
    assert (128, 128) in FWD_TILES and (128, 64) in FWD_TILES and (64, 64) in FWD_TILES
    assert (32, 128, 128, 32) in BWD_TILES and (16, 64, 64, 16) in BWD_TILES
    assert all(bm % bn == 0 for bm, bn in FWD_TILES)
