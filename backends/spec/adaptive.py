"""When drafting pays: from what the engine's steps actually cost, not from a fixed threshold.

A speculative step costs more than a plain one (the proposer's work, k more rows to score), and
pays when it emits enough more tokens. The governor times each step cycle (from one step's start to
the next's, so a serving loop's work between steps, such as sending the responses, counts too):
plain cycles with at most `max_batch` sequences decoding and no prompt chunk, and cycles that
verified drafts. Their ratio is the break-even: the tokens a verifying step must emit per sequence
to be worth its time. A plain cycle is re-measured every `REMEASURE` steps, so a cost that changes
(a longer context, another process on the cores) is seen.

Each sequence keeps what its verifying steps emitted, every weight decaying by DECAY per step, on
top of PRIOR steps at the mean of every sequence's recent verifying steps (a new sequence, or one
whose evidence has decayed, is expected to do as the others do; until EXPLORE steps are seen,
everyone drafts). It drafts while an optimistic bound on its mean (the mean plus Z standard errors)
is above the break-even. What one verifying step emits is noisy (a 75%-per-draft head emits 1
token a quarter of the time and 4 in four tenths), so a short moving average dipped below the
break-even after a couple of rejections and paused drafts that paid: measured on baton-tiny, EAGLE
made 1.15x with it against 1.33x drafting always. A sequence whose drafts do not pay falls below
the bound and stops; it probes again when its bound rises back over the break-even (as its own
evidence decays), but not sooner than `probe_every` steps after it stopped, and at the latest 8x
that."""

from __future__ import annotations

import time

from ..engine.sequence import Sequence
from .config import SpeculativeConfig

IDLE_GAP_S = 0.1      # a longer cycle is an idle wait or an interruption, not a step's cost
OUTLIER = 3.0         # nor is one over 3x the estimate: the wait for a next request's prompt (its prefill,
                      # in another process when serving) after a request's last step; unless the cost
                      # really changed: the third such cycle in a row counts
REMEASURE = 64        # speculating steps between two forced plain ones
DECAY = 0.97          # per step: a sequence's evidence halves in ~23 steps
POP_DECAY = 0.99      # per verifying step: every sequence's, halving in ~70 of them
PRIOR = 8.0           # steps' worth of that population's mean in each sequence's estimate
EXPLORE = 8.0         # verifying steps (of any sequence, decayed) seen before the governor stops one
Z = 0.5               # standard errors of optimism in the bound
MIN_SD = 0.5          # tokens: the spread assumed at least (a run of equal outcomes has none)


class Governor:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self.cycle: dict[bool, float | None] = {False: None, True: None}   # EWMA seconds: plain, speculative
        self._started: float | None = None
        self._kind: bool | None = None       # what the running step is: True speculative, False plain, None neither
        self._since_plain = 0
        self._last_kind: bool | None = None
        self._outliers = 0                   # cycles over OUTLIER x the estimate in a row
        self.pop = [0.0, 0.0, 0.0]           # every sequence's verifying steps: decayed weight, tokens, squares

    def tick(self) -> None:
        """A step starts: the one before it ends."""
        now = time.perf_counter()
        if self._started is not None and self._kind is not None and now - self._started < IDLE_GAP_S:
            old = self.cycle[self._kind]
            dt = now - self._started
            self._outliers = self._outliers + 1 if old is not None and dt > OUTLIER * old else 0
            if self._outliers in (0, 3):
                self.cycle[self._kind] = dt if old is None else 0.9 * old + 0.1 * dt
                self._outliers = 0
        self._started, self._kind = now, None

    def measured(self, kind: bool | None) -> None:
        """What the step just scheduled is: speculative, comparable plain, or neither. A speculative
        step right after a non-speculative one is not timed (its proposer catches up on what it did
        not see: a probe's cost, not the cost of speculating step after step), nor is a plain one
        right after a prompt chunk (the first decode step after a prompt runs on cold caches: up
        to 2.5x a steady one here)."""
        last = self._last_kind
        self._kind = None if (kind and last is not True) or (kind is False and last is None) else kind
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
        """Whether seq drafts this step (called once per step while it decodes)."""
        if not self.cfg.adaptive:
            return True
        seq.spec_w *= DECAY
        seq.spec_sum *= DECAY
        seq.spec_sq *= DECAY
        be = self.break_even()
        if be is None or not seq.spec_steps or self.pop[0] < EXPLORE:
            return True
        idle, every = seq.spec_idle, self.cfg.probe_every
        resting = 0 < idle < every              # it stopped fewer than probe_every steps ago
        if idle >= 8 * every or (not resting and self.bound(seq) > be):
            seq.spec_idle = 0
            return True
        seq.spec_idle += 1
        return False

    def bound(self, seq: Sequence) -> float:
        """The optimistic estimate of what seq's next verifying step emits."""
        pw, psum, psq = self.pop
        scale = PRIOR / pw if pw else 0.0       # the population's sums, as PRIOR steps' worth
        w = max(seq.spec_w + scale * pw, 1e-9)   # decayed for ever, and no population: no evidence left
        mean = (seq.spec_sum + scale * psum) / w
        second = (seq.spec_sq + scale * psq) / w
        sd = max(MIN_SD, max(0.0, second - mean * mean) ** 0.5)
        return mean + Z * sd / w ** 0.5

    def verified(self, seq: Sequence, emitted: int) -> None:
        """seq's verifying step emitted this many tokens (its spec_steps already counts the step)."""
        seq.spec_w += 1.0
        seq.spec_sum += emitted
        seq.spec_sq += emitted * emitted
        pop = self.pop
        pop[0] = POP_DECAY * pop[0] + 1.0
        pop[1] = POP_DECAY * pop[1] + emitted
        pop[2] = POP_DECAY * pop[2] + emitted * emitted
