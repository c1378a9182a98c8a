"""A vision-language model through a real tritonserver: single_node_vl (the `encode` stage writes the
node's embedding store, prefill reads embeddings by handle) and single_node_vl_mono (the tower inside
prefill), checked against the offline engine (itself token-exact with transformers: test_vl.py)."""

import base64
import io
import json
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import blocks_in_use

from baton.backends.serving.launcher import Node
from baton_client import BatonClient, BatonError

pytestmark = pytest.mark.slow
PIL = pytest.importorskip("PIL.Image")
OVERRIDES = {"dtype": "float32", "max_model_len": 512, "max_tokens_limit": 400, "kv_cache_memory_mb": 4}
GREEDY = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
PREFILL_NICE = 5


def png(h: int, w: int, seed: int, fmt: str = "PNG") -> bytes:
    img = PIL.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(*parts: str | bytes) -> list[dict]:
    """One user message: str parts are text, bytes parts images (as data URLs)."""
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                         {"type": "image_url", "image_url": {"url": data_url(p)}} for p in parts]}]


@pytest.fixture(scope="module")
def vl_dir(checkpoint):
    return checkpoint("tiny-qwen2.5-vl", dtype="float32")


@pytest.fixture(scope="module")
def offline(vl_dir):
    """offline(messages) -> the offline engine's output for the same chat turn (greedy, 10 tokens)."""
    from baton import LLM, SamplingParams

    llm = LLM(vl_dir, dtype="float32", num_blocks=128, max_model_len=512)
    tmpl = llm.engine.tokenizer

    def run(messages: list[dict], **kw: object):
        from baton.backends.stages.preprocess import _chat_template, _image_parts

        prompt = _chat_template(Path(vl_dir)).render(messages=messages, add_generation_prompt=True)
        params = SamplingParams(**(dict(temperature=0.0, max_tokens=10, ignore_eos=True) | kw))
        return llm.generate({"prompt": prompt, "multi_modal_data": {"image": _image_parts(messages)}}, params)[0]

    assert tmpl is not None
    yield run
    llm.close()


@pytest.fixture(scope="module")
def node(vl_dir):
    pins = {"encode_cpus": "1", "front_cpus": "1", "prefill_cpus": "1", "decode_cpus": "0", "share_cores": 0,
            "prefill_nice": PREFILL_NICE} if len(os.sched_getaffinity(0)) >= 2 else {}
    n = Node(str(vl_dir), "single_node_vl", overrides=OVERRIDES | {"embedding_cache_mb": 1} | pins, gateway_port=0)
    n.start(timeout=180, quiet=True)
    yield n
    store = n.embedding_dir
    n.stop()
    assert store is not None and not store.exists()          # the node's embedding store goes with it


def _metric(node, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


CASES = [("one image", (png(70, 100, 1), "What is this?")),
         ("two images of other sizes", ("Compare", png(300, 120, 2), "with", png(40, 260, 3), ".")),
         ("text only", ("def fibonacci(n):",))]


@pytest.mark.parametrize("case", [c for c, _ in CASES])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_streams_equal_the_offline_engine(node, offline, case, protocol):
    messages = user(*dict(CASES)[case])
    client = BatonClient(node.grpc_url if protocol == "grpc" else node.http_url, protocol)
    got = client.generate(messages=messages, **GREEDY)
    want = offline(messages)
    assert got.token_ids == want.token_ids and got.prompt_tokens == len(want.prompt_token_ids)
    client.close()


def test_image_input_with_a_text_prompt(node, offline):
    """The `image` input: encoded bytes, one per <|image_pad|> in text_input."""
    raw = png(90, 60, 7)
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"
    client = BatonClient(node.grpc_url)
    got = client.generate(prompt, images=[raw], **GREEDY)
    assert got.token_ids == offline(user(raw, "Describe it.")).token_ids
    http = BatonClient(node.http_url, "http").generate(prompt, images=[raw], **GREEDY)     # base64 over JSON
    assert http.token_ids == got.token_ids
    client.close()


def test_repeated_image_hits_the_embedding_and_prefix_caches(node, offline):
    messages = user(png(120, 120, 11), "Tell me more.")
    client = BatonClient(node.grpc_url)
    hits, images = _metric(node, "baton:encode_cache_hits_total"), _metric(node, "baton:encode_images_total")
    first = client.generate(messages=messages, **GREEDY)
    again = client.generate(messages=messages, **GREEDY)
    assert first.token_ids == again.token_ids == offline(messages).token_ids
    assert again.cached_tokens > first.cached_tokens
    deadline = time.monotonic() + 10
    while _metric(node, "baton:encode_images_total") < images + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(node, "baton:encode_images_total") == images + 2
    assert _metric(node, "baton:encode_cache_hits_total") == hits + 1
    client.close()


def test_concurrent_image_streams_and_no_leaks(node, offline):
    msgs = [user(png(60 + 20 * (i % 4), 90, 20 + i), f"Question {i}?") if i % 3 else user(f"Only text {i}.")
            for i in range(9)]
    want = [offline(m).token_ids for m in msgs]
    client = BatonClient(node.grpc_url)
    with ThreadPoolExecutor(9) as pool:
        got = list(pool.map(lambda m: client.generate(messages=m, **GREEDY).token_ids, msgs))
    assert got == want
    # a cancelled image stream
    stream = client.stream(messages=user(png(80, 80, 99), "Go on and on"), temperature=0.0, max_tokens=400,
                           ignore_eos=True)
    next(stream)
    stream.close()
    assert blocks_in_use(node.manager.address) == 0
    store = node.embedding_dir
    # bounded by embedding_cache_mb (1 MiB) and no temporary files left behind
    files = list(store.iterdir())
    assert all(f.suffix == ".emb" for f in files)
    assert sum(f.stat().st_size for f in files) <= (1 << 20) + 64 * 1024
    client.close()


BAD = [
    ("corrupt", lambda: user(png(50, 50, 1)[:200], "x"), "corrupt or truncated"),
    ("not an image", lambda: [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"hello world" * 10).decode()}}]}], "supported format"),
    ("unsupported format", lambda: user(png(20, 20, 1, "TIFF"), "x"), "supported format"),
    ("over the pixel limit", lambda: user(_huge_png(), "x"), "over the limit"),
    ("not base64", lambda: [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,***"}}]}], "base64"),
    ("a URL", lambda: [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/a.png"}}]}], "not fetched"),
    ("too many images", lambda: user(*[png(30, 30, i) for i in range(9)]), "at most 8"),
]


def _huge_png() -> bytes:
    buf = io.BytesIO()
    PIL.new("1", (9000, 5000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", [c for c, _, _ in BAD])
def test_bad_images_are_invalid_argument_naming_the_problem(node, case):
    """Over gRPC the stream's error names the problem; over HTTP it is a 400 (the client's fault)."""
    make, needle = {c: (m, n) for c, m, n in BAD}[case]
    client = BatonClient(node.grpc_url)
    with pytest.raises(BatonError) as e:
        client.generate(messages=make(), **GREEDY)
    assert str(e.value).startswith("image") and needle in str(e.value)
    with pytest.raises(BatonError) as e:
        BatonClient(node.http_url, "http").generate(messages=make(), **GREEDY)
    assert str(e.value).startswith("HTTP 400: ") and needle in str(e.value)
    assert client.generate(messages=user(png(40, 40, 5), "ok"), **GREEDY).completion_tokens == 10
    client.close()


def test_image_count_must_match_the_placeholders(node):
    client = BatonClient(node.grpc_url)
    prompt = "<|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"
    with pytest.raises(BatonError, match=r"image: 1 image\(s\) for 2 image placeholder"):
        client.generate(prompt, images=[png(30, 30, 0)], **GREEDY)
    with pytest.raises(BatonError, match=r"image: 2 image\(s\) for 0 image placeholder"):
        client.generate("no placeholder", images=[png(30, 30, 0), png(30, 30, 1)], **GREEDY)
    with pytest.raises(BatonError, match="messages' content parts or in `image`, not both"):
        client.generate(messages=user(png(30, 30, 0)), images=[png(30, 30, 1)], **GREEDY)
    client.close()


def test_openai_gateway_takes_image_url_parts(node, offline, vl_dir):
    messages = user(png(64, 96, 31), "What is in the picture?")
    body = {"model": Path(vl_dir).name, "messages": messages, "max_tokens": 10, "temperature": 0.0}
    req = urllib.request.Request(f"http://127.0.0.1:{node.gateway_port}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=60).read())
    want = offline(messages)
    assert out["choices"][0]["message"]["content"] == want.text
    assert out["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    bad = dict(body, messages=user(b"\x89PNG broken", "x"))
    req = urllib.request.Request(f"http://127.0.0.1:{node.gateway_port}/v1/chat/completions",
                                 data=json.dumps(bad).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "image" in e.value.read().decode()


def test_vision_inside_prefill_and_a_speculating_decode_serve_the_same(vl_dir, offline):
    """single_node_vl_mono (the tower inside prefill), its decode speculating (ngram): the offline
    engine's tokens, drafts accepted."""
    n = Node(str(vl_dir), "single_node_vl_mono", overrides=OVERRIDES | {"speculative": {"method": "ngram"}})
    n.start(timeout=180, quiet=True)
    try:
        client = BatonClient(n.grpc_url)
        for _, parts in CASES:
            got = client.generate(messages=user(*parts), **(GREEDY | {"max_tokens": 24}))
            assert got.token_ids == offline(user(*parts), max_tokens=24).token_ids
        client.close()
        assert blocks_in_use(n.manager.address) == 0
        deadline = time.monotonic() + 10           # decode sends its counters when it goes idle
        while not _metric(n, "baton:spec_accepted_tokens_total") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert 0 < _metric(n, "baton:spec_accepted_tokens_total") < _metric(n, "baton:spec_draft_tokens_total")
    finally:
        n.stop()


def test_a_text_model_refuses_images(node, qwen3_dir):
    """Images sent to a text model's node: refused naming `image`, and it keeps serving."""
    n = Node(str(qwen3_dir), overrides={"dtype": "float32", "max_model_len": 128, "kv_cache_memory_mb": 2})
    n.start(timeout=180, quiet=True)
    try:
        client = BatonClient(n.grpc_url)
        with pytest.raises(BatonError, match="image: this model does not take images"):
            client.generate(messages=user(png(30, 30, 0), "x"), **GREEDY)
        assert client.generate(messages=user("just text"), **GREEDY).completion_tokens == 10
        client.close()
    finally:
        n.stop()


def test_encode_and_the_front_run_on_the_cpus_named(node):
    """encode_cpus, front_cpus, prefill_cpus and decode_cpus pin those stages' processes, every
    thread of them (EPD on one box: the encoder, the front, preprocess and prefill on one core,
    decode on the other); the encoder's threads, and prefill's under prefill_nice, run below the
    request path's priority."""
    from baton.backends.serving.supervisor import _group_members
    from baton.backends.stages.encode import ENCODE_NICE

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    members = _group_members(node.server.proc.pid)
    stubs = {name.split("'")[1]: pid for pid, name in members.items() if name.startswith("stage stub")}
    stubs["decode worker"] = next(pid for pid, name in members.items() if name.startswith("decode worker"))

    def cpus(pid: int) -> set[frozenset[int]]:          # every thread's CPUs (one that ends meanwhile: skipped)
        out = set()
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                out.add(frozenset(os.sched_getaffinity(int(t))))
            except OSError:
                pass
        return out

    for model in ("encode", "llm", "preprocess", "prefill"):
        assert cpus(stubs[model]) == {frozenset({1})}, model
    assert cpus(stubs["decode worker"]) == {frozenset({0})}
    nice = {m: {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{stubs[m]}/task")} for m in stubs}
    assert min(nice["encode"]) == ENCODE_NICE, nice
    assert nice["prefill"] == {PREFILL_NICE}, nice
    assert nice["llm"] == nice["preprocess"] == nice["decode worker"] == {0}, nice
