"""RMSNorm and fused residual-add + RMSNorm: one program per row, fp32 math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(X, R, W, OUT, sx, sr, so, n, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    if ADD:   # residual <- x + residual, then normalize the sum
        x = x + tl.load(R + row * sr + offs, mask=m, other=0.0).to(tl.float32)
        x = x.to(R.dtype.element_ty)
        tl.store(R + row * sr + offs, x, mask=m)
        x = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    y = (x * r).to(OUT.dtype.element_ty)          # transformers: round, then scale
    w = tl.load(W + offs, mask=m, other=0.0)
    tl.store(OUT + row * so + offs, (w.to(tl.float32) * y.to(tl.float32)).to(OUT.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n = x2.shape[1]
    _rms_norm[(x2.shape[0],)](x2, x2, weight, out, x2.stride(0), x2.stride(0), out.stride(0), n, eps,
                              BLOCK=triton.next_power_of_2(n), ADD=False)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual <- x + residual (in place); returns rms_norm(residual)."""
    n = x.shape[-1]
    x2, r2 = x.reshape(-1, n), residual.view(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _rms_norm[(x2.shape[0],)](x2, r2, weight, out, x2.stride(0), r2.stride(0), out.stride(0), n, eps,
                              BLOCK=triton.next_power_of_2(n), ADD=True)
    return out.view(x.shape)
