"""The node's embedding cache: visual embeddings keyed by image content hash, shared by the stage
processes of a node as one small file per image in a shared-memory directory (/dev/shm). The
`encode` stage writes (and alone evicts, oldest use first, beyond `capacity_bytes`); prefill and
decode read by key. The handle that travels between stages is the key plus an HMAC under the node's
secret (stages/messages.py), so only what this node's encoder wrote is ever read.

A file is written under a temporary name and renamed into place, so a reader sees a whole
embedding or none."""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..kv.pool import SHM_DIR

log = logging.getLogger("embeddings")

PREFIX = "baton-emb-"
_MAGIC = b"BEMB"
_HEADER = struct.Struct("<4sBxxxqq")          # magic, dtype code, rows, cols
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_KEY = re.compile(r"^[0-9a-f]{16,64}$")


def store_dir(node_id: str) -> Path:
    return SHM_DIR / f"{PREFIX}{node_id}"


class EmbeddingStore:
    def __init__(self, directory: str | Path, capacity_bytes: int = 256 << 20) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.capacity = capacity_bytes
        self.lru: OrderedDict[str, int] = OrderedDict()   # the writer's view: key -> bytes
        self.bytes = 0
        self.lock = threading.Lock()
        self.evicted = 0

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"embedding key {key!r} is not a content hash")
        return self.dir / f"{key}.emb"

    def get(self, key: str) -> torch.Tensor | None:
        """The key's embeddings; None when they are not here, or their file is unreadable (it is
        removed: the encoder writes it again, and no reader ever uses it)."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        magic, code, rows, cols = _HEADER.unpack_from(raw) if len(raw) >= _HEADER.size else (b"", 0, 0, 0)
        if magic != _MAGIC or code >= len(_DTYPES) or len(raw) - _HEADER.size != rows * cols * _DTYPES[code].itemsize:
            log.warning("embedding file %s is corrupt or truncated (%d bytes); removed", path, len(raw))
            path.unlink(missing_ok=True)
            return None
        dtype = _DTYPES[code]
        data = np.frombuffer(raw, dtype=np.uint8, offset=_HEADER.size).copy()
        with self.lock:
            if key in self.lru:
                self.lru.move_to_end(key)
        return torch.from_numpy(data).view(dtype).view(rows, cols)

    def touch(self, key: str) -> bool:
        """Whether the key's file is here; marks it used in this writer's LRU (no read)."""
        if not self._path(key).exists():
            return False
        with self.lock:
            if key in self.lru:
                self.lru.move_to_end(key)
        return True

    def put(self, key: str, embeds: torch.Tensor) -> None:
        t = embeds.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        header = _HEADER.pack(_MAGIC, _DTYPES.index(t.dtype), t.shape[0], t.shape[1])
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(t.view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
        with self.lock:
            if key in self.lru:
                self.bytes -= self.lru.pop(key)
            self.lru[key] = size
            self.bytes += size
            while self.bytes > self.capacity and len(self.lru) > 1:
                old, n = self.lru.popitem(last=False)
                self.bytes -= n
                self.evicted += 1
                self._path(old).unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*.emb"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
