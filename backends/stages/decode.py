"""decode: ONE continuous-batching loop per model instance over every live request.

execute() only hands a request's KVHandle and response sink to `submit` and returns; a loop thread
adopts new sequences, drops cancelled ones (their blocks go back to the KV manager), steps the
engine and streams each sequence's new tokens and text through its sink.

Every streamed response costs the host CPU whatever it carries (~0.6-0.8 ms here across the Python
backend, tritonserver and a gRPC client), and on a small host that CPU comes out of the decode step.
So with more live requests than `responses_per_step`, a request's tokens are sent every
ceil(live / responses_per_step) steps, the requests staggered so that each step sends about that
many responses; its first and last tokens always go at once, and no token is held longer than
MAX_HOLD_S (steps slow down while prefills interleave with them; the worker also releases held
tokens before it waits for a prefill). The tokens are the same either way. 0 streams every token
of every request as its own response."""

from __future__ import annotations

import math
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Protocol

from ..engine.detokenizer import Detokenizer
from ..engine.llm_engine import LLMEngine
from ..engine.sequence import Sequence
from .handle import KVHandle


class Sink(Protocol):
    def send(self, out: dict, final: bool) -> None: ...
    def error(self, message: str) -> None: ...
    def cancelled(self) -> bool: ...


# The longest a coalesced token waits for its response: a human reading a stream sees no gaps below
# ~0.1 s, and a step-count rule alone held tokens 1-2.5 s when prefills slowed the steps down.
MAX_HOLD_S = 0.1


@dataclass
class _Live:
    seq: Sequence
    sink: Sink
    held: dict | None = None           # output not yet sent: tokens coalesced under load
    held_since: float = 0.0


def _merge(held: dict | None, out: dict) -> dict:
    """`out` appended to the output held back before it (usage and finish reason are the newest)."""
    if held is None:
        return out
    return out | {"token_ids": held["token_ids"] + out["token_ids"], "text": held["text"] + out["text"],
                  "logprobs": held["logprobs"] + out["logprobs"]}


class DecodeStage:
    def __init__(self, engine: LLMEngine, thread: bool = True, responses_per_step: int = 0) -> None:
        """thread=True runs the loop on a thread of this process (tests, in-process use); the Triton
        model instead drives `step_once` from the main thread of a worker process (decode_worker):
        OpenMP parallel regions entered from a non-initial thread cost ~30% more here."""
        self.engine = engine
        self.responses_per_step = responses_per_step
        self.cv = threading.Condition()
        self.inbox: list[tuple[KVHandle, Sink]] = []
        self.live: dict[int, _Live] = {}
        self.stopping = False
        self.steps = 0
        self.step_s = 0.0
        self.tokens = 0                    # generated tokens streamed out (first tokens included)
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self._loop, name="baton-decode", daemon=True)
            self.thread.start()

    def submit(self, handle: KVHandle, sink: Sink) -> None:
        with self.cv:
            self.inbox.append((handle, sink))
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(5)

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self.cv:
                while not self.stopping and not self.inbox and not self.live:
                    eng.block_manager.flush(idle=True)     # idle: hold no blocks
                    self.cv.wait(0.5)
                if self.stopping:
                    return
                arrivals, self.inbox = self.inbox, []
            self.step_once(arrivals)

    def admit(self, arrivals: list[tuple[KVHandle, Sink]]) -> None:
        """Adopt new sequences; each one's first token (sampled by prefill) goes to its sink now, so a
        caller that flushes before the next step does not delay TTFT by a decode step."""
        for handle, sink in arrivals:
            try:
                self._admit(handle, sink)
            except Exception:                  # this request fails; its blocks go back, the rest go on
                sink.error(f"decode could not adopt the request: {traceback.format_exc(limit=3)}")
                live = next((sid for sid, lv in self.live.items() if lv.sink is sink), None)
                if live is not None:
                    self.engine.abort(self.live.pop(live).seq.request_id)
                elif handle.block_table:
                    self.engine.block_manager.release(handle.block_table)

    def step_once(self, arrivals: list[tuple[KVHandle, Sink]] = ()) -> None:
        """Admit arrivals, drop cancelled requests, run one engine step and stream its outputs."""
        eng = self.engine
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
                out = _merge(live.held, self._output(o.seq, o.new_token_ids, o.text))
                if (o.finished or (self.steps + o.seq.seq_id) % every == 0
                        or (live.held is not None and now - live.held_since >= MAX_HOLD_S)):
                    live.sink.send(out, o.finished)
                    live.held = None
                else:
                    if live.held is None:
                        live.held_since = now
                    live.held = out
                if o.finished:
                    finished = True
                    del self.live[o.seq.seq_id]
            if finished:
                eng.block_manager.flush()        # return blocks promptly
        except Exception:                          # keep serving: fail the live requests, not the loop
            self._fail_all()

    def release_held(self) -> None:
        """Send every coalesced output now (before the loop waits for something else)."""
        for live in self.live.values():
            if live.held is not None:
                live.sink.send(live.held, False)
                live.held = None

    def _fail_all(self) -> None:
        msg = traceback.format_exc(limit=3)
        for live in list(self.live.values()):
            self.engine.abort(live.seq.request_id)
            live.sink.error(f"decode failed: {msg}")
        self.live.clear()

    def _admit(self, handle: KVHandle, sink: Sink) -> None:
        eng = self.engine
        seq = handle.to_sequence(eng.block_size, uuid.uuid4().hex)
        seq.detok = Detokenizer(eng.tokenizer, seq.token_ids[: seq.num_prompt_tokens], seq.params.stop)
        first = seq.output_token_ids
        self.tokens += len(first)
        seq.detok.add(first)
        done = handle.finish_reason or ("stop" if seq.detok.stopped else "")
        if done:                                       # prefill already finished it (or a stop string did)
            seq.finish_reason = done
            if seq.block_table:
                eng.block_manager.release(seq.block_table)
                seq.block_table = []
            sink.send(self._output(seq, first, seq.detok.delta(final=True)), True)
            return
        eng.adopt(seq)
        self.live[seq.seq_id] = _Live(seq, sink)
        sink.send(self._output(seq, first, seq.detok.delta()), False)

    def _drop_cancelled(self) -> None:
        for sid, live in list(self.live.items()):
            if live.sink.cancelled():
                self.engine.abort(live.seq.request_id)        # releases its blocks
                del self.live[sid]
                live.sink.send(_merge(live.held, self._output(live.seq, [], "")), True)

    @staticmethod
    def _output(seq: Sequence, new_ids: list[int], text: str) -> dict:
        return {
            "token_ids": list(new_ids), "text": text, "finish_reason": seq.finish_reason or "",
            "prompt_tokens": seq.num_prompt_tokens, "completion_tokens": seq.num_output_tokens,
            "cached_tokens": max(seq.num_cached_tokens, 0),
            "logprobs": seq.logprobs[-len(new_ids):] if (seq.params.logprobs and new_ids) else [],
        }

    def stats(self) -> dict:
        return {"steps": self.steps, "ms_per_step": 1e3 * self.step_s / max(1, self.steps), "live": len(self.live),
                "tokens": self.tokens}

    def metrics(self, last: dict) -> dict[str, float]:
        """Counter deltas since the totals in `last` (updated in place) and the running gauge."""
        now = {"baton_decode_steps_total": self.steps, "baton_decode_step_seconds_total": self.step_s,
               "baton_generation_tokens_total": self.tokens}
        out = {k: v - last.get(k, 0) for k, v in now.items()}
        last.update(now)
        return out | {"baton_decode_running_requests": len(self.live)}
