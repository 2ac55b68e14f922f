"""tfkernels: fused Transformer kernels for PyTorch.

    tfkernels.attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, *, backend=None)
    tfkernels.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                               dropout_p=0.0, scale=None, causal=False, window_size=None, softcap=0.0,
                               return_lse=False, backend=None)   # FlashAttention's varlen API
    tfkernels.kvcache_attention(q, k_cache, v_cache, cache_seqlens, k=None, v=None, *, block_table=None,
                                cache_batch_idx=None, scale=None, causal=False, window_size=None, softcap=0.0,
                                num_splits=0, return_lse=False, backend=None)   # decoding: split-KV, paged
    tfkernels.flash_attn_func, tfkernels.flash_attn_varlen_func       # flash_attn 2's signatures, (B, T, H, D)
    tfkernels.flash_attn_with_kvcache                                 # flash_attn's decoding API
    (and flash_attn's qkvpacked / kvpacked forms)
    tfkernels.softmax(x, dim=-1, *, backend=None)
    tfkernels.layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None)
    tfkernels.rms_norm(x, normalized_shape, weight=None, eps=None, *, backend=None)
    tfkernels.swap(model, ...) -> model
    with tfkernels.sdpa_override(): ...      # F.scaled_dot_product_attention -> tfkernels.attention

backend: "triton", "cuda", "torch" or None (automatic; TFKERNELS_BACKEND sets the default).
"""
from ._backend import BackendUnavailableError
from .ops import attention, kvcache_attention, layer_norm, rms_norm, softmax, varlen_attention
from . import nn, reference
from .swap import swap, unswap
from .flash_api import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                        flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                        flash_attn_with_kvcache)
from .functional import sdpa_override
from . import hf as _hf

_hf.install_import_hook()  # registers attn_implementation="tfkernels" once transformers loads

__version__ = "0.1.0"

__all__ = ["attention", "varlen_attention", "kvcache_attention", "flash_attn_func", "flash_attn_with_kvcache", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "layer_norm", "rms_norm", "softmax", "nn", "reference", "swap", "unswap", "sdpa_override", "BackendUnavailableError"]
