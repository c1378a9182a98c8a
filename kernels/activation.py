"""SiLU-and-mul over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_ext


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from .gpu.activation import silu_and_mul as gpu

        return gpu(x)
    if x.device.type == "cpu" and cpu_ext.available() and x.is_contiguous():
        return torch.ops.baton_cpu.silu_and_mul(x)
    n = x.shape[-1] // 2
    out = F.silu(x[..., :n])
    return out.mul_(x[..., n:])
