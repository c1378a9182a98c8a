"""The node's KV pool: ONE shared-memory allocation of fixed-size blocks, mapped as a torch tensor.

Layout is block-major: [num_blocks, num_layers, 2 (K/V), block_size, kv_heads, head_dim], so a block
(every layer's K and V for `block_size` tokens) is one contiguous span: the unit that later moves
between tiers and nodes. Another process maps the same pool with `KVPool.attach(name)`.

A quantized pool (dtype int8 or float8_e4m3fn: `kv_cache_dtype`) is bytes, [num_blocks, block_bytes]:
each block holds every layer's int8/fp8 K and V as above, then their fp32 scales, one per (layer,
K/V, slot, kv head), [num_layers, 2, block_size, kv_heads]. The scales live inside the block's span,
so whatever moves blocks (prefill -> decode, the transfer engine, the tiers) moves them too."""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

QUANTIZED = ("int8", "float8_e4m3fn")
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
PREFIX = "baton-kv-"


@dataclass(frozen=True)
class PoolSpec:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "bfloat16"

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED

    @property
    def shape(self) -> tuple[int, ...]:
        """The pool tensor's shape: per-element for a plain pool, bytes per block for a quantized one."""
        if self.quantized:
            return (self.num_blocks, self.block_bytes)
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The K/V elements' dtype."""
        return getattr(torch, self.dtype)

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quantized else self.torch_dtype

    @property
    def _rows(self) -> int:          # (layer, K/V, slot, kv head) rows per block
        return self.num_layers * 2 * self.block_size * self.num_kv_heads

    @property
    def block_bytes(self) -> int:
        scales = self._rows * 4 if self.quantized else 0
        return self._rows * self.head_dim * self.torch_dtype.itemsize + scales

    def views(self, tensor: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per layer: its K and V caches [num_blocks, block_size, kv_heads, head_dim] (and, quantized,
        their fp32 scales [num_blocks, block_size, kv_heads]), strided views of the pool tensor."""
        L, bs, kvh, D = self.num_layers, self.block_size, self.num_kv_heads, self.head_dim
        if not self.quantized:
            return [(tensor[:, i, 0], tensor[:, i, 1]) for i in range(L)]
        data, span = bs * kvh * D, bs * kvh * 4      # bytes of one layer's K (or V) and of its scales
        scales0 = L * 2 * data

        def cache(j: int) -> torch.Tensor:
            return tensor[:, j * data:(j + 1) * data].view(self.torch_dtype).view(-1, bs, kvh, D)

        def scales(j: int) -> torch.Tensor:
            return tensor[:, scales0 + j * span:scales0 + (j + 1) * span].view(torch.float32).view(-1, bs, kvh)

        return [(cache(2 * i), cache(2 * i + 1), scales(2 * i), scales(2 * i + 1)) for i in range(L)]


def _unlink(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


class KVPool:
    def __init__(self, name: str, spec: PoolSpec, tensor: torch.Tensor, owner: bool) -> None:
        self.name = name
        self.spec = spec
        self.tensor = tensor
        self.owner = owner
        # Per-layer K, V (+ scales) views, built once.
        self.layers = spec.views(tensor)
        paths = (self.data_path(name), self.meta_path(name))
        self._finalizer = weakref.finalize(self, _unlink, *paths) if owner else None

    @staticmethod
    def data_path(name: str) -> Path:
        return SHM_DIR / f"{PREFIX}{name}"

    @staticmethod
    def meta_path(name: str) -> Path:
        return SHM_DIR / f"{PREFIX}{name}.json"

    @classmethod
    def create(cls, name: str, spec: PoolSpec) -> KVPool:
        path = cls.data_path(name)
        numel = 1
        for s in spec.shape:
            numel *= s
        dtype = spec.storage_dtype
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, numel * dtype.itemsize)
        finally:
            os.close(fd)
        tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(spec.shape)
        # Touch every page now: a first write to a tmpfs page faults (~0.5 us/KiB measured), which
        # otherwise lands on the first prefills that use fresh blocks.
        tensor.view(-1)[:: 4096 // dtype.itemsize].zero_()
        cls.meta_path(name).write_text(json.dumps(asdict(spec)))
        return cls(name, spec, tensor, owner=True)

    @classmethod
    def create_on_device(cls, name: str, spec: PoolSpec, device: str) -> KVPool:
        """A pool in this process's memory on `device` (a GPU's, or "cpu"), private to it: sharing
        one across stage processes needs a /dev/shm file (create) or, on a GPU, CUDA IPC (not done)."""
        tensor = torch.zeros(spec.shape, dtype=spec.storage_dtype, device=device)
        return cls(name, spec, tensor, owner=False)

    @classmethod
    def attach(cls, name: str) -> KVPool:
        meta = cls.meta_path(name)
        if not meta.is_file():
            raise FileNotFoundError(f"no KV pool named {name!r} ({meta} missing)")
        spec = PoolSpec(**json.loads(meta.read_text()))
        numel = 1
        for s in spec.shape:
            numel *= s
        tensor = torch.from_file(str(cls.data_path(name)), shared=True, size=numel, dtype=spec.storage_dtype)
        return cls(name, spec, tensor.view(spec.shape), owner=False)

    def close(self) -> None:
        """Drop the mapping; the creating process also removes the /dev/shm files."""
        self.layers = []
        self.tensor = None  # type: ignore[assignment]
        if self._finalizer is not None:
            self._finalizer()
