"""One module per op: kernels, launchers, torch.library registration, autograd, public function.

Importing this package registers every `tfkernels::` op (schemas, fake kernels, autograd).
"""
from .attention import attention
from .kvcache import kvcache_attention
from .layer_norm import layer_norm
from .rms_norm import rms_norm
from .softmax import softmax
from .varlen import varlen_attention

__all__ = ["attention", "kvcache_attention", "layer_norm", "rms_norm", "softmax", "varlen_attention"]
