"""`tfkernels export --format hf`: transformers loads the export and computes the same logits —
GPT (GPT-2 / Llama), BERT (XLM-RoBERTa-XL layout) and fine-tuned classifiers of each, through the
exported tokenizer too."""
import pytest
import torch

from tfkernels.__main__ import main
from tfkernels.export import export_hf
from tfkernels.model import build_model, make_config
from tfkernels.train import checkpoint as ckpt_io
from tfkernels.train.classify_data import Example, encode
from tfkernels.train.finetune import Classifier
from tfkernels.train.tokenizer import PAD, load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SHAPES = {
    "gpt2": dict(),                                                                  # LayerNorm + GELU + learned
    "gpt2-nobias": dict(bias=False),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False),             # RMSNorm + SwiGLU + RoPE
    "llama-bias": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=True),
    "llama-gqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2),  # 4 query heads, 2 K/V
}


TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os", "x = [i * i for i in range(10)]"]
LABELS = ["class", "def", "other"]


def _perturbed(model):
    with torch.no_grad():  # perturb every parameter so that norms and biases are not at their init values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _checkpoint(tmp_path, arch="gpt", classifier=None, **over):
    """A run directory with ckpt.pt (pretraining, or a fine-tuned classifier when `classifier` is a
    dict of Classifier keyword arguments) and tokenizer.json; returns (model, run)."""
    torch.manual_seed(0)
    cfg = make_config(arch, "tiny", vocab_size=300, block_size=32, n_layer=2, n_embd=64, kernels="torch", **over)
    model = build_model(cfg)
    extra = {}
    if classifier is not None:
        model = Classifier(model, len(LABELS), **classifier)
        extra = {"kind": "classifier", "labels": LABELS, "finetune_config": {}}
    _perturbed(model)
    run = tmp_path / "run"
    ckpt_io.save_atomic({"model": model.state_dict(), "model_config": cfg.to_dict(), "step": 0, **extra}, run / "ckpt.pt")
    train_tokenizer(TEXTS * 20, 300, run / "tokenizer.json")
    return model, run


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_round_trip_identical_logits(tmp_path, shape):
    model, run = _checkpoint(tmp_path, **SHAPES[shape])
    info = export_hf(run, tmp_path / "hf")
    assert info["model_type"] == ("llama" if shape.startswith("llama") else "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
    # the base model too (AutoModel), and the tokenizer
    base = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    assert base.config.vocab_size == 300
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok("def f(x):")["input_ids"]) == "def f(x):"


def test_cli_export_and_bad_input(tmp_path, capsys):
    _, run = _checkpoint(tmp_path)
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    assert main(["export", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert "only 'hf'" in capsys.readouterr().err
    _, mixed = _checkpoint(tmp_path / "mixed", norm="rmsnorm")  # no transformers architecture matches
    with pytest.raises(ValueError, match="no transformers architecture for GPT"):
        export_hf(mixed, tmp_path / "y")
    _, gqa = _checkpoint(tmp_path / "gqa", n_kv_head=2)  # GPT-2's layout with grouped K/V heads
    with pytest.raises(ValueError, match="GPT-2 has no grouped-query attention"):
        export_hf(gqa, tmp_path / "g")
    _, bert = _checkpoint(tmp_path / "bert", arch="bert", pos="rope")
    with pytest.raises(ValueError, match="no transformers architecture for BERT with norm=layernorm, mlp=gelu, pos=rope"):
        export_hf(bert, tmp_path / "z")
    # classifiers from before the transformers-shaped heads: refused, not exported wrong
    _, llama_bias = _checkpoint(tmp_path / "llama-bias", classifier=dict(head_bias=True),
                                norm="rmsnorm", mlp="swiglu", pos="rope")
    with pytest.raises(ValueError, match="head has a bias and LlamaForSequenceClassification has none"):
        export_hf(llama_bias, tmp_path / "w")
    _, old_bert = _checkpoint(tmp_path / "old-bert", arch="bert", classifier=dict(new_pooler=False))
    with pytest.raises(ValueError, match="without a pooler"):
        export_hf(old_bert, tmp_path / "v")
    (tmp_path / "junk").mkdir()
    torch.save({"weights": {}}, tmp_path / "junk" / "ckpt.pt")
    assert main(["export", "--ckpt", str(tmp_path / "junk"), "--out", str(tmp_path / "u")]) == 2
    assert "not a tfkernels checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("nsp,bias", [(True, True), (False, False)])
def test_bert_round_trip(tmp_path, nsp, bias):
    model, run = _checkpoint(tmp_path, arch="bert", nsp=nsp, bias=bias)
    info = export_hf(run, tmp_path / "hf")
    assert (info["architecture"], info["model_type"]) == ("XLMRobertaXLForMaskedLM", "xlm-roberta-xl")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(6, 300, (3, 32), generator=g)
    seg = (torch.arange(32) >= 20).long().expand(3, 32)
    with torch.no_grad():
        ours, theirs = model(x, seg).mlm_logits, hf(input_ids=x, token_type_ids=seg).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
    # right padding with an attention mask: identical at every real position
    lengths = torch.tensor([32, 17, 5])
    mask = torch.arange(32)[None, :] < lengths[:, None]
    xp = x.masked_fill(~mask, PAD)
    with torch.no_grad():
        ours, theirs = model(xp, seg, mask).mlm_logits, hf(input_ids=xp, token_type_ids=seg, attention_mask=mask.long()).logits
    torch.testing.assert_close(theirs[mask], ours[mask], atol=2e-5, rtol=1e-5)
    if nsp:  # the export runs on tfkernels' attention too (transformers' AttentionInterface, see tfkernels.hf)
        import tfkernels.hf  # noqa: F401  registers "tfkernels"
        fused = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", attn_implementation="tfkernels").eval()
        with torch.no_grad():
            got = fused(input_ids=xp, token_type_ids=seg, attention_mask=mask.long()).logits
        torch.testing.assert_close(got[mask], ours[mask], atol=1e-4, rtol=1e-4)
    # the encoder and the pooler through AutoModel
    base = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        out = base(input_ids=x, token_type_ids=seg)
        h = model.transformer.ln_f(_encoder(model, x, seg))
    torch.testing.assert_close(out.last_hidden_state, h, atol=2e-5, rtol=1e-5)
    if nsp:
        torch.testing.assert_close(out.pooler_output, torch.tanh(model.pooler(h[:, 0])), atol=2e-5, rtol=1e-5)
    # the tokenizer adds what pretraining and fine-tuning add: [CLS] a [SEP] b [SEP], segments 0 then 1
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = encode(load_tokenizer(run / "tokenizer.json"), [Example(TEXTS[0], "def", TEXTS[1])], ["def"], "bert", 32)
    got = tok(TEXTS[0], TEXTS[1])
    assert got["input_ids"] == enc["input_ids"][0].tolist() and got["token_type_ids"] == enc["segment_ids"][0].tolist()


def _encoder(model, x, seg):
    t = model.transformer
    h = t.wte(x) + t.wtt(seg) + t.wpe(torch.arange(x.shape[1]))
    for block in t.h:
        h = block(h)
    return h


CLASSIFIERS = {
    "gpt2": ("gpt", dict(), "GPT2ForSequenceClassification"),                     # head bias folded into ln_f
    "gpt2-nobias": ("gpt", dict(bias=False), "GPT2ForSequenceClassification"),
    "llama": ("gpt", dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False), "LlamaForSequenceClassification"),
    "bert": ("bert", dict(), "XLMRobertaXLForSequenceClassification"),              # a new pooler in the head
    "bert-nsp": ("bert", dict(nsp=True), "XLMRobertaXLForSequenceClassification"),  # the pretrained pooler
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_round_trip_through_tokenizer(tmp_path, name):
    arch, over, hf_class = CLASSIFIERS[name]
    clf, run = _checkpoint(tmp_path, arch=arch, classifier={}, **over)
    assert export_hf(run, tmp_path / "hf")["architecture"] == hf_class
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == dict(enumerate(LABELS))
    # what tfkernels feeds the classifier (classify_data.encode) and what the exported tokenizer gives
    examples = [Example(TEXTS[0], "def"), Example(TEXTS[1], "class", TEXTS[2]), Example(TEXTS[3], "other", TEXTS[0])]
    ours_in = encode(load_tokenizer(run / "tokenizer.json"), examples, LABELS, arch, 32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    theirs_in = _tokenize(tok, examples)
    assert torch.equal(theirs_in["input_ids"], ours_in["input_ids"])
    assert torch.equal(theirs_in["attention_mask"].sum(1), ours_in["lengths"])
    if arch == "bert":
        assert torch.equal(theirs_in["token_type_ids"], ours_in["segment_ids"])
    else:
        assert "token_type_ids" not in theirs_in  # GPT-2 would add wte(token_type_ids) to every token
    with torch.no_grad():
        ours = clf(ours_in["input_ids"], ours_in["segment_ids"], ours_in["lengths"])[0]
        theirs = hf(**theirs_in).logits
    assert ours.abs().max() > 0.01
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)


def _tokenize(tok, examples):
    """Single sentences and pairs in one padded batch, as a user would with the exported tokenizer."""
    rows = [tok(e.text, e.text_pair) if e.text_pair is not None else tok(e.text) for e in examples]
    return tok.pad(rows, padding=True, return_tensors="pt")
