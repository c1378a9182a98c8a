"""Python client for a Baton server: Triton gRPC streaming, HTTP SSE, asyncio. Needs no torch
(`pip install ./clients`); `schema` is the `llm` ensemble's tensor contract."""

from .client import AsyncBatonClient, BatonClient, BatonError, Chunk, Completion

__all__ = ["AsyncBatonClient", "BatonClient", "BatonError", "Chunk", "Completion"]
