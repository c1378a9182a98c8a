"""Process settings that an entry point (CLI, stage process, benchmark) makes for itself. Nothing
in Baton changes them at import: a library must not retune its host's OpenMP or threads."""

from __future__ import annotations

import logging
import os
import sys

# OpenMP workers spin ~1.5 ms between parallel regions: a decode step is hundreds of short ops, and
# re-waking sleeping workers cost ~15% of step time here. Not much longer: 1,000,000 spins (~28 ms)
# kept an idle stage's workers burning a core after its work ended, the core the other stage needed
# (idle-server TTFT 96.9 -> 86.1 ms with 50,000; engine decode unchanged).
GOMP_SPINCOUNT = "50000"


def process_env() -> dict[str, str]:
    """The environment variables a Baton process wants (an explicit setting always wins); the
    launcher passes them to tritonserver, whose stage processes inherit them."""
    return {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", GOMP_SPINCOUNT)}


def configure_process(threads: int = 0) -> None:
    """Call first in an entry point. libgomp reads GOMP_SPINCOUNT when torch loads it, so that part
    only takes effect before torch is imported; `threads` > 0 sets torch's intra-op threads. Stage
    logs (per-request lines at INFO, keyed by request id) go to stderr at BATON_LOG_LEVEL (WARNING)."""
    logging.basicConfig(level=os.environ.get("BATON_LOG_LEVEL", "WARNING").upper(),
                        format="[baton %(name)s] %(message)s")
    if "torch" not in sys.modules:
        os.environ.update(process_env())
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
