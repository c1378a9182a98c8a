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
    def __init__(self, vl_dir: Path, root: Path) -> None:
        from baton.backends.cluster.netns import Hosts

        self.hosts = Hosts(["encode0", "llm0"])
        self.root, self.procs = root, {}
        key = root / "cluster.key"
        key.write_text(secrets.token_hex(32))
        for name, base, extra in (("encode0", "epd_encode", []),
                                  ("llm0", "epd_llm", ["--encode-address", f"{self.hosts.addr['encode0']}:8001"])):
            prof = root / f"{name}.toml"
            # the encode server's arena: a few images only, so that slots are reused under load
            prof.write_text(PROFILE.format(base=base, cache_mb=1 if name == "llm0" else 0.02))
            run = root / name
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

    def run(messages: list[dict]) -> list[int]:
        prompt = template.render(messages=messages, add_generation_prompt=True)
        sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
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
