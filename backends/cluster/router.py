"""Routing in a PD cluster: which prefill node and which decode node serve a request.

The scoring is two small pure functions (unit-tested in tests/test_router.py):

  prefill_cost  the predicted time to first token on a prefill node, in prompt tokens of work ahead
                of the request's first token: the prompt tokens that node does NOT cache (its summary
                of cached block hashes, matched from the first block on; a block in one of its lower
                KV tiers, or in the cluster's store, counts by that tier's weight), plus the larger of the
                tokens this router has sent it and not yet seen answered and the tokens the node
                reports prefilling, plus QUEUED_REQUEST_TOKENS for each request the node reports
                waiting in Triton's queue. The lowest cost wins.
  decode_room   free KV blocks a decode node has left for the request: its reported free blocks,
                minus the blocks this router has routed to it for requests still streaming, minus
                what the request needs (prompt + max_tokens). The most room wins; a node without
                room is taken only when no node has room (it queues or preempts there).

Ties go to the node with fewer running requests; prefill ties then rotate over the nodes (in node
id order, one step per request), decode ties go to the smaller node id. A node whose lease expired is not in the membership; one that refused a connection
is also skipped for one lease TTL (`Router.down`), whatever the membership still says."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from functools import partial

import numpy as np

from ..engine.sampling_params import SamplingParams
from ..kv.hashing import hash_blocks, lora_keys
from ..kv.transfer import BlockSource
from ..multimodal.prompt import ImageSpan, image_keys
from ..stages.front import FrontError
from ..stages.loopback import Arrays
from ..stages.messages import PrefillRequest
from .nodes import NODE_TRIES, NodeCalls
from .registry import NodeInfo, short_hash

QUEUED_REQUEST_TOKENS = 256       # what one request waiting at a prefill node is assumed to cost


# How much a prompt block found in a node's lower KV tier is worth against one in its pool (1.0):
# loading it costs a copy (host memory), a network read (the cluster's store) or a file read. The
# pd_router profile's [serving] tier_weights overrides these.
TIER_WEIGHTS = {"host": 0.8, "store": 0.5, "disk": 0.3}


def cached_prefix_blocks(node: NodeInfo, prompt_hashes: list[str], store: frozenset[str] = frozenset(),
                         weights: dict[str, float] | None = None) -> float:
    """The prompt's leading blocks the node has, from the first block on, each credited by where it
    is: its pool 1, its host memory, the cluster's store (`store`: what any node wrote there, which
    every node reads) and its disk by `weights`. Walked in the order a node looks them up."""
    w = TIER_WEIGHTS | (weights or {})
    pool, host, disk = set(node.hashes), set(node.tier_hashes.get("host", ())), set(node.tier_hashes.get("disk", ()))
    credit = 0.0
    for h in prompt_hashes:
        if h in pool:
            credit += 1.0
        elif h in host:
            credit += w["host"]
        elif h in store:
            credit += w["store"]
        elif h in disk:
            credit += w["disk"]
        else:
            break
    return credit


def prefill_cost(node: NodeInfo, uncached: int, inflight_tokens: int) -> int:
    """Prompt tokens of work ahead of the request's first token at this node: its own uncached
    tokens, then the larger of what this router sent the node and has not seen answered and what
    the node reported computing (one router's own requests are in both; the report also holds other
    routers'), plus QUEUED_REQUEST_TOKENS per request the node reports waiting."""
    return uncached + max(inflight_tokens, node.queued_tokens) + QUEUED_REQUEST_TOKENS * node.waiting


def decode_room(node: NodeInfo, blocks_needed: int, inflight_blocks: int) -> int:
    return node.free_blocks - inflight_blocks - blocks_needed


def uncached_tokens(nodes: list[NodeInfo], prompt: list[int], weights: dict[str, float] | None = None,
                    images: list[ImageSpan] | None = None, lora: str = "") -> dict[str, int]:
    """node id -> the prompt tokens that node would compute (it caches the rest; a block in a lower
    tier counts as cached by its tier's weight). `images`: the prompt's, whose hashes key the blocks
    that hold their placeholders (as the nodes' own hashes do); `lora`: its adapter's, which keys every block."""
    keys = (lambda start, end: image_keys(images, start, end)) if images else None
    hashes = {bs: [short_hash(h) for h in hash_blocks(prompt, bs, lora_keys(lora), keys_for=keys)] if bs > 0 else []
              for bs in {n.block_size for n in nodes}}
    store = frozenset(h for n in nodes for h in n.tier_hashes.get("store", ()))
    return {n.node_id: len(prompt) - round(cached_prefix_blocks(n, hashes[n.block_size], store, weights) * n.block_size)
            for n in nodes}


def rank_prefill(nodes: list[NodeInfo], prompt: list[int], inflight: dict[str, int], turn: int = 0,
                 weights: dict[str, float] | None = None, images: list[ImageSpan] | None = None,
                 lora: str = "") -> list[NodeInfo]:
    """Prefill nodes, best first. Equal costs and loads rotate with `turn` (the router counts its
    requests), so equal nodes share the work even while their load reports lag behind."""
    order = {node_id: i for i, node_id in enumerate(sorted(n.node_id for n in nodes))}
    uncached = uncached_tokens(nodes, prompt, weights, images, lora)
    return sorted(nodes, key=lambda n: (prefill_cost(n, uncached[n.node_id], inflight.get(n.node_id, 0)),
                                        n.running, (order[n.node_id] - turn) % len(order)))


def rank_decode(nodes: list[NodeInfo], tokens: int, inflight: dict[str, int], block_bytes: int = 0) -> list[NodeInfo]:
    """Decode nodes, best first: those with room for `tokens` more tokens' KV, most room first. With
    `block_bytes` (the prefill node's), only nodes whose pool has the same block layout: another
    layout could not use the blocks."""
    def key(n: NodeInfo) -> tuple:
        room = decode_room(n, math.ceil(tokens / max(1, n.block_size)), inflight.get(n.node_id, 0))
        return (room < 0, -room, n.running, n.node_id)
    return sorted([n for n in nodes if not (block_bytes and n.block_bytes and n.block_bytes != block_bytes)], key=key)


class Router(NodeCalls):
    """The pd_router front's view of the cluster and its calls to the chosen nodes."""

    def __init__(self, name_service: str, cluster: str, timeout_s: float,
                 tier_weights: dict[str, float] | None = None, stage_key: str = "") -> None:
        super().__init__(name_service, cluster, timeout_s, stage_key)
        self.tier_weights = tier_weights
        self.prefill_tokens: dict[str, int] = defaultdict(int)    # node -> prompt tokens sent, unanswered
        self.decode_blocks: dict[str, int] = defaultdict(int)     # node -> blocks of requests streaming there
        self.turn = 0                                             # requests routed (rotates ties)

    def prefill(self, request: Arrays, outputs: list[str]) -> Arrays:
        """Prefill on the best prefill node; a node that fails is skipped and the next one tried."""
        req = PrefillRequest.from_arrays(request)
        prompt, images = req.prompt_token_ids, req.images
        live = self._live("prefill")
        with self.lock:
            inflight = dict(self.prefill_tokens)
            self.turn += 1
            turn = self.turn
        ranked = rank_prefill(live, prompt, inflight, turn, self.tier_weights, images, req.lora)
        if not ranked:
            raise FrontError(f"no prefill node is registered with the name service {self.name_service}", "unavailable")
        work = uncached_tokens(ranked, prompt, self.tier_weights, images, req.lora)
        last: FrontError | None = None
        for node in ranked[:NODE_TRIES]:
            with self.lock:
                self.prefill_tokens[node.node_id] += work[node.node_id]
            try:
                return self._call(node, "prefill", request, outputs)
            except FrontError as e:
                if e.code == "invalid":              # the request's fault: the same anywhere
                    raise
                last = e
                self.retries += 1
                self._mark_down(node, str(e))
            finally:
                with self.lock:
                    self.prefill_tokens[node.node_id] -= work[node.node_id]
        raise FrontError(f"prefill failed on {min(len(ranked), NODE_TRIES)} nodes; last: {last}", "unavailable")

    def decode(self, handle: Arrays, outputs: list[str]) -> Iterator[Arrays]:
        """Stream from the decode node with the most room. A node that fails before its first response
        is skipped and the next one tried (the blocks are still held by prefill, or recomputed)."""
        sampling = SamplingParams.from_json(_text(handle["sampling"]))
        tokens = int(handle["token_ids"].size) + sampling.max_tokens
        with self.lock:
            inflight = dict(self.decode_blocks)
        source = _text(handle["source"]) if "source" in handle else ""
        block_bytes = BlockSource.from_json(source).block_bytes if source else 0
        live = self._live("decode")
        ranked = rank_decode(live, tokens, inflight, block_bytes)
        if not ranked:
            why = "registered with" if not live else f"with {block_bytes}-byte KV blocks (the prefill node's) in"
            raise FrontError(f"no decode node {why} the name service {self.name_service}", "unavailable")
        for i, node in enumerate(ranked[:NODE_TRIES]):
            blocks = math.ceil(tokens / max(1, node.block_size))
            with self.lock:
                self.decode_blocks[node.node_id] += blocks
            started = False
            try:
                for resp in self._channel(node.grpc).stream("decode", handle, outputs, alive=partial(self._member, node)):
                    started = True
                    yield resp
                return
            except FrontError as e:
                if started or e.code == "invalid" or i == min(len(ranked), NODE_TRIES) - 1:
                    if e.code == "unavailable":
                        self._mark_down(node, str(e))
                    raise
                self.retries += 1
                self._mark_down(node, str(e))
            finally:
                with self.lock:
                    self.decode_blocks[node.node_id] -= blocks


def _text(a: np.ndarray) -> str:
    v = a.reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else str(v)
