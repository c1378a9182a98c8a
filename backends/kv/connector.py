"""The KV connector: how a sequence's KV blocks come into this engine from elsewhere, and leave it.
After vLLM v1's split into a scheduler side and a worker side; Baton's own interface.

Scheduler side (called by the Scheduler as it admits and finishes sequences):
  matched_external_tokens(seq) -> ExternalMatch | None   tokens whose K/V exist outside this engine's
                                                          own computation (and where)
  on_allocated(seq)                                       blocks for those tokens are in seq.block_table
                                                          (adopted or allocated): the match is used up
  on_finished(seq, reason) -> bool                        True: keep the blocks (the connector now owns
                                                          them), False: free them as usual
Worker side (called by the engine around the model step):
  start_load(seqs)        begin copying external K/V into the allocated blocks
  wait(seq) -> bool       True once seq's K/V is in place (the scheduler keeps it out of steps until then)
  save(seq, blocks)       computed full blocks that may be sent elsewhere

Implementations: HandoffConnector (the in-node prefill -> decode hand-off, below: blocks already sit
in the node's shared pool, so nothing is copied); later the Mooncake transfer engine (PD across
servers) and the tier stores (host shm, Mooncake Store, files/Redis)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.sequence import Sequence
    from ..stages.messages import KVHandle

# The engine's internal finish reason of a prefill-only sequence: its first token is sampled and its
# K/V handed on; the request itself goes on elsewhere.
HANDOFF = "handoff"


@dataclass
class ExternalMatch:
    num_tokens: int                  # leading tokens whose K/V exist outside this engine
    blocks: list[int] | None = None  # blocks of this pool that already hold them (None: allocate, then load)
    reuse_cached: bool = False       # allocating: take leading blocks this pool caches by hash instead of loading them


class KVConnector:
    """No external KV: every method is the identity. The base of the implementations."""

    def remote(self, handle: KVHandle) -> bool:
        """Whether a handle's blocks live on another node (read from there; nothing to claim here)."""
        return False

    # ---- scheduler side --------------------------------------------------------------------------
    def matched_external_tokens(self, seq: Sequence) -> ExternalMatch | None:
        return None

    def on_allocated(self, seq: Sequence) -> None:
        pass

    def on_finished(self, seq: Sequence, reason: str) -> bool:
        return False

    # ---- worker side -----------------------------------------------------------------------------
    def start_load(self, seqs: list[Sequence]) -> None:
        pass

    def wait(self, seq: Sequence) -> bool:
        return True

    def save(self, seq: Sequence, blocks: list[int]) -> None:
        pass

    def between_steps(self) -> None:
        """Work done on the engine's thread between steps (and while idle)."""

    def counters(self) -> dict[str, float]:
        """Running totals the serving stage exports as metrics (Prometheus name -> value)."""
        return {}


class HandoffConnector(KVConnector):
    """Prefill and decode of one node share its pool, so a hand-off moves block ids, not K/V.

    producer (the prefill stage's engine): every sequence ends after its first token; its KVHandle
    goes to `seq.kv_handle`, and it keeps its blocks when it ended with HANDOFF (decode goes on) and
    frees them when it really finished (EOS, max_tokens=1, a stop string). consumer (decode's
    engine): a sequence that arrives with a handle (`seq.kv_transfer`) adopts the handle's blocks as
    its computed prefix, once; after a preemption it recomputes like any other sequence."""

    def __init__(self, role: str) -> None:
        if role not in ("producer", "consumer"):
            raise ValueError(f"role must be 'producer' or 'consumer', not {role!r}")
        self.role = role

    def on_finished(self, seq: Sequence, reason: str) -> bool:
        if self.role != "producer":
            return False
        from ..stages.messages import KVHandle

        keep = reason == HANDOFF
        seq.kv_handle = KVHandle.from_sequence(seq, "" if keep else reason, seq.block_table if keep else [])
        return keep

    def matched_external_tokens(self, seq: Sequence) -> ExternalMatch | None:
        handle: KVHandle | None = seq.kv_transfer
        if handle is None:
            return None
        return ExternalMatch(handle.num_computed_tokens, list(handle.block_table))

    def on_allocated(self, seq: Sequence) -> None:
        seq.kv_transfer = None            # the blocks are adopted once; a preempted sequence recomputes
