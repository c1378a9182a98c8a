"""Embeddings across servers (EPD with encode on its own server): the encode server keeps them in one
memory region registered with the Mooncake transfer engine (`EmbeddingArena`), and a prefill server
reads them by handle (`RemoteEmbeddings`), as a decode server reads KV blocks from a prefill server
(kv/transfer.py).

The arena is slots of one size (the largest image the processor makes), reused oldest use first. A
handle names each image's slot offset, size, shape and an xxh3 checksum of its bytes; the reader
checks the checksum, so an image whose slot was reused between the handle and the read (a busy
server with a small arena) is detected and refused (the request is retried), never used."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass

import numpy as np
import torch
import xxhash

from ..kv.transfer import TransferAgent, TransferError

log = logging.getLogger("embeddings")

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# A read not done this long (its encode server alive but silent) fails: the request is refused or
# ends, the caller (prefill's batch, decode's read-back thread) goes on. A read that later ends frees the reader.
READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Slot:
    offset: int          # from the arena's base
    nbytes: int
    rows: int
    cols: int
    dtype: int           # index into _DTYPES
    checksum: str        # xxh3-64 of the bytes


@dataclass(frozen=True)
class EmbeddingSource:
    """Where a request's image embeddings can be read (JSON in the signed request to prefill)."""

    segment: str         # the encode server's transfer engine, "host:rpc_port"
    base: int            # its arena's address
    slots: list[Slot]    # one per image, in the prompt's order

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> EmbeddingSource:
        d = json.loads(s)
        return cls(d["segment"], int(d["base"]), [Slot(**x) for x in d["slots"]])


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().reshape(-1)


class EmbeddingArena:
    """An encode server's embedding cache (an EmbeddingCache for multimodal.encoder.ImageEncoder), or
    a PD prefill node's that runs the tower itself, in memory the transfer engine serves."""

    def __init__(self, capacity_bytes: int, slot_bytes: int, host: str, protocol: str = "tcp") -> None:
        self.slot_bytes = -(-slot_bytes // 4096) * 4096
        n = max(1, capacity_bytes // self.slot_bytes)
        self.buf = torch.zeros(n * self.slot_bytes, dtype=torch.uint8)
        self.agent = TransferAgent(host, protocol, self.buf.data_ptr(), self.buf.numel())
        self.free = list(range(n))
        self.index: OrderedDict[str, Slot] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self.lock:
            s = self.index.get(key)
            if s is None:
                return None
            self.index.move_to_end(key)
            return self.buf[s.offset:s.offset + s.nbytes].clone().view(_DTYPES[s.dtype]).view(s.rows, s.cols)

    def touch(self, key: str) -> bool:
        with self.lock:
            if key not in self.index:
                return False
            self.index.move_to_end(key)
            return True

    def put(self, key: str, embeds: torch.Tensor) -> None:
        raw = _bytes_of(embeds.detach().cpu())
        if raw.size > self.slot_bytes:
            raise ValueError(f"an image's embeddings ({raw.size} bytes) exceed the arena's slot ({self.slot_bytes})")
        with self.lock:
            if key in self.index:
                return
            if not self.free:
                _, old = self.index.popitem(last=False)
                self.free.append(old.offset // self.slot_bytes)
            off = self.free.pop() * self.slot_bytes
            self.buf[off:off + raw.size] = torch.from_numpy(raw)
            self.index[key] = Slot(off, int(raw.size), embeds.shape[0], embeds.shape[1], _DTYPES.index(embeds.dtype),
                                   xxhash.xxh3_64_hexdigest(raw))

    def source(self, keys: list[str]) -> EmbeddingSource:
        """The handle for these images (all just put or found)."""
        with self.lock:
            return EmbeddingSource(self.agent.segment, self.agent.base, [self.index[k] for k in keys])

    def __len__(self) -> int:
        return len(self.index)


class RemoteEmbeddings:
    """A prefill server's reader: one staging region registered with its own transfer engine."""

    def __init__(self, host: str, protocol: str = "tcp", staging_bytes: int = 64 << 20) -> None:
        self.buf = torch.zeros(staging_bytes, dtype=torch.uint8)
        self.agent = TransferAgent(host, protocol, self.buf.data_ptr(), self.buf.numel())
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="baton-embed-read")

    def read(self, source: EmbeddingSource, which: list[int], timeout_s: float | None = None) -> list[torch.Tensor]:
        """The embeddings of source.slots[i] for i in `which`, checked against their checksums (a
        mismatch: the slot was reused before this read; TransferError, the request is retried).
        Not done within `timeout_s` (default READ_TIMEOUT_S): TransferError."""
        fut = self.worker.submit(self._read, source, which)
        try:
            return fut.result(READ_TIMEOUT_S if timeout_s is None else timeout_s)
        except FutureTimeout:
            raise TransferError(f"reading image embeddings from {source.segment} took over "
                                f"{READ_TIMEOUT_S if timeout_s is None else timeout_s:g} s (the encode server "
                                "does not answer); retry") from None

    def _read(self, source: EmbeddingSource, which: list[int]) -> list[torch.Tensor]:
        slots = [source.slots[i] for i in which]
        out: list[torch.Tensor] = []
        with self.lock:                          # one staging region: one read at a time
            start = 0
            while start < len(slots):
                batch, size = [], 0
                for s in slots[start:]:
                    if batch and size + s.nbytes > self.buf.numel():
                        break
                    if s.nbytes > self.buf.numel():
                        raise TransferError(f"an image's embeddings ({s.nbytes} bytes) exceed the staging region")
                    batch.append((s, size))
                    size += s.nbytes
                local = [self.agent.base + at for _, at in batch]
                remote = [source.base + s.offset for s, _ in batch]
                if self.agent.engine.batch_transfer_sync_read(source.segment, local, remote,
                                                              [s.nbytes for s, _ in batch]) != 0:
                    raise TransferError(f"reading {len(batch)} image embeddings from {source.segment} failed")
                for s, at in batch:
                    raw = self.buf[at:at + s.nbytes].clone()
                    if xxhash.xxh3_64_hexdigest(raw.numpy()) != s.checksum:
                        raise TransferError("an image's embeddings changed on the encode server before they were "
                                            "read (its arena reused the slot); retry")
                    out.append(raw.view(_DTYPES[s.dtype]).view(s.rows, s.cols))
                start += len(batch)
        return out


def fetcher(local: Callable[[str], torch.Tensor | None] | None, reader: Callable[[], RemoteEmbeddings] | None,
            source: str, hashes: list[str]) -> Callable[[str], torch.Tensor | None] | None:
    """How a node that recomputes a prompt (decode, preempted or after a failed KV read) gets its
    images' embeddings back: its own store (`local`), else the encode server's slots the handle names
    (`source`: EmbeddingSource JSON; `hashes`: the prompt's images in order), read through `reader`.
    The fetch answers None when neither has them (a reused slot fails its checksum), and that request
    alone ends with an error; None instead of a fetch: nowhere to look."""
    def fetch(key: str) -> torch.Tensor | None:
        found = local(key) if local is not None else None
        if found is not None or not source or reader is None:
            return found
        try:
            return reader().read(EmbeddingSource.from_json(source), [hashes.index(key)])[0]
        except (TransferError, ValueError, KeyError) as e:
            log.warning("image %s: its embeddings could not be read from the encode server: %s", key, e)
            return None
    return fetch if local is not None or (source and reader is not None) else None
