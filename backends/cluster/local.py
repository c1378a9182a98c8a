"""A PD cluster on one machine: etcd, N prefill nodes, M decode nodes and a router, each node its own
`baton serve` process (its own tritonserver, KV manager and pool); for a vision model optionally E
encode servers (EPD: the router sends images to them, profile epd_router). Optionally each node on its own
simulated host (cluster.netns.Hosts: network namespaces), so the KV transfer crosses a network
interface. Used by `baton cluster up`, the PD tests and benchmarks/pd.py."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..kv.pool import SHM_DIR
from ..runtime import die_with_parent, remove_leftovers
from ..serving.launcher import free_port
from .etcd import EtcdProcess
from .netns import Hosts
from .registry import Membership


@dataclass
class NodeProcess:
    name: str                  # prefill0, decode1, encode0, router
    profile: str
    host: str                  # its address
    ports: tuple[int, int, int, int]     # http, grpc, metrics, gateway (-1: none)
    run_dir: Path              # BATON_RUN_DIR of its `baton serve`
    proc: subprocess.Popen | None = None
    prefix: list[str] = field(default_factory=list)
    taskset: str = ""          # CPUs to pin it to ("" : any)

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.ports[1]}"

    @property
    def http(self) -> str:
        return f"{self.host}:{self.ports[0]}"

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.ports[2]}/metrics"

    @property
    def log(self) -> Path:
        return self.run_dir / "serve.log"

    def kv_address(self) -> str:
        """Its KV manager's socket (a path: reachable from any namespace)."""
        socks = list(self.run_dir.glob("baton-*/kv.sock"))
        if not socks:
            raise FileNotFoundError(f"{self.name} has no KV manager socket under {self.run_dir}")
        return f"ipc://{socks[0]}"


class LocalCluster:
    def __init__(self, model: str, prefill: int = 1, decode: int = 1, hosts: bool = False,
                 profile_dir: Path | None = None, run_root: Path | None = None,
                 router_ports: tuple[int, int, int, int] = (0, 0, 0, 0), taskset: dict[str, str] | None = None,
                 kv_tiers: dict | None = None, encode: int = 0) -> None:
        """profile_dir: where to find pd_prefill/pd_decode/pd_router.toml (epd_encode, epd_router) overrides (tests shrink the
        pool); hosts: one network namespace per node; router_ports: the router's HTTP, gRPC, metrics and
        OpenAI gateway ports without hosts (0: a free one, -1: no gateway); taskset: node name -> CPUs;
        kv_tiers: every prefill and decode node's [engine.kv_tiers] (store "auto": one mooncake_master
        for the cluster, beside etcd, that every node uses); encode: encode servers (EPD)."""
        self.model, self.n_prefill, self.n_decode, self.n_encode = model, prefill, decode, encode
        self.profile_dir = profile_dir
        self.run_root = Path(run_root or tempfile.mkdtemp(prefix=f"baton-{os.getpid()}-cluster-"))
        self.router_ports = router_ports
        self.taskset = taskset or {}
        self.hosts: Hosts | None = None
        self.names = [f"encode{i}" for i in range(encode)] + [f"prefill{i}" for i in range(prefill)] \
            + [f"decode{i}" for i in range(decode)] + ["router"]
        self.want_hosts = hosts
        self.etcd: EtcdProcess | None = None
        self.nodes: dict[str, NodeProcess] = {}
        self.key_file = self.run_root / "cluster.key"
        self.kv_tiers = dict(kv_tiers or {})
        self.store = None                    # the cluster's mooncake_master (kv/services.py)

    def _profile(self, role: str) -> str:
        name = {"encode": "epd_encode", "router": "epd_router" if self.n_encode else "pd_router"}.get(role, f"pd_{role}")
        if self.profile_dir is not None and (self.profile_dir / f"{name}.toml").is_file():
            return str(self.profile_dir / f"{name}.toml")
        return name

    def start(self, timeout: float = 300) -> LocalCluster:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.run_root.mkdir(parents=True, exist_ok=True)
        self.key_file.touch(mode=0o600)
        self.key_file.write_text(secrets.token_hex(32))
        if self.want_hosts:
            self.hosts = Hosts([n for n in self.names if n != "router"])
            hub = self.hosts.addr["hub"]
            self.etcd = EtcdProcess(hub, 2379, 2380, self.hosts.run_in("hub")).start()
        else:
            self.etcd = EtcdProcess("127.0.0.1", free_port(), free_port()).start()
        if self.kv_tiers.get("store") == "auto":
            from ..kv.services import MooncakeMaster

            self.store = (MooncakeMaster(hub, 2400, self.hosts.run_in("hub")) if self.hosts is not None
                          else MooncakeMaster()).start()
            self.kv_tiers["store"] = self.store.address
        for name in self.names:
            role = "router" if name == "router" else name.rstrip("0123456789")
            if self.hosts is not None:          # a host of its own: the usual ports are free there
                host = self.hosts.addr["hub" if name == "router" else name]
                prefix = self.hosts.run_in("hub" if name == "router" else name)
                ports = (8000, 8001, 8002, 9000 if role == "router" else -1)
            else:
                host, prefix = "127.0.0.1", []
                if role == "router":
                    ports = tuple(p if p else free_port() for p in self.router_ports)
                else:
                    ports = (free_port(), free_port(), free_port(), -1)
            self.nodes[name] = NodeProcess(name, self._profile(role), host, ports, self.run_root / name, prefix=prefix,
                                           taskset=self.taskset.get(name, ""))
        # encode, prefill and decode nodes first (in parallel), then the router, once they are registered
        workers = [n for n in self.nodes.values() if n.name != "router"]
        for n in workers:
            self._launch(n)
        for n in workers:
            self._wait_serving(n, timeout)
        members = Membership(self.etcd.url, "baton") if self.hosts is None else None
        if members is not None:
            members.wait_for({"prefill": self.n_prefill, "decode": self.n_decode, "encode": self.n_encode}, 10)
            members.stop()
        self._launch(self.nodes["router"])
        self._wait_serving(self.nodes["router"], timeout)

    def _launch(self, n: NodeProcess) -> None:
        n.run_dir.mkdir(parents=True, exist_ok=True)
        http, grpc, metrics, gateway = n.ports
        cmd = [sys.executable, "-P", "-m", "baton.backends.cli", "serve", n.profile, "--model", self.model,
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--gateway-port", str(gateway), "--name-service", self.etcd.url, "--host", n.host,
               "--cluster-key-file", str(self.key_file)]
        if self.kv_tiers and n.name.startswith(("prefill", "decode")):
            cmd += ["--kv-tiers", json.dumps(self.kv_tiers)]
        if n.taskset:
            cmd = ["taskset", "-c", n.taskset, *cmd]
        env = os.environ | {"BATON_RUN_DIR": str(n.run_dir)}
        n.proc = subprocess.Popen(n.prefix + cmd, stdout=open(n.log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                  env=env, preexec_fn=die_with_parent, start_new_session=True)

    def _wait_serving(self, n: NodeProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while "[baton] serving" not in n.log.read_text(errors="replace"):
            if n.proc.poll() is not None or time.monotonic() > deadline:
                tail = n.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{n.name} did not start ({n.profile}):\n{tail}")
            time.sleep(0.1)

    @property
    def router(self) -> NodeProcess:
        return self.nodes["router"]

    def probe(self, job: dict, timeout: float = 300, via: str = "router") -> dict:
        """Run a cluster.probe job from the router's host (the client sits on the cluster's network),
        against the node `via`."""
        prefix = self.hosts.run_in("hub") if self.hosts is not None else []
        r = subprocess.run(prefix + [sys.executable, "-P", "-m", "baton.backends.cluster.probe", self.nodes[via].grpc],
                           input=json.dumps(job), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"probe failed: {r.stderr[-2000:]}")
        return json.loads(r.stdout)

    def generate(self, requests: list[dict], concurrency: int = 1) -> list[dict]:
        return self.probe({"requests": requests, "concurrency": concurrency})["results"]

    def metric(self, name: str, nodes: list[str]) -> dict[str, float]:
        """One metric's value (summed over its label sets) on each of these nodes."""
        texts = self.probe({"metrics": [self.nodes[n].metrics for n in nodes]})["metrics"]
        out = {}
        for n, text in zip(nodes, texts):
            out[n] = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                         if ln.startswith(name + "{") or ln.startswith(name + " "))
        return out

    def kv_stats(self, name: str) -> dict:
        """A prefill or decode node's KV manager stats (blocks used, handed off...)."""
        from ..kv.manager import RemoteBlockManager

        return RemoteBlockManager(self.nodes[name].kv_address(), 1, 1).stats()

    def kill(self, name: str) -> None:
        """SIGKILL a node's whole process group (its `baton serve`, tritonserver and stages): a crash."""
        n = self.nodes[name]
        if n.proc is not None and n.proc.poll() is None:
            os.killpg(n.proc.pid, signal.SIGKILL)
            n.proc.wait()
        for p in n.run_dir.glob("baton-*/tritonserver.pid"):     # tritonserver leads its own session
            try:
                os.killpg(int(p.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def stop(self) -> None:
        for name in ["router", *[n for n in self.nodes if n != "router"]]:
            n = self.nodes.get(name)
            if n is None or n.proc is None or n.proc.poll() is not None:
                continue
            n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes.values():
            if n.proc is not None:
                try:
                    n.proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(n.proc.pid, signal.SIGKILL)
                    n.proc.wait()
        if self.etcd is not None:
            self.etcd.stop()
        if self.store is not None:
            self.store.stop()
        if self.hosts is not None:
            self.hosts.close()
        shutil.rmtree(self.run_root, ignore_errors=True)
        remove_leftovers(SHM_DIR)           # pools and weights of nodes that were killed

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
