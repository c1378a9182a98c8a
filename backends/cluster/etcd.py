"""A local etcd for a one-machine cluster (`baton cluster up`) and the tests: Debian's etcd-server,
its data in a temporary directory that goes with it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..runtime import die_with_parent, stop_process


class EtcdProcess:
    def __init__(self, host: str = "127.0.0.1", port: int = 2379, peer_port: int = 2380,
                 prefix: list[str] | None = None) -> None:
        """prefix: a command to run etcd under (e.g. ["ip", "netns", "exec", NS])."""
        self.host, self.port, self.peer_port, self.prefix = host, port, peer_port, prefix or []
        self.proc: subprocess.Popen | None = None
        self.data = Path(tempfile.mkdtemp(prefix="baton-etcd-"))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20) -> EtcdProcess:
        exe = shutil.which("etcd") or "/usr/bin/etcd"
        if not Path(exe).exists():
            raise RuntimeError("etcd not found: install Debian's etcd-server (make sysdeps does)")
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = self.prefix + [exe, "--name", "baton", "--data-dir", str(self.data / "data"),
                             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"baton={peer}", "--log-level", "error"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.data / "etcd.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     preexec_fn=die_with_parent)
        # asked from etcd's own namespace (a simulated host's address is not reachable from outside)
        check = self.prefix + [sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{self.url}/health', timeout=1)"]
        deadline = time.monotonic() + timeout
        while True:
            try:
                if subprocess.run(check, capture_output=True, timeout=10).returncode == 0:
                    return self
            except subprocess.TimeoutExpired:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.data / "etcd.log").read_text(errors="replace")[-1500:]
                self.stop()
                raise RuntimeError(f"etcd did not start at {self.url}:\n{log}") from None
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.data, ignore_errors=True)
