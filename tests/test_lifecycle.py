"""Process lifecycle: nothing outlives a killed launcher, leftovers of killed runs are removed by the
next start (found by the PID in their names), taken ports are refused."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import baton_serve

from baton import LLM
from baton.backends.kv.pool import SHM_DIR
from baton.backends.runtime import remove_leftovers


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    names = [f"baton-kv-{dead}-ab12", f"baton-weights-{dead}-ab12.json", f"baton-{dead}-ab12-region",
             f"baton-kv-{live}-cd34", "baton-kv-test-ef56", "unrelated"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / f"baton-{dead}-ab12").mkdir()
    (tmp_path / f"baton-{dead}-ab12" / "tritonserver.log").write_text("log")
    removed = {p.name for p in remove_leftovers(tmp_path)}
    assert removed == {f"baton-kv-{dead}-ab12", f"baton-weights-{dead}-ab12.json", f"baton-{dead}-ab12-region",
                       f"baton-{dead}-ab12"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"baton-kv-{live}-cd34", "baton-kv-test-ef56",
                                                                  "unrelated"])


def test_children_spawned_beside_live_grpc_channels_all_start():
    """A process that imported baton, then serves and calls gRPC, spawns children with
    preexec_fn=die_with_parent (the launcher's way): every child must reach its exec. With gRPC's fork
    support on, 1-3% died in the fork with "epoll_wait error: Bad file descriptor" (a CI failure:
    "HTTP front did not start")."""
    script = """
import subprocess, sys
from concurrent import futures
import baton
import grpc
from baton.backends.runtime import die_with_parent
server = grpc.server(futures.ThreadPoolExecutor(2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=10)
died = [p.returncode for p in (subprocess.Popen(["/bin/true"], preexec_fn=die_with_parent,
        stderr=subprocess.DEVNULL) for _ in range(300)) if p.wait() != 0]
print("died", len(died))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "died 0" in out.stdout, out.stdout


def test_a_killed_offline_engines_pool_is_removed_by_the_next_engine(qwen3_dir):
    code = ("import os, signal\nfrom baton import LLM\n"
            f"llm = LLM({str(qwen3_dir)!r}, dtype='float32', num_blocks=8)\n"
            "print(llm.engine.pool.name, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = SHM_DIR / f"baton-kv-{r.stdout.strip()}"
    assert left.exists()                                  # the kill left it behind
    llm = LLM(qwen3_dir, dtype="float32", num_blocks=8)
    try:
        assert not left.exists()
    finally:
        llm.close()


def _cmdlines_with(text):
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(cmd)
    return out


@pytest.mark.slow
def test_a_killed_baton_serve_takes_its_processes_and_the_next_start_its_files(qwen3_dir, tmp_path, monkeypatch):
    """kill -9 `baton serve`: tritonserver, the stage stubs, the decode worker and the KV manager follow
    it (they die with their parent); its /dev/shm files and run dir stay, and the next start removes them."""
    from baton.backends.serving.launcher import Node

    proc, run_dir = baton_serve(qwen3_dir, tmp_path)
    try:
        assert len(_cmdlines_with(str(run_dir))) >= 5       # tritonserver, 4 stubs, the worker, the manager
        # told to go, tritonserver waits at most 5 s for requests in flight (its default: 30)
        server = [c for c in _cmdlines_with(str(run_dir)) if "--model-repository=" in c]
        verbose = f" --log-verbose={os.environ.get('BATON_TRITON_VERBOSE', '0')} "
        assert len(server) == 1 and " --exit-timeout-secs=5 " in server[0] and verbose in server[0]
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while _cmdlines_with(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cmdlines_with(str(run_dir)) == []
        node_id = run_dir.name.removeprefix("baton-")
        left = list(SHM_DIR.glob(f"*{node_id}*"))
        assert left and run_dir.exists()
        monkeypatch.setenv("BATON_RUN_DIR", str(tmp_path))
        n = Node(str(qwen3_dir), overrides={"dtype": "float32", "max_model_len": 256, "kv_cache_memory_mb": 4})
        n.start(timeout=180, quiet=True)
        try:
            assert not any(p.exists() for p in left) and not run_dir.exists()
        finally:
            n.stop()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_taken_port_is_refused_before_anything_starts(qwen3_dir):
    from baton.backends.serving.launcher import Node

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        n = Node(str(qwen3_dir), grpc_port=port)
        with pytest.raises(RuntimeError, match=f"gRPC port {port} is in use"):
            n.start(timeout=60, quiet=True)
    assert n.manager is None and n.server is None


FREE = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--gateway-port", "-1"]   # any port in use


@pytest.mark.parametrize("args, rc, message", [
    (["serve", *FREE, "--model", "/nonexistent"], 1, "model directory not found: '/nonexistent'"),
    (["serve", *FREE, "no_such_profile"], 1, "no deployment profile 'no_such_profile'"),
    (["serve", *FREE, "pd_prefill"], 1, "it needs --name-service URL"),
    (["serve", "--http-port", "70000"], 2, "argument --http-port: 70000 is not a port"),
    (["serve", *FREE, "--timeout", "0"], 2, "argument --timeout: must be a positive number of seconds"),
    (["serve", *FREE, "--lora-modules", "sql=/nonexistent"], 2,
     "argument --lora-modules: '/nonexistent' has no adapter_config.json"),
    (["generate", "--model", "/nonexistent", "hi"], 1, "model directory not found: '/nonexistent'"),
    (["gateway", "--port", "-3"], 2, "argument --port: -3 is not a port"),
])
def test_a_baton_command_that_cannot_start_says_why_in_one_line(tmp_path, args, rc, message):
    """An operator's mistake is a one-line error naming it and a nonzero exit, not a traceback."""
    r = subprocess.run([sys.executable, "-P", "-m", "baton.backends.cli", *args], capture_output=True, text=True,
                       timeout=120, env=os.environ | {"BATON_RUN_DIR": str(tmp_path)})
    assert r.returncode == rc and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"baton {args[0]}: error: ") and message in last, last
    assert not any(tmp_path.iterdir())                   # nothing left behind


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_drains_in_flight_streams_and_refuses_new_ones(qwen3_dir, tmp_path, sig):
    """SIGTERM (or SIGINT: `kill -INT`, Ctrl-C) to `baton serve` mid-stream: the stream finishes all its
    tokens, a new request is refused with "shutting down", and the process exits 0 leaving nothing
    behind. SIGINT to a server started as a background job, which inherits SIGINT ignored."""
    from baton_client import BatonClient, BatonError

    proc, run_dir = baton_serve(qwen3_dir, tmp_path, sigint_ignored=sig == signal.SIGINT)
    try:
        grpc_port = next(a.split("=")[1] for a in _cmdlines_with(str(run_dir / "models"))[0].split()
                         if a.startswith("--grpc-port="))
        url = f"127.0.0.1:{grpc_port}"
        stream = BatonClient(url).stream("def long_function():", temperature=0.0, max_tokens=200, ignore_eos=True)
        chunks = [next(stream)]
        proc.send_signal(sig)
        deadline = time.monotonic() + 10
        while not (run_dir / "draining").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(BatonError, match="shutting down"):
            BatonClient(url).generate("new one", max_tokens=3)
        chunks += list(stream)
        assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 200
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 0 and "drained" in err, err
        assert _cmdlines_with(str(run_dir)) == [] and not run_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
