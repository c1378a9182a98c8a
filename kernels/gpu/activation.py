"""silu(gate) * up over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul(X, OUT, sx, so, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(X + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(X + row * sx + n + offs, mask=m, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)   # F.silu rounds first
    tl.store(OUT + row * so + offs, (act * u).to(OUT.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    BLOCK = min(1024, triton.next_power_of_2(n))
    _silu_and_mul[(x2.shape[0], triton.cdiv(n, BLOCK))](x2, out, x2.stride(0), out.stride(0), n, BLOCK=BLOCK)
    return out.view(*x.shape[:-1], n)
