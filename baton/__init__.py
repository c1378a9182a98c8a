"""Baton: LLM serving as a relay of Triton stages. `from baton import LLM, SamplingParams`."""

import os
import sys

# Keep OpenMP workers spinning ~1.5 ms between parallel regions: a decode step is hundreds of short
# ops, and re-waking sleeping workers cost ~15% of step time here. Not much longer: 1,000,000 spins
# (~28 ms here) kept an idle stage's workers burning a core after its work ended, and in a serving
# node that core belongs to the other stage (idle-server TTFT 96.9 -> 86.1 ms with 50,000; engine
# decode unchanged). Only effective if baton is imported before torch (libgomp reads it at load);
# an explicit setting always wins.
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "50000")

from baton.backends.engine import LLM, InvalidRequestError, LLMEngine, RequestOutput, SamplingParams  # noqa: E402

__all__ = ["LLM", "InvalidRequestError", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
