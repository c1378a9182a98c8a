"""The serving stages without Triton: preprocess -> prefill -> decode on a real KV manager process
and a shared pool, against the offline engine."""

import threading
import time
import uuid

import numpy as np
import pytest
from conftest import blocks_in_use, prompts_of

from baton import LLM, EngineConfig, InvalidRequestError, SamplingParams
from baton.backends.engine.llm_engine import pool_spec
from baton.backends.kv.node import KVManagerProcess
from baton.backends.models.config import ModelConfig
from baton.backends.serving.config import NodeConfig, ServingConfig
from baton.backends.serving.tensors import HANDLE
from baton.backends.stages.common import node_engine
from baton.backends.stages.decode import DecodeStage
from baton.backends.stages.decode_worker import DecodeProxy, worker_command
from baton.backends.stages.messages import KVHandle, PrefillRequest
from baton.backends.stages.prefill import PrefillStage
from baton.backends.stages.preprocess import Preprocessor

KEY = bytes.fromhex("ab" * 32)      # the node's handle key in these tests


class ListSink:
    def __init__(self):
        self.outs, self.done, self.err = [], threading.Event(), None
        self.cancel = False

    def send(self, delta, final):
        self.outs.append(delta)
        if final:
            self.done.set()

    def error(self, message, unavailable=False):
        self.err = message
        self.unavailable = unavailable
        self.done.set()

    def cancelled(self):
        return self.cancel


@pytest.fixture(scope="module")
def node(qwen3_dir, tmp_path_factory):
    """A node without Triton: a KV manager process, shared weights, a prefill engine in this process
    and the production decode loop in its worker process behind a DecodeProxy (as the decode model runs it)."""
    import subprocess

    from baton.backends.loader import weight_store
    from baton.backends.loader.safetensors_loader import load_state_dict
    from baton.backends.models.decoder import prepare_weights

    cfg = ModelConfig.from_dir(qwen3_dir)
    spec = pool_spec(cfg, cfg.torch_dtype, 16, 160, 0)
    name = f"test-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path_factory.mktemp("node")
    addr = f"ipc://{run_dir}/kv.sock"
    mgr = KVManagerProcess(name, spec, addr, run_dir / "kv.log")
    mgr.start()
    weight_store.publish(name, prepare_weights(cfg, load_state_dict(qwen3_dir, cfg.torch_dtype)))
    node = NodeConfig(EngineConfig(model=str(qwen3_dir), dtype="float32", max_model_len=2048),
                      ServingConfig(share_cores=0, stream_responses_per_step=0), name, addr, name, str(run_dir),
                      "ab" * 32)
    node.save(run_dir / "node.json")
    prefill = PrefillStage(node_engine(node, "prefill"), KEY)
    address = f"ipc://{run_dir}/decode.sock"
    decode = DecodeProxy(address, lambda: subprocess.Popen(worker_command(address, str(run_dir / "node.json"))))
    yield node, prefill, decode
    decode.stop()
    decode.proc.wait(10)
    mgr.stop()
    weight_store.unlink(name)


def prefilled(prefill, prompts, **sampling):
    reqs = [PrefillRequest(uuid.uuid4().hex, p, SamplingParams(**sampling)) for p in prompts]
    handles = prefill.run(reqs)
    assert all(isinstance(h, KVHandle) for h in handles), handles
    return handles


def tokens(sink):
    return [t for o in sink.outs for t in o.token_ids]


def test_stages_map_the_nodes_one_weight_copy(node):
    from baton.backends.loader import weight_store

    params, prefill, _ = node
    shared = str(weight_store.data_path(params.weights))
    for eng in (prefill.engine, node_engine(params, "decode")):
        assert eng.model.embed.untyped_storage().filename == shared
        # plain (here fp32) weights: the stages run their linears on the mapped tensors, no private copy
        assert eng.model.layers[0].qkv.weight.untyped_storage().filename == shared


def test_packed_store_is_shared_and_exact(qwen3_dir):
    """bf16 weights published oneDNN-packed (what the launcher does): an engine on them keeps no
    private copy of any linear and generates exactly what a privately packed engine does."""
    import torch

    from baton.backends.loader import weight_store
    from baton.backends.loader.safetensors_loader import load_state_dict
    from baton.backends.models.decoder import prepare_weights, process_linears
    from baton.kernels.linear import can_share_packed, select_linear_method

    if not can_share_packed(torch.bfloat16):
        pytest.skip("needs oneDNN bf16 and the CPU extension")
    cfg = ModelConfig.from_dir(qwen3_dir)
    name = f"test-{uuid.uuid4().hex[:8]}"
    method = select_linear_method(torch.bfloat16, "cpu")
    weight_store.publish(name, process_linears(cfg, prepare_weights(cfg, load_state_dict(qwen3_dir, torch.bfloat16)),
                                               method))
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = prompts_of(512, [9, 40], seed=31)
    try:
        shared = LLM(qwen3_dir, dtype="bfloat16", num_blocks=32, weights=weight_store.attach(name))
        private = LLM(qwen3_dir, dtype="bfloat16", num_blocks=32)
        try:
            model = shared.engine.model
            linears = [lw for L in model.layers for lw in (L.qkv, L.o, L.gate_up, L.down)] + [model.lm_head]
            path = str(weight_store.data_path(name))
            assert all(lw.weight is None and lw._blob.untyped_storage().filename == path for lw in linears)
            got = [o.token_ids for o in shared.generate(prompts, greedy)]
            assert got == [o.token_ids for o in private.generate(prompts, greedy)]
        finally:
            shared.close()
            private.close()
    finally:
        weight_store.unlink(name)


def run(node, ids, params):
    """One request through prefill (this process) and the decode worker, via Triton's tensor forms."""
    _, prefill, decode = node
    handle = prefilled(prefill, [ids], **params)[0]
    arrays = handle.to_arrays()
    assert list(arrays) == [n for n, _, _ in HANDLE]             # what the decode config declares
    handle = KVHandle.from_arrays(arrays)                        # through Triton's tensor form
    sink = ListSink()
    decode.submit(handle, sink)
    assert sink.done.wait(60)
    assert len({o.request_id for o in sink.outs}) == 1 and sink.outs[0].request_id == handle.request_id
    return sink


def test_prefill_decode_match_offline_engine(node, qwen3_dir):
    prompts = prompts_of(512, [5, 40, 70], seed=21)
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    offline = LLM(qwen3_dir, dtype="float32", num_blocks=64)
    try:
        expect = [o.token_ids for o in offline.generate(prompts, SamplingParams(**greedy))]
        seeded = dict(temperature=0.9, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True)
        expect_seeded = offline.generate(prompts[1], SamplingParams(**seeded))[0].token_ids
    finally:
        offline.close()
    for p, e in zip(prompts, expect):
        sink = run(node, p, greedy)
        assert tokens(sink) == e and sink.outs[-1].finish_reason == "length"
    # a seeded request continues the same random stream across the prefill -> decode handoff
    sink = run(node, prompts[1], seeded)
    assert tokens(sink) == expect_seeded


def test_decode_coalesces_tokens_when_more_requests_live_than_responses_per_step(node, qwen3_dir):
    """4 live requests, 2 responses a step: each request hears every 2nd step, staggered; the first
    token (prefill's) and the last go at once, and the tokens and text are the ones streamed singly."""
    params, prefill, _ = node
    prompts = prompts_of(512, [6, 20, 33, 47], seed=24)
    greedy = dict(temperature=0, max_tokens=11, ignore_eos=True)
    offline = LLM(qwen3_dir, dtype="float32", num_blocks=64)
    try:
        expect = offline.generate(prompts, SamplingParams(**greedy))
    finally:
        offline.close()
    stage = DecodeStage(node_engine(params, "decode"), KEY, responses_per_step=2)
    sinks = [ListSink() for _ in prompts]
    stage.step_once(list(zip(prefilled(prefill, prompts, **greedy), sinks)))   # all four live from one step
    while stage.live:
        stage.step_once()
    stage.engine.block_manager.flush(idle=True)
    steps_heard = set()
    for sink, e in zip(sinks, expect):
        sizes = [len(o.token_ids) for o in sink.outs]
        assert tokens(sink) == e.token_ids
        assert "".join(o.text for o in sink.outs) == e.text
        assert sizes[0] == 1 and sink.outs[-1].finish_reason == "length"
        assert sizes[1] in (1, 2) and all(n == 2 for n in sizes[2:-1]), sizes     # every 2nd step
        assert sink.outs[-1].completion_tokens == 11
        steps_heard.add(sizes[1])
    assert steps_heard == {1, 2}                  # staggered: half the requests heard after one step
    assert blocks_in_use(params.kv_address) == 0


def test_coalesced_tokens_are_never_held_long(node, monkeypatch):
    """Slow steps (a prefill in between) must not hold tokens for many of them: past MAX_HOLD_S a
    held output goes out; release_held() sends them all at once."""
    from baton.backends.stages import decode as decode_mod

    params, prefill, _ = node
    stage = DecodeStage(node_engine(params, "decode"), KEY, responses_per_step=1)
    sinks = [ListSink() for _ in range(3)]
    handles = prefilled(prefill, prompts_of(512, [9, 12, 15], seed=25), temperature=0, max_tokens=8, ignore_eos=True)
    stage.step_once(list(zip(handles, sinks)))         # every 3rd step each: two of three hold
    held = [lv for lv in stage.live.values() if lv.held is not None]
    assert len(held) == 2
    monkeypatch.setattr(decode_mod, "MAX_HOLD_S", 0.0)
    stage.step_once()                                   # held past the limit: those two hear now
    assert [len(s.outs) for s in sinks] == [2, 2, 2] and sum(lv.held is not None for lv in stage.live.values()) == 1
    monkeypatch.setattr(decode_mod, "MAX_HOLD_S", 60.0)
    stage.step_once()
    assert any(lv.held is not None for lv in stage.live.values())
    stage.release_held()
    assert all(lv.held is None for lv in stage.live.values())
    stage.step_once()
    held = next(i for i, lv in enumerate(stage.live.values()) if lv.held is not None)
    sinks[held].cancel = True                           # cancelled while holding: those tokens still go
    stage.step_once()
    assert sinks[held].outs[-1].finish_reason == "abort" and sinks[held].outs[-1].token_ids
    while stage.live:
        stage.step_once()
    got = [len(tokens(s)) for s in sinks]
    assert got[held] < 8 and [n for i, n in enumerate(got) if i != held] == [8, 8]
    stage.engine.block_manager.flush(idle=True)          # what the worker does on going idle
    assert blocks_in_use(params.kv_address) == 0


def test_shared_prefix_hits_cache_across_stages_and_blocks_return(node):
    params, prefill, decode = node
    shared = prompts_of(512, [50], seed=22)[0]
    a = run(node, shared + [7, 8], dict(temperature=0, max_tokens=4, ignore_eos=True))
    b = run(node, shared + [9], dict(temperature=0, max_tokens=4, ignore_eos=True))
    assert a.outs[-1].cached_tokens == 0 and b.outs[-1].cached_tokens == 48
    assert blocks_in_use(params.kv_address) == 0


def test_cancel_mid_stream_frees_blocks(node):
    """Cancelled after its 3rd response (the sink flags it as it receives that one): the worker aborts
    it well before max_tokens (1900 tokens take seconds; the relay asks about cancellation every
    50 ms) and its blocks go back."""
    params, prefill, decode = node

    class CancelAfterThree(ListSink):
        def send(self, delta, final):
            super().send(delta, final)
            self.cancel = len(self.outs) >= 3

    handle = prefilled(prefill, prompts_of(512, [30], seed=23), temperature=0, max_tokens=1900, ignore_eos=True)[0]
    sink = CancelAfterThree()
    decode.submit(handle, sink)
    assert sink.done.wait(60)
    assert sink.outs[-1].finish_reason == "abort" and len(tokens(sink)) < 1900, (sink.outs[-1], len(tokens(sink)))
    assert blocks_in_use(params.kv_address) == 0


def test_preprocess_validates_and_tokenizes(qwen3_dir):
    pre = Preprocessor(str(qwen3_dir), max_model_len=64, max_tokens_limit=100)
    req = pre({"text_input": np.array([b"def f(x):"], dtype=object), "max_tokens": np.array([5], np.int32)})
    assert req.prompt_token_ids and req.sampling.max_tokens == 5 and len(req.request_id) == 32
    again = PrefillRequest.from_arrays(req.to_arrays())        # through Triton's tensor form
    assert again == req
    msgs = np.array([b'[{"role": "user", "content": "hi"}]'], dtype=object)
    assert len(pre({"messages": msgs}).prompt_token_ids) > 3
    bad = [
        ({}, "text_input"),
        ({"text_input": np.array([b"\xff\xfe"], dtype=object)}, "text_input"),
        ({"text_input": np.array([b"x"], dtype=object), "max_tokens": np.array([0], np.int32)}, "max_tokens"),
        ({"text_input": np.array([b"x"], dtype=object), "max_tokens": np.array([101], np.int32)}, "max_tokens"),
        ({"text_input": np.array([b"x " * 200], dtype=object)}, "text_input"),
        ({"text_input": np.array([b"x"], dtype=object), "temperature": np.array([b"hot"], dtype=object)}, "temperature"),
        ({"text_input": np.array([b"x"], dtype=object), "top_p": np.array([1.5], np.float32)}, "top_p"),
        ({"text_input": np.array([b"x"], dtype=object), "max_tokens": np.array([1, 2], np.int32)}, "max_tokens"),
        ({"messages": np.array([b"not json"], dtype=object)}, "messages"),
    ]
    for inputs, field in bad:
        with pytest.raises(InvalidRequestError) as e:
            pre(inputs)
        assert e.value.field == field, (inputs, e.value)


def test_core_share_splits_only_while_both_work(tmp_path):
    import torch

    from baton.backends.stages.cores import CoreShare

    before = torch.get_num_threads()
    CoreShare.create(tmp_path / "cores")
    prefill = CoreShare(tmp_path / "cores", "prefill", 2)
    decode = CoreShare(tmp_path / "cores", "decode", 2)
    try:
        assert decode.busy() == 2               # alone: every core
        assert prefill.busy() == 1              # decode is working: half
        assert decode.busy() == 1
        prefill.idle()
        assert decode.busy() == 2               # prefill done: all cores again, from the next step
        decode.idle()
        assert prefill.busy() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def prefill_first(tmp_path):
    """(prefill, decode) CoreShares of one node under "prefill_first", 2 cores; torch's thread count
    is restored afterwards."""
    import torch

    from baton.backends.stages.cores import CoreShare

    before = torch.get_num_threads()
    CoreShare.create(tmp_path / "cores")
    prefill = CoreShare(tmp_path / "cores", "prefill", 2, "prefill_first")
    yield prefill, CoreShare(tmp_path / "cores", "decode", 2, "prefill_first")
    prefill.idle()
    torch.set_num_threads(before)


def test_core_share_prefill_first_holds_decode_until_prefill_is_done(prefill_first, tmp_path):
    from baton.backends.stages.cores import CoreShare

    prefill, decode = prefill_first
    assert decode.busy() == 2 and not decode.holds_decode()
    assert prefill.busy() == 2              # a prefill always gets every core
    assert decode.holds_decode() and not prefill.holds_decode()
    t0 = time.monotonic()
    threading.Timer(0.2, prefill.idle).start()
    assert decode.busy() == 2               # ... and the next decode step waits for it
    assert time.monotonic() - t0 >= 0.19
    with pytest.raises(ValueError, match="share_cores_policy"):
        CoreShare(tmp_path / "cores", "decode", 2, "greedy")


def test_core_share_prefill_first_waits_for_the_decode_step_in_flight(prefill_first, monkeypatch):
    """A prefill arriving mid-step starts when that step ends, not beside it (2 + 2 threads on 2
    cores); with no step in flight it starts at once (a wrong wait would last MAX_YIELD_S = 30 s)."""
    from baton.backends.stages import cores

    monkeypatch.setattr(cores, "MAX_YIELD_S", 30.0)
    prefill, decode = prefill_first
    decode.busy()                           # a decode step starts
    threading.Timer(0.2, decode.stepped).start()
    t0 = time.monotonic()
    prefill.busy()
    assert 0.19 <= time.monotonic() - t0 < 10
    prefill.idle()
    decode.busy()
    decode.stepped()                        # between steps
    t0 = time.monotonic()
    prefill.busy()
    assert time.monotonic() - t0 < 10


def test_core_share_prefill_first_lets_one_decode_step_in_between_chunks(prefill_first):
    prefill, decode = prefill_first
    events: list[str] = []

    def decode_steps() -> None:
        for _ in range(2):
            decode.busy()                   # waits while a prefill chunk runs
            events.append("decode step")
            time.sleep(0.05)
            decode.stepped()

    from baton.backends.stages.cores import WAITING

    prefill.busy()
    events.append("chunk 1")
    t = threading.Thread(target=decode_steps)
    t.start()
    deadline = time.monotonic() + 10
    while not decode.flags[WAITING] and time.monotonic() < deadline:   # decode is waiting for chunk 1
        time.sleep(0.001)
    assert decode.flags[WAITING] and events == ["chunk 1"]
    prefill.busy()                          # chunk 2: first lets exactly one decode step through
    events.append("chunk 2")
    time.sleep(0.1)
    prefill.idle()
    t.join(5)
    assert events == ["chunk 1", "decode step", "chunk 2", "decode step"]
    prefill.busy()                          # no decode waiting: no yield
    assert prefill.busy() == 2


def test_core_share_lets_a_waiting_decode_step_in_between_layers_after_decode_wait(tmp_path):
    """Inside a prefill step, between_layers lets a waiting decode step in only once the prefill has
    run decode_wait_s since it last took the cores, and then exactly one step. (The prefill's clock is
    moved, not waited for: a 60 s wait cannot pass by accident on a slow machine.)"""
    from baton.backends.stages.cores import WAITING, CoreShare

    CoreShare.create(tmp_path / "cores")
    prefill = CoreShare(tmp_path / "cores", "prefill", 1, "prefill_first", decode_wait_s=60.0)
    decode = CoreShare(tmp_path / "cores", "decode", 1, "prefill_first")
    events: list[str] = []

    def decode_steps() -> None:
        for _ in range(2):
            decode.busy()
            events.append("decode step")
            decode.stepped()

    def wait_for_decode() -> None:
        deadline = time.monotonic() + 10
        while not decode.flags[WAITING] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert decode.flags[WAITING]

    prefill.busy()
    t = threading.Thread(target=decode_steps)
    t.start()
    wait_for_decode()
    prefill.between_layers()                # decode waits, but the prefill has not run 60 s
    assert events == []
    prefill.since -= 60.0                   # ... now it has
    prefill.between_layers()                # one decode step goes first
    assert events == ["decode step"] and time.monotonic() - prefill.since < 60
    wait_for_decode()
    prefill.between_layers()                # the prefill took the cores again just now: it goes on
    assert events == ["decode step"]
    prefill.idle()
    t.join(5)
    assert events == ["decode step"] * 2


def test_prefill_stage_calls_its_core_share_between_layers(node, tmp_path):
    """With decode_wait_ms the prefill stage's model calls its core share between each two layers of
    a prefill forward (without, never); the prefill's result is the same either way."""
    from baton.backends.stages.cores import CoreShare

    cfg, _, _ = node
    CoreShare.create(tmp_path / "cores")
    prompt = list(range(3, 40))
    outs, calls = [], []
    for wait in (0.0, 0.005):
        share = CoreShare(tmp_path / "cores", "prefill", 1, "prefill_first", decode_wait_s=wait)
        share.between_layers = lambda: calls.append(1)     # type: ignore[method-assign]
        stage = PrefillStage(node_engine(cfg, "prefill"), KEY, share)
        (h,) = prefilled(stage, [prompt], max_tokens=4, temperature=0.0)
        outs.append(h.token_ids)
        assert len(calls) == (stage.engine.model.cfg.num_layers - 1 if wait else 0)
        bm = stage.engine.block_manager
        assert bm.claim(h.request_id, h.block_table)
        bm.release(h.block_table)
        bm.flush(idle=True)
    assert outs[0] == outs[1]


def test_decode_fails_one_request_that_cannot_be_adopted_and_keeps_serving(node):
    """A sink that breaks on its first token: that request gets an error and its blocks go back; the
    next request is served normally."""
    params, prefill, _ = node
    stage = DecodeStage(node_engine(params, "decode"), KEY)
    greedy = dict(temperature=0, max_tokens=8, ignore_eos=True)

    class Broken(ListSink):
        def send(self, delta, final):
            raise RuntimeError("client went away")

    broken, ok = Broken(), ListSink()
    stage.step_once([(prefilled(prefill, prompts_of(512, [20], seed=41), **greedy)[0], broken)])
    assert broken.done.is_set() and "could not adopt" in broken.err and not stage.live
    stage.engine.block_manager.flush(idle=True)
    assert blocks_in_use(params.kv_address) == 0
    stage.step_once([(prefilled(prefill, prompts_of(512, [12], seed=42), **greedy)[0], ok)])
    _serve_to_the_end(stage, ok, params, 8)



def _serve_to_the_end(stage, sink, params, n_tokens=None):
    """Step until nothing is live: the sink's request ended by length (with n_tokens tokens), and the
    idle stage holds no KV blocks."""
    while stage.live:
        stage.step_once()
    assert sink.outs[-1].finish_reason == "length" and (n_tokens is None or len(tokens(sink)) == n_tokens)
    stage.engine.block_manager.flush(idle=True)
    assert blocks_in_use(params.kv_address) == 0

def test_forged_or_replayed_handles_are_refused_and_change_nothing(node):
    """Decode refuses a handle this node's prefill did not sign (any changed field, e.g. block ids)
    and one whose blocks the KV manager no longer holds for it (a replay), before touching a block:
    the error names the request, nothing is freed twice, and the next request is served."""
    import dataclasses

    params, prefill, _ = node
    stage = DecodeStage(node_engine(params, "decode"), KEY)
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    real = prefilled(prefill, prompts_of(512, [40], seed=71), **greedy)[0]
    forged = [dataclasses.replace(real, block_table=list(range(1000, 1003))),          # out of the pool
              dataclasses.replace(real, block_table=real.block_table[:1] * 3),          # in range, shared
              dataclasses.replace(real, mac=b""),
              dataclasses.replace(real).sign(b"another node's key")]
    for h in forged:
        sink = ListSink()
        stage.step_once([(h, sink)])
        assert sink.err and "invalid KV handle" in sink.err and real.request_id in sink.err, sink.err
    ok = ListSink()
    stage.step_once([(real, ok)])                         # the genuine handle, once
    replay = ListSink()
    stage.step_once([(KVHandle.from_arrays(real.to_arrays()), replay)])
    assert replay.err and "not held for it" in replay.err
    _serve_to_the_end(stage, ok, params, 4)


def test_unclaimed_handoffs_expire(node):
    """A prefill whose decode never comes (a client calling prefill directly) holds its blocks only
    for the lease; the KV manager releases them afterwards."""
    from baton.backends.kv.block_manager import BlockManager
    from baton.backends.kv.manager import KVManagerServer

    bm = BlockManager(8, 16)
    server = KVManagerServer(bm, f"ipc://{params_dir(node)}/lease.sock")
    server.lease_s = 0.0
    blocks = bm.allocate(3)
    server.handle([("handoff", ("r1", blocks))])
    assert bm.num_used == 3
    import time

    time.sleep(0.01)
    assert server.handle([("claim", ("r1", blocks))]) == [False]      # expired before the claim
    assert bm.num_used == 0


def params_dir(node):
    return node[0].run_dir


def test_preprocess_refuses_a_huge_prompt_before_tokenizing_it(qwen3_dir, monkeypatch):
    pre = Preprocessor(str(qwen3_dir), max_model_len=64, max_tokens_limit=100)

    def no_tokenizing(text):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(pre.tok, "encode", no_tokenizing)
    with pytest.raises(InvalidRequestError, match="characters cannot fit in max_model_len=64") as e:
        pre({"text_input": np.array([b"x" * (1 << 20)], dtype=object)})
    assert e.value.field == "text_input"


def test_cancels_for_requests_not_live_are_not_kept(node):
    """A cancel that arrives after its request finished (or for another worker's request) must not
    stay in the worker's set for ever: each one would be a small leak on a long-running server."""
    params, prefill, _ = node
    stage = DecodeStage(node_engine(params, "decode"), KEY)
    sink = ListSink()
    h = prefilled(prefill, prompts_of(512, [10], seed=81), temperature=0, max_tokens=30, ignore_eos=True)[0]
    stage.step_once([(h, sink)])
    stage.cancel(["finished-long-ago", "another-workers"])
    assert stage.to_cancel == set()
    stage.cancel([h.request_id])
    stage.step_once()
    assert sink.outs[-1].finish_reason == "abort" and stage.to_cancel == set() and not stage.live
    stage.engine.block_manager.flush(idle=True)
    assert blocks_in_use(params.kv_address) == 0


def test_a_kv_manager_that_does_not_answer_fails_the_arrival_not_the_loop(node, monkeypatch):
    from baton.backends.kv.manager import KVManagerUnavailable

    params, prefill, _ = node
    stage = DecodeStage(node_engine(params, "decode"), KEY)
    h = prefilled(prefill, prompts_of(512, [10], seed=82), temperature=0, max_tokens=3, ignore_eos=True)[0]

    def no_answer(*a):
        raise KVManagerUnavailable("the KV manager at ... did not answer")

    monkeypatch.setattr(stage.engine.block_manager, "claim", no_answer)
    sink = ListSink()
    stage.step_once([(h, sink)])                          # must not raise out of the worker's loop
    assert sink.err and "could not check the KV handle" in sink.err and not stage.live
    monkeypatch.undo()
    ok = ListSink()
    stage.step_once([(h, ok)])                            # the manager answers again: served
    _serve_to_the_end(stage, ok, params)


def test_prefill_waits_for_blocks_another_stage_took_since_it_last_heard(node):
    """The shared pool's free count a stage sees is what the KV manager said last. Decode taking blocks
    in between must make prefill wait for them, not fail its request with OutOfBlocks."""
    import threading
    import time

    from baton.backends.kv.manager import RemoteBlockManager

    cfg, prefill, _ = node
    other = RemoteBlockManager(cfg.kv_address, 1, 16, reserve=0)
    prefill.engine.block_manager.stats()                  # prefill's count is fresh: then it goes stale
    free = other.stats()["num_blocks"] - other.stats()["num_used"]
    held = other.allocate(free)
    prompt = prompts_of(512, [10], seed=5)[0]            # within one block: no prefix lookup refreshes the count
    out: list = []
    t = threading.Thread(target=lambda: out.extend(prefill.run(
        [PrefillRequest(uuid.uuid4().hex, prompt, SamplingParams(temperature=0, max_tokens=1))])))
    t.start()
    time.sleep(0.5)
    assert not out                                       # waiting for blocks, not failed
    other.release(held)
    other.flush()
    t.join(30)
    assert len(out) == 1 and isinstance(out[0], KVHandle), out
    assert out[0].finish_reason == "length"
