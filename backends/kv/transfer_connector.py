"""The KV connector of a PD decode node: a KVHandle made by another node's prefill (its `source`
names that node) gets blocks in this pool and its K/V read over the transfer engine, on a
background thread while the engine keeps stepping its other sequences.

Leading blocks this pool already caches under the same hashes (an earlier request with the same
prefix) are reused, not transferred. Once read, the source is acknowledged (kv/transfer.py): it
releases its blocks, and its "still held" answer proves the read saw intact data. If the read or the
ack fails, the sequence recomputes its prompt here (from the reused prefix on) and still completes."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from .connector import ExternalMatch, HandoffConnector
from .transfer import BlockSource, TransferAgent, TransferError, ack

if TYPE_CHECKING:
    from ..engine.sequence import Sequence
    from ..stages.messages import KVHandle

log = logging.getLogger("kv-transfer")

# A read not done this long after it was queued (its source hangs, alive but silent) is given up:
# the sequence recomputes into fresh blocks, and the old ones go back once the read ends.
LOAD_TIMEOUT_S = 30.0

class TransferConnector(HandoffConnector):
    def __init__(self, agent: TransferAgent, key: bytes, node_id: str, block_bytes: int,
                 block_manager: object | None = None) -> None:
        """block_manager: where blocks of sequences that ended mid-read go back once the read ends."""
        super().__init__("consumer")
        self.agent, self.key, self.node_id, self.block_bytes = agent, key, node_id, block_bytes
        self.block_manager = block_manager
        self.deferred: list[tuple[Future, list[int]]] = []     # reads still writing into freed sequences' blocks
        self.pending: dict[int, KVHandle] = {}                   # seq id -> handle, allocated, not started
        self.loads: dict[int, tuple[Future, float]] = {}          # seq id -> (the read in flight, when queued)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="baton-kv-read")
        # counters (stages/metrics.py reads them): blocks read / reused, bytes, seconds, fallbacks
        self.stats = {"blocks_read": 0, "blocks_reused": 0, "bytes": 0, "seconds": 0.0, "failures": 0}

    def remote(self, handle: KVHandle) -> bool:
        return bool(handle.source) and BlockSource.from_json(handle.source).node_id != self.node_id

    # ---- scheduler side --------------------------------------------------------------------------
    def matched_external_tokens(self, seq: Sequence) -> ExternalMatch | None:
        h = seq.kv_transfer
        if h is None or not self.remote(h):
            return super().matched_external_tokens(seq)
        return ExternalMatch(h.num_computed_tokens, None, reuse_cached=True)

    def on_allocated(self, seq: Sequence) -> None:
        h = seq.kv_transfer
        if h is not None and self.remote(h):
            self.pending[seq.seq_id] = h
        super().on_allocated(seq)

    def on_finished(self, seq: Sequence, reason: str) -> bool:
        self.pending.pop(seq.seq_id, None)
        self.release_finished_reads()
        fut, _ = self.loads.pop(seq.seq_id, (None, 0.0))
        if fut is not None and not fut.done() and self.block_manager is not None:
            # ended while loading (cancelled): the read writes into its blocks until it ends, so they
            # are kept and released then; the loop does not wait for a slow source
            self.deferred.append((fut, list(seq.block_table)))
            return True
        if fut is not None:
            try:
                fut.result()
            except Exception:        # a failed read is harmless here: the blocks are freed anyway
                pass
        return super().on_finished(seq, reason)

    def counters(self) -> dict[str, float]:
        return {f"baton:kv_transfer_{k}_total": v for k, v in self.stats.items()}

    def between_steps(self) -> None:
        self.release_finished_reads()

    def release_finished_reads(self) -> None:
        """Give back the blocks of sequences that ended mid-read, once their reads are over (called
        by the decode loop each turn, also when idle)."""
        if not self.deferred:
            return
        still = []
        for fut, blocks in self.deferred:
            if fut.done():
                self.block_manager.release(blocks)
            else:
                still.append((fut, blocks))
        self.deferred = still

    # ---- worker side -----------------------------------------------------------------------------
    def start_load(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            h = self.pending.pop(seq.seq_id, None)
            if h is None:
                continue
            skip, n = seq.num_reused_blocks, len(h.block_table)
            self.stats["blocks_reused"] += skip
            self.loads[seq.seq_id] = (self.executor.submit(
                self._read, BlockSource.from_json(h.source), h.request_id, list(h.block_table),
                h.block_table[skip:n], seq.block_table[skip:n]), time.monotonic())

    def _read(self, source: BlockSource, request_id: str, held: list[int], remote: list[int],
              local: list[int]) -> int:
        self.agent.deprioritize()        # running streams' steps before this read (kv/transfer.py)
        t = time.perf_counter()
        nbytes = 0
        try:
            if source.block_bytes != self.block_bytes:  # another model or pool layout: its blocks mean nothing here
                raise TransferError(f"{source.node_id}'s blocks are {source.block_bytes} bytes, this pool's "
                                    f"{self.block_bytes}: not the same model and KV layout")
            nbytes = self.agent.read(source, remote, local)
        finally:                     # acknowledged even after a failed read: the source frees them now
            t_read = time.perf_counter()
            still_held = ack(source, self.key, request_id, held)
            log.info("request %s: read %d blocks (%.1f MB) from %s in %.1f ms, ack %.1f ms", request_id, len(remote),
                     nbytes / 1e6, source.node_id, 1e3 * (t_read - t), 1e3 * (time.perf_counter() - t_read))
        if not still_held:
            raise TransferError(f"{source.node_id} no longer held the blocks of request {request_id} (lease expired)")
        self.stats["seconds"] += time.perf_counter() - t
        self.stats["blocks_read"] += len(remote)
        self.stats["bytes"] += nbytes
        return nbytes

    def wait(self, seq: Sequence) -> bool:
        self.release_finished_reads()
        fut, queued = self.loads.get(seq.seq_id, (None, 0.0))
        if fut is None:
            return True
        if not fut.done():
            if time.monotonic() - queued < LOAD_TIMEOUT_S or self.block_manager is None:
                return False
            del self.loads[seq.seq_id]           # the read may still write into these blocks: they wait for it
            self.deferred.append((fut, list(seq.block_table)))
            self.stats["failures"] += 1
            log.warning("request %s: no KV after %.0f s; recomputing its prompt in fresh blocks", seq.request_id,
                        LOAD_TIMEOUT_S)
            seq.block_table = []
            seq.num_computed_tokens = seq.num_published_blocks = seq.num_reused_blocks = 0
            return True
        del self.loads[seq.seq_id]
        try:
            fut.result()
        except Exception as e:
            self.stats["failures"] += 1
            log.warning("request %s: KV transfer failed (%s); recomputing its prompt here", seq.request_id, e)
            seq.num_computed_tokens = seq.num_reused_blocks * seq.block_size
            seq.num_published_blocks = seq.num_reused_blocks
        return True

    def close(self) -> None:
        self.executor.shutdown(wait=True)
