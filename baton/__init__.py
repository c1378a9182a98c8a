"""Baton: LLM serving as a relay of Triton stages. `from baton import LLM, SamplingParams`."""

from baton.backends.engine import LLM, InvalidRequestError, LLMEngine, RequestOutput, SamplingParams

__all__ = ["LLM", "InvalidRequestError", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
