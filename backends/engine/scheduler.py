"""FCFS continuous batching under a token budget.

Each step: running sequences first (a decode needs 1 token, an unfinished prefill its next chunk),
then waiting sequences are admitted while budget, sequence slots and blocks last. A new sequence
first takes its cached prefix from the block manager and computes only the rest. When a running
sequence needs a block and none is free, the most recently admitted sequence is preempted: its
blocks are released and it is recomputed later (its full blocks usually come back as prefix hits)."""

from __future__ import annotations

from collections import deque

from ..kv.block_manager import BlockManager, OutOfBlocks
from ..kv.connector import KVConnector
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, connector: KVConnector | None = None) -> None:
        self.bm = block_manager
        self.connector = connector or KVConnector()
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return -(-(seq.num_computed_tokens + n) // self.block_size) - len(seq.block_table)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Returns (sequence, number of tokens to compute this step) pairs."""
        budget = self.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.loading:
                if not self.connector.wait(seq):     # its K/V is still on the way: skip it this step
                    i += 1
                    continue
                seq.loading = False
            if seq.mm is not None and not seq.mm.ready(seq.num_computed_tokens):
                i += 1                               # recomputing: its images' embeddings are being read back
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._blocks_needed(seq, n)
            while need > self.bm.num_free and self.running[-1] is not seq:
                self._preempt(self.running.pop())
                preempted = True
            got = self._allocate(need)
            if got is None:
                if len(seq.block_table) + need > self.bm.num_blocks:
                    self.finish(seq, "length")       # the whole pool could not hold it
                    self._finished.append(seq)
                    continue
                self._preempt(self.running.pop(i))  # nothing left to take from: this one waits
                preempted = True
                break
            seq.block_table += got
            out.append((seq, n))
            budget -= n
            i += 1
        # Admitting new work right after a preemption would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and not self._match(seq):
                break
            if seq.loading:                  # admitted; stepped once its K/V is in place
                self.waiting.popleft()
                seq.status = Status.RUNNING
                self.running.append(seq)
                continue
            if seq.mm is not None and not seq.mm.ready(seq.num_computed_tokens):
                break                        # a preempted image prompt: its embeddings are being read back
            n = seq.num_tokens - seq.num_computed_tokens
            if n > budget and not self.chunked:
                break
            n = min(n, budget)
            got = self._allocate(self._blocks_needed(seq, n))
            if got is None:
                break
            seq.block_table += got
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out

    def _allocate(self, n: int) -> list[int] | None:
        """n blocks, or None when the pool has not got them. Asked even when the free count says no:
        a shared pool's count is what its KV manager said last (another stage may have taken or
        given back blocks since), and asking is what refreshes it."""
        try:
            return self.bm.allocate(n)
        except OutOfBlocks:
            return None

    def take_finished(self) -> list[Sequence]:
        """Sequences ended by the scheduler itself since the last call."""
        out, self._finished = self._finished, []
        return out

    def _match(self, seq: Sequence) -> bool:
        """A new (or preempted) sequence's computed prefix: from the connector, else the prefix cache.
        False when the blocks to load external K/V into are not free yet."""
        m = self.connector.matched_external_tokens(seq)
        if m is None:
            self._match_prefix(seq)
            return True
        if m.blocks is not None:                 # already in this pool (in-node hand-off): adopt
            seq.block_table = list(m.blocks)
            self.connector.on_allocated(seq)
            seq.num_published_blocks = m.num_tokens // self.block_size   # published where they were computed
        else:       # allocate now; the connector's worker side fills them (all but blocks this pool caches)
            hit = self.bm.match_prefix(seq.block_hashes[: m.num_tokens // self.block_size]) if m.reuse_cached else []
            got = self._allocate(-(-m.num_tokens // self.block_size) - len(hit))
            if got is None:
                self.bm.release(hit)
                return False
            seq.block_table = hit + got
            seq.num_reused_blocks = len(hit)
            seq.num_published_blocks = len(hit)      # the loaded ones are published here once in place
            seq.loading = True
            self.connector.on_allocated(seq)
            self.connector.start_load([seq])
        seq.num_computed_tokens = m.num_tokens
        return True

    def _match_prefix(self, seq: Sequence) -> None:
        # Leave at least one token to compute: its logits give the next token.
        usable = (seq.num_tokens - 1) // self.block_size
        hit = self.bm.match_prefix(seq.block_hashes[:usable])
        seq.block_table = hit
        seq.num_published_blocks = len(hit)   # already in the index
        seq.num_computed_tokens = len(hit) * self.block_size
        if seq.num_cached_tokens < 0:          # report the first admission, not recomputes
            seq.num_cached_tokens = seq.num_computed_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.bm.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_published_blocks = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Drop a sequence from the queues (finished or aborted) and release its blocks, unless the
        KV connector keeps them (handed on)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        if not seq.block_table:              # ended before admission: blocks the connector already
            m = self.connector.matched_external_tokens(seq)     # holds for it are its own, freed below
            if m is not None and m.blocks:
                seq.block_table = list(m.blocks)
                self.connector.on_allocated(seq)
        if not self.connector.on_finished(seq, reason):
            self.bm.release(seq.block_table)
        seq.block_table = []
        seq.status = Status.FINISHED
        seq.finish_reason = reason
