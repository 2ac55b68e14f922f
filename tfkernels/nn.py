"""Drop-in modules: same constructor arguments, parameters and state_dict keys as the torch modules
(they subclass them), so a checkpoint loads into either and `isinstance(m, torch.nn.LayerNorm)`
still holds. `from_torch(module)` wraps an existing module, reusing its Parameter objects.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import torch.nn.functional as F

from .ops import attention, layer_norm, rms_norm, softmax

__all__ = ["LayerNorm", "RMSNorm", "Softmax", "MultiheadAttention"]


def _wrap_norm(cls, torch_cls, module, backend, attrs):
    """Build `cls` around `module` without __init__: the same attributes and Parameter objects."""
    if not isinstance(module, torch_cls):
        raise TypeError(f"module must be a torch.nn.{torch_cls.__name__}, got {type(module).__name__}")
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name in attrs:  # Parameters (or None) go through Module.__setattr__ and register as such
        setattr(new, name, getattr(module, name))
    new.normalized_shape = tuple(new.normalized_shape)
    new.backend = backend
    new.train(module.training)
    return new


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` running on tfkernels. Extra keyword: `backend`."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)

    @classmethod
    def from_torch(cls, module: nn.LayerNorm, *, backend: Optional[str] = None) -> "LayerNorm":
        """A tfkernels LayerNorm sharing `module`'s Parameter objects (no copy)."""
        return _wrap_norm(cls, nn.LayerNorm, module, backend, ("normalized_shape", "eps", "elementwise_affine", "weight", "bias"))


class RMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` running on tfkernels. Extra keyword: `backend`."""

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend)

    @classmethod
    def from_torch(cls, module: nn.RMSNorm, *, backend: Optional[str] = None) -> "RMSNorm":
        """A tfkernels RMSNorm sharing `module`'s Parameter objects (no copy)."""
        return _wrap_norm(cls, nn.RMSNorm, module, backend, ("normalized_shape", "eps", "elementwise_affine", "weight"))


def _legacy_softmax_dim(ndim: int) -> int:
    # torch.nn.Softmax(dim=None) keeps the old implicit choice (torch.nn.functional._get_softmax_dim)
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(nn.Softmax):
    """`torch.nn.Softmax` running on tfkernels. Extra keyword: `backend`."""

    def __init__(self, dim: Optional[int] = None, *, backend: Optional[str] = None):
        super().__init__(dim)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim is not None else _legacy_softmax_dim(x.dim())
        return softmax(x, dim, backend=self.backend)

    @classmethod
    def from_torch(cls, module: nn.Softmax, *, backend: Optional[str] = None) -> "Softmax":
        if not isinstance(module, nn.Softmax):
            raise TypeError(f"module must be a torch.nn.Softmax, got {type(module).__name__}")
        new = cls(module.dim, backend=backend)
        new.train(module.training)
        return new


def _mha_mask_to_sdpa(mask: Optional[torch.Tensor], allowed: dict, name: str,
                      convert: bool = True) -> Optional[torch.Tensor]:
    """torch.nn.MultiheadAttention's mask convention -> tfkernels.attention's, as a 4-D view.

    `allowed` maps each shape torch accepts for the mask to its 4-D view: a mask of another shape
    is an error (viewing any mask with the right number of elements would silently scramble, say,
    a (S, B) key_padding_mask). MHA: a bool mask is True where attention is NOT allowed; a float
    mask is added. SDPA (and tfkernels.attention): a bool mask is True where attention IS allowed.
    convert=False: check only, return None (a mask the kernel replaces, under the is_causal hint).
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    shape4 = allowed.get(tuple(mask.shape))
    if shape4 is None:
        raise ValueError(f"{name} must have shape {' or '.join(str(a) for a in allowed)}, got {tuple(mask.shape)}")
    if not convert:
        return None
    mask = mask.reshape(shape4)
    return ~mask if mask.dtype == torch.bool else mask


def _merge_masks(a: Optional[torch.Tensor], b: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    to_float = lambda m: m if m.is_floating_point() else torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))  # noqa: E731
    return to_float(a).to(dtype) + to_float(b).to(dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` whose attention runs on `tfkernels.attention`.

    Same constructor (plus keyword `backend`), parameters and state_dict keys; a subclass, so
    checkpoints load either way. The fused path covers batch_first or not, batched or unbatched
    input, kdim/vdim, bias, `key_padding_mask` and `attn_mask` (bool or float; 2-D (L, S) or 3-D
    (B*num_heads, L, S); bool True = not allowed, as in torch), `is_causal` (a hint, as in torch:
    attn_mask must be given and is then replaced by the kernel's causal masking), and dropout in
    training mode.

    Falls back to torch's own implementation (`super().forward`) when `need_weights=True` (the
    fused kernel never forms the attention weights; note that torch's default is True, so pass
    need_weights=False to get the fused path), and when `add_bias_kv` or `add_zero_attn` is set.

    A query whose every key is masked gives 0 before out_proj (torch gives NaN).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (need_weights or self.bias_k is not None or self.add_zero_attn
                or query.is_nested or key.is_nested or value.is_nested):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        batched = query.dim() == 3
        if batched and not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))  # (B, T, E)
        elif not batched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))  # (1, T, E)
        B, L, E = query.shape
        S = key.shape[1]
        H, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
        k = F.linear(key, w_k, b_k).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
        v = F.linear(value, w_v, b_v).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
        kpm = _mha_mask_to_sdpa(key_padding_mask, {(B, S) if batched else (S,): (B, 1, 1, S)}, "key_padding_mask")
        # (B*H, L, S) is (H, L, S) for unbatched input (B = 1), as in torch
        # with the is_causal hint, attn_mask is the causal mask: checked, then left to the kernel
        am = _mha_mask_to_sdpa(attn_mask, {(L, S): (1, 1, L, S), (B * H, L, S): (B, H, L, S)}, "attn_mask",
                               convert=not is_causal)
        mask = _merge_masks(am, kpm, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        out = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                        backend=self.backend)  # (B, H, L, hd)
        out = out.transpose(1, 2).reshape(B, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, backend: Optional[str] = None) -> "MultiheadAttention":
        """A tfkernels MultiheadAttention sharing `module`'s Parameter objects and out_proj (no copy)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            setattr(new, attr, getattr(module, attr))
        for name, p in module._parameters.items():
            new.register_parameter(name, p)
        for name in ("bias_k", "bias_v"):  # plain None attributes when add_bias_kv=False
            if name not in new._parameters:
                setattr(new, name, getattr(module, name))
        new.out_proj = module.out_proj
        new.backend = backend
        new.train(module.training)
        return new
