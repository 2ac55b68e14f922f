"""The thin GPT / BERT: shapes, variants, the tfkernels <-> torch kernel switch, presets."""
import os

import pytest
import torch

import tfkernels
from conftest import DEVICE, kernel_backends
from tfkernels.model import (BERT, GPT, PRESETS, KVCache, ModelConfig, build_model, document_ids_from_tokens,
                             make_config)
from tfkernels.train.tokenizer import EOS

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
VARIANTS = [dict(), dict(norm="rmsnorm", mlp="swiglu", pos="rope"), dict(bias=False, mlp="swiglu")]


def pair(arch, backend="torch", **kw):
    """The same model built twice: on tfkernels (with `backend`) and on plain PyTorch, same weights."""
    torch.manual_seed(0)
    ref = build_model(make_config(arch, "tiny", kernels="torch", **{**SMALL, **kw})).eval()
    fused = build_model(make_config(arch, "tiny", kernels="tfkernels", backend=backend, **{**SMALL, **kw})).eval()
    missing = fused.load_state_dict(ref.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    return fused.to(DEVICE), ref.to(DEVICE)  # on a GPU the named kernel backends need CUDA tensors


@pytest.mark.parametrize("kw", VARIANTS)
def test_gpt_kernel_switch_same_output(kw):
    fused, ref = pair("gpt", **kw)
    idx = torch.randint(0, 64, (3, 16), device=DEVICE)
    assert list(fused.state_dict()) == list(ref.state_dict())
    (lf, loss_f), (lr, loss_r) = fused(idx, idx), ref(idx, idx)
    assert lf.shape == (3, 16, 64)
    torch.testing.assert_close(lf, lr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_f, loss_r)


@pytest.mark.parametrize("kw", VARIANTS)
def test_bert_kernel_switch_same_output(kw):
    fused, ref = pair("bert", nsp=True, **kw)
    ids = torch.randint(5, 64, (3, 16), device=DEVICE)
    mask = torch.ones(3, 16, dtype=torch.bool, device=DEVICE)
    mask[1, 10:] = False  # padding in one row
    labels = torch.where(torch.rand(3, 16, device=DEVICE) < 0.3, ids, -100)
    nsp = torch.tensor([0, 1, 0], device=DEVICE)
    of = fused(ids, None, mask, labels, nsp)
    orf = ref(ids, None, mask, labels, nsp)
    assert of.mlm_logits.shape == (3, 16, 64) and of.nsp_logits.shape == (3, 2)
    torch.testing.assert_close(of.mlm_logits, orf.mlm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(of.loss, orf.loss)
    # padding really is masked: changing padded tokens leaves the real positions unchanged
    ids2 = ids.clone()
    ids2[1, 10:] = 7
    torch.testing.assert_close(fused(ids2, None, mask).mlm_logits[1, :10], of.mlm_logits[1, :10], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 for Triton on CPU")
@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_kernel_switch_triton_interpreter(arch):
    # one tiny case on the Triton kernels (norms; attention too once tfkernels.attention exists)
    fused, ref = pair(arch, backend="triton", n_layer=1, block_size=8)
    ids = torch.randint(5, 64, (1, 8), device=DEVICE)
    if arch == "gpt":
        out_f, out_r = fused(ids)[0], ref(ids)[0]
    else:
        out_f, out_r = fused(ids).mlm_logits, ref(ids).mlm_logits
    torch.testing.assert_close(out_f, out_r, atol=1e-4, rtol=1e-4)


def test_causality_and_generate():
    torch.manual_seed(0)
    model = GPT(make_config("gpt", "tiny", kernels="torch", **SMALL)).eval()
    idx = torch.randint(0, 64, (2, 10))
    idx2 = idx.clone()
    idx2[:, 6:] = 3
    torch.testing.assert_close(model(idx)[0][:, :6], model(idx2)[0][:, :6])  # no peeking ahead
    out = model.generate(idx[:, :4], 20, temperature=0.9, top_k=5)  # runs past block_size 16
    assert out.shape == (2, 24) and torch.equal(out[:, :4], idx[:, :4])


@pytest.mark.parametrize("document_mask", [False, True])
@pytest.mark.parametrize("kernels", ["torch", *kernel_backends()])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_kv_cache_matches_the_full_forward(pos, kernels, document_mask):
    """A prompt, then chunks of 3 (a chunked prefill: queries aligned bottom-right over the cache) and
    single tokens (decoding steps) through the KV cache give the logits of one full forward. With
    document masking the cache's ids continue the full forward's: EOS tokens at the start, twice in a
    row, ending a chunk (the next chunk starts a new document) and inside a chunk."""
    torch.manual_seed(0)
    kw = dict(kernels="torch") if kernels == "torch" else dict(kernels="tfkernels", backend=kernels)
    model = GPT(make_config("gpt", "tiny", pos=pos, document_mask=document_mask, **kw, **SMALL)).eval().to(DEVICE)
    idx = torch.randint(1, 64, (2, 16), device=DEVICE)
    if document_mask:
        idx[0, [0, 4, 5, 11]] = EOS
        idx[1, [7, 15]] = EOS
    full = model(idx)[0]
    cache = KVCache(model.cfg.n_layer, model.cfg.block_size)
    steps = [5, 3, 1, 1, 3, 1, 2]  # 16 tokens
    got, at = [], 0
    with torch.no_grad():
        for n in steps:
            got.append(model(idx[:, at:at + n], cache=cache)[0])
            at += n
            assert cache.pos == at
        torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="exceeds block_size"):  # the cache is full
            model(idx[:, :1], cache=cache)


@pytest.mark.parametrize("document_mask", [False, True])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_generate_with_and_without_cache(pos, document_mask):
    """Greedy decoding gives the same tokens either way, also past block_size (16), where the cached
    path goes back to re-reading the last block_size tokens. With document masking the prompt holds
    an EOS and sampling at a high temperature draws more (the uncached windows re-derive the ids)."""
    torch.manual_seed(0)
    model = GPT(make_config("gpt", "tiny", pos=pos, kernels="tfkernels", backend="torch",
                            document_mask=document_mask, **SMALL)).eval()
    idx = torch.randint(1, 64, (2, 5))
    if document_mask:
        idx[:, 2] = EOS
    cached = model.generate(idx, 20, temperature=0)
    assert torch.equal(cached, model.generate(idx, 20, temperature=0, use_cache=False))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled = model.generate(idx, 8, temperature=0.9, top_k=5, generator=g1)
    assert torch.equal(sampled, model.generate(idx, 8, temperature=0.9, top_k=5, generator=g2, use_cache=False))
    if document_mask:  # near-uniform sampling until a sampled EOS starts a new document while the cache serves
        for seed in range(20):
            hot = model.generate(idx, 20, temperature=5.0, generator=torch.Generator().manual_seed(seed))
            if (hot[:, 5:15] == EOS).any():  # the cache serves up to block_size (16 tokens)
                break
        assert (hot[:, 5:15] == EOS).any()
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(hot, model.generate(idx, 20, temperature=5.0, generator=g, use_cache=False))


def test_tied_embeddings_and_decay_groups():
    for cls, arch in ((GPT, "gpt"), (BERT, "bert")):
        model = cls(make_config(arch, "tiny", kernels="torch", **SMALL))
        head = model.lm_head if arch == "gpt" else model.mlm_decoder
        assert head.weight is model.transformer.wte.weight
        decay, no_decay = model.optim_groups(0.1)
        decay_ids = {id(p) for p in decay["params"]}
        for name, p in model.named_parameters():
            should = p.dim() >= 2 and "wte" not in name and "wpe" not in name and "wtt" not in name
            assert (id(p) in decay_ids) == should, name
        assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(False)


def test_bert_segment_zero_is_pinned():
    """Segment 0's embedding stays zero (see BERT.__init__): a trained one is a shared shift that
    Adam grows until it drowns the token embeddings."""
    torch.manual_seed(0)
    model = build_model(make_config("bert", "tiny", kernels="torch", **SMALL))
    wtt = model.transformer.wtt.weight
    assert wtt[0].abs().max() == 0 and wtt[1].abs().max() > 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(6, 64, (2, 16))
    seg = (torch.arange(16) >= 8).long().expand(2, 16)
    for _ in range(3):
        opt.zero_grad()
        model(ids, seg, mlm_labels=ids).loss.backward()
        opt.step()
    assert wtt[0].abs().max() == 0 and wtt.grad[1].abs().max() > 0


def test_presets():
    gpt2 = make_config("gpt", "gpt2-124m")
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.block_size, gpt2.vocab_size) == (12, 768, 12, 1024, 50304)
    with torch.device("meta"):
        n = GPT(gpt2).num_params()
    assert 123e6 < n < 125e6  # GPT-2 small without position embeddings
    bert = make_config("bert", "bert-base")
    assert (bert.n_layer, bert.n_embd, bert.block_size, bert.nsp) == (12, 768, 512, True)
    assert make_config("bert", "tiny", nsp=None).nsp is False
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        make_config("gpt", "gpt5")
    with pytest.raises(ValueError, match="norm"):
        make_config("gpt", "tiny", norm="batchnorm")
    assert set(PRESETS) >= {"tiny", "gpt2-124m", "bert-base"}
    assert hasattr(tfkernels, "nn")


def test_bert_mlm_loss_without_masked_tokens_is_zero():
    """A micro-batch in which no token is masked (short sequences) gives MLM loss 0 and no gradient,
    not nan (the mean over no tokens was 0/0); otherwise the loss is still the mean over masked tokens.
    mlm_loss_sum is the sum over them (the trainer divides it by the masked tokens of the whole step)."""
    torch.manual_seed(0)
    model = build_model(make_config("bert", "tiny", kernels="torch", nsp=True, **SMALL))
    ids = torch.randint(5, 64, (2, 16))
    none = torch.full_like(ids, -100)
    out = model(ids, mlm_labels=none, nsp_labels=torch.tensor([0, 1]))
    assert out.mlm_loss.item() == 0.0 and out.mlm_loss_sum.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.mlm_dense.weight.grad.abs().sum() == 0  # only NSP trains on such a batch
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, none)
    logits = model(ids).mlm_logits
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 64), labels.view(-1), ignore_index=-100)
    out = model(ids, mlm_labels=labels)
    torch.testing.assert_close(out.mlm_loss, expected)
    torch.testing.assert_close(out.mlm_loss_sum, expected * (labels != -100).sum())


# ----------------------------------------------------------------------------- document masking

@pytest.mark.parametrize("tokens,expected", [
    ([5, 6, 0, 7, 8], [0, 0, 0, 1, 1]),   # an EOS belongs to the document it ends
    ([0, 5, 6, 7, 8], [0, 1, 1, 1, 1]),   # EOS first: a document of its own (the end of one cut off)
    ([5, 6, 7, 8, 0], [0, 0, 0, 0, 0]),   # EOS last: one document (the next token would start document 1)
    ([5, 0, 0, 0, 6], [0, 0, 1, 2, 3]),   # consecutive EOS: documents of one token
    ([0, 0, 5, 6, 0], [0, 1, 2, 2, 2]),
    ([5, 6, 7, 8, 9], [0, 0, 0, 0, 0]),   # no EOS: one document
])
def test_document_ids_from_tokens(tokens, expected):
    assert EOS == 0 == ModelConfig().eos_id  # the models' default is the tokenizer's <|endoftext|>
    idx = torch.tensor([tokens])
    ids = document_ids_from_tokens(idx, EOS)
    assert ids.dtype == torch.int32 and ids.tolist() == [expected]
    # cut anywhere, the second part continued from the first (as the KV cache continues) gives the same ids
    for cut in range(1, len(tokens)):
        a = document_ids_from_tokens(idx[:, :cut], EOS)
        b = document_ids_from_tokens(idx[:, cut:], EOS, first=a[:, -1] + (idx[:, cut - 1] == EOS).int())
        assert torch.cat([a, b], 1).tolist() == [expected]
    assert document_ids_from_tokens(idx.expand(3, -1), EOS).tolist() == [expected] * 3  # per row


def test_document_mask_config():
    cfg = make_config("gpt", "tiny", document_mask=True)
    assert cfg.document_mask and ModelConfig.from_dict(cfg.to_dict()) == cfg  # saved like every field
    old = cfg.to_dict()
    del old["document_mask"], old["eos_id"]  # a checkpoint from before the option: off, as it trained
    assert ModelConfig.from_dict(old).document_mask is False
    assert make_config("gpt", "tiny").document_mask is False
    with pytest.raises(ValueError, match="document_mask is a GPT option"):
        make_config("bert", "tiny", document_mask=True)
    with pytest.raises(ValueError, match="eos_id=2048 is not a token id"):
        make_config("gpt", "tiny", document_mask=True, eos_id=2048)


# Two rows of three packed documents each, lengths crossing the kernels' 16-row granules and blocks:
# (start, end) spans; every document but a row's last ends with an EOS (the last is cut off, as LMLoader cuts).
DOC_T = 40
DOC_SPANS = [[(0, 13), (13, 33), (33, 40)], [(0, 1), (1, 31), (31, 40)]]


def packed_batch(V=64):
    torch.manual_seed(1)
    idx = torch.randint(1, V, (len(DOC_SPANS), DOC_T))
    for r, spans in enumerate(DOC_SPANS):
        for _, end in spans[:-1]:
            idx[r, end - 1] = EOS
    return idx.to(DEVICE), torch.randint(0, V, idx.shape).to(DEVICE)


def loss_and_grads(model, idx, targets, docs_alone=False):
    """(logits (B, T, V), {name: grad}) of the mean token loss. docs_alone: each document of
    DOC_SPANS through `model` on its own (no document mask), the logits put back in their places
    and the loss the same mean over all B * T tokens."""
    model.zero_grad(set_to_none=True)
    if not docs_alone:
        logits, loss = model(idx, targets)
    else:
        parts, loss = [], 0.0
        for r, spans in enumerate(DOC_SPANS):
            for s, e in spans:
                out, part = model(idx[r:r + 1, s:e], targets[r:r + 1, s:e])
                parts.append((r, s, e, out[0]))
                loss = loss + part * (e - s) / idx.numel()
        logits = torch.empty(*idx.shape, parts[0][3].shape[-1], dtype=parts[0][3].dtype, device=idx.device)
        for r, s, e, out in parts:
            logits[r, s:e] = out.detach()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("path", ["torch", "tfkernels-torch", *[f"tfkernels-{b}" for b in kernel_backends()]])
@pytest.mark.parametrize("kw", [dict(pos="rope", norm="rmsnorm", mlp="swiglu"), dict(pos="rope")])
def test_document_mask_equals_documents_run_alone(path, kw):
    """The strongest check: with document masking, a packed row computes for each document what the
    document computes alone — logits and every parameter's gradient of the mean loss, against a float64
    model running the documents one by one (no mask). With RoPE the scores depend only on distances
    within a document, so a document's offset in the row changes nothing and the comparison is exact
    for every document. Paths: plain PyTorch (SDPA with the dense same-document & causal mask),
    tfkernels.attention's reference backend and its kernels (document_ids)."""
    cfg = dict(SMALL, block_size=DOC_T, **kw)
    torch.manual_seed(0)
    ref = GPT(make_config("gpt", "tiny", kernels="torch", **cfg)).double().to(DEVICE)
    kernels, _, backend = path.partition("-")
    model = GPT(make_config("gpt", "tiny", kernels=kernels, backend=backend or None, document_mask=True, **cfg))
    model.load_state_dict(ref.state_dict())
    model.to(DEVICE)
    idx, targets = packed_batch()
    want_logits, want_grads = loss_and_grads(ref, idx, targets, docs_alone=True)
    logits, grads = loss_and_grads(model, idx, targets)
    torch.testing.assert_close(logits.double(), want_logits, atol=2e-5, rtol=1e-4)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        want = want_grads[name]
        torch.testing.assert_close(g.double(), want, atol=1e-6 + 2e-4 * want.abs().max().item(), rtol=0,
                                   msg=lambda m: f"{name}: {m}")
    # and the mask matters: without it the later documents read the earlier ones
    plain = GPT(make_config("gpt", "tiny", kernels="torch", **cfg)).double().to(DEVICE)
    plain.load_state_dict(ref.state_dict())
    with torch.no_grad():
        unmasked = plain(idx)[0]
    assert (unmasked[0, 13:] - want_logits[0, 13:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["torch", *[b for b in kernel_backends() if b != "cuda"]])
@pytest.mark.parametrize("kw", VARIANTS)
def test_document_mask_fused_vs_plain_pytorch(backend, kw):
    """The two paths of the A/B comparison stay one function with document masking, learned positions
    included (a later document sees its row offset: not the document alone, but the same on both
    paths): tfkernels.attention with document_ids vs SDPA with the dense mask, logits and gradients.
    The first document of a row is the document alone, position for position."""
    cfg = dict(SMALL, block_size=DOC_T, **kw)
    torch.manual_seed(0)
    ref = GPT(make_config("gpt", "tiny", kernels="torch", document_mask=True, **cfg))
    fused = GPT(make_config("gpt", "tiny", kernels="tfkernels", backend=backend, document_mask=True, **cfg))
    fused.load_state_dict(ref.state_dict())
    ref.to(DEVICE), fused.to(DEVICE)
    idx, targets = packed_batch()
    (lf, gf), (lr, gr) = loss_and_grads(fused, idx, targets), loss_and_grads(ref, idx, targets)
    torch.testing.assert_close(lf, lr, atol=2e-5, rtol=1e-4)
    for name in gr:
        torch.testing.assert_close(gf[name], gr[name], atol=1e-6 + 2e-4 * gr[name].abs().max().item(), rtol=0,
                                   msg=lambda m: f"{name}: {m}")
    alone = GPT(make_config("gpt", "tiny", kernels="torch", **cfg)).eval().to(DEVICE)
    alone.load_state_dict(ref.state_dict())
    with torch.no_grad():
        first = alone(idx[:1, :13])[0][0]
    torch.testing.assert_close(lf[0, :13], first, atol=2e-5, rtol=1e-4)


def test_padding_queries_never_give_sdpa_an_empty_row(monkeypatch):
    """SDPA's CUDA backends return NaN for a query row that sees no key, and the next layer's values
    would carry it into every real token. The plain-PyTorch path's mask lets padding see itself and
    zeroes those rows after SDPA: an SDPA that answers empty rows with NaN (as those backends do,
    emulated here on CPU) leaves the model's outputs finite and unchanged, padding rows 0 as on
    the kernels."""
    import torch.nn.functional as F

    from tfkernels import model as M

    torch.manual_seed(0)
    model = GPT(make_config("gpt", "tiny", kernels="torch", **SMALL)).eval()
    idx = torch.randint(1, 64, (2, 10))
    ids = torch.zeros(2, 10, dtype=torch.int32)
    ids[0, :4] = -1  # left padding
    ids[1, 7:] = -1  # and at the end
    docs = M.DocumentMask.build(ids, ids, sdpa=True)
    assert docs.sdpa_mask.any(-1).all(), "a query row of the mask sees no key"
    with torch.no_grad():
        ref = model(idx, document_ids=ids)[0]
        sdpa = F.scaled_dot_product_attention

        def nan_rows(q, k, v, attn_mask=None, **kw):  # what an efficient/cuDNN backend does with an empty row
            out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                out = out.masked_fill(~attn_mask.any(-1, keepdim=True), float("nan"))
            return out

        monkeypatch.setattr(M.F, "scaled_dot_product_attention", nan_rows)
        out = model(idx, document_ids=ids)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_explicit_document_ids():
    """document_ids given to forward: the same as the derived ones, without cfg.document_mask; a negative
    id is padding (attends to nothing, and nothing attends to it); bad arguments are clear errors."""
    torch.manual_seed(0)
    for kernels in ("torch", "tfkernels"):
        cfg = dict(SMALL, kernels=kernels, backend="torch" if kernels == "tfkernels" else None)
        torch.manual_seed(0)
        derived = GPT(make_config("gpt", "tiny", document_mask=True, **cfg)).eval()
        model = GPT(make_config("gpt", "tiny", **cfg)).eval()
        model.load_state_dict(derived.state_dict())
        idx = torch.randint(1, 64, (2, 16))
        idx[:, [3, 9]] = EOS
        ids = document_ids_from_tokens(idx, EOS).long()  # any integer dtype
        with torch.no_grad():
            torch.testing.assert_close(model(idx, document_ids=ids)[0], derived(idx)[0])
            # padding at the end of row 1 (ids -1): the real tokens do not see it, whatever it holds
            pad = ids.clone()
            pad[1, 12:] = -1
            out = model(idx, document_ids=pad)[0]
            idx2 = idx.clone()
            idx2[1, 12:] = 7
            torch.testing.assert_close(model(idx2, document_ids=pad)[0][:, :12], out[:, :12])
            torch.testing.assert_close(out[:, :12], derived(idx)[0][:, :12])
            assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"document_ids of shape \[2, 15\] must have idx's shape \[2, 16\]"):
        model(idx, document_ids=ids[:, 1:])
    with pytest.raises(TypeError, match="document_ids must be integer"):
        model(idx, document_ids=ids.float())
    # a KV cache keeps ids once given: every call on it needs them (or none ever)
    cache = KVCache(model.cfg.n_layer, model.cfg.block_size)
    with torch.no_grad():
        model(idx[:, :4], cache=cache)
        with pytest.raises(ValueError, match="holds tokens without them"):
            model(idx[:, 4:6], cache=cache, document_ids=ids[:, 4:6])
        cache = KVCache(model.cfg.n_layer, model.cfg.block_size)
        model(idx[:, :4], cache=cache, document_ids=ids[:, :4])
        with pytest.raises(ValueError, match="the KV cache holds document ids"):
            model(idx[:, 4:6], cache=cache)


# ----------------------------------------------------------------------------------------------
# grouped-query attention (n_kv_head)
# ----------------------------------------------------------------------------------------------

GQA = dict(SMALL, n_head=4, n_kv_head=2, norm="rmsnorm", mlp="swiglu", pos="rope")  # Llama's shape, 4:2


def test_gqa_config():
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        make_config("gpt", "tiny", n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_kv_head=8 must divide"):
        make_config("gpt", "tiny", n_head=4, n_kv_head=8)
    with pytest.raises(ValueError, match="GPT option"):
        make_config("bert", "tiny", n_kv_head=2)
    gqa, mha = GPT(make_config("gpt", "tiny", **GQA)), GPT(make_config("gpt", "tiny", **dict(GQA, n_kv_head=None)))
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 16, 32)  # q, then 2 K and 2 V heads of 8
    # per layer, K and V each lose 2 heads of 8 rows: 16 rows of 32 weights and 16 biases
    assert gqa.num_params() == mha.num_params() - GQA["n_layer"] * 2 * (16 * 32 + 16)


@pytest.mark.parametrize("backend", ["torch", *kernel_backends()])
def test_gqa_gpt_kernel_switch_and_grad(backend):
    fused, ref = pair("gpt", backend=backend, **GQA)
    fused.train(), ref.train()
    idx = torch.randint(0, 64, (2, 16), device=DEVICE)
    (lf, loss_f), (lr, loss_r) = fused(idx, idx), ref(idx, idx)
    torch.testing.assert_close(lf, lr, atol=1e-4, rtol=1e-4)
    loss_f.backward(), loss_r.backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_gqa_equals_mha_with_shared_heads():
    """Query head h uses K/V head h // (n_head / n_kv_head): the GQA model equals the MHA model whose
    K and V projections repeat each K/V head for its group."""
    torch.manual_seed(0)
    gqa = GPT(make_config("gpt", "tiny", kernels="torch", **GQA)).eval()
    mha = GPT(make_config("gpt", "tiny", kernels="torch", **dict(GQA, n_kv_head=None))).eval()
    sd = gqa.state_dict()
    for i in range(GQA["n_layer"]):
        for kind in ("weight", "bias"):
            q, k, v = sd[f"transformer.h.{i}.attn.c_attn.{kind}"].split((32, 16, 16))
            rep = lambda t: t.view(2, 8, -1).repeat_interleave(2, 0).reshape(32, -1).squeeze(-1)  # noqa: E731
            sd[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat([q, rep(k), rep(v)])  # (kv head, Dh, C) rows
    mha.load_state_dict(sd)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernels", ["torch", *kernel_backends()])
def test_gqa_kv_cache_matches_the_full_forward(kernels):
    torch.manual_seed(0)
    kw = dict(kernels="torch") if kernels == "torch" else dict(kernels="tfkernels", backend=kernels)
    model = GPT(make_config("gpt", "tiny", **kw, **GQA)).eval().to(DEVICE)
    idx = torch.randint(1, 64, (2, 16), device=DEVICE)
    full = model(idx)[0]
    cache = KVCache(model.cfg.n_layer, model.cfg.block_size)
    with torch.no_grad():
        got = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 6), (6, 7), (7, 10), (10, 16))]
    assert cache.k[0].shape[2] == 2  # the cache holds the K/V heads only
    torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-5, rtol=1e-5)


def _left_padded(prompts, pad_token=0):
    T = max(len(p) for p in prompts)
    idx = torch.stack([torch.cat([torch.full((T - len(p),), pad_token), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
                        for p in prompts])
    return idx, mask


@pytest.mark.parametrize("document_mask", [False, True])
@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("kernels", ["torch", "tfkernels"])
def test_generate_left_padded_batch(kernels, pos, document_mask):
    """Prompts of different lengths, left-padded with attention_mask: each row's greedy tokens are the
    ones its prompt gives alone, with and without the KV cache; past block_size (16) the cached and
    uncached paths still agree (both slide the window over the padding first)."""
    torch.manual_seed(0)
    model = GPT(make_config("gpt", "tiny", pos=pos, kernels=kernels, backend="torch" if kernels == "tfkernels" else None,
                            document_mask=document_mask, **SMALL)).eval()
    prompts = [torch.randint(1, 64, (n,)) for n in (3, 7, 5)]
    if document_mask:
        prompts[1][2] = EOS  # a document boundary inside a prompt
    idx, mask = _left_padded(prompts, pad_token=EOS if document_mask else 0)  # padding that looks like an EOS
    T = idx.shape[1]
    for use_cache in (True, False):
        out = model.generate(idx, 6, temperature=0, use_cache=use_cache, attention_mask=mask)
        assert torch.equal(out[:, :T], idx)
        for b, p in enumerate(prompts):
            alone = model.generate(p[None], 6, temperature=0, use_cache=use_cache)
            assert torch.equal(out[b, T:], alone[0, len(p):]), (b, use_cache)
    long = model.generate(idx, 14, temperature=0, attention_mask=mask)  # 7 + 14 > block_size
    assert torch.equal(long, model.generate(idx, 14, temperature=0, use_cache=False, attention_mask=mask))
    # no padding at all: attention_mask changes nothing
    full = torch.ones_like(idx)
    assert torch.equal(model.generate(idx, 4, temperature=0, attention_mask=full), model.generate(idx, 4, temperature=0))


@pytest.mark.parametrize("document_mask", [False, True])
@pytest.mark.parametrize("kernels", ["torch", "tfkernels", "kernel-backend"])
def test_left_padded_cached_logits_match_alone(kernels, document_mask):
    """What generate feeds a cached forward for a left-padded batch (the prefill, then a step), at the
    logits: each row's equal its prompt's alone. The fused kernels without documents skip the padding
    inside kvcache_attention (cache.leftpad); the other paths mask it with document ids."""
    torch.manual_seed(1)
    backend = kernel_backends()[0] if kernels == "kernel-backend" else "torch"
    model = GPT(make_config("gpt", "tiny", pos="rope", kernels="torch" if kernels == "torch" else "tfkernels",
                            backend=backend if kernels != "torch" else None, document_mask=document_mask,
                            **SMALL)).eval().to(DEVICE)
    prompts = [torch.randint(1, 64, (n,)) for n in (2, 6, 4)]
    idx, mask = _left_padded(prompts)
    idx = idx.to(DEVICE)
    pad = model._left_padding(idx, mask.to(DEVICE))
    nxt = torch.randint(1, 64, (3, 1), device=DEVICE)
    with torch.no_grad():
        cache = KVCache(model.cfg.n_layer, model.cfg.block_size)
        prefill = model(idx, cache=cache, **model._padded_inputs(idx, pad, 0, cache))[0]
        assert (cache.leftpad is not None) == (kernels != "torch" and not document_mask)
        both = torch.cat([idx, nxt], 1)
        step = model(nxt, cache=cache, **model._padded_inputs(both, pad, cache.pos, cache))[0]
        for b, p in enumerate(prompts):
            alone = model(torch.cat([p.to(DEVICE), nxt[b]])[None])[0][0]  # (len + 1, V)
            torch.testing.assert_close(prefill[b, idx.shape[1] - len(p):], alone[:-1], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(step[b, 0], alone[-1], atol=2e-5, rtol=1e-4)


def test_generate_left_padded_on_the_kernels():
    """The same on the fused kernels (the tests' kernel backend): padded rows decode as alone."""
    torch.manual_seed(0)
    backend = kernel_backends()[0]
    model = GPT(make_config("gpt", "tiny", pos="rope", kernels="tfkernels", backend=backend, **SMALL)).eval().to(DEVICE)
    prompts = [torch.randint(1, 64, (n,), device=DEVICE) for n in (2, 6)]
    idx, mask = _left_padded([p.cpu() for p in prompts])
    out = model.generate(idx.to(DEVICE), 3, temperature=0, attention_mask=mask.to(DEVICE))
    for b, p in enumerate(prompts):
        assert torch.equal(out[b, 6:], model.generate(p[None], 3, temperature=0)[0, len(p):])


def test_generate_attention_mask_errors():
    model = GPT(make_config("gpt", "tiny", kernels="torch", **SMALL)).eval()
    idx = torch.randint(1, 64, (2, 4))
    with pytest.raises(ValueError, match="left padding"):
        model.generate(idx, 1, attention_mask=torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one real token"):
        model.generate(idx, 1, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask of shape"):
        model.generate(idx, 1, attention_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        model.generate(idx, 1, attention_mask=[[1, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="positions must be in"):
        model(idx, positions=torch.full((2, 4), 16))
    with pytest.raises(ValueError, match="positions of shape"):
        model(idx, positions=torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [*VARIANTS, dict(document_mask=True)])
def test_fused_training_step_never_waits_for_the_gpu(kw):
    """A training step of the GPT on the kernels makes no host-device synchronisation: one inside a
    layer would turn the host's time into GPU idle time in every step (what a kernel table cannot
    show). The first step compiles and tunes; the second runs under sync_debug_mode="error"."""
    torch.manual_seed(0)
    model = GPT(make_config("gpt", "tiny", kernels="tfkernels", **{**SMALL, **kw})).cuda()
    idx = torch.randint(0, 64, (2, 16), device="cuda")
    if kw.get("document_mask"):
        idx[:, 5] = EOS

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
