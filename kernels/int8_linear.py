"""Weight-only INT8 linears on CPU: symmetric per-output-channel int8 weights, bf16 activations.

The weight is stored in the blocked layout Baton's kernel (csrc/cpu_ops.cpp linear_int8) reads:
[N/64][K/4][64 n][4 k] bytes holding q + 128 (as int8 bits), padded with q = 0 to whole blocks. 4 k of 16
columns are one VPDPBUSD operand, multiplied in integers with x cut into three signed bytes per
element (see the kernel): batch-invariant rows, half the bytes streamed per decode step. Measured
against torch's `_weight_int8pack_mm` in benchmarks/quant.py kernels (results in benchmarks/README.md),
which stays the fallback where the extension is missing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import cpu_ext
from .linear import Linear, LinearMethod, StoredWeight
from .quant import quantize_int8

if TYPE_CHECKING:
    from .int4_linear import Int4Data

NB = 64


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] -> the kernel's blocked layout of q + 128 (unsigned, as VPDPBUSD takes it; the
    pad is q = 0), flat, int8 bits."""
    N, K = q.shape
    Np, Kp = -(-N // NB) * NB, -(-K // 4) * 4
    padded = torch.full((Np, Kp), 128, dtype=torch.uint8)
    padded[:N, :K] = (q.to(torch.int16) + 128).to(torch.uint8)
    return padded.view(Np // NB, NB, Kp // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1).view(torch.int8)


def unpack_int8(blob: torch.Tensor, N: int, K: int) -> torch.Tensor:
    Np, Kp = -(-N // NB) * NB, -(-K // 4) * 4
    u = blob.view(torch.uint8).view(Np // NB, Kp // 4, NB, 4).permute(0, 2, 1, 3).reshape(Np, Kp)[:N, :K]
    return (u.to(torch.int16) - 128).to(torch.int8).contiguous()


def kernel_supported() -> bool:
    """Baton's int8 and int4 kernels run here (the extension, built with AVX512-BF16 and VNNI)."""
    return cpu_ext.available() and torch.ops.baton_cpu.quant_kernels_supported()


@dataclass
class Int8Weight:
    """A quantized [out, in] weight as a node publishes it: `qweight` int8 (the kernel's blocked
    layout when `packed`, plain [N, K] otherwise) and fp32 per-channel `scale` [N]."""

    qweight: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    packed: bool

    @classmethod
    def quantize(cls, w: torch.Tensor, packed: bool) -> Int8Weight:
        q, scale = quantize_int8(w)
        return cls(pack_int8(q) if packed else q, scale.float().contiguous(), tuple(w.shape), packed)

    def dequantize(self) -> torch.Tensor:
        q = unpack_int8(self.qweight, *self.shape) if self.packed else self.qweight
        return q.float() * self.scale[:, None]


class Int8Linear:
    """An Int8Weight (+ bias) ready to multiply: Baton's kernel for bf16 activations on a packed
    weight; torch's int8 GEMM (CPU) or the Triton kernel (CUDA) on a plain one."""

    __slots__ = ("w", "bias", "out_features", "in_features")

    def __init__(self, w: Int8Weight, bias: torch.Tensor | None) -> None:
        self.w, self.bias = w, bias
        self.out_features, self.in_features = w.shape

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        if w.packed and x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous():
            return torch.ops.baton_cpu.linear_int8(x, w.qweight, w.scale, self.out_features, self.in_features,
                                                   self.bias)
        if w.packed:
            return F.linear(x, w.dequantize().to(x.dtype), self.bias)
        from .quant import int8_linear

        return int8_linear(x, w.qweight, w.scale, self.bias)


class Int8LinearMethod(LinearMethod):
    """Weight-only INT8, quantized at load from the checkpoint's weights (any float dtype): every
    layer's GEMMs and the lm_head (measured on baton-tiny's held-out slice: +0.03% perplexity with the
    head quantized, against +0.01% without; at batch-1 decode on `medium` the bf16 head was 13% of
    the bytes an int8 step reads). The embedding lookup stays in the model's dtype. Packed for Baton's
    kernel when activations are bf16 on a CPU that runs it (the fused decode step then runs on the
    int8 weights too); plain [N, K] int8 otherwise (torch's int8 GEMM, Triton on CUDA)."""

    name = "int8"

    def __init__(self, dtype: torch.dtype, device: torch.device | str, head: LinearMethod | None = None) -> None:
        """head: the lm_head's method; None quantizes it too (a pre-quantized checkpoint's own float
        head keeps its float method)."""
        self.packed = torch.device(device).type == "cpu" and dtype == torch.bfloat16 and kernel_supported()
        self._head = head or self

    @property
    def head(self) -> LinearMethod:
        return self._head

    def process(self, weight: torch.Tensor | Int4Data | Int8Weight) -> StoredWeight:
        """A float weight is quantized; a checkpoint's int8 one (compressed-tensors W8A16) is packed."""
        if isinstance(weight, Int8Weight):
            if not self.packed or weight.packed:
                return weight
            return Int8Weight(pack_int8(weight.qweight), weight.scale.float().contiguous(), weight.shape, True)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"an int8 method cannot take a {type(weight).__name__}")
        w = Int8Weight.quantize(weight.cpu() if self.packed else weight, self.packed)
        return w if self.packed or weight.device.type == "cpu" else \
            Int8Weight(w.qweight.to(weight.device), w.scale.to(weight.device), w.shape, False)

    def create(self, weight: StoredWeight | Int4Data, bias: torch.Tensor | None = None) -> Linear:
        if isinstance(weight, torch.Tensor) or (isinstance(weight, Int8Weight) and weight.packed != self.packed):
            weight = self.process(weight)            # a private (unpublished) checkpoint weight
        if not isinstance(weight, Int8Weight):
            raise TypeError(f"an int8 linear cannot wrap a {type(weight).__name__}")
        return Int8Linear(weight, bias)

    def fused_decode_weight(self, lw: Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        return (lw.w.qweight, lw.w.scale, None) if isinstance(lw, Int8Linear) and lw.w.packed else None
