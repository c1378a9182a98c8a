"""prefill: prefix match -> allocate -> run the uncached part of each prompt (chunked, batched across
the requests of one execute) -> sample the first token -> publish the full blocks -> hand the
sequence over as a KVHandle. Its blocks stay allocated: decode owns them from here."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np

from ..engine.errors import InvalidRequestError
from ..engine.llm_engine import LLMEngine
from ..engine.sampling_params import SamplingParams
from .cores import CoreShare
from .handle import KVHandle
from .metrics import Deltas


class PrefillStage:
    def __init__(self, engine: LLMEngine, cores: CoreShare | None = None) -> None:
        self.engine = engine
        self.cores = cores
        self.metrics = Deltas()

    def run(self, batch: list[tuple[np.ndarray, str]]) -> list[KVHandle | Exception]:
        t0 = time.perf_counter()
        out = self._run(batch)
        m = self.metrics
        m.add("baton_prefill_seconds_total", time.perf_counter() - t0)
        for h in out:
            if isinstance(h, KVHandle):
                m.add("baton_prefill_requests_total", 1)
                m.add("baton_prompt_tokens_total", h.num_prompt_tokens)
                m.add("baton_cached_prompt_tokens_total", max(h.num_cached_tokens, 0))
        return out

    def _run(self, batch: list[tuple[np.ndarray, str]]) -> list[KVHandle | Exception]:
        eng = self.engine
        seqs: list = []
        for ids, sampling in batch:
            try:
                params = SamplingParams(**json.loads(sampling))
                seqs.append(eng.add_request([int(t) for t in ids], params, request_id=uuid.uuid4().hex))
            except (InvalidRequestError, ValueError, TypeError) as e:
                seqs.append(e)
        pending = {s.seq_id for s in seqs if not isinstance(s, Exception)}
        try:
            while pending:
                if self.cores:
                    self.cores.busy()
                for out in eng.step():
                    s = out.seq
                    if s.seq_id in pending:
                        pending.discard(s.seq_id)
                        if not out.finished:
                            eng.detach(s)            # stop here: decode continues on the same blocks
        except Exception as e:                       # e.g. the pool cannot hold these prompts
            for s in seqs:
                if not isinstance(s, Exception) and s.seq_id in pending:
                    eng.abort(s.request_id)
            seqs = [e if (not isinstance(s, Exception) and s.seq_id in pending) else s for s in seqs]
        finally:
            if self.cores:
                self.cores.idle()
            eng.block_manager.flush(idle=True)           # publish prompt blocks, release the rest
        return [s if isinstance(s, Exception) else KVHandle.from_sequence(s) for s in seqs]
