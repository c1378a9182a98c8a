"""One copy of a model's weights per node: the prepared (fused) tensors written once into a
/dev/shm file that every stage process maps. Attaching is a memory map, not a read.

Linear weights may be stored oneDNN-packed (kernels.linear.PackedWeight: their bytes plus the
descriptor) or int8 (kernels.int8_linear.Int8Weight: the int8 bytes plus per-channel scales), so
every stage runs the fast GEMM on the one shared copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from baton.kernels.int8_linear import Int8Weight
from baton.kernels.linear import PackedWeight

from ..kv.pool import SHM_DIR

PREFIX = "baton-weights-"
ALIGN = 64


def data_path(name: str) -> Path:
    return SHM_DIR / f"{PREFIX}{name}"


def index_path(name: str) -> Path:
    return SHM_DIR / f"{PREFIX}{name}.json"


Weights = dict[str, torch.Tensor | PackedWeight | Int8Weight]


def _parts(tensors: Weights) -> dict[str, torch.Tensor]:
    """Flat byte-carrying tensors: a PackedWeight becomes '<name>' (its blob) and '<name>#md', an
    Int8Weight '<name>' (its int8 bytes) and '<name>#scale'."""
    out = {}
    for k, t in tensors.items():
        if isinstance(t, PackedWeight):
            out[k], out[k + "#md"] = t.blob, t.md
        elif isinstance(t, Int8Weight):
            out[k], out[k + "#scale"] = t.qweight, t.scale
        else:
            out[k] = t
    return out


def publish(name: str, tensors: Weights) -> int:
    """Write tensors into one shared file (+ an index). Returns its size in bytes."""
    parts = _parts(tensors)
    index, offset = {}, 0
    for k, t in parts.items():
        offset = -(-offset // ALIGN) * ALIGN
        index[k] = {"offset": offset, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
        offset += t.numel() * t.element_size()
    for k, t in tensors.items():
        if isinstance(t, PackedWeight):   # the logical weight the blob holds
            index[k]["packed"] = {"shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1], "layout": t.layout}
        elif isinstance(t, Int8Weight):
            index[k]["int8"] = {"shape": list(t.shape), "packed": t.packed}
    size = max(offset, 1)
    fd = os.open(data_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    buf = torch.from_file(str(data_path(name)), shared=True, size=size, dtype=torch.uint8)
    for k, t in parts.items():
        e = index[k]
        n = t.numel() * t.element_size()
        buf[e["offset"]:e["offset"] + n].copy_(t.contiguous().view(-1).view(torch.uint8))
    index_path(name).write_text(json.dumps({"size": size, "tensors": index}))
    return size


def attach(name: str) -> Weights:
    """Tensors (and packed weights) viewing the shared file (read-only by convention)."""
    meta = json.loads(index_path(name).read_text())
    buf = torch.from_file(str(data_path(name)), shared=True, size=meta["size"], dtype=torch.uint8)
    out: Weights = {}
    for k, e in meta["tensors"].items():
        dtype = getattr(torch, e["dtype"])
        n = 1
        for s in e["shape"]:
            n *= s
        out[k] = buf[e["offset"]:e["offset"] + n * dtype.itemsize].view(dtype).view(e["shape"])
    for k, e in meta["tensors"].items():
        if "packed" in e:
            p = e["packed"]
            out[k] = PackedWeight(out[k], out.pop(k + "#md"), tuple(p["shape"]), getattr(torch, p["dtype"]),
                                  p.get("layout", ""))
        elif "int8" in e:
            p = e["int8"]
            out[k] = Int8Weight(out[k], out.pop(k + "#scale"), tuple(p["shape"]), p["packed"])
    return out


def unlink(name: str) -> None:
    for p in (data_path(name), index_path(name)):
        p.unlink(missing_ok=True)
