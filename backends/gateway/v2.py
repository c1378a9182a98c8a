"""Baton's HTTP front: Triton's HTTP/REST protocol (KServe v2 and the generate extension) on the
node's public HTTP port, with the request contract that tritonserver 2.51's own HTTP server does
not keep. tritonserver's HTTP port moves to 127.0.0.1 on an internal port.

- `generate` / `generate_stream` of `llm`: the JSON body is checked here (an object; each input's
  type, range and finiteness; no unknown names), then served over Triton's gRPC streaming, whose
  status codes say whose fault a failure is. So: 400 naming the field for the client's mistakes
  (Triton's parser answered 500, or wrapped integers past INT32), 503 for busy or stopping, 500 for
  server faults (Triton answered 400), one JSON response for `generate` (Triton answered 200 with an
  error body unless `"stream": false`), JSON error bodies, and a client that disconnects cancels its
  request (Triton 2.51 only notices when it writes).
- Everything else (health, metadata, infer, statistics, the admin APIs with their key...): passed
  to tritonserver as it came, its body bounded (a large form-encoded body crashes tritonserver 2.51),
  sent as JSON or binary, never as a form; a JSON `infer` request's numbers checked against each
  input's datatype first, another model's `generate` body must be an object, and a request body that
  tritonserver's parser cannot read is a 400 (it answers 500).

    python -P -m baton.backends.gateway.v2 --triton-grpc 127.0.0.1:8001 --triton-http 127.0.0.1:PORT --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..serving.tensors import SCALARS, STRINGS
from .app import DISCONNECT_POLL_S, Gateway, _body
from .protocol import APIError

# the `llm` inputs: (kind, dims) by name
_INT = {"TYPE_INT32": (-(2**31), 2**31 - 1), "TYPE_INT64": (-(2**63), 2**63 - 1), "TYPE_UINT64": (0, 2**64 - 1)}
_NP = {"TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32,
       "TYPE_BOOL": np.bool_}
INPUTS: dict[str, tuple[str, int]] = {n: (t, 1) for n, t in SCALARS} | {n: ("TYPE_STRING", d) for n, d in STRINGS} \
    | {"stream": ("TYPE_BOOL", 1)}
FRONT_MODELS = ("llm",)                       # served here over gRPC; any other model goes to tritonserver
_GENERATE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/(generate|generate_stream)$")
_INFER = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?/infer$")
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-type", "accept-encoding"}
# Triton's JSON datatypes with numbers: the range each must fit
_DATATYPES = {"INT8": (-(2**7), 2**7 - 1), "INT16": (-(2**15), 2**15 - 1), "INT32": (-(2**31), 2**31 - 1),
              "INT64": (-(2**63), 2**63 - 1), "UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1),
              "UINT32": (0, 2**32 - 1), "UINT64": (0, 2**64 - 1)}


def llm_arrays(body: Any) -> dict[str, np.ndarray]:
    """A generate request's JSON as the `llm` model's input tensors; every mistake is a 400 naming
    the field. `parameters` (NVIDIA's vLLM-backend clients put sampling there) count as inputs."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object of llm inputs, e.g. {\"text_input\": \"...\"}")
    fields = dict(body)
    params = fields.pop("parameters", {})
    if not isinstance(params, dict):
        raise APIError(400, "parameters: expected a JSON object", "parameters")
    for k in params:
        if k in fields:
            raise APIError(400, f"{k}: given both as an input and in parameters", k)
    fields |= params
    out = {}
    for name, value in fields.items():
        if name not in INPUTS:
            raise APIError(400, f"{name}: unknown input; the llm model takes {', '.join(INPUTS)}", name)
        kind, dims = INPUTS[name]
        out[name] = _array(name, kind, dims, value)
    return out


def _array(name: str, kind: str, dims: int, value: Any) -> np.ndarray:
    if kind == "TYPE_STRING":
        values = value if dims == -1 and isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise APIError(400, f"{name}: expected a string{' or a list of strings' if dims == -1 else ''}, "
                                f"got {json.dumps(value)[:80]}", name)
        return np.array([v.encode() for v in values], dtype=object)
    if isinstance(value, list) and len(value) == 1:      # [x] is accepted for a scalar, as Triton does
        value = value[0]
    if kind == "TYPE_BOOL":
        if not isinstance(value, bool):
            raise APIError(400, f"{name}: expected true or false, got {json.dumps(value)[:80]}", name)
    elif kind in _INT:
        lo, hi = _INT[kind]
        if not isinstance(value, int) or isinstance(value, bool):
            raise APIError(400, f"{name}: expected an integer, got {json.dumps(value)[:80]}", name)
        if not lo <= value <= hi:
            raise APIError(400, f"{name}: {value} is out of range [{lo}, {hi}]", name)
    else:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise APIError(400, f"{name}: expected a number, got {json.dumps(value)[:80]}", name)
        if not math.isfinite(value) or abs(value) > 3.4e38:
            raise APIError(400, f"{name}: expected a finite number, got {value}", name)
    return np.array([value], dtype=_NP[kind])


def check_infer(body: Any) -> None:
    """A JSON `infer` request's numbers against each input's datatype: Triton 2.51 wraps an INT32
    past 2^31 instead of refusing it."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise APIError(400, "the body must be a JSON object with a list of inputs")
    for inp in body.get("inputs", []):
        if not isinstance(inp, dict):
            raise APIError(400, "inputs: each input must be a JSON object")
        rng = _DATATYPES.get(str(inp.get("datatype")))
        data = inp.get("data")
        if rng is None or data is None:
            continue
        for v in _flatten(data):
            if not isinstance(v, int) or isinstance(v, bool) or not rng[0] <= v <= rng[1]:
                raise APIError(400, f"{inp.get('name')}: {json.dumps(v)[:40]} is not a {inp['datatype']} "
                                    f"(an integer in [{rng[0]}, {rng[1]}])", str(inp.get("name")))


def _flatten(x: Any) -> list:
    if isinstance(x, list):
        return [v for e in x for v in _flatten(e)]
    return [x]


def _jsonable(a: np.ndarray) -> Any:
    """One output as Triton's generate extension writes it: one element as a scalar, else a list."""
    vals = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v
            for v in a.reshape(-1)]
    return vals[0] if len(vals) == 1 else vals


def response_json(model: str, out: dict[str, np.ndarray]) -> str:
    d = {"model_name": model, "model_version": "1"} | {k: _jsonable(v) for k, v in out.items()}
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def merge(outs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A stream's responses as the one response of `generate`: text, tokens and logprobs joined; the
    counts and finish reason of the last."""
    last = dict(outs[-1])
    last["text_output"] = np.array([b"".join(o["text_output"].reshape(-1)[0] for o in outs)], dtype=object)
    for k in ("token_ids", "logprobs"):
        last[k] = np.concatenate([o[k].reshape(-1) for o in outs])
    last["num_output_tokens"] = np.array([last["token_ids"].size], dtype=np.int32)
    return last


def _error(e: APIError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


def create_app(gw: Gateway, triton_http: str) -> FastAPI:
    app = FastAPI(title="Baton HTTP front", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
    async def route(request: Request, path: str) -> Response:
        url_path = "/" + path
        m = _GENERATE.match(url_path)
        if m and m.group(1) in FRONT_MODELS and request.method == "POST":
            if m.group(2) not in (None, "1"):
                raise APIError(404, f"{m.group(1)} has version 1 only, not {m.group(2)}")
            return await generate(request, m.group(1), m.group(3) == "generate_stream")
        body = await _body(request)
        content_type = "application/json" if body else None
        inference = request.method == "POST" and bool(m or _INFER.match(url_path))
        if inference and "inference-header-content-length" in request.headers:
            content_type = "application/octet-stream"          # binary tensor data after a JSON header
        elif inference:
            parsed = _parse(body or b"null")
            if m and not isinstance(parsed, dict):
                raise APIError(400, "the body must be a JSON object of the model's inputs")
            if not m:
                check_infer(parsed)
        elif body and request.method in ("POST", "PUT"):
            _parse(body)                                       # JSON, or refused here: never a form
        out = await asyncio.to_thread(_forward, triton_http, request.method, url_path, request.url.query,
                                      {k: v for k, v in request.headers.items() if k.lower() not in _HOP},
                                      body, content_type)
        return _parser_fault_is_400(out) if inference else out

    async def generate(request: Request, model: str, stream: bool) -> Response:
        inputs = llm_arrays(_parse(await _body(request)))
        responses = gw.deltas(inputs)
        if stream:
            try:
                first = await responses.__anext__()
            except StopAsyncIteration:
                raise APIError(500, "the llm model answered nothing") from None
            return StreamingResponse(_sse(model, first, responses), media_type="text/event-stream")
        task = asyncio.ensure_future(_collect(responses))
        while not task.done():                 # a client that leaves cancels its request
            await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
        outs = task.result()
        if not outs:
            raise APIError(500, "the llm model answered nothing")
        return Response(response_json(model, merge(outs)), media_type="application/json")

    return app


async def _collect(responses: AsyncIterator[dict]) -> list[dict]:
    return [o async for o in responses]


async def _sse(model: str, first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """The stream as server-sent events; an error after the first event is the last event. Closed
    early (the client left), `rest` is closed and the gRPC call cancelled."""
    yield f"data: {response_json(model, first)}\n\n".encode()
    try:
        async for out in rest:
            yield f"data: {response_json(model, out)}\n\n".encode()
    except APIError as e:
        yield f"data: {json.dumps({'error': e.message})}\n\n".encode()
    finally:
        await rest.aclose()


# tritonserver 2.51's JSON parser reports a request it cannot read (a value of the wrong JSON type for
# the input's datatype, a missing member) as an internal error, 500: the client's fault, so 400
_PARSER_FAULT = re.compile(rb'^\{"error":"(\[request id: [^\]]*\] )?(Unable to parse|attempt to )')


def _parser_fault_is_400(r: Response) -> Response:
    if r.status_code == 500 and _PARSER_FAULT.match(bytes(r.body)):
        r.status_code = 400
    return r


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None


def _forward(base: str, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
             content_type: str | None) -> Response:
    """One request to tritonserver's own HTTP port, its answer as it is."""
    url = f"http://{base}{path}" + (f"?{query}" if query else "")
    if content_type:
        headers = headers | {"Content-Type": content_type}
    req = urllib.request.Request(url, data=body or None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            status, rheaders, data = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, rheaders, data = e.code, e.headers, e.read()
    except OSError as e:
        return JSONResponse({"error": f"the inference server does not answer: {e}"}, status_code=503)
    keep = {k: v for k, v in rheaders.items() if k.lower() not in _HOP}
    return Response(data, status_code=status, headers=keep, media_type=rheaders.get("Content-Type"))


def main(argv: list[str] | None = None) -> None:
    from ..cli import port_arg

    ap = argparse.ArgumentParser(prog="baton http-front")
    ap.add_argument("--triton-grpc", required=True, help="tritonserver's gRPC address")
    ap.add_argument("--triton-http", required=True, help="tritonserver's own (internal) HTTP address")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=port_arg, default=8000)
    a = ap.parse_args(argv)
    import uvicorn

    from ..runtime import configure_process

    configure_process()
    uvicorn.run(create_app(Gateway(a.triton_grpc, "llm"), a.triton_http), host=a.host, port=a.port,
                log_level="warning")


if __name__ == "__main__":
    main()
