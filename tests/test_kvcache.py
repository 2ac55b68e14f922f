"""tfkernels.kvcache_attention / flash_attn_with_kvcache (decoding against a KV cache: split-KV, paged,
in-place append) against a float64 reference that reads each row's keys out of the cache by hand."""
import math

import pytest
import torch

import tfkernels
from tfkernels.ops import kvcache as kv_mod

from conftest import DEVICE, assert_close, kernel_backends, visible_keys


def reference(q, k_cache, v_cache, lens, causal=False, window=(-1, -1), scale=None, softcap=0.0, table=None,
              batch_idx=None, leftpad=None):
    """float64, row by row: out (B, T_q, H_q, D), lse (B, H_q, T_q) (-inf for a query that sees nothing).
    lens: the keys of each row (new ones included); the queries are the last T_q positions. leftpad:
    the keys before leftpad[b] are not row b's (their slots may hold NaN: they are dropped, not masked)."""
    B, Tq, Hq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(B):
        L = int(lens[b])
        if table is not None:
            page = k_cache.shape[1]
            pages = [int(p) for p in table[b][:-(-L // page)]] if L else []
            k = torch.cat([k_cache[p] for p in pages])[:L] if pages else k_cache[0, :0]
            v = torch.cat([v_cache[p] for p in pages])[:L] if pages else v_cache[0, :0]
        else:
            row = int(batch_idx[b]) if batch_idx is not None else b
            k, v = k_cache[row, :L], v_cache[row, :L]
        g = Hq // k.shape[1]
        k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)   # (L, H_q, D)
        s = torch.einsum("thd,jhd->htj", q[b].double(), k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        keep = visible_keys(L - Tq + torch.arange(Tq, device=q.device)[:, None], L, causal, window)
        if leftpad is not None:
            mine = torch.arange(L, device=q.device) >= int(leftpad[b])
            keep &= mine
            v = torch.where(mine[:, None, None], v, 0.0)  # P = 0 there, but 0 * NaN is NaN
        s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, -1) if L else s.new_full((Hq, Tq), float("-inf"))
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append(torch.einsum("htj,jhd->thd", p, v))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def assert_lse(actual, ref, dtype, name, scale=1.0):
    """lse's -inf (a query with no key) where the reference has it, the finite rest within tolerance."""
    assert torch.equal(torch.isneginf(actual).cpu(), torch.isneginf(ref).cpu()), f"{name}: -inf rows differ"
    finite = torch.isfinite(ref)
    assert_close(actual[finite], ref[finite], dtype, name, scale)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _paged(B, S, Hkv, D, page, dtype, extra_pages=3):
    """A paged cache holding B rows of capacity S, its pages shuffled among spare ones."""
    n_blocks = -(-S // page)
    n_pages = B * n_blocks + extra_pages
    order = torch.randperm(n_pages)[:B * n_blocks].view(B, n_blocks).to(torch.int32).to(DEVICE)
    return _rand(n_pages, page, Hkv, D, dtype=dtype), _rand(n_pages, page, Hkv, D, dtype=dtype), order


# name: (Tq, Hq, Hkv, D, lens (before the append), T_new, causal, window, softcap, splits, layout)
CASES = {
    "decode-mha": (1, 4, 4, 32, [9, 30, 1], 0, False, (-1, -1), 0.0, 1, "dense"),
    "decode-gqa-split": (1, 8, 2, 64, [40, 7, 0], 0, False, (-1, -1), 0.0, 3, "dense"),
    "append-causal-mqa": (3, 6, 1, 40, [12, 0, 25], 3, True, (-1, -1), 0.0, 2, "dense"),
    "window-split": (2, 4, 2, 32, [30, 5, 17], 2, True, (6, -1), 0.0, 4, "dense"),
    "local-both-sides": (4, 2, 2, 48, [20, 33, 3], 0, False, (3, 2), 0.0, 2, "dense"),
    "softcap-batch-idx": (2, 4, 2, 32, [10, 26, 4], 2, True, (-1, -1), 7.5, 2, "batch_idx"),
    "paged-decode": (1, 4, 2, 32, [37, 5, 16], 1, True, (-1, -1), 0.0, 3, "paged16"),
    "paged-odd-page": (2, 6, 3, 24, [21, 0, 9], 2, False, (-1, -1), 0.0, 2, "paged5"),
    "d128-gqa": (1, 8, 2, 128, [46, 3], 1, True, (-1, -1), 0.0, 2, "dense"),
    "d256": (1, 2, 1, 256, [18, 3], 0, False, (-1, -1), 0.0, 2, "dense"),
    # 18 columns: not a whole number of 16-byte vectors (the cuda kernel's element-wise loads)
    "odd-head-dim": (2, 4, 2, 18, [11, 30], 1, True, (-1, -1), 0.0, 2, "dense"),
}


def _setup(case, dtype):
    Tq, Hq, Hkv, D, lens, t_new, causal, window, softcap, splits, layout = CASES[case]
    B, S = len(lens), 48
    q = _rand(B, Tq, Hq, D, dtype=dtype)
    table = batch_idx = None
    if layout.startswith("paged"):
        k_cache, v_cache, table = _paged(B, S, Hkv, D, int(layout[5:]), dtype)
    else:
        rows = B + 2 if layout == "batch_idx" else B
        k_cache, v_cache = _rand(rows, S, Hkv, D, dtype=dtype), _rand(rows, S, Hkv, D, dtype=dtype)
        if layout == "batch_idx":
            batch_idx = torch.randperm(rows)[:B].to(torch.int32).to(DEVICE)
    k = v = None
    if t_new:
        k, v = _rand(B, t_new, Hkv, D, dtype=dtype), _rand(B, t_new, Hkv, D, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kw = dict(block_table=table, cache_batch_idx=batch_idx, causal=causal, window_size=window, softcap=softcap,
              num_splits=splits)
    return q, k_cache, v_cache, seqlens, k, v, kw


@pytest.mark.parametrize("case", list(CASES))
def test_kvcache_matches_reference(backend, case):
    torch.manual_seed(hash(case) % 1000)
    dtype = torch.float32
    q, k_cache, v_cache, seqlens, k, v, kw = _setup(case, dtype)
    before_k = k_cache.clone()
    out, lse = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, k, v, return_lse=True, backend=backend, **kw)
    lens = seqlens + (0 if k is None else k.shape[1])
    ref, ref_lse = reference(q, k_cache, v_cache, lens, kw["causal"], kw["window_size"], None, kw["softcap"],
                             kw["block_table"], kw["cache_batch_idx"])
    assert out.shape == q.shape and out.is_contiguous() and lse.dtype == torch.float32
    assert_close(out, ref, dtype, f"{case} out")
    assert_lse(lse, ref_lse, dtype, f"{case} lse")
    if k is None:
        assert torch.equal(k_cache, before_k)
    else:  # the new keys sit where the reference read them; nothing else moved
        changed = (k_cache != before_k).any(-1).any(-1)
        assert changed.sum().item() <= k.shape[0] * k.shape[1]


# fp16/bf16 at D <= 128 is the cuda backend's tensor-core kernel, the rest its FMA kernel: every rule
# (windows on both sides, splits, rows of no key, element-wise loads at D = 18, pages) on both
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["append-causal-mqa", "paged-decode", "softcap-batch-idx", "d256", "d128-gqa",
                                  "decode-gqa-split", "window-split", "local-both-sides", "odd-head-dim",
                                  "paged-odd-page"])
def test_kvcache_half_precision(case, dtype, backend):
    torch.manual_seed(5)
    q, k_cache, v_cache, seqlens, k, v, kw = _setup(case, dtype)
    out, lse = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, k, v, return_lse=True, backend=backend, **kw)
    lens = seqlens + (0 if k is None else k.shape[1])
    ref, ref_lse = reference(q, k_cache, v_cache, lens, kw["causal"], kw["window_size"], None, kw["softcap"],
                             kw["block_table"], kw["cache_batch_idx"])
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"{case} out")
    assert_lse(lse, ref_lse, torch.float32, f"{case} lse", scale=100.0)


def test_kvcache_splits_agree(backend):
    """Any split count gives the same answer as one pass (up to fp32 reassociation), also more splits
    than key blocks and splits that find no key (a short row)."""
    torch.manual_seed(2)
    q, k_cache, v_cache = _rand(2, 1, 4, 32), _rand(2, 64, 2, 32), _rand(2, 64, 2, 32)
    seqlens = torch.tensor([64, 3], dtype=torch.int32, device=DEVICE)
    one = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, num_splits=1, backend=backend)
    for n in (2, 4, 9):
        got = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, num_splits=n, backend=backend)
        assert_close(got, one.double(), torch.float32, f"{n} splits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kvcache_long_cache_many_tiles(dtype, backend):
    """Caches of several key tiles of every kernel (the cuda kernel's 64-key tiles, Triton's blocks)
    with ragged lengths, splits whose ranges end mid-tile, a causal window, GQA 8/2, paged too."""
    torch.manual_seed(31)
    B, Hq, Hkv, D, S = 3, 8, 2, 64, 300
    q = _rand(B, 2, Hq, D, dtype=dtype)
    lens = torch.tensor([300, 129, 64], dtype=torch.int32, device=DEVICE)
    dense_k, dense_v = _rand(B, S, Hkv, D, dtype=dtype), _rand(B, S, Hkv, D, dtype=dtype)
    pk, pv, table = _paged(B, S, Hkv, D, 32, dtype)
    for b in range(B):  # the same keys in the pages
        for j in range(table.shape[1]):
            n = min(32, S - 32 * j)
            pk[table[b, j], :n], pv[table[b, j], :n] = dense_k[b, 32 * j:32 * j + n], dense_v[b, 32 * j:32 * j + n]
    for window, splits in (((-1, -1), 1), ((-1, -1), 3), ((70, -1), 2)):
        ref, ref_lse = reference(q, dense_k, dense_v, lens, True, window, None, 0.0, None, None)
        for k_cache, v_cache, tb in ((dense_k, dense_v, None), (pk, pv, table)):
            out, lse = tfkernels.kvcache_attention(q, k_cache, v_cache, lens, causal=True, window_size=window,
                                                   block_table=tb, num_splits=splits, return_lse=True, backend=backend)
            name = f"window {window} splits {splits} paged {tb is not None}"
            assert_close(out, ref, dtype, name)
            assert_lse(lse, ref_lse, torch.float32, name, scale=1.0 if dtype == torch.float32 else 100.0)


def test_kvcache_cuda_long_queries_take_the_attention_kernel(monkeypatch):
    """On the cuda backend, more than CUDA_DECODE_ROWS query rows per K/V head (a chunked prefill)
    run the tensor-core attention on the gathered cache; up to it, the decoding kernel."""
    if "cuda" not in kernel_backends():
        pytest.skip("no cuda backend here")
    torch.manual_seed(8)
    calls = []
    real = kv_mod._composed
    monkeypatch.setattr(kv_mod, "_composed", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    k_cache, v_cache = _rand(1, 80, 1, 16), _rand(1, 80, 1, 16)
    lens = torch.tensor([80], dtype=torch.int32, device=DEVICE)
    for tq in (kv_mod.CUDA_DECODE_ROWS // 2, kv_mod.CUDA_DECODE_ROWS // 2 + 1):  # GQA group of 2
        q = _rand(1, tq, 2, 16)
        out = tfkernels.kvcache_attention(q, k_cache, v_cache, lens, causal=True, backend="cuda")
        ref, _ = reference(q, k_cache, v_cache, lens, causal=True)
        assert_close(out, ref, torch.float32, f"T_q {tq}")
    assert calls == [kv_mod.CUDA_DECODE_ROWS // 2 + 1]


def test_auto_splits():
    # the programs fill the GPU, or no SM count (the interpreter): no split
    assert kv_mod._auto_splits(200, 64, 132) == 1 and kv_mod._auto_splits(4, 64, 0) == 1
    # batch-1 decode with 8 K/V heads over 16k keys: ~2 programs per SM; over 8k, 256 keys a split
    assert kv_mod._auto_splits(8, 128, 132) == 33 and kv_mod._auto_splits(8, 64, 132) == 32
    # a short cache: at least MIN_KEYS_PER_SPLIT keys per split
    assert kv_mod._auto_splits(8, 4, 132) == 4 * 128 // kv_mod.MIN_KEYS_PER_SPLIT
    assert kv_mod._auto_splits(1, 10 ** 6, 132) == kv_mod.MAX_SPLITS


def test_kvcache_empty_rows(backend):
    """A row with no keys, and causal queries before the first key, return 0 with lse -inf."""
    q, k_cache, v_cache = _rand(2, 3, 2, 16), _rand(2, 8, 2, 16), _rand(2, 8, 2, 16)
    seqlens = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    out, lse = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, causal=True, return_lse=True,
                                           num_splits=2, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0])) and torch.isneginf(lse[1, :, 0]).all()
    ref, ref_lse = reference(q, k_cache, v_cache, seqlens, causal=True)
    assert_close(out, ref, torch.float32, "out")
    assert_lse(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("path", ["triton", "cuda", "cuda-bf16", "torch", "grad"])
def test_kvcache_ignores_unwritten_slots(path):
    """A cache is allocated with torch.empty: the slots past each row's length may hold NaN or inf.
    No path may let them into the output (P = 0 times NaN is NaN in a matmul). cuda-bf16: the
    cuda backend's tensor-core kernel, whose tiles reach past a row's length."""
    if path.startswith("cuda") and "cuda" not in kernel_backends():
        pytest.skip("no cuda backend here")
    torch.manual_seed(10)
    dtype = torch.bfloat16 if path == "cuda-bf16" else torch.float32
    path = path.split("-")[0]
    q, k_cache, v_cache = (_rand(*shape, dtype=dtype) for shape in ((2, 2, 4, 16), (2, 12, 2, 16), (2, 12, 2, 16)))
    lens = torch.tensor([5, 9], dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(lens.tolist()):
        k_cache[b, n:], v_cache[b, n:] = float("nan"), float("inf")
    if path == "grad":
        q.requires_grad_()
    out = tfkernels.kvcache_attention(q, k_cache, v_cache, lens, causal=True, num_splits=2,
                                      backend="triton" if path == "grad" else path)
    ref, _ = reference(q.detach(), k_cache, v_cache, lens, causal=True)
    assert torch.isfinite(out).all()
    assert_close(out.detach(), ref, dtype, path)
    if path == "grad":
        out.sum().backward()
        assert torch.isfinite(q.grad).all()


def _poison_slots(cache, b, slots, table=None, row=None):
    """Write NaN into row b's cache slots (paged: through its block table)."""
    for j in slots:
        if table is not None:
            page = cache.shape[1]
            cache[int(table[b, j // page]), j % page] = float("nan")
        else:
            cache[b if row is None else int(row[b]), j] = float("nan")


# layout: (causal, window, num_splits, dtype)
LEFTPAD = {
    "dense": (True, (9, -1), 3, torch.float32),
    "dense-bf16": (True, (-1, -1), 2, torch.bfloat16),
    "paged5": (True, (-1, -1), 3, torch.float32),
    "batch_idx": (False, (4, 2), 2, torch.float32),
}


@pytest.mark.parametrize("layout", list(LEFTPAD))
def test_kvcache_left_padding(backend, layout):
    """cache_leftpad (flash_attn's): a batch of prompts right-aligned in their rows. The padding's
    slots hold NaN and are never read; the new keys append at cache_seqlens; positions (causal, the
    window) stay the cache's. Rows: padding below a window's start, no padding, and a row that is
    all padding (its only keys the new ones)."""
    torch.manual_seed(12)
    causal, window, splits, dtype = LEFTPAD[layout]
    B, S, Hq, Hkv, D, Tq = 3, 40, 4, 2, 32, 2
    lens, pad = [20, 33, 6], [7, 0, 6]
    q = _rand(B, Tq, Hq, D, dtype=dtype)
    table = row = None
    if layout.startswith("paged"):
        k_cache, v_cache, table = _paged(B, S, Hkv, D, 5, dtype)
    else:
        rows = B + 1 if layout == "batch_idx" else B
        k_cache, v_cache = _rand(rows, S, Hkv, D, dtype=dtype), _rand(rows, S, Hkv, D, dtype=dtype)
        row = torch.tensor([3, 0, 1], dtype=torch.int32, device=DEVICE) if layout == "batch_idx" else None
    for b in range(B):
        _poison_slots(k_cache, b, range(pad[b]), table, row)
        _poison_slots(v_cache, b, range(pad[b]), table, row)
    k, v = _rand(B, Tq, Hkv, D, dtype=dtype), _rand(B, Tq, Hkv, D, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor(pad, dtype=torch.int64, device=DEVICE)  # any integer dtype
    out, lse = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, k, v, block_table=table, cache_batch_idx=row,
                                           cache_leftpad=leftpad, causal=causal, window_size=window, num_splits=splits,
                                           return_lse=True, backend=backend)
    ref, ref_lse = reference(q, k_cache, v_cache, seqlens + Tq, causal, window, table=table, batch_idx=row,
                             leftpad=leftpad)
    assert torch.isfinite(out).all()
    assert_close(out, ref, dtype, f"{layout} out")
    assert_lse(lse, ref_lse, torch.float32, f"{layout} lse", scale=1.0 if dtype == torch.float32 else 100.0)
    if layout == "dense":  # the composed paths: the reference backend, and attention's autograd
        kw = dict(cache_leftpad=leftpad, causal=causal, window_size=window)
        assert_close(tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens + Tq, backend="torch", **kw), ref,
                     dtype, "torch")
        qg = q.clone().requires_grad_()
        out = tfkernels.kvcache_attention(qg, k_cache, v_cache, seqlens + Tq, backend=backend, **kw)
        out.sum().backward()
        assert_close(out.detach(), ref, dtype, "grad path")
        assert torch.isfinite(qg.grad).all()


def test_kvcache_left_padded_batch_is_each_row_alone(backend):
    """The use cache_leftpad is for: prompts of different lengths decoded as one batch, right-aligned
    in the cache, give each prompt's own results (positions shift by the padding, but causal and
    window ranges are relative: they see the same keys)."""
    torch.manual_seed(13)
    Hq, Hkv, D, S, steps = 4, 1, 16, 24, 3
    prompts = [5, 11, 1]
    B, P = len(prompts), max(prompts)
    q = _rand(B, P + steps, Hq, D)
    k, v = _rand(B, P + steps, Hkv, D), _rand(B, P + steps, Hkv, D)
    pad = torch.tensor([P - n for n in prompts], dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = torch.full((B, S, Hkv, D), float("nan"), device=DEVICE), torch.zeros(B, S, Hkv, D, device=DEVICE)
    kw = dict(causal=True, window_size=(6, 0), backend=backend)
    # batched: the prompts right-aligned (their tokens in the last n of P slots), then decode steps
    kp, vp = torch.full_like(k[:, :P], float("nan")), torch.full_like(v[:, :P], float("nan"))  # padding: never read
    qp = torch.zeros_like(q[:, :P])
    for b, n in enumerate(prompts):
        kp[b, P - n:], vp[b, P - n:], qp[b, P - n:] = k[b, :n], v[b, :n], q[b, :n]
    batched = [tfkernels.kvcache_attention(qp, k_cache, v_cache, 0, kp, vp, cache_leftpad=pad, **kw)]
    for t in range(steps):
        batched.append(tfkernels.kvcache_attention(
            torch.stack([q[b, n + t] for b, n in enumerate(prompts)])[:, None], k_cache, v_cache, P + t,
            torch.stack([k[b, n + t] for b, n in enumerate(prompts)])[:, None],
            torch.stack([v[b, n + t] for b, n in enumerate(prompts)])[:, None], cache_leftpad=pad, num_splits=2, **kw))
    for b, n in enumerate(prompts):  # each row alone, unpadded
        kc, vc = torch.zeros(1, S, Hkv, D, device=DEVICE), torch.zeros(1, S, Hkv, D, device=DEVICE)
        alone = tfkernels.kvcache_attention(q[b:b + 1, :n + steps], kc, vc, 0, k[b:b + 1, :n + steps],
                                            v[b:b + 1, :n + steps], **kw)[0]
        assert_close(batched[0][b, P - n:], alone[:n].double(), torch.float32, f"prompt {b}")
        for t in range(steps):
            assert_close(batched[1 + t][b, 0], alone[n + t].double(), torch.float32, f"row {b} step {t}")


def test_kvcache_strided_inputs_and_int_seqlens(backend):
    """q a transposed view, the cache a view of a (B, H_kv, S, D) buffer, the window bounded on both
    sides, an int cache_seqlens (no host read), the scale given."""
    torch.manual_seed(3)
    q = _rand(2, 4, 3, 32).transpose(1, 2)                      # (B, T_q=3, H=4, D), non-contiguous
    k_buf, v_buf = _rand(2, 2, 40, 32), _rand(2, 2, 40, 32)
    k_cache, v_cache = k_buf.transpose(1, 2), v_buf.transpose(1, 2)   # (B, S, H_kv, D) views
    k_new, v_new = _rand(2, 3, 2, 32), _rand(2, 3, 2, 32)
    out = tfkernels.kvcache_attention(q, k_cache, v_cache, 20, k_new, v_new, scale=0.3, causal=True,
                                      window_size=(7, -1), num_splits=2, backend=backend)
    assert torch.equal(k_buf[:, :, 20:23], k_new.transpose(1, 2))  # written through the view
    assert torch.equal(v_buf[:, :, 20:23], v_new.transpose(1, 2))
    ref, _ = reference(q, k_cache, v_cache, [23, 23], True, (7, -1), 0.3)
    assert_close(out, ref, torch.float32, "strided")


def test_kvcache_expanded_cache(backend):
    """A prompt's cache shared by every row (stride 0 over the batch, never copied) and a stride-0
    (expanded) query over the heads: read through their strides."""
    torch.manual_seed(11)
    k_cache = _rand(1, 20, 2, 24).expand(3, 20, 2, 24)
    v_cache = _rand(1, 20, 2, 24).expand(3, 20, 2, 24)
    q = _rand(3, 1, 1, 24).expand(3, 1, 4, 24)
    lens = torch.tensor([20, 7, 13], dtype=torch.int32, device=DEVICE)
    out, lse = tfkernels.kvcache_attention(q, k_cache, v_cache, lens, num_splits=3, return_lse=True, backend=backend)
    ref, ref_lse = reference(q, k_cache, v_cache, lens)
    assert_close(out, ref, torch.float32, "expanded")
    assert_lse(lse, ref_lse, torch.float32, "expanded lse")


def test_kvcache_decode_loop_matches_full_attention(backend):
    """Prefill, then one token at a time through a paged cache, is causal attention over the sequence."""
    torch.manual_seed(4)
    B, T, Hq, Hkv, D = 2, 11, 4, 2, 32
    q, k, v = _rand(B, T, Hq, D), _rand(B, T, Hkv, D), _rand(B, T, Hkv, D)
    k_cache, v_cache, table = _paged(B, 16, Hkv, D, 4, torch.float32)
    seqlens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    outs = [tfkernels.kvcache_attention(q[:, :5], k_cache, v_cache, seqlens, k[:, :5], v[:, :5], block_table=table,
                                        causal=True, backend=backend)]
    seqlens += 5
    for t in range(5, T):
        outs.append(tfkernels.kvcache_attention(q[:, t:t + 1], k_cache, v_cache, seqlens, k[:, t:t + 1],
                                                v[:, t:t + 1], block_table=table, causal=True, num_splits=2,
                                                backend=backend))
        seqlens += 1
    full = tfkernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                               enable_gqa=True, backend="torch").transpose(1, 2)
    assert_close(torch.cat(outs, 1), full.double(), torch.float32, "decode loop")


def test_kvcache_gradients_through_attention():
    """A query that requires grad takes attention's differentiable path: gradients match float64."""
    torch.manual_seed(6)
    q = _rand(2, 2, 4, 16).requires_grad_()
    k_cache, v_cache = _rand(2, 12, 2, 16).requires_grad_(), _rand(2, 12, 2, 16).requires_grad_()
    seqlens = torch.tensor([12, 5], dtype=torch.int32, device=DEVICE)
    out = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, causal=True, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k_cache, v_cache))
    ref, _ = reference(q64, k64, v64, seqlens, causal=True)
    ref.backward(g.double())
    for name, a, r in (("dq", q.grad, q64.grad), ("dk", k_cache.grad, k64.grad), ("dv", v_cache.grad, v64.grad)):
        assert_close(a, r, torch.float32, name)


def test_kvcache_opcheck():
    q, k_cache, v_cache = _rand(2, 1, 4, 16), _rand(2, 8, 2, 16), _rand(2, 8, 2, 16)
    seqlens = torch.tensor([8, 3], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[1, 0], [2, 3]], dtype=torch.int32, device=DEVICE)
    pk, pv = _rand(4, 4, 2, 16), _rand(4, 4, 2, 16)
    op = torch.ops.tfkernels.kvcache_attention_fwd.default
    pad = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(op, (q, k_cache, v_cache, seqlens, None, None, None, 0.25, True, -1, -1, 0.0, 2, "triton"))
    torch.library.opcheck(op, (q, pk, pv, seqlens, table, None, pad, 0.25, False, 3, -1, 0.0, 1, "triton"))


# inductor on a GPU; on CPU, aot_eager: the same dynamo graph (fullgraph: no break, no host read) and
# AOTAutograd's functionalised cache append, without inductor's C++ codegen (20-40 s of g++ in CI)
COMPILE_BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"


def test_kvcache_compiles():
    """fullgraph torch.compile: the append (index_put_ on the cache) and the op, no host reads."""
    torch.manual_seed(7)
    q, k_new, v_new = _rand(2, 1, 4, 32), _rand(2, 1, 2, 32), _rand(2, 1, 2, 32)
    k_cache, v_cache = _rand(2, 16, 2, 32), _rand(2, 16, 2, 32)
    seqlens = torch.tensor([9, 4], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    k2, v2 = k_cache.clone(), v_cache.clone()
    eager = tfkernels.kvcache_attention(q, k2, v2, seqlens, k_new, v_new, cache_leftpad=pad, causal=True, num_splits=2)
    fn = torch.compile(lambda *a: tfkernels.kvcache_attention(*a, cache_leftpad=pad, causal=True, num_splits=2),
                       fullgraph=True, backend=COMPILE_BACKEND)
    out = fn(q, k_cache, v_cache, seqlens, k_new, v_new)
    assert_close(out, eager.double(), torch.float32, "compiled")
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    # an int length with a block table: the int is checked, the table is not read under compile
    pk, pv, table = _paged(2, 16, 2, 32, 4, torch.float32)
    eager = tfkernels.kvcache_attention(q, pk, pv, 11, block_table=table, causal=True)
    fn = torch.compile(lambda *a: tfkernels.kvcache_attention(*a, 11, block_table=table, causal=True), fullgraph=True,
                       backend=COMPILE_BACKEND)
    assert_close(fn(q, pk, pv), eager.double(), torch.float32, "compiled paged")


def test_kvcache_reads_lengths_once_per_tensor_version(monkeypatch):
    q, k_cache, v_cache = _rand(1, 1, 2, 16), _rand(1, 8, 2, 16), _rand(1, 8, 2, 16)
    seqlens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    for _ in range(3):  # a model's layers pass the same lengths
        tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, backend="torch")
    assert len(reads) == 1
    seqlens += 4  # read again, and refused: past the capacity
    with pytest.raises(ValueError, match="capacity of 8"):
        tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, backend="torch")


def test_kvcache_reads_nothing_while_a_cuda_graph_captures(monkeypatch, backend):
    """While a CUDA graph captures, the host check of cache_seqlens (and the other index tensors) is
    skipped: a read raises during capture, and a captured decode step is replayed with lengths changed
    in place, which a check at capture time would not see. (Capture itself: the test below, on a GPU.)"""
    from tfkernels import _validate

    torch.manual_seed(6)
    q, k_cache, v_cache = _rand(2, 1, 4, 16), _rand(2, 8, 2, 16), _rand(2, 8, 2, 16)
    seqlens = torch.tensor([5, 3], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    want = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens, cache_leftpad=pad, backend=backend)
    monkeypatch.setattr(_validate, "capturing", lambda t: True)
    monkeypatch.setattr(_validate, "host_values", lambda t: pytest.fail("a host read while capturing"))
    seqlens2 = seqlens.clone()  # a new tensor: nothing remembered for it
    got = tfkernels.kvcache_attention(q, k_cache, v_cache, seqlens2, cache_leftpad=pad.clone(), backend=backend)
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_kvcache_decode_step_replays_from_a_cuda_graph():
    """A decode step (append one token, attend) captured once and replayed with cache_seqlens advanced
    in place, as a CUDA-graph decode loop runs it, gives what eager calls give."""
    torch.manual_seed(7)
    B, T, Hq, Hkv, D, S = 2, 6, 4, 2, 64, 32
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    k_cache = torch.zeros(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    seqlens = torch.zeros(B, dtype=torch.int32, device="cuda")
    q1, k1, v1 = q[:, :1].clone(), k[:, :1].clone(), v[:, :1].clone()  # the step's static inputs

    def step():
        return tfkernels.kvcache_attention(q1, k_cache, v_cache, seqlens, k1, v1, causal=True)

    outs = [step().clone()]  # token 0 eagerly (this also compiles the kernels); capture runs nothing
    seqlens += 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t in range(1, T):
        q1.copy_(q[:, t:t + 1]), k1.copy_(k[:, t:t + 1]), v1.copy_(v[:, t:t + 1])
        graph.replay()
        outs.append(out.clone())
        seqlens += 1
    full = tfkernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                               enable_gqa=True, backend="torch").transpose(1, 2)
    assert_close(torch.cat(outs, 1), full.double(), torch.bfloat16, "replayed decode")


def test_kvcache_bad_input():
    q, k_cache, v_cache = _rand(2, 1, 4, 16), _rand(2, 8, 2, 16), _rand(2, 8, 2, 16)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    f = tfkernels.kvcache_attention
    with pytest.raises(ValueError, match="q must be"):
        f(q[0], k_cache, v_cache, lens)
    with pytest.raises(TypeError, match="k_cache has dtype"):
        f(q, k_cache.half(), v_cache, lens)
    with pytest.raises(ValueError, match="same shape"):
        f(q, k_cache, v_cache[:, :4], lens)
    with pytest.raises(ValueError, match="multiple of the cache's 3"):
        f(q, _rand(2, 8, 3, 16), _rand(2, 8, 3, 16), lens)
    with pytest.raises(ValueError, match="head dim 8 differs"):
        f(q, k_cache[..., :8], v_cache[..., :8], lens)
    with pytest.raises(ValueError, match="both k and v"):
        f(q, k_cache, v_cache, lens, k=_rand(2, 1, 2, 16))
    with pytest.raises(ValueError, match="cache_seqlens must have shape \\(2\\)"):
        f(q, k_cache, v_cache, lens[:1])
    with pytest.raises(TypeError, match="cache_seqlens must be an integer tensor"):
        f(q, k_cache, v_cache, lens.float())
    with pytest.raises(TypeError, match="cache_seqlens must be an int"):
        f(q, k_cache, v_cache, 3.0)
    with pytest.raises(ValueError, match="cache_seqlens\\[0\\] = -1 is negative"):
        f(q, k_cache, v_cache, torch.tensor([-1, 2], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="7 \\+ 2 keys, more than the cache's capacity of 8"):
        f(q, k_cache, v_cache, 7, _rand(2, 2, 2, 16), _rand(2, 2, 2, 16))
    with pytest.raises(ValueError, match="k_cache has 2 rows but q has batch 3"):
        f(_rand(3, 1, 4, 16), k_cache, v_cache, 2)
    with pytest.raises(ValueError, match="cache_batch_idx has 5"):
        f(q, k_cache, v_cache, lens, cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32, device=DEVICE))
    pk, pv = _rand(3, 4, 2, 16), _rand(3, 4, 2, 16)
    table = torch.tensor([[0, 1], [2, 7]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_table\\[1\\] names page 7"):
        f(q, pk, pv, lens + 2, block_table=table)
    f(q, pk, pv, torch.tensor([3, 4], dtype=torch.int32, device=DEVICE), block_table=table)  # page 7 unused
    with pytest.raises(ValueError, match="cannot be combined with block_table"):
        f(q, pk, pv, lens, block_table=table, cache_batch_idx=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="cache_leftpad\\[1\\] = 5 must be in \\[0, 4\\]"):
        f(q, k_cache, v_cache, lens, cache_leftpad=torch.tensor([0, 5], device=DEVICE))
    with pytest.raises(ValueError, match="cache_leftpad\\[0\\] = -1"):
        f(q, k_cache, v_cache, 3, cache_leftpad=torch.tensor([-1, 0], device=DEVICE))
    with pytest.raises(TypeError, match="cache_leftpad must be an integer tensor"):
        f(q, k_cache, v_cache, lens, cache_leftpad=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="cache_leftpad must have shape \\(2\\)"):
        f(q, k_cache, v_cache, lens, cache_leftpad=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="num_splits must be an int >= 0"):
        f(q, k_cache, v_cache, lens, num_splits=-1)
    with pytest.raises(ValueError, match="kvcache_attention: softcap"):
        f(q, k_cache, v_cache, lens, softcap=-1.0)
    # a refused call leaves the cache as it was (every check runs before the append)
    before = k_cache.clone()
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        f(q.double(), k_cache.double(), v_cache.double(), lens, _rand(2, 1, 2, 16).double(),
          _rand(2, 1, 2, 16).double(), backend="triton")
    with pytest.raises(TypeError, match="kvcache_attention: window_size must be a pair"):
        f(q, k_cache, v_cache, lens, _rand(2, 1, 2, 16), _rand(2, 1, 2, 16), window_size=(1, 2, 3))
    assert torch.equal(k_cache, before)


# ---------------------------------------------------------------------------------- flash_attn's API

def _rotary_reference(x, cos, sin, pos, interleaved):
    """Rotate x (B, T, H, D) at positions pos (B, T) (float64): pairs (2i, 2i + 1), or halves."""
    x = x.double()
    half = cos.shape[1]
    c, s = cos.double()[pos][:, :, None], sin.double()[pos][:, :, None]
    out = x.clone()
    if interleaved:
        x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = x1 * c - x2 * s, x1 * s + x2 * c
    else:
        x1, x2 = x[..., :half], x[..., half:2 * half]
        out[..., :half], out[..., half:2 * half] = x1 * c - x2 * s, x1 * s + x2 * c
    return out


@pytest.mark.parametrize("interleaved,causal", [(True, True), (False, False)])
def test_flash_attn_with_kvcache_rotary(interleaved, causal):
    """flash_attn's contract: the new keys rotated at cache_seqlens + i; q there too when causal, else
    every query at cache_seqlens; rotary_dim < D leaves the rest alone. With cache_leftpad (causal
    case) the positions stay the cache's: rotary ones too, as flash_attn's test computes them."""
    torch.manual_seed(8)
    B, Tq, H, D, S = 2, 3, 2, 32, 24
    q, k_new, v_new = _rand(B, Tq, H, D), _rand(B, Tq, H, D), _rand(B, Tq, H, D)
    k_cache, v_cache = _rand(B, S, H, D), _rand(B, S, H, D)
    angle = torch.rand(S, 8, device=DEVICE) * 6.0
    cos, sin = angle.cos(), angle.sin()                      # rotary_dim 16 of 32
    lens = torch.tensor([4, 10], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE) if causal else None
    k_ref = k_cache.clone()
    out, lse = tfkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, lens, cache_leftpad=pad,
                                                 causal=causal, rotary_interleaved=interleaved,
                                                 return_softmax_lse=True, backend="triton")
    pos = lens.long()[:, None] + torch.arange(Tq, device=DEVICE)
    qpos = pos if causal else lens.long()[:, None].expand(B, Tq)
    k_rot = _rotary_reference(k_new, cos, sin, pos, interleaved)
    for b in range(B):
        k_ref[b, lens[b]:lens[b] + Tq] = k_rot[b].float()
    assert_close(k_cache, k_ref.double(), torch.float32, "rotated keys in the cache")
    ref, ref_lse = reference(_rotary_reference(q, cos, sin, qpos, interleaved), k_cache, v_cache, lens + Tq, causal,
                             leftpad=pad)
    assert_close(out, ref, torch.float32, "out")
    assert_lse(lse, ref_lse, torch.float32, "lse")


def test_flash_attn_with_kvcache_defaults_and_refusals():
    q, k_cache, v_cache = _rand(2, 1, 2, 16), _rand(2, 6, 2, 16), _rand(2, 6, 2, 16)
    # cache_seqlens None: the whole cache
    out = tfkernels.flash_attn_with_kvcache(q, k_cache, v_cache, softmax_scale=0.5, backend="triton")
    ref, _ = reference(q, k_cache, v_cache, [6, 6], scale=0.5)
    assert_close(out, ref, torch.float32, "full cache")
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        tfkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=2, alibi_slopes=torch.ones(2))
    cos = torch.ones(4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="rotary_cos has 4 positions"):
        tfkernels.flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=cos, rotary_sin=cos, cache_seqlens=5)
    with pytest.raises(ValueError, match="both rotary_cos and rotary_sin"):
        tfkernels.flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=cos, cache_seqlens=2)


def test_flash_attn_varlen_func_paged(backend):
    """flash_attn_varlen_func with a block_table: the pages gathered into packed keys."""
    torch.manual_seed(9)
    lens_q, lens_k, Hq, Hkv, D, page = [2, 1, 3], [9, 4, 12], 4, 2, 32, 4
    q = _rand(sum(lens_q), Hq, D)
    k_pages, v_pages, table = _paged(3, 12, Hkv, D, page, torch.float32)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    out = tfkernels.flash_attn_varlen_func(q, k_pages, v_pages, cu(lens_q), cu(lens_k), 3, 12, causal=True,
                                           block_table=table, backend=backend)
    k = torch.cat([k_pages[table[i].long()].flatten(0, 1)[:n] for i, n in enumerate(lens_k)])
    v = torch.cat([v_pages[table[i].long()].flatten(0, 1)[:n] for i, n in enumerate(lens_k)])
    ref = tfkernels.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 3, 12, causal=True, backend="torch")
    assert_close(out, ref.double(), torch.float32, "paged varlen")
    bad = table.clone()
    bad[2, 2] = 99
    with pytest.raises(ValueError, match="pages outside"):
        tfkernels.flash_attn_varlen_func(q, k_pages, v_pages, cu(lens_q), cu(lens_k), block_table=bad)
    with pytest.raises(ValueError, match="a sequence of 9 keys needs more than block_table.s 2 pages of 4"):
        tfkernels.flash_attn_varlen_func(q, k_pages, v_pages, cu(lens_q), cu(lens_k), block_table=table[:, :2])
    down = torch.tensor([0, 9, 5, 17], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        tfkernels.flash_attn_varlen_func(q, k_pages, v_pages, cu(lens_q), down, block_table=table)
