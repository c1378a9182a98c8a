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
import time
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
# ends, the caller (prefill's batch, decode's read-back thread) goes on; new reads from that server
# fail at once until its stuck read ends (RemoteEmbeddings).
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


class _Staging:
    """Byte ranges of the reader's registered region, each held by one read in flight: a read that
    hangs holds only its own range, and the others go on."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held: dict[int, int] = {}           # start -> length
        self.cond = threading.Condition()

    def take(self, n: int, deadline: float) -> int:
        with self.cond:
            while (at := self._fit(n)) is None:
                if not self.cond.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                    raise TransferError("no staging space for an image embedding read in time (reads in flight "
                                        "hold it); retry")
            self.held[at] = n
            return at

    def give(self, at: int) -> None:
        with self.cond:
            del self.held[at]
            self.cond.notify_all()

    def _fit(self, n: int) -> int | None:
        at = 0
        for start in sorted(self.held):
            if start - at >= n:
                return at
            at = max(at, start + self.held[start])
        return at if self.size - at >= n else None


class RemoteEmbeddings:
    """A prefill or decode server's reader: one staging region registered with its own transfer
    engine, shared by up to `readers` reads at once. An encode server that stops answering (alive
    but silent: the transfer engine gives up on it only after 30 s) costs its own reads, not
    others': while one of its reads is past the timeout, new reads from it fail at once."""

    def __init__(self, host: str, protocol: str = "tcp", staging_bytes: int = 64 << 20, readers: int = 4) -> None:
        self.buf = torch.zeros(staging_bytes, dtype=torch.uint8)
        self.agent = TransferAgent(host, protocol, self.buf.data_ptr(), self.buf.numel())
        self.staging = _Staging(staging_bytes)
        self.batch_bytes = max(1, staging_bytes // readers)      # a read's batch, so others fit beside it
        self.lock = threading.Lock()
        self.transfers: dict[int, tuple[str, float]] = {}        # transfer id -> (segment, when it began)
        self.next_id = 0
        self.worker = ThreadPoolExecutor(readers, thread_name_prefix="baton-embed-read")

    def read(self, source: EmbeddingSource, which: list[int], timeout_s: float | None = None) -> list[torch.Tensor]:
        """The embeddings of source.slots[i] for i in `which`, checked against their checksums (a
        mismatch: the slot was reused before this read; TransferError, the request is retried).
        Not done within `timeout_s` (default READ_TIMEOUT_S): TransferError."""
        timeout = READ_TIMEOUT_S if timeout_s is None else timeout_s
        if self._silent(source.segment, timeout):
            raise TransferError(f"{source.segment} has not answered a read of image embeddings for over "
                                f"{timeout:g} s (the encode server does not answer); retry")
        fut = self.worker.submit(self._read, source, which, time.monotonic() + timeout)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()                          # not started yet: never started (its caller is gone)
            raise TransferError(f"reading image embeddings from {source.segment} took over {timeout:g} s (the "
                                "encode server does not answer); retry") from None

    def _silent(self, segment: str, timeout: float) -> bool:
        now = time.monotonic()
        with self.lock:
            return any(seg == segment and now - began > timeout for seg, began in self.transfers.values())

    def _read(self, source: EmbeddingSource, which: list[int], deadline: float) -> list[torch.Tensor]:
        slots = [source.slots[i] for i in which]
        if any(s.nbytes > self.staging.size for s in slots):
            raise TransferError(f"an image's embeddings ({max(s.nbytes for s in slots)} bytes) exceed the "
                                f"staging region ({self.staging.size})")
        out: list[torch.Tensor] = []
        start = 0
        while start < len(slots):
            batch, size = [], 0
            for s in slots[start:]:
                if batch and size + s.nbytes > self.batch_bytes:
                    break
                batch.append((s, size))
                size += s.nbytes
            at = self.staging.take(size, deadline)
            try:
                self._transfer(source, [(s, at + off) for s, off in batch])
                for s, off in batch:
                    raw = self.buf[at + off:at + off + s.nbytes].clone()
                    if xxhash.xxh3_64_hexdigest(raw.numpy()) != s.checksum:
                        raise TransferError("an image's embeddings changed on the encode server before they were "
                                            "read (its arena reused the slot); retry")
                    out.append(raw.view(_DTYPES[s.dtype]).view(s.rows, s.cols))
            finally:
                self.staging.give(at)
            start += len(batch)
        return out

    def _transfer(self, source: EmbeddingSource, batch: list[tuple[Slot, int]]) -> None:
        with self.lock:
            tid, self.next_id = self.next_id, self.next_id + 1
            self.transfers[tid] = (source.segment, time.monotonic())
        try:
            if self.agent.engine.batch_transfer_sync_read(
                    source.segment, [self.agent.base + at for _, at in batch],
                    [source.base + s.offset for s, _ in batch], [s.nbytes for s, _ in batch]) != 0:
                raise TransferError(f"reading {len(batch)} image embeddings from {source.segment} failed")
        finally:
            with self.lock:
                del self.transfers[tid]


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
