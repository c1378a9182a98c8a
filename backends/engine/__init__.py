"""The model-agnostic engine every Triton stage runs."""

from .config import ConfigError, EngineConfig
from .errors import InvalidRequestError
from .llm import LLM, RequestOutput
from .llm_engine import LLMEngine
from .sampling_params import SamplingParams

__all__ = ["LLM", "ConfigError", "EngineConfig", "InvalidRequestError", "LLMEngine", "RequestOutput", "SamplingParams"]
