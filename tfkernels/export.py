"""Export a pretrained tfkernels checkpoint to Hugging Face `transformers` format.

    from tfkernels.export import export_hf
    export_hf("runs/tiny", "hf/tiny")          # config.json + model.safetensors + tokenizer files
    # then: transformers.AutoModelForCausalLM.from_pretrained("hf/tiny") gives the same logits

The architecture follows the model:
  GPT, LayerNorm + GELU + learned positions  -> GPT2LMHeadModel ("gpt2"); Linear weights transposed
                                               into GPT-2's Conv1D layout; missing biases (bias=False)
                                               written as zeros
  GPT, RMSNorm + SwiGLU + RoPE                -> LlamaForCausalLM ("llama"); c_attn split into q/k/v,
                                               the SwiGLU c_fc split into gate/up, tied embeddings
Other combinations (and BERT: ours is pre-norm without an embedding LayerNorm, which no stock
`transformers` encoder matches exactly) raise a clear error rather than export something that
computes different numbers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .model import ModelConfig
from .train import checkpoint as ckpt_io
from .train.tokenizer import CLS, EOS, MASK, PAD, SEP, SPECIALS, UNK


def _arch(mcfg: ModelConfig) -> str:
    if mcfg.arch != "gpt":
        raise ValueError("export --format hf: BERT checkpoints are not supported yet (tfkernels' BERT is pre-norm "
                         "without an embedding LayerNorm; no stock transformers encoder computes the same function)")
    if (mcfg.norm, mcfg.mlp, mcfg.pos) == ("layernorm", "gelu", "learned"):
        return "gpt2"
    if (mcfg.norm, mcfg.mlp, mcfg.pos) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise ValueError(f"export --format hf: no transformers architecture for GPT with norm={mcfg.norm}, mlp={mcfg.mlp}, "
                     f"pos={mcfg.pos}; supported: layernorm+gelu+learned (GPT-2) or rmsnorm+swiglu+rope (Llama)")


def gpt2_state_dict(sd: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    C = cfg.n_embd
    out = {"transformer.wte.weight": sd["transformer.wte.weight"], "transformer.wpe.weight": sd["transformer.wpe.weight"]}

    def norm(src, dst):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros(C))

    def linear(src, dst):  # nn.Linear (out, in) -> GPT-2 Conv1D (in, out)
        w = sd[f"{src}.weight"]
        out[f"{dst}.weight"] = w.t()
        out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros(w.shape[0]))

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1", f"{p}.ln_1")
        norm(f"{p}.ln_2", f"{p}.ln_2")
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            linear(f"{p}.{name}", f"{p}.{name}")
    norm("transformer.ln_f", "transformer.ln_f")
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
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"]}
    hidden = None
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}", f"model.layers.{i}"
        out[f"{q}.input_layernorm.weight"] = sd[f"{p}.ln_1.weight"]
        out[f"{q}.post_attention_layernorm.weight"] = sd[f"{p}.ln_2.weight"]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), range(3)):
            out[f"{q}.self_attn.{name}.weight"] = sd[f"{p}.attn.c_attn.weight"][part * C:(part + 1) * C]
            if cfg.bias:
                out[f"{q}.self_attn.{name}.bias"] = sd[f"{p}.attn.c_attn.bias"][part * C:(part + 1) * C]
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
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "head_dim": C // cfg.n_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": 1e-6,
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout, "tie_word_embeddings": True, "initializer_range": 0.02,
        "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": PAD, "use_cache": True,
    }
    return out, config


def export_hf(ckpt_path, out_dir) -> dict:
    """Write config.json, model.safetensors and the tokenizer (tokenizer.json + tokenizer_config.json)."""
    from safetensors.torch import save_file

    ck = ckpt_io.load(ckpt_path)
    if ck.get("kind") == "classifier":
        raise ValueError(f"{ckpt_path} is a fine-tuned classifier checkpoint; export takes a pretrained checkpoint")
    if "model_config" not in ck:
        raise ValueError(f"{ckpt_path} is not a tfkernels checkpoint (no model_config)")
    mcfg = ModelConfig.from_dict(ck["model_config"])
    kind = _arch(mcfg)
    sd = {k: v.detach().float().cpu() for k, v in ck["model"].items()}
    tensors, config = (gpt2_state_dict if kind == "gpt2" else llama_state_dict)(sd, mcfg)
    config["torch_dtype"] = "float32"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    files = ["config.json", "model.safetensors"]
    run_dir = Path(ckpt_path) if Path(ckpt_path).is_dir() else Path(ckpt_path).parent
    tok = run_dir / "tokenizer.json"
    if not tok.is_file() and ck.get("data_dir"):
        tok = Path(ck["data_dir"]) / "tokenizer.json"
    if tok.is_file():
        shutil.copyfile(tok, out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": mcfg.block_size,
            "bos_token": SPECIALS[EOS], "eos_token": SPECIALS[EOS], "pad_token": SPECIALS[PAD],
            "unk_token": SPECIALS[UNK], "cls_token": SPECIALS[CLS], "sep_token": SPECIALS[SEP],
            "mask_token": SPECIALS[MASK], "add_prefix_space": False}, indent=1))
        files += ["tokenizer.json", "tokenizer_config.json"]
    return {"out": str(out), "architecture": config["architectures"][0], "model_type": config["model_type"],
            "files": files}
