"""Thin GPT and BERT on tfkernels (the nanoGPT shape: read it top to bottom in one sitting).

    cfg = make_config("gpt", "tiny")                  # or "bert"; presets: tiny, gpt2-124m, bert-base
    model = build_model(cfg)                          # GPT or BERT
    logits, loss = model(idx, targets)                # GPT: idx (B, T) -> logits (B, T, V)
    out = model.generate(idx, 50, temperature=0.8)    # GPT: sampling with a KV cache
    out = model(ids, segment_ids, attention_mask, mlm_labels, nsp_labels)   # BERT -> BertOutput

`cfg.kernels` picks the building blocks: "tfkernels" (tfkernels.attention / tfkernels.nn norms,
with `cfg.backend` passed through) or "torch" (F.scaled_dot_product_attention, nn.LayerNorm,
nn.RMSNorm). Both build the same parameters under the same names, so one state_dict loads into
either — that is how the A/B comparisons are made.

`cfg.document_mask` (GPT): attention stays inside each document of a packed row, as Llama 3
pretrains. Pretraining packs documents back to back, each ended by <|endoftext|> (`cfg.eos_id`);
GPT derives every token's document from the EOS tokens before it (`document_ids_from_tokens`) and
gives the ids to tfkernels.attention (`document_ids`), or to SDPA as the equivalent dense mask
(`DocumentMask`). `model(idx, document_ids=...)` passes ids explicitly instead.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import tfkernels.nn as tfnn

from tfkernels import attention as tf_attention
from tfkernels import kvcache_attention as tf_kvcache_attention

try:  # SDPA's lower-right causal mask; tfkernels.attention takes it as well
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover
    causal_lower_right = None

# ----------------------------------------------------------------------------- configuration

@dataclass
class ModelConfig:
    arch: str = "gpt"              # "gpt" (causal LM) or "bert" (masked LM, optional NSP)
    vocab_size: int = 2048
    block_size: int = 128          # maximum sequence length T
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: Optional[int] = None  # GPT: K/V heads for grouped-query attention (None: n_head, MHA)
    dropout: float = 0.0           # embeddings, residual branches and attention probabilities
    bias: bool = True              # biases in Linear layers and LayerNorm
    norm: str = "layernorm"        # "layernorm" or "rmsnorm"
    mlp: str = "gelu"              # "gelu" (4d hidden) or "swiglu" (8d/3 hidden, rounded up to 64)
    pos: str = "learned"           # "learned" position embeddings or "rope"
    rope_base: float = 10000.0
    type_vocab_size: int = 2       # BERT segment embeddings
    nsp: bool = False              # BERT next-sentence-prediction head
    kernels: str = "tfkernels"     # "tfkernels" or "torch"
    backend: Optional[str] = None  # tfkernels backend for every op ("triton", "cuda", "torch", None)
    # GPT: a token attends only to the tokens of its own document, the EOS-delimited spans of a packed
    # row (positions stay the row's: see GPT.forward). Masking only, no parameters: it may change
    # between runs of one checkpoint
    document_mask: bool = False
    eos_id: int = 0                # the token that ends a document: <|endoftext|> (train/tokenizer.py EOS)

    def __post_init__(self):
        choices = {"arch": ("gpt", "bert"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "pos": ("learned", "rope"), "kernels": ("tfkernels", "torch")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head is not None:
            if self.arch != "gpt":
                raise ValueError("n_kv_head (grouped-query attention) is a GPT option")
            if not (isinstance(self.n_kv_head, int) and 1 <= self.n_kv_head <= self.n_head
                    and self.n_head % self.n_kv_head == 0):
                raise ValueError(f"n_kv_head={self.n_kv_head!r} must divide n_head={self.n_head} (1 <= n_kv_head "
                                 "<= n_head)")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("pos='rope' needs an even head dim")
        if self.document_mask and self.arch != "gpt":
            raise ValueError("document_mask is a GPT option (documents packed into one causal LM sequence)")
        if self.document_mask and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id={self.eos_id} is not a token id (vocab_size={self.vocab_size})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {
    # trains on 2 CPU cores in a minute or two
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=2048),
    # GPT-2 small; vocab 50257 padded to a multiple of 64
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    # BERT-base; vocab 30522 padded to a multiple of 64
    "bert-base": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=30528, nsp=True),
}


def make_config(arch: str, preset: str = "tiny", **overrides) -> ModelConfig:
    """A ModelConfig from a named preset; keyword overrides that are None are ignored."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available presets: {sorted(PRESETS)}")
    kw = dict(PRESETS[preset], arch=arch)
    if arch == "gpt":
        kw.pop("nsp", None)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**kw)


# ----------------------------------------------------------------------------- building blocks

def make_norm(cfg: ModelConfig) -> nn.Module:
    d = cfg.n_embd
    if cfg.kernels == "tfkernels":
        if cfg.norm == "layernorm":
            return tfnn.LayerNorm(d, bias=cfg.bias, backend=cfg.backend)
        return tfnn.RMSNorm(d, eps=1e-6, backend=cfg.backend)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(d, bias=cfg.bias)
    return nn.RMSNorm(d, eps=1e-6)


def rope_cache(T: int, head_dim: int, base: float, device=None):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # (Dh/2,)
    freqs = torch.outer(torch.arange(T, device=device).float(), inv_freq)                        # (T, Dh/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin, start: int = 0, positions: Optional[torch.Tensor] = None):
    # x: (B, H, T, Dh) at positions start .. start + T - 1, or at `positions` (B, T) per row (left-padded
    # generation); rotate the (first half, second half) pairs by position-dependent angles
    T = x.shape[-2]
    if positions is None:
        cos, sin = cos[start:start + T].to(x.dtype), sin[start:start + T].to(x.dtype)  # (T, Dh/2)
    else:
        cos, sin = cos[positions].to(x.dtype)[:, None], sin[positions].to(x.dtype)[:, None]  # (B, 1, T, Dh/2)
    x1, x2 = x.chunk(2, dim=-1)                           # (B, H, T, Dh/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def document_ids_from_tokens(idx: torch.Tensor, eos_id: int, first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The document of each token of idx (B, T), int32: the number of EOS tokens before it, so that an
    EOS belongs to the document it ends (ids = cumsum(eos) - eos; an EOS at the start is a document of
    its own). `first` (B,): the id of the document the row starts in (default 0), to continue a KV
    cache's ids. The ids only matter by equality: a window cut anywhere from a stream gets the same
    masks as the stream."""
    eos = (idx == eos_id).to(torch.int32)
    ids = torch.cumsum(eos, dim=-1, dtype=torch.int32) - eos
    return ids if first is None else ids + first[:, None]


@dataclass
class DocumentMask:
    """Document masking for one GPT forward, built once and used by every layer.

    q_ids (B, T) and k_ids (B, T_k) are the int32 document ids of the queries (the new tokens) and of
    the keys (with a KV cache: the cached tokens', then the new ones'; T_k = start + T). The tfkernels
    path gives them to tfkernels.attention, which ANDs them with the causal mask and skips the tiles
    of other documents. SDPA has no such argument, so the plain-PyTorch path gets `sdpa_mask`, the
    same rule as one bool mask (B, 1, T, T_k): same document (a negative id sees nothing) and causal,
    aligned bottom-right like the cache's queries. Both paths compute the same function.

    A padding query (negative id) sees no key, and SDPA's fused CUDA backends may return NaN for such
    a row (pytorch#110213; the math backend gives 0), which the next layer's values would carry into
    every real token (0 * NaN in P @ V). So the mask lets a padding query see its own key, and
    `sdpa_pad_rows` (B, 1, T, 1) zeroes those rows of SDPA's output afterwards: 0, as the kernels
    give them."""
    q_ids: torch.Tensor
    k_ids: torch.Tensor
    sdpa_mask: Optional[torch.Tensor] = None
    sdpa_pad_rows: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, q_ids: torch.Tensor, k_ids: torch.Tensor, sdpa: bool) -> "DocumentMask":
        mask = pad_rows = None
        if sdpa:  # only the "torch" kernels need the (T, T_k) mask: the fused path never builds it
            T, Tk = q_ids.shape[-1], k_ids.shape[-1]
            q_pos = torch.arange(Tk - T, Tk, device=q_ids.device)
            k_pos = torch.arange(Tk, device=q_ids.device)[None, :]
            causal = k_pos <= q_pos[:, None]                                                  # (T, T_k)
            pad = q_ids < 0                                                                    # (B, T)
            same = (q_ids[:, :, None] == k_ids[:, None, :]) & ~pad[:, :, None]               # (B, T, T_k)
            itself = pad[:, :, None] & (k_pos == q_pos[:, None])                              # (B, T, T_k)
            mask = (same & causal | itself).unsqueeze(1)                                      # (B, 1, T, T_k)
            pad_rows = pad[:, None, :, None]                                                  # (B, 1, T, 1)
        return cls(q_ids, k_ids, mask, pad_rows)


class KVCache:
    """Keys and values of the tokens a GPT has seen, per layer, for incremental decoding: buffers of
    (B, block_size, H_kv, Dh) (FlashAttention's cache layout, which tfkernels.kvcache_attention reads
    and appends to in place) in the dtype the keys come in (autocast's), filled as tokens arrive. With
    document masking it also keeps the tokens' document ids, so that new tokens are masked against
    the cached ones as a full forward would mask them."""

    def __init__(self, n_layer: int, max_len: int):
        self.k: list = [None] * n_layer
        self.v: list = [None] * n_layer
        self.max_len = max_len
        self.pos = 0  # tokens cached so far (the next token's position)
        self.doc: Optional[torch.Tensor] = None       # (B, max_len) int32 document ids (document masking only)
        self.next_doc: Optional[torch.Tensor] = None  # (B,) int32: the document the next token starts in
        # (B,) int32: padding slots before each row's first token (generate's left padding), skipped by
        # the fused decoding kernel (kvcache_attention's cache_leftpad); None: no row is padded
        self.leftpad: Optional[torch.Tensor] = None

    def buffers(self, layer: int, k: torch.Tensor):
        """Layer's (k, v) buffers (B, max_len, H_kv, Dh), made on first use like k (B, H_kv, T, Dh)."""
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer] = k.new_empty((B, self.max_len, H, D))
            self.v[layer] = k.new_empty((B, self.max_len, H, D))
        return self.k[layer], self.v[layer]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, Dh) at positions pos .. pos + T - 1; returns every cached key and value
        as (B, H, pos + T, Dh) views."""
        end = self.pos + k.shape[-2]
        kc, vc = self.buffers(layer, k)
        kc[:, self.pos:end] = k.transpose(1, 2)
        vc[:, self.pos:end] = v.transpose(1, 2)
        return kc[:, :end].transpose(1, 2), vc[:, :end].transpose(1, 2)

    def append_documents(self, ids: torch.Tensor) -> torch.Tensor:
        """Store the document ids (B, T) of the tokens at pos .. pos + T - 1; returns every cached token's ids."""
        if self.doc is None:
            if self.pos > 0:  # keys cached without ids: their documents are unknown
                raise ValueError("document ids given to a KV cache that holds tokens without them")
            self.doc = ids.new_empty((ids.shape[0], self.max_len))
        end = self.pos + ids.shape[-1]
        self.doc[:, self.pos:end] = ids
        return self.doc[:, :end]


def fused_decoding(cfg: ModelConfig, training: bool) -> bool:
    """True when a cached step of this model runs tfkernels.kvcache_attention (the fused kernels, no
    attention dropout); documents and other masks take the general attention with the cache."""
    return cfg.kernels == "tfkernels" and (cfg.dropout == 0.0 or not training)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head  # GQA: each K/V head serves n_head // n_kv_head queries
        kv = self.n_kv_head * self.head_dim
        self.split = (cfg.n_embd, kv, kv)
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.split), bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if cfg.pos == "rope":
            cos, sin = rope_cache(cfg.block_size, self.head_dim, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # not in the state_dict
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x, attn_mask=None, cache: Optional[KVCache] = None, layer: int = 0,
                docs: Optional[DocumentMask] = None, positions: Optional[torch.Tensor] = None):
        """x (B, T, C). attn_mask: SDPA's (BERT's key-padding mask). docs: document masking (causal
        attention only), ANDed with the causal mask; attn_mask must then be None. positions (B, T):
        each token's position for rope (default: start .. start + T - 1 in every row)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=2)                    # (B, T, C), (B, T, Hkv * Dh) x 2
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)         # (B, H, T, Dh)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)      # (B, Hkv, T, Dh)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)      # (B, Hkv, T, Dh)
        gqa = self.n_kv_head != self.n_head
        start = cache.pos if cache is not None else 0
        if self.cfg.pos == "rope":
            q = apply_rope(q, self.rope_cos, self.rope_sin, start, positions)
            k = apply_rope(k, self.rope_cos, self.rope_sin, start, positions)
        if docs is not None and (attn_mask is not None or not self.causal):
            raise ValueError("document masking is for causal attention without another attn_mask")
        is_causal = self.causal
        p = self.cfg.dropout if self.training else 0.0
        if cache is not None and fused_decoding(self.cfg, self.training) and docs is None and attn_mask is None:
            # decoding: the new keys appended in place and attended with the cached ones by the split-KV
            # kernel, the queries (bottom-right causal) in (B, T, H, Dh), the output in that layout too;
            # left padding (generate's) is skipped by the kernel, never read
            kc, vc = cache.buffers(layer, k)
            y = tf_kvcache_attention(q.transpose(1, 2), kc, vc, start, k.transpose(1, 2), v.transpose(1, 2),
                                     causal=self.causal, cache_leftpad=cache.leftpad,
                                     backend=self.cfg.backend)  # (B, T, H, Dh)
            return self.resid_dropout(self.c_proj(y.view(B, T, C)))
        if cache is not None and cache.leftpad is not None:
            raise ValueError("the KV cache has left padding (cache.leftpad), which only the fused decoding path "
                             "reads; mask the padding with document_ids (-1) instead")
        if cache is not None:
            k, v = cache.append(layer, k, v)                                 # (B, H, start + T, Dh)
            if start > 0:  # the new queries sit at the end: the causal diagonal is aligned bottom-right
                attn_mask, is_causal = causal_lower_right(T, start + T), False
        document_ids = None
        if docs is not None:
            if self.cfg.kernels == "tfkernels":
                document_ids = (docs.q_ids, docs.k_ids)                      # ANDed with the causal mask above
            else:  # SDPA takes one mask, not a mask and is_causal: sdpa_mask holds causality too
                attn_mask, is_causal = docs.sdpa_mask, False
        if self.cfg.kernels == "tfkernels":
            y = tf_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal, enable_gqa=gqa,
                             document_ids=document_ids, backend=self.cfg.backend)  # (B, H, T, Dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                               is_causal=is_causal, enable_gqa=gqa)  # (B, H, T, Dh)
            if docs is not None:  # padding queries saw themselves (no NaN row): their output is 0
                y = y.masked_fill(docs.sdpa_pad_rows, 0.0)
        # free after the kernels and SDPA's flash backend: they write y in q's (B, T, H, Dh) memory
        y = y.transpose(1, 2).contiguous().view(B, T, C)                     # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = 4 * cfg.n_embd
        if self.swiglu:  # same parameter count as the 4d GELU MLP, rounded up to a multiple of 64
            hidden = 64 * math.ceil(8 * cfg.n_embd / 3 / 64)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)                                # (B, T, hidden) or (B, T, 2*hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up                       # (B, T, hidden)
        else:
            h = F.gelu(h, approximate="tanh")           # (B, T, hidden)
        return self.dropout(self.c_proj(h))             # (B, T, C)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = SelfAttention(cfg, causal)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, cache: Optional[KVCache] = None, layer: int = 0,
                docs: Optional[DocumentMask] = None, positions: Optional[torch.Tensor] = None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer, docs, positions)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))                  # (B, T, C)
        return x


class _Base(nn.Module):
    """Shared: GPT-2 initialisation, parameter counts, optimizer groups."""

    def _init_weights(self):
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith("c_proj.weight"):  # residual projections, scaled per GPT-2
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; non_embedding leaves out position embeddings (the token embedding is tied
        with the output layer and counts, as in nanoGPT). This is the N of MFU's 6N."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self.transformer, "wpe"):
            n -= self.transformer.wpe.weight.numel()
        return n

    def optim_groups(self, weight_decay: float):
        """Weight decay on matmul weights only: none on norms, biases and embeddings."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_embedding = name.split(".")[-2] in ("wte", "wpe", "wtt")
            (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- GPT

class GPT(_Base):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, causal=True) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        ))
        if cfg.pos == "learned":
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self._init_weights()

    def forward(self, idx, targets=None, cache: Optional[KVCache] = None, document_ids=None, positions=None, *,
                check_positions: bool = True):
        """idx (B, T) -> (logits (B, T, V), loss). With `cache` (see generate), idx continues the
        tokens cached so far: positions start at cache.pos, attention also reads the cached keys and
        values, and the new ones are appended.

        Document masking: a token attends only to the earlier tokens of its own document. With
        cfg.document_mask the documents are derived from idx (`document_ids_from_tokens`, EOS =
        cfg.eos_id; with a cache they continue the cached tokens' ids); `document_ids` (B, T), any
        integer dtype, gives them explicitly instead, also without cfg.document_mask (negative =
        padding: it attends to nothing, its attention output is zero, and no token attends to it).
        Positions stay those of the row (a document's first token is not position 0): with
        pos="rope" only distances within a document matter, so that is the same as restarting
        positions per document; learned positions see the offset.

        positions (B, T) integer, each in [0, block_size): the tokens' positions, for rows that do not
        start at position 0 (left padding: `generate(..., attention_mask=)` passes the real tokens'
        positions, counted from each row's first real token). Default: start .. start + T - 1. Their
        range is checked on the host (a sync); `check_positions=False` skips that for positions built
        in range (generate's, at every step)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.cfg.block_size}")
        if positions is not None:
            positions = self._check_positions(positions, idx, check_positions)
        docs = self._document_mask(idx, document_ids, cache)                 # once for every layer
        x = self.transformer.wte(idx)                                        # (B, T, C)
        if self.cfg.pos == "learned":
            pos = torch.arange(start, start + T, device=idx.device) if positions is None else positions
            x = x + self.transformer.wpe(pos)                                # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None, cache, i, docs, positions)                    # (B, T, C)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)                                             # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def _check_positions(self, positions, idx, check_range: bool) -> torch.Tensor:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be a tensor, got {type(positions).__name__}")
        if positions.shape != idx.shape:
            raise ValueError(f"positions of shape {list(positions.shape)} must have idx's shape {list(idx.shape)}")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be integer positions, got {positions.dtype}")
        positions = positions.to(device=idx.device, dtype=torch.long)
        if check_range and positions.numel() and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.aminmax(positions))  # an index error on the GPU is an assert
            if lo < 0 or hi >= self.cfg.block_size:
                raise ValueError(f"positions must be in [0, block_size={self.cfg.block_size}), got values in [{lo}, {hi}]")
        return positions

    def _document_mask(self, idx, document_ids, cache: Optional[KVCache]) -> Optional[DocumentMask]:
        """The forward's DocumentMask (see forward), or None for plain causal attention."""
        cached_docs = cache is not None and cache.doc is not None
        if document_ids is None and not self.cfg.document_mask:
            if cached_docs:
                raise ValueError("the KV cache holds document ids: pass document_ids for the new tokens too")
            return None
        if document_ids is None:
            q_ids = document_ids_from_tokens(idx, self.cfg.eos_id, cache.next_doc if cached_docs else None)
        else:
            if not isinstance(document_ids, torch.Tensor):
                raise TypeError(f"document_ids must be a tensor, got {type(document_ids).__name__}")
            if document_ids.shape != idx.shape:
                raise ValueError(f"document_ids of shape {list(document_ids.shape)} must have idx's shape "
                                 f"{list(idx.shape)}")
            if document_ids.is_floating_point() or document_ids.is_complex() or document_ids.dtype == torch.bool:
                raise TypeError(f"document_ids must be integer document ids, got {document_ids.dtype}")
            q_ids = document_ids.to(device=idx.device, dtype=torch.int32)  # int32: no device sync in the op
        k_ids = q_ids
        if cache is not None:
            k_ids = cache.append_documents(q_ids)
            if idx.shape[1]:  # the next token continues the last one's document, or starts one after an EOS
                cache.next_doc = q_ids[:, -1] + (idx[:, -1] == self.cfg.eos_id).to(torch.int32)
        return DocumentMask.build(q_ids, k_ids, sdpa=self.cfg.kernels == "torch")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True, attention_mask=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 means greedy.

        Prompts of different lengths: left-pad them to one length and pass attention_mask (B, T), 1 for
        a real token and 0 for padding, zeros before ones in each row (Hugging Face's convention). Padding
        is attended by nothing and each row's positions count from its first real token, so every row
        decodes as its prompt would alone (greedy: the same tokens) while the row fits in block_size;
        past it, the window of the last block_size tokens slides over the padding first. With the
        cache on the fused kernels (no document masking) the decoding kernel skips the padding
        (kvcache_attention's cache_leftpad); otherwise document ids of -1 mask it.

        With use_cache (and a torch that has SDPA's causal_lower_right), the prompt runs once and each
        new token attends to the cached keys and values: one token's work a step, not the whole
        context's. Once the sequence outgrows block_size, every step re-reads the last block_size
        tokens, as without the cache (the positions shift), so both give the same tokens.

        With cfg.document_mask, the new tokens continue the prompt's last document: they see the
        text after the prompt's last EOS, not before it (a prompt without EOS is one document), and
        a sampled EOS starts a new document that sees none of the earlier text. The cache keeps the
        ids of its tokens; the re-read windows past block_size derive them again from their tokens,
        which gives the same masks."""
        pad = self._left_padding(idx, attention_mask)                        # (B,) or None
        cache = KVCache(self.cfg.n_layer, self.cfg.block_size) if use_cache and causal_lower_right else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.shape[1] <= self.cfg.block_size:
                kw = {} if pad is None else self._padded_inputs(idx, pad, cache.pos, cache)
                logits = self(idx[:, cache.pos:], cache=cache, **kw)[0][:, -1, :].float()  # (B, V): new tokens only
            else:
                idx_cond = idx[:, -self.cfg.block_size:]                     # (B, <=block_size)
                kw = {} if pad is None else self._padded_inputs(idx, pad, idx.shape[1] - idx_cond.shape[1], None)
                logits = self(idx_cond, **kw)[0][:, -1, :].float()           # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)                        # (B, 1)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    def _left_padding(self, idx, attention_mask) -> Optional[torch.Tensor]:
        """(B,) padding tokens before each row's prompt, from generate's attention_mask; None when no
        row is padded (then nothing changes)."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask of shape {list(attention_mask.shape)} must have idx's shape "
                             f"{list(idx.shape)}")
        real = attention_mask.to(device=idx.device) != 0                    # (B, T)
        pad = (~real).sum(-1)                                                # (B,)
        left = torch.arange(idx.shape[1], device=idx.device)[None, :] >= pad[:, None]
        if not torch.equal(real, left):
            raise ValueError("attention_mask must be left padding: in each row, zeros (padding) before ones "
                             "(the prompt)")
        if idx.shape[1] and bool((pad == idx.shape[1]).any()):
            raise ValueError("attention_mask: every row needs at least one real token (a row of only padding "
                             "has nothing to continue)")
        return pad if bool(pad.any()) else None

    def _padded_inputs(self, idx, pad, start: int, cache: Optional[KVCache]) -> dict:
        """forward's keywords for idx[:, start:] of a left-padded batch: positions counted from each
        row's first real token, and the padding kept out of attention. The fused decoding kernel skips
        it (cache.leftpad, set here on the first cached step); otherwise document_ids (padding -1, so
        nothing attends to it; real tokens their documents with cfg.document_mask, else 0).
        With `cache` the slice continues it at column `start`: after the prompt it holds only new
        tokens, whose documents continue the cache's (cache.next_doc). Without, it is a re-read window
        (past block_size): its positions start again at 0, as an unpadded window's do, after the
        padding it still holds (pad - start), and its documents are derived from its own tokens."""
        part = idx[:, start:]                                                # (B, L - start)
        col = torch.arange(start, idx.shape[1], device=idx.device)[None, :]  # its columns in idx
        lead = pad if cache is not None else (pad - start).clamp(min=0) + start  # (B,): the column of position 0
        positions = (col - lead[:, None]).clamp(min=0)
        if cache is not None and not self.cfg.document_mask and fused_decoding(self.cfg, self.training):
            if cache.leftpad is None:
                cache.leftpad = pad.to(torch.int32)
            return {"positions": positions, "check_positions": False}
        if self.cfg.document_mask:
            first = cache.next_doc if cache is not None and start > 0 else None
            ids = document_ids_from_tokens(part, self.cfg.eos_id, first)
        else:
            ids = torch.zeros_like(part, dtype=torch.int32)
        ids = torch.where(col >= pad[:, None], ids, -1)
        return {"document_ids": ids, "positions": positions, "check_positions": False}


# ----------------------------------------------------------------------------- BERT

@dataclass
class BertOutput:
    loss: Optional[torch.Tensor]          # mlm_loss + nsp_loss (those given)
    mlm_logits: torch.Tensor              # (B, T, V)
    nsp_logits: Optional[torch.Tensor]    # (B, 2)
    mlm_loss: Optional[torch.Tensor] = None      # mean over the masked tokens (0 when there are none)
    nsp_loss: Optional[torch.Tensor] = None      # mean over the sequences
    mlm_loss_sum: Optional[torch.Tensor] = None  # sum over the masked tokens: mlm_loss = mlm_loss_sum / max(count, 1)


class BERT(_Base):
    """Encoder with token/position/segment embeddings, pre-norm blocks (more stable to train than
    the original post-norm), a tied MLM head and an optional NSP head on the [CLS] position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wtt=nn.Embedding(cfg.type_vocab_size, cfg.n_embd, padding_idx=0),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, causal=False) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        ))
        if cfg.pos == "learned":
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        # MLM head: transform (dense, GELU, norm), then the tied decoder with its own bias
        self.mlm_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlm_norm = make_norm(cfg)
        self.mlm_decoder = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.mlm_decoder.weight = self.transformer.wte.weight  # tied embeddings
        if cfg.nsp:
            self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd)
            self.nsp_head = nn.Linear(cfg.n_embd, 2)
        self._init_weights()
        # Segment 0's embedding is pinned at zero (padding_idx=0: no gradient). Trained, it is one vector
        # added to nearly every token, its gradient summed over all of them; Adam then moves it a full
        # step every step, it soon outweighs the token embeddings, and the tokens look alike to the
        # blocks (fine-tuning from scratch stayed at chance). Pinned, segment 1 learns the offset.
        with torch.no_grad():
            self.transformer.wtt.weight[0].zero_()

    def forward(self, input_ids, segment_ids=None, attention_mask=None, mlm_labels=None, nsp_labels=None):
        """input_ids, segment_ids: (B, T) long; attention_mask: (B, T) bool, True = real token
        (None = no padding); mlm_labels: (B, T) with -100 where not masked; nsp_labels: (B,)."""
        B, T = input_ids.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        if segment_ids is None:
            segment_ids = torch.zeros_like(input_ids)
        x = self.transformer.wte(input_ids) + self.transformer.wtt(segment_ids)  # (B, T, C)
        if self.cfg.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(T, device=input_ids.device))
        x = self.transformer.drop(x)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()[:, None, None, :]                # (B, 1, 1, T): keys to attend to
        for block in self.transformer.h:
            x = block(x, key_mask)                                            # (B, T, C)
        x = self.transformer.ln_f(x)
        h = self.mlm_norm(F.gelu(self.mlm_dense(x)))                          # (B, T, C)
        mlm_logits = self.mlm_decoder(h)                                      # (B, T, V)
        nsp_logits = None
        if self.cfg.nsp:
            pooled = torch.tanh(self.pooler(x[:, 0]))                         # (B, C): the [CLS] position
            nsp_logits = self.nsp_head(pooled)                                # (B, 2)
        mlm_loss = nsp_loss = mlm_loss_sum = None
        if mlm_labels is not None:
            # mean over the masked tokens as a sum / max(count, 1): a batch with no masked token (short
            # sequences, few real tokens) gives loss 0 and no gradient, where the mean was 0/0 = nan. The
            # sum is returned too: gradient accumulation divides it by the masked tokens of the whole step
            labels = mlm_labels.reshape(-1)
            mlm_loss_sum = F.cross_entropy(mlm_logits.float().view(-1, mlm_logits.size(-1)), labels,
                                           ignore_index=-100, reduction="sum")
            mlm_loss = mlm_loss_sum / (labels != -100).sum().clamp(min=1)
        if nsp_labels is not None and nsp_logits is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
        losses = [v for v in (mlm_loss, nsp_loss) if v is not None]
        loss = sum(losses) if losses else None
        return BertOutput(loss, mlm_logits, nsp_logits, mlm_loss, nsp_loss, mlm_loss_sum)


def build_model(cfg: ModelConfig) -> nn.Module:
    return GPT(cfg) if cfg.arch == "gpt" else BERT(cfg)


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N + 12·L·H·Dh·T (PaLM appendix B; what MFU divides by)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size
