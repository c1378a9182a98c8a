"""Start and stop a node's KV manager process (used by `baton serve` and by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..runtime import stop_process
from .pool import KVPool, PoolSpec


class KVManagerProcess:
    def __init__(self, pool_name: str, spec: PoolSpec, address: str, log_path: Path,
                 prefix_caching: bool = True, serve_blocks: tuple[str, str, str, str] | None = None,
                 tiers: tuple[dict, str] | None = None) -> None:
        """serve_blocks: (host, protocol, key file, node id) to serve the pool's blocks to other nodes
        (PD prefill); `source` is then the BlockSource JSON its handles carry."""
        self.pool_name, self.spec, self.address, self.log_path = pool_name, spec, address, log_path
        self.prefix_caching = prefix_caching
        self.serve_blocks = serve_blocks
        self.tiers = tiers              # (the kv_tiers table, the model directory)
        self.source = ""
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        spec = ",".join(f"{k}={v}" for k, v in asdict(self.spec).items())
        cmd = [sys.executable, "-P", "-m", "baton.backends.kv.manager", "--pool", self.pool_name,
               "--address", self.address, "--spec", spec] + ([] if self.prefix_caching else ["--no-prefix-caching"])
        if self.serve_blocks:
            host, protocol, key_file, node_id = self.serve_blocks
            cmd += ["--transfer-host", host, "--transfer-protocol", protocol, "--key-file", key_file, "--node-id", node_id]
        if self.tiers:
            cmd += ["--tiers", json.dumps(self.tiers[0]), "--model", self.tiers[1]]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kv-manager exited: {self.log_path.read_text()[-2000:]}")
            log = self.log_path.read_text(errors="replace")
            if "kv-manager ready" in log:
                line = next(ln for ln in log.splitlines() if "kv-manager ready" in ln)
                self.source = line.split(" source=", 1)[1] if " source=" in line else ""
                return
            time.sleep(0.05)
        raise RuntimeError("kv-manager did not become ready")

    def stop(self) -> None:
        stop_process(self.proc)
        for p in (KVPool.data_path(self.pool_name), KVPool.meta_path(self.pool_name)):
            p.unlink(missing_ok=True)
