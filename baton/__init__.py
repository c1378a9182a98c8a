"""Baton: LLM serving as a relay of Triton stages. `from baton import LLM, SamplingParams`."""

import os
import sys

# Keep OpenMP workers spinning ~1 ms between parallel regions: a decode step is hundreds of short
# ops, and re-waking sleeping workers cost ~15% of step time here. Only effective if baton is
# imported before torch (libgomp reads it at load); an explicit setting always wins.
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

from baton.backends.engine import LLM, InvalidRequestError, LLMEngine, RequestOutput, SamplingParams  # noqa: E402

__all__ = ["LLM", "InvalidRequestError", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
