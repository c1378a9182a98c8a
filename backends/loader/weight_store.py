"""One copy of a model's weights per node: the prepared (fused) tensors written once into a
/dev/shm file that every stage process maps. Attaching is a memory map, not a read.

Linear weights may be stored oneDNN-packed (kernels.linear.PackedWeight: their bytes plus the
descriptor) or quantized (Int8Weight, Int4Packed, Int4Weight: dataclasses of tensors and settings),
so every stage runs the fast GEMM on the one shared copy."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from baton.kernels.int4_linear import Int4Packed
from baton.kernels.int8_linear import Int8Weight
from baton.kernels.linear import PackedWeight, StoredWeight
from baton.kernels.quant import Int4Weight

from ..kv.pool import SHM_DIR

PREFIX = "baton-weights-"
ALIGN = 64
# quantized weights, stored as '<name>#<field>' tensors plus their other fields in the index
QUANTIZED = {c.__name__: c for c in (Int8Weight, Int4Packed, Int4Weight)}


def data_path(name: str) -> Path:
    return SHM_DIR / f"{PREFIX}{name}"


def index_path(name: str) -> Path:
    return SHM_DIR / f"{PREFIX}{name}.json"


Weights = dict[str, StoredWeight]


def _fields(t: object) -> dict[str, object]:
    return {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if not f.name.startswith("_")}  # type: ignore[arg-type]


def _parts(tensors: Weights) -> dict[str, torch.Tensor]:
    """Flat byte-carrying tensors: a PackedWeight becomes '<name>' (its blob) and '<name>#md', a
    quantized weight '<name>#<field>' for each of its tensors."""
    out = {}
    for k, t in tensors.items():
        if isinstance(t, PackedWeight):
            out[k], out[k + "#md"] = t.blob, t.md
        elif type(t).__name__ in QUANTIZED:
            out |= {f"{k}#{f}": v for f, v in _fields(t).items() if isinstance(v, torch.Tensor)}
        else:
            out[k] = t                                         # type: ignore[assignment]
    return out


def publish(name: str, tensors: Weights) -> int:
    """Write tensors into one shared file (+ an index). Returns its size in bytes."""
    parts = _parts(tensors)
    index, offset = {}, 0
    for k, t in parts.items():
        offset = -(-offset // ALIGN) * ALIGN
        index[k] = {"offset": offset, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
        offset += t.numel() * t.element_size()
    quantized = {}
    for k, t in tensors.items():
        if isinstance(t, PackedWeight):   # the logical weight the blob holds
            index[k]["packed"] = {"shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1], "layout": t.layout}
        elif type(t).__name__ in QUANTIZED:
            quantized[k] = {"kind": type(t).__name__,
                            "fields": {f: v for f, v in _fields(t).items() if not isinstance(v, torch.Tensor)},
                            "tensors": [f for f, v in _fields(t).items() if isinstance(v, torch.Tensor)]}
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
    index_path(name).write_text(json.dumps({"size": size, "tensors": index, "quantized": quantized}))
    return size


def attach(name: str) -> Weights:
    """Tensors (and packed or quantized weights) viewing the shared file (read-only by convention)."""
    meta = json.loads(index_path(name).read_text())
    buf = torch.from_file(str(data_path(name)), shared=True, size=meta["size"], dtype=torch.uint8)
    views: dict[str, torch.Tensor] = {}
    for k, e in meta["tensors"].items():
        dtype = getattr(torch, e["dtype"])
        n = 1
        for s in e["shape"]:
            n *= s
        views[k] = buf[e["offset"]:e["offset"] + n * dtype.itemsize].view(dtype).view(e["shape"])
    out: Weights = {}
    for k, e in meta["tensors"].items():
        if "#" in k:
            continue
        if "packed" in e:
            p = e["packed"]
            out[k] = PackedWeight(views[k], views[k + "#md"], tuple(p["shape"]), getattr(torch, p["dtype"]),
                                  p.get("layout", ""))
        else:
            out[k] = views[k]
    for k, q in meta.get("quantized", {}).items():
        fields = dict(q["fields"]) | {f: views[f"{k}#{f}"] for f in q["tensors"]}
        if "shape" in fields:
            fields["shape"] = tuple(fields["shape"])               # type: ignore[arg-type]
        out[k] = QUANTIZED[q["kind"]](**fields)
    return out


def unlink(name: str) -> None:
    for p in (data_path(name), index_path(name)):
        p.unlink(missing_ok=True)
