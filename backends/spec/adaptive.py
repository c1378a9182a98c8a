"""When drafting pays: from what the engine's steps actually cost, not from a fixed threshold.

A speculative step costs more than a plain one (the proposer's work, k more rows to score), and
pays when it emits enough more tokens. The governor times each step cycle (from one step's start to
the next's, so a serving loop's work between steps, such as sending the responses, counts too):
plain cycles with at most `max_batch` sequences decoding and no prompt chunk, and cycles that
verified drafts. Their ratio is the break-even: the tokens a verifying step must emit per sequence
to be worth its time. A cycle is timed only after one of its kind: the first plain step after drafts
(or a prompt) runs on caches the other work filled, and with a draft stage it measured 6-9 ms
against a steady 4; the first speculative one after plain steps pays the proposer's catch-up. While
a sequence drafts, two plain steps in a row are forced every `REMEASURE` steps, so a cost that
changes (a longer context, another process on the cores) is seen; every `YOUNG` steps until YOUNG
of each kind are timed, the estimate being their median till then (a fresh server's first decode
steps run up to 1.8x a steady one's). After that each estimate averages the cycles timed over the
last `TAU` seconds, whether they come every step or once in 64, so the two are of the same moments
of a box whose speed changes. Estimates seeded by those slow steps, and plain ones timed
right after drafts, put a draft stage's break-even at 1.3-2 tokens instead of 3.5-4.5: sampling at
T=0.8 (1.7 tokens a step), it drafted on most steps and ran at 0.79x.

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
that, or later where a probe is dear: a draft model catches up on every token it has not seen (a
new sequence's prompt too), ~30 ms against a 4 ms step, so the interval is long enough that probes
cost at most PROBE_SHARE of the time; after each probe that did not pay, twice as long. A new
sequence drafts only if the population's evidence says it pays, or if nobody has verified drafts for
the longest probe interval (someone must keep looking)."""

from __future__ import annotations

import math
import statistics
import time

from ..engine.sequence import Sequence
from .config import SpeculativeConfig

IDLE_GAP_S = 0.1      # a longer cycle is an idle wait or an interruption, not a step's cost
OUTLIER = 3.0         # nor is one over 3x the estimate: the wait for a next request's prompt (its prefill,
                      # in another process when serving) after a request's last step; unless the cost
                      # really changed: the third such cycle in a row counts
REMEASURE = 64        # speculating steps between two forced plain ones
YOUNG = 8             # cycles of a kind timed before its estimate is an EWMA (and plain steps come
                      # every YOUNG speculating steps till then)
TAU = 1.0             # seconds: each estimate averages the cycles timed over about this long, however
W_MAX = 0.5           # sparse (a plain one is timed once per REMEASURE steps while drafting: weighed per
                      # cycle, at 0.1, it lagged the dense speculative one by seconds, and when the box
                      # slowed for a while, the break-even fell to 1.3 and drafts that lost went on)
PROBE_SHARE = 0.02    # of the plain steps' time between a sequence's probes, the most a probe adds
BACKOFF = 3           # doublings of a sequence's probe interval, at most
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
        self.probe_cycle: float | None = None    # EWMA seconds of a step in which a sequence probed
        self._probing = False                # a sequence probes in the step being scheduled
        self._timing_probe = False           # the running step is such a step
        self._started: float | None = None
        self._kind: bool | None = None       # what the running step is: True speculative, False plain, None neither
        self._since_plain = 0
        self._last_kind: bool | None = None
        self._outliers = 0                   # cycles over OUTLIER x the estimate in a row
        self._young: dict[bool, list[float]] = {False: [], True: []}     # a kind's first YOUNG cycles
        self._timed = {False: 0.0, True: 0.0}   # when a cycle of each kind was last timed
        self._quiet = 0                      # steps that could draft since a step verified drafts
        self.pop = [0.0, 0.0, 0.0]           # every sequence's verifying steps: decayed weight, tokens, squares

    def tick(self) -> None:
        """A step starts: the one before it ends."""
        now = time.perf_counter()
        dt = now - self._started if self._started is not None else IDLE_GAP_S
        if self._timing_probe and dt < IDLE_GAP_S:
            old = self.probe_cycle
            self.probe_cycle = dt if old is None else 0.8 * old + 0.2 * dt
        if self._kind is not None and dt < IDLE_GAP_S:
            old = self.cycle[self._kind]
            self._outliers = self._outliers + 1 if old is not None and dt > OUTLIER * old else 0
            if self._outliers in (0, 3):
                young = self._young[self._kind]
                if len(young) < YOUNG:           # the median: the first cycles are cold
                    young.append(dt)
                    self.cycle[self._kind] = statistics.median(young)
                else:                            # an average over the last ~TAU seconds
                    since = now - self._timed[self._kind]
                    self.cycle[self._kind] = old + min(W_MAX, 1 - math.exp(-since / TAU)) * (dt - old)
                self._timed[self._kind] = now
                self._outliers = 0
        self._started, self._kind, self._timing_probe = now, None, False

    def measured(self, kind: bool | None) -> None:
        """What the step just scheduled is: speculative, comparable plain, or neither. It is timed
        only after a step of its kind: a speculative step after plain ones pays its proposer's
        catch-up (a probe's cost, timed as that), a plain one after drafts or a prompt chunk runs
        on caches the other work filled."""
        last = self._last_kind
        self._kind = kind if kind is not None and kind == last else None
        self._timing_probe = bool(kind) and self._probing
        self._probing = False
        self._last_kind = kind
        if self._kind is False:
            self._since_plain = 0

    def break_even(self) -> float | None:
        """Tokens a verifying step must emit per sequence to beat plain steps (None: not yet known)."""
        plain, spec = self.cycle[False], self.cycle[True]
        return spec / plain if plain and spec else None

    def probe_gap(self) -> int:
        """Steps a sequence below the break-even waits before it probes: 8 x probe_every, or more
        where a probe costs more than PROBE_SHARE of the plain steps that many take."""
        gap = 8 * self.cfg.probe_every
        plain, probe = self.cycle[False], self.probe_cycle
        if plain and probe:
            gap = max(gap, int((probe / plain - 1) / PROBE_SHARE))
        return gap

    def step_may_speculate(self) -> bool:
        """False now and then, until a plain step is timed: to re-measure what one costs."""
        if not self.cfg.adaptive:
            return True
        self._since_plain += 1
        self._quiet += 1
        every = REMEASURE if len(self._young[False]) >= YOUNG else YOUNG
        return self.cycle[False] is not None and self._since_plain <= every

    def wants(self, seq: Sequence) -> bool:
        """Whether seq drafts this step (called once per step while it decodes)."""
        if not self.cfg.adaptive:
            return True
        seq.spec_w *= DECAY
        seq.spec_sum *= DECAY
        seq.spec_sq *= DECAY
        be = self.break_even()
        if be is None or self.pop[0] < EXPLORE:
            return True
        idle, every = seq.spec_idle, self.cfg.probe_every
        resting = 0 < idle < every              # it stopped fewer than probe_every steps ago
        if not resting and self.bound(seq) > be:
            seq.spec_idle = seq.spec_probes = 0
            return True
        gap = self.probe_gap()
        if idle >= gap << min(seq.spec_probes, BACKOFF) or (not seq.spec_steps and self._quiet >= gap << BACKOFF):
            seq.spec_idle = 0
            seq.spec_probes += 1
            self._probing = True
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
        self._quiet = 0
        seq.spec_w += 1.0
        seq.spec_sum += emitted
        seq.spec_sq += emitted * emitted
        pop = self.pop
        pop[0] = POP_DECAY * pop[0] + 1.0
        pop[1] = POP_DECAY * pop[1] + emitted
        pop[2] = POP_DECAY * pop[2] + emitted * emitted
