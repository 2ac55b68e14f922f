"""The ops' eager fast path: the same Python implementation, without torch.library's dispatch.

Every kernel op is a `torch.library.custom_op` (schema, fake implementation, autograd), which is
what torch.compile, torch.export, opcheck, functorch and tensor subclasses need. In plain eager mode
that registration costs host time on every call: argument normalisation against the schema, the
autograd wrapper's own autograd.Function, a dynamo-disable frame and a redispatch -- ~30 us of a
layer_norm forward with grad and ~25 us of its backward on the 2-core CI machine
(`python -m benchmarks.host_overhead`), as much as the launch of a small kernel, and on a GPU a
call whose host side outlasts its kernel is that slow (the H100 run's small-shape floors).

`op(name)` registers the custom op exactly as `torch.library.custom_op` does and returns an
`EagerOp` that the package calls instead of the op. Where nothing could observe the op -- plain
`torch.Tensor`/`nn.Parameter` arguments, no torch.compile/export tracing, no TorchDispatchMode or
TorchFunctionMode, no functorch transform, no TorchScript tracing -- it runs the implementation
itself, through a `torch.autograd.Function` built from the op's own `setup_context` and backward
(the functions given to `register_autograd`, not copies) when autograd needs a graph. Anywhere
else, and for keyword arguments, it calls the registered op. Both run the same code on the same
arguments; tests/test_eager.py checks the two give the same values and gradients and which path
each context takes. Under the autograd profiler the direct path keeps the op's name
(`record_function`), so a trace reads the same either way.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import Parameter

_C = torch._C
_PLAIN_TYPES = (Tensor, Parameter)


def plain(tensors) -> bool:
    """True when a call on `tensors` (None allowed) in the current context is plain eager: nothing
    -- a tracer, a mode, a transform, a subclass -- would see or need the registered op."""
    if (torch.compiler.is_compiling() or _C._len_torch_dispatch_stack() or _C._is_torch_function_mode_enabled()
            or _C._functorch.peek_interpreter_stack() is not None or _C._get_tracing_state() is not None):
        return False
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


class EagerOp:
    """A registered custom op (`self.op`) with an eager shortcut to its implementation (`self.impl`).

    Forwards `register_fake`, `register_autograd` and any other attribute to the custom op, so the
    op files register as they would on `torch.library.custom_op`'s result."""

    def __init__(self, name: str, impl: Callable, tags=()):
        kw = {"tags": tuple(tags)} if tags else {}
        self.op = torch.library.custom_op(name, impl, mutates_args=(), **kw)
        self.impl = impl
        self.name = name
        self._function: Optional[type] = None

    def register_fake(self, fn):
        return self.op.register_fake(fn)

    def register_autograd(self, backward, *, setup_context=None):
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        # the op's own setup_context and backward. forward(ctx, *args) calls setup_context itself:
        # autograd.Function's separate-setup_context style binds every call's arguments to the
        # forward's signature with inspect (~10 us), and the ctx calls are the same either way
        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(self.name.replace("::", "_"), (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })

    def __getattr__(self, attr):  # anything else (e.g. _opoverload) is the custom op's
        return getattr(self.op, attr)

    def __call__(self, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if kwargs or not plain(tensors):
            return self.op(*args, **kwargs)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if grad and self._function is None:  # no autograd formula: the registered op says what happens
            return self.op(*args)
        run = self._function.apply if grad else self.impl
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(self.name):
                return run(*args)
        return run(*args)


def op(name: str, tags=()) -> Callable[[Callable], EagerOp]:
    """Decorator: `torch.library.custom_op(name, mutates_args=(), tags=tags)` with the eager shortcut."""
    return lambda impl: EagerOp(name, impl, tags)
