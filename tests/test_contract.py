"""The request contract, tried the way a careless or hostile client would: 30 malformed requests over
gRPC and 18 over HTTP. Each is refused with a message naming the field (HTTP: status 400 with a JSON
body, from Baton's HTTP front, which checks the JSON that tritonserver 2.51's own parser answered with
500 or wrapped; gRPC: the INVALID_ARGUMENT status where Triton refuses it itself, while an error inside
a stream carries a message only), and a normal request succeeds after every one."""

import json
import queue
import urllib.request

import numpy as np
import pytest

from baton.backends.serving.launcher import Node
from baton_client import BatonClient

pytestmark = pytest.mark.slow

F32, I32, I64, B = np.float32, np.int32, np.int64, np.bool_


def s(x):
    return np.array([x if isinstance(x, bytes) else x.encode()], dtype=object)


TEXT = {"text_input": s("def f(x):")}
GRPC_CASES = [                                        # (id, inputs, the field the message must name)
    ("no prompt", {"max_tokens": np.array([2], I32)}, "text_input"),
    ("empty prompt", {"text_input": s("")}, "text_input"),
    ("invalid utf-8", {"text_input": s(b"\xff\xfe")}, "UTF-8"),
    ("prompt too long", {"text_input": s("x " * 400)}, "text_input"),
    ("huge prompt", {"text_input": s("x" * (1 << 20))}, "text_input"),
    ("two prompts", {"text_input": np.array([b"a", b"b"], dtype=object)}, "text_input"),
    ("text and messages", TEXT | {"messages": s('[{"role": "user", "content": "hi"}]')}, "messages"),
    ("messages not json", {"messages": s("not json")}, "messages"),
    ("messages not a list", {"messages": s('{"role": "user"}')}, "messages"),
    ("messages of strings", {"messages": s('["hi"]')}, "messages"),
    ("max_tokens 0", TEXT | {"max_tokens": np.array([0], I32)}, "max_tokens"),
    ("max_tokens negative", TEXT | {"max_tokens": np.array([-5], I32)}, "max_tokens"),
    ("max_tokens over limit", TEXT | {"max_tokens": np.array([1000], I32)}, "max_tokens"),
    ("max_tokens as FP32", TEXT | {"max_tokens": np.array([3.0], F32)}, "max_tokens"),
    ("max_tokens two values", TEXT | {"max_tokens": np.array([3, 4], I32)}, "max_tokens"),
    ("temperature negative", TEXT | {"temperature": np.array([-1], F32)}, "temperature"),
    ("temperature NaN", TEXT | {"temperature": np.array([np.nan], F32)}, "temperature"),
    ("temperature inf", TEXT | {"temperature": np.array([np.inf], F32)}, "temperature"),
    ("top_p 0", TEXT | {"top_p": np.array([0], F32)}, "top_p"),
    ("top_p 1.5", TEXT | {"top_p": np.array([1.5], F32)}, "top_p"),
    ("top_p NaN", TEXT | {"top_p": np.array([np.nan], F32)}, "top_p"),
    ("top_k -5", TEXT | {"top_k": np.array([-5], I32)}, "top_k"),
    ("min_p 2", TEXT | {"min_p": np.array([2], F32)}, "min_p"),
    ("repetition_penalty 0", TEXT | {"repetition_penalty": np.array([0], F32)}, "repetition_penalty"),
    ("presence_penalty 3", TEXT | {"presence_penalty": np.array([3], F32)}, "presence_penalty"),
    ("frequency_penalty -3", TEXT | {"frequency_penalty": np.array([-3], F32)}, "frequency_penalty"),
    ("seed as FP32", TEXT | {"seed": np.array([1.0], F32)}, "seed"),
    ("ignore_eos as INT32", TEXT | {"ignore_eos": np.array([1], I32)}, "ignore_eos"),
    ("empty stop string", TEXT | {"stop": s("")}, "stop"),
    ("unknown input", TEXT | {"temprature": np.array([0.5], F32)}, "temprature"),
]


@pytest.fixture(scope="module")
def node(qwen3_dir):
    n = Node(str(qwen3_dir), overrides={"dtype": "float32", "max_model_len": 256, "max_tokens_limit": 200,
                                        "kv_cache_memory_mb": 4})
    n.start(timeout=180, quiet=True)
    yield n
    n.stop()


def _grpc(node, inputs):
    """(error or None) of a streamed llm request built from raw arrays."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import np_to_triton_dtype

    c = grpc.InferenceServerClient(node.grpc_url)
    got = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put(error))
    tensors = []
    for name, arr in inputs.items():
        t = grpc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        tensors.append(t)
    try:
        c.async_stream_infer("llm", tensors)
        return got.get(timeout=60)
    except Exception as e:                          # refused before it was sent (client-side checks)
        return e
    finally:
        c.stop_stream()


def _still_serving(node):
    assert BatonClient(node.grpc_url).generate("still serving?", max_tokens=2, ignore_eos=True).completion_tokens == 2


@pytest.mark.parametrize("inputs, field", [c[1:] for c in GRPC_CASES], ids=[c[0] for c in GRPC_CASES])
def test_grpc_malformed_requests_are_the_clients_fault_and_name_the_field(node, inputs, field):
    err = _grpc(node, inputs)
    assert err is not None, "accepted"
    assert field in str(err), str(err)
    status = err.status() if hasattr(err, "status") else None
    assert status in ("StatusCode.INVALID_ARGUMENT", None), (status, str(err))
    _still_serving(node)


def _http(node, body, ctype="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{node.http_url}/v2/models/llm/generate_stream", data=data,
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


HTTP_CASES = [                                         # through Baton's HTTP front (gateway/v2.py)
    ("no prompt", {"max_tokens": 2}, "text_input"),
    ("empty prompt", {"text_input": ""}, "text_input"),
    ("misspelled input", {"text_input": "hi", "temprature": 0.5}, "temprature"),
    ("max_tokens 0", {"text_input": "hi", "max_tokens": 0}, "max_tokens"),
    ("top_p 2", {"text_input": "hi", "top_p": 2.0}, "top_p"),
    ("messages not a list", {"messages": '{"a": 1}'}, "messages"),
    ("max_tokens as a string", {"text_input": "hi", "max_tokens": "2"}, "max_tokens"),
    ("prompt as a number", {"text_input": 5}, "text_input"),
    ("invalid json", b"{not json", "JSON"),
    ("max_tokens past INT32", {"text_input": "hi", "max_tokens": 2**31}, "max_tokens"),
    ("seed past INT64", {"text_input": "hi", "seed": 2**63}, "seed"),
    ("temperature NaN", b'{"text_input": "hi", "temperature": NaN}', "temperature"),
    ("ignore_eos as a number", {"text_input": "hi", "ignore_eos": 1}, "ignore_eos"),
    ("stop of numbers", {"text_input": "hi", "stop": [1, 2]}, "stop"),
    ("a list body", [{"text_input": "hi"}], "JSON object"),
    ("parameters not an object", {"text_input": "hi", "parameters": [1]}, "parameters"),
    ("a parameter given twice", {"text_input": "hi", "max_tokens": 2, "parameters": {"max_tokens": 3}}, "max_tokens"),
]


@pytest.mark.parametrize("name, body, field", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_malformed_requests_are_400_and_name_the_field(node, name, body, field):
    status, text = _http(node, body)
    assert status == 400 and field in text, (status, text)
    assert "error" in json.loads(text)                 # a JSON error body, not server-sent events
    _still_serving(node)


OTHER_MODEL_CASES = [                                  # passed to tritonserver, whose parser answers 500
    ("generate, a list body", "/v2/models/prefill/generate", b"[1]", "JSON object"),
    ("generate, a null body", "/v2/models/decode/generate_stream", b"null", "JSON object"),
    ("generate, a string for an INT64 input", "/v2/models/prefill/generate", b'{"input_ids": "abc"}', "parse"),
    ("generate, a number for a string input", "/v2/models/preprocess/generate", b'{"text_input": 5}', "parse"),
    ("infer, no inputs", "/v2/models/prefill/infer", b"{}", "list of inputs"),
    ("infer, an empty body", "/v2/models/llm/infer", b"", "list of inputs"),
]


@pytest.mark.parametrize("name, path, body, needle", OTHER_MODEL_CASES, ids=[c[0] for c in OTHER_MODEL_CASES])
def test_http_requests_tritonserver_cannot_parse_are_400(node, name, path, body, needle):
    req = urllib.request.Request(f"http://{node.http_url}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    text = e.value.read().decode()
    assert e.value.code == 400 and needle in text, (e.value.code, text)
    _still_serving(node)


def test_http_generate_of_a_version_llm_does_not_have_is_404(node):
    req = urllib.request.Request(f"http://{node.http_url}/v2/models/llm/versions/7/generate",
                                 data=json.dumps({"text_input": "hi", "max_tokens": 2}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 404 and "version 1 only" in e.value.read().decode()
    req = urllib.request.Request(f"http://{node.http_url}/v2/models/llm/versions/1/generate",
                                 data=json.dumps({"text_input": "hi", "max_tokens": 2}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert len(json.loads(r.read())["token_ids"]) == 2


def test_http_generate_answers_once_and_server_faults_are_5xx(node):
    """`generate` on the decoupled llm gives one JSON response (Triton: 200 with an error body unless
    stream is false); a JSON infer request's INT32 past 2^31 is refused, not wrapped; a server that is
    busy or stopping answers 503 (Triton's HTTP answered 400 for any model error)."""
    req = urllib.request.Request(f"http://{node.http_url}/v2/models/llm/generate",
                                 data=json.dumps({"text_input": "def f(x):", "max_tokens": 3}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert r.status == 200 and len(out["token_ids"]) == 3 and out["finish_reason"] == "length"
    infer = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                        {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [2**31 + 5]}]}
    req = urllib.request.Request(f"http://{node.http_url}/v2/models/llm/infer", data=json.dumps(infer).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "max_tokens" in e.value.read().decode()
    from baton.backends.gateway.app import classify

    assert classify("server busy: 256 requests in flight").status == 503
    assert classify("llm front: RuntimeError('boom')").status == 500
    _still_serving(node)
