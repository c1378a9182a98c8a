"""The draft model as a separate Triton model (stages/draft.py), called once per decode step for the
whole batch: over the stage's node-local socket (ipc://..., stages/draft_channel.py) or a gRPC
endpoint (host:port, through tritonserver). Each sequence is sent only the tokens verified since the
draft stage last saw it; ended requests are released in the next call (or one of their own).

A failed call (the draft stage restarting, a timeout) costs only speed: the step goes on without
drafts, and the stage is not called again for `BACKOFF_S`. Decode's output never depends on it."""

from __future__ import annotations

import logging
import os
import time

from ..engine.sequence import Sequence
from ..serving.tensors import DRAFT_REPLY
from ..stages.draft_channel import DraftChannel
from ..stages.loopback import Loopback
from ..stages.messages import DraftCall, DraftReply
from .proposer import Proposer

log = logging.getLogger("baton.spec")

BACKOFF_S = 5.0
TIMEOUT_S = 5.0


class RemoteDraftProposer(Proposer):
    def __init__(self, address: str, stage_key: str, model: str = "draft") -> None:
        if address.startswith("ipc://"):
            self.calls: DraftChannel | Loopback = DraftChannel(address, TIMEOUT_S)
        else:
            self.calls = Loopback(address, TIMEOUT_S, stage_key)
        self.model = model
        # keys are unique across the decode processes that may share one draft stage
        self.prefix = (os.getpid() & 0x7FFFFFFF) << 32
        self.sent: dict[int, int] = {}            # seq_id -> verified tokens the draft stage holds
        self.ended: list[int] = []
        self.down_until = 0.0
        self.failures = 0

    def _key(self, seq_id: int) -> int:
        return self.prefix | (seq_id & 0xFFFFFFFF)

    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        if time.monotonic() < self.down_until:
            return [[] for _ in seqs]
        starts = [self.sent.get(s.seq_id, 0) for s in seqs]
        call = DraftCall([self._key(s.seq_id) for s in seqs], starts,
                         [s.token_ids[st:] for s, st in zip(seqs, starts)], k, self.ended)
        reply = self._call(call)
        if reply is None:
            return [[] for _ in seqs]
        self.ended = []
        for s, synced in zip(seqs, reply.synced):
            self.sent[s.seq_id] = synced
        return reply.drafts

    def _call(self, call: DraftCall) -> DraftReply | None:
        try:
            if isinstance(self.calls, DraftChannel):
                out = self.calls.call(call.to_arrays())
            else:
                out = self.calls.call(self.model, call.to_arrays(), [n for n, _, _ in DRAFT_REPLY])
            return DraftReply.from_arrays(out, call.k)
        except Exception as e:                     # noqa: BLE001 - any failure: decode goes on without drafts
            self.failures += 1
            self.down_until = time.monotonic() + BACKOFF_S
            self.sent.clear()                      # the stage may have lost its state: resend everything
            log.warning("draft stage call failed (%s); decoding without drafts for %.0f s", e, BACKOFF_S)
            return None

    def forget(self, live: set[int]) -> None:
        gone = [sid for sid in self.sent if sid not in live]
        for sid in gone:
            del self.sent[sid]
            self.ended.append(self._key(sid))
        if gone and time.monotonic() >= self.down_until:     # free their draft KV now, not at the next step
            if self._call(DraftCall([], [], [], 1, self.ended)) is not None:
                self.ended = []

    def close(self) -> None:
        self.calls.close()
