"""EPD across servers without a fixed address: the encode servers (profile epd_encode) register with
the name service as role "encode"; an epd_llm node's front picks one per request.

`rank_encoders` (a pure function, tests/test_router.py): the fewest calls in flight first, counting
this front's own calls to the server and the calls the server reports queued in Triton (other
fronts'); equal loads go by rendezvous order on the request's first image hash, so a repeated image
returns to the server whose arena already holds its embeddings (it is not encoded again) while the
servers are equally busy. A server that fails a call is skipped for a lease TTL and the next tried."""

from __future__ import annotations

import hashlib
from collections import defaultdict

from ..stages.front import FrontError
from ..stages.loopback import Arrays
from .nodes import NODE_TRIES, NodeCalls
from .registry import LEASE_TTL_S, NodeInfo


def rendezvous(node_id: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node_id}\0{key}".encode(), digest_size=8).digest(), "little")


def rank_encoders(nodes: list[NodeInfo], inflight: dict[str, int], key: str) -> list[NodeInfo]:
    """Encode servers, best first (the module's docstring says how)."""
    return sorted(nodes, key=lambda n: (inflight.get(n.node_id, 0) + n.waiting, -rendezvous(n.node_id, key)))


class EncodeServers(NodeCalls):
    """The `encode` calls of an epd_llm node's front, on the encode servers the name service names."""

    def __init__(self, name_service: str, cluster: str, timeout_s: float, stage_key: str = "") -> None:
        super().__init__(name_service, cluster, timeout_s, stage_key)
        self.inflight: dict[str, int] = defaultdict(int)          # node -> this front's calls there

    def call(self, model: str, request: Arrays, outputs: list[str]) -> Arrays:
        hashes = request.get("image_hashes")
        first = hashes.reshape(-1)[0] if hashes is not None and hashes.size else b""
        key = first.decode() if isinstance(first, bytes) else str(first)
        live = self._live("encode")
        with self.lock:
            ranked = rank_encoders(live, dict(self.inflight), key)
        if not ranked:
            if self.members.of_role("encode"):
                raise FrontError("every encode server registered with the name service failed a call in the last "
                                 f"{LEASE_TTL_S} s; retry", "unavailable")
            raise FrontError(f"no encode server is registered with the name service {self.name_service} "
                             f"(cluster {self.members.cluster!r}; start one with profile epd_encode and "
                             "--name-service)", "unavailable")
        last: FrontError | None = None
        for node in ranked[:NODE_TRIES]:
            with self.lock:
                self.inflight[node.node_id] += 1
            try:
                return self._call(node, model, request, outputs)
            except FrontError as e:
                if e.code == "invalid":              # the request's fault: the same anywhere
                    raise
                last = e
                with self.lock:
                    self.retries += 1
                if e.code == "unavailable":          # unreachable or stopping; a fault of one call is not that
                    self._mark_down(node, str(e))
            finally:
                with self.lock:
                    self.inflight[node.node_id] -= 1
        raise FrontError(f"encode failed on {min(len(ranked), NODE_TRIES)} encode servers; last: {last}", "unavailable")
