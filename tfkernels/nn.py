"""Drop-in modules: same constructor arguments, parameters and state_dict keys as the torch modules
(they subclass them), so a checkpoint loads into either and `isinstance(m, torch.nn.LayerNorm)`
still holds. `from_torch(module)` wraps an existing module, reusing its Parameter objects.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops import layer_norm, rms_norm, softmax

__all__ = ["LayerNorm", "RMSNorm", "Softmax"]


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
        if not isinstance(module, nn.LayerNorm):
            raise TypeError(f"module must be a torch.nn.LayerNorm, got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = tuple(module.normalized_shape)
        new.eps = module.eps
        new.elementwise_affine = module.elementwise_affine
        new.weight = module.weight
        new.bias = module.bias
        new.backend = backend
        new.train(module.training)
        return new


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
        if not isinstance(module, nn.RMSNorm):
            raise TypeError(f"module must be a torch.nn.RMSNorm, got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = tuple(module.normalized_shape)
        new.eps = module.eps
        new.elementwise_affine = module.elementwise_affine
        new.weight = module.weight
        new.backend = backend
        new.train(module.training)
        return new


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
