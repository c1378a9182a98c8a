"""Baton: LLM serving as a relay of Triton stages. `from baton import LLM, SamplingParams`.

Importing `baton` loads nothing heavy: the engine (and torch) load on first use of a name below, and
process settings (OpenMP spinning, threads) are made by the entry points (`baton.backends.runtime`).
It changes one thing, an environment default that must be set before gRPC loads: gRPC's fork support
off. Baton's children all exec; with it on, gRPC >= 1.81 restarts its poller in a child forked for
Popen(preexec_fn=...), which then dies before its exec on 1-3% of spawns (grpc/grpc#43055, measured
here: 7 of 300)."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from baton.backends.engine import (
        LLM,
        EngineConfig,
        InvalidRequestError,
        LLMEngine,
        RequestOutput,
        SamplingParams,
    )

__all__ = ["LLM", "ConfigError", "EngineConfig", "InvalidRequestError", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from baton.backends import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'baton' has no attribute {name!r}")
