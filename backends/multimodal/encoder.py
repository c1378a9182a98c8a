"""Images -> embeddings through the vision tower, with a cache keyed by image content: a repeated
image is encoded once. The cache is a seam: in-process here (the offline engine, the monolithic
prefill), node-shared in serving (multimodal/embedding_store.py, written by the `encode` stage)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch

from ..models.vision import VisionConfig, VisionTower, load_vision_weights
from .image import ImageProcessor, ProcessedImage


class EmbeddingCache(Protocol):
    def get(self, key: str) -> torch.Tensor | None: ...
    def put(self, key: str, embeds: torch.Tensor) -> None: ...


class LocalEmbeddingCache:
    """LRU over at most `capacity_bytes` of embeddings."""

    def __init__(self, capacity_bytes: int = 256 << 20) -> None:
        self.capacity = capacity_bytes
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        t = self.items.get(key)
        if t is not None:
            self.items.move_to_end(key)
        return t

    def put(self, key: str, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if key in self.items or size > self.capacity:
            return
        while self.bytes + size > self.capacity:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.items[key] = embeds
        self.bytes += size

    def __len__(self) -> int:
        return len(self.items)


class ImageEncoder:
    def __init__(self, tower: VisionTower, processor: ImageProcessor, cache: EmbeddingCache | None = None) -> None:
        self.tower = tower
        self.processor = processor
        self.cache: EmbeddingCache = cache if cache is not None else LocalEmbeddingCache()
        self.hits = 0          # images found in the cache
        self.misses = 0        # images the tower encoded

    @classmethod
    def from_dir(cls, model_dir: str | Path, vision_config: dict, dtype: torch.dtype,
                 cache: EmbeddingCache | None = None) -> ImageEncoder:
        tower = VisionTower(VisionConfig.from_hf_dict(vision_config), load_vision_weights(model_dir, dtype))
        return cls(tower, ImageProcessor.from_dir(model_dir), cache)

    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """Embeddings per image ([num_tokens, hidden]); the uncached ones in one tower call."""
        out: list[torch.Tensor | None] = [self.cache.get(im.hash) for im in images]
        todo = [i for i, e in enumerate(out) if e is None]
        self.hits += len(images) - len(todo)
        if todo:
            self.misses += len(todo)
            pixels = torch.from_numpy(_concat([images[i].pixels for i in todo]))
            embeds = self.tower.forward(pixels, [images[i].grid for i in todo])
            for i, part in zip(todo, embeds.split([images[i].num_tokens for i in todo])):
                part = part.contiguous()
                self.cache.put(images[i].hash, part)
                out[i] = part
        return out  # type: ignore[return-value]


def _concat(arrays: list) -> object:
    import numpy as np

    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
