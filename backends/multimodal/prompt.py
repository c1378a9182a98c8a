"""A multimodal prompt: where each image's embeddings go, and the M-RoPE positions of its tokens.

A prompt names each image with one placeholder token (<|image_pad|>, as a chat template writes
it); the placeholder is repeated once per embedding the image becomes (what Qwen2_5_VLProcessor
does). Positions are three per token (temporal, height, width): text tokens count on with all three
equal, an image's tokens take (start, start + row, start + column) of its merged patch grid, and the
text after it starts at start + max(rows, columns). Generated tokens are text: index + `delta`."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import torch

from ..engine.errors import InvalidRequestError
from .image import ProcessedImage


@dataclass(frozen=True)
class ImageSpan:
    start: int                      # index of its first placeholder in the prompt
    length: int                     # placeholders = embeddings
    hash: str                       # content hash: the embedding cache's key, and a prefix-cache key
    grid: tuple[int, int, int]      # (t, h, w) in patches


@dataclass
class MultiModalPrompt:
    spans: list[ImageSpan]
    positions: torch.Tensor          # [3, prompt tokens] int64
    delta: int                       # a token at index i >= prompt length has position i + delta
    embeds: list[torch.Tensor | None] = field(default_factory=list)   # per span [length, hidden], once encoded
    # where a missing embedding is read when needed (decode recomputing a preempted prompt: the
    # node's embedding store); None: all are in `embeds`
    fetch: Callable[[str], torch.Tensor | None] | None = None
    # where `ready` runs those reads, off the caller's thread (decode's loop); None: `embedding` reads
    background: Executor | None = None
    pending: dict[int, Future] = field(default_factory=dict)    # span index -> its read in `background`

    @classmethod
    def of(cls, spans: list[ImageSpan], num_prompt_tokens: int, merge: int,
           embeds: list[torch.Tensor | None] | None = None,
           fetch: Callable[[str], torch.Tensor | None] | None = None,
           background: Executor | None = None) -> MultiModalPrompt:
        """An expanded prompt's images as stages pass them (spans), with its positions recomputed."""
        positions, delta = mrope_positions(num_prompt_tokens, spans, merge)
        return cls(list(spans), positions, delta, list(embeds) if embeds else [None] * len(spans), fetch, background)

    def embedding(self, i: int) -> torch.Tensor | None:
        if self.embeds[i] is None and self.fetch is not None:
            fut = self.pending.pop(i, None)
            self.embeds[i] = fut.result() if fut is not None else self.fetch(self.spans[i].hash)
            if self.embeds[i] is None:           # gone: not asked again
                self.fetch = None
        return self.embeds[i]

    def ready(self, start: int) -> bool:
        """Whether the embeddings of the images from token `start` on can be had without waiting:
        the missing ones start reading in `background` (a scheduler skips the sequence meanwhile)."""
        if self.fetch is None or self.background is None or start >= self.positions.shape[1]:
            return True                          # (past the prompt: every decode step of a text token)
        done = True
        for i, sp in enumerate(self.spans):
            if sp.start + sp.length > start and self.embeds[i] is None:
                fut = self.pending.get(i)
                if fut is None:
                    fut = self.pending[i] = self.background.submit(self.fetch, sp.hash)
                done = done and fut.done()
        return done

    def keys_for(self, start: int, end: int) -> tuple[str, ...]:
        return image_keys(self.spans, start, end)

    def position_rows(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of tokens [start, end) (prompt or generated)."""
        n = self.positions.shape[1]
        if end <= n:
            return self.positions[:, start:end]
        tail = torch.arange(max(start, n), end, dtype=torch.int64) + self.delta
        head = self.positions[:, start:n] if start < n else self.positions[:, :0]
        return torch.cat([head, tail.expand(3, -1)], dim=1)


def image_keys(spans: list[ImageSpan], start: int, end: int) -> tuple[str, ...]:
    """Hashes of the images with a placeholder in tokens [start, end): a block's extra keys, so the
    same tokens with another image never share cached K/V."""
    return tuple(s.hash for s in spans if s.start < end and s.start + s.length > start)


def expand_prompt(ids: list[int], image_token_id: int, images: list[ProcessedImage],
                  merge: int) -> tuple[list[int], MultiModalPrompt]:
    """Token ids with one placeholder per image -> ids with each placeholder repeated per embedding,
    and the images' spans and positions."""
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(at) != len(images):
        raise InvalidRequestError("image", f"{len(images)} image(s) for {len(at)} image placeholder(s) in the prompt")
    out: list[int] = []
    spans: list[ImageSpan] = []
    prev = 0
    for i, img in zip(at, images):
        out += ids[prev:i]
        spans.append(ImageSpan(len(out), img.num_tokens, img.hash, img.grid))
        out += [image_token_id] * img.num_tokens
        prev = i + 1
    out += ids[prev:]
    positions, delta = mrope_positions(len(out), spans, merge)
    return out, MultiModalPrompt(spans, positions, delta, [None] * len(spans))


def mrope_positions(num_tokens: int, spans: list[ImageSpan], merge: int) -> tuple[torch.Tensor, int]:
    """([3, num_tokens] positions, delta for the tokens after them)."""
    parts, pos, prev = [], 0, 0
    for s in spans:
        text = s.start - prev
        parts.append(torch.arange(pos, pos + text, dtype=torch.int64).expand(3, -1))
        pos += text
        t, h, w = s.grid
        gh, gw = h // merge, w // merge
        tt = torch.arange(t, dtype=torch.int64).view(-1, 1, 1).expand(t, gh, gw)
        hh = torch.arange(gh, dtype=torch.int64).view(1, -1, 1).expand(t, gh, gw)
        ww = torch.arange(gw, dtype=torch.int64).view(1, 1, -1).expand(t, gh, gw)
        parts.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos)
        pos += max(gh, gw)
        prev = s.start + s.length
    parts.append(torch.arange(pos, pos + num_tokens - prev, dtype=torch.int64).expand(3, -1))
    positions = torch.cat(parts, dim=1).contiguous()
    return positions, int(positions.max()) + 1 - num_tokens if num_tokens else 0
