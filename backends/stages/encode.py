"""encode: the vision tower as its own stage (EPD). Takes preprocess's requests with their images
(as sent, encoded), makes their patches, writes each image's embeddings to the node's embedding
store under its content hash (an image already there is not encoded again), and passes the request
on to prefill without the images, carrying the embedding handle (the hashes, signed with the node's
secret)."""

from __future__ import annotations

import logging
import time

from ..engine.errors import InvalidRequestError
from ..multimodal.encoder import ImageEncoder
from ..multimodal.image import ProcessedImage
from ..multimodal.remote import EmbeddingArena
from .cores import CoreShare
from .messages import PrefillRequest, embed_mac, images_of
from .metrics import Deltas

log = logging.getLogger("encode")

# the tower is throughput work: on a core it shares with the request path (the front relaying
# streamed tokens, prefill, decode; all at nice 0) it runs when they wait, so a 130 ms encode does
# not sit between a stream's tokens
ENCODE_NICE = 19


class EncodeStage:
    def __init__(self, encoder: ImageEncoder, handle_key: bytes, cores: CoreShare | None = None) -> None:
        """encoder: the vision tower with the node's EmbeddingStore as its cache."""
        self.encoder = encoder
        self.handle_key = handle_key
        self.cores = cores
        self.metrics = Deltas()

    def run(self, batch: list[PrefillRequest]) -> list[PrefillRequest | Exception]:
        """The images of every request in the batch that the store lacks, in one tower call."""
        t0 = time.perf_counter()
        out: list[PrefillRequest | Exception] = []
        images: list[ProcessedImage] = []
        for req in batch:
            try:
                images += images_of(req)
                out.append(req)
            except InvalidRequestError as e:
                out.append(e)
        enc = self.encoder
        hits, misses = enc.hits, enc.misses
        if images:
            if self.cores:
                self.cores.busy()
            try:
                enc.ensure(images)
            except Exception as e:       # a fault here fails this batch's requests, not the stage
                log.warning("encoding %d images failed: %r", len(images), e)
                out = [RuntimeError(f"encode failed: {e!r}") if isinstance(r, PrefillRequest) else r for r in out]
            finally:
                if self.cores:
                    self.cores.idle()
        m = self.metrics
        m.add("baton:encode_images_total", enc.hits + enc.misses - hits - misses)
        m.add("baton:encode_cache_hits_total", enc.hits - hits)
        m.add("baton:encode_seconds_total", time.perf_counter() - t0)
        arena = enc.cache if isinstance(enc.cache, EmbeddingArena) else None
        for i, r in enumerate(out):
            if isinstance(r, PrefillRequest):
                r.image_data = []
                if arena is not None:            # EPD across servers: where prefill reads them from
                    try:
                        r.embed_source = arena.source([s.hash for s in r.images]).to_json()
                    except KeyError:
                        out[i] = RuntimeError("the encode server's embedding arena is too small for this batch's "
                                              "images (embedding_cache_mb); retry")
                        continue
                r.embed_mac = embed_mac(self.handle_key, r.request_id, r.images, r.embed_source)
        return out
