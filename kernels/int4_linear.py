"""Weight-only INT4 linears from GPTQ, AWQ and compressed-tensors checkpoints.

Every format is read (backends/loader/quantized.py) into one unpacked form, `Int4Data`:
w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g] with q and zero in 0..15 and g the group of column k
(k // group_size, or g_idx[k] for GPTQ act-order). The linear method then packs it for the kernel
that runs it:
- CPU, bf16 activations: Baton's kernel (csrc/cpu_ops.cpp linear_int4): per 64 columns and 8 k a
  uint32 per column ([N/64][K/8][64]; byte i holds k = 8t + i and 8t + 4 + i: WORD_LOW / WORD_HIGH)
  and per (64 columns, group) the scales and zeros, multiplied in integers (VNNI). An act-order
  weight's columns are sorted by group at load (each group then is G consecutive columns) and x is
  permuted the same way before the product, as vLLM's exllama path does.
- otherwise: the GPTQ layout and kernels/quant.py int4_linear (Triton on CUDA, torch's CPU op).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .int8_linear import Int8Weight, kernel_supported
from .linear import Linear, LinearMethod, StoredWeight
from .quant import Int4Weight, int4_linear, pack_gptq

NB = 64
# a column's uint32 for k = 8t..8t+7, as 4 little-endian bytes (low nibble, high nibble): byte i holds
# k = 8t + i and k = 8t + 4 + i, so one AND (and one shift) give the kernel the bytes of 4 consecutive k
WORD_LOW, WORD_HIGH = [0, 1, 2, 3], [4, 5, 6, 7]


@dataclass
class Int4Data:
    """An unpacked 4-bit group-quantized [N, K] weight (see the module docstring)."""

    q: torch.Tensor                    # uint8 [N, K], 0..15
    zero: torch.Tensor                 # uint8 [N, K/G], 0..16 (GPTQ v1 can hold 16)
    scale: torch.Tensor                # float [N, K/G]
    group_size: int
    g_idx: torch.Tensor | None = None  # int64 [K]: act-order's group of each column

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)     # type: ignore[return-value]

    def groups(self) -> torch.Tensor:
        K = self.q.shape[1]
        return self.g_idx if self.g_idx is not None else torch.arange(K) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight: the format's definition, for tests and references."""
        g = self.groups()
        return (self.q.float() - self.zero.float()[:, g]) * self.scale.float()[:, g]

    @staticmethod
    def cat(parts: list[Int4Data], name: str) -> Int4Data:
        """Fused along N (q|k|v, gate|up): the parts share the input, so their group structure
        (group size, act-order) must agree."""
        first = parts[0]
        for p in parts[1:]:
            same = p.group_size == first.group_size and (p.g_idx is None) == (first.g_idx is None) and \
                (p.g_idx is None or torch.equal(p.g_idx, first.g_idx))       # type: ignore[arg-type]
            if not same:
                raise ValueError(f"{name}: the fused projections were quantized with different group structures "
                                 "(group size or act-order g_idx); Baton fuses them into one GEMM")
        return Int4Data(torch.cat([p.q for p in parts]), torch.cat([p.zero for p in parts]),
                        torch.cat([p.scale for p in parts]), first.group_size, first.g_idx)


@dataclass
class Int4Packed:
    """An Int4Data in the CPU kernel's layout; `perm` (int64 [K]) orders x's columns for an
    act-order weight (None otherwise)."""

    qweight: torch.Tensor              # uint8, [N/64][K/8][64][4] (a uint32 per column and 8 k)
    sz: torch.Tensor                   # fp32, [N/64][K/G][2][64]: scale, zero
    shape: tuple[int, int]
    group_size: int
    perm: torch.Tensor | None = None

    @classmethod
    def pack(cls, d: Int4Data) -> Int4Packed:
        N, K = d.shape
        if K % 8 or d.group_size % 8:       # a uint32 per 8 k, whole within a group
            raise ValueError(f"the int4 kernel's layout needs K and the group size multiples of 8, not {K} and "
                             f"{d.group_size}")
        G = d.group_size
        q, zero, scale, perm = d.q, d.zero, d.scale.float(), None
        if d.g_idx is not None and not torch.equal(d.g_idx, torch.arange(K) // G):
            perm = torch.argsort(d.g_idx, stable=True)
            if not torch.equal(d.g_idx[perm], torch.arange(K) // G):
                raise ValueError(f"act-order g_idx does not give each of the {K // G} groups {G} columns")
            q = q[:, perm]
        Np = -(-N // NB) * NB
        qp = torch.zeros(Np, K, dtype=torch.uint8)
        qp[:N] = q
        q8 = qp.view(Np, K // 8, 8)
        words = (q8[..., WORD_LOW] | (q8[..., WORD_HIGH] << 4)).view(Np // NB, NB, K // 8, 4)
        sz = torch.zeros(Np, K // G, 2)
        sz[:N, :, 0] = scale
        sz[:N, :, 1] = zero.float()
        return cls(words.permute(0, 2, 1, 3).contiguous().view(-1), sz.view(Np // NB, NB, K // G, 2).permute(0, 2, 3, 1)
                   .contiguous().view(-1), (N, K), G, perm)

    def unpack(self) -> Int4Data:
        """Back to the unpacked form (act-order as a g_idx): what the tests compare."""
        N, K = self.shape
        G, Np = self.group_size, -(-N // NB) * NB
        words = self.qweight.view(Np // NB, K // 8, NB, 4).permute(0, 2, 1, 3).reshape(Np, K // 8, 4)
        q = torch.empty(Np, K // 8, 8, dtype=torch.uint8)
        q[..., WORD_LOW], q[..., WORD_HIGH] = words & 0xF, words >> 4
        q = q.view(Np, K)[:N]
        sz = self.sz.view(Np // NB, K // G, 2, NB).permute(0, 3, 1, 2).reshape(Np, K // G, 2)[:N]
        scale = sz[..., 0]
        zero = sz[..., 1].to(torch.uint8)
        g_idx = None
        if self.perm is not None:
            inv = torch.argsort(self.perm)
            q, g_idx = q[:, inv], (torch.arange(K) // G)[inv]
        return Int4Data(q.contiguous(), zero, scale, G, g_idx)


class Int4Linear:
    """A 4-bit weight (+ bias) ready to multiply: Baton's kernel on an Int4Packed; the GPTQ-layout
    kernels (kernels/quant.py int4_linear) on an Int4Weight."""

    __slots__ = ("w", "bias", "out_features", "in_features")

    def __init__(self, w: Int4Packed | Int4Weight, bias: torch.Tensor | None) -> None:
        self.w, self.bias = w, bias
        self.out_features, self.in_features = (w.shape if isinstance(w, Int4Packed) else
                                               (w.out_features, w.in_features))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        if isinstance(w, Int4Weight):
            return int4_linear(x, w, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if w.perm is not None:
            x2 = x2.index_select(1, w.perm)
        y = torch.ops.baton_cpu.linear_int4(x2.to(torch.bfloat16).contiguous(), w.qweight, w.sz, self.out_features,
                                            self.in_features, w.group_size, self.bias)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class Int4LinearMethod(LinearMethod):
    """A pre-quantized 4-bit checkpoint (GPTQ, AWQ, compressed-tensors W4A16): layer weights come
    in as Int4Data; `head` runs the unquantized lm_head (as these formats leave it)."""

    name = "int4"

    def __init__(self, dtype: torch.dtype, device: torch.device | str, head: LinearMethod) -> None:
        self.packed = torch.device(device).type == "cpu" and dtype == torch.bfloat16 and kernel_supported()
        self.device = torch.device(device)
        self._head = head

    @property
    def head(self) -> LinearMethod:
        return self._head

    def process(self, weight: torch.Tensor | Int4Data | Int8Weight) -> StoredWeight:
        if not isinstance(weight, Int4Data):
            raise TypeError("an int4 method takes the checkpoint's 4-bit weights (Int4Data)")
        if self.packed:
            return Int4Packed.pack(weight)
        # the GPTQ layout: Triton's kernel on CUDA, torch's int4 op on CPU. Zeros span 0..16 (GPTQ v1
        # can hold 16): stored minus 1 when none is 0, as they are when none is 16
        offset = 1 if int(weight.zero.min()) >= 1 else 0
        if int(weight.zero.max()) - offset > 15:
            raise ValueError("4-bit zero points span 0..16: no 4-bit GPTQ layout holds them")
        w = pack_gptq(weight.q.to(torch.int32), weight.zero.T.to(torch.int32).contiguous(), weight.scale.T.contiguous(),
                      weight.group_size, zero_offset=offset)
        g_idx = weight.g_idx.to(torch.int32) if weight.g_idx is not None else None
        dev = self.device
        return replace(w, qweight=w.qweight.to(dev), qzeros=w.qzeros.to(dev), scales=w.scales.to(dev),
                       g_idx=g_idx.to(dev) if g_idx is not None else None)

    def create(self, weight: StoredWeight | Int4Data, bias: torch.Tensor | None = None) -> Linear:
        if isinstance(weight, Int4Data):
            weight = self.process(weight)
        if not isinstance(weight, (Int4Packed, Int4Weight)):
            raise TypeError(f"an int4 linear cannot wrap a {type(weight).__name__}")
        return Int4Linear(weight, bias)

    def fused_decode_weight(self, lw: Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """Baton's kernel runs inside the fused decode step too (act-order: with x's permutation)."""
        if isinstance(lw, Int4Linear) and isinstance(lw.w, Int4Packed):
            return lw.w.qweight, lw.w.sz, lw.w.perm
        return None
