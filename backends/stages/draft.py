"""The `draft` stage: a draft model in its own Triton model (own process, instance group and KV
blocks), called by decode once per step for the whole batch (spec/remote.py). It keeps one shadow
of each sequence (spec/shadow.py), so a call carries only the tokens verified since the last one;
rejected drafts are rolled back in place. The node's config names the target it drafts for. Calls
come through Triton's execute() and, from decode on the same node, over the stage's socket
(stages/draft_channel.py): `answer` takes them one at a time."""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..engine.config import ConfigError
from ..engine.llm_engine import resolve_dtype
from ..kv.pool import KVPool
from ..models.config import ModelConfig
from ..runtime import configure_process
from ..serving.config import NodeConfig
from ..spec.config import SpeculativeConfig
from ..spec.draft import DraftModelProposer, shadow_blocks
from .messages import DraftCall, DraftReply

log = logging.getLogger("baton.draft")


class DraftStage:
    def __init__(self, node: NodeConfig) -> None:
        eng = node.engine
        if not eng.speculative or eng.speculative.get("method") != "draft":
            raise ConfigError("speculative.method: the draft stage needs method 'draft' in [engine.speculative]")
        self.cfg = SpeculativeConfig.from_table(eng.speculative)
        configure_process(node.serving.draft_threads or eng.threads)
        target = ModelConfig.from_dir(eng.model)
        pool = KVPool.attach(node.kv_pool)       # as many blocks as the target's pool (plus k per sequence)
        num_blocks = shadow_blocks(pool.spec.num_blocks, eng.max_num_seqs, eng.block_size,
                                   self.cfg.num_speculative_tokens)
        pool.close()
        self.proposer = DraftModelProposer(self.cfg, target.vocab_size, resolve_dtype(eng.dtype, target.torch_dtype),
                                           torch.device(eng.device), eng.block_size,
                                           eng.resolved_max_model_len(target.max_position_embeddings), num_blocks,
                                           eng.pack_weights)
        self.calls = self.tokens = 0
        self._sent, self._next = (0, 0), 0.0
        self.lock = threading.Lock()

    def answer(self, call: DraftCall) -> tuple[DraftReply, dict[str, float] | None]:
        """`run` and the metric deltas due (`metrics`), under the stage's lock: the two channels'
        calls never interleave on the draft model's shadows."""
        with self.lock:
            return self.run(call), self.metrics(force=bool(call.release))

    def run(self, call: DraftCall) -> DraftReply:
        p = self.proposer
        p.release(call.release)
        k = min(max(call.k, 1), self.cfg.num_speculative_tokens)
        drafts = [d or [] for d in p.draft(list(zip(call.keys, call.starts, call.tokens)), k)]
        self.calls += bool(call.keys)
        self.tokens += sum(len(d) for d in drafts)
        return DraftReply(drafts, [p.synced(key) for key in call.keys])

    def metrics(self, force: bool = False) -> dict[str, float] | None:
        """Counter deltas and the blocks gauge, about once a second (each update is IPC in the stub),
        and whenever `force` (a request ended: the gauge should show its blocks freed)."""
        now = time.monotonic()
        if not force and now < self._next:
            return None
        self._next = now + 1.0
        out = {"baton:draft_calls_total": self.calls - self._sent[0], "baton:draft_tokens_total": self.tokens - self._sent[1],
               "baton:draft_kv_blocks_used": self.blocks_in_use}
        self._sent = (self.calls, self.tokens)
        return out

    @property
    def blocks_in_use(self) -> int:
        return self.proposer.dec.bm.num_used

    def close(self) -> None:
        self.proposer.close()
