"""Start and stop a node's KV manager process (used by `baton serve` and by tests)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .pool import KVPool, PoolSpec


class KVManagerProcess:
    def __init__(self, pool_name: str, spec: PoolSpec, address: str, log_path: Path,
                 prefix_caching: bool = True) -> None:
        self.pool_name, self.spec, self.address, self.log_path = pool_name, spec, address, log_path
        self.prefix_caching = prefix_caching
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        spec = ",".join(f"{k}={v}" for k, v in asdict(self.spec).items())
        cmd = [sys.executable, "-P", "-m", "baton.backends.kv.manager", "--pool", self.pool_name,
               "--address", self.address, "--spec", spec] + ([] if self.prefix_caching else ["--no-prefix-caching"])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kv-manager exited: {self.log_path.read_text()[-2000:]}")
            if "kv-manager ready" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise RuntimeError("kv-manager did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for p in (KVPool.data_path(self.pool_name), KVPool.meta_path(self.pool_name)):
            p.unlink(missing_ok=True)
