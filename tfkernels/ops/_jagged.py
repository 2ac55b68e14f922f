"""Row-wise ops (LayerNorm, RMSNorm, softmax) on nested tensors of the jagged layout.

A jagged nested tensor (B, j, ...) keeps its rows in one dense buffer, `values()` (total, ...),
with the ragged dim folded into the first; an op that reduces over trailing dims that are neither
the batch dim nor the ragged one is the same op on that buffer, row for row, as torch's own
F.layer_norm / F.rms_norm / softmax on nested tensors are. So these run the kernels on the buffer
and wrap the result with the same offsets (the result shares the input's ragged structure, and
autograd flows through both steps). Rows in the holes of a non-contiguous nested tensor (from
narrow()) are computed too and stay unused.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def trailing(x: Tensor, normalized_shape) -> tuple:
    """The dims a norm over `normalized_shape` reduces (an int or a sequence; else the norm's own
    check names the error: one dim is assumed here)."""
    n = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else 1
    return tuple(range(x.dim() - n, x.dim()))


def rowwise(x: Tensor, fn: Callable[[Tensor], Tensor], dims: tuple, op: str) -> Tensor:
    """fn(values) on x's buffer, wrapped like x. dims: the dims of x the op reduces over
    (non-negative); x's dim d is the buffer's dim d - 1."""
    if x.layout != torch.jagged:
        raise TypeError(f"{op}: x is a nested tensor with layout {x.layout}; tfkernels takes nested tensors with "
                        "layout=torch.jagged (or dense ones)")
    ragged = x._ragged_idx
    if 0 in dims or ragged in dims:
        raise ValueError(f"{op}: on a nested tensor of shape {tuple(x.shape)}, the dims it reduces over "
                         f"({sorted(dims)}) must not be the batch dim (0) or the ragged dim ({ragged})")
    out = fn(x.values())
    return torch.nested.nested_tensor_from_jagged(out, x.offsets(), lengths=x.lengths(), jagged_dim=ragged)
