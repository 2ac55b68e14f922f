"""Hugging Face integration: the "tfkernels" attention implementation and drop-in HF norms.

No hard dependency on transformers: this module imports it only inside functions, and HF norm
classes are recognised by duck typing (their `forward` source, or failing that their class name).

    import tfkernels                     # registers "tfkernels" once transformers.modeling_utils loads
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="tfkernels")
    # or: tfkernels.swap(model)          # norms + attention of an existing model

Attention: `attention_forward` mirrors `transformers.integrations.sdpa_attention.sdpa_attention_forward`
(same masks: the model builds them with the SDPA mask function, registered for "tfkernels" in
`AttentionMaskInterface`; so padding, causal, sliding-window and chunked masks arrive as SDPA-style
boolean masks, or None + is_causal when the mask is plain causal) and calls `tfkernels.attention`.
Beyond SDPA:
  - `softcap` (Gemma 2's attn_logit_softcapping) goes to the kernel's `softcap`, as eager applies it
    (transformers' "sdpa" raises on it in 5.23 and silently ignores it in 5.17).
  - Native sliding window: when a sliding layer's mask would be exactly sliding-window causal (no
    padding, T_q == T_k, no cache offset, no custom/packed overlay) in a model known to hand its window
    to the attention function (`_NATIVE_WINDOW_MODELS`), the mask function (`tfkernels_mask`) returns
    None instead of a dense (B, 1, T, T) mask and `attention_forward` runs `is_causal=True,
    window_size=(W - 1, 0)`: key tiles outside the window are skipped (O(T * W)). Anything else
    (padding, KV-cache decoding, chunked masks, custom mask functions, compile/tracing, other models)
    gets the SDPA mask as before; packed sequences: below.
  - Decode steps (T_q = 1) run `tfkernels.kvcache_attention` on (B, T_k, H_kv, D) views of the cache
    HF passes: one program per K/V head for its whole query group, the keys split across SMs
    (flash-decoding), GQA without repeating K/V, and the (B, 1, H, D) output HF wants without a
    transpose copy. With no mask (no padding; HF drops the mask then) every key is visible; with a
    boolean mask whose visible keys are one run per row [start, end) (left padding, a static cache's
    unwritten tail, a sliding window, or all three) the run is the row's `cache_leftpad` and
    `cache_seqlens` (`_decode_runs`: one small read per mask, shared by the layers); any other mask
    runs `tfkernels.attention` with it.
  - Packed sequences (padding-free training, e.g. `DataCollatorWithFlattening`: sequences concatenated
    in a row, position_ids restarting, no attention_mask, no cache): when transformers' mask is exactly
    causal within each sequence (sliding-window causal on a sliding layer of a `_NATIVE_WINDOW_MODELS`
    model) in a model that hands its masks to attention untouched (`_PACKED_MODELS`), `tfkernels_mask`
    returns the sequences' ids, (B, 1, 1, T) int32 (transformers' numbering: a new sequence wherever
    position_ids do not go up by 1), and `attention_forward` runs `is_causal=True, document_ids=ids`
    (and the window): no (T, T) mask, key tiles of other sequences skipped (O(T * L) for sequences of
    length L). Transformers packs only with no cache and no 2D mask (a model called with use_cache=True,
    its default, builds a cache and gets plain causal attention over the whole row, in 5.17 and 5.23);
    where it does not pack, neither does this. Padding, offsets, custom or overlaid masks and
    compile/tracing get the SDPA mask.
Attention sinks (`s_aux`) are refused.

Norms: each HF RMSNorm flavour rounds differently in half precision; the modules below reproduce
each one's casts exactly and fuse the weight into the kernel only where that gives the same math:
  - Llama/Mistral/Qwen2/... : y = w * (x_f32 * rstd).to(x.dtype)           (cast BEFORE the weight)
  - Gemma/Gemma2/Gemma3     : y = (x_f32 * rstd * (1 + w_f32)).to(x.dtype)   (cast AFTER, offset 1+w)
  - T5LayerNorm             : y = w * (x_f32 * rstd).to(w.dtype if w is half else f32)
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import numbers
import re
import sys
from typing import Optional

import torch
from torch import nn

from . import _validate
from .ops import rms_norm

__all__ = ["attention_forward", "register", "LlamaRMSNorm", "GemmaRMSNorm", "T5LayerNorm",
           "hf_norm_kind", "from_hf_norm"]

ATTN_NAME = "tfkernels"
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------------

class _HFNorm(nn.Module):
    """What the HF norm replicas share: a 1-D `weight`, eps under the attribute name HF gives it in
    that flavour (`EPS_ATTR`, so state and repr look like HF's), and the tfkernels backend to run on."""

    EPS_ATTR = "variance_epsilon"
    WEIGHT_INIT = staticmethod(torch.ones)  # HF's initial weight (Gemma stores w - 1: zeros)

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, backend: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(self.WEIGHT_INIT(hidden_size))
        setattr(self, self.EPS_ATTR, eps)
        self.backend = backend

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={getattr(self, self.EPS_ATTR)}, backend={self.backend}"


class LlamaRMSNorm(_HFNorm):
    """Llama-style RMSNorm (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, ...) on tfkernels.

    HF: `self.weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`. The normalized value
    is rounded to x's dtype before the weight multiply, so the weight is fused into the kernel only
    when x and the weight are both fp32 (the two roundings are then the same single fp32 one).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        N = w.shape[-1]
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return rms_norm(x, (N,), w, self.variance_epsilon, backend=self.backend)
        # statistics in fp32 inside the kernel, normalized value rounded to x.dtype, then HF's multiply
        return w * rms_norm(x, (N,), None, self.variance_epsilon, backend=self.backend)


class GemmaRMSNorm(_HFNorm):
    """Gemma-style RMSNorm (GemmaRMSNorm, Gemma2RMSNorm, Gemma3RMSNorm) on tfkernels.

    HF: `(x.float() * rsqrt(mean(x.float()^2) + eps) * (1 + w.float())).type_as(x)`: computed in fp32
    and cast once at the end, which is exactly what the kernel does with an fp32 weight `1 + w`.
    """

    EPS_ATTR = "eps"
    WEIGHT_INIT = staticmethod(torch.zeros)

    def __init__(self, dim: int, eps: float = 1e-6, *, backend: Optional[str] = None):
        super().__init__(dim, eps, backend=backend)  # HF names the size `dim` here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = 1.0 + self.weight.float()  # the Gemma offset, in fp32 as HF computes it
        return rms_norm(x, (w.shape[-1],), w, self.eps, backend=self.backend)


class T5LayerNorm(_HFNorm):
    """T5's RMS-style LayerNorm (no mean subtraction, no bias) on tfkernels.

    HF: `n = x * rsqrt(mean(x.float()^2) + eps)` (fp32), cast to the weight's dtype when the weight is
    fp16/bf16, then `w * n`. Fused only when x and the weight are both fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        N = w.shape[-1]
        eps = self.variance_epsilon
        if w.dtype in _HALF:
            if x.dtype == w.dtype:  # fp32 value rounded once to w.dtype, inside the kernel
                n = rms_norm(x, (N,), None, eps, backend=self.backend)
            else:
                n = rms_norm(x.float(), (N,), None, eps, backend=self.backend).to(w.dtype)
            return w * n
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return rms_norm(x, (N,), w, eps, backend=self.backend)
        return w * rms_norm(x.float(), (N,), None, eps, backend=self.backend)


_KIND_CLASS = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm, "t5": T5LayerNorm}
_KIND_EPS_ATTR = {kind: cls.EPS_ATTR for kind, cls in _KIND_CLASS.items()}  # the HF classes' names too

# Whitespace- and comment-free bodies of the HF forward methods we reproduce (transformers 4.4x-5.x).
_FORWARD_BODIES = {
    "llama": "input_dtype=hidden_states.dtype hidden_states=hidden_states.to(torch.float32) "
             "variance=hidden_states.pow(2).mean(-1,keepdim=True) "
             "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon) "
             "return self.weight*hidden_states.to(input_dtype)",
    "gemma": "output=self._norm(x.float()) output=output*(1.0+self.weight.float()) return output.type_as(x)",
    "t5": "variance=hidden_states.to(torch.float32).pow(2).mean(-1,keepdim=True) "
          "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon) "
          "if self.weight.dtype in [torch.float16,torch.bfloat16]: "
          "hidden_states=hidden_states.to(self.weight.dtype) return self.weight*hidden_states",
}
_GEMMA_NORM_BODY = "return x*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+self.eps)"

# Used only when the source cannot be read (e.g. a frozen install).
_KNOWN_NAMES = {
    "llama": {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
              "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm", "OlmoRMSNorm", "Olmo2RMSNorm",
              "GraniteRMSNorm", "StarcoderRMSNorm", "SmolLM3RMSNorm", "DeepseekV3RMSNorm"},
    "gemma": {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"},
    "t5": {"T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm", "LongT5LayerNorm"},
}


def _normalized_body(fn) -> Optional[str]:
    """The body of `fn` without its def line, comments, docstring-less whitespace (None if unreadable)."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    lines = src.splitlines()
    # drop the (possibly multi-line) `def ...:` header
    i = 0
    while i < len(lines) and not re.search(r"\)\s*(->\s*[^:]+)?:\s*(#.*)?$", lines[i]):
        i += 1
    body = []
    for line in lines[i + 1:]:
        line = re.sub(r"#.*$", "", line).strip()
        if line:
            body.append(line)
    text = " ".join(body)
    return re.sub(r"\s*([=*+\-(),.:\[\]])\s*", r"\1", text)


def _norm_template(body: str) -> str:
    return re.sub(r"\s*([=*+\-(),.:\[\]])\s*", r"\1", body)


@functools.lru_cache(maxsize=None)
def _class_kind(cls) -> Optional[str]:
    fwd = getattr(cls, "forward", None)
    body = _normalized_body(fwd) if fwd is not None else None
    if body is not None:
        for kind, tmpl in _FORWARD_BODIES.items():
            if body == _norm_template(tmpl):
                if kind == "gemma":  # the formula lives in _norm: check it too
                    if _normalized_body(getattr(cls, "_norm", None)) != _norm_template(_GEMMA_NORM_BODY):
                        return None
                return kind
        return None
    for kind, names in _KNOWN_NAMES.items():
        if cls.__name__ in names:
            return kind
    return None


def hf_norm_kind(module: nn.Module) -> Optional[str]:
    """"llama", "gemma" or "t5" when `module` is a Hugging Face norm that tfkernels reproduces, else None."""
    cls = type(module)
    if cls.__module__.startswith("tfkernels"):
        return None
    if not (cls.__name__.endswith("RMSNorm") or cls.__name__.endswith("LayerNorm")):
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return None
    kind = _class_kind(cls)
    if kind is None or not isinstance(getattr(module, _KIND_EPS_ATTR[kind], None), (int, float)):
        return None
    # only the attributes we copy: a subclass with more state is not ours to replace
    if set(module._parameters) != {"weight"} or module._buffers or module._modules:
        return None
    return kind


def from_hf_norm(module: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """A tfkernels module computing exactly what the HF norm `module` computes, sharing its weight."""
    kind = hf_norm_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a Hugging Face norm tfkernels knows how to replace")
    cls = _KIND_CLASS[kind]
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.weight = module.weight  # the same Parameter object: optimizers and state_dict keep working
    setattr(new, _KIND_EPS_ATTR[kind], getattr(module, _KIND_EPS_ATTR[kind]))
    new.backend = backend
    new.train(module.training)
    return new


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

def _attention_fn():
    import tfkernels

    fn = getattr(tfkernels, "attention", None)
    if fn is None:
        raise RuntimeError("tfkernels.attention is not available in this build")
    return fn


def _position_bias_mask(position_bias, attention_mask, is_causal, query, key):
    # as transformers' create_position_bias_mask: fold the bias and the mask into one additive mask
    min_dtype = torch.finfo(key.dtype).min
    if attention_mask is None:
        if is_causal:
            q_len, kv_len = query.shape[2], key.shape[2]
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=key.device).tril()
            return torch.where(causal, position_bias, min_dtype)
        return position_bias
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, min_dtype)
    return position_bias + attention_mask


# Models whose attention layers pass HF's `sliding_window` kwarg (W keys, the diagonal included: the
# mask keeps kv > q - W, flash-attn gets window (W - 1, W - 1)) to the attention function exactly on the
# layers that get the sliding-window mask, and hand that mask to it untouched. Checked in transformers
# 5.17 and 5.23 (tests/test_swap_hf.py re-checks the sources). Not every model does: Qwen2-MoE and PhiMoE
# build sliding masks but pass no kwarg, Doge rewrites the mask; for those a None mask would silently
# mean full causal attention, so they keep the dense mask.
_NATIVE_WINDOW_MODELS = frozenset({
    "mistral", "mixtral", "ministral", "ministral3", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text",
    "starcoder2", "phi3", "cohere2",
})


def _native_window_model(config) -> bool:
    return getattr(config, "model_type", None) in _NATIVE_WINDOW_MODELS


def _is_plain_int(x) -> bool:
    return type(x) is int  # not bool, not a SymInt or a tensor (compile / export): those fall back


def _tracing() -> bool:
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:  # torch < 2.3
        pass
    return torch.jit.is_tracing()


def _native_window_size(kw: dict) -> Optional[int]:
    """W when the mask `sdpa_mask(**kw)` would build is exactly "key k visible from query q iff
    q - W < k <= q" for every batch row (no padding, T_q == T_k, no cache offset) and the attention
    function of this model is known to receive W (so it can use the kernel's window instead); else None.

    Conservative: every input must be as `create_sliding_window_causal_mask` passes it in the plain
    case (a `local_size`, `allow_is_causal_skip=True`, no vmap, int sizes and zero offsets), and the mask
    function itself is probed on a few whole rows against the sliding-window pattern, so chunked masks,
    custom overlays or any other pattern fall back.
    """
    W = kw.get("local_size")
    q_len, kv_len = kw.get("q_length"), kw.get("kv_length")
    B = kw.get("batch_size")
    if not all(_is_plain_int(x) for x in (W, q_len, kv_len, B)) or W < 1 or B < 1:
        return None
    if kv_len < W or q_len != kv_len or q_len < 2:  # shorter than the window: sdpa_mask's own None
        return None
    if not (_is_plain_int(kw.get("q_offset", 0)) and kw.get("q_offset", 0) == 0
            and _is_plain_int(kw.get("kv_offset", 0)) and kw.get("kv_offset", 0) == 0):
        return None  # a KV cache: the kernel's window is top-left aligned, a decode step needs bottom-right
    if kw.get("allow_is_causal_skip") is not True or kw.get("use_vmap", False) \
            or kw.get("allow_is_bidirectional_skip", False):
        return None  # custom and/or overlays, packed sequences, compiled decoding, bidirectional masks
    if not _native_window_model(kw.get("config")) or _tracing():
        return None
    pad = kw.get("attention_mask")
    if pad is not None:
        if not isinstance(pad, torch.Tensor) or pad.dim() != 2 or pad.shape[-1] < kv_len:
            return None
        if not bool(pad[:, :kv_len].all()):  # padding (sdpa_mask reads it the same way to skip)
            return None
    fn = kw.get("mask_function")
    if fn is None:
        return None
    # the mask function on whole rows, as sdpa_mask broadcasts it (index tensors (B,1,1,1), (1,1,1,1),
    # (1,1,R,1), (1,1,1,T)), on CPU: it must be exactly the band q - W < k <= q
    rows = sorted({r for r in (0, 1, W - 2, W - 1, W, W + 1, kv_len // 2, kv_len - 2, kv_len - 1) if 0 <= r < q_len})
    b = torch.tensor(sorted({0, B - 1}))[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q = torch.tensor(rows)[None, None, :, None]
    k = torch.arange(kv_len)[None, None, None, :]
    want = ((k <= q) & (k > q - W)).expand(b.shape[0], 1, len(rows), kv_len)
    try:
        with torch.no_grad():
            got = fn(b, h, q, k)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or got.device.type != "cpu":
            return None
        got = got.expand(want.shape)
    except Exception:  # a function that does not probe like an index-based one: not ours to shortcut
        return None
    return W if torch.equal(got, want) else None


# Models (beyond the window list above, which they must also be on to get a window with their documents)
# whose decoder hands the masks of create_causal_mask / create_sliding_window_causal_mask to the attention
# function untouched (no slicing, no concatenation, no arithmetic): only there may the packed-sequence
# mask be replaced by its document ids (see `_packed_document_ids`), which nothing but
# `attention_forward` understands. Checked in transformers 5.17 and 5.23 (tests/test_swap_hf.py re-checks
# the sources).
_PACKED_MODELS = frozenset({
    "llama", "mistral", "mixtral", "ministral", "ministral3", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "starcoder2", "phi3", "cohere", "cohere2", "olmo", "olmo2", "granite", "smollm3",
})

# The packed-sequence mask's stand-in (`_packed_document_ids`): the per-token document ids, int32, shaped
# (B, 1, 1, T) where the dense mask would be (B, 1, T, T) bool. Transformers' masks are bool or float, so
# `attention_forward` cannot mistake it; anything else handed it fails loudly (SDPA refuses integer masks).
_DOC_DTYPE = torch.int32


def _probe(fn, b, h, q, k) -> Optional[torch.Tensor]:
    """`fn(b, h, q, k)` as sdpa_mask calls an index-based mask function (broadcast index tensors),
    or None when it does not answer like one (not a bool tensor, an exception)."""
    try:
        with torch.no_grad():
            got = fn(b, h, q, k)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            return None
        return got.expand(torch.broadcast_shapes(got.shape, b.shape, q.shape, k.shape))
    except Exception:  # a function that does not probe like an index-based one: not ours to shortcut
        return None


def _packed_document_ids(kw: dict) -> Optional[torch.Tensor]:
    """Document ids (B, T) int32 when the mask `sdpa_mask(**kw)` would build is exactly "causal within each
    packed sequence" (ANDed with the sliding window W = local_size on a sliding layer) and at least one
    row holds several sequences; else None.

    Transformers builds such a mask for packed sequences (`DataCollatorWithFlattening`: position_ids
    restarting, no 2D attention mask, no cache): `find_packed_sequence_indices` numbers the sequences (a
    new one wherever position_ids do not increase by 1) and the mask function becomes "same sequence AND
    the causal (sliding) mask on the positions", with `allow_is_causal_skip=False`. Within a sequence the
    positions go up by 1, so that is the kernel's `document_ids` with `is_causal=True` (and the window).
    The ids are read off the mask function itself, so they are transformers' own numbering: query t sees
    key t - 1 iff both are in one sequence. Then the function is probed on every row's diagonals (t, t),
    (t, t + 1) (and (t, t - W + 1), (t, t - W)) and on some whole rows (sequence ends and starts among
    them) against the pattern. Anything else gets None and so the SDPA mask: padding, cache offsets,
    and/or mask functions (vmapped), tracing, other models; a bidirectional block overlay (an image in a
    multimodal model) shows on the (t, t + 1) diagonal.
    """
    B, q_len, kv_len, W = kw.get("batch_size"), kw.get("q_length"), kw.get("kv_length"), kw.get("local_size")
    if not all(_is_plain_int(x) for x in (q_len, kv_len, B)) or B < 1 or q_len != kv_len or q_len < 2:
        return None
    if not (_is_plain_int(kw.get("q_offset", 0)) and kw.get("q_offset", 0) == 0
            and _is_plain_int(kw.get("kv_offset", 0)) and kw.get("kv_offset", 0) == 0):
        return None
    # a packed mask is never skippable: a skippable one is plain (cheap to reject before probing anything)
    if kw.get("allow_is_causal_skip") is not False or kw.get("use_vmap", False) \
            or kw.get("allow_is_bidirectional_skip", False):
        return None
    if kw.get("attention_mask") is not None:  # transformers packs only without a 2D mask
        return None
    config = kw.get("config")
    if getattr(config, "model_type", None) not in _PACKED_MODELS or _tracing():
        return None
    if W is not None and not (_is_plain_int(W) and W >= 2 and _native_window_model(config)):
        return None  # the window comes to attention_forward as the `sliding_window` kwarg: those models only
    fn = kw.get("mask_function")
    if fn is None:
        return None
    T = q_len
    device = kw.get("device", "cpu")
    b = torch.arange(B, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    t = torch.arange(T, device=device)[None, None, :, None]
    # query t sees key t - 1 iff both are in one sequence: the sequences start where it does not
    cont = _probe(fn, b, h, t[:, :, 1:], t[:, :, 1:] - 1)
    if cont is None or cont.shape != (B, 1, T - 1, 1):
        return None
    starts = ~cont.reshape(B, T - 1)
    if not bool(starts.any()):  # one sequence per row: not packed (an ordinary mask, built as asked)
        return None
    docs = torch.cat([starts.new_zeros(B, 1, dtype=torch.long), starts.long().cumsum(-1)], dim=-1)

    def matches(b_, q, k) -> bool:  # the function at (b_, q, k) is the pattern: same id, causal, in the window
        got = _probe(fn, b_, h, q, k)
        keep = (docs[b_, q] == docs[b_, k]) & (k <= q)
        if W is not None:
            keep &= k > q - W
        return got is not None and got.shape == keep.shape and got.device == keep.device and torch.equal(got, keep)

    # every row's diagonals: its own token, the next one (never), the window's two edges
    for d in sorted({0, -1} | ({W - 1, W} if W is not None else set())):
        q = t[:, :, max(d, 0):T + min(d, 0)]
        if q.shape[2] and not matches(b, q, q - d):
            return None
    # whole rows: around the first sequence boundaries of the first batch row, the ends, the window
    # edges, and eight spread over the row
    first = (torch.nonzero(starts[0]).flatten()[:4] + 1).tolist()
    rows = {0, 1, T - 2, T - 1} | set(range(0, T, max(1, T // 8))) | {r + e for r in first for e in (-1, 0)}
    if W is not None:
        rows |= {W - 2, W - 1, W, W + 1}
    q = torch.tensor(sorted(r for r in rows if 0 <= r < T), device=device)[None, None, :, None]
    if not matches(torch.tensor(sorted({0, B - 1}), device=device)[:, None, None, None], q, t.reshape(1, 1, 1, T)):
        return None
    return docs.to(_DOC_DTYPE)


def _make_mask_interface(sdpa_mask):
    """The mask function registered for "tfkernels": transformers' `sdpa_mask`, except that
      - an exactly sliding-window-causal mask (see `_native_window_size`) becomes None: `attention_forward`
        then uses the kernel's window, from the `sliding_window` kwarg HF passes it;
      - an exactly causal-within-packed-sequences mask (see `_packed_document_ids`) becomes the sequences'
        document ids (B, 1, 1, T) int32, which `attention_forward` hands the kernel as `document_ids`."""

    def tfkernels_mask(*args, **kwargs):
        """transformers' sdpa_mask, or what the kernel needs instead of a mask it applies itself."""
        if not args:
            if _native_window_size(kwargs) is not None:
                return None
            docs = _packed_document_ids(kwargs)
            if docs is not None:
                return docs[:, None, None, :]
        return sdpa_mask(*args, **kwargs)

    return tfkernels_mask


def _document_ids(attention_mask) -> Optional[torch.Tensor]:
    """The document ids (B, T) that `tfkernels_mask` put in place of a packed-sequence mask, else None."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == _DOC_DTYPE \
            and attention_mask.dim() == 4 and attention_mask.shape[1] == attention_mask.shape[2] == 1:
        return attention_mask[:, 0, 0, :]
    return None


def _native_window(module, attention_mask, is_causal, q_len, kv_len, sliding_window):
    """window_size for the kernel when the mask is None because `tfkernels_mask` chose the native
    window, or stood in document ids for it (None otherwise). A None mask with T_q == T_k and a window
    shorter than the keys can only come from there: sdpa_mask itself skips a sliding mask only when the
    keys fit in the window."""
    if attention_mask is not None or not is_causal or q_len != kv_len:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral):
        return None
    W = int(sliding_window)
    if not 1 <= W < kv_len or not _native_window_model(getattr(module, "config", None)):
        return None
    return (W - 1, 0)


def _decode_runs(mask: torch.Tensor, batch: int, kv_len: int):
    """For a decode step's boolean mask (B or 1, 1, 1, kv_len): (seqlens, leftpad), (B,) int32 on the
    mask's device, when each row's visible keys are one run [leftpad, seqlens) (an empty row: [0, 0)),
    else None. The runs come from the device in one read of (B, 3) ints per mask (start, end, count),
    not the whole mask; the later layers find them memoised per mask version (an inference mask, which
    has no version, for its lifetime: transformers builds the mask anew for every forward and never
    changes it in place), and `kvcache_attention` finds their values already on the host."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:] != (1, 1, kv_len) \
            or mask.shape[0] not in (1, batch) or kv_len == 0 or _tracing():
        return None
    return _validate.per_version(mask, "decode_runs", lambda m: _runs_of(m, batch, kv_len),
                                 frozen=mask.is_inference())


def _runs_of(mask: torch.Tensor, batch: int, kv_len: int):
    """`_decode_runs`' result, computed: one (B, 3) read."""
    m = mask[:, 0, 0, :]
    j = torch.arange(kv_len, device=m.device)
    stats = torch.stack([torch.where(m, j, kv_len).amin(-1), torch.where(m, j + 1, 0).amax(-1), m.sum(-1)], 1)
    rows = stats.tolist()  # the one sync
    if not all(count == 0 or end - start == count for start, end, count in rows):
        return None
    starts = [start if count else 0 for start, _, count in rows]
    ends = [end if count else 0 for _, end, count in rows]
    if len(rows) == 1:
        starts, ends = starts * batch, ends * batch
    seqlens = torch.tensor(ends, dtype=torch.int32, device=mask.device)
    leftpad = torch.tensor(starts, dtype=torch.int32, device=mask.device)
    _validate.remember_host_values(seqlens, ends)
    _validate.remember_host_values(leftpad, starts)
    return seqlens, leftpad


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """Hugging Face attention function: query (B, H, Tq, D), key/value (B, Hkv, Tk, D) ->
    (attn_output (B, Tq, H, D), None). Same contract and mask handling as `sdpa_attention_forward`, plus
    the native window and the document ids that `tfkernels_mask` puts in place of some masks.
    The backend is the one `tfkernels.swap(model, backend=...)` recorded on the module, else automatic.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='tfkernels' does not support attention sinks (`s_aux`); use 'eager'")
    if kwargs.get("output_attentions"):  # as 'sdpa' says: the fused kernel never forms the weights
        from ._backend import warn_once

        warn_once("hf-output-attentions", "attn_implementation='tfkernels' does not form the attention weights: "
                  "output_attentions=True gets none from these layers; use attn_implementation='eager' for them")
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)

    q_len, kv_len = query.shape[2], key.shape[2]
    enable_gqa = key.shape[1] != query.shape[1]  # GQA: the kernel indexes kv head h // (H / Hkv)

    documents = _document_ids(attention_mask)
    if documents is not None:  # packed sequences: tfkernels_mask checked that the mask is causal within each
        attention_mask, is_causal = None, True
    else:  # as SDPA's integration: use is_causal only when the model built no mask (plain causal)
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:  # prefill into an empty static cache: top-left causal == crop
        key, value = key[:, :, :q_len], value[:, :, :q_len]

    # a sliding layer whose dense mask tfkernels_mask left out: the kernel's window, ANDed with is_causal
    # (or with the causal position-bias mask below) and with the documents
    window = _native_window(module, attention_mask, is_causal, q_len, key.shape[2], kwargs.get("sliding_window"))
    softcap = kwargs.get("softcap") or 0.0  # None / 0: off

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        if is_causal and position_bias.shape[-1] > key.shape[2]:
            position_bias = position_bias[..., : key.shape[2]]
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    if q_len == 1 and documents is None and window is None and not dropout:
        # a decode step: the split-KV decoding kernel reads the cache (B, H_kv, T_k, D) through
        # (B, T_k, H_kv, D) views and writes (B, 1, H, D), the layout returned. Every key, or each
        # row's run of visible keys when the mask is one run per row.
        runs = (kv_len, None) if attention_mask is None else _decode_runs(attention_mask, query.shape[0], kv_len)
        if runs is not None:
            import tfkernels

            out = tfkernels.kvcache_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              runs[0], cache_leftpad=runs[1], scale=scaling, softcap=softcap,
                                              backend=getattr(module, "_tfkernels_backend", None))
            return out, None
    out = _attention_fn()(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                          is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa, window_size=window,
                          softcap=softcap, document_ids=documents,
                          backend=getattr(module, "_tfkernels_backend", None))  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


# --------------------------------------------------------------------------------------------------
# Registration (cheap at import: deferred until transformers.modeling_utils is imported)
# --------------------------------------------------------------------------------------------------

_registered = False


def register() -> bool:
    """Register "tfkernels" with transformers' AttentionInterface (and SDPA-style masks for it in
    AttentionMaskInterface). Idempotent; returns False when transformers is not installed or too old.
    """
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
    except Exception:  # not installed, or older than the AttentionInterface API (4.48)
        return False
    AttentionInterface.register(ATTN_NAME, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except Exception:  # transformers < 4.53 builds SDPA masks for any non-eager implementation
        pass
    else:
        AttentionMaskInterface.register(ATTN_NAME, _make_mask_interface(sdpa_mask))
    _registered = True
    return True


_HOOK_TARGET = "transformers.modeling_utils"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs `register()` right after transformers.modeling_utils finishes importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOK_TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader = spec.loader
                orig = loader.exec_module

                def exec_module(module, _orig=orig):
                    _orig(module)
                    _remove_hook()
                    try:
                        register()
                    except Exception:  # never break the user's import of transformers
                        pass

                loader.exec_module = exec_module
                return spec
        return None


_hook: Optional[_RegisterOnImport] = None


def _remove_hook():
    global _hook
    if _hook is not None and _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    _hook = None


def install_import_hook() -> None:
    """Called by `import tfkernels`: register now if transformers' modeling code is already loaded,
    else as soon as it is, without importing transformers ourselves (it takes seconds)."""
    global _hook
    if _HOOK_TARGET in sys.modules:
        try:
            register()
        except Exception:
            pass
        return
    try:
        if importlib.util.find_spec("transformers") is None:
            return
    except Exception:
        return
    if _hook is None:
        _hook = _RegisterOnImport()
        sys.meta_path.insert(0, _hook)
