"""prefill: prefix match -> allocate -> run the uncached part of each prompt (chunked, batched across
the requests of one execute) -> sample the first token -> publish the full blocks -> hand the
sequence on as a KVHandle (the KV connector keeps its blocks: decode owns them from here)."""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path

import numpy as np

from ..engine.errors import InvalidRequestError
from ..engine.llm_engine import LLMEngine
from ..engine.sequence import Sequence
from ..kv.transfer import TransferError
from ..multimodal.embedding_store import EmbeddingStore
from ..multimodal.prompt import MultiModalPrompt
from ..multimodal.remote import EmbeddingArena, EmbeddingSource, RemoteEmbeddings
from .cores import CoreShare
from .messages import KVHandle, PrefillRequest, embed_mac, images_of
from .metrics import Deltas

log = logging.getLogger("prefill")


class EmbeddingsGone(RuntimeError):
    """A request's image embeddings were evicted before prefill read them: the server's fault (retry)."""


class PrefillStage:
    def __init__(self, engine: LLMEngine, handle_key: bytes, cores: CoreShare | None = None, source: str = "",
                 load_path: str | None = None, embeddings: EmbeddingStore | None = None,
                 transfer_host: str = "") -> None:
        """handle_key: the node's secret; every KVHandle leaves signed with it, and its blocks are
        recorded with the KV manager as handed off (decode claims them once, or they expire).
        source: a PD prefill node's BlockSource JSON, which its handles carry (decode reads from there).
        embeddings: the node's embedding store, where the `encode` stage put a request's images
        (without one, images come as sent and this engine's own vision tower encodes them);
        transfer_host: this node's address for reading embeddings from an encode server (EPD)."""
        self.engine = engine
        self.embeddings = embeddings
        self.transfer_host = transfer_host
        self.remote: RemoteEmbeddings | None = None       # made on the first remote handle
        self.handle_key = handle_key
        self.source = source
        # [requests, prompt tokens] being prefilled now, in a small shared file the node reports to
        # the PD name service (load_path; None: not kept)
        self.load = None
        if load_path:
            Path(load_path).write_bytes(bytes(16))
            self.load = np.memmap(load_path, dtype=np.int64, mode="r+", shape=(2,))
        self.cores = cores
        if cores is not None and cores.policy == "prefill_first" and cores.decode_wait_s > 0:
            engine.model.between_layers = cores.between_layers
        self.metrics = Deltas()

    def run(self, batch: list[PrefillRequest]) -> list[KVHandle | Exception]:
        t0 = time.perf_counter()
        if self.load is not None:
            self.load[:] = (len(batch), sum(len(r.prompt_token_ids) for r in batch))
        try:
            out = self._run(batch, t0)
        finally:
            if self.load is not None:
                self.load[:] = 0
        m = self.metrics
        m.add("baton:prefill_seconds_total", time.perf_counter() - t0)
        for req, h in zip(batch, out):
            if not isinstance(h, KVHandle):
                log.info("request %s refused: %s", req.request_id, h)
                continue
            log.info("request %s prefilled: %d prompt tokens, %d cached", h.request_id, h.num_prompt_tokens,
                     h.num_cached_tokens)
            m.add("baton:prefill_requests_total", 1)
            m.add("baton:prompt_tokens_total", h.num_prompt_tokens)
            m.add("baton:cached_prompt_tokens_total", max(h.num_cached_tokens, 0))
        return out

    def _run(self, batch: list[PrefillRequest], t0: float = 0.0) -> list[KVHandle | Exception]:
        eng = self.engine
        seqs: list[Sequence | Exception] = []
        if self.cores and any(r.image_data for r in batch):
            self.cores.busy()                        # the vision tower inside prefill: prefill's cores
        for req in batch:
            try:
                mm = self._images(req) if req.images else None
                seqs.append(eng.add_request(req.prompt_token_ids, req.sampling, request_id=req.request_id,
                                            prefill_only=True, mm=mm, lora=req.lora))
            except (InvalidRequestError, EmbeddingsGone) as e:
                seqs.append(e)
            except TransferError as e:               # the encode server's embeddings could not be read
                seqs.append(EmbeddingsGone(str(e)))
        pending = {s.request_id for s in seqs if isinstance(s, Sequence)}
        try:
            while pending:
                if self.cores:
                    self.cores.busy()
                for out in eng.step():
                    if out.finished:
                        pending.discard(out.seq.request_id)
                if eng.idle_step:                    # every prompt waits (for blocks, for KV from a tier)
                    time.sleep(0.002)
        except Exception as e:                       # e.g. the pool cannot hold these prompts
            log.warning("requests %s failed: %r", sorted(pending), e)
            for rid in pending:
                eng.abort(rid)
            seqs = [e if (isinstance(s, Sequence) and s.request_id in pending) else s for s in seqs]
        finally:
            if self.cores:
                self.cores.idle()
            took = time.perf_counter() - t0 if t0 else 0.0
            out = [self._signed(s.kv_handle, took, r.embed_source) if isinstance(s, Sequence) else s
                   for r, s in zip(batch, seqs)]
            for h in out:
                if isinstance(h, KVHandle) and h.block_table:
                    eng.block_manager.hand_off(h.request_id, h.block_table)
            eng.block_manager.flush(idle=True)           # publish, hand off, release the rest: one call
        return out

    def _images(self, req: PrefillRequest) -> MultiModalPrompt:
        """The request's images with their embeddings: read by handle from the node's store (EPD), or
        encoded here (vision inside prefill)."""
        eng = self.engine
        merge = int((eng.config.vision_config or {}).get("spatial_merge_size", 2))
        if req.embed_mac:
            if self.embeddings is None or not hmac.compare_digest(
                    req.embed_mac, embed_mac(self.handle_key, req.request_id, req.images, req.embed_source)):
                raise InvalidRequestError("image", "embedding handle not signed by this node's encoder")
            embeds = [self.embeddings.get(s.hash) for s in req.images]
            missing = [i for i, e in enumerate(embeds) if e is None]
            if missing and req.embed_source:     # on the encode server: read by handle, kept here too
                for i, e in zip(missing, self._remote().read(EmbeddingSource.from_json(req.embed_source), missing)):
                    self.embeddings.put(req.images[i].hash, e)
                    embeds[i] = e
            if any(e is None for e in embeds):
                raise EmbeddingsGone("an image's embeddings left the node's embedding cache before prefill read "
                                     "them (embedding_cache_mb too small for the load); retry")
            return MultiModalPrompt.of(req.images, len(req.prompt_token_ids), merge, embeds)
        if eng.encoder is None or not req.image_data:
            raise InvalidRequestError("image", "images reached prefill without embeddings, and this prefill "
                                      "has no vision tower (profile with an `encode` stage?)")
        embeds = eng.encoder.encode(images_of(req))
        req.embed_source = ""                    # only ever this node's own arena (what the handle signs)
        arena = eng.encoder.cache
        if isinstance(arena, EmbeddingArena):    # a PD prefill node: decode, recomputing, reads them here
            try:
                req.embed_source = arena.source([s.hash for s in req.images]).to_json()
            except KeyError:                     # more images than the arena has slots: decode cannot
                pass
        return MultiModalPrompt.of(req.images, len(req.prompt_token_ids), merge, embeds)

    def _remote(self) -> RemoteEmbeddings:
        if self.remote is None:
            if not self.transfer_host:
                raise EmbeddingsGone("embeddings on an encode server, but this node has no transfer engine address")
            self.remote = RemoteEmbeddings(self.transfer_host)
        return self.remote

    def _signed(self, h: KVHandle, took: float, embed_source: str = "") -> KVHandle:
        h.source = self.source if h.block_table else ""
        h.prefill_seconds = took
        h.embed_source = embed_source if h.images else ""    # decode, recomputing, reads them there
        return h.sign(self.handle_key)
