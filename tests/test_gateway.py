"""The OpenAI-compatible gateway (`baton gateway`) in front of a live node, driven by the official
`openai` SDK (sync and async, streaming and not) and by raw HTTP for what the SDK never sends."""

import asyncio
import json
import socket
import time
import urllib.request

import openai
import pytest
from test_serving import _wait_blocks_free

pytestmark = pytest.mark.slow

PROMPT = "def fibonacci(n):"
# long enough that a request cancelled by a disconnect cannot finish first (2000 tokens take seconds)
NODE_OVERRIDES = {"max_model_len": 2048, "max_tokens_limit": 2000, "kv_cache_memory_mb": 16}


@pytest.fixture(scope="module")
def model(qwen3_dir):
    return qwen3_dir.resolve().name


def _client(node, cls=openai.OpenAI):
    return cls(base_url=f"http://{node.gateway_url}/v1", api_key="unused", max_retries=0)


def test_completions_match_the_engine_streamed_or_not(node, offline, model):
    client = _client(node)
    expect = offline(PROMPT, max_tokens=16, ignore_eos=False)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == expect.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == len(expect.prompt_token_ids)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expect.text
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    assert [m.id for m in client.models.list().data] == [model]


def test_chat_streams_the_same_text_as_it_returns_and_n_gives_n_choices(node, model):
    client = _client(node)
    msgs = [{"role": "user", "content": "Write a stack class."}]
    whole = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, logprobs=True)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 12
    lps = whole.choices[0].logprobs.content
    assert len(lps) == 12 and all(t.logprob <= 0 for t in lps) and "".join(t.token for t in lps) == text
    streamed = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == "length"
    three = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, n=3)
    assert sorted(c.index for c in three.choices) == [0, 1, 2]
    assert all(c.message.content == text for c in three.choices) and three.usage.completion_tokens == 36


def test_async_client_streams(node, offline, model):
    async def run():
        client = _client(node, openai.AsyncOpenAI)
        stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        await client.close()
        return text

    assert asyncio.run(run()) == offline(PROMPT, max_tokens=16, ignore_eos=False).text


def test_vllms_extra_sampling_parameters_reach_the_engine(node, offline, model):
    """top_k, min_p, repetition_penalty, min_tokens and ignore_eos, as vLLM's server takes them (the
    SDK's extra_body): the engine's tokens for the same parameters, which differ from those without."""
    extra = {"top_k": 1, "min_p": 0.05, "repetition_penalty": 1.5, "min_tokens": 12, "ignore_eos": True}
    client = _client(node)
    prompt = "a a a a a a a a"                 # greedy repeats itself here, unless penalized
    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=1.0, seed=5,
                                  extra_body=extra)
    want = offline(prompt, max_tokens=12, temperature=1.0, seed=5, **extra)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == 12
    assert want.token_ids != offline(prompt, max_tokens=12, temperature=1.0, seed=5, top_k=1).token_ids
    assert want.token_ids != offline(prompt, max_tokens=12, temperature=1.0, seed=5, repetition_penalty=1.5).token_ids
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          extra_body={"min_tokens": 3, "ignore_eos": True, "top_k": 1})
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
    # unserved parameters at their defaults, as frameworks send them, change nothing
    same = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          response_format={"type": "text"}, tools=[], tool_choice="none",
                                          logit_bias={}, extra_body={"min_tokens": 3, "ignore_eos": True, "top_k": 1})
    assert same.choices[0].message.content == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="tools: not supported by this server"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def _post(node, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{node.gateway_url}{path}", data=data,
                                 headers={"Content-Type": "application/json"} | (headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "hi", "max_tokens": 2}, 400, "model"),                              # missing
    ({"model": "?", "prompt": "hi"}, 404, "model"),
    ({"model": "M", "prompt": "hi", "temprature": 0.5}, 400, "temprature"),          # misspelled
    ({"model": "M", "prompt": "hi", "temperature": "0.5"}, 400, "temperature"),      # a string for a number
    ({"model": "M", "prompt": 5}, 400, "prompt"),
    ({"model": "M", "prompt": "hi", "max_tokens": 2**31}, 400, "max_tokens"),        # never wrapped
    ({"model": "M", "prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"model": "M", "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ({"model": "M", "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": "M", "prompt": "hi", "max_tokens": 2001}, 400, "max_tokens"),         # the server's limit
    ({"model": "M", "prompt": "x " * 2100}, 400, "prompt"),                           # past max_model_len
    ({"model": "M", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": "M", "prompt": "hi", "logprobs": 3}, 400, "logprobs"),                # top alternatives: not served
    ({"model": "M", "prompt": "hi", "top_k": -2}, 400, "top_k"),                     # vLLM's extras
    ({"model": "M", "prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (b'{"model": "M", "prompt": "hi", "repetition_penalty": Infinity}', 400, "repetition_penalty"),
    ({"model": "M", "prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"model": "M", "prompt": "hi", "min_tokens": 300}, 400, "min_tokens"),         # past max_tokens: the server's
    ({"model": "M", "prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format"),  # unserved
])
def test_bad_requests_get_openai_errors_naming_the_param(node, model, body, status, param):
    if isinstance(body, dict) and body.get("model") == "M":
        body = body | {"model": model}
    for stream in (False, True):
        b = body | {"stream": True} if stream and isinstance(body, dict) else body
        got, out = _post(node, "/v1/completions", b)
        assert got == status, out
        assert out["error"]["param"] == param and out["error"]["message"], out
        assert out["error"]["type"] == "invalid_request_error"
    assert _client(node).completions.create(model=model, prompt="ok", max_tokens=2,
                                            temperature=0).usage.completion_tokens == 2


def test_an_oversized_body_is_refused_from_its_length(node):
    s = socket.create_connection(node.gateway_url.split(":"))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000000\r\n\r\n{")
    reply = s.recv(4096)
    s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply


def _raw_stream(node, path, body):
    s = socket.create_connection(node.gateway_url.split(":"))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_a_client_that_disconnects_cancels_its_request(node, model):
    """Streaming: the SSE connection closed after the first chunk. Not streaming: closed while the
    gateway waits. Either way decode drops the request (its log says cancelled) and frees its blocks."""
    log = node.run_dir / "tritonserver.log"
    for stream in (True, False):
        before = log.read_text(errors="replace").count("cancelled after")
        s = _raw_stream(node, "/v1/completions", {"model": model, "prompt": "def long_function():",
                                                  "max_tokens": 2000, "temperature": 0, "stream": stream})
        if stream:
            got = b""
            while b"data:" not in got:
                got += s.recv(4096)
        else:
            time.sleep(0.05)
        s.close()
        deadline = time.monotonic() + 10
        while log.read_text(errors="replace").count("cancelled after") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text(errors="replace").count("cancelled after") == before + 1, f"stream={stream}"
        assert _wait_blocks_free(node) == 0
