"""The prefill and decode processes of one node share its CPU cores by load: a stage takes all of
them while the other is idle and half while both work.

Fixed splits lose either way on a small box (measured on 2 cores with `small`): one thread each
makes an idle server's TTFT and batch-1 decode ~1.3-2x slower than in-process, two threads each
oversubscribes the cores under load (TTFT p50 1.28 s vs 0.25 s at 2 req/s). Each stage marks itself
busy in a 16-byte shared file before every engine step and picks its thread count from the other's
mark, so at most one step runs oversubscribed when load changes.

policy "prefill_first" instead gives a working prefill every core and holds decode steps until it is
done: TTFT under load stays near the idle server's, and live streams stall for that prefill, as they
do in an engine that runs prefills and decodes in one loop.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

SLOTS = {"prefill": 0, "decode": 1}
POLICIES = ("fair", "prefill_first")
MAX_HOLD_S = 5.0        # a decode step waits for a prefill at most this long (a stuck flag must not hang it)


class CoreShare:
    def __init__(self, path: str | Path, stage: str, cores: int, policy: str = "fair") -> None:
        if policy not in POLICIES:
            raise ValueError(f"share_cores_policy must be one of {POLICIES}, not {policy!r}")
        self.flags = np.memmap(str(path), dtype=np.int32, mode="r+", shape=(4,))
        self.me, self.other = SLOTS[stage], 1 - SLOTS[stage]
        self.cores = cores
        self.policy = policy
        self.threads = torch.get_num_threads()

    @staticmethod
    def create(path: str | Path) -> None:
        Path(path).write_bytes(bytes(16))

    def busy(self) -> int:
        """Call before each engine step; returns the thread count it runs with."""
        self.flags[self.me] = 1
        if self.policy == "prefill_first":
            if self.me == SLOTS["decode"]:
                deadline = time.monotonic() + MAX_HOLD_S
                while self.flags[self.other] and time.monotonic() < deadline:
                    time.sleep(0.0005)
            n = self.cores
        else:
            half = self.cores // 2 if self.me == SLOTS["prefill"] else self.cores - self.cores // 2
            n = self.cores if not self.flags[self.other] else max(1, half)
        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n
        return n

    def idle(self) -> None:
        self.flags[self.me] = 0
