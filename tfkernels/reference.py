"""Plain-PyTorch references: the "torch" backend, the tests' oracle and the benchmarks' eager
baseline. Readable over fast; every function computes in the input's dtype as PyTorch does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)


def _probe_rms_eps(dtype: torch.dtype) -> float:
    # a row whose mean square (1e-4) the two candidate eps values (bf16: 7.8e-3 vs 1.2e-7) tell apart
    x = torch.full((1, 1), 1e-2, dtype=dtype)
    want = F.rms_norm(x, (1,))
    candidates = (torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return next((e for e in candidates if torch.equal(F.rms_norm(x, (1,), eps=e), want)), candidates[0])


# rms_norm's eps=None, as the installed torch's F.rms_norm / nn.RMSNorm read it: torch 2.6 takes
# finfo(x.dtype).eps; later versions (2.11 and 2.13 checked) take float32's for fp16/bf16 inputs, the
# dtype they compute in. Probed once here (not inside a call, which torch.compile would trace), so
# that swap() of an nn.RMSNorm(eps=None) keeps its outputs on either.
RMS_NORM_DEFAULT_EPS = {torch.float16: _probe_rms_eps(torch.float16), torch.bfloat16: _probe_rms_eps(torch.bfloat16)}


def rms_norm_default_eps(dtype: torch.dtype) -> float:
    return RMS_NORM_DEFAULT_EPS.get(dtype) or torch.finfo(dtype).eps


def rms_norm(x, normalized_shape, weight=None, eps=None):
    # Written out (not F.rms_norm) so that float64 references of low-precision runs can be computed:
    # y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32 for low-precision inputs.
    if eps is None:
        eps = rms_norm_default_eps(x.dtype)
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


def softmax(x, dim=-1):
    return torch.softmax(x, dim=dim)


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              dropout_mask=None, window_size=None, softcap=0.0, return_lse=False, document_ids=None):
    """SDPA semantics written out, plus the extensions of `tfkernels.attention`: `attn_mask`
    combined with `is_causal`, a local `window_size=(left, right)` (-1 = unbounded; top-left aligned
    like is_causal: query i sees keys i - left .. i + right), `softcap` (scores
    softcap * tanh(scores / softcap) before the mask is added, as Gemma 2 does), and an explicit
    `dropout_mask` (keep = True) so tests can replay the kernel's dropout.

    Rows whose every key is masked return zeros (SDPA's math backend returns NaN there).
    return_lse: also return the rows' log-sum-exp of the (capped, masked) scores, before dropout,
    -inf for a row with no visible key; shape q.shape[:-1], in the scores' dtype.
    document_ids: a pair (q_ids, k_ids) of integer tensors (..., T_q), (..., T_k), broadcasting
    against q's dims before (H, T, D): query i sees key j only if q_ids[i] == k_ids[j] >= 0.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    keep = None
    if is_causal:
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
    left, right = window_size if window_size is not None else (-1, -1)
    if left >= 0 or right >= 0:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        win = ((j >= i - left) if left >= 0 else True) & ((j <= i + right) if right >= 0 else True)
        keep = win if keep is None else keep & win
    if document_ids is not None:
        q_ids, k_ids = document_ids
        docs = ((q_ids[..., :, None] == k_ids[..., None, :]) & (q_ids >= 0)[..., :, None]).unsqueeze(-3)
        keep = docs if keep is None else keep & docs
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    if Tk == 0:  # no keys: every row is empty and returns zeros (amax cannot reduce nothing)
        return (s @ v, s.new_full(s.shape[:-1], float("-inf"))) if return_lse else s @ v
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    denom = e.sum(-1, keepdim=True)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))  # and log(1) keeps empty rows' gradient finite
    p = e / safe
    lse = torch.where(denom > 0, row_max + torch.log(safe), float("-inf")).squeeze(-1)
    if dropout_p >= 1.0:  # everything dropped (SDPA gives zeros too)
        p = p * 0.0
    elif dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return (p @ v, lse) if return_lse else p @ v
