"""Linear layers. On CPU, bf16/fp16 weights are pre-packed once for oneDNN: measured here a
GEMV runs 2x faster than F.linear (the 32000x768 lm_head reaches ~40 GB/s instead of ~18)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LinearWeight:
    """A [out, in] weight (+ optional bias) prepared for the fast path of its device/dtype."""

    __slots__ = ("weight", "bias", "packed", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True,
                 keep_weight: bool = True) -> None:
        """keep_weight=False drops the plain tensor once packed (the model does: one copy in memory)."""
        self.weight = weight
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = None
        if pack and weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
            if torch.backends.mkldnn.is_available():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
                if not keep_weight:
                    self.weight = None


def linear_ref(x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
    return F.linear(x, w.weight, w.bias)


def linear(x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
    if w.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, w.packed, w.bias, "none", [], "")
    return F.linear(x, w.weight, w.bias)
