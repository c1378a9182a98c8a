"""Model families served by Baton (see config.ARCHITECTURES)."""

from .config import ARCHITECTURES, ModelConfig, ModelConfigError
from .decoder import DecoderLM

__all__ = ["ARCHITECTURES", "DecoderLM", "ModelConfig", "ModelConfigError"]
