"""Weight-only quantized linears: INT8 per output channel, INT4 group-wise in GPTQ and AWQ layouts.

Checkpoint layouts (as the public GPTQ / AWQ formats store them; K = in_features, N = out_features):
- GPTQ: qweight int32 [K/8, N], 8 consecutive k per word, nibble i = k % 8; qzeros int32 [K/G, N/8],
  nibble i = n % 8; scales [K/G, N]; optional g_idx [K] (act-order: k's group). The v1 format stores
  zero - 1 (zero_offset=1); v2 stores the zero itself (zero_offset=0). w = (q - zero) * scale.
- AWQ: qweight int32 [K, N/8] and qzeros int32 [K/G, N/8], 8 n per word in the interleaved order
  [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds column ORDER[i]); scales [K/G, N]. w = (q - zero) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_NIBBLE = [AWQ_ORDER.index(c) for c in range(8)]     # column -> nibble: [0, 4, 1, 5, 2, 6, 3, 7]


# ---- INT8, per output channel -------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row: [N, K] -> (int8 [N, K], fp32 scales [N])."""
    scale = w.float().abs().amax(1).clamp(min=1e-8) / 127
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_linear_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    y = F.linear(x.float(), w.float()) * scale.float()
    return (y + bias.float() if bias is not None else y).to(x.dtype)


def int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda:
        from .gpu.quant_linear import int8_linear as gpu

        return gpu(x, w, scale, bias)
    # CPU: torch's int8-weight GEMM (dequantizes inside the kernel, no dense copy)
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w, scale.to(x.dtype))
    y = y.view(*x.shape[:-1], w.shape[0])
    return y + bias if bias is not None else y


# ---- INT4, group-wise (GPTQ / AWQ) --------------------------------------------------------------
@dataclass
class Int4Weight:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int
    fmt: str                            # "gptq" or "awq"
    g_idx: torch.Tensor | None = None   # GPTQ act-order only
    zero_offset: int = 1                # GPTQ v1 stores zero - 1
    _cpu: tuple | None = None           # CPU int4pack form, built on first CPU use

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * (8 if self.fmt == "gptq" else 1)

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> nibbles [R, C, 8] (nibble i at bits 4i..4i+3)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return (packed.unsqueeze(-1) >> shifts) & 0xF


def unpack_int4(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q [N, K] int32 in 0..15, zeros [K/G, N] int32 including the offset)."""
    if w.fmt == "gptq":
        q = _unpack_rows(w.qweight.T.contiguous()).reshape(w.qweight.shape[1], -1)          # [N, K]
        z = _unpack_rows(w.qzeros).reshape(w.qzeros.shape[0], -1) + w.zero_offset        # [K/G, N]
    elif w.fmt == "awq":
        nib = torch.tensor(AWQ_NIBBLE, device=w.qweight.device)
        q = _unpack_rows(w.qweight)[..., nib].reshape(w.qweight.shape[0], -1).T.contiguous()
        z = _unpack_rows(w.qzeros)[..., nib].reshape(w.qzeros.shape[0], -1)
    else:
        raise ValueError(f"unknown int4 format {w.fmt!r}")
    return q, z


def dequantize_int4(w: Int4Weight) -> torch.Tensor:
    """Dense fp32 [N, K] (the reference)."""
    q, z = unpack_int4(w)
    K = q.shape[1]
    groups = w.g_idx.long() if w.g_idx is not None else torch.arange(K, device=q.device) // w.group_size
    return (q - z[groups].T).float() * w.scales.float()[groups].T


def int4_linear_ref(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = F.linear(x.float(), dequantize_int4(w))
    return (y + bias.float() if bias is not None else y).to(x.dtype)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda:
        from .gpu.quant_linear import int4_linear as gpu

        return gpu(x, w, bias)
    if w.g_idx is not None:            # act-order permutes groups: no packed CPU kernel for it
        return int4_linear_ref(x, w, bias)
    if w._cpu is None:
        try:
            w._cpu = _to_cpu_int4pack(w, x.dtype)
        except RuntimeError:           # shapes torch's packed op does not take (N % 16, ...)
            w._cpu = ()
    if not w._cpu:
        return int4_linear_ref(x, w, bias)
    packed, scale_zero = w._cpu
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, w.group_size, scale_zero)
    y = y.view(*x.shape[:-1], w.out_features)
    return y + bias if bias is not None else y


def _to_cpu_int4pack(w: Int4Weight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 kernel computes (q - 8) * scale + zero; with an integer zero z that is
    (q - z) * scale when zero = (8 - z) * scale."""
    q, z = unpack_int4(w)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    s = w.scales.float()
    scale_zero = torch.stack([s, (8 - z).float() * s], dim=-1).to(dtype).contiguous()   # [K/G, N, 2]
    return packed, scale_zero


# ---- packers (tests, and converting checkpoints) -----------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise: [N, K] -> (q [N, K] 0..15, zeros [K/G, N] 0..15, scales [K/G, N])."""
    N, K = w.shape
    g = w.float().view(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15).view(N, K).to(torch.int32)
    return q, zero.T.contiguous().to(torch.int32), scale.T.contiguous()


def _pack_rows(nibbles: torch.Tensor) -> torch.Tensor:
    """[R, C*8] 0..15 -> int32 [R, C], element 8c+i in nibble i."""
    r, c8 = nibbles.shape
    x = nibbles.view(r, c8 // 8, 8).to(torch.int64) << torch.arange(0, 32, 4, dtype=torch.int64, device=nibbles.device)
    return x.sum(-1).to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
              zero_offset: int = 1) -> Int4Weight:
    """q [N, K] -> qweight int32 [K/8, N] packing 8 consecutive k; zeros stored minus the offset."""
    return Int4Weight(qweight=_pack_rows(q).T.contiguous(), qzeros=_pack_rows(zeros - zero_offset),
                      scales=scales, group_size=group_size, fmt="gptq", zero_offset=zero_offset)


def pack_awq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    order = torch.tensor(AWQ_ORDER, device=q.device)

    def interleave(m: torch.Tensor) -> torch.Tensor:    # [R, N] -> [R, N] with columns in nibble order
        r, n = m.shape
        return m.view(r, n // 8, 8)[..., order].reshape(r, n)

    return Int4Weight(qweight=_pack_rows(interleave(q.T.contiguous())), qzeros=_pack_rows(interleave(zeros)),
                      scales=scales, group_size=group_size, fmt="awq", zero_offset=0)
