"""A front's calls to the cluster's nodes: the membership the name service keeps, one gRPC channel
per node, and the nodes that failed a call, skipped for one lease TTL whatever the membership still
says (their key outlives them by up to that long). The PD router and the encode-server picker share
it; each ranks the live nodes its own way."""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

from ..stages.loopback import Arrays, Loopback
from .registry import LEASE_TTL_S, Membership, NodeInfo

log = logging.getLogger("router")

NODE_TRIES = 3                    # nodes tried per call
ABSENT_GRACE_S = LEASE_TTL_S      # a node gone from the name service this long: its calls are given up


class NodeCalls:
    def __init__(self, name_service: str, cluster: str, timeout_s: float, stage_key: str = "") -> None:
        """stage_key: what calls to the nodes' internal stages carry (the cluster's NodeConfig.stage_key)."""
        self.members = Membership(name_service, cluster)
        self.name_service, self.timeout_s, self.stage_key = name_service, timeout_s, stage_key
        self.lock = threading.Lock()
        self.down: dict[str, float] = {}                          # node -> skipped until (monotonic)
        self.absent_since: dict[str, float] = {}                  # node -> first seen gone, by a call's watch
        self.channels: dict[str, Loopback] = {}
        self.retries = 0
        self._sent: dict[str, int] = {}

    def _live(self, role: str) -> list[NodeInfo]:
        now = time.monotonic()
        with self.lock:
            return [n for n in self.members.of_role(role) if self.down.get(n.node_id, 0) <= now]

    def _channel(self, address: str) -> Loopback:
        with self.lock:
            if address not in self.channels:
                self.channels[address] = Loopback(address, self.timeout_s, self.stage_key)
            return self.channels[address]

    def _call(self, node: NodeInfo, model: str, request: Arrays, outputs: list[str]) -> Arrays:
        """A unary call to `node`, given up once the node has left the name service (its lease ended: it
        stopped heartbeating, a frozen host or a dead launcher; _member), rather than waiting out the call's
        deadline (request_timeout_s) on a server that will not answer."""
        return self._channel(node.grpc).call(model, request, outputs, alive=partial(self._member, node))

    def _member(self, node: NodeInfo) -> bool:
        """Whether the node still counts as a member: its key is in the name service (as last polled;
        while etcd does not answer, the last membership seen), or has been gone for less than
        ABSENT_GRACE_S (a heartbeat late under load lets the lease lapse, and the node registers
        again at its next one: its calls are not given up for that)."""
        with self.members.lock:
            present = node.node_id in self.members.nodes
        now = time.monotonic()
        with self.lock:
            if present:
                self.absent_since.pop(node.node_id, None)
                return True
            return now - self.absent_since.setdefault(node.node_id, now) < ABSENT_GRACE_S

    def _mark_down(self, node: NodeInfo, why: str) -> None:
        log.warning("node %s (%s) failed a call (%s); not routing to it for %d s", node.node_id, node.grpc, why,
                    LEASE_TTL_S)
        with self.lock:
            self.down[node.node_id] = time.monotonic() + LEASE_TTL_S

    def metrics(self) -> dict[str, float]:
        """Counter deltas since the last call (stages/metrics.py FRONT), and the name service's state."""
        with self.lock:
            now = {"baton:name_service_errors_total": self.members.errors, "baton:route_retries_total": self.retries}
            out = {k: v - self._sent.get(k, 0) for k, v in now.items()}
            self._sent = now
        return out | {"baton:name_service_up": 0.0 if self.members.down_since is not None else 1.0}

    def close(self) -> None:
        self.members.stop()
        for ch in self.channels.values():
            ch.close()
