"""The prefill and decode processes of one node share its CPU cores by load: a stage takes all of
them while the other is idle and half while both work.

Fixed splits lose either way on a small box (measured on 2 cores with `small`): one thread each
makes an idle server's TTFT and batch-1 decode ~1.3-2x slower than in-process, two threads each
oversubscribes the cores under load (TTFT p50 1.28 s vs 0.25 s at 2 req/s). Each stage marks itself
busy in a small shared file before every engine step and picks its thread count from the other's
mark, so at most one step runs oversubscribed when load changes.

policy "prefill_first" instead gives a working prefill every core and holds decode steps while it
runs: TTFT under load stays near the idle server's, and live streams stall for that prefill, as they
do in an engine that runs prefills and decodes in one loop. Between two chunks of a prefill (the
prefill engine's token budget, `prefill_chunk_tokens`) a waiting decode gets one step, so a long
prompt stalls the streams for one chunk at a time, not for the whole prompt. Within a chunk,
`between_layers` (the prefill model calls it after each layer) lets a waiting decode step in once the
prefill has run `decode_wait_s` since it last did: a stream then waits about that long, not a whole
chunk (an image prompt's chunk on one core is tens of ms), and the prefill still runs in big chunks.

Under "prefill_first" a prefill that arrives while a decode step runs waits for that step to end
(at most MAX_YIELD_S) rather than run beside it: 2 + 2 OpenMP threads on 2 cores, each team
spinning at its barriers for threads the other has preempted.

The file holds five int32: prefill busy (or yielding one step), decode busy, decode waiting, decode
steps done, decode mid-step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SLOTS = {"prefill": 0, "decode": 1}
POLICIES = ("fair", "prefill_first")
MAX_HOLD_S = 5.0        # a decode step waits for a prefill at most this long (a stuck flag must not hang it)
MAX_YIELD_S = 1.0       # a prefill waits for the decode step it let in at most this long
WAITING, STEPS, STEPPING = 2, 3, 4   # flag slots
BUSY, YIELD = 1, 2      # a prefill's own flag: working, or letting one decode step in


class CoreShare:
    def __init__(self, path: str | Path, stage: str, cores: int, policy: str = "fair",
                 decode_wait_s: float = 0.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"share_cores_policy must be one of {POLICIES}, not {policy!r}")
        self.flags = np.memmap(str(path), dtype=np.int32, mode="r+", shape=(5,))
        self.me, self.other = SLOTS[stage], 1 - SLOTS[stage]
        self.cores = cores
        self.policy = policy
        self.threads = torch.get_num_threads()
        self.decode_wait_s = decode_wait_s
        self.since = 0.0        # when this prefill last took the cores

    @staticmethod
    def create(path: str | Path) -> None:
        Path(path).write_bytes(bytes(20))

    def busy(self) -> int:
        """Call before each engine step; returns the thread count it runs with."""
        if self.policy == "prefill_first":
            if self.me == SLOTS["decode"]:
                self.flags[self.me] = 1
                self.flags[WAITING] = 1
                deadline = time.monotonic() + MAX_HOLD_S
                while True:     # mark the step, then look: a prefill that sets BUSY after the mark waits
                    self.flags[STEPPING] = 1
                    if self.flags[self.other] != BUSY or time.monotonic() > deadline:
                        break
                    self.flags[STEPPING] = 0
                    self._wait(lambda: self.flags[self.other] != BUSY, deadline - time.monotonic())
                if self.flags[self.other] == YIELD:      # a prefill between chunks lets in this step only
                    self.flags[self.other] = BUSY
                self.flags[WAITING] = 0
            else:
                if self.flags[self.me] and self.flags[WAITING]:   # between chunks: one decode step first
                    self._let_decode_in()
                self._take()
            n = self.cores
        else:
            self.flags[self.me] = 1
            half = self.cores // 2 if self.me == SLOTS["prefill"] else self.cores - self.cores // 2
            n = self.cores if not self.flags[self.other] else max(1, half)
        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n
        return n

    def between_layers(self) -> None:
        """Prefill calls this between two layers of a step: a waiting decode step gets in once this
        prefill has run decode_wait_s since it last took the cores."""
        if self.flags[WAITING] and time.monotonic() - self.since >= self.decode_wait_s:
            self._let_decode_in()
            self._take()

    def _let_decode_in(self) -> None:
        steps = int(self.flags[STEPS])
        self.flags[self.me] = YIELD
        self._wait(lambda: self.flags[STEPS] != steps or not self.flags[self.other], MAX_YIELD_S)

    def _take(self) -> None:
        self.flags[self.me] = BUSY
        # a decode step in flight ends first
        self._wait(lambda: not self.flags[STEPPING] or not self.flags[self.other], MAX_YIELD_S)
        self.since = time.monotonic()

    def holds_decode(self) -> bool:
        """Whether decode's busy() would now wait for a working prefill."""
        return self.policy == "prefill_first" and self.me == SLOTS["decode"] and self.flags[self.other] == BUSY

    def other_busy(self) -> bool:
        """Whether the other stage is working (or between two of its steps) now."""
        return bool(self.flags[self.other])

    def stepped(self) -> None:
        """Decode calls this after each step (a prefill that let it in, or waits for it, goes on)."""
        self.flags[STEPPING] = 0
        self.flags[STEPS] += 1

    def idle(self) -> None:
        self.flags[self.me] = 0
        if self.me == SLOTS["decode"]:
            self.flags[STEPPING] = 0

    @staticmethod
    def _wait(done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            time.sleep(0.0005)
