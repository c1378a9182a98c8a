"""Linear layers. On CPU, bf16/fp16 weights are pre-packed once for oneDNN: measured here a
GEMV runs 2x faster than F.linear (the 32000x768 lm_head reaches ~40 GB/s instead of ~18).

A packed weight can also live outside torch's allocator: `PackedWeight` holds its bytes and
oneDNN's serialized memory descriptor, so a node packs once into shared memory and every stage
process wraps the same bytes (no private copies)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_ext


@dataclass
class PackedWeight:
    """A [out, in] weight in oneDNN's blocked layout for this CPU. `blob` (uint8) may view a shared
    file; `md` is the serialized oneDNN memory descriptor (uint8) that says how to read it."""

    blob: torch.Tensor
    md: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype


def can_share_packed(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` can be packed into bytes and wrapped again in another process."""
    return (dtype in (torch.bfloat16, torch.float16) and torch.backends.mkldnn.is_available()
            and cpu_ext.available())


def pack(weight: torch.Tensor) -> PackedWeight:
    """Packs a CPU [out, in] bf16/fp16 weight and copies oneDNN's buffer into plain bytes."""
    p = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    blob = torch.empty(torch.ops.mkldnn._nbytes(p), dtype=torch.uint8)
    ctypes.memmove(blob.data_ptr(), torch.ops.mkldnn.data_ptr(p), blob.numel())
    return PackedWeight(blob, torch.ops.mkldnn._get_mkldnn_serialized_md(p), tuple(weight.shape), weight.dtype)


class LinearWeight:
    """A [out, in] weight (+ optional bias) prepared for the fast path of its device/dtype."""

    __slots__ = ("weight", "bias", "packed", "out_features", "_blob")

    def __init__(self, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None, pack: bool = True,
                 keep_weight: bool = True) -> None:
        """keep_weight=False drops the plain tensor once packed (the model does: one copy in memory).
        A PackedWeight is wrapped as is (its blob must outlive this object; we keep a reference)."""
        self.bias = bias
        self._blob = None
        if isinstance(weight, PackedWeight):
            if not cpu_ext.available():
                raise RuntimeError("a oneDNN-packed weight needs the baton CPU extension (BATON_CPU_EXT=0 is set "
                                   "or it failed to build); publish plain weights instead")
            self.weight, self._blob, self.out_features = None, weight.blob, weight.shape[0]
            self.packed = torch.ops.baton_cpu.mkldnn_from_blob(weight.blob, list(weight.shape), weight.dtype,
                                                               weight.md)
            return
        self.weight = weight
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
