"""decode: ONE continuous-batching engine per model instance over every live request. The loop that
drives it is decode_worker.serve (the only one; it runs on a worker process's main thread); this
class is what one turn of that loop does: adopt arrivals (their KV through the hand-off connector),
drop cancelled requests (their blocks go back to the KV manager), step the engine, and stream each
request's new tokens and text through its sink as TokenDelta messages.

Every streamed response costs the host CPU whatever it carries (~0.6-0.8 ms here across the Python
backend, tritonserver and a gRPC client), and on a small host that CPU comes out of the decode step.
So with more live requests than `responses_per_step`, a request's tokens are sent every
ceil(live / responses_per_step) steps, the requests staggered so that each step sends about that
many responses; its first and last tokens always go at once, and no token is held longer than
MAX_HOLD_S (steps slow down while prefills interleave with them; the worker also releases held
tokens before it waits for a prefill). The tokens are the same either way. 0 streams every token
of every request as its own response."""

from __future__ import annotations

import logging
import math
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from ..engine.detokenizer import Detokenizer
from ..engine.llm_engine import LLMEngine
from ..engine.sequence import Sequence
from ..multimodal.embedding_store import EmbeddingStore
from ..multimodal.remote import RemoteEmbeddings, fetcher
from .messages import KVHandle, TokenDelta
from .metrics import DECODE


class Sink(Protocol):
    def send(self, delta: TokenDelta, final: bool) -> None: ...
    def error(self, message: str, unavailable: bool = False) -> None:
        """End the request with a server-side error (unavailable: the stage itself is gone)."""
    def cancelled(self) -> bool: ...


log = logging.getLogger("decode")

# The longest a coalesced token waits for its response: a human reading a stream sees no gaps below
# ~0.1 s, and a step-count rule alone held tokens 1-2.5 s when prefills slowed the steps down.
MAX_HOLD_S = 0.1


@dataclass
class _Live:
    seq: Sequence
    sink: Sink
    held: TokenDelta | None = None     # output not yet sent: tokens coalesced under load
    held_since: float = 0.0


class DecodeStage:
    def __init__(self, engine: LLMEngine, handle_key: bytes, responses_per_step: int = 0,
                 embeddings: EmbeddingStore | None = None, transfer_host: str = "") -> None:
        """handle_key: the node's secret; a KV handle this node's prefill did not sign, or whose blocks
        the KV manager does not hold for that request (forged, replayed, expired), is refused before
        any block is touched. embeddings: the node's embedding store, where a preempted prompt's
        images are read back when it is recomputed; transfer_host: this node's address for reading
        them from the encode server a handle names instead (EPD, decode on a server of its own)."""
        self.engine = engine
        self.embeddings = embeddings
        self.transfer_host = transfer_host
        self.remote: RemoteEmbeddings | None = None       # made on the first read from an encode server
        # a recomputed image prompt's embeddings are read here, not in the loop (the other streams step on)
        self.reads = ThreadPoolExecutor(1, thread_name_prefix="baton-embed-fetch")
        self.merge = int((engine.config.vision_config or {}).get("spatial_merge_size", 2))
        self.handle_key = handle_key
        self.responses_per_step = responses_per_step
        self.live: dict[int, _Live] = {}
        self.steps = 0
        self.step_s = 0.0
        self.tokens = 0                    # generated tokens streamed out (first tokens included)
        self.to_cancel: set[str] = set()   # request ids cancelled by the front (stages/cancel.py)

    def admit(self, arrivals: list[tuple[KVHandle, Sink]]) -> None:
        """Adopt new sequences; each one's first token (sampled by prefill) goes to its sink now, so a
        caller that flushes before the next step does not delay TTFT by a decode step."""
        for handle, sink in arrivals:
            try:
                problem = self._refuse(handle)
            except Exception as e:             # the KV manager did not answer: this request fails, not the loop
                _log(handle.request_id, f"could not be checked: {e}")
                sink.error(f"decode could not check the KV handle of request {handle.request_id!r}: {e}")
                continue
            if problem:
                _log(handle.request_id, f"refused: {problem}")
                sink.error(f"invalid KV handle for request {handle.request_id!r}: {problem}")
                continue
            try:
                self._admit(handle, sink)
            except Exception:                  # this request fails; its blocks go back, the rest go on
                _log(handle.request_id, "could not be adopted")
                sink.error(f"decode could not adopt request {handle.request_id}: {traceback.format_exc(limit=3)}")
                live = next((sid for sid, lv in self.live.items() if lv.sink is sink), None)
                if live is not None:
                    self.engine.abort(self.live.pop(live).seq.request_id)
                elif handle.block_table:
                    self.engine.block_manager.release(handle.block_table)

    def step_once(self, arrivals: list[tuple[KVHandle, Sink]] = ()) -> None:
        """Admit arrivals, drop cancelled requests, run one engine step and stream its outputs."""
        eng = self.engine
        self.engine_housekeeping()
        self.admit(list(arrivals))
        try:
            self._drop_cancelled()
            if not self.live:
                return
            t = time.perf_counter()
            outs = eng.step()
            self.step_s += time.perf_counter() - t
            self.steps += 1
            finished = False
            every = math.ceil(len(self.live) / self.responses_per_step) if self.responses_per_step else 1
            now = time.monotonic()
            for o in outs:
                live = self.live.get(o.seq.seq_id)
                if live is None:
                    continue
                self.tokens += len(o.new_token_ids)
                if o.error:                        # the engine ended this request alone (engine.StepOutput.error)
                    live.sink.error(o.error)
                    del self.live[o.seq.seq_id]
                    finished = True
                    continue
                delta = _delta(o.seq, o.new_token_ids, o.text).merged_after(live.held)
                if (o.finished or (self.steps + o.seq.seq_id) % every == 0
                        or (live.held is not None and now - live.held_since >= MAX_HOLD_S)):
                    live.sink.send(delta, o.finished)
                    live.held = None
                else:
                    if live.held is None:
                        live.held_since = now
                    live.held = delta
                if o.finished:
                    finished = True
                    del self.live[o.seq.seq_id]
                    log.info("request %s finished: %s, %d tokens", o.seq.request_id, o.seq.finish_reason,
                             o.seq.num_output_tokens)
            if finished:
                eng.block_manager.flush()        # return blocks promptly
        except Exception:                          # keep serving: fail the live requests, not the loop
            self._fail_all()

    def engine_housekeeping(self) -> None:
        """Work the KV connector does between steps (PD: blocks of requests that ended mid-read go
        back once the read is over). The worker also calls it while idle."""
        self.engine.connector.between_steps()

    def release_held(self) -> None:
        """Send every coalesced output now (before the loop waits for something else)."""
        for live in self.live.values():
            if live.held is not None:
                live.sink.send(live.held, False)
                live.held = None

    def _fail_all(self) -> None:
        msg = traceback.format_exc(limit=3)
        for live in list(self.live.values()):
            _log(live.seq.request_id, "failed in a decode step")
            self.engine.abort(live.seq.request_id)
            live.sink.error(f"decode failed: {msg}")
        self.live.clear()

    def _refuse(self, handle: KVHandle) -> str:
        """Why this handle must not be used ("" when it may): checked before its blocks are touched."""
        if not handle.verified(self.handle_key):
            return "not signed by this node's prefill"
        if (handle.block_table and not self.engine.connector.remote(handle)
                and not self.engine.block_manager.claim(handle.request_id, handle.block_table)):
            return "its blocks are not held for it (already used, or expired)"
        return ""

    def _remote(self) -> RemoteEmbeddings:
        if self.remote is None:
            self.remote = RemoteEmbeddings(self.transfer_host)
        return self.remote

    def _admit(self, handle: KVHandle, sink: Sink) -> None:
        eng = self.engine
        fetch = fetcher(self.embeddings.get if self.embeddings else None, self._remote if self.transfer_host else None,
                        handle.embed_source, [s.hash for s in handle.images])
        seq = handle.to_sequence(eng.block_size, self.merge, fetch, self.reads)
        first = seq.output_token_ids
        self.tokens += len(first)
        if handle.finish_reason:                   # prefill already finished it (max_tokens=1, EOS, stop)
            seq.finish_reason = handle.finish_reason
            detok = Detokenizer(eng.tokenizer, seq.token_ids[: seq.num_prompt_tokens], seq.params.stop)
            detok.add(first)
            sink.send(_delta(seq, first, detok.delta(final=True)), True)
            return
        if seq.lora and seq.lora not in eng.loras:  # PD: this node was started without the prefill node's adapter
            raise RuntimeError(f"this decode node has no LoRA adapter {seq.lora!r} (its lora_modules differ "
                               "from the prefill node's)")
        eng.add_sequence(seq, stream_text=True)    # its blocks come in through the hand-off connector
        if seq.detok.stopped:                      # a stop string in the first token
            eng.abort(seq.request_id)
            seq.finish_reason = "stop"
            sink.send(_delta(seq, first, seq.detok.delta(final=True)), True)
            return
        self.live[seq.seq_id] = _Live(seq, sink)
        sink.send(_delta(seq, first, seq.detok.delta()), False)

    def cancel(self, request_ids: list[str]) -> None:
        """Drop these requests at the next step (their sinks get a final `abort` response). Ids of
        requests not live here (finished already, or another worker's) are forgotten at once: the
        front cancels only after decode answered, so a live request is never missed."""
        if request_ids:
            live = {lv.seq.request_id for lv in self.live.values()}
            self.to_cancel.update(r for r in request_ids if r in live)

    def _drop_cancelled(self) -> None:
        for sid, live in list(self.live.items()):
            if live.sink.cancelled() or live.seq.request_id in self.to_cancel:
                self.to_cancel.discard(live.seq.request_id)
                self.engine.abort(live.seq.request_id)        # releases its blocks
                del self.live[sid]
                log.info("request %s cancelled after %d tokens", live.seq.request_id, live.seq.num_output_tokens)
                live.sink.send(_delta(live.seq, [], "").merged_after(live.held), True)

    def stats(self) -> dict:
        return {"steps": self.steps, "ms_per_step": 1e3 * self.step_s / max(1, self.steps), "live": len(self.live),
                "tokens": self.tokens}

    def metrics(self, last: dict) -> dict[str, float]:
        """Counter deltas since the totals in `last` (updated in place) and the running gauge."""
        spec = self.engine.spec_stats
        now = {"baton:decode_steps_total": self.steps, "baton:decode_step_seconds_total": self.step_s,
               "baton:generation_tokens_total": self.tokens, "baton:spec_draft_tokens_total": spec["drafted"],
               "baton:decode_preemptions_total": self.engine.scheduler.num_preemptions,
               "baton:spec_accepted_tokens_total": spec["accepted"], "baton:spec_drafts_total": spec["drafts"]}
        for j, (d, a) in enumerate(zip(spec["drafted_at"], spec["accepted_at"])):
            now[f"baton:spec_draft_tokens_per_position_total|position={j + 1}"] = d
            now[f"baton:spec_accepted_tokens_per_position_total|position={j + 1}"] = a
        now |= self.engine.connector.counters()          # PD: KV read from prefill nodes; the node's KV tiers
        out = {k: (v if DECODE[k.partition("|")[0]][0] == "gauge" else v - last.get(k, 0)) for k, v in now.items()}
        last.update(now)
        sched, bm = self.engine.scheduler, self.engine.block_manager
        waiting = len(sched.waiting) + sum(1 for s in sched.running if s.loading)
        return out | {"baton:decode_running_requests": len(self.live) - waiting, "baton:num_requests_waiting": waiting,
                      "baton:kv_blocks_used": bm.num_blocks - bm.num_free, "baton:kv_blocks_free": bm.num_free}


def _delta(seq: Sequence, new_ids: list[int], text: str) -> TokenDelta:
    return TokenDelta(seq.request_id, list(new_ids), text, seq.finish_reason or "", seq.num_prompt_tokens,
                      seq.num_output_tokens, max(seq.num_cached_tokens, 0),
                      seq.logprobs[-len(new_ids):] if (seq.params.logprobs and new_ids) else [],
                      list(seq.cached_by_tier or []), [seq.spec_drafted, seq.spec_accepted, seq.spec_steps])


def _log(request_id: str, what: str) -> None:
    log.warning("request %s %s", request_id, what)
