"""Export a tfkernels checkpoint to Hugging Face `transformers` format.

    from tfkernels.export import export_hf
    export_hf("runs/tiny", "hf/tiny")          # config.json + model.safetensors + tokenizer files
    # then: transformers.AutoModelForCausalLM.from_pretrained("hf/tiny") gives the same logits

The architecture follows the model (anything else raises rather than export something that
computes different numbers):
  GPT, LayerNorm + GELU + learned positions  -> GPT2LMHeadModel ("gpt2"); Linear weights transposed
                                               into GPT-2's Conv1D layout; missing biases (bias=False)
                                               written as zeros
  GPT, RMSNorm + SwiGLU + RoPE                -> LlamaForCausalLM ("llama"); c_attn split into q/k/v,
                                               the SwiGLU c_fc split into gate/up, tied embeddings
  BERT, LayerNorm + GELU + learned positions  -> XLMRobertaXLForMaskedLM ("xlm-roberta-xl"): the stock
                                               encoder with our layout — pre-norm blocks, no embedding
                                               LayerNorm, a final encoder LayerNorm, the dense/GELU/norm
                                               MLM head with a tied decoder, the [CLS] pooler
A fine-tuned classifier (`tfkernels finetune`) exports as the matching *ForSequenceClassification
(GPT2, Llama, XLMRobertaXL) with id2label / label2id, and its tokenizer adds the special tokens the
fine-tuning used ("[CLS] a [SEP] b [SEP]" with token_type_ids for BERT, "a [SEP] b <|endoftext|>"
for GPT), so `tokenizer(texts, padding=True)` feeds the exported model what tfkernels fed ours.

Positions in the BERT export: RoBERTa-family models number real tokens from pad_token_id + 1 and
give [PAD] tokens the (zero) row pad_token_id, so the position table is ours shifted down by
pad_token_id + 1. Real tokens of right-padded input (what tokenizers produce) get identical
outputs; the outputs *at* [PAD] positions differ, as they are meaningless in both. For left-padded
input pass `position_ids = pad_token_id + 1 + arange(T)`.

The NSP head (BERT pretraining only) has no transformers counterpart in this family and is left
out; the pooler it sits on is exported (AutoModel's pooler_output).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .model import ModelConfig
from .train import checkpoint as ckpt_io
from .train.tokenizer import CLS, EOS, MASK, PAD, SEP, SPECIALS, UNK


def _arch(mcfg: ModelConfig) -> str:
    shape = (mcfg.norm, mcfg.mlp, mcfg.pos)
    if mcfg.arch == "bert":
        if shape == ("layernorm", "gelu", "learned"):
            return "xlmr"
        raise ValueError(f"export --format hf: no transformers architecture for BERT with norm={mcfg.norm}, "
                         f"mlp={mcfg.mlp}, pos={mcfg.pos}; supported: layernorm+gelu+learned (XLM-RoBERTa-XL layout)")
    if shape == ("layernorm", "gelu", "learned"):
        if (mcfg.n_kv_head or mcfg.n_head) != mcfg.n_head:
            raise ValueError(f"export --format hf: GPT-2 has no grouped-query attention (n_kv_head={mcfg.n_kv_head}, "
                             f"n_head={mcfg.n_head}); rmsnorm+swiglu+rope exports as Llama, which has")
        return "gpt2"
    if shape == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise ValueError(f"export --format hf: no transformers architecture for GPT with norm={mcfg.norm}, mlp={mcfg.mlp}, "
                     f"pos={mcfg.pos}; supported: layernorm+gelu+learned (GPT-2) or rmsnorm+swiglu+rope (Llama)")


def _copy_linear(out: dict, sd: dict, src: str, dst: str, transpose: bool = False):
    """nn.Linear `src` -> `dst`; a missing bias (bias=False) is written as zeros."""
    w = sd[f"{src}.weight"]
    out[f"{dst}.weight"] = w.t() if transpose else w
    out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros(w.shape[0]))


def _copy_norm(out: dict, sd: dict, src: str, dst: str):
    w = sd[f"{src}.weight"]
    out[f"{dst}.weight"] = w
    out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros_like(w))


def gpt2_state_dict(sd: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    out = {"transformer.wte.weight": sd["transformer.wte.weight"], "transformer.wpe.weight": sd["transformer.wpe.weight"]}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        _copy_norm(out, sd, f"{p}.ln_1", f"{p}.ln_1")
        _copy_norm(out, sd, f"{p}.ln_2", f"{p}.ln_2")
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):  # nn.Linear (out, in) -> Conv1D (in, out)
            _copy_linear(out, sd, f"{p}.{name}", f"{p}.{name}", transpose=True)
    _copy_norm(out, sd, "transformer.ln_f", "transformer.ln_f")
    C = cfg.n_embd
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": C, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "tie_word_embeddings": True, "bos_token_id": EOS, "eos_token_id": EOS,
        "pad_token_id": PAD, "use_cache": True,
    }
    return out, config


def llama_state_dict(sd: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    C = cfg.n_embd
    Hkv = cfg.n_kv_head or cfg.n_head
    kv = Hkv * (C // cfg.n_head)
    rows = {"q_proj": (0, C), "k_proj": (C, C + kv), "v_proj": (C + kv, C + 2 * kv)}  # c_attn's q, k, v rows
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"]}
    hidden = None
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}", f"model.layers.{i}"
        out[f"{q}.input_layernorm.weight"] = sd[f"{p}.ln_1.weight"]
        out[f"{q}.post_attention_layernorm.weight"] = sd[f"{p}.ln_2.weight"]
        for name, (lo, hi) in rows.items():
            out[f"{q}.self_attn.{name}.weight"] = sd[f"{p}.attn.c_attn.weight"][lo:hi]
            if cfg.bias:
                out[f"{q}.self_attn.{name}.bias"] = sd[f"{p}.attn.c_attn.bias"][lo:hi]
        out[f"{q}.self_attn.o_proj.weight"] = sd[f"{p}.attn.c_proj.weight"]
        gate, up = sd[f"{p}.mlp.c_fc.weight"].chunk(2, dim=0)
        hidden = gate.shape[0]
        out[f"{q}.mlp.gate_proj.weight"], out[f"{q}.mlp.up_proj.weight"] = gate, up
        out[f"{q}.mlp.down_proj.weight"] = sd[f"{p}.mlp.c_proj.weight"]
        if cfg.bias:
            out[f"{q}.self_attn.o_proj.bias"] = sd[f"{p}.attn.c_proj.bias"]
            gb, ub = sd[f"{p}.mlp.c_fc.bias"].chunk(2, dim=0)
            out[f"{q}.mlp.gate_proj.bias"], out[f"{q}.mlp.up_proj.bias"] = gb, ub
            out[f"{q}.mlp.down_proj.bias"] = sd[f"{p}.mlp.c_proj.bias"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": C, "intermediate_size": hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": Hkv, "head_dim": C // cfg.n_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": 1e-6,
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout, "tie_word_embeddings": True, "initializer_range": 0.02,
        "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": PAD, "use_cache": True,
    }
    return out, config


def xlmr_state_dict(sd: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """BERT -> XLMRobertaXL: the encoder under "roberta.", the MLM head under "lm_head."."""
    C, out, enc = cfg.n_embd, {}, "roberta.encoder"
    wpe = sd["transformer.wpe.weight"]
    out["roberta.embeddings.word_embeddings.weight"] = sd["transformer.wte.weight"]
    out["roberta.embeddings.token_type_embeddings.weight"] = sd["transformer.wtt.weight"]
    # rows 0..PAD are never used by real tokens (row PAD is what [PAD] tokens get): zeros
    out["roberta.embeddings.position_embeddings.weight"] = torch.cat([wpe.new_zeros(PAD + 1, C), wpe])
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}", f"{enc}.layer.{i}"
        _copy_norm(out, sd, f"{p}.ln_1", f"{q}.attention.self_attn_layer_norm")
        qkv = {}
        _copy_linear(qkv, sd, f"{p}.attn.c_attn", "qkv")
        for part, name in enumerate(("query", "key", "value")):
            out[f"{q}.attention.self.{name}.weight"] = qkv["qkv.weight"][part * C:(part + 1) * C]
            out[f"{q}.attention.self.{name}.bias"] = qkv["qkv.bias"][part * C:(part + 1) * C]
        _copy_linear(out, sd, f"{p}.attn.c_proj", f"{q}.attention.output.dense")
        _copy_norm(out, sd, f"{p}.ln_2", f"{q}.LayerNorm")
        _copy_linear(out, sd, f"{p}.mlp.c_fc", f"{q}.intermediate.dense")
        _copy_linear(out, sd, f"{p}.mlp.c_proj", f"{q}.output.dense")
    _copy_norm(out, sd, "transformer.ln_f", f"{enc}.LayerNorm")
    if "pooler.weight" in sd:
        _copy_linear(out, sd, "pooler", "roberta.pooler.dense")
    _copy_linear(out, sd, "mlm_dense", "lm_head.dense")
    _copy_norm(out, sd, "mlm_norm", "lm_head.layer_norm")
    out["lm_head.decoder.weight"] = sd["transformer.wte.weight"]
    out["lm_head.bias"] = out["lm_head.decoder.bias"] = sd["mlm_decoder.bias"]
    config = {
        "architectures": ["XLMRobertaXLForMaskedLM"], "model_type": "xlm-roberta-xl", "vocab_size": cfg.vocab_size,
        "hidden_size": C, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": 4 * C, "hidden_act": "gelu_pytorch_tanh",  # the blocks' MLP; the MLM head uses exact GELU in both
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.block_size + PAD + 1, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02, "layer_norm_eps": 1e-5, "position_embedding_type": "absolute",
        "pad_token_id": PAD, "bos_token_id": CLS, "eos_token_id": SEP, "tie_word_embeddings": True,
        "is_decoder": False, "use_cache": False, "classifier_dropout": None,
    }
    return out, config


_EXPORTERS = {"gpt2": gpt2_state_dict, "llama": llama_state_dict, "xlmr": xlmr_state_dict}
_CLASSIFIERS = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                "xlmr": "XLMRobertaXLForSequenceClassification"}


def _fold_bias(W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The smallest d with W @ d == c (W: (n_labels, C), full row rank when n_labels <= C): adding d to
    the vector that `score` reads adds c to the logits."""
    W64, c64 = W.double(), c.double()
    d = None
    if W.shape[0] <= W.shape[1]:
        try:
            d = W64.T @ torch.linalg.solve(W64 @ W64.T, c64)
        except torch.linalg.LinAlgError:  # rows of W linearly dependent
            pass
    if d is None or not torch.allclose(W64 @ d, c64, rtol=1e-9, atol=1e-9):
        raise ValueError("export --format hf: cannot fold the classifier head's bias into the final LayerNorm "
                         f"({W.shape[0]} labels on a {W.shape[1]}-wide model)")
    return d.float()


def classifier_state_dict(sd: dict, mcfg: ModelConfig, kind: str, labels: list[str], spec: dict) -> tuple[dict, dict]:
    """A fine-tuned Classifier (`base.*` + head) -> *ForSequenceClassification."""
    base = {k[len("base."):]: v for k, v in sd.items() if k.startswith("base.")}
    tensors, config = _EXPORTERS[kind](base, mcfg)
    if kind == "xlmr":
        # RoBERTa's head: [CLS] -> dense -> tanh -> out_proj; the dense is ours (new) or the pretrained pooler
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("lm_head.", "roberta.pooler."))}
        dense = "pool" if spec["new_pooler"] else "base.pooler"
        if f"{dense}.weight" not in sd:
            raise ValueError("export --format hf: this BERT classifier classifies [CLS] without a pooler (a checkpoint "
                             "from an older tfkernels); XLMRobertaXLForSequenceClassification needs one — fine-tune "
                             "again with this version")
        _copy_linear(tensors, sd, dense, "classifier.dense")
        _copy_linear(tensors, sd, "head", "classifier.out_proj")
    else:
        prefix = "transformer." if kind == "gpt2" else "model."
        tensors = {k: v for k, v in tensors.items() if k.startswith(prefix)}  # no LM head
        tensors["score.weight"] = W = sd["head.weight"]
        if "head.bias" in sd:  # `score` has no bias: fold ours into the final norm's, which feeds only `score`
            if kind != "gpt2":
                raise ValueError(f"export --format hf: this classifier's head has a bias and {_CLASSIFIERS[kind]} has "
                                 "none (nor a norm bias to fold it into); fine-tune with head_bias=False to export it")
            tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"] + _fold_bias(W, sd["head.bias"])
    config.update({
        "architectures": [_CLASSIFIERS[kind]], "num_labels": len(labels), "problem_type": "single_label_classification",
        "id2label": {str(i): l for i, l in enumerate(labels)}, "label2id": {l: i for i, l in enumerate(labels)},
        "pad_token_id": PAD,  # GPT-2/Llama classifiers pool the last token that is not [PAD]
    })
    return tensors, config


def _write_tokenizer(tok_path: Path, out: Path, mcfg: ModelConfig, classifier: bool) -> list[str]:
    """tokenizer.json (+ the post-processor that adds what fine-tuning / pretraining added) and
    tokenizer_config.json."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tok_path))
    names = {i: s for i, s in enumerate(SPECIALS)}
    if mcfg.arch == "bert":  # pretraining and classify_data.encode: [CLS] a [SEP] (b [SEP]), segments 0 then 1
        tok.post_processor = processors.TemplateProcessing(
            single=f"{names[CLS]} $A:0 {names[SEP]}:0", pair=f"{names[CLS]}:0 $A:0 {names[SEP]}:0 $B:1 {names[SEP]}:1",
            special_tokens=[(names[CLS], CLS), (names[SEP], SEP)])
    elif classifier:  # classify_data.encode: a [SEP] b <|endoftext|>; the final token is the one pooled
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {names[EOS]}:0", pair=f"$A:0 {names[SEP]}:0 $B:0 {names[EOS]}:0",
            special_tokens=[(names[SEP], SEP), (names[EOS], EOS)])
    tok.save(str(out / "tokenizer.json"))
    # GPT models take no token_type_ids (GPT-2 would add wte(token_type_ids) to every token)
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if mcfg.arch == "bert" else ["input_ids", "attention_mask"]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": mcfg.block_size, "padding_side": "right",
        "truncation_side": "right", "model_input_names": inputs,
        "bos_token": SPECIALS[CLS if mcfg.arch == "bert" else EOS], "eos_token": SPECIALS[SEP if mcfg.arch == "bert" else EOS],
        "pad_token": SPECIALS[PAD], "unk_token": SPECIALS[UNK], "cls_token": SPECIALS[CLS], "sep_token": SPECIALS[SEP],
        "mask_token": SPECIALS[MASK], "add_prefix_space": False}, indent=1))
    return ["tokenizer.json", "tokenizer_config.json"]


def export_hf(ckpt_path, out_dir) -> dict:
    """Write config.json, model.safetensors and the tokenizer (tokenizer.json + tokenizer_config.json)
    for a pretraining checkpoint or a fine-tuned classifier."""
    from safetensors.torch import save_file

    ck = ckpt_io.load(ckpt_path)
    if "model_config" not in ck or "model" not in ck:
        raise ValueError(f"{ckpt_path} is not a tfkernels checkpoint (no model / model_config)")
    mcfg = ModelConfig.from_dict(ck["model_config"])
    kind = _arch(mcfg)
    sd = {k: v.detach().float().cpu() for k, v in ck["model"].items()}
    classifier = ck.get("kind") == "classifier"
    if classifier:
        from .train.finetune import Classifier
        spec = ck.get("head_spec") or Classifier.spec_from_state_dict(sd)
        tensors, config = classifier_state_dict(sd, mcfg, kind, ck["labels"], spec)
    else:
        tensors, config = _EXPORTERS[kind](sd, mcfg)
    config["torch_dtype"] = "float32"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights, the split q/k/v)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    files = ["config.json", "model.safetensors"]
    run_dir = Path(ckpt_path) if Path(ckpt_path).is_dir() else Path(ckpt_path).parent
    tok = run_dir / "tokenizer.json"
    if not tok.is_file() and ck.get("data_dir"):
        tok = Path(ck["data_dir"]) / "tokenizer.json"
    if tok.is_file():
        files += _write_tokenizer(tok, out, mcfg, classifier)
    return {"out": str(out), "architecture": config["architectures"][0], "model_type": config["model_type"],
            "files": files}
