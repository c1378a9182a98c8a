"""Rotary position embedding, neox style (rotate halves), as in Llama/Qwen checkpoints."""

from __future__ import annotations

import torch

from . import cpu_ext
from .norm import rms_norm


class RotaryCache:
    """cos/sin tables for positions [0, max_positions), computed in fp32 like transformers and stored
    as [max_positions, head_dim] in the compute dtype. `sin_signed` is sin with the first half
    negated, so rotate_half(x) * sin == x.roll(D/2) * sin_signed (one op fewer per layer)."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype, device: str = "cpu"):
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)
        half = self.sin.shape[-1] // 2
        self.sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)
        self.max_positions = max_positions

    def mrope_rows(self, positions: torch.Tensor, sections: tuple[int, ...]) -> RotaryCache:
        """Multimodal rotary (Qwen2-VL's M-RoPE): positions [3, T] (temporal, height, width); frequency
        i of a token turns by the position of the axis whose section holds i. Returns tables with one
        row per token (look them up at arange(T)); a token whose three positions agree gets exactly
        the 1-D row of that position."""
        axis = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sections)])
        axis = torch.cat([axis, axis]).to(positions.device)                          # [D]
        cols = torch.arange(axis.numel(), device=positions.device)
        rows = positions[axis]                                                       # [D, T]: each column's position
        out = object.__new__(RotaryCache)
        out.cos, out.sin, out.sin_signed = (t[rows, cols[:, None]].T.contiguous()
                                            for t in (self.cos, self.sin, self.sin_signed))
        out.max_positions = positions.shape[1]
        return out

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step tables for `positions` ([T]) -> (cos, sin_signed), each [T, 1, D]; shared by all layers."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(x: torch.Tensor, positions: torch.Tensor, cache: RotaryCache) -> torch.Tensor:
    """transformers' formula. x: [tokens, heads, head_dim]; positions: [tokens]."""
    cos = cache.cos[positions].unsqueeze(1)
    sin = cache.sin[positions].unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] (q and k heads together); cos/sin_signed from RotaryCache.lookup."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def qk_norm_rope_(qk: torch.Tensor, norm_weight: torch.Tensor | None, positions: torch.Tensor,
                  cache: RotaryCache, eps: float) -> None:
    """In place on qk [T, Hq+Hkv, D] (a view into the fused qkv output): optional per-head RMSNorm
    (Qwen3's q_norm/k_norm stacked as [Hq+Hkv, D]) then rotary at `positions`."""
    if qk.is_cuda:
        from .gpu.rotary import qk_norm_rope_ as gpu

        gpu(qk, norm_weight, cache.cos, cache.sin_signed, positions, eps)
        return
    if qk.device.type == "cpu" and cpu_ext.available():
        torch.ops.baton_cpu.qk_norm_rope(qk, norm_weight, cache.cos, cache.sin_signed, positions, eps)
        return
    x = rms_norm(qk, norm_weight, eps) if norm_weight is not None else qk
    qk.copy_(apply_rotary(x, *cache.lookup(positions)))
