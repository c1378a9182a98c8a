"""What the stages share: building an engine on the node's shared pool, weights and KV manager."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..engine.errors import InvalidRequestError
from ..engine.llm_engine import LLMEngine
from ..kv.connector import HandoffConnector, KVConnector
from ..kv.manager import RemoteBlockManager
from ..kv.pool import KVPool
from ..loader import weight_store
from ..runtime import configure_process, lower_priority
from ..serving.config import NodeConfig, pin_to
from ..serving.tensors import PREFILL_REQUEST
from .cores import CoreShare
from .messages import PrefillRequest

if TYPE_CHECKING:
    from ..models.vision import VisionTower
    from ..multimodal.image import ImageProcessor
    from ..multimodal.remote import EmbeddingArena


def node_engine(node: NodeConfig, stage: str) -> LLMEngine:
    """An engine on the node's shared pool (blocks allocated through the KV manager), its shared
    weights, and the in-node hand-off connector: prefill produces KV handles, decode adopts them.
    The prefill engine's steps are capped at `prefill_chunk_tokens` (a long prompt runs in chunks,
    between which decode can step). Also sets this stage process's threads."""
    config = node.engine
    if stage == "prefill" and node.serving.prefill_chunk_tokens:
        config = config.replace(max_num_batched_tokens=node.serving.prefill_chunk_tokens)
    cpus = {"prefill": node.serving.prefill_cpus, "decode": node.serving.decode_cpus}.get(stage, "")
    if cpus:                                          # on CPUs of its own: a thread each
        config = config.replace(threads=pin_to(cpus))
    if stage != "decode":                             # only decode speculates
        config = config.replace(speculative={})
    if stage == "decode" or node.encode_stage:        # images are encoded before decode, by `encode` (EPD)
        config = config.replace(vision=False)
    configure_process(config.threads)
    if stage == "prefill" and node.serving.prefill_nice:
        lower_priority(node.serving.prefill_nice)
    pool = KVPool.attach(node.kv_pool)
    bm = RemoteBlockManager(node.kv_address, pool.spec.num_blocks, pool.spec.block_size)
    weights = weight_store.attach(node.weights) if node.weights else None
    connector: KVConnector = HandoffConnector("producer" if stage == "prefill" else "consumer")
    if stage == "decode" and node.transfer_host:      # PD decode: blocks come from prefill nodes
        from ..kv.transfer import TransferAgent
        from ..kv.transfer_connector import TransferConnector

        agent = TransferAgent(node.transfer_host, node.transfer_protocol, pool.tensor.data_ptr(),
                              pool.tensor.numel() * pool.tensor.element_size())
        connector = TransferConnector(agent, bytes.fromhex(node.handle_key), node.node_id, pool.spec.block_bytes, bm)
    if config.kv_tiers:                               # the node's KV manager owns the tiers
        from ..kv.manager import RemoteTiers
        from ..kv.tier_connector import TierConnector

        tiers = RemoteTiers(bm)
        connector = TierConnector(connector, tiers, tiers.names, bm)
    proposer = None
    if stage == "decode" and node.draft_address and config.speculative.get("method") == "draft":
        from ..spec.remote import RemoteDraftProposer

        proposer = RemoteDraftProposer(node.draft_address, node.stage_key)
    eng = LLMEngine(config, pool=pool, block_manager=bm, weights=weights, connector=connector, proposer=proposer,
                    embedding_cache=node.embedding_store_client() if config.vision else None)
    if eng.encoder is not None and node.serving.pd_role == "prefill" and node.epd_host:
        # E inside P across servers: the tower's output goes where the transfer engine serves it, so
        # a decode node that must recompute an image prompt reads the embeddings from here
        eng.encoder.cache = embedding_arena(node, eng.encoder.tower, eng.encoder.processor)
    return eng


def embedding_arena(node: NodeConfig, tower: VisionTower, processor: ImageProcessor) -> EmbeddingArena:
    """The node's embeddings in an arena other servers read over the transfer engine: an encode
    server's, or a PD prefill node's that runs the tower itself."""
    from ..multimodal.remote import EmbeddingArena

    return EmbeddingArena(int(node.serving.embedding_cache_mb * 2**20), tower.max_embedding_bytes(processor.max_pixels),
                          node.epd_host, node.transfer_protocol)


def core_share(node: NodeConfig, stage: str) -> CoreShare | None:
    s = node.serving
    if not s.share_cores:
        return None
    return CoreShare(f"{node.run_dir}/cores", stage, int(s.share_cores), s.share_cores_policy, s.decode_wait_ms / 1e3)


def execute_batch(pb: Any, node: NodeConfig, stage: str, requests: list, run: Callable[[list], list],
                  unavailable: tuple[type[Exception], ...] = ()) -> list:
    """A batched stage's Triton execute() (prefill, encode: both take PrefillRequests): calls without
    the node's stage key refused, the rest run together, each result its response; an error is the
    client's (INVALID_ARG) only when it is an InvalidRequestError, UNAVAILABLE for `unavailable`
    ones (retry), else the server's (INTERNAL). `pb`: triton_python_backend_utils."""
    refused = [node.stage_call_refused(r.parameters(), stage) for r in requests]
    batch = [PrefillRequest.from_arrays({n: pb.get_input_tensor_by_name(r, n).as_numpy() for n, _, _ in PREFILL_REQUEST})
             for r, why in zip(requests, refused) if not why]
    results = iter(run(batch) if batch else [])
    out = []
    for why in refused:
        if why:                                   # a client calling the stage directly
            out.append(pb.InferenceResponse(error=pb.TritonError(why, pb.TritonError.INVALID_ARG)))
            continue
        res = next(results)
        if isinstance(res, Exception):
            code = pb.TritonError.INVALID_ARG if isinstance(res, InvalidRequestError) else \
                pb.TritonError.UNAVAILABLE if isinstance(res, unavailable) else pb.TritonError.INTERNAL
            out.append(pb.InferenceResponse(error=pb.TritonError(str(res), code)))
        else:
            out.append(pb.InferenceResponse([pb.Tensor(n, a) for n, a in res.to_arrays().items()]))
    return out
