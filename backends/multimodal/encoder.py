"""Images -> embeddings through the vision tower, with a cache keyed by image content: a repeated
image is encoded once. The cache is a seam: in-process here (the offline engine, the monolithic
prefill), node-shared in serving (multimodal/embedding_store.py, written by the `encode` stage)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..models.vision import VisionConfig, VisionTower, load_vision_weights
from .image import ImageProcessor, ProcessedImage


class EmbeddingCache(Protocol):
    def get(self, key: str) -> torch.Tensor | None: ...
    def put(self, key: str, embeds: torch.Tensor) -> None: ...
    def touch(self, key: str) -> bool: ...   # present (and now the most recently used), without reading it


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

    def touch(self, key: str) -> bool:
        return self.get(key) is not None

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


VISUAL = "visual."      # the tower's tensors in a node's shared weight file, beside the language model's


def visual_weights(weights: dict | None) -> dict[str, torch.Tensor] | None:
    """The vision tower's tensors within a node's shared weights (None: not there)."""
    if not weights:
        return None
    out = {k[len(VISUAL):]: v for k, v in weights.items() if k.startswith(VISUAL)}
    return out or None


class ImageEncoder:
    def __init__(self, tower: VisionTower, processor: ImageProcessor, cache: EmbeddingCache | None = None) -> None:
        self.tower = tower
        self.processor = processor
        self.cache: EmbeddingCache = cache if cache is not None else LocalEmbeddingCache()
        self.hits = 0          # images found in the cache
        self.misses = 0        # images the tower encoded

    @classmethod
    def from_dir(cls, model_dir: str | Path, vision_config: dict, dtype: torch.dtype,
                 weights: dict[str, torch.Tensor] | None = None, cache: EmbeddingCache | None = None) -> ImageEncoder:
        """weights: the tower's tensors already loaded (a node's shared copy: visual_weights); else
        read from the checkpoint."""
        tower = VisionTower(VisionConfig.from_hf_dict(vision_config), weights or load_vision_weights(model_dir, dtype))
        return cls(tower, ImageProcessor.from_dir(model_dir), cache)

    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """Embeddings per image ([num_tokens, hidden]); the uncached ones in one tower call."""
        found = {im.hash: self.cache.get(im.hash) for im in images}
        found |= self._encode_new(images, {h for h, t in found.items() if t is not None})
        return [found[im.hash] for im in images]  # type: ignore[misc]

    def ensure(self, images: list[ProcessedImage]) -> None:
        """Every image's embeddings in the cache (the `encode` stage: prefill reads them there); the
        ones already there are not read, only marked used."""
        self._encode_new(images, {im.hash for im in images if self.cache.touch(im.hash)})

    def _encode_new(self, images: list[ProcessedImage], cached: set[str]) -> dict[str, torch.Tensor]:
        """The images not in `cached` through the tower in one call (each once), into the cache."""
        todo = {im.hash: im for im in images if im.hash not in cached}
        self.hits += len(images) - len(todo)
        if not todo:
            return {}
        self.misses += len(todo)
        new = list(todo.values())
        pixels = torch.from_numpy(np.concatenate([self.processor.patches(im) for im in new]))
        embeds = self.tower.forward(pixels, [im.grid for im in new])
        out = {}
        for im, part in zip(new, embeds.split([im.num_tokens for im in new])):
            out[im.hash] = part.contiguous()
            self.cache.put(im.hash, out[im.hash])
        return out
