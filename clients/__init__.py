"""Python clients for a Baton server (Triton gRPC streaming and HTTP SSE)."""

from .client import AsyncBatonClient, BatonClient, BatonError, Chunk, Completion

__all__ = ["AsyncBatonClient", "BatonClient", "BatonError", "Chunk", "Completion"]
