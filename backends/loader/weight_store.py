"""One copy of a model's weights per node: the prepared (fused) tensors written once into a
/dev/shm file that every stage process maps. Attaching is a memory map, not a read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..kv.pool import SHM_DIR

PREFIX = "baton-weights-"
ALIGN = 64


def data_path(name: str) -> Path:
    return SHM_DIR / f"{PREFIX}{name}"


def index_path(name: str) -> Path:
    return SHM_DIR / f"{PREFIX}{name}.json"


def publish(name: str, tensors: dict[str, torch.Tensor]) -> int:
    """Write tensors into one shared file (+ an index). Returns its size in bytes."""
    index, offset = {}, 0
    for k, t in tensors.items():
        offset = -(-offset // ALIGN) * ALIGN
        index[k] = {"offset": offset, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
        offset += t.numel() * t.element_size()
    size = max(offset, 1)
    fd = os.open(data_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    buf = torch.from_file(str(data_path(name)), shared=True, size=size, dtype=torch.uint8)
    for k, t in tensors.items():
        e = index[k]
        n = t.numel() * t.element_size()
        buf[e["offset"]:e["offset"] + n].copy_(t.contiguous().view(-1).view(torch.uint8))
    index_path(name).write_text(json.dumps({"size": size, "tensors": index}))
    return size


def attach(name: str) -> dict[str, torch.Tensor]:
    """Tensors viewing the shared file (read-only by convention)."""
    meta = json.loads(index_path(name).read_text())
    buf = torch.from_file(str(data_path(name)), shared=True, size=meta["size"], dtype=torch.uint8)
    out = {}
    for k, e in meta["tensors"].items():
        dtype = getattr(torch, e["dtype"])
        n = 1
        for s in e["shape"]:
            n *= s
        out[k] = buf[e["offset"]:e["offset"] + n * dtype.itemsize].view(dtype).view(e["shape"])
    return out


def unlink(name: str) -> None:
    for p in (data_path(name), index_path(name)):
        p.unlink(missing_ok=True)
