"""When drafting pays: from what the engine's steps actually cost, not from a fixed threshold.

A speculative step costs more than a plain one (the proposer's work, k more rows to score), and
pays when it emits enough more tokens. The governor times each step cycle (from one step's start to
the next's, so a serving loop's work between steps, such as sending the responses, counts too):
plain cycles with at most `max_batch` sequences decoding and no prompt chunk, and cycles that
verified drafts. Their ratio is the break-even: the tokens a verifying step must emit per sequence
to be worth its time. The plain cost is the median of the last `SAMPLES` plain cycles, the
break-even the median of the last `RATIOS` speculative cycles, each over the plain cost when it ran: this
box's cycles have a long tail (a 4 ms step now and then takes 10-17), and a moving average of them,
or one seeded by a fresh server's slow first steps, moved the break-even by half. A ratio, because
the box's speed changes by 2x for seconds at a time: while nobody drafts, the speculative cost is
old, and an old cost over a plain one timed in a slow phase put the break-even at 1.3.

What is timed is what a run of steps of one kind costs. The first speculative step after plain ones
pays its proposer's catch-up (timed apart, as what a probe costs); the first `SETTLE` plain steps
after drafts or a prompt chunk run on caches the other work filled (beside a draft stage: 6-10 ms
against a steady 4). Timed, those put a draft stage's break-even at 1.3-2 tokens instead of 3: at
T=0.8 (1.7 tokens a step) it drafted on most steps, at 0.79x. While a sequence drafts, plain steps
are forced every `REMEASURE` steps until one is timed, so a cost that changes (a longer context,
another process on the cores) is seen. Nobody drafts before SAMPLES plain cycles are timed: a fresh
server's first ones (7 ms against a steady 3.8), as the reference of its first speculative cycles,
put the break-even at 1.6 tokens instead of 3, and at T=0.8 the few speculative cycles that follow
could not replace them.

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

import os
import statistics
import time
from collections import deque
from pathlib import Path

from ..engine.sequence import Sequence
from .config import SpeculativeConfig

IDLE_GAP_S = 0.1      # a longer cycle is an idle wait or an interruption, not a step's cost
SAMPLES = 9           # plain cycles whose median is the plain cost
RATIOS = 25           # speculative cycles (over the plain cost) whose median is the break-even: dense,
                      # and noisier (9 of them moved it between 1.0 and 2.3 for Medusa at 2.5 tokens)
SETTLE = 2            # plain steps after drafts or a prompt chunk that are not timed
REMEASURE = 64        # speculating steps before plain ones are forced, to time one
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
        self.plain: float | None = None      # seconds: what a plain cycle costs (once SAMPLES are timed)
        self.ratio: float | None = None      # a speculative cycle's cost over the plain one's: the break-even
        self.probe_ratio: float | None = None     # that of a step in which a sequence probed (EWMA)
        self._samples = {False: deque(maxlen=SAMPLES), True: deque(maxlen=RATIOS)}   # plain seconds, ratios
        self._probing = False                # a sequence probes in the step being scheduled
        self._timing_probe = False           # the running step is such a step
        self._started: float | None = None
        self._kind: bool | None = None       # what the running step is timed as: True speculative, False plain
        self._last_kind: bool | None = None
        self._run = 0                        # steps of the last one's kind right before it
        self._since_plain = 0
        self._quiet = 0                      # steps that could draft since a step verified drafts
        self.pop = [0.0, 0.0, 0.0]           # every sequence's verifying steps: decayed weight, tokens, squares
        # BATON_SPEC_TRACE=<dir>: every cycle timed and every decision, one line each, to
        # <dir>/governor-<pid>.log (why a node did or did not draft; how the findings above were made)
        trace = os.environ.get("BATON_SPEC_TRACE")
        self._trace = None
        if trace:
            Path(trace).mkdir(parents=True, exist_ok=True)
            self._trace = open(Path(trace) / f"governor-{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def tick(self) -> None:
        """A step starts: the one before it ends."""
        now = time.perf_counter()
        dt = now - self._started if self._started is not None else IDLE_GAP_S
        plain = self.plain
        if self._trace:
            self._trace.write(f"cycle {dt * 1e3:.2f} ms timed_as={self._kind} probe={self._timing_probe} "
                              f"plain_ms={plain and round(plain * 1e3, 2)} break_even={self.ratio and round(self.ratio, 2)}\n")
        if self._timing_probe and dt < IDLE_GAP_S and plain:
            r, old = dt / plain, self.probe_ratio
            self.probe_ratio = r if old is None else 0.8 * old + 0.2 * r
        if self._kind is not None and dt < IDLE_GAP_S and (plain or self._kind is False):
            samples = self._samples[self._kind]
            samples.append(dt if self._kind is False else dt / plain)
            if self._kind:
                self.ratio = statistics.median(samples)
            elif len(samples) == SAMPLES:          # a median of fewer is a fresh server's slow steps
                self.plain = statistics.median(samples)
        self._started, self._kind, self._timing_probe = now, None, False

    def measured(self, kind: bool | None) -> None:
        """What the step just scheduled is: speculative, comparable plain, or neither. A speculative
        step is timed after one of its kind (else it pays its proposer's catch-up: a probe's cost,
        timed as that), a plain one after SETTLE of its kind (else it runs on caches the other work
        filled)."""
        self._run = self._run + 1 if kind is not None and kind == self._last_kind else 0
        self._kind = kind if kind is not None and self._run >= (SETTLE if kind is False else 1) else None
        self._timing_probe = bool(kind) and self._probing
        self._probing = False
        self._last_kind = kind
        if self._kind is False:
            self._since_plain = 0

    def break_even(self) -> float | None:
        """Tokens a verifying step must emit per sequence to beat plain steps (None: not yet known)."""
        return self.ratio

    def probe_gap(self) -> int:
        """Steps a sequence below the break-even waits before it probes: 8 x probe_every, or more
        where a probe costs more than PROBE_SHARE of the plain steps that many take."""
        gap = 8 * self.cfg.probe_every
        if self.probe_ratio:
            gap = max(gap, int((self.probe_ratio - 1) / PROBE_SHARE))
        return gap

    def step_may_speculate(self) -> bool:
        """False until the plain cost is known, and now and then until a plain step is timed: to
        re-measure what one costs."""
        if not self.cfg.adaptive:
            return True
        self._since_plain += 1
        self._quiet += 1
        return self.plain is not None and self._since_plain <= REMEASURE

    def wants(self, seq: Sequence) -> bool:
        """Whether seq drafts this step (called once per step while it decodes)."""
        if not self.cfg.adaptive:
            return True
        drafts = self._decide(seq)
        if self._trace:
            self._trace.write(f"seq {seq.seq_id} out={seq.num_output_tokens} drafts={drafts} bound={self.bound(seq):.2f} "
                              f"break_even={self.ratio and round(self.ratio, 2)} probe_ratio="
                              f"{self.probe_ratio and round(self.probe_ratio, 2)} gap={self.probe_gap()} "
                              f"idle={seq.spec_idle} probes={seq.spec_probes} quiet={self._quiet}\n")
        return drafts

    def _decide(self, seq: Sequence) -> bool:
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
