"""A node's configuration: the deployment profile (ensemble_configs/*.toml), the serving knobs beside
the engine's, and NodeConfig, the one file every stage process of a node reads.

A profile file holds `description`, `models` (the Triton models to load), optionally `extends` (a
base profile whose tables it merges into), and three tables: [instances] (model -> instance count),
[engine] (EngineConfig fields) and [serving] (ServingConfig fields). An unknown key or a wrong type is
an error naming the key and the file."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tomllib

from .. import paths
from ..engine.config import ConfigError, EngineConfig, check_types, from_table

if TYPE_CHECKING:
    from ..multimodal.embedding_store import EmbeddingStore

POLICIES = ("fair", "prefill_first")
DRAINING = "draining"                  # a file in the run dir: the node admits no new requests


@dataclass(frozen=True)
class ServingConfig:
    max_tokens_limit: int = 0            # the largest max_tokens a request may ask for; 0: max_model_len
    # prefill and decode are separate processes on the same cores: each takes all `share_cores` while
    # the other idles and they split them while both work ("auto": the CPUs this process may use;
    # 0: a fixed EngineConfig.threads each). stages/cores.py says why.
    share_cores: int | Literal["auto"] = "auto"
    # "prefill_first": a working prefill gets every core and decode steps wait, one prefill chunk at a
    # time; "fair": half each while both work.
    share_cores_policy: Literal["fair", "prefill_first"] = "prefill_first"
    # "prefill_first": a decode step waiting for a running prefill gets in between two of its layers
    # once the prefill has run this long since the last one did (bounds the streams' stall inside a
    # long chunk); 0: decode steps get in only between chunks
    decode_wait_ms: float = 25.0
    prefill_chunk_tokens: int = 256      # the prefill engine's tokens per step; 0: the engine's budget
    # with more live requests than this, decode sends each request's tokens every ceil(live / N) steps
    # (held 0.1 s at most); 0 sends every token as its own response
    stream_responses_per_step: int = 4
    # Triton's administrative APIs (shared memory, model repository, configs, statistics, trace,
    # logging) answer only requests carrying the header `baton-admin-key: <run_dir>/admin.key`;
    # true leaves them open to every client
    open_admin_apis: bool = False
    # requests in flight at once through the llm front (queued included); past it a request is
    # refused at once with UNAVAILABLE "server busy" instead of waiting without bound
    max_pending_requests: int = 256
    # on SIGTERM / Ctrl-C, `baton serve` stops admitting requests and lets those in flight finish for
    # at most this long before it stops the node (a second signal stops it at once)
    drain_timeout_s: float = 30.0
    # a request still generating this long after it reached the llm front is cut: decode drops it and
    # the client gets UNAVAILABLE naming this setting; bounds what a client that vanished without the
    # server noticing (a non-streaming HTTP request) can hold. 0: no limit
    request_timeout_s: float = 600.0
    # Baton's HTTP front (gateway/v2.py) on the HTTP port, tritonserver's own HTTP behind it on 127.0.0.1:
    # the request contract (400 naming the field, 503, 500), JSON errors, HTTP disconnects cancel.
    # false: tritonserver's HTTP server answers the port itself
    http_front: bool = True
    # PD across servers (profiles pd_prefill, pd_decode, pd_router): this node's role; "": one node
    # "encode": an EPD encode server (profile epd_encode: only the `encode` model, its embeddings
    # served over the transfer engine)
    pd_role: Literal["", "prefill", "decode", "router", "encode"] = ""
    # pd_router: what a prompt block in a prefill node's lower KV tier is worth against one in its pool
    # (1.0) when the router predicts the node's work; keys host, store, disk (cluster/router.py TIER_WEIGHTS)
    tier_weights: dict = field(default_factory=dict)
    # a vision model's image embeddings, shared by the node's stages and keyed by image content
    # (multimodal/embedding_store.py): the `encode` stage keeps at most this much, oldest use out first
    embedding_cache_mb: float = 256
    # CPUs the `encode` stage runs on (its threads: one per CPU), e.g. "1" or "2-3"; "": the node's,
    # shared like the other stages
    encode_cpus: str = ""
    # CPUs the request path's host work runs on: the llm front (relaying every streamed response) and
    # preprocess (tokenizing, decoding images); "": the node's. EPD on one box puts them with the
    # encoder (measured: benchmarks/README.md "EPD")
    front_cpus: str = ""
    # CPUs the `prefill` stage and the decode loop run on (their threads: one per CPU); "": the
    # node's. The same CPUs for both: they share them (share_cores); apart (share_cores = 0): a
    # prompt's prefill never sits between a stream's tokens (benchmarks/README.md "EPD")
    prefill_cpus: str = ""
    decode_cpus: str = ""
    # the prefill stage's OS priority (nice, 0-19; needs share_cores = 0). Above 0 it runs on the cores
    # decode and the request path leave idle (the scheduler favours them over it): with prefill not
    # pinned, a prompt's prefill neither holds decode's core for long nor waits for a core of its own
    prefill_nice: int = 0
    # the `draft` stage's torch threads. Decode waits while the draft model runs, but decode's
    # OpenMP threads spin for a while after each step and the stage's would fight them for the
    # cores: one thread ran the spec_draft profile at 1.17x against 1.02x with two (2 cores, a
    # draft trained on the target's continuations; benchmarks/README.md). 0: the engine's `threads`
    draft_threads: int = 1
    # how decode reaches its node's `draft` stage each step: "ipc", a socket in the node's run
    # directory (stages/draft_channel.py); "grpc", through tritonserver's gRPC endpoint (~0.5 ms
    # more per call on 2 cores)
    draft_channel: Literal["ipc", "grpc"] = "ipc"
    # EPD across servers (profile epd_llm): images are encoded on an encode server (profile
    # epd_encode) and their embeddings read over the transfer engine. The server: `encode_address`
    # (gRPC host:port), or else any the name service (--name-service) has registered
    remote_encode: bool = False
    encode_address: str = ""

    def __post_init__(self) -> None:
        check_types(self, "ServingConfig")
        for k, v in self.tier_weights.items():
            if k not in ("host", "store", "disk") or not isinstance(v, (int, float)) or isinstance(v, bool) \
                    or not 0 <= v <= 1:
                raise ConfigError(f"tier_weights.{k}: expected host, store or disk with a weight in [0, 1], got {v!r}")
        if self.max_pending_requests < 1:
            raise ConfigError(f"max_pending_requests: must be >= 1, got {self.max_pending_requests}")
        cpus_list(self.encode_cpus, "encode_cpus")
        cpus_list(self.front_cpus, "front_cpus")
        pcpus, dcpus = cpus_list(self.prefill_cpus, "prefill_cpus"), cpus_list(self.decode_cpus, "decode_cpus")
        if set(pcpus) != set(dcpus) and self.share_cores:
            key = "prefill_cpus" if pcpus else "decode_cpus"
            raise ConfigError(f"{key}: prefill and decode on CPUs apart share none; set share_cores = 0 (or "
                              "name the same CPUs in prefill_cpus and decode_cpus)")
        if not 0 <= self.prefill_nice <= 19:
            raise ConfigError(f"prefill_nice: expected 0 to 19, got {self.prefill_nice}")
        if self.prefill_nice and self.share_cores:     # decode waits for a prefill that holds shared cores
            raise ConfigError("prefill_nice: needs share_cores = 0 (on shared cores decode steps wait for a "
                              "working prefill, which a lower priority would only hold longer)")
        for name in ("max_tokens_limit", "prefill_chunk_tokens", "stream_responses_per_step", "request_timeout_s",
                     "embedding_cache_mb", "decode_wait_ms", "draft_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


def cpus_list(spec: str, key: str = "cpus") -> list[int]:
    """"1", "0,2", "2-3" -> CPU numbers (ServingConfig.encode_cpus, front_cpus)."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ConfigError(f"{key}: expected CPU numbers like \"1\" or \"2-3\", got {spec!r}") from None
    return out


def pin_to(spec: str) -> int:
    """Run this process (every thread it has, and by inheritance those it starts later) on the CPUs
    `spec` names; their count, or 0 when `spec` is empty (nothing changes)."""
    import os

    cpus = cpus_list(spec)
    for tid in os.listdir("/proc/self/task") if cpus else ():
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:                          # the thread ended meanwhile
            pass
    return len(cpus)


STAGE_KEY_PARAM = "baton_stage_key"       # the request parameter an internal stage call carries


@dataclass(frozen=True)
class NodeConfig:
    """What every stage process of a node reads, from <run_dir>/node.json (the launcher writes it;
    each model's config.pbtxt names the file)."""

    engine: EngineConfig                 # model as an absolute path, dtype resolved
    serving: ServingConfig               # share_cores resolved to a count
    kv_pool: str                         # the node's pool in /dev/shm
    kv_address: str                      # the KV manager's socket
    weights: str = ""                    # the node's shared weight file ("": each stage loads the checkpoint)
    run_dir: str = "/tmp"
    handle_key: str = ""                 # hex secret: prefill signs KV handles with it, decode checks them
    grpc_address: str = ""               # the node's own gRPC endpoint (the llm front calls its stages there)
    node_id: str = ""
    # PD (profiles pd_*): handle_key is then the cluster's key, shared by every node
    transfer_host: str = ""              # this node's address for KV transfers ("": not in a PD cluster)
    transfer_protocol: str = "tcp"       # Mooncake transport: tcp, or rdma on clusters
    block_source: str = ""               # a prefill node's kv.transfer.BlockSource JSON, carried in its handles
    name_service: str = ""               # etcd URL (the pd_router front reads the membership there)
    cluster: str = "baton"               # the cluster's name: its nodes' keys in the name service
    # the internal stages (preprocess, prefill, decode) answer only calls carrying stage_key(): the
    # llm front's and PD routers'. False under an ensemble, which cannot add the key
    stage_calls_keyed: bool = False
    # where decode calls the `draft` model (speculative method "draft" on its own stage): the
    # stage's socket (ipc://...) or a gRPC endpoint serving it (host:port); "": the draft model
    # runs inside decode
    draft_address: str = ""
    # a vision model's node: the embedding store's directory; encode_stage: images are encoded by the
    # `encode` model (EPD) rather than inside prefill
    embedding_store: str = ""
    encode_stage: bool = False
    encode_service: str = ""             # etcd URL where this node's front finds encode servers (remote_encode)
    # EPD across servers: this node's address for the transfer engine that serves (encode server) or
    # reads (prefill beside a remote encode server) image embeddings
    epd_host: str = ""

    def embedding_store_client(self) -> EmbeddingStore | None:
        if not self.embedding_store:
            return None
        from ..multimodal.embedding_store import EmbeddingStore

        return EmbeddingStore(self.embedding_store, int(self.serving.embedding_cache_mb * 2**20))

    @property
    def stage_key(self) -> str:
        """What the llm front (and a PD router) puts in each stage call's parameters: derived from the
        node's (PD: the cluster's) secret, so the secret itself never travels."""
        return hmac.new(bytes.fromhex(self.handle_key), b"baton stage call", hashlib.sha256).hexdigest()[:32]

    def stage_call_refused(self, parameters_json: str, stage: str) -> str:
        """"" when a call to an internal stage may go on, else why not (a client calling it directly)."""
        if not self.stage_calls_keyed:
            return ""
        try:
            given = json.loads(parameters_json or "{}").get(STAGE_KEY_PARAM, "")
        except (json.JSONDecodeError, AttributeError):
            given = ""
        if isinstance(given, str) and hmac.compare_digest(given, self.stage_key):
            return ""
        return f"{stage} is internal to the node: send requests to the llm model"

    @property
    def max_tokens_limit(self) -> int:
        return self.serving.max_tokens_limit or self.engine.max_model_len

    def save(self, path: Path) -> None:
        path.touch(mode=0o600)               # it holds the node's handle key
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @staticmethod
    def path_in(model_config: str) -> str:
        """The node.json a rendered config.pbtxt names (its `node_config` parameter); Triton passes
        a model its config as JSON."""
        return json.loads(model_config)["parameters"]["node_config"]["string_value"]

    @classmethod
    def load(cls, path: str | Path) -> NodeConfig:
        d = json.loads(Path(path).read_text())
        where = str(path)
        return cls(engine=from_table(EngineConfig, d.pop("engine"), where),
                   serving=from_table(ServingConfig, d.pop("serving"), where), **d)


ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineConfig)}
SERVING_KEYS = {f.name for f in dataclasses.fields(ServingConfig)}


@dataclass
class Profile:
    name: str
    path: Path
    models: list[str]
    description: str = ""
    instances: dict[str, int] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, name_or_path: str) -> Profile:
        path = Path(name_or_path)
        if not path.is_file():
            path = paths.profiles() / f"{name_or_path}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in paths.profiles().glob("*.toml"))
            raise ConfigError(f"no deployment profile {name_or_path!r}; known: {known}")
        try:
            d = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        unknown = sorted(set(d) - {"description", "models", "extends", "instances", "engine", "serving"})
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in {path}; known: description, models, extends, "
                              "instances, engine, serving")
        for key, kind in (("instances", dict), ("engine", dict), ("serving", dict), ("models", list),
                          ("description", str), ("extends", str)):
            if key in d and not isinstance(d[key], kind):
                raise ConfigError(f"{key}: expected a {'table' if kind is dict else kind.__name__} in {path}")
        base = cls.load(d["extends"]) if "extends" in d else None
        if base is None and "models" not in d:
            raise ConfigError(f"models: required in {path} (the Triton models this profile loads)")
        models = d.get("models", base.models if base else [])
        prof = cls(path.stem, path, models, d.get("description", base.description if base else ""),
                   {m: n for m, n in (base.instances if base else {}).items() if m in models} | d.get("instances", {}),
                   (base.engine if base else {}) | d.get("engine", {}),
                   (base.serving if base else {}) | d.get("serving", {}))
        prof.validate()
        return prof

    def validate(self) -> None:
        where = str(self.path)
        for m, n in self.instances.items():
            if m not in self.models:
                raise ConfigError(f"instances.{m}: not a model of this profile {self.models} in {where}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(f"instances.{m}: expected an integer >= 1, got {n!r} in {where}")
        from_table(EngineConfig, self.engine, where)          # types and names, checked now
        from_table(ServingConfig, self.serving, where)

    def configs(self, model: str, overrides: dict[str, Any] | None = None) -> tuple[EngineConfig, ServingConfig]:
        """The profile's configs for `model`, with flat `overrides` (each key an EngineConfig or a
        ServingConfig field) on top."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - ENGINE_KEYS - SERVING_KEYS)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in overrides; known: {sorted(ENGINE_KEYS | SERVING_KEYS)}")
        eng = self.engine | {k: v for k, v in overrides.items() if k in ENGINE_KEYS} | {"model": model}
        srv = self.serving | {k: v for k, v in overrides.items() if k in SERVING_KEYS}
        return from_table(EngineConfig, eng, str(self.path)), from_table(ServingConfig, srv, str(self.path))
