"""In-place q/k per-head RMSNorm (optional) + neox rotary on the fused qkv output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope(X, W, COS, SIN, POS, st, sh, eps, H, D: tl.constexpr, HAS_W: tl.constexpr):
    pid = tl.program_id(0)
    t = pid // H
    h = pid % H
    offs = tl.arange(0, D)
    rot = (offs + D // 2) % D
    base = X + t * st + h * sh
    x = tl.load(base + offs).to(tl.float32)
    xr = tl.load(base + rot).to(tl.float32)
    if HAS_W:
        r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        w = tl.load(W + h * D + offs).to(tl.float32)
        wr = tl.load(W + h * D + rot).to(tl.float32)
        x = w * (x * r).to(X.dtype.element_ty).to(tl.float32)
        xr = wr * (xr * r).to(X.dtype.element_ty).to(tl.float32)
        x = x.to(X.dtype.element_ty).to(tl.float32)
        xr = xr.to(X.dtype.element_ty).to(tl.float32)
    p = tl.load(POS + t)
    c = tl.load(COS + p * D + offs).to(tl.float32)
    s = tl.load(SIN + p * D + offs).to(tl.float32)     # sin with the first half negated
    tl.store(base + offs, (x * c + xr * s).to(X.dtype.element_ty))


def qk_norm_rope_(qk: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin_signed: torch.Tensor,
                  positions: torch.Tensor, eps: float) -> None:
    """qk: [T, Hq+Hkv, D] view with contiguous heads; tables [max_pos, D]."""
    T, H, D = qk.shape
    if T == 0:
        return
    _qk_norm_rope[(T * H,)](qk, weight if weight is not None else qk, cos, sin_signed, positions,
                            qk.stride(0), qk.stride(1), eps, H, D=D, HAS_W=weight is not None)
