"""swap(model): run an existing PyTorch or Hugging Face model on tfkernels, in place.

    model = tfkernels.swap(model)        # norms, softmax and attention now run on tfkernels
    tfkernels.unswap(model)              # the original modules and attention implementation again

What is replaced (each new module shares the old one's Parameter objects, so optimizers,
`state_dict` keys, `save_pretrained` and checkpoint loading are unaffected):
  - torch.nn.LayerNorm / RMSNorm          -> tfkernels.nn.LayerNorm / RMSNorm
  - Hugging Face RMSNorms (Llama-, Gemma-, T5-style; see tfkernels.hf) -> exact tfkernels equivalents
  - torch.nn.Softmax                      -> tfkernels.nn.Softmax
  - torch.nn.MultiheadAttention           -> tfkernels.nn.MultiheadAttention; the PyTorch fused fast
    paths of nn.TransformerEncoder(Layer) that would bypass the modules are switched off
  - Hugging Face models: attention implementation -> "tfkernels" (tfkernels.hf.attention_forward)
  - torch.nn.functional.scaled_dot_product_attention, called by the model's own code: routed to
    tfkernels.attention during each forward of `model` (hooks on it enter
    `tfkernels.sdpa_override(backend)`; see tfkernels.functional for the rules)
Only modules whose class is exactly the torch one (or one whose `forward` is not overridden) are
replaced; anything else is left alone, and so are modules with a parametrization (its weight is
computed at every access: a replacement would freeze it) or a `forward` set on the instance (e.g.
accelerate's offloading hooks). Hooks registered on a replaced module (forward, pre-forward,
backward, state_dict) stay registered: the replacement shares the module's hook tables, so they
keep firing and their handles still remove them. unswap puts back the very same module objects.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

from torch import nn
from torch.nn.utils import parametrize

from . import _config, functional, hf
from . import nn as tnn

__all__ = ["swap", "unswap"]

logger = logging.getLogger("tfkernels.swap")

_STATE = "_tfkernels_swap_state"  # plain attribute on the model: not a module, not in state_dict


def _plain(module: nn.Module, cls: type) -> bool:
    """`module` is a `cls` whose forward is `cls.forward` (subclasses that change forward are not ours)."""
    return isinstance(module, cls) and type(module).forward is cls.forward and not type(module).__module__.startswith("tfkernels")


# the hook tables nn.Module.__init__ creates (torch 2.6 to 2.13): shared, not copied, with the
# replacement, so that a RemovableHandle taken on the original still removes its hook
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
                "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def _share_hooks(old: nn.Module, new: nn.Module) -> None:
    for name in _HOOK_TABLES:
        if name in old.__dict__:
            new.__dict__[name] = old.__dict__[name]


def _left_alone(module: nn.Module) -> Optional[str]:
    """Why a module of a replaceable class must stay as it is, or None."""
    if parametrize.is_parametrized(module):
        return "it has a parametrization (torch.nn.utils.parametrize)"
    if "forward" in module.__dict__:
        return "its forward is set on the instance (e.g. by accelerate's hooks)"
    return None


def _qualname(cls: type) -> str:
    mod = cls.__module__
    if mod.startswith("torch.nn.modules."):
        mod = "torch.nn"  # torch.nn.modules.normalization.LayerNorm -> torch.nn.LayerNorm
    return f"{mod}.{cls.__qualname__}"


def _mha_class():
    return getattr(tnn, "MultiheadAttention", None)


def _replacement(module: nn.Module, *, norms: bool, softmax: bool, attention: bool, backend) -> Optional[nn.Module]:
    new = _new_module(module, norms=norms, softmax=softmax, attention=attention, backend=backend)
    if new is None:
        return None
    why = _left_alone(module)
    if why is not None:
        logger.warning("tfkernels.swap: leaving a %s as it is: %s", type(module).__name__, why)
        return None
    _share_hooks(module, new)
    return new


def _new_module(module: nn.Module, *, norms: bool, softmax: bool, attention: bool, backend) -> Optional[nn.Module]:
    if norms:
        if _plain(module, nn.LayerNorm):
            return tnn.LayerNorm.from_torch(module, backend=backend)
        if hasattr(nn, "RMSNorm") and _plain(module, nn.RMSNorm):
            return tnn.RMSNorm.from_torch(module, backend=backend)
        if hf.hf_norm_kind(module) is not None:
            return hf.from_hf_norm(module, backend=backend)
    if softmax and _plain(module, nn.Softmax):
        return tnn.Softmax.from_torch(module, backend=backend)
    if attention and _plain(module, nn.MultiheadAttention):
        mha = _mha_class()
        if mha is None:
            logger.warning("tfkernels.swap: tfkernels.nn.MultiheadAttention is not available; leaving %s",
                           type(module).__name__)
            return None
        return mha.from_torch(module, backend=backend)
    return None


def _is_hf_model(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "_attn_implementation") and hasattr(model, "get_input_embeddings")


def _hf_configs(model: nn.Module) -> list:
    """Every distinct HF config reachable from the model's modules (sub-models may have their own)."""
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def _set_attn_impl(cfg, value) -> None:
    if hasattr(cfg, "_attn_implementation_internal"):
        cfg._attn_implementation_internal = value
    else:
        cfg._attn_implementation = value


def swap(model: nn.Module, *, norms: bool = True, softmax: bool = True, attention: bool = True,
         backend: Optional[str] = None, return_report: bool = False):
    """Replace `model`'s norms, softmax and attention with tfkernels ones, in place.

    Args:
        model: any nn.Module; Hugging Face PreTrainedModels also get attn_implementation="tfkernels".
        norms / softmax / attention: which kinds of layers to replace.
        backend: "triton", "cuda", "torch" or None (automatic), for every replaced layer.
        return_report: also return the list of (qualified name, old class, new class).

    Returns:
        `model`, or `(model, report)` with return_report=True. The report is also logged (INFO).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = _config.check_backend(backend)  # here, not at the first forward
    state = getattr(model, _STATE, None)
    if state is None:
        state = {"modules": [], "configs": [], "flags": [], "backend_attrs": [], "hooks": []}
    report: List[Tuple[str, str, str]] = []

    # 1. module replacement; a module object used in several places gets one replacement
    new_for: dict = {}
    targets = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if child is None:
                continue
            qual = f"{parent_name}.{name}" if parent_name else name
            if id(child) not in new_for:
                new_for[id(child)] = _replacement(child, norms=norms, softmax=softmax, attention=attention,
                                                  backend=backend)
            new = new_for[id(child)]
            if new is not None:
                targets.append((parent, name, child, new, qual))
    for parent, name, old, new, qual in targets:
        parent._modules[name] = new
        state["modules"].append((parent, name, old))
        report.append((qual, _qualname(type(old)), _qualname(type(new))))

    # 2. PyTorch's fused encoder fast paths call torch._transformer_encoder_layer_fwd with the raw
    #    weights, bypassing the (now tfkernels) submodules: switch them off where we replaced anything.
    swapped_ids = {id(new) for _, _, _, new, _ in targets}
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(id(c) in swapped_ids for c in m.modules()):
            if m.activation_relu_or_gelu:  # the only fast-path condition that changes nothing else
                state["flags"].append((m, "activation_relu_or_gelu", m.activation_relu_or_gelu))
                m.activation_relu_or_gelu = 0
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            if any(id(c) in swapped_ids for c in m.modules()):
                state["flags"].append((m, "use_nested_tensor", m.use_nested_tensor))
                m.use_nested_tensor = False  # nested-tensor inputs would need the fast path

    # 3. Hugging Face attention implementation
    if attention and _is_hf_model(model):
        if not hf.register():
            raise RuntimeError("tfkernels.swap: this model looks like a Hugging Face model but "
                               "transformers' AttentionInterface could not be imported")
        configs = _hf_configs(model)
        before = [(cfg, cfg._attn_implementation) for cfg in configs]
        if all(old == hf.ATTN_NAME for _, old in before):
            pass
        else:
            if hasattr(model, "set_attn_implementation"):
                # validates that the model dispatches through AttentionInterface (warns and leaves it if not)
                model.set_attn_implementation(hf.ATTN_NAME)
            else:  # older transformers: set the configs directly
                for cfg in configs:
                    _set_attn_impl(cfg, hf.ATTN_NAME)
            changed = [(cfg, old) for cfg, old in before if old != hf.ATTN_NAME and cfg._attn_implementation == hf.ATTN_NAME]
            state["configs"].extend(changed)
            if changed:
                old_names = sorted({str(old) for _, old in changed})
                report.append(("", f"attn_implementation={'/'.join(old_names)}", f"attn_implementation={hf.ATTN_NAME}"))
            else:
                logger.warning("tfkernels.swap: %s kept attn_implementation=%s (it does not dispatch through "
                               "transformers' AttentionInterface)", type(model).__name__, before[0][1] if before else None)
        for m in model.modules():  # the backend the attention function uses for this model
            if hasattr(m, "config") and not hasattr(m, "get_input_embeddings"):
                state["backend_attrs"].append((m, m.__dict__.get("_tfkernels_backend", _MISSING)))
                m._tfkernels_backend = backend

    # 4. F.scaled_dot_product_attention in the model's own code: routed while its forward runs (the
    #    post hook runs even when the forward raises). A second swap replaces the first's hooks.
    for handle in state.get("hooks", ()):
        handle.remove()
    state["hooks"] = []
    if attention:
        state["hooks"] = [model.register_forward_pre_hook(lambda m, args: functional._enter(backend)),
                          model.register_forward_hook(lambda m, args, out: functional._exit(), always_call=True)]

    object.__setattr__(model, _STATE, state)
    for qual, old, new in report:
        logger.info("tfkernels.swap: %s: %s -> %s", qual or "<model>", old, new)
    if not report:
        logger.info("tfkernels.swap: nothing to replace in %s", type(model).__name__)
    return (model, report) if return_report else model


class _Missing:
    pass


_MISSING = _Missing()


def unswap(model: nn.Module) -> nn.Module:
    """Undo every `swap` on `model`: the original module objects and attention implementation come
    back, so outputs are bit-identical to before the swap. A model never swapped is returned as is."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for handle in state.get("hooks", ()):
        handle.remove()
    for parent, name, old in reversed(state["modules"]):
        parent._modules[name] = old
    for m, attr, value in reversed(state["flags"]):
        setattr(m, attr, value)
    for cfg, value in reversed(state["configs"]):
        _set_attn_impl(cfg, value)
    for m, value in reversed(state["backend_attrs"]):
        if value is _MISSING:
            m.__dict__.pop("_tfkernels_backend", None)
        else:
            m._tfkernels_backend = value
    logger.info("tfkernels.unswap: restored %d modules in %s", len(state["modules"]), type(model).__name__)
    return model
