"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton 3.9's CPU interpreter computes tl.dot on bf16 inputs wrongly (checked: garbage ~1e10),
# while loads, casts and stores are right. Under the interpreter the kernels pass DOT_F32=True and
# upcast dot operands; on a GPU the operands go to the tensor cores as they are.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def mma(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:   # fp32 models (parity runs) keep full precision, not TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)
