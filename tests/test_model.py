"""The thin GPT / BERT: shapes, variants, the tfkernels <-> torch kernel switch, presets."""
import os

import pytest
import torch

import tfkernels
from conftest import kernel_backends
from tfkernels.model import BERT, GPT, PRESETS, KVCache, build_model, make_config

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
VARIANTS = [dict(), dict(norm="rmsnorm", mlp="swiglu", pos="rope"), dict(bias=False, mlp="swiglu")]


def pair(arch, backend="torch", **kw):
    """The same model built twice: on tfkernels (with `backend`) and on plain PyTorch, same weights."""
    torch.manual_seed(0)
    ref = build_model(make_config(arch, "tiny", kernels="torch", **{**SMALL, **kw})).eval()
    fused = build_model(make_config(arch, "tiny", kernels="tfkernels", backend=backend, **{**SMALL, **kw})).eval()
    missing = fused.load_state_dict(ref.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    return fused, ref


@pytest.mark.parametrize("kw", VARIANTS)
def test_gpt_kernel_switch_same_output(kw):
    fused, ref = pair("gpt", **kw)
    idx = torch.randint(0, 64, (3, 16))
    assert list(fused.state_dict()) == list(ref.state_dict())
    (lf, loss_f), (lr, loss_r) = fused(idx, idx), ref(idx, idx)
    assert lf.shape == (3, 16, 64)
    torch.testing.assert_close(lf, lr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_f, loss_r)


@pytest.mark.parametrize("kw", VARIANTS)
def test_bert_kernel_switch_same_output(kw):
    fused, ref = pair("bert", nsp=True, **kw)
    ids = torch.randint(5, 64, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 10:] = False  # padding in one row
    labels = torch.where(torch.rand(3, 16) < 0.3, ids, -100)
    of = fused(ids, None, mask, labels, torch.tensor([0, 1, 0]))
    orf = ref(ids, None, mask, labels, torch.tensor([0, 1, 0]))
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
    ids = torch.randint(5, 64, (1, 8))
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


@pytest.mark.parametrize("kernels", ["torch", *kernel_backends()])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_kv_cache_matches_the_full_forward(pos, kernels):
    """A prompt, then chunks of 3 (a chunked prefill: queries aligned bottom-right over the cache) and
    single tokens (decoding steps) through the KV cache give the logits of one full forward."""
    torch.manual_seed(0)
    kw = dict(kernels="torch") if kernels == "torch" else dict(kernels="tfkernels", backend=kernels)
    model = GPT(make_config("gpt", "tiny", pos=pos, **kw, **SMALL)).eval()
    idx = torch.randint(0, 64, (2, 16))
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


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_generate_with_and_without_cache(pos):
    """Greedy decoding gives the same tokens either way, also past block_size (16), where the cached
    path goes back to re-reading the last block_size tokens."""
    torch.manual_seed(0)
    model = GPT(make_config("gpt", "tiny", pos=pos, kernels="tfkernels", backend="torch", **SMALL)).eval()
    idx = torch.randint(0, 64, (2, 5))
    cached = model.generate(idx, 20, temperature=0)
    assert torch.equal(cached, model.generate(idx, 20, temperature=0, use_cache=False))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled = model.generate(idx, 8, temperature=0.9, top_k=5, generator=g1)
    assert torch.equal(sampled, model.generate(idx, 8, temperature=0.9, top_k=5, generator=g2, use_cache=False))


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
