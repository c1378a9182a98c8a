"""The KV connector that promotes a new sequence's prefix from the lower tiers (kv/tiers.py) into
the pool: at admission it asks the tier stack how far the prompt is cached (the pool's own blocks
first, then L2 -> L3 -> L4); the scheduler reuses the pool's blocks, allocates the rest, and keeps
the sequence in its "loading" state, out of steps, while the stack copies them in on its worker
thread. Other sequences keep computing meanwhile. A block that fails to load ends the run: the
sequence computes the rest itself.

It wraps the connector the stage already has (the in-node hand-off, the PD transfer): a sequence
that arrives with a KV handle is that connector's business. Writes to the tiers need nothing from
here: the stack sees the pool's publishes and evictions where the block manager runs.

`tiers` is a TierStack (offline engine: same process) or a RemoteTiers (a stage: the node's KV
manager owns the stack); both answer lookup / load / poll."""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Protocol

from .connector import ExternalMatch, KVConnector
from .tiers import TIER_NAMES, Lookup

if TYPE_CHECKING:
    from ..engine.sequence import Sequence
    from ..stages.messages import KVHandle

log = logging.getLogger("kv-tiers")

# A load not done this long after it was queued (a tier that hangs, or a worker stuck behind one) is
# given up: the sequence computes its prompt in fresh blocks. The old ones stay pinned by the stack
# until the copy into them ends, so nothing reuses them meanwhile.
LOAD_TIMEOUT_S = 30.0


class Tiers(Protocol):
    def lookup(self, hashes: list[int]) -> Lookup: ...
    def load(self, load_id: str, blocks: list[int], hashes: list[int], tiers: list[int]) -> None: ...
    def poll(self, load_id: str) -> int | None: ...
    def collect(self) -> None: ...
    def stats(self) -> dict[str, dict]: ...


class TierConnector(KVConnector):
    def __init__(self, inner: KVConnector, tiers: Tiers, tier_names: list[str], block_manager: object) -> None:
        """tier_names: the stack's tiers in order (TIER_NAMES entries), for per-tier counts;
        block_manager: where a load given up returns its sequence's blocks."""
        self.inner, self.tiers, self.names, self.bm = inner, tiers, tier_names, block_manager
        self.block_size = block_manager.block_size
        self.plans: dict[int, Lookup] = {}             # seq id -> its lookup, until allocated
        # seq id -> (load id, tier per loaded block, when it was queued)
        self.loading: dict[int, tuple[str, list[int], float]] = {}
        self._ids = itertools.count()

    def remote(self, handle: KVHandle) -> bool:
        return self.inner.remote(handle)

    # ---- scheduler side --------------------------------------------------------------------------
    def matched_external_tokens(self, seq: Sequence) -> ExternalMatch | None:
        if seq.kv_transfer is not None:
            return self.inner.matched_external_tokens(seq)
        usable = (seq.num_tokens - 1) // self.block_size      # leave a token to compute: its logits
        if usable < 1:
            return None
        found = self.tiers.lookup(seq.block_hashes[:usable])
        if not found.tiers:                                   # the pool's own prefix cache covers it
            self.plans.pop(seq.seq_id, None)
            return None
        self.plans[seq.seq_id] = found
        return ExternalMatch((found.pool_blocks + len(found.tiers)) * self.block_size, None, reuse_cached=True)

    def on_allocated(self, seq: Sequence) -> None:
        if seq.seq_id not in self.plans:
            self.inner.on_allocated(seq)

    def on_finished(self, seq: Sequence, reason: str) -> bool:
        self.plans.pop(seq.seq_id, None)
        self.loading.pop(seq.seq_id, None)     # a load in flight pinned its blocks: freeing them is safe
        return self.inner.on_finished(seq, reason)

    # ---- worker side -----------------------------------------------------------------------------
    def start_load(self, seqs: list[Sequence]) -> None:
        rest = []
        for seq in seqs:
            plan = self.plans.pop(seq.seq_id, None)
            if plan is None:
                rest.append(seq)
                continue
            # blocks the pool gave back (seq.num_reused_blocks) may be fewer than the lookup saw, if
            # the pool evicted some since: those are not in a lower tier's plan, so the load stops there
            skip = seq.num_reused_blocks
            first = skip - plan.pool_blocks            # index into plan.tiers of the first block to load
            tiers = plan.tiers[first:] if first >= 0 else []
            blocks = seq.block_table[skip:][: len(tiers)]
            load_id = f"{os.getpid()}.{seq.seq_id}.{next(self._ids)}"     # unique on the node's manager
            self.loading[seq.seq_id] = (load_id, tiers[: len(blocks)], time.monotonic())
            self.tiers.load(load_id, blocks, seq.block_hashes[skip:skip + len(blocks)], tiers[: len(blocks)])
        if rest:
            self.inner.start_load(rest)

    def wait(self, seq: Sequence) -> bool:
        rec = self.loading.get(seq.seq_id)
        if rec is None:
            return self.inner.wait(seq)
        load_id, tiers, queued = rec
        n = self.tiers.poll(load_id)
        if n is None:
            if time.monotonic() - queued < LOAD_TIMEOUT_S:
                return False
            del self.loading[seq.seq_id]
            log.warning("request %s: its KV did not come from the tiers in %.0f s; computing its prompt",
                        seq.request_id, LOAD_TIMEOUT_S)
            self.bm.release(seq.block_table)          # pinned by the stack until its copy ends
            seq.block_table = []
            seq.num_computed_tokens = seq.num_published_blocks = seq.num_reused_blocks = 0
            return True
        del self.loading[seq.seq_id]
        # what is in place: the pool's own blocks, then the loaded run; the rest is computed here
        have = seq.num_reused_blocks + n
        seq.num_computed_tokens = min(seq.num_computed_tokens, have * self.block_size)
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            by_tier = [0] * len(TIER_NAMES)
            by_tier[0] = seq.num_reused_blocks * self.block_size
            for i in tiers[:n]:
                by_tier[TIER_NAMES.index(self.names[i])] += self.block_size
            seq.cached_by_tier = by_tier
        return True

    def save(self, seq: Sequence, blocks: list[int]) -> None:
        self.inner.save(seq, blocks)

    def between_steps(self) -> None:
        self.tiers.collect()
        self.inner.between_steps()

    def counters(self) -> dict[str, float]:
        """The node's tier counters, as the stack counts them: `family|tier=NAME` per tier."""
        out = self.inner.counters()
        for tier, values in self.tiers.stats().items():
            for k, v in values.items():
                if isinstance(v, (int, float)) and not tier.startswith("_"):
                    name = "baton:kv_tier_used_bytes" if k == "used_bytes" else f"baton:kv_tier_{k}_total"
                    out[f"{name}|tier={tier}"] = float(v)
        return out
