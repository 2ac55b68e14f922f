"""tfkernels.swap on Hugging Face models (tiny configs, no download) and attn_implementation="tfkernels".

Every model is checked against an unswapped copy of itself (default "sdpa" attention, HF norms):
logits and every parameter gradient, with a padded batch; then unswap must give bit-identical outputs.
"""
import copy
import inspect
import re

import pytest
import torch

import tfkernels
from tfkernels import hf

transformers = pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "triton"  # the interpreter on CPU (conftest sets TRITON_INTERPRET=1)
V, T = 97, 12

pytestmark = pytest.mark.usefixtures("attention_calls")  # conftest's spy on tfkernels.attention, in every test


def _small(**kw):
    return dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, **kw)


def _bert_like(cfg_cls):
    return cfg_cls(**_small(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=2))


MODELS = {
    "bert": lambda t: t.BertForMaskedLM(_bert_like(t.BertConfig)),
    "roberta": lambda t: t.RobertaForMaskedLM(_bert_like(t.RobertaConfig)),
    "gpt2": lambda t: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": lambda t: t.LlamaForCausalLM(t.LlamaConfig(**_small(num_key_value_heads=4))),
    # GQA: 4 query heads share 2 key/value heads
    "qwen2": lambda t: t.Qwen2ForCausalLM(t.Qwen2Config(**_small(num_key_value_heads=2))),
    # GQA + a sliding window shorter than the sequence
    "mistral": lambda t: t.MistralForCausalLM(t.MistralConfig(**_small(num_key_value_heads=2, sliding_window=5))),
}


def _build(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = MODELS[name](transformers).to(DEVICE, dtype)
    for p in model.parameters():  # non-trivial norm weights and biases, so their gradients mean something
        if p.dim() == 1:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch(padding_side="right"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    if padding_side == "right":
        mask[1, 8:] = 0
        mask[2, 5:] = 0
    else:
        mask[1, :4] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _fwd_bwd(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    # loss only on real tokens: padded positions' outputs are not defined the same way by every path
    loss = (logits.float().logsumexp(-1) * valid).sum() / valid.sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _close(a, b, tol, name):
    err = (a.double() - b.double()).abs().max().item()
    bound = tol * (1.0 + b.double().abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_swap_matches_unswapped(name, attention_calls):
    ref_model = _build(name)
    model = copy.deepcopy(ref_model)
    ids, mask = _batch("left" if name == "llama" else "right")
    ref_logits, ref_grads = _fwd_bwd(ref_model, ids, mask)

    n_params = len(list(model.parameters()))
    params_before = {n: p for n, p in model.named_parameters()}
    _, report = tfkernels.swap(model, backend=BACKEND, return_report=True)
    assert model.config._attn_implementation == "tfkernels"
    assert any("attn_implementation=tfkernels" in r[2] for r in report)
    assert any(r[2].startswith("tfkernels.") for r in report), report
    # the same Parameter objects, no copies
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert len(list(model.parameters())) == n_params

    logits, grads = _fwd_bwd(model, ids, mask)
    assert len(attention_calls) == 2  # one per layer (the backward goes through autograd)
    assert set(attention_calls) == {BACKEND}
    valid = mask.bool()
    _close(logits[valid], ref_logits[valid], 2e-5, f"{name} logits")
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        _close(grads[n], ref_grads[n], 5e-5, f"{name} grad {n}")

    tfkernels.unswap(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask).logits
        expected = ref_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(again, expected)


def _spy_kvcache(monkeypatch):
    """Record (cache_seqlens, cache_leftpad) of every tfkernels.kvcache_attention call (see _runs)."""
    calls = []
    fn = tfkernels.kvcache_attention
    monkeypatch.setattr(tfkernels, "kvcache_attention",
                        lambda *a, **k: calls.append((a[3], k.get("cache_leftpad"))) or fn(*a, **k))
    return calls


def _runs(calls):
    """_spy_kvcache's records as host lists (read after the calls, not counted among their reads)."""
    return [tuple(x.tolist() if isinstance(x, torch.Tensor) else x for x in c) for c in calls]


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_generate_with_kv_cache_matches_sdpa(name, attention_calls, attention_kwargs, monkeypatch):
    """Greedy generation from a left-padded batch: the prefill (T_q = T_k, padding mask) runs attention,
    then one query against the growing KV cache per token (T_q = 1 < T_k, HF's padding mask; with
    Mistral's sliding window of 5 shorter than the sequence, the window too) runs kvcache_attention with
    each row's run of visible keys as cache_leftpad / cache_seqlens. Token for token what 'sdpa'
    generates, with the step logits close. The position_ids generate() makes for the left-padded row
    restart (1, 1, 1, 1, 0, 1, ...) but come with the padding mask: never document ids."""
    ref_model = _build(name)
    model = tfkernels.swap(copy.deepcopy(ref_model), backend=BACKEND)
    decode = _spy_kvcache(monkeypatch)
    ids, mask = _batch("left")
    ids, mask = ids[:, :8], mask[:, :8]
    gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
               pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        want = ref_model.generate(ids, **gen)
        got = model.generate(ids, **gen)
    assert len(attention_calls) == 2  # two layers' prefill; then 3 cached steps of kvcache_attention
    decode = _runs(decode)
    for step in range(3):
        assert decode[2 * step + 1] == decode[2 * step]  # both layers: the same mask, the same runs
        if name == "llama":  # step s: 9 + s keys, row 1's first 4 are padding
            assert decode[2 * step] == ([9 + step] * 3, [0, 4, 0])
        else:  # a sliding cache: the window's last 4 keys and the new one, past row 1's padding
            assert decode[2 * step] == ([5] * 3, [0] * 3)
    assert len(decode) == 2 * 3
    assert all(kw.get("document_ids") is None for kw in attention_kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        _close(a, b, 2e-5, f"{name} logits of generated token {step}")


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_generate_unpadded_decodes_through_kvcache_attention(name, attention_calls, monkeypatch):
    """Without padding every decode step (T_q = 1, no mask) runs kvcache_attention on the cache's
    (B, T_k, H_kv, D) views (GQA for qwen2); the prefill runs attention. Same tokens as 'sdpa'."""
    ref_model = _build(name)
    model = tfkernels.swap(copy.deepcopy(ref_model), backend=BACKEND)
    decode = []
    fn = tfkernels.kvcache_attention
    monkeypatch.setattr(tfkernels, "kvcache_attention", lambda *a, **k: decode.append(k["backend"]) or fn(*a, **k))
    ids = _batch()[0][:2, :8]
    gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        want = ref_model.generate(ids, **gen)
        got = model.generate(ids, **gen)
    assert len(attention_calls) == 2 and decode == [BACKEND] * 2 * 3  # two layers: prefill, then 3 steps
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        _close(a, b, 2e-5, f"{name} logits of generated token {step}")


# ---- sliding window, softcap ------------------------------------------------------------------

W, TW = 8, 24  # window shorter than the sequence: the window bites

WINDOW_MODELS = {
    # every layer sliding, GQA; compared with 'sdpa'
    "mistral": (lambda t: t.MistralForCausalLM(t.MistralConfig(**_small(num_key_value_heads=2, sliding_window=W))),
                "sdpa"),
    # layer 0 sliding, layer 1 global; logits soft-capped at 2 with scores large enough for it to bite.
    # 'eager' is the reference: 'sdpa' raises on softcap in transformers 5.23 and ignores it in 5.17
    "gemma2": (lambda t: t.Gemma2ForCausalLM(t.Gemma2Config(**_small(
        num_key_value_heads=2, head_dim=8, sliding_window=W, attn_logit_softcapping=2.0, query_pre_attn_scalar=1,
        initializer_range=0.2))), "eager"),
}


def _build_window(name):
    factory, ref_impl = WINDOW_MODELS[name]
    torch.manual_seed(0)
    model = factory(transformers).to(DEVICE)
    for p in model.parameters():
        if p.dim() == 1:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    model.set_attn_implementation(ref_impl)
    return model.eval()


def _window_batch(padding):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, TW), generator=g)
    mask = torch.ones(2, TW, dtype=torch.long)
    if padding == "left":
        mask[1, :11] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.fixture
def attention_kwargs(attention_calls, monkeypatch):
    """The keyword arguments of every tfkernels.attention call (attn_mask as None or its shape)."""
    fn = tfkernels.attention
    seen = []

    def spy(*args, **kwargs):
        m = kwargs.get("attn_mask")
        seen.append({**kwargs, "attn_mask": None if m is None else tuple(m.shape)})
        return fn(*args, **kwargs)

    monkeypatch.setattr(tfkernels, "attention", spy)
    return seen


def _sliding_layers(model):
    types = getattr(model.config, "layer_types", None)
    n = model.config.num_hidden_layers
    return [i for i in range(n) if types is None or types[i] == "sliding_attention"]


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("name", list(WINDOW_MODELS))
def test_sliding_window_and_softcap_match(name, padding, attention_kwargs):
    """Sliding-window layers (window 8 < 24 tokens) and Gemma 2's logit soft-capping: logits and every
    gradient as the reference implementation. Without padding the sliding layers run the kernel's own
    window (no mask, key tiles outside the window skipped); with padding they fall back to the mask."""
    ref = _build_window(name)
    if name == "gemma2":  # the capping bites: without it the logits are clearly different
        nocap = copy.deepcopy(ref)
        nocap.config.attn_logit_softcapping = None
        for layer in nocap.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        ids, mask = _window_batch("none")
        with torch.no_grad():
            diff = (nocap(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
        assert diff > 1e-2, diff
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    assert model.config._attn_implementation == "tfkernels"
    ids, mask = _window_batch(padding)
    ref_logits, ref_grads = _fwd_bwd(ref, ids, mask)
    logits, grads = _fwd_bwd(model, ids, mask)

    n = model.config.num_hidden_layers
    assert len(attention_kwargs) == n
    sliding = _sliding_layers(model)
    assert sliding and (name != "gemma2" or len(sliding) < n)
    for i, kw in enumerate(attention_kwargs):
        assert kw.get("softcap", 0.0) == (2.0 if name == "gemma2" else 0.0), (i, kw)
        if padding == "none":
            assert kw["attn_mask"] is None and kw["is_causal"] is True, (i, kw)
            assert kw.get("window_size") == ((W - 1, 0) if i in sliding else None), (i, kw)
        else:
            assert kw["attn_mask"] == (2, 1, TW, TW) and kw.get("window_size") is None, (i, kw)

    valid = mask.bool()
    _close(logits[valid], ref_logits[valid], 2e-5, f"{name} logits")
    assert grads.keys() == ref_grads.keys()
    for n_ in grads:
        _close(grads[n_], ref_grads[n_], 5e-5, f"{name} grad {n_}")


def test_sliding_window_with_cache_offset_uses_the_mask(attention_kwargs):
    """A second chunk of several tokens against a KV cache (T_q = 8 < T_k, offset 16): the kernel's
    top-left window would be wrong there, so the mask is used; the first chunk runs natively."""
    ref = _build_window("mistral")
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    ids, _ = _window_batch("none")
    out = {}
    for key, m in (("ref", ref), ("tfk", model)):
        with torch.no_grad():
            first = m(input_ids=ids[:, :16], use_cache=True)
            second = m(input_ids=ids[:, 16:], past_key_values=first.past_key_values, use_cache=True)
        out[key] = (first.logits, second.logits)
    assert [kw.get("window_size") for kw in attention_kwargs] == [(W - 1, 0)] * 2 + [None] * 2
    assert attention_kwargs[0]["attn_mask"] is None
    assert all(kw["attn_mask"] is not None for kw in attention_kwargs[2:])
    for a, b, what in zip(out["tfk"], out["ref"], ("first chunk", "second chunk")):
        _close(a, b, 2e-5, f"logits of the {what}")


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("name", list(WINDOW_MODELS))
def test_generate_sliding_window_matches(name, padding, attention_kwargs, monkeypatch):
    """Greedy generation with a KV cache, window 8 shorter than the 12-token prompt and the 18 tokens
    generated: the prefill runs the kernel's window when nothing is padded (the mask otherwise), every
    decode step (T_q = 1 < T_k) kvcache_attention, on every layer: the window's run of keys on sliding
    layers, the padding's on global ones (all keys without padding); tokens as the reference generates
    them."""
    ref = _build_window(name)
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    decode = _spy_kvcache(monkeypatch)
    ids, mask = _window_batch(padding)
    ids, mask = ids[:, :12], mask[:, :12]
    steps = 6
    gen = dict(max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
               pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        want = ref.generate(ids, **gen)
        got = model.generate(ids, **gen)
    n = model.config.num_hidden_layers
    sliding = _sliding_layers(model)
    assert len(decode) == n * (steps - 1)  # the decode steps: a run of keys per row, windowed or padded
    assert len(attention_kwargs) == n
    for i, kw in enumerate(attention_kwargs):
        native = i < n and i in sliding and padding == "none"  # the prefill's sliding layers
        assert kw.get("window_size") == ((W - 1, 0) if native else None), (i, kw)
        assert kw.get("document_ids") is None, (i, kw)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        _close(a, b, 2e-5, f"{name} logits of generated token {step}")


def _mask_case(case):
    """(attention implementation -> mask) for one case, built by transformers' own mask functions."""
    from transformers import masking_utils as mu

    assert hf.register()
    cfg = transformers.MistralConfig(**_small(num_key_value_heads=2, sliding_window=W))
    embeds = torch.zeros(2, TW, 32)
    kw = dict(config=cfg, inputs_embeds=embeds, attention_mask=None, past_key_values=None)
    fn = mu.create_sliding_window_causal_mask
    if case == "left_padding":
        kw["attention_mask"] = _window_batch("left")[1].cpu()
    elif case == "all_ones_mask":
        kw["attention_mask"] = torch.ones(2, TW, dtype=torch.long)
    elif case == "and_mask":
        kw["and_mask_function"] = lambda b, h, q, k: k != 3
    elif case == "chunked":
        cfg.attention_chunk_size = W
        fn = mu.create_chunked_causal_mask
    elif case == "other_model":  # a model not known to pass `sliding_window` to its attention function
        cfg = transformers.Qwen2MoeConfig(**_small(num_key_value_heads=2, sliding_window=W, use_sliding_window=True))
        kw["config"] = cfg
    elif case == "short":  # the sequence fits in the window: sdpa_mask's own None
        kw["inputs_embeds"] = embeds[:, : W - 1]
    masks = {}
    for impl in ("sdpa", "tfkernels"):
        cfg._attn_implementation = impl
        masks[impl] = fn(**kw)
    return masks


@pytest.mark.parametrize("case", ["plain", "all_ones_mask", "left_padding", "and_mask", "chunked", "other_model",
                                  "short"])
def test_sliding_window_mask_function(case):
    """The mask function registered for "tfkernels" is sdpa_mask except for an exactly sliding-window
    causal mask (no padding, no offset, no overlay) of a model that passes its window to attention."""
    masks = _mask_case(case)
    if case in ("plain", "all_ones_mask"):
        assert masks["sdpa"] is not None and masks["tfkernels"] is None
        keep = masks["sdpa"][0, 0]
        q, k = torch.arange(TW)[:, None], torch.arange(TW)[None]
        assert torch.equal(keep, (k <= q) & (k > q - W))  # HF's convention: W keys, the diagonal included
    elif masks["sdpa"] is None:
        assert case == "short" and masks["tfkernels"] is None
    else:
        assert torch.equal(masks["tfkernels"], masks["sdpa"]), case


def _packed_mask_case(case):
    """(attention implementation -> mask) for a batch of two rows packing sequences of 10 and 14 tokens
    and of 3, 3 and 18 (told by position_ids), built by transformers' own mask functions: a Llama's
    causal mask, or a Mistral's sliding one (window 8)."""
    from transformers import masking_utils as mu

    assert hf.register()
    lens = [[10, TW - 10], [3, 3, TW - 6]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lens])
    sliding = case.startswith("sliding")
    if case == "sliding_other_model":  # builds sliding masks but does not pass `sliding_window` to attention
        cfg = transformers.Qwen2MoeConfig(**_small(num_key_value_heads=2, sliding_window=W, use_sliding_window=True))
    elif case == "causal_other_model":  # a model not known to hand its mask to attention untouched
        cfg = transformers.GPTNeoXConfig(**_small())
    elif sliding:
        cfg = transformers.MistralConfig(**_small(num_key_value_heads=2, sliding_window=W))
    else:
        cfg = transformers.LlamaConfig(**_small(num_key_value_heads=2))
    kw = dict(config=cfg, inputs_embeds=torch.zeros(2, TW, 32), attention_mask=None, past_key_values=None,
              position_ids=pos)
    if case.endswith("all_ones_mask"):  # a 2D mask: transformers does not look for packing then
        kw["attention_mask"] = torch.ones(2, TW, dtype=torch.long)
    elif case.endswith("and_mask"):
        kw["and_mask_function"] = lambda b, h, q, k: k != 3
    elif case.endswith("one_sequence"):  # position_ids that do not restart: nothing packed
        kw["position_ids"] = torch.arange(TW)[None]
    elif case.endswith("restart_only_in_row_1"):  # row 0 one sequence, row 1 three
        kw["position_ids"] = torch.stack([torch.arange(TW), pos[1]])
    elif case.endswith("jump"):  # a new sequence where positions jump without restarting at 0
        kw["position_ids"] = torch.cat([torch.arange(10), torch.arange(20, 20 + TW - 10)])[None]
    elif "block" in case:  # a bidirectional block (an image, say) within a sequence, or across two:
        # an overlay with no vmap and no is_causal skip, just like packing: only the probes tell them apart
        blocks = torch.full((2, TW), -1)
        blocks[:, 2:6] = 0 if case.endswith("block_in_sequence") else -1
        blocks[:, 8:12] = 1 if case.endswith("block_across_sequences") else -1
        kw["block_sequence_ids"] = blocks
    fn = mu.create_sliding_window_causal_mask if sliding else mu.create_causal_mask
    masks = {}
    for impl in ("sdpa", "tfkernels"):
        cfg._attn_implementation = impl
        masks[impl] = fn(**kw)
    return masks, (W if sliding else None)


@pytest.mark.parametrize("case", [f"{kind}_{c}" for kind in ("causal", "sliding") for c in (
    "packed", "restart_only_in_row_1", "jump", "all_ones_mask", "and_mask", "block_in_sequence",
    "block_across_sequences", "one_sequence", "other_model")])
def test_packed_mask_function(case):
    """For packed sequences the mask function registered for "tfkernels" returns their document ids
    (B, 1, 1, T) int32 instead of the dense mask, exactly when that mask is causal within each sequence
    (and sliding, for a model that passes its window to attention); the ids stand for the same mask.
    Anything else is sdpa_mask's answer."""
    masks, window = _packed_mask_case(case)
    sdpa, tfk = masks["sdpa"], masks["tfkernels"]
    q, k = torch.arange(TW)[:, None], torch.arange(TW)[None]
    band = (k <= q) & (k > q - window) if window is not None else None
    if not case.endswith(("packed", "restart_only_in_row_1", "jump")):
        if tfk is None and sdpa is not None:  # nothing packed: the plain sliding window, run natively
            assert case.endswith(("all_ones_mask", "one_sequence")) and torch.equal(sdpa, band.expand(sdpa.shape))
        else:
            assert (sdpa is None and tfk is None) or torch.equal(tfk, sdpa), case
        return
    assert tfk.dtype == torch.int32 and tfk.shape == (2, 1, 1, TW), case
    d = tfk[:, 0, 0]
    keep = (d[:, None, :, None] == d[:, None, None, :]) & (k <= q)
    if window is not None:
        keep &= band
    assert torch.equal(keep, sdpa.expand(keep.shape)), case
    if case.endswith("packed"):  # transformers' own numbering: the sequences of each row from 0
        assert d.tolist() == [[0] * 10 + [1] * 14, [0] * 3 + [1] * 3 + [2] * 18]


def test_native_window_models_pass_their_window():
    """Every model type trusted with a None sliding mask passes `sliding_window=` to its attention
    function in the installed transformers (a None mask elsewhere would mean full causal attention)."""
    import importlib

    for model_type in sorted(hf._NATIVE_WINDOW_MODELS):
        pkg = model_type.removesuffix("_text")
        try:
            mod = importlib.import_module(f"transformers.models.{pkg}.modeling_{pkg}")
        except ImportError:
            continue
        src = inspect.getsource(mod)
        assert re.search(r"\bsliding_window=(self\.sliding_window|getattr\(self\.config, \"sliding_window\", None\))",
                         src), model_type


# ---- packed sequences (padding-free training) -----------------------------------------------------

# sequence lengths packed into each row (22 tokens a row); Mistral's window is 5, so most sequences
# are longer than it, and one sequence is a single token
PACKED_ROWS = {"one_row": [[5, 9, 1, 7]], "two_rows": [[6, 10, 6], [12, 1, 9]]}
PACKED_MODELS = ["llama", "mistral"]  # GQA full causal; GQA + sliding window 5


def _packed_batch(rows):
    """input_ids (B, T) and position_ids restarting at 0 for every sequence, as DataCollatorWithFlattening
    packs them (it makes one row: that case is built by the collator itself, its flash-attention kwargs
    included, which the attention functions must ignore), and the document id of every token."""
    g = torch.Generator().manual_seed(3)
    seqs = [[torch.randint(3, V, (n,), generator=g) for n in row] for row in rows]
    docs = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in rows]).to(DEVICE)
    if len(rows) == 1 and hasattr(transformers, "DataCollatorWithFlattening"):
        batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
            [{"input_ids": s.tolist()} for s in seqs[0]])
        batch.pop("labels")
        batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    else:
        batch = {"input_ids": torch.stack([torch.cat(row) for row in seqs]).to(DEVICE),
                 "position_ids": torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows]).to(DEVICE)}
    assert torch.equal(batch["position_ids"].cpu(), torch.stack([torch.cat([torch.arange(n) for n in row])
                                                                 for row in rows]))
    return batch, docs, seqs


def _loss(logits, valid=None):
    per_token = logits.float().logsumexp(-1)
    return (per_token if valid is None else per_token * valid).sum() / 100.0


def _packed_fwd_bwd(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    logits = model(**batch, **kw).logits
    _loss(logits, batch.get("attention_mask")).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _separate_logits(model, seqs):
    """Every sequence alone (its own row, positions from 0), the logits packed back as the batch was."""
    return torch.cat([torch.cat([model(input_ids=s[None].to(DEVICE), use_cache=False).logits for s in row], dim=1)
                      for row in seqs])


def _separate_fwd_bwd(model, seqs):
    model.zero_grad(set_to_none=True)
    logits = _separate_logits(model, seqs)
    _loss(logits).backward()  # the same loss: a sum over the tokens
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, what):
    logits, grads = got
    _close(logits, want[0], 2e-5, f"{what}: logits")
    assert grads.keys() == want[1].keys()
    for n in grads:
        _close(grads[n], want[1][n], 5e-5, f"{what}: grad {n}")


@pytest.mark.parametrize("rows", list(PACKED_ROWS))
@pytest.mark.parametrize("name", PACKED_MODELS)
def test_packed_sequences_use_document_ids(name, rows, attention_kwargs):
    """Packed sequences (position_ids restarting, no attention_mask, no cache: padding-free training):
    every layer hands the kernel the sequences as `document_ids` with is_causal (and Mistral's window),
    no dense mask; logits and every gradient as the unswapped model on the same packed batch, and as
    every sequence run on its own."""
    ref = _build(name)
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    batch, docs, seqs = _packed_batch(PACKED_ROWS[rows])
    got = _packed_fwd_bwd(model, batch, use_cache=False)

    assert len(attention_kwargs) == model.config.num_hidden_layers
    W = getattr(model.config, "sliding_window", None)
    for kw in attention_kwargs:
        assert kw["attn_mask"] is None and kw["is_causal"] is True, kw
        assert torch.equal(kw["document_ids"].long(), docs), kw
        assert kw.get("window_size") == (None if W is None else (W - 1, 0)), kw

    _assert_same(got, _packed_fwd_bwd(ref, batch, use_cache=False), f"{name} vs sdpa, packed")
    _assert_same(got, _separate_fwd_bwd(ref, seqs), f"{name} vs each sequence alone")


def test_packed_gemma2_hybrid_layers(attention_kwargs):
    """Gemma 2 (a sliding layer, a global one, soft-capping): both layers get the documents, the sliding
    one its window too; logits and gradients as eager on the packed batch and on each sequence alone."""
    ref = _build_window("gemma2")
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    lens = [[10, 3, 11]]  # W = 8: two sequences longer than the window
    batch, docs, seqs = _packed_batch(lens)
    got = _packed_fwd_bwd(model, batch, use_cache=False)
    assert [kw.get("window_size") for kw in attention_kwargs] == [(W - 1, 0), None]
    for kw in attention_kwargs:
        assert kw["attn_mask"] is None and torch.equal(kw["document_ids"].long(), docs), kw
    _assert_same(got, _packed_fwd_bwd(ref, batch, use_cache=False), "gemma2 vs eager, packed")
    _assert_same(got, _separate_fwd_bwd(ref, seqs), "gemma2 vs each sequence alone")


@pytest.mark.parametrize("name", ["mistral"])  # the mask is the model's business: one model (sliding) suffices
def test_packed_with_padding_mask_uses_the_mask(name, attention_kwargs):
    """Packed position_ids together with an attention_mask that pads: transformers does not read the
    position_ids as packing then (a padding-aware causal mask over the whole row), and neither do we:
    the dense mask, no document ids, the same logits and gradients as 'sdpa'."""
    ref = _build(name)
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    batch, _, _ = _packed_batch(PACKED_ROWS["two_rows"])
    mask = torch.ones_like(batch["input_ids"])
    mask[1, -4:] = 0
    batch["attention_mask"] = mask
    logits, grads = _packed_fwd_bwd(model, batch, use_cache=False)
    ref_logits, ref_grads = _packed_fwd_bwd(ref, batch, use_cache=False)
    assert all(kw.get("document_ids") is None and kw["attn_mask"] is not None for kw in attention_kwargs)
    valid = mask.bool()  # the loss (and so the gradients) leaves the padded tokens out too
    _close(logits[valid], ref_logits[valid], 2e-5, f"{name} logits")
    for n in grads:
        _close(grads[n], ref_grads[n], 5e-5, f"{name} grad {n}")


@pytest.mark.parametrize("name", PACKED_MODELS)
def test_packed_with_cache_uses_the_mask(name, attention_kwargs):
    """With a KV cache, transformers builds no packed mask (a decode, or a chunk after a cached prefix,
    cannot be told from packing by position_ids alone): we follow its mask. First a packed batch with
    use_cache=True (an empty cache: the kernel gets document ids exactly when 'sdpa''s output is the
    packed one), then a second chunk whose position_ids restart, against that cache (offset 22: the
    dense mask, never document ids)."""
    ref = _build(name)
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    batch, _, seqs = _packed_batch(PACKED_ROWS["one_row"])
    second = {"input_ids": batch["input_ids"][:, :8], "position_ids": torch.arange(8, device=DEVICE)[None] % 5}
    out = {}
    for key, m in (("ref", ref), ("tfk", model)):
        with torch.no_grad():
            first = m(**batch, use_cache=True)
            then = m(**second, past_key_values=first.past_key_values, use_cache=True)
        out[key] = (first.logits, then.logits)
    n = model.config.num_hidden_layers
    assert len(attention_kwargs) == 2 * n
    with torch.no_grad():
        hf_packs = torch.allclose(out["ref"][0], _separate_logits(ref, seqs), atol=1e-5)
    assert all((kw.get("document_ids") is not None) == hf_packs for kw in attention_kwargs[:n])
    assert all(kw.get("document_ids") is None and kw["attn_mask"] is not None for kw in attention_kwargs[n:])
    for a, b, what in zip(out["tfk"], out["ref"], ("packed batch, use_cache=True", "second chunk")):
        _close(a, b, 2e-5, f"{name} logits of the {what}")


def test_packed_models_hand_their_mask_to_attention():
    """Every model type trusted with document ids in place of its packed-sequence mask passes the mask
    to its attention function untouched in the installed transformers: the call takes `attention_mask`
    as it came, and no mask variable is rebound (other than created) or sliced on the way."""
    import importlib

    call = re.compile(r"attention_interface\(\s*self,\s*query_states,\s*key_states,\s*value_states,\s*attention_mask,")
    rebind = re.compile(r"^\s*(attention_mask|causal_mask)\s+=\s+(?!create_\w*mask\(|mask_function\()", re.M)
    sliced = re.compile(r"\b(attention_mask|causal_mask)\s*\[")
    checked = 0
    for model_type in sorted(hf._PACKED_MODELS):
        pkg = model_type.removesuffix("_text")
        try:
            src = inspect.getsource(importlib.import_module(f"transformers.models.{pkg}.modeling_{pkg}"))
        except ImportError:
            continue
        assert call.search(src), model_type
        assert not rebind.search(src) and not sliced.search(src), model_type
        checked += 1
    assert checked >= 10
    # the checks mean something: models that rewrite their masks fail them
    from transformers.models.doge import modeling_doge
    from transformers.models.falcon import modeling_falcon

    assert all(rebind.search(inspect.getsource(m)) for m in (modeling_doge, modeling_falcon))


DECODE_MASKS = {  # (B, kv_len) visible keys of a decode step, and whether they are one run per row
    "left-padding": ([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9, [0] * 8 + [1]], True),
    "static-tail": ([[0, 1, 1, 1, 1, 1, 0, 0, 0], [1] * 6 + [0] * 3, [0, 0, 0, 1, 1, 1, 0, 0, 0]], True),
    "empty-row": ([[0] * 9, [1] * 9, [0, 1, 1, 0, 0, 0, 0, 0, 0]], True),
    "hole": ([[1, 1, 0, 1, 1, 1, 1, 1, 1], [1] * 9, [1] * 9], False),
}


@pytest.mark.parametrize("case", list(DECODE_MASKS))
def test_decode_step_masks(case, attention_calls, monkeypatch):
    """attention_forward on a decode step (T_q = 1, GQA, a boolean (B, 1, 1, T_k) mask as HF builds it):
    one run of visible keys per row goes to kvcache_attention as cache_leftpad / cache_seqlens (an empty
    row as [0, 0): zeros, as attention gives a row with no key); a mask with a hole runs attention with
    it. Both as eager attention with the mask computes, the masked keys' slots holding NaN where the
    run excludes them (never read)."""
    rows, is_run = DECODE_MASKS[case]
    torch.manual_seed(2)
    B, H, Hkv, K, D = 3, 4, 2, 9, 16
    visible = torch.tensor(rows, dtype=torch.bool, device=DEVICE)
    q, k, v = (torch.randn(B, h, n, D, device=DEVICE) for h, n in ((H, 1), (Hkv, K), (Hkv, K)))
    if is_run:  # the slots outside the runs: never read
        k = k.masked_fill(~visible[:, None, :, None], float("nan"))
        v = v.masked_fill(~visible[:, None, :, None], float("nan"))
    decode = _spy_kvcache(monkeypatch)
    module = torch.nn.Module()
    module._tfkernels_backend = BACKEND
    mask = visible[:, None, None, :]
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    again, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)  # the next layer: runs read once
    assert len(reads) == 1  # the runs, once for both layers (kvcache_attention finds them on the host)
    with torch.inference_mode():  # no version counters: still one read per mask
        frozen = mask.clone()
        assert torch.equal(hf.attention_forward(module, q, k, v, frozen, scaling=0.3)[0], out)
        assert torch.equal(hf.attention_forward(module, q, k, v, frozen, scaling=0.3)[0], out)
    assert len(reads) == 2
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    decode = _runs(decode[:2])
    kk, vv = k.nan_to_num(0.0).repeat_interleave(2, 1).double(), v.nan_to_num(0.0).repeat_interleave(2, 1).double()
    s = (q.double() @ kk.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    ref = (s.softmax(-1).nan_to_num(0.0) @ vv).transpose(1, 2)  # (B, 1, H, D); a row with no key: 0
    assert out.shape == (B, 1, H, D)
    _close(out, ref, 1e-5, case)
    assert torch.equal(out, again)
    if is_run:
        ends = [max((j + 1 for j, x in enumerate(r) if x), default=0) for r in rows]
        starts = [min((j for j, x in enumerate(r) if x), default=0) if any(r) else 0 for r in rows]
        assert decode == [(ends, starts)] * 2 and attention_calls == []
    else:
        assert decode == [] and len(attention_calls) == 4
    calls = len(attention_calls)
    float_mask = torch.zeros(B, 1, 1, K, device=DEVICE).masked_fill(~mask, float("-inf"))
    hf.attention_forward(module, q.nan_to_num(0.0), k.nan_to_num(0.0), v.nan_to_num(0.0), float_mask)
    assert len(attention_calls) == calls + 1  # an additive mask: attention with it


def test_attention_sinks_refused():
    q = torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="s_aux"):
        hf.attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))


def test_from_config_attn_implementation(attention_calls):
    cfg = transformers.LlamaConfig(**_small(num_key_value_heads=2))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="tfkernels").to(DEVICE).eval()
    assert model.config._attn_implementation == "tfkernels"
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    ids, mask = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        expected = ref(input_ids=ids, attention_mask=mask).logits
    assert len(attention_calls) == 2
    valid = mask.bool()
    _close(out[valid], expected[valid], 2e-5, "logits")


def test_output_attentions_warns(monkeypatch):
    """output_attentions=True cannot be served by a fused kernel: say so (once), as 'sdpa' does,
    rather than hand back no attentions silently."""
    from tfkernels import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    cfg = transformers.LlamaConfig(**_small(num_key_value_heads=2))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="tfkernels").to(DEVICE).eval()
    ids, _ = _batch()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)


def test_registered_at_import():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["tfkernels"] is hf.attention_forward
    assert "tfkernels" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


# ---- HF norms: exact formula and casting of each flavour ----------------------------------------

def _hf_norms():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return {"llama": LlamaRMSNorm, "mistral": MistralRMSNorm, "qwen2": Qwen2RMSNorm, "gemma": GemmaRMSNorm,
            "t5": T5LayerNorm}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma", "t5"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_hf_norm_exact(kind, x_dtype, w_dtype):
    torch.manual_seed(0)
    N = 48
    norm = _hf_norms()[kind](N).to(DEVICE, w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(N) * 0.5)
    x = (torch.randn(5, 3, N, device=DEVICE) * 3).to(x_dtype).requires_grad_()
    new = hf.from_hf_norm(norm, backend=BACKEND)
    assert new.weight is norm.weight
    assert new.state_dict().keys() == norm.state_dict().keys()

    y_ref = norm(x)
    y = new(x)
    assert y.dtype == y_ref.dtype, (y.dtype, y_ref.dtype)
    # the casts are reproduced exactly; what may differ is the last bit of fp32 rsqrt/mean, which can
    # flip one rounding of the output: at most one ulp of the output dtype
    low = x_dtype if x_dtype != torch.float32 else w_dtype  # the dtype the normalized value is rounded to
    _close(y, y_ref, 2 * torch.finfo(low).eps if low != torch.float32 else 1e-5, f"{kind} forward")

    gy = torch.randn_like(y)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, norm.weight), gy)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), gy)
    tol = 1e-5 if x_dtype == torch.float32 and w_dtype == torch.float32 else 2e-2
    _close(gx, gx_ref, tol, f"{kind} dx")
    _close(gw, gw_ref, tol, f"{kind} dw")


def test_hf_norm_detection_by_source_not_name():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class MyRMSNorm(LlamaRMSNorm):  # same forward: recognised
        pass

    class OddRMSNorm(LlamaRMSNorm):  # a different formula under a familiar-looking name: left alone
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    assert hf.hf_norm_kind(MyRMSNorm(8)) == "llama"
    assert hf.hf_norm_kind(OddRMSNorm(8)) is None
    assert hf.hf_norm_kind(torch.nn.LayerNorm(8)) is None


def test_swap_gemma_and_t5_norms_in_model():
    cfg = transformers.GemmaConfig(**_small(num_key_value_heads=2, head_dim=8))
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(cfg).to(DEVICE).eval()
    _, report = tfkernels.swap(model, backend=BACKEND, attention=False, return_report=True)
    assert sum(r[2].endswith("hf.GemmaRMSNorm") for r in report) == 2 * 2 + 1
    assert model.config._attn_implementation != "tfkernels"


# ---- training, state_dict, compile --------------------------------------------------------------

def _train(model, steps, lr=1e-2):
    g = torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = torch.randint(3, V, (2, 8), generator=g).to(DEVICE)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convergence_qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**{**_small(num_key_value_heads=2), "num_hidden_layers": 1})
    ref = transformers.Qwen2ForCausalLM(cfg).to(DEVICE)
    model = copy.deepcopy(ref)
    tfkernels.swap(model, backend=BACKEND)
    steps = 20
    ref_losses = _train(ref, steps)
    losses = _train(model, steps)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it learned something
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), f"step {i}: loss {a} vs {b}"


def test_state_dict_round_trip(tmp_path):
    plain = _build("llama")
    swapped = tfkernels.swap(copy.deepcopy(plain), backend=BACKEND)
    assert swapped.state_dict().keys() == plain.state_dict().keys()

    fresh_plain = _build("llama")
    with torch.no_grad():
        for p in fresh_plain.parameters():
            p.zero_()
    fresh_plain.load_state_dict(swapped.state_dict())  # swapped -> unswapped
    fresh_swapped = tfkernels.swap(MODELS["llama"](transformers).to(DEVICE).eval(), backend=BACKEND)
    fresh_swapped.load_state_dict(plain.state_dict())  # unswapped -> swapped
    for (n, a), (_, b) in zip(fresh_swapped.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n

    swapped.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           plain(input_ids=ids, attention_mask=mask).logits)


def test_swap_twice_and_attention_off():
    model = _build("gpt2")
    tfkernels.swap(model, backend=BACKEND, attention=False)
    assert model.config._attn_implementation == "sdpa"
    _, report = tfkernels.swap(model, backend=BACKEND, return_report=True)
    assert [r[2] for r in report] == ["attn_implementation=tfkernels"]  # the norms were already swapped
    tfkernels.unswap(model)
    assert model.config._attn_implementation == "sdpa"
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in model.modules())


# ---- CUDA: bf16 ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gpt2", "qwen2", "bert"])
def test_swap_matches_unswapped_bf16_cuda(name):
    ref_model = _build(name, torch.bfloat16)
    model = tfkernels.swap(copy.deepcopy(ref_model), backend=BACKEND)
    ids, mask = _batch()
    ref_logits, ref_grads = _fwd_bwd(ref_model, ids, mask)
    logits, grads = _fwd_bwd(model, ids, mask)
    # an fp32 oracle judges both: tfkernels may differ from sdpa by at most ~2x sdpa's own error
    oracle = copy.deepcopy(ref_model).float()
    oracle_logits, oracle_grads = _fwd_bwd(oracle, ids, mask)
    valid = mask.bool()

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    e_ref = err(ref_logits[valid], oracle_logits[valid])
    assert err(logits[valid], oracle_logits[valid]) <= 2 * e_ref + 1e-2
    for n in grads:
        e_ref = err(ref_grads[n], oracle_grads[n])
        scale = oracle_grads[n].abs().max().item()
        assert err(grads[n], oracle_grads[n]) <= 2 * e_ref + 1e-2 * (1 + scale), n


@pytest.mark.parametrize("batch", ["padded", "packed"])
def test_swap_then_torch_compile_hf(batch):
    """The whole swapped model under torch.compile (fullgraph): a padded batch, and packed sequences,
    whose mask is then built densely (tracing cannot probe the mask function), as 'sdpa' builds it."""
    ref = _build("qwen2")
    model = tfkernels.swap(copy.deepcopy(ref), backend=BACKEND)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    if batch == "padded":
        ids, mask = _batch()
        inputs = dict(input_ids=ids, attention_mask=mask)
    else:
        inputs, _, _ = _packed_batch(PACKED_ROWS["two_rows"])
        inputs["use_cache"] = False
        mask = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        try:
            out = compiled(**inputs).logits
        except Exception as err:
            # some torch/transformers pairs (torch 2.6 with transformers 5) cannot compile the model at
            # all; that is theirs to fix. A failure only the swapped model has is ours.
            torch._dynamo.reset()
            try:
                torch.compile(copy.deepcopy(ref), backend="aot_eager", fullgraph=True)(**inputs)
            except Exception as plain_err:
                pytest.skip(f"torch {torch.__version__} cannot compile this transformers model even unswapped: "
                            f"{type(plain_err).__name__}: {str(plain_err)[:200]}")
            raise err
        expected = ref(**inputs).logits
    valid = mask.bool()
    _close(out[valid], expected[valid], 2e-5, "compiled logits")
