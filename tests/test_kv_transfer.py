"""PD's KV path without Triton: a prefill engine on one node's pool (whose KV manager serves its
blocks over the Mooncake transfer engine), a decode stage on another node's pool reading them
through the TransferConnector; tokens checked against the offline engine, blocks on both nodes."""

import uuid

import pytest
from conftest import prompts_of

from baton import LLM, EngineConfig, SamplingParams
from baton.backends.engine.llm_engine import pool_spec
from baton.backends.kv.manager import RemoteBlockManager
from baton.backends.kv.node import KVManagerProcess
from baton.backends.kv.transfer import BlockSource, TransferAgent, ack
from baton.backends.models.config import ModelConfig
from baton.backends.serving.config import NodeConfig, ServingConfig
from baton.backends.stages.common import node_engine
from baton.backends.stages.decode import DecodeStage
from baton.backends.stages.messages import PrefillRequest
from baton.backends.stages.prefill import PrefillStage

pytest.importorskip("mooncake.engine", reason="the Mooncake transfer engine (make test installs it)")

KEY = "cd" * 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


class Sink:
    def __init__(self):
        self.ids, self.final, self.err = [], False, None

    def send(self, delta, final):
        self.ids += delta.token_ids
        self.final = self.final or final

    def error(self, message, unavailable=False):
        self.err, self.final = message, True

    def cancelled(self):
        return False


def _node(qwen3_dir, tmp, name, serve, encode_stage=False, epd_host=""):
    cfg = ModelConfig.from_dir(qwen3_dir)
    spec = pool_spec(cfg, cfg.torch_dtype, 16, 96, 0)
    pool = f"test-{name}-{uuid.uuid4().hex[:6]}"
    (tmp / "cluster.key").write_text(KEY)
    mgr = KVManagerProcess(pool, spec, f"ipc://{tmp}/{name}.sock", tmp / f"{name}.log",
                           serve_blocks=("127.0.0.1", "tcp", str(tmp / "cluster.key"), name) if serve else None)
    mgr.start()
    node = NodeConfig(EngineConfig(model=str(qwen3_dir), dtype="float32", max_model_len=1024),
                      ServingConfig(share_cores=0, stream_responses_per_step=0, pd_role="prefill" if serve else "decode"),
                      pool, mgr.address, "", str(tmp), KEY, node_id=name, transfer_host="" if serve else "127.0.0.1",
                      block_source=mgr.source, encode_stage=encode_stage, epd_host=epd_host)
    return mgr, node


@pytest.fixture(scope="module")
def pd(qwen3_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd")
    pm, pnode = _node(qwen3_dir, tmp, "prefill", serve=True)
    dm, dnode = _node(qwen3_dir, tmp, "decode", serve=False)
    prefill = PrefillStage(node_engine(pnode, "prefill"), bytes.fromhex(KEY), source=pnode.block_source)
    decode = DecodeStage(node_engine(dnode, "decode"), bytes.fromhex(KEY))
    yield pm, dm, prefill, decode
    decode.engine.connector.close()
    for m in (pm, dm):
        m.stop()


def _serve(prefill, decode, prompt, params=GREEDY):
    (h,) = prefill.run([PrefillRequest(uuid.uuid4().hex, prompt, params)])
    sink = Sink()
    decode.step_once([(h, sink)])
    while not sink.final:
        decode.step_once()
    return h, sink


def _used(mgr):
    st = RemoteBlockManager(mgr.address, 1, 16).stats()
    return st["num_used"], st["handoffs"]


def test_decode_reads_prefills_blocks_over_the_transfer_engine(pd, qwen3_dir):
    pm, dm, prefill, decode = pd
    prompts = prompts_of(512, [70, 45], seed=3)
    llm = LLM(str(qwen3_dir), dtype="float32", kv_cache_memory_mb=16)
    try:
        expect = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        llm.close()
    conn = decode.engine.connector
    for prompt, want in zip(prompts, expect):
        h, sink = _serve(prefill, decode, prompt)
        assert h.source and BlockSource.from_json(h.source).node_id == "prefill"
        assert sink.err is None and sink.ids == want
    assert conn.stats["blocks_read"] == 5 + 3 and conn.stats["failures"] == 0      # ceil(70/16), ceil(45/16)
    assert conn.stats["bytes"] == 8 * pm.spec.block_bytes
    assert _used(pm) == (0, 0)          # acknowledged: prefill let its blocks go at once, not at lease end
    decode.engine.block_manager.flush(idle=True)
    assert _used(dm) == (0, 0)


def test_blocks_decode_already_holds_are_not_transferred(pd):
    pm, dm, prefill, decode = pd
    conn = decode.engine.connector
    shared = prompts_of(512, [64], seed=11)[0]
    _serve(prefill, decode, shared + [7, 8, 9])
    before = dict(conn.stats)
    _, sink = _serve(prefill, decode, shared + [20, 21, 22, 23, 24])     # 4 full blocks in common
    assert conn.stats["blocks_reused"] - before["blocks_reused"] == 4
    assert conn.stats["blocks_read"] - before["blocks_read"] == 1           # only the last, partial one
    assert sink.err is None and len(sink.ids) == 12


def test_a_failed_transfer_is_recomputed_and_the_request_completes(pd, qwen3_dir):
    pm, dm, prefill, decode = pd
    prompt = prompts_of(512, [50], seed=5)[0]
    (h,) = prefill.run([PrefillRequest(uuid.uuid4().hex, prompt, GREEDY)])
    # the source lets go of the blocks first (as when decode came after the lease): the ack says so
    assert ack(BlockSource.from_json(h.source), bytes.fromhex(KEY), h.request_id, h.block_table)
    failures = decode.engine.connector.stats["failures"]
    sink = Sink()
    decode.step_once([(h, sink)])
    while not sink.final:
        decode.step_once()
    want = _offline(qwen3_dir, prompt)
    assert decode.engine.connector.stats["failures"] == failures + 1
    assert sink.err is None and sink.ids == want


def test_blocks_of_another_layout_are_recomputed_not_read(pd, qwen3_dir, monkeypatch):
    pm, dm, prefill, decode = pd
    conn = decode.engine.connector
    monkeypatch.setattr(conn, "block_bytes", conn.block_bytes * 2)     # as if the source served another model
    prompt = prompts_of(512, [40], seed=13)[0]
    failures, read = conn.stats["failures"], conn.stats["blocks_read"]
    _, sink = _serve(prefill, decode, prompt)
    want = _offline(qwen3_dir, prompt)
    assert conn.stats["failures"] == failures + 1 and conn.stats["blocks_read"] == read
    assert sink.err is None and sink.ids == want
    assert _used(pm) == (0, 0)                  # acknowledged all the same: the source let go at once


def test_a_forged_ack_changes_nothing(pd):
    pm, _, prefill, _ = pd
    (h,) = prefill.run([PrefillRequest(uuid.uuid4().hex, prompts_of(512, [40], seed=9)[0], GREEDY)])
    src = BlockSource.from_json(h.source)
    assert not ack(src, bytes(32), h.request_id, h.block_table)            # wrong key
    assert not ack(src, bytes.fromhex(KEY), h.request_id, h.block_table[:-1])   # not the recorded blocks
    assert _used(pm)[1] == 1
    assert ack(src, bytes.fromhex(KEY), h.request_id, h.block_table)
    assert not ack(src, bytes.fromhex(KEY), h.request_id, h.block_table)    # once
    assert _used(pm) == (0, 0)


def test_transfer_agent_merges_consecutive_blocks(tmp_path):
    import torch

    src = torch.arange(8 * 256, dtype=torch.float32)
    dst = torch.zeros(8 * 256, dtype=torch.float32)
    a = TransferAgent("127.0.0.1", "tcp", src.data_ptr(), src.numel() * 4)
    b = TransferAgent("127.0.0.1", "tcp", dst.data_ptr(), dst.numel() * 4)
    source = BlockSource("a", a.segment, a.base, 1024, "")
    assert b.read(source, [1, 2, 3, 6], [4, 5, 6, 0]) == 4 * 1024
    view = dst.view(8, 256)
    assert torch.equal(view[4:7], src.view(8, 256)[1:4]) and torch.equal(view[0], src.view(8, 256)[6])
    assert not view[1:4].any() and not view[7].any()


def test_decode_keeps_stepping_other_requests_while_a_transfer_is_in_flight(pd, qwen3_dir, monkeypatch):
    import threading
    import time

    pm, dm, prefill, decode = pd
    conn = decode.engine.connector
    gate = threading.Event()
    real_read = conn.agent.read

    def slow_read(*a, **k):                      # the real read, held back until the test lets it go
        gate.wait(10)
        return real_read(*a, **k)

    monkeypatch.setattr(conn.agent, "read", slow_read)
    a_prompt, b_prompt = prompts_of(512, [30, 60], seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    (ha,) = prefill.run([PrefillRequest(uuid.uuid4().hex, a_prompt, params)])
    sink_a = Sink()
    decode.step_once([(ha, sink_a)])
    gate.set()                                   # A's own read goes through
    while len(sink_a.ids) < 3:
        decode.step_once()
    gate.clear()
    (hb,) = prefill.run([PrefillRequest(uuid.uuid4().hex, b_prompt, params)])
    sink_b = Sink()
    decode.step_once([(hb, sink_b)])             # B admitted: its read waits at the gate
    before = len(sink_a.ids)
    for _ in range(10):
        decode.step_once()
    assert len(sink_a.ids) >= before + 10          # A stepped every time
    assert len(sink_b.ids) == 1                    # B only has prefill's token: it is not stepped while loading
    gate.set()
    deadline = time.monotonic() + 30
    while not (sink_a.final and sink_b.final) and time.monotonic() < deadline:
        decode.step_once()
    llm = LLM(str(qwen3_dir), dtype="float32", kv_cache_memory_mb=16)
    try:
        want = [o.token_ids for o in llm.generate([a_prompt, b_prompt], params)]
    finally:
        llm.close()
    assert [sink_a.ids, sink_b.ids] == want


def test_a_request_cancelled_mid_read_neither_stalls_decode_nor_leaks(pd, monkeypatch):
    import threading
    import time

    pm, dm, prefill, decode = pd
    conn = decode.engine.connector
    gate = threading.Event()
    real_read = conn.agent.read
    monkeypatch.setattr(conn.agent, "read", lambda *a, **k: gate.wait(20) and real_read(*a, **k))
    (h,) = prefill.run([PrefillRequest(uuid.uuid4().hex, prompts_of(512, [60], seed=31)[0], GREEDY)])
    sink = Sink()
    decode.step_once([(h, sink)])                   # admitted; its read waits at the gate (a source that stalls)
    decode.cancel([h.request_id])
    t = time.monotonic()
    decode.step_once()                              # drops it: no waiting for the read
    assert time.monotonic() - t < 1.0 and sink.final
    decode.engine.block_manager.flush(idle=True)
    assert _used(dm)[0] > 0                         # its blocks are kept while the read may still write them
    gate.set()
    deadline = time.monotonic() + 10
    while _used(dm)[0] and time.monotonic() < deadline:
        decode.step_once()                          # the loop's turn gives them back once the read ended
        decode.engine.block_manager.flush(idle=True)
        time.sleep(0.05)
    assert _used(dm) == (0, 0) and not conn.deferred
    assert _used(pm) == (0, 0)                      # the read finished and was acknowledged


def test_a_read_that_never_ends_is_given_up_and_recomputed(pd, qwen3_dir, monkeypatch):
    import threading
    import time

    from baton.backends.kv import transfer_connector

    pm, dm, prefill, decode = pd
    conn = decode.engine.connector
    gate = threading.Event()
    real_read = conn.agent.read
    monkeypatch.setattr(conn.agent, "read", lambda *a, **k: gate.wait(30) and real_read(*a, **k))
    monkeypatch.setattr(transfer_connector, "LOAD_TIMEOUT_S", 0.3)    # a source that hangs, alive but silent
    prompt = prompts_of(512, [50], seed=41)[0]
    failures = conn.stats["failures"]
    (h,) = prefill.run([PrefillRequest(uuid.uuid4().hex, prompt, GREEDY)])
    sink = Sink()
    decode.step_once([(h, sink)])
    deadline = time.monotonic() + 20
    while not sink.final and time.monotonic() < deadline:
        decode.step_once()
    want = _offline(qwen3_dir, prompt)
    assert sink.err is None and sink.ids == want and conn.stats["failures"] == failures + 1
    assert conn.deferred                              # the first blocks wait for the read that holds them
    gate.set()
    deadline = time.monotonic() + 10
    while (conn.deferred or _used(dm)[0]) and time.monotonic() < deadline:
        decode.step_once()
        decode.engine.block_manager.flush(idle=True)
        time.sleep(0.05)
    assert _used(dm) == (0, 0) and _used(pm) == (0, 0)


def _offline(qwen3_dir, prompt):
    """The offline engine's greedy tokens for `prompt`: what a PD request must give."""
    llm = LLM(str(qwen3_dir), dtype="float32", kv_cache_memory_mb=16)
    try:
        return llm.generate([prompt], GREEDY)[0].token_ids
    finally:
        llm.close()


@pytest.fixture
def vl(checkpoint):
    """The tiny vision-language checkpoint and its offline engine."""
    d = checkpoint("tiny-qwen2.5-vl", dtype="float32")
    llm = LLM(str(d), dtype="float32", kv_cache_memory_mb=16)
    yield d, llm
    llm.close()


@pytest.fixture
def stopped():
    """stopped(x) -> x: a KV manager stopped, a decode stage's connector closed, at the test's end."""
    held = []
    yield lambda x: held.append(x) or x
    for x in reversed(held):
        if isinstance(x, DecodeStage):
            x.engine.connector.close()
        else:
            x.stop()


def _image_prompt(llm, seed, hw, text):
    """A random PNG: its bytes, the offline engine's greedy tokens for `text` with it, the expanded
    prompt's ids and its MultiModalPrompt."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((*hw, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    want = llm.generate({"prompt": text, "multi_modal_data": {"image": [buf.getvalue()]}}, GREEDY)[0].token_ids
    ids, mm = llm.engine.expand_images(llm.engine.tokenizer.encode(text), [buf.getvalue()])
    return buf.getvalue(), want, ids, mm


def _recomputed(decode, h):
    """Decode the handle after its prefill node let the blocks go (acknowledged): decode's KV read
    fails and it recomputes the prompt. Its sink."""
    assert ack(BlockSource.from_json(h.source), bytes.fromhex(KEY), h.request_id, h.block_table)
    sink = Sink()
    decode.step_once([(h, sink)])
    while not sink.final:
        decode.step_once()
    assert decode.engine.connector.stats["failures"] == 1            # recomputed, not read
    return sink


def test_an_image_prompt_recomputed_on_the_decode_node_reads_its_embeddings_from_the_encode_server(vl, stopped,
                                                                                                    tmp_path):
    """E, P and D apart: prefill reads an image's embeddings from the encode server's arena and passes
    where they are on in its KV handle; decode, whose KV read fails (the source let the blocks go), then
    recomputes the prompt and reads them from the arena itself (its node never held them)."""
    from baton.backends.multimodal.embedding_store import EmbeddingStore
    from baton.backends.multimodal.remote import EmbeddingArena
    from baton.backends.stages.messages import embed_mac, images_of

    d, llm = vl
    data, want, ids, mm = _image_prompt(llm, 5, (84, 112), "<|vision_start|><|image_pad|><|vision_end|>What is in "
                                        "the picture?")
    req = PrefillRequest(uuid.uuid4().hex, ids, GREEDY, mm.spans, [data])
    (embeds,) = llm.engine.encoder.encode(images_of(req))            # what the encode server computed
    arena = EmbeddingArena(4 << 20, 1 << 20, "127.0.0.1")
    arena.put(mm.spans[0].hash, embeds)
    req.image_data, req.embed_source = [], arena.source([mm.spans[0].hash]).to_json()
    req.embed_mac = embed_mac(bytes.fromhex(KEY), req.request_id, req.images, req.embed_source)
    pm, pnode = _node(d, tmp_path, "vl-prefill", serve=True, encode_stage=True)
    dm, dnode = _node(d, tmp_path, "vl-decode", serve=False)
    stopped(pm), stopped(dm)
    store = EmbeddingStore(tmp_path / "prefill-store")
    (store.dir / f"{mm.spans[0].hash}.emb").write_bytes(b"garbage")   # unreadable: read from the arena instead
    prefill = PrefillStage(node_engine(pnode, "prefill"), bytes.fromhex(KEY), source=pnode.block_source,
                           embeddings=store, transfer_host="127.0.0.1")
    decode = stopped(DecodeStage(node_engine(dnode, "decode"), bytes.fromhex(KEY), transfer_host="127.0.0.1"))
    (h,) = prefill.run([req])
    assert h.images == mm.spans and h.embed_source == req.embed_source
    sink = _recomputed(decode, h)
    assert sink.err is None and sink.ids == want
    assert decode.remote is not None                                  # the embeddings came from the arena


def test_an_image_prompt_recomputed_on_the_decode_node_reads_its_embeddings_from_the_prefill_node(vl, stopped,
                                                                                                   tmp_path):
    """E inside P, D apart (`pd_router` with a vision model): the prefill node's tower writes the
    embeddings to an arena its transfer engine serves and names it in the KV handle; decode, whose KV
    read fails, recomputes the prompt reading them from there (before, that request ended with an error)."""
    from baton.backends.multimodal.remote import EmbeddingArena, EmbeddingSource

    d, llm = vl
    data, want, ids, mm = _image_prompt(llm, 6, (112, 84), "Look: <|vision_start|><|image_pad|><|vision_end|>"
                                        "Describe it.")
    pm, pnode = _node(d, tmp_path, "vlp-prefill", serve=True, epd_host="127.0.0.1")
    dm, dnode = _node(d, tmp_path, "vlp-decode", serve=False, epd_host="127.0.0.1")
    stopped(pm), stopped(dm)
    prefill = PrefillStage(node_engine(pnode, "prefill"), bytes.fromhex(KEY), source=pnode.block_source,
                           transfer_host="127.0.0.1")
    assert isinstance(prefill.engine.encoder.cache, EmbeddingArena)
    decode = stopped(DecodeStage(node_engine(dnode, "decode"), bytes.fromhex(KEY), transfer_host="127.0.0.1"))
    assert decode.engine.encoder is None                              # no tower on a decode node
    # as the router sends it: the image's bytes, and a stray embed_source that must not be signed on
    req = PrefillRequest(uuid.uuid4().hex, ids, GREEDY, mm.spans, [data], embed_source="junk")
    (h,) = prefill.run([req])
    src = EmbeddingSource.from_json(h.embed_source)
    assert src.segment == prefill.engine.encoder.cache.agent.segment and len(src.slots) == 1
    assert h.verified(bytes.fromhex(KEY))
    sink = _recomputed(decode, h)
    assert sink.err is None and sink.ids == want
    assert decode.remote is not None                                  # the embeddings came from prefill's arena


def test_decode_steps_other_requests_while_a_recomputed_prompts_embeddings_are_read(vl, stopped, tmp_path,
                                                                                   monkeypatch):
    """The read-back of a recomputed image prompt's embeddings runs off decode's loop: a text stream
    keeps getting a token every step while the read is held; the image request waits, then gives the
    offline engine's tokens (before, the loop itself waited for the read, up to READ_TIMEOUT_S)."""
    import threading
    import time

    from baton.backends.multimodal.remote import RemoteEmbeddings

    d, llm = vl
    data, want, ids, mm = _image_prompt(llm, 7, (56, 84), "<|vision_start|><|image_pad|><|vision_end|>And this?")
    text = llm.engine.tokenizer.encode("def f(x): return x + 1")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want_text = llm.generate([text], params)[0].token_ids
    pm, pnode = _node(d, tmp_path, "vlq-prefill", serve=True, epd_host="127.0.0.1")
    dm, dnode = _node(d, tmp_path, "vlq-decode", serve=False, epd_host="127.0.0.1")
    stopped(pm), stopped(dm)
    prefill = PrefillStage(node_engine(pnode, "prefill"), bytes.fromhex(KEY), source=pnode.block_source,
                           transfer_host="127.0.0.1")
    decode = stopped(DecodeStage(node_engine(dnode, "decode"), bytes.fromhex(KEY), transfer_host="127.0.0.1"))
    gate, real = threading.Event(), RemoteEmbeddings._read

    def held(self, *a, **k):                         # the real read, once the test lets it go
        gate.wait(20)
        return real(self, *a, **k)

    monkeypatch.setattr(RemoteEmbeddings, "_read", held)
    (ht,) = prefill.run([PrefillRequest(uuid.uuid4().hex, text, params)])
    sink_t = Sink()
    decode.step_once([(ht, sink_t)])
    while len(sink_t.ids) < 3:
        decode.step_once()
    (hi,) = prefill.run([PrefillRequest(uuid.uuid4().hex, ids, GREEDY, mm.spans, [data])])
    assert ack(BlockSource.from_json(hi.source), bytes.fromhex(KEY), hi.request_id, hi.block_table)
    sink_i = Sink()
    decode.step_once([(hi, sink_i)])
    conn, deadline = decode.engine.connector, time.monotonic() + 20
    while not all(f.done() for f, _ in conn.loads.values()):    # its KV read fails (no step meanwhile)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    before = len(sink_t.ids)
    for _ in range(8):
        decode.step_once()
    assert conn.stats["failures"] == 1               # recomputing, its embeddings' read held
    assert len(sink_t.ids) >= before + 8             # the text stream stepped every time
    assert len(sink_i.ids) == 1 and not sink_i.final  # the image request waits for its embeddings
    gate.set()
    while not (sink_t.final and sink_i.final):
        decode.step_once()
    assert sink_i.err is None and sink_i.ids == want
    assert sink_t.ids == want_text
