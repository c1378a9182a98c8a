"""Ops the engine calls. Each op module has a torch reference (`*_ref`) and the fast path for
the tensor's device; the public function dispatches. GPU (Triton-language) kernels plug in here
behind the same signatures, so the engine never calls an implementation directly."""

if __name__ != "baton.kernels":   # one name per module: `import kernels` from the repository root would load a second copy
    raise ImportError(f"import this package as baton.kernels, not {__name__}")


from .activation import silu_and_mul
from .attention import (
    AttentionBatch,
    DecodeMeta,
    PrefillMeta,
    decode_attention,
    paged_attention,
    prefill_attention,
)
from .kv_cache import store_kv
from .linear import LinearWeight, linear
from .norm import add_rms_norm, rms_norm
from .rotary import RotaryCache, apply_rotary, qk_norm_rope_

__all__ = [
    "AttentionBatch",
    "DecodeMeta",
    "LinearWeight",
    "PrefillMeta",
    "RotaryCache",
    "add_rms_norm",
    "apply_rotary",
    "decode_attention",
    "linear",
    "paged_attention",
    "prefill_attention",
    "qk_norm_rope_",
    "rms_norm",
    "silu_and_mul",
    "store_kv",
]
