"""`baton gateway`: an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
/health) in front of a node's `llm` model, which it calls over gRPC streaming. Each choice is one
`llm` request; a client that disconnects cancels its requests (the gRPC call is cancelled, and the
llm front tells decode to drop them)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from tritonclient.grpc import service_pb2_grpc

from ..serving.tensors import SCALARS, STRINGS, USER
from ..stages.loopback import MAX_MESSAGE_BYTES, decode, encode
from .protocol import APIError, ChatRequest, CompletionRequest, llm_inputs, param_of, parse

MAX_BODY_BYTES = 8 << 20            # a request body past this is refused from its Content-Length
DISCONNECT_POLL_S = 0.1             # how often a non-streaming request checks that its client is still there
_FIELDS = [n for n, _, _ in USER]
# The server's own validation messages start with the llm input they name ("max_tokens: ...").
_CLIENT_FIELDS = {n for n, _ in SCALARS} | {n for n, _ in STRINGS}
_UNAVAILABLE = ("server busy", "shutting down", "request_timeout_s", "not healthy", "unavailable", "exited")


def classify(message: str) -> APIError:
    """A Triton error as the HTTP error a client should see: its fault (400, naming the parameter) only
    when the server's validation named an input; busy or stopping: 503; anything else: 500."""
    head = message.split(":", 1)[0].strip()
    head = head.split("[", 1)[0] if head.endswith("]") else head     # "image[1]": the input's element
    if head in _CLIENT_FIELDS:
        return APIError(400, message, param_of(head))
    if any(s in message for s in _UNAVAILABLE):
        return APIError(503, message)
    return APIError(500, message)


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    counts_prompt: bool = True       # the first choice of its prompt (usage counts each prompt once)


class Gateway:
    def __init__(self, triton_address: str, model_name: str, tokenizer: Any = None, loras: Sequence[str] = ()) -> None:
        """loras: the LoRA adapters the node serves; a request names one as its `model`, as with vLLM."""
        self.address, self.model_name, self.tokenizer = triton_address, model_name, tokenizer
        self.loras = list(loras)
        self.channel: grpc.aio.Channel | None = None

    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if self.channel is None:         # made on the server's event loop
            self.channel = grpc.aio.insecure_channel(self.address, options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        return service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def deltas(self, inputs: dict) -> AsyncIterator[dict]:
        """One `llm` request's responses. Closed early (the client left), the call is cancelled."""
        call = self.stub().ModelStreamInfer(iter([encode("llm", inputs, _FIELDS)]))
        try:
            async for r in call:
                if r.error_message:
                    raise classify(r.error_message)
                yield decode(r.infer_response)
        except grpc.aio.AioRpcError as e:
            raise APIError(503 if e.code() == grpc.StatusCode.UNAVAILABLE else 500,
                           f"the inference server: {e.details()}") from None
        finally:
            call.cancel()

    def check_model(self, name: str) -> str:
        """The LoRA adapter a request's `model` names ("": the base model)."""
        if name == self.model_name:
            return ""
        if name in self.loras:
            return name
        has = ", ".join(f"`{n}`" for n in [self.model_name, *self.loras])
        raise APIError(404, f"The model `{name}` does not exist (this server has {has})", "model", "model_not_found")

    def token_texts(self, ids: list[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]


def _scalar(a: Any) -> Any:
    v = a.reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else v.item()


def _update(c: Choice, out: dict) -> str:
    """Fold one response into its choice; returns its text delta."""
    delta = _scalar(out["text_output"])
    c.text += delta
    c.token_ids += out["token_ids"].tolist()
    c.logprobs += out["logprobs"].tolist()
    c.finish_reason = _finish(_scalar(out["finish_reason"])) or None
    c.prompt_tokens, c.completion_tokens = int(_scalar(out["prompt_tokens"])), int(_scalar(out["completion_tokens"]))
    c.cached_tokens = int(_scalar(out["cached_tokens"]))
    return delta


def _finish(reason: str) -> str:
    return {"abort": "stop", "cancelled": "stop"}.get(reason, reason)


def _usage(choices: list[Choice]) -> dict:
    prompt = sum(c.prompt_tokens for c in choices if c.counts_prompt)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in choices if c.counts_prompt)}}


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="Baton OpenAI gateway", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        base = {"id": gw.model_name, "object": "model", "created": 0, "owned_by": "baton"}
        return {"object": "list", "data": [base] + [base | {"id": n, "parent": gw.model_name} for n in gw.loras]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await _body(request))
        lora = gw.check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: must not be empty", "prompt")
        jobs = [(k, llm_inputs(req, p, k, lora)) for p in prompts for k in range(req.n)]
        return await _serve(gw, request, req, jobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse(ChatRequest, await _body(request))
        lora = gw.check_model(req.model)
        return await _serve(gw, request, req, [(k, llm_inputs(req, None, k, lora)) for k in range(req.n)], chat=True)

    return app


async def _body(request: Request) -> bytes:
    """The body, refused (413) from its declared length, or as soon as a chunked one grows past the limit."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    return bytes(data)


async def _serve(gw: Gateway, request: Request, req: Any, jobs: list[tuple[int, dict]], chat: bool) -> Response:
    """`jobs`: (k, inputs) per choice, k = its number among its prompt's n choices."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    choices = [Choice(i, counts_prompt=k == 0) for i, (k, _) in enumerate(jobs)]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = _Stream(gw, jobs, choices)
        first = await stream.queue.get()
        if isinstance(first, APIError):             # refused before any token: a real HTTP status
            stream.cancel()
            raise first
        return StreamingResponse(_sse(gw, rid, created, req.model, stream, first, chat, include_usage),
                                 media_type="text/event-stream")
    task = asyncio.ensure_future(_run_all(gw, jobs, choices))
    while not task.done():                 # a client that leaves cancels its requests
        await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)
    task.result()
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model, "choices": [_final_choice(gw, c, chat) for c in choices], "usage": _usage(choices)}
    return JSONResponse(body)


async def _run_all(gw: Gateway, jobs: list[tuple[int, dict]], choices: list[Choice]) -> None:
    async def one(c: Choice, inputs: dict) -> None:
        async for out in gw.deltas(inputs):
            _update(c, out)

    await asyncio.gather(*(one(c, inputs) for c, (_, inputs) in zip(choices, jobs)))


def _logprobs(gw: Gateway, c: Choice, ids: list[int], lps: list[float], chat: bool) -> dict:
    texts = gw.token_texts(ids)
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in zip(texts, lps)]}
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": None, "text_offset": None}


def _final_choice(gw: Gateway, c: Choice, chat: bool) -> dict:
    lp = _logprobs(gw, c, c.token_ids, c.logprobs, chat) if c.logprobs else None
    if chat:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                "finish_reason": c.finish_reason}
    return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}


class _Stream:
    """The choices' requests running at once, their deltas (or errors, then None at each end) in one queue."""

    def __init__(self, gw: Gateway, jobs: list[tuple[int, dict]], choices: list[Choice]) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = choices
        self.tasks = [asyncio.ensure_future(self._one(gw, c, inputs)) for c, (_, inputs) in zip(choices, jobs)]

    async def _one(self, gw: Gateway, c: Choice, inputs: dict) -> None:
        try:
            async for out in gw.deltas(inputs):
                n_before = len(c.token_ids)
                delta = _update(c, out)
                self.queue.put_nowait((c, delta, c.token_ids[n_before:], c.logprobs[n_before:]))
        except APIError as e:
            self.queue.put_nowait(e)
        finally:
            self.queue.put_nowait(None)

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()


async def _sse(gw: Gateway, rid: str, created: int, model: str, stream: _Stream, first: Any, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                                "choices": choice_list}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(stream.tasks))])
        running, item = len(stream.tasks), first
        while True:
            if item is None:
                running -= 1
            elif isinstance(item, APIError):        # the stream has started: the error goes in band
                yield f"data: {json.dumps(item.body())}\n\n"
            else:
                c, delta, ids, lps = item
                lp = _logprobs(gw, c, ids, lps, chat) if lps else None
                if chat:
                    yield chunk([{"index": c.index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                                  "finish_reason": c.finish_reason}])
                else:
                    yield chunk([{"index": c.index, "text": delta, "logprobs": lp, "finish_reason": c.finish_reason}])
            if not running:
                break
            item = await stream.queue.get()
        if include_usage:
            yield chunk([], _usage(stream.choices))
        yield "data: [DONE]\n\n"
    finally:                                        # the client left (or we are done): stop every request
        stream.cancel()
