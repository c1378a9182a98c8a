"""The storage services under the KV tiers, started by `baton serve` (kv_tiers.store = "auto",
kv_tiers.redis = "auto") and by the tests: Mooncake Store's `mooncake_master` (L3) and Debian's
`redis-server` (L4). Each lives in a temporary directory that goes with it and dies with its parent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..runtime import die_with_parent, stop_process


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float,
               prefix: list[str]) -> None:
    """Until host:port accepts, asked from the service's own namespace (`prefix`)."""
    check = prefix + [sys.executable, "-c", f"import socket; socket.create_connection(('{host}', {port}), timeout=1)"]
    deadline = time.monotonic() + timeout
    while True:
        if prefix:
            up = subprocess.run(check, capture_output=True, timeout=10).returncode == 0
        else:
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    up = True
            except OSError:
                up = False
        if up:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            stop_process(proc)
            raise RuntimeError(f"{what} did not start on {host}:{port}:\n{text}")
        time.sleep(0.05)


class Service:
    name = ""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, prefix: list[str] | None = None) -> None:
        """prefix: a command to run it under (e.g. ["ip", "netns", "exec", NS]); then `port` is needed."""
        self.prefix = prefix or []
        self.host, self.port = host, port or free_port(host)
        self.proc: subprocess.Popen | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"baton-{os.getpid()}-{self.name}-"))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _start(self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 20) -> None:
        log = self.dir / f"{self.name}.log"
        self.proc = subprocess.Popen(self.prefix + cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     cwd=self.dir, env=env, preexec_fn=die_with_parent)
        _wait_port(self.host, self.port, self.proc, log, self.name, timeout, self.prefix)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MooncakeMaster(Service):
    """mooncake_master with its HTTP metadata server on port + 1 (what kv_tiers.store expects)."""
    name = "mooncake-master"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, prefix: list[str] | None = None) -> None:
        super().__init__(host, port, prefix)
        while not self.prefix:   # the metadata and metrics servers take the next ports: all must be free
            try:
                with socket.socket() as s1, socket.socket() as s2:
                    s1.bind((host, self.port + 1))
                    s2.bind((host, self.port + 2))
                break
            except OSError:
                self.port = free_port(host)

    def start(self) -> MooncakeMaster:
        exe = Path(sys.executable).with_name("mooncake_master")
        if not exe.exists():
            exe = Path(shutil.which("mooncake_master") or exe)
        if not exe.exists():
            raise RuntimeError("mooncake_master not found: pip install mooncake-transfer-engine-non-cuda "
                               "(the `pd` extra)")
        env = dict(os.environ, MC_LOG_LEVEL="ERROR")
        self._start([str(exe), f"--rpc_port={self.port}", f"--rpc_address={self.host}",
                     f"--metrics_port={self.port + 2}", "--enable_http_metadata_server=true",
                     f"--http_metadata_server_host={self.host}", f"--http_metadata_server_port={self.port + 1}",
                     "--default_kv_lease_ttl=100"], env)
        _wait_port(self.host, self.port + 1, self.proc, self.dir / f"{self.name}.log", self.name, 20, self.prefix)
        return self


class RedisServer(Service):
    name = "redis"

    def start(self, maxmemory_mb: int = 256) -> RedisServer:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(exe).exists():
            raise RuntimeError("redis-server not found: install Debian's redis-server (make sysdeps does)")
        self._start([exe, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                     "--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "allkeys-lru",
                     "--dir", str(self.dir)])
        return self
