"""`baton serve`: one node = the KV manager process + one tritonserver with the profile's models.

    start(): render the repository, create the pool (via the KV manager), start tritonserver,
             wait for readiness (with the stage log if a stage fails), print the endpoints;
    stop():  stop tritonserver then the manager, remove this node's /dev/shm segments."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from baton.kernels import cpu_ext
from baton.kernels.linear import select_linear_method

from ..cluster.registry import HASH_SUMMARY, NodeInfo, Registration, short_hash
from ..engine.llm_engine import pool_spec, resolve_dtype
from ..kv.node import KVManagerProcess
from ..kv.pool import SHM_DIR
from ..kv.services import free_port  # noqa: F401 - also imported from here by cluster/ and the tests
from ..loader import weight_store
from ..loader.quantized import checkpoint_quantization
from ..models.config import ModelConfig
from ..models.decoder import load_weights, process_linears
from ..models.lora import checked_adapters
from ..models.vision import load_vision_weights
from ..multimodal.embedding_store import EmbeddingStore, store_dir
from ..multimodal.encoder import VISUAL
from ..runtime import owned_name, process_env, remove_leftovers, stop_process
from ..stages.cores import CoreShare
from ..stages.front import requests_in_fronts
from .config import DRAINING, NodeConfig, Profile, ServingConfig
from .repository import render
from .supervisor import Supervisor
from .tritonserver import TritonServer


def _share_cores(value: int | str) -> int:
    """"auto": the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if value == "auto" else int(value)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True




@dataclass
class Node:
    model_dir: str
    profile: str = "single_node"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    run_dir: Path | None = None
    overrides: dict = field(default_factory=dict)
    node_id: str = field(default_factory=lambda: owned_name(uuid.uuid4().hex[:8]))   # <pid>-<hex>
    server: TritonServer | None = None
    manager: KVManagerProcess | None = None
    supervisor: Supervisor | None = None
    admin_key: str = ""                  # the header value Triton's admin APIs want ("" when open)
    serving: ServingConfig | None = None
    gateway_port: int | None = None      # the OpenAI-compatible gateway's port (0: a free one; None: none)
    gateway: subprocess.Popen | None = None
    front: subprocess.Popen | None = None    # Baton's HTTP front on http_port (gateway/v2.py)
    triton_http_port: int = 0                # tritonserver's own HTTP port behind the front
    # PD across servers (profiles pd_*): the name service, this node's address as other nodes reach
    # it, the file holding the cluster's key (hex; signs KV handles and acks between nodes)
    name_service: str = ""
    host: str = "127.0.0.1"
    cluster_key_file: str = ""
    cluster: str = "baton"
    transfer_protocol: str = "tcp"
    registration: Registration | None = None
    # the registration thread's own KV manager client (a REQ socket belongs to one thread)
    _reg_manager: object = field(default=None, init=False, repr=False)
    # where Triton and the gateway listen: "" = 127.0.0.1, or every interface for a PD node whose
    # --host is not a loopback address (other nodes call it)
    listen: str = ""
    services: list = field(default_factory=list)      # what `kv_tiers` "auto" started (kv/services.py)
    embedding_dir: Path | None = None                 # a vision model's node: its embedding store
    weights_name: str = ""                            # the node's shared weight file

    def start(self, timeout: float = 300, quiet: bool = False) -> Node:
        prof = Profile.load(self.profile)
        tmp = Path(os.environ.get("BATON_RUN_DIR", "/tmp"))
        for p in remove_leftovers(SHM_DIR, tmp):         # of runs killed before they could clean up
            print(f"[baton] removed {p} (its process is gone)", file=sys.stderr, flush=True)
        for port, what in ((self.http_port, "HTTP"), (self.grpc_port, "gRPC"), (self.metrics_port, "metrics"),
                           (self.gateway_port, "gateway")):
            if port and not port_free(port):
                raise RuntimeError(f"{what} port {port} is in use (another server, maybe an earlier baton serve?); "
                                   "pick another, or 0 for a free one")
        model_dir = str(Path(self.model_dir).resolve())
        engine, serving = prof.configs(model_dir, self.overrides)
        if engine.lora_modules:
            engine = engine.replace(lora_modules=checked_adapters(engine.lora_modules, model_dir))
        role = serving.pd_role
        remote_encode = serving.remote_encode or bool(serving.encode_address)
        if remote_encode and not serving.encode_address and not self.name_service:
            raise RuntimeError(f"profile {self.profile!r} encodes images on an encode server: give its address "
                               "(--encode-address HOST:PORT), or --name-service URL where encode servers "
                               "(profile epd_encode) register")
        epd = role == "encode" or remote_encode      # EPD across servers: the cluster's key
        encode_service = self.name_service if remote_encode and not serving.encode_address else ""
        # PD roles need etcd; an encode server (and the node finding encode servers) only when given one
        etcd = bool(self.name_service) if role == "encode" else bool(role or encode_service)
        handle_key = self._cluster_key(etcd=etcd) if role or epd \
            else secrets.token_hex(32)   # checked before anything starts
        cfg = ModelConfig.from_dir(model_dir)
        quant = checkpoint_quantization(engine.quantization, model_dir)     # before anything starts
        dtype = resolve_dtype(engine.dtype, cfg.torch_dtype)
        self.run_dir = Path(self.run_dir or tmp / f"baton-{self.node_id}")
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # resolved once here, so every stage sees the same numbers
        engine = engine.replace(dtype=str(dtype).split(".")[-1],
                                max_model_len=engine.resolved_max_model_len(cfg.max_position_embeddings))
        serving = replace(serving, share_cores=_share_cores(serving.share_cores))
        if engine.speculative.get("model"):        # the stages read it as an absolute path
            from ..spec.config import SpeculativeConfig

            engine = engine.replace(speculative=engine.speculative | {
                "model": SpeculativeConfig.from_table(engine.speculative).model})
        pool_name = address = ""
        if role == "encode":             # an encode server: the vision tower only
            self.weights_name = self.node_id
            weight_store.publish(self.weights_name, {VISUAL + k: v for k, v in load_vision_weights(model_dir, dtype).items()})
        elif role != "router":           # a router node has no pool and no weights
            spec = pool_spec(cfg, dtype, engine.block_size, engine.num_blocks, engine.kv_cache_memory_mb << 20,
                             engine.kv_cache_dtype)
            pool_name = self.node_id
            address = f"ipc://{self.run_dir}/kv.sock"
            serve_blocks = (self.host, self.transfer_protocol, self.cluster_key_file, self.node_id) if role == "prefill" else None
            if engine.kv_tiers:
                engine = engine.replace(kv_tiers=self._tier_services(engine.kv_tiers))
            self.manager = KVManagerProcess(pool_name, spec, address, self.run_dir / "kv-manager.log",
                                            engine.enable_prefix_caching, serve_blocks,
                                            (engine.kv_tiers, model_dir) if engine.kv_tiers else None)
            self.manager.start()
            if engine.device == "cpu" and not quiet and os.environ.get("BATON_CPU_EXT", "1") != "0" and not cpu_ext.built():
                print("[baton] compiling the fused CPU kernels for this CPU (first start only, ~30 s)",
                      file=sys.stderr, flush=True)
            cpu_ext.available()          # built here, once, not timed as the weights' load
            # weights: loaded, fused and processed by the linear method once here, mapped by every stage
            t = time.monotonic()
            self.weights_name = pool_name
            method = select_linear_method(dtype, engine.device, engine.pack_weights, engine.quantization, quant)
            weights = process_linears(cfg, load_weights(cfg, model_dir, dtype, quant), method)
            if cfg.vision_config is not None:         # a vision model's tower: in the same file, for encode (or prefill)
                weights |= {VISUAL + k: v for k, v in load_vision_weights(model_dir, dtype).items()}
                self.embedding_dir = store_dir(self.node_id)
                EmbeddingStore(self.embedding_dir)
            size = weight_store.publish(pool_name, weights)
            del weights
            if not quiet:
                print(f"[baton] weights: {size / 2**20:.0f} MiB in shared memory ({method.name}, "
                      f"{time.monotonic() - t:.1f}s)", file=sys.stderr, flush=True)
        self.serving = serving
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        node = NodeConfig(engine, serving, pool_name, address, self.weights_name or pool_name, str(self.run_dir), handle_key,
                          grpc_address=self.grpc_url, node_id=self.node_id,
                          transfer_host=self.host if role == "decode" else "", transfer_protocol=self.transfer_protocol,
                          block_source=self.manager.source if role == "prefill" else "",
                          name_service=self.name_service if role == "router" else "", cluster=self.cluster,
                          stage_calls_keyed=use_keyed_stages(prof.models, role),
                          draft_address=draft_address(prof.models, serving, self.run_dir, self.grpc_url),
                          embedding_store=str(self.embedding_dir or ""),
                          encode_stage="encode" in prof.models or remote_encode, encode_service=encode_service,
                          # a PD node of a vision model reads embeddings from encode servers (prefill, and
                          # decode recomputing a prompt)
                          epd_host=self.host if epd or (role in ("prefill", "decode") and cfg.vision_config) else "")
        node.save(self.run_dir / "node.json")
        if serving.share_cores:
            CoreShare.create(self.run_dir / "cores")
        repo = render(prof, self.run_dir / "models", self.run_dir / "node.json")
        self.server = TritonServer(repo, self.run_dir, self.http_port, self.grpc_port, self.metrics_port,
                                   f"baton-{self.node_id}-", self.run_dir / "tritonserver.log",
                                   address=self.listen_address)
        use_front = serving.http_front and any(m in prof.models for m in ("llm_front", "llm"))
        if use_front:                          # tritonserver's HTTP moves behind the front, on loopback
            self.triton_http_port = free_port()
            self.server.http_port, self.server.http_address = self.triton_http_port, "127.0.0.1"
        admin_key = "" if serving.open_admin_apis else secrets.token_hex(16)
        if admin_key:
            key_file = self.run_dir / "admin.key"
            key_file.touch(mode=0o600)
            key_file.write_text(admin_key)
        self.admin_key = admin_key
        self.server.start(extra_env=process_env(), admin_key=admin_key)   # stage processes inherit the env
        (self.run_dir / "tritonserver.pid").write_text(str(self.server.proc.pid))
        t0 = time.monotonic()
        spinner = "|/-\\"
        tick = [0]

        def progress() -> None:
            if not quiet and sys.stderr.isatty():
                tick[0] += 1
                print(f"\r[baton] loading models {spinner[tick[0] % 4]} {time.monotonic() - t0:4.0f}s",
                      end="", file=sys.stderr, flush=True)

        try:
            self.server.wait_ready(timeout, progress)
        except Exception:
            self.stop()
            raise
        try:
            if use_front:
                self.front = self._spawn("HTTP front", "http-front.log", f"http://{self.http_url}/v2/health/live", [
                    "baton.backends.gateway.v2", "--triton-grpc", self.grpc_url,
                    "--triton-http", f"127.0.0.1:{self.triton_http_port}", "--port", str(self.http_port),
                    "--host", self.listen_address])
            if self.gateway_port is not None:
                self.gateway_port = self.gateway_port or free_port()
                self.gateway = self._spawn("OpenAI gateway", "gateway.log", f"http://{self.gateway_url}/health", [
                    "baton.backends.gateway", "--triton", self.grpc_url, "--port", str(self.gateway_port),
                    "--model", model_dir, "--host", self.listen_address,
                    *[x for name in engine.lora_modules for x in ("--lora", name)]])
        except Exception:
            self.stop()
            raise
        if role and (role != "encode" or self.name_service):
            try:
                self.registration = Registration(self.name_service, self.cluster, self._node_info)
            except Exception as e:
                self.stop()
                raise RuntimeError(f"could not register with the name service {self.name_service}: {e}") from None
        self.supervisor = Supervisor(self.server.proc, self.manager.proc if self.manager else None, gateway=self.gateway,
                                     front=self.front)
        self.supervisor.snapshot()
        if not quiet:
            gateway = f"  OpenAI http://127.0.0.1:{self.gateway_port}/v1" if self.gateway else ""
            print(f"\r[baton] ready in {time.monotonic() - t0:.1f}s: gRPC 127.0.0.1:{self.grpc_port}  "
                  f"HTTP http://127.0.0.1:{self.http_port}  metrics http://127.0.0.1:{self.metrics_port}/metrics"
                  + gateway, file=sys.stderr, flush=True)
        return self

    def _tier_services(self, table: dict) -> dict:
        """Start the stores `kv_tiers` asks for with "auto" (they stop with the node)."""
        from ..kv.services import MooncakeMaster, RedisServer

        table = dict(table)
        if table.get("store") and "store_host" not in table:
            table["store_host"] = self.host            # where the store's transfers reach this node
        if table.get("store") == "auto":
            self.services.append(MooncakeMaster().start())
            table["store"] = self.services[-1].address
        if table.get("redis") == "auto":
            self.services.append(RedisServer().start(table.get("redis_mb", 1024)))
            table["redis"] = self.services[-1].address
        return table

    def _cluster_key(self, etcd: bool = True) -> str:
        """The cluster's key from --cluster-key-file (and, for PD roles, etcd checked to answer)."""
        if etcd and not self.name_service:
            raise RuntimeError(f"profile {self.profile!r} is a PD role: it needs --name-service URL (etcd)")
        try:
            key = Path(self.cluster_key_file).read_text().strip()
            bytes.fromhex(key)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"--cluster-key-file {self.cluster_key_file!r}: a PD node needs the cluster's key, "
                               f"hex, the same file on every node ({e})") from None
        if len(key) < 32:
            raise RuntimeError(f"--cluster-key-file {self.cluster_key_file!r}: the key is too short (at least 16 bytes)")
        if not etcd:
            return key
        from ..cluster.registry import client

        try:
            client(self.name_service).status()
        except Exception as e:
            raise RuntimeError(f"--name-service {self.name_service}: etcd does not answer there ({e})") from None
        return key

    def _node_info(self) -> NodeInfo:
        """What this node tells the name service each heartbeat (called on the registration's thread)."""
        from ..kv.manager import RemoteBlockManager

        role = self.serving.pd_role
        info = NodeInfo(self.node_id, role, f"{self.host}:{self.grpc_port}")
        if self.manager is not None:
            if self._reg_manager is None:
                self._reg_manager = RemoteBlockManager(self.manager.address, 1, 1)
            st = self._reg_manager.stats()
            spec = self.manager.spec
            info.block_size, info.num_blocks, info.block_bytes, info.kv_dtype = (spec.block_size, st["num_blocks"],
                                                                                  spec.block_bytes, spec.dtype)
            info.free_blocks = st["num_blocks"] - st["num_used"]
            info.hashes = [short_hash(h) for h in self._reg_manager.cached_hashes(HASH_SUMMARY)]
            if self.manager.tiers:
                from ..kv.manager import RemoteTiers

                summary = RemoteTiers(self._reg_manager).summary(HASH_SUMMARY)   # once a heartbeat
                info.tier_hashes = {t: [short_hash(h) for h in hs] for t, hs in summary.items()}
        info.running, info.waiting = scrape_load(self.metrics_port, role)
        if role == "prefill":             # what its prefill instances are computing now
            for f in self.run_dir.glob("prefill-*.load"):
                requests, tokens = np.fromfile(f, dtype=np.int64, count=2)
                info.running += int(requests)
                info.queued_tokens += int(tokens)
        return info

    def _spawn(self, what: str, log_name: str, health_url: str, module_args: list[str],
               timeout: float = 60) -> subprocess.Popen:
        """A Python process of the node (the HTTP front, the OpenAI gateway), once `health_url` answers."""
        import urllib.request

        from ..runtime import die_with_parent

        log = open(self.run_dir / log_name, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, "-P", "-m", *module_args], stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent, env=os.environ | process_env())
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(health_url, timeout=1).close()
                return proc
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    stop_process(proc)
                    tail = (self.run_dir / log_name).read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the {what} did not start:\n{tail}") from None
                time.sleep(0.1)

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting requests (the llm front refuses new ones with "shutting down") and wait until
        none is in flight: no KV block held or handed off, and no response still on its way out of a
        front. At most `timeout` (the profile's drain_timeout_s); True when everything finished."""
        from ..kv.manager import KVManagerUnavailable, RemoteBlockManager

        timeout = self.serving.drain_timeout_s if timeout is None else timeout
        (self.run_dir / DRAINING).touch()
        manager = RemoteBlockManager(self.manager.address, 1, 1) if self.manager else None
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = manager.stats() if manager else {"num_used": 0, "handoffs": 0}
            except KVManagerUnavailable:     # the manager is gone: nothing left to wait for
                return False
            fronts = requests_in_fronts(self.run_dir)
            if st["num_used"] == 0 and st["handoffs"] == 0 and not fronts:
                if fronts is None:       # an ensemble: its last responses may still be on their way
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def failure(self) -> str | None:
        """Which of the node's processes died since it became ready (None: all alive)."""
        return self.supervisor.failure() if self.supervisor is not None else None

    @property
    def listen_address(self) -> str:
        if self.listen:
            return self.listen
        serving = Profile.load(self.profile).serving
        cluster = serving.get("pd_role", "") or self.overrides.get("encode_address") or serving.get("encode_address") \
            or serving.get("remote_encode")
        return "0.0.0.0" if cluster and not self.host.startswith("127.") else "127.0.0.1"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def gateway_url(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def stop(self) -> None:
        """Each step runs even if an earlier one fails. The run directory goes too, unless the node
        failed (a dead process, a failed start): its logs are what tells why."""
        keep = self.supervisor is None or self.failure() is not None
        if self.registration is not None:          # out of routing first
            self.registration.stop()
            self.registration = None
        stop_process(self.gateway, 10)
        stop_process(self.front, 10)
        try:
            if self.server is not None:
                self.server.stop()
        finally:
            try:
                if self.manager is not None:
                    self.manager.stop()
                for s in self.services:
                    s.stop()
            finally:
                if getattr(self, "weights_name", None):
                    weight_store.unlink(self.weights_name)
                if self.embedding_dir is not None:
                    shutil.rmtree(self.embedding_dir, ignore_errors=True)
                if not keep and self.run_dir is not None:
                    shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def draft_address(models: list[str], serving: ServingConfig, run_dir: Path, grpc_url: str) -> str:
    """Where decode calls the node's `draft` stage ("": none, the draft model runs inside decode)."""
    if "draft" not in models:
        return ""
    return f"ipc://{run_dir}/draft.sock" if serving.draft_channel == "ipc" else grpc_url


def use_keyed_stages(models: list[str], role: str) -> bool:
    """Whether the node's internal stages take only keyed calls: yes when a Python front calls them (the
    llm front; PD routers call prefill and decode nodes; EPD fronts call encode servers), no under an
    ensemble, which cannot add the key."""
    return "llm_front" in models or role in ("prefill", "decode", "encode")


def scrape_load(metrics_port: int, role: str) -> tuple[int, int]:
    """(running, waiting) requests of this node's PD stage, from its own metrics endpoint: decode's
    batch gauge, and the requests Triton holds queued for the stage."""
    import urllib.request

    if role not in ("prefill", "decode", "encode"):
        return 0, 0
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).read().decode()
    except OSError:
        return 0, 0
    running = waiting = 0.0
    for line in text.splitlines():
        if line.startswith("baton:decode_running_requests"):
            running += float(line.rsplit(" ", 1)[1])
        elif line.startswith("nv_inference_pending_request_count") and f'model="{role}"' in line:
            waiting += float(line.rsplit(" ", 1)[1])
    return int(running), int(waiting)
