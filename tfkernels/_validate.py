"""Argument checks shared by the public functions: clear ValueError/TypeError naming the argument."""
from __future__ import annotations

import weakref
from typing import Optional

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # the kernels index memory through sizes and strides: a nested (jagged) or sparse tensor has
    # neither, and failed deep inside with torch's own view/matmul errors
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor; tfkernels takes it only as the input of attention, softmax "
                        "and the norms (layout=torch.jagged); elsewhere, dense tensors")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; tfkernels takes dense (strided) tensors")


def check_optional_tensors(**tensors) -> None:
    """check_tensor on each argument that is given: before the backend is chosen, so that a nested or
    sparse weight gets its own error rather than one about the device a kernel backend needs."""
    for name, t in tensors.items():
        if t is not None:
            check_tensor(t, name)


def check_float(t: torch.Tensor, name: str, backend: str) -> None:
    """Kernels take fp16/bf16/fp32; the torch reference takes any floating dtype."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16 or float32), got {t.dtype}")
    if backend != "torch" and t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; backend {backend!r} supports float16, bfloat16 and float32 "
            "(use backend='torch' for other dtypes)"
        )


def check_same_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device")


def normalize_shape(normalized_shape, name: str = "normalized_shape") -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    if isinstance(normalized_shape, torch.Size) or isinstance(normalized_shape, (list, tuple)):
        shape = tuple(int(s) for s in normalized_shape)
        if len(shape) == 0:
            raise ValueError(f"{name} must name at least one dimension, got {normalized_shape!r}")
        return shape
    raise TypeError(f"{name} must be an int or a sequence of ints, got {type(normalized_shape).__name__}")


def check_norm_args(x, normalized_shape, weight, bias, backend: str, op: str) -> tuple:
    check_tensor(x, "x")
    check_float(x, "x", backend)
    shape = normalize_shape(normalized_shape)
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{op}: normalized_shape={list(shape)} must match the trailing dimensions of x, "
            f"but x has shape {list(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(t, name)
        check_float(t, name, backend)
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {list(t.shape)}, expected normalized_shape {list(shape)}")
    check_same_device(x, "x", weight=weight, bias=bias)
    return shape


def check_dim(dim, ndim: int, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    if not lo <= dim <= hi:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimensions (expected [{lo}, {hi}])")
    return dim % max(ndim, 1)


# (id(tensor), kind) -> (a weak reference to it, its _version or None, a value derived from it); keyed
# by id because tensors compare elementwise, and dropped when the tensor is freed
_MEMO: dict = {}
_MISS = object()


def remember(t: torch.Tensor, kind: str, value, frozen: bool = False, partner: Optional[torch.Tensor] = None):
    """Record value as `per_version(t, kind, ..., partner=partner)`'s result for t (and partner) as they
    are now. frozen: t is never changed in place (an internal tensor, or an inference tensor the caller
    vouches for): kept without a version, so inference tensors (which have none) are remembered too."""
    if frozen or not t.is_inference():
        key = (id(t), kind, None if partner is None else id(partner))
        _MEMO[key] = (weakref.ref(t, lambda _, key=key: _MEMO.pop(key, None)), None if frozen else t._version, value,
                      None if partner is None else (weakref.ref(partner), _version(partner)))
    return value


def per_version(t: torch.Tensor, kind: str, fn, frozen: bool = False, partner: Optional[torch.Tensor] = None):
    """fn(t), computed once per tensor and version (see `remember`): a model hands the same offsets,
    lengths or mask to every layer, so the later layers find the result here; an in-place change bumps
    the version and computes it again. An inference tensor that is not frozen: every time.
    partner: a second tensor the result depends on; it must be the same tensor at the same version."""
    hit = _MEMO.get((id(t), kind, None if partner is None else id(partner)))
    if (hit is not None and hit[0]() is t and (hit[1] is None or (not t.is_inference() and hit[1] == t._version))
            and (partner is None or (hit[3][0]() is partner and hit[3][1] == _version(partner)))):
        return hit[2]
    return remember(t, kind, fn(t), frozen, partner)


def _version(t: torch.Tensor):
    """t's version counter, None for an inference tensor (which has none: an in-place change is not seen)."""
    return None if t.is_inference() else t._version


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph captures on t's device's current stream: no host read of a device value
    may happen then (it raises), and nothing computed must be reused across replays."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def eager_memo(t: torch.Tensor, kind, fn, partner: Optional[torch.Tensor] = None):
    """per_version(t, kind, fn, partner=partner) for device work an eager model repeats in every layer
    (document ids' conversion and ranges), else fn(t): while torch.compile traces (the memo is Python
    state the graph must not depend on) and while a CUDA graph captures (the captured graph must hold
    the work, or a replay on new values in the same tensor would reuse the old result)."""
    if torch.compiler.is_compiling() or capturing(t):
        return fn(t)
    return per_version(t, kind, fn, partner=partner)


def host_values(t: torch.Tensor) -> list:
    """t.tolist() (a device sync), read once per tensor and version (`per_version`), so the later
    layers queue their kernels without waiting."""
    return per_version(t, "host", lambda x: x.tolist())


def remember_host_values(t: torch.Tensor, values: list) -> list:
    """Record values as the host copy of t, a tensor made on the device from them and never changed in
    place: `host_values(t)` then never reads it back (inference tensors too)."""
    return remember(t, "host", values, frozen=True)
