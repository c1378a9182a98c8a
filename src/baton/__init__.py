"""Baton: LLM serving as a relay of Triton stages. `from baton import LLM, SamplingParams`.

Importing `baton` loads nothing heavy and changes nothing in the process: the engine (and torch)
load on first use of a name below, and process settings (OpenMP spinning, threads) are made by the
entry points (`baton.backends.runtime`)."""

from __future__ import annotations

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
