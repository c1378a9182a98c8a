"""Rotary position embedding, neox style (rotate halves), as in Llama/Qwen checkpoints."""

from __future__ import annotations

import torch


class RotaryCache:
    """cos/sin tables for positions [0, max_positions), computed in fp32 like transformers and
    stored as [max_positions, head_dim] in the compute dtype."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype, device: str = "cpu"):
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)
        self.max_positions = max_positions


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(x: torch.Tensor, positions: torch.Tensor, cache: RotaryCache) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; positions: [tokens]."""
    cos = cache.cos[positions].unsqueeze(1)
    sin = cache.sin[positions].unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, cache: RotaryCache) -> torch.Tensor:
    """Same math as the reference; q and k are usually passed together as one [T, Hq+Hkv, D]
    tensor so the table lookup and the 5 pointwise ops run once per layer."""
    return apply_rotary_ref(x, positions, cache)
