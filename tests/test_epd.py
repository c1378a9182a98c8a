"""EPD across servers: an encode server (profile epd_encode: only the vision tower) and a prefill +
decode server (epd_llm, --encode-address) on two simulated hosts (network namespaces); the images'
embeddings cross by handle over the Mooncake transfer engine. Outputs are checked token for token
against the offline engine."""

import base64
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
PIL = pytest.importorskip("PIL.Image")
PROFILE = """extends = "{base}"
[engine]
dtype = "float32"
max_model_len = 512
kv_cache_memory_mb = 4
[serving]
max_tokens_limit = 400
embedding_cache_mb = {cache_mb}
"""


def png(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def user(*parts: str | bytes) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": p} if isinstance(p, str) else
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()}}
        for p in parts]}]


class EPD:
    """encoders: the encode servers' host names; with `name_service` they register with an etcd on the
    hub and llm0 finds them there, else llm0 is given the first one's address."""

    def __init__(self, vl_dir: Path, root: Path, encoders: tuple[str, ...] = ("encode0",),
                 name_service: bool = False, arena_mb: float = 0.02) -> None:
        from baton.backends.cluster.netns import Hosts

        self.hosts = Hosts([*encoders, "llm0"])
        self.root, self.procs, self.etcd = root, {}, None
        try:
            self._start(vl_dir, encoders, name_service, arena_mb)
        except Exception:
            self.stop()
            raise

    def _start(self, vl_dir: Path, encoders: tuple[str, ...], name_service: bool, arena_mb: float) -> None:
        from baton.backends.cluster.etcd import EtcdProcess

        key = self.root / "cluster.key"
        key.write_text(secrets.token_hex(32))
        if name_service:
            self.etcd = EtcdProcess(self.hosts.addr["hub"], 2379, 2380, self.hosts.run_in("hub")).start()
        for name in (*encoders, "llm0"):
            base = "epd_encode" if name.startswith("encode") else "epd_llm"
            if self.etcd is not None:
                extra = ["--name-service", self.etcd.url]
            else:
                extra = [] if base == "epd_encode" else ["--encode-address", f"{self.hosts.addr[encoders[0]]}:8001"]
            prof = self.root / f"{name}.toml"
            # the encode server's arena: by default a few images only, so that slots are reused under load
            prof.write_text(PROFILE.format(base=base, cache_mb=1 if name == "llm0" else arena_mb))
            run = self.root / name
            run.mkdir()
            cmd = [*self.hosts.run_in(name), sys.executable, "-P", "-m", "baton.backends.cli", "serve", str(prof),
                   "--model", str(vl_dir), "--host", self.hosts.addr[name], "--gateway-port", "-1",
                   "--cluster-key-file", str(key), *extra]
            self.procs[name] = subprocess.Popen(cmd, stdout=open(run / "serve.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                                env=os.environ | {"BATON_RUN_DIR": str(run)}, start_new_session=True)
            self._wait(name)

    def _wait(self, name: str, timeout: float = 180) -> None:
        log = self.root / name / "serve.log"
        deadline = time.monotonic() + timeout
        while "[baton] serving" not in log.read_text(errors="replace"):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def probe(self, job: dict) -> dict:
        r = subprocess.run([*self.hosts.run_in("hub"), sys.executable, "-P", "-m", "baton.backends.cluster.probe",
                            f"{self.hosts.addr['llm0']}:8001"], input=json.dumps(job), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    def generate(self, messages: list[list[dict]], concurrency: int = 1, **kw: object) -> list[dict]:
        reqs = [{"prompt": None, "messages": m, "temperature": 0.0, "max_tokens": 10, "ignore_eos": True} | kw
                for m in messages]
        return self.probe({"requests": reqs, "concurrency": concurrency})["results"]

    def metric(self, name: str, host: str) -> float:
        text = self.probe({"metrics": [f"http://{self.hosts.addr[host]}:8002/metrics"]})["metrics"][0]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{"))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if self.etcd is not None:
            self.etcd.stop()
        self.hosts.close()


@pytest.fixture(scope="module")
def vl_dir(checkpoint):
    return checkpoint("tiny-qwen2.5-vl", dtype="float32")


@pytest.fixture(scope="module")
def epd(vl_dir, tmp_path_factory):
    from baton.backends.cluster.netns import NetnsUnavailable

    pytest.importorskip("mooncake.engine", reason="the Mooncake transfer engine (make test installs it)")
    try:
        c = EPD(vl_dir, tmp_path_factory.mktemp("epd"))
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces cannot be created here: {e}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def offline(vl_dir):
    from baton import LLM, SamplingParams
    from baton.backends.stages.preprocess import _chat_template, _image_parts

    llm = LLM(vl_dir, dtype="float32", num_blocks=128, max_model_len=512)
    template = _chat_template(Path(vl_dir))

    def run(messages: list[dict], max_tokens: int = 10) -> list[int]:
        prompt = template.render(messages=messages, add_generation_prompt=True)
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return llm.generate({"prompt": prompt, "multi_modal_data": {"image": _image_parts(messages)}}, sp)[0].token_ids

    yield run
    llm.close()


def test_images_encoded_on_another_server_give_the_offline_tokens(epd, offline):
    msgs = [user(png(70, 100, 1), "What is this?"), user("Compare", png(300, 120, 2), "with", png(40, 260, 3)),
            user("text only"), user(png(56, 56, 4), "again?")]
    out = epd.generate(msgs, concurrency=2)
    assert [r["error"] for r in out] == [""] * 4
    assert [r["token_ids"] for r in out] == [offline(m) for m in msgs]
    # the embeddings crossed: the encode server encoded the images, the llm server has no tower running
    assert epd.metric("baton:encode_images_total", "encode0") >= 4


def test_a_repeated_image_is_encoded_once_and_hits_the_prefix_cache(epd, offline):
    m = user(png(90, 90, 10), "Tell me more.")
    hits = epd.metric("baton:encode_cache_hits_total", "encode0")
    first, second = epd.generate([m]), epd.generate([m])
    assert first[0]["token_ids"] == second[0]["token_ids"] == offline(m)
    assert second[0]["cached_tokens"] > first[0]["cached_tokens"]
    assert epd.metric("baton:encode_cache_hits_total", "encode0") == hits + 1


def test_under_load_with_a_small_arena_every_stream_is_right_or_refused(epd, offline):
    """The encode server's arena holds a few images: under concurrent load a slot may be reused before a
    prefill server reads it. Such a read is detected (checksum) and refused as unavailable, never used:
    every stream either has the offline tokens or that error."""
    msgs = [user(png(40 + 8 * i, 64, 100 + i), f"Question {i}") for i in range(12)]
    out = epd.generate(msgs, concurrency=6)
    for m, r in zip(msgs, out):
        assert r["token_ids"] == offline(m) or "changed on the encode server" in r["error"] \
            or "arena is too small" in r["error"], r["error"]
    assert sum(r["error"] == "" for r in out) >= 6


def test_a_bad_image_is_refused_and_both_servers_keep_serving(epd, offline):
    (r,) = epd.generate([user(png(64, 64, 41)[:300], "x")])
    assert "image" in r["error"] and "corrupt or truncated" in r["error"]
    m = user(png(64, 64, 42), "ok?")
    assert epd.generate([m])[0]["token_ids"] == offline(m)


def test_arena_reads_by_handle_and_refuses_a_reused_slot():
    """In one process, two transfer engines: the reader gets the embeddings a handle names, bit for bit;
    a handle whose slot the arena has since given to another image is refused (checksum), not used."""
    pytest.importorskip("mooncake.engine", reason="the Mooncake transfer engine (make test installs it)")
    import torch

    from baton.backends.kv.transfer import TransferError
    from baton.backends.multimodal.remote import EmbeddingArena, RemoteEmbeddings

    arena = EmbeddingArena(3 * 4096, 4096, "127.0.0.1")              # three slots
    reader = RemoteEmbeddings("127.0.0.1", staging_bytes=1 << 16)
    g = torch.Generator().manual_seed(0)
    embeds = {f"{i:032x}": torch.randn(8 + i, 64, generator=g, dtype=torch.float32) for i in range(5)}
    keys = list(embeds)
    for k in keys[:2]:
        arena.put(k, embeds[k])
    source = arena.source(keys[:2])
    got = reader.read(source, [0, 1])
    assert all(torch.equal(a, embeds[k]) for a, k in zip(got, keys[:2]))
    assert torch.equal(arena.get(keys[1]), embeds[keys[1]])
    for k in keys[2:]:                                                # the third slot, then the two oldest reused
        arena.put(k, embeds[k])
    assert arena.get(keys[0]) is None and len(arena) == 3
    with pytest.raises(TransferError, match="changed on the encode server"):
        reader.read(source, [0])
    assert torch.equal(reader.read(arena.source([keys[4]]), [0])[0], embeds[keys[4]])


def test_a_recomputing_node_reads_the_embeddings_back_from_the_encode_server():
    """Decode recomputing a prompt whose images it never encoded: its own store first, else the slots
    the handle names on the encode server; a slot reused since is None (that request ends), not wrong."""
    pytest.importorskip("mooncake.engine", reason="the Mooncake transfer engine (make test installs it)")
    import torch

    from baton.backends.multimodal.remote import EmbeddingArena, RemoteEmbeddings, fetcher

    arena = EmbeddingArena(2 * 4096, 4096, "127.0.0.1")              # two slots
    reader = RemoteEmbeddings("127.0.0.1", staging_bytes=1 << 16)
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(8, 64, generator=g) for _ in range(3))
    arena.put("a", a)
    arena.put("b", b)
    local = {"b": b + 1}                                              # the node's own store wins
    fetch = fetcher(local.get, lambda: reader, arena.source(["a", "b"]).to_json(), ["a", "b"])
    assert torch.equal(fetch("a"), a) and torch.equal(fetch("b"), b + 1)
    arena.put("c", c)                                                 # reuses a's slot
    assert fetch("a") is None
    only_store = fetcher(local.get, None, arena.source(["c"]).to_json(), ["c"])          # no reader: the store
    assert torch.equal(only_store("b"), b + 1) and only_store("c") is None
    assert fetcher(None, None, "", []) is None


def test_the_embedding_readers_staging_hands_out_ranges_that_never_overlap():
    from baton.backends.kv.transfer import TransferError
    from baton.backends.multimodal.remote import _Staging

    st = _Staging(100)
    far = time.monotonic() + 5
    a, b, c = st.take(30, far), st.take(30, far), st.take(40, far)
    assert (a, b, c) == (0, 30, 60)
    t = time.monotonic()
    with pytest.raises(TransferError, match="no staging space"):
        st.take(1, time.monotonic() + 0.1)           # full: waits until its deadline, no longer
    assert time.monotonic() - t < 2
    st.give(b)
    assert st.take(20, far) == 30 and st.take(10, far) == 50       # the gap, first fit
    with pytest.raises(TransferError):
        st.take(11, time.monotonic() + 0.05)
    import threading

    got = []
    waiter = threading.Thread(target=lambda: got.append(st.take(60, far)))
    waiter.start()
    for at in (a, 30, 50):
        st.give(at)                                   # 60 bytes free from 0 only once all three are back
    waiter.join(5)
    assert got == [0] and sorted(st.held.items()) == [(0, 60), (60, 40)]


def test_an_encode_server_that_does_not_answer_costs_only_its_own_reads(monkeypatch):
    """An encode server alive but silent (the transfer engine waits 30 s on it): a read from it gives
    up after its timeout, instead of holding the stage; reads from another encode server go on
    meanwhile; new reads from the silent one fail at once; once its stuck read ends, they work again."""
    pytest.importorskip("mooncake.engine", reason="the Mooncake transfer engine (make test installs it)")
    import threading

    import torch

    from baton.backends.kv.transfer import TransferError
    from baton.backends.multimodal.remote import EmbeddingArena, RemoteEmbeddings

    silent, other = EmbeddingArena(2 * 4096, 4096, "127.0.0.1"), EmbeddingArena(2 * 4096, 4096, "127.0.0.1")
    reader = RemoteEmbeddings("127.0.0.1", staging_bytes=1 << 16)
    silent.put("a", torch.ones(8, 64))
    other.put("b", torch.full((8, 64), 2.0))
    gate = threading.Event()
    engine = reader.agent.engine

    class Silent:                                     # the engine's reads from `silent`, held until the test lets them go
        def batch_transfer_sync_read(self, segment, *a):
            if segment == silent.agent.segment:
                gate.wait(30)
            return engine.batch_transfer_sync_read(segment, *a)

    monkeypatch.setattr(reader.agent, "engine", Silent())
    t = time.monotonic()
    with pytest.raises(TransferError, match="does not answer"):
        reader.read(silent.source(["a"]), [0], timeout_s=0.3)
    assert time.monotonic() - t < 5
    t = time.monotonic()
    assert torch.equal(reader.read(other.source(["b"]), [0], timeout_s=5)[0], torch.full((8, 64), 2.0))
    with pytest.raises(TransferError, match="has not answered"):
        reader.read(silent.source(["a"]), [0], timeout_s=0.3)
    assert time.monotonic() - t < 5                  # neither waited for the stuck read (held up to 30 s)
    gate.set()
    deadline = time.monotonic() + 10
    while reader.transfers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert torch.equal(reader.read(silent.source(["a"]), [0])[0], torch.ones(8, 64))
    assert not reader.staging.held                   # every read gave its staging back


def test_epd_llm_without_an_encode_server_says_so_before_starting_anything(vl_dir, tmp_path, monkeypatch):
    from baton.backends.serving.launcher import Node

    monkeypatch.setenv("BATON_RUN_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"an encode server: give its address \(--encode-address HOST:PORT\), or --name-service URL"):
        Node(str(vl_dir), "epd_llm").start(quiet=True)
    assert list(tmp_path.iterdir()) == []                              # no run dir, nothing started


@pytest.fixture(scope="module")
def named(vl_dir, tmp_path_factory):
    """Two encode servers that register with the name service; llm0 finds them there."""
    from baton.backends.cluster.netns import NetnsUnavailable

    pytest.importorskip("mooncake.engine", reason="the Mooncake transfer engine (make test installs it)")
    pytest.importorskip("etcd3gw")
    try:
        c = EPD(vl_dir, tmp_path_factory.mktemp("epd-named"), ("encode0", "encode1"), name_service=True, arena_mb=1)
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces cannot be created here: {e}")
    yield c
    c.stop()


def _encoded(c: EPD, metric: str) -> dict[str, float]:
    return {h: c.metric(metric, h) for h in c.procs if h.startswith("encode")}


def test_encode_servers_found_in_the_name_service_share_the_images(named, offline):
    msgs = [user(png(48 + 4 * i, 56, 300 + i), f"Picture {i}?") for i in range(12)]
    out = named.generate(msgs, concurrency=3)
    assert [r["token_ids"] for r in out] == [offline(m) for m in msgs], [r["error"] for r in out]
    images = _encoded(named, "baton:encode_images_total")
    assert sum(images.values()) == 12 and min(images.values()) >= 1, images    # both took some


# Until every encode server's record in the name service says no request waits, from a heartbeat
# sent after Triton refreshed its queue gauge (every 2 s) past now: a record from during an earlier
# test's load can say 1, and would send a request by load rather than by the image's order.
SETTLE = """
import sys, time
from baton.backends.cluster.registry import Membership
members, since = Membership(sys.argv[1], "baton"), time.time() + 2.5
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    nodes = members.of_role("encode")
    if nodes and all(n.ts > since and n.waiting == 0 for n in nodes):
        sys.exit(0)
    time.sleep(0.2)
sys.exit(f"encode servers still report waiting requests: {nodes}")
"""


def _settle(c: EPD) -> None:
    r = subprocess.run([*c.hosts.run_in("hub"), sys.executable, "-P", "-c", SETTLE, c.etcd.url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    time.sleep(1.0)                          # the front's membership polls every 0.5 s


def test_a_repeated_image_goes_back_to_the_encode_server_that_has_it(named, offline):
    m = user(png(72, 64, 400), "And this one?")
    _settle(named)                          # loads equal: the image's own order decides
    first = named.generate([m])
    images, hits = _encoded(named, "baton:encode_images_total"), _encoded(named, "baton:encode_cache_hits_total")
    for _ in range(3):
        assert named.generate([m])[0]["token_ids"] == first[0]["token_ids"] == offline(m)
    more_images = {h: n - images[h] for h, n in _encoded(named, "baton:encode_images_total").items()}
    more_hits = {h: n - hits[h] for h, n in _encoded(named, "baton:encode_cache_hits_total").items()}
    assert sorted(more_images.values()) == [0, 3] and more_hits == more_images     # one server, each a hit


ENCODERS = """
import json, sys
from baton.backends.cluster.registry import Membership
print(json.dumps([[n.node_id, n.grpc] for n in Membership(sys.argv[1], "baton").of_role("encode")]))
"""


def _encoders(c: EPD) -> list:
    from baton.backends.cluster.registry import NodeInfo

    r = subprocess.run([*c.hosts.run_in("hub"), sys.executable, "-P", "-c", ENCODERS, c.etcd.url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return [NodeInfo(node_id, "encode", grpc) for node_id, grpc in json.loads(r.stdout)]


def test_a_call_to_an_encode_server_that_freezes_moves_to_another_once_its_lease_ends(named, offline, vl_dir):
    """An encode server that stops answering (its tritonserver stopped, its launcher still
    heartbeating), then stops heartbeating too (the whole host frozen): the call waiting on it is given
    up once its key leaves the name service and the request is served by the other encode server,
    instead of waiting out request_timeout_s (600 s) on the connection it has."""
    from concurrent.futures import ThreadPoolExecutor

    from baton.backends.cluster.encoders import rank_encoders

    _settle(named)
    nodes, target = _encoders(named), f"{named.hosts.addr['encode0']}:8001"
    assert len(nodes) == 2
    image = next(im for im in (png(64, 64, 700 + i) for i in range(200))
                 if rank_encoders(nodes, {}, _image_hash(vl_dir, im))[0].grpc == target)    # encode0 first
    m = user(image, "Still there?")
    assert named.generate([m])[0]["token_ids"] == offline(m)     # llm0's front now has a connection to encode0
    retries = named.metric("baton:route_retries_total", "llm0")
    launcher = named.procs["encode0"].pid
    triton = _descendant(launcher, "tritonserver")
    os.kill(triton, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(named.generate, [m])
            time.sleep(3.0)
            assert not fut.done()                         # waiting on encode0, which is still registered
            os.killpg(launcher, signal.SIGSTOP)           # the host freezes: no more heartbeats
            (r,) = fut.result(60)
        assert r["token_ids"] == offline(m), r["error"]
        assert named.metric("baton:route_retries_total", "llm0") == retries + 1
    finally:
        os.killpg(launcher, signal.SIGCONT)
        os.kill(triton, signal.SIGCONT)
    deadline = time.monotonic() + 30                      # encode0 registers again (a new lease)
    while len(_encoders(named)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_encoders(named)) == 2


# A crashed encode server whose key is still in the name service (its lease not yet expired): an
# address nothing answers at, named so that it ranks first for one image (ghost_for), kept registered
# until killed.
GHOST = """
import sys, time
from baton.backends.cluster.encoders import rank_encoders
from baton.backends.cluster.registry import Membership, NodeInfo, Registration
url, key, address = sys.argv[1:]
live = Membership(url, "baton").of_role("encode")
ghost = next(g for g in (NodeInfo(f"ghost-{i}", "encode", address) for i in range(1000))
             if rank_encoders([g, *live], {}, key)[0] is g)
Registration(url, "baton", lambda: ghost)
print(ghost.node_id, flush=True)
time.sleep(3600)
"""


def _image_hash(vl_dir: Path, data: bytes) -> str:
    from baton.backends.multimodal.image import ImageProcessor

    return ImageProcessor.from_dir(vl_dir)(data).hash


def _descendant(pid: int, name: str) -> int:
    """The first process under `pid` whose command line has `name`."""
    children = {}
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append((int(d.name), (d / "cmdline").read_bytes()))
        except (ValueError, OSError, IndexError):
            continue
    todo = [pid]
    while todo:
        for child, cmdline in children.get(todo.pop(), []):
            if name.encode() in cmdline:
                return child
            todo.append(child)
    raise LookupError(f"no {name} under {pid}")


def test_a_dead_encode_server_is_skipped_and_none_left_is_a_clear_error(named, offline, vl_dir):
    """A registered encode server that refuses calls (crashed, its key not yet expired) is skipped
    after one refused call and the request served by another; a crashed server stops saying why; with
    every encode server gone an image request is refused naming them, and text still works."""
    image = png(66, 58, 450)
    ghost = subprocess.Popen([*named.hosts.run_in("hub"), sys.executable, "-P", "-c", GHOST, named.etcd.url,
                              _image_hash(vl_dir, image), f"{named.hosts.addr['hub']}:1"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert ghost.stdout is not None and ghost.stdout.readline().startswith("ghost-")
        retries = named.metric("baton:route_retries_total", "llm0")
        m = user(image, "Who answers?")
        time.sleep(1.0)                                    # llm0's front polls the membership every 0.5 s
        (r,) = named.generate([m])
        assert r["token_ids"] == offline(m), r["error"]
        assert named.metric("baton:route_retries_total", "llm0") == retries + 1      # the ghost was tried first
        os.kill(_descendant(named.procs["encode1"].pid, "tritonserver"), signal.SIGKILL)
        msgs = [user(png(60, 60 + 4 * i, 500 + i), f"After the crash {i}") for i in range(4)]
        out = named.generate(msgs)
        assert [r["token_ids"] for r in out] == [offline(m) for m in msgs], [r["error"] for r in out]
        assert named.procs["encode1"].wait(60) != 0
        assert "tritonserver exited" in (named.root / "encode1" / "serve.log").read_text(errors="replace")
    finally:
        ghost.kill()
        ghost.wait()
    named.procs["encode0"].send_signal(signal.SIGTERM)
    named.procs["encode0"].wait(60)
    (r,) = named.generate([user(png(64, 64, 600), "anyone?")])
    assert r["token_ids"] == [] and "encode server" in r["error"], r
    m = user("text needs no encoder")
    assert named.generate([m])[0]["token_ids"] == offline(m)


# ---- E, P and D each on its own server: encode0, prefill0, decode0 and a router (profile epd_router) ----

@pytest.fixture(scope="module")
def epd_pd(vl_dir, tmp_path_factory):
    """An EPD cluster on simulated hosts (cluster.local with encode=1), and beside its router a second
    one (profile pd_router) whose images the prefill node encodes itself."""
    from baton.backends.cluster.local import LocalCluster, NodeProcess
    from baton.backends.cluster.netns import NetnsUnavailable

    pytest.importorskip("mooncake.engine", reason="the Mooncake transfer engine (make test installs it)")
    pytest.importorskip("etcd3gw")
    d = tmp_path_factory.mktemp("epd-pd-profiles")
    for name in ("pd_prefill", "pd_decode", "pd_router", "epd_router", "epd_encode"):
        (d / f"{name}.toml").write_text(PROFILE.format(base=name, cache_mb=1))
    try:
        c = LocalCluster(str(vl_dir), 1, 1, hosts=True, profile_dir=d, encode=1).start()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces cannot be created here: {e}")
    try:
        hub = c.hosts.addr["hub"]
        mono = NodeProcess("router_mono", str(d / "pd_router.toml"), hub, (8100, 8101, 8102, -1), c.run_root / "router_mono",
                           prefix=c.hosts.run_in("hub"))
        c.nodes[mono.name] = mono
        c._launch(mono)
        c._wait_serving(mono, 180)
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()


def _generate(c, messages: list[list[dict]], router: str = "router", concurrency: int = 1, **kw: object) -> list[dict]:
    reqs = [{"prompt": None, "messages": m, "temperature": 0.0, "max_tokens": 10, "ignore_eos": True} | kw
            for m in messages]
    return c.probe({"requests": reqs, "concurrency": concurrency}, via=router)["results"]


def _held(c) -> dict[str, tuple[int, int]]:
    from conftest import pd_leaks

    return pd_leaks(c)


def test_encode_prefill_and_decode_each_on_its_own_server_give_the_offline_tokens(epd_pd, offline):
    msgs = [user(png(70, 100, 701), "What is this?"), user("Compare", png(300, 120, 702), "with", png(40, 260, 703)),
            user("text only"), user(png(56, 56, 704), "again?")]
    encoded = epd_pd.metric("baton:encode_images_total", ["encode0"])["encode0"]
    out = _generate(epd_pd, msgs, concurrency=2)
    assert [r["token_ids"] for r in out] == [offline(m) for m in msgs], [r["error"] for r in out]
    assert epd_pd.metric("baton:encode_images_total", ["encode0"])["encode0"] == encoded + 4   # all on encode0
    assert _held(epd_pd) == {"prefill0": (0, 0), "decode0": (0, 0)}


def test_a_repeated_image_is_a_prefix_hit_on_the_prefill_node_across_servers(epd_pd, offline):
    m = user(png(90, 90, 710), "Tell me more.")
    first, second = _generate(epd_pd, [m]), _generate(epd_pd, [m])
    assert first[0]["token_ids"] == second[0]["token_ids"] == offline(m)
    assert second[0]["cached_tokens"] > first[0]["cached_tokens"] + 16    # past the image's blocks


def test_a_pd_router_without_encode_servers_has_the_prefill_node_encode(epd_pd, offline):
    msgs = [user(png(64, 80, 720), "Describe it."), user("plain text")]
    before = epd_pd.metric("baton:encode_images_total", ["encode0"])["encode0"]
    out = _generate(epd_pd, msgs, router="router_mono")
    assert [r["token_ids"] for r in out] == [offline(m) for m in msgs], [r["error"] for r in out]
    assert epd_pd.metric("baton:encode_images_total", ["encode0"])["encode0"] == before
    (bad,) = _generate(epd_pd, [user(png(64, 64, 721)[:300], "x")], router="router_mono")
    assert "corrupt or truncated" in bad["error"]
    assert _held(epd_pd) == {"prefill0": (0, 0), "decode0": (0, 0)}


def test_cancelled_image_streams_leave_no_blocks_held_on_either_node(epd_pd, offline):
    msgs = [user(png(64 + 8 * i, 72, 740 + i), f"Cancel me {i}") for i in range(6)]
    out = _generate(epd_pd, msgs, concurrency=3, max_tokens=200, cancel_after=2)
    assert [r["finish_reason"] for r in out] == ["cancelled"] * 6, [r["error"] for r in out]
    assert _held(epd_pd) == {"prefill0": (0, 0), "decode0": (0, 0)}
    m = user(png(64, 64, 750), "still fine?")
    assert _generate(epd_pd, [m])[0]["token_ids"] == offline(m)
