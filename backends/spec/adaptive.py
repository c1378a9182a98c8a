"""When drafting pays: from what the engine's steps actually cost, not from a fixed threshold.

A speculative step costs more than a plain one (the proposer's work, k more rows to score), and
pays when it emits enough more tokens. The governor times each step cycle (from one step's start to
the next's, so a serving loop's work between steps, such as sending the responses, counts too):
plain cycles with at most `max_batch` sequences decoding and no prompt chunk, and cycles that
verified drafts. Their ratio is the break-even: the tokens a verifying step must emit per sequence
to be worth its time. Each sequence keeps a moving average of the tokens its verifying steps emitted;
below the break-even it stops drafting and probes again after `probe_every` steps, backing off to 8x
that while probes keep failing. A plain cycle is re-measured every `REMEASURE` steps, so a cost
that changes (a longer context, another process on the cores) is seen."""

from __future__ import annotations

import time

from ..engine.sequence import Sequence
from .config import SpeculativeConfig

IDLE_GAP_S = 0.1      # a longer cycle is an idle wait or an interruption, not a step's cost
REMEASURE = 64        # speculating steps between two forced plain ones


class Governor:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self.cycle: dict[bool, float | None] = {False: None, True: None}   # EWMA seconds: plain, speculative
        self._started: float | None = None
        self._kind: bool | None = None       # what the running step is: True speculative, False plain, None neither
        self._since_plain = 0
        self._last_kind: bool | None = None

    def tick(self) -> None:
        """A step starts: the one before it ends."""
        now = time.perf_counter()
        if self._started is not None and self._kind is not None and now - self._started < IDLE_GAP_S:
            old = self.cycle[self._kind]
            dt = now - self._started
            self.cycle[self._kind] = dt if old is None else 0.9 * old + 0.1 * dt
        self._started, self._kind = now, None

    def measured(self, kind: bool | None) -> None:
        """What the step just scheduled is: speculative, comparable plain, or neither. A speculative
        step right after a plain one is not timed: its proposer catches up on what it did not see
        (a probe's cost, not the cost of speculating step after step)."""
        self._kind = None if kind and self._last_kind is not True else kind
        self._last_kind = kind
        if kind is False:
            self._since_plain = 0

    def break_even(self) -> float | None:
        """Tokens a verifying step must emit per sequence to beat plain steps (None: not yet known)."""
        plain, spec = self.cycle[False], self.cycle[True]
        return spec / plain if plain and spec else None

    def step_may_speculate(self) -> bool:
        """False for one step now and then, to re-measure what a plain step costs."""
        if not self.cfg.adaptive:
            return True
        self._since_plain += 1
        return self.cycle[False] is not None and self._since_plain <= REMEASURE

    def wants(self, seq: Sequence) -> bool:
        """Whether seq drafts this step."""
        if not self.cfg.adaptive:
            return True
        be = self.break_even()
        if be is None or not seq.spec_steps or seq.spec_len > be:
            seq.spec_idle, seq.spec_backoff = 0, self.cfg.probe_every
            return True
        seq.spec_idle += 1
        seq.spec_backoff = seq.spec_backoff or self.cfg.probe_every
        if seq.spec_idle < seq.spec_backoff:
            return False
        seq.spec_idle = 0                       # probe, and wait longer before the next one
        seq.spec_backoff = min(2 * seq.spec_backoff, 8 * self.cfg.probe_every)
        return True

    @staticmethod
    def verified(seq: Sequence, emitted: int) -> None:
        """seq's verifying step emitted this many tokens (its spec_steps already counts the step)."""
        seq.spec_len = emitted if seq.spec_steps == 1 else 0.7 * seq.spec_len + 0.3 * emitted
