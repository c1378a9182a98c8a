"""Linear layers. On CPU, bf16/fp16 weights are pre-packed once in oneDNN's blocked layout: measured
here a GEMV on packed weights runs 2x faster than F.linear (the 32000x768 lm_head reaches ~40 GB/s
instead of ~18).

A packed weight can also live outside torch's allocator: `PackedWeight` holds its bytes and
oneDNN's serialized memory descriptor, so a node packs once into shared memory and every stage
process wraps the same bytes (no private copies).

bf16 matmuls of any batch size then run the C++ kernel `linear_packed_bf16` over those bytes, not
oneDNN: each output element is one fixed accumulation chain over k, so a token's row is bit-identical
whether it runs alone, in a decode batch of 30 or as the tail of a prompt after a cached prefix. (oneDNN
splits K by shape; its rows drift by an ulp with the batch size, which flips greedy tokens of bf16
models: prefix caching changed outputs.) It is also faster here: 1.9x oneDNN at 1 row, 1.3x at 12,
0.95-1.04x from 128 to 512 rows (small's layer shapes, 2 threads; benchmarks/cpu_kernels.py). The kernel reads oneDNN's blocked layout
directly, so `pack_weight` checks that layout on the weight's own values first; any other layout
(another CPU) keeps oneDNN for every batch size, and gives up that invariance."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import cpu_ext

if TYPE_CHECKING:
    from baton.backends.loader.quantized import QuantConfig

    from .int4_linear import Int4Data, Int4Linear
    from .int8_linear import Int8Linear, Int8Weight

# oneDNN's bf16 weight blocking that linear_packed_bf16 reads: [N/64][K/32][16 k-pairs][64 n][2 k].
PACKED_LAYOUT = "n64k32p2"
_NB, _KB = 64, 32


@dataclass
class PackedWeight:
    """A [out, in] weight in oneDNN's blocked layout for this CPU. `blob` (uint8) may view a shared
    file; `md` is the serialized oneDNN memory descriptor (uint8) that says how to read it; `layout`
    is PACKED_LAYOUT when the bytes were checked to follow it ("" otherwise)."""

    blob: torch.Tensor
    md: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    layout: str = ""


_onednn_ok: dict[torch.dtype, bool] = {}


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU (fp16 needs AVX512-FP16 or AVX-NE-CONVERT;
    asked once by packing a tiny weight)."""
    if dtype not in (torch.bfloat16, torch.float16) or not torch.backends.mkldnn.is_available():
        return False
    if dtype not in _onednn_ok:
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
            _onednn_ok[dtype] = True
        except RuntimeError:
            _onednn_ok[dtype] = False
    return _onednn_ok[dtype]


def can_share_packed(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` can be packed into bytes and wrapped again in another process."""
    return onednn_packs(dtype) and cpu_ext.available()


def _packed_positions(n: torch.Tensor, k: torch.Tensor, K: int) -> torch.Tensor:
    """Element offsets of W[n, k] in the PACKED_LAYOUT blocking."""
    kblocks = -(-K // _KB)
    return ((n // _NB) * (kblocks * _KB * _NB) + (k // _KB) * (_KB * _NB) + ((k % _KB) // 2) * (_NB * 2)
            + (n % _NB) * 2 + (k % 2))


def _follows_packed_layout(weight: torch.Tensor, blob: torch.Tensor) -> bool:
    """Samples W[n, k] (the four corners and 4096 random elements) at their PACKED_LAYOUT offsets."""
    N, K = weight.shape
    if weight.dtype != torch.bfloat16 or blob.numel() < 2 * (-(-N // _NB)) * (-(-K // _KB)) * _NB * _KB:
        return False
    g = torch.Generator().manual_seed(0)
    n = torch.cat([torch.tensor([0, 0, N - 1, N - 1]), torch.randint(0, N, (4096,), generator=g)])
    k = torch.cat([torch.tensor([0, K - 1, 0, K - 1]), torch.randint(0, K, (4096,), generator=g)])
    got = blob.view(torch.int16)[_packed_positions(n, k, K)]
    return bool(torch.equal(got, weight.view(torch.int16)[n, k]))


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """Packs a CPU [out, in] bf16/fp16 weight and copies oneDNN's buffer into plain bytes."""
    weight = weight.contiguous()
    p = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    blob = torch.empty(torch.ops.mkldnn._nbytes(p), dtype=torch.uint8)
    ctypes.memmove(blob.data_ptr(), torch.ops.mkldnn.data_ptr(p), blob.numel())
    layout = PACKED_LAYOUT if _follows_packed_layout(weight, blob) else ""
    return PackedWeight(blob, torch.ops.mkldnn._get_mkldnn_serialized_md(p), tuple(weight.shape), weight.dtype,
                        layout)


def _kernel_supported() -> bool:
    return cpu_ext.available() and torch.ops.baton_cpu.packed_bf16_supported()


# fp32 matmuls of up to this many rows run Baton's kernel (csrc/cpu_ops.cpp linear_f32): measured on an
# AVX2 Zen 2 over the small VL model's layers, 1.4x F.linear at 1 row, 1.5-1.8x at 2-4, 1.02x at 64 and
# 0.96x at 128 (one thread; 2.4-2.9x at 1-4 rows on two, where MKL ran them on one); F.linear above.
F32_KERNEL_ROWS = 64


def _f32_kernel_supported() -> bool:
    return cpu_ext.available() and torch.ops.baton_cpu.linear_f32_supported()


def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bf16, fp16) natively. Without it torch's GEMMs convert
    element by element: a bf16 F.linear ran 13x slower than fp32 on an AVX2 host (AMD Zen 2)."""
    try:
        if dtype == torch.bfloat16:
            return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        if dtype == torch.float16:
            return torch.cpu._is_amx_fp16_supported()
    except AttributeError:                        # another torch: assume it is
        pass
    return True


def _bf16_kernel_supported() -> bool:
    """linear_bf16 where torch has no fast bf16 GEMM and Baton's kernel builds (AVX2 + FMA)."""
    return _f32_kernel_supported() and not native_half_matmul(torch.bfloat16)


class LinearWeight:
    """A [out, in] weight (+ optional bias) prepared for the fast path of its device/dtype."""

    __slots__ = ("weight", "bias", "packed", "out_features", "in_features", "direct", "f32", "bf16", "_blob")

    def __init__(self, weight: StoredWeight | Int4Data, bias: torch.Tensor | None = None,
                 pack: bool = True, keep_weight: bool = True) -> None:
        """keep_weight=False drops the plain tensor once packed (the model does: one copy in memory).
        A PackedWeight is wrapped as is (its blob must outlive this object; we keep a reference)."""
        if not isinstance(weight, (torch.Tensor, PackedWeight)):
            raise TypeError(f"a float linear cannot wrap a {type(weight).__name__} (a quantized weight needs its "
                            "quantization's method)")
        self.bias = bias
        self._blob = None
        self.direct = False
        self.f32 = self.bf16 = False
        self.out_features, self.in_features = weight.shape
        if isinstance(weight, PackedWeight):
            self._wrap(weight)
            return
        self.weight = weight
        self.packed = None
        self.f32 = (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous()
                    and (bias is None or bias.dtype == torch.float32) and _f32_kernel_supported())
        if pack and weight.device.type == "cpu" and onednn_packs(weight.dtype):
            if can_share_packed(weight.dtype):          # our own bytes: the batch-1 kernel can read them
                self._wrap(pack_weight(weight))
                self.weight = weight if keep_weight else None
            else:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
                if not keep_weight:
                    self.weight = None
        # bf16 left unpacked (oneDNN packs it only with AVX-512) on a CPU without native bf16 GEMMs
        self.bf16 = (self.packed is None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                     and weight.is_contiguous() and (bias is None or bias.dtype == torch.bfloat16)
                     and _bf16_kernel_supported())

    def _wrap(self, pw: PackedWeight) -> None:
        if not cpu_ext.available():
            raise RuntimeError("a oneDNN-packed weight needs the baton CPU extension (BATON_CPU_EXT=0 is set "
                               "or it failed to build); publish plain weights instead")
        self.weight, self._blob = None, pw.blob
        self.packed = torch.ops.baton_cpu.mkldnn_from_blob(pw.blob, list(pw.shape), pw.dtype, pw.md)
        self.direct = pw.layout == PACKED_LAYOUT and _kernel_supported()


def linear_ref(x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
    return F.linear(x, w.weight, w.bias)


# A linear weight as a node stores it (weight_store), and as a process multiplies it.
StoredWeight = "torch.Tensor | PackedWeight | Int8Weight | Int4Packed | Int4Weight"
Linear = "LinearWeight | Int8Linear | Int4Linear"


def linear(x: torch.Tensor, w: LinearWeight | Int8Linear | Int4Linear) -> torch.Tensor:
    if not isinstance(w, LinearWeight):       # a quantized weight multiplies itself
        return w.apply(x)
    if w.direct and x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous():
        return torch.ops.baton_cpu.linear_packed_bf16(x, w._blob, w.out_features, w.in_features, w.bias)
    if w.f32 and x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] <= F32_KERNEL_ROWS and x.is_contiguous():
        return torch.ops.baton_cpu.linear_f32(x, w.weight, w.bias)
    if w.bf16 and x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous():
        return torch.ops.baton_cpu.linear_bf16(x, w.weight, w.bias)
    if w.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, w.packed, w.bias, "none", [], "")
    return F.linear(x, w.weight, w.bias)


class LinearMethod:
    """How a model's linear layers store and multiply their weights, chosen once at load
    (`select_linear_method`) instead of special cases in the loader: `process` turns a checkpoint
    weight into what a node publishes in its shared weight file, `create` wraps a published (or
    private) weight for this process. This base method is plain F.linear on the tensor as it is;
    `head` is the method of the lm_head (a pre-quantized checkpoint's own, usually unquantized)."""

    name = "plain"

    @property
    def head(self) -> LinearMethod:
        return self

    def process(self, weight: torch.Tensor | Int4Data | Int8Weight) -> StoredWeight:
        return weight

    def create(self, weight: StoredWeight | Int4Data, bias: torch.Tensor | None = None) -> Linear:
        return LinearWeight(weight, bias, pack=False, keep_weight=True)

    def fused_decode_weight(self, lw: Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """What the fused C++ decode step multiplies, when this method's weight runs one of its
        kernels: (packed bytes, scales or None for bf16, x's column permutation for act-order int4)."""
        return None


class PackedLinearMethod(LinearMethod):
    """bf16/fp16 weights in oneDNN's blocked layout on CPU: 2x faster GEMV than F.linear here, and for
    bf16 in the layout Baton's kernel reads, every matmul runs linear_packed_bf16 (batch-invariant).
    Its weights are what the fused decode step (decode_forward_bf16) runs on: that step is this
    method's fast path."""

    name = "onednn_packed"

    def process(self, weight: torch.Tensor | Int4Data | Int8Weight) -> StoredWeight:
        return pack_weight(weight) if can_share_packed(weight.dtype) else weight

    def create(self, weight: StoredWeight | Int4Data, bias: torch.Tensor | None = None) -> Linear:
        return LinearWeight(weight, bias, pack=True, keep_weight=False)

    def fused_decode_weight(self, lw: Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        return (lw._blob, None, None) if isinstance(lw, LinearWeight) and lw.direct else None


QUANTIZATIONS = ("int8", "gptq", "awq", "compressed-tensors")


def select_linear_method(dtype: torch.dtype, device: torch.device | str, pack: bool = True,
                         quantization: str = "", checkpoint: QuantConfig | None = None) -> LinearMethod:
    """oneDNN-packed where its bytes can be shared (CPU, a dtype oneDNN packs, the C++ extension)
    unless pack=False; plain otherwise. A pre-quantized `checkpoint` (loader/quantized.py) runs its
    4-bit or 8-bit weights, its unquantized lm_head with that float method; quantization="int8"
    quantizes a float checkpoint's GEMM weights at load. A node and its stages call this with the
    same arguments, so the stages wrap exactly what the node published."""
    if pack and torch.device(device).type == "cpu" and can_share_packed(dtype):
        plain: LinearMethod = PackedLinearMethod()
    else:
        plain = LinearMethod()
    if checkpoint is not None:
        if checkpoint.bits == 4:
            from .int4_linear import Int4LinearMethod

            return Int4LinearMethod(dtype, device, plain)
        from .int8_linear import Int8LinearMethod

        return Int8LinearMethod(dtype, device, plain)
    if not quantization:
        return plain
    if quantization == "int8":
        from .int8_linear import Int8LinearMethod

        return Int8LinearMethod(dtype, device)
    raise ValueError(f"quantization: {quantization!r} needs a {quantization} checkpoint (known: "
                     f"{', '.join(QUANTIZATIONS)})")
