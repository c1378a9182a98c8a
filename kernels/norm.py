"""RMSNorm and fused residual-add + RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_ext


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' order of operations: normalize in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalizes the last dim; `weight` may be [D] or broadcast over leading dims (per-head norms).
    F.rms_norm accumulates in fp32 for bf16 input (bit-equal to the reference, checked in tests)."""
    if x.is_cuda:
        from .gpu.norm import rms_norm as gpu

        if weight.dim() == 1:
            return gpu(x, weight, eps)
    if weight.dim() == 1:
        if x.device.type == "cpu" and cpu_ext.available():
            return torch.ops.baton_cpu.rms_norm(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual). May update `residual` in place."""
    if x.is_cuda and residual.is_contiguous():
        from .gpu.norm import add_rms_norm as gpu

        return gpu(x, residual, weight, eps), residual
    if x.device.type == "cpu" and cpu_ext.available() and x.is_contiguous() and residual.is_contiguous():
        return torch.ops.baton_cpu.add_rms_norm(x, residual, weight, eps), residual
    residual = x + residual
    return rms_norm(residual, weight, eps), residual
