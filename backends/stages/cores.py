"""The prefill and decode processes of one node share its CPU cores by load: a stage takes all of
them while the other is idle and half while both work.

Fixed splits lose either way on a small box (measured on 2 cores with `small`): one thread each
makes an idle server's TTFT and batch-1 decode ~1.3-2x slower than in-process, two threads each
oversubscribes the cores under load (TTFT p50 1.28 s vs 0.25 s at 2 req/s). Each stage marks itself
busy in a 16-byte shared file before every engine step and picks its thread count from the other's
mark, so at most one step runs oversubscribed when load changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SLOTS = {"prefill": 0, "decode": 1}


class CoreShare:
    def __init__(self, path: str | Path, stage: str, cores: int) -> None:
        self.flags = np.memmap(str(path), dtype=np.int32, mode="r+", shape=(4,))
        self.me, self.other = SLOTS[stage], 1 - SLOTS[stage]
        self.cores = cores
        self.threads = torch.get_num_threads()

    @staticmethod
    def create(path: str | Path) -> None:
        Path(path).write_bytes(bytes(16))

    def busy(self) -> int:
        """Call before each engine step; returns the thread count it runs with."""
        self.flags[self.me] = 1
        half = self.cores // 2 if self.me == SLOTS["prefill"] else self.cores - self.cores // 2
        n = self.cores if not self.flags[self.other] else max(1, half)
        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n
        return n

    def idle(self) -> None:
        self.flags[self.me] = 0
