"""One typed message per hop between the stages, each carrying the request id that preprocess
assigns (it is in every response the client gets, and in stage logs):

  preprocess -> prefill      PrefillRequest   prompt token ids + sampling parameters (validated once, at preprocess)
  prefill    -> decode       KVHandle         the baton: token ids, KV block table, counts, RNG state
  decode     -> client       TokenDelta       new token ids, text delta, finish reason, usage
  decode stub <-> worker     AddRequest, Cancel, Stop / Ready, StepDeltas, Failed, Stats   (decode_worker)
  decode     -> draft        DraftCall        per sequence: the tokens verified since the last call
  draft      -> decode       DraftReply       up to k draft tokens per sequence

Between Triton models a message travels as the tensors named in serving.tensors (to_arrays /
from_arrays); between the decode stub and its worker process, pickled."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.errors import InvalidRequestError
from ..engine.sampling_params import SamplingParams
from ..engine.sequence import Sequence
from ..multimodal.image import ProcessedImage
from ..multimodal.prompt import ImageSpan, MultiModalPrompt


def _text(x: np.ndarray) -> str:
    v = x.reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else str(v)


def _string(s: str) -> np.ndarray:
    return np.asarray([s.encode()], dtype=object)


def _spans_arrays(images: list[ImageSpan]) -> dict[str, np.ndarray]:
    return {"image_spans": np.asarray([[s.start, s.length, *s.grid] for s in images], dtype=np.int64).reshape(-1, 5),
            "image_hashes": np.asarray([s.hash.encode() for s in images], dtype=object)}


def _spans(a: dict[str, np.ndarray]) -> list[ImageSpan]:
    if "image_spans" not in a:
        return []
    rows = a["image_spans"].astype(np.int64).reshape(-1, 5).tolist()
    hashes = [h.decode() if isinstance(h, bytes) else str(h) for h in a["image_hashes"].reshape(-1)]
    if len(hashes) != len(rows):
        raise ValueError(f"{len(rows)} image spans with {len(hashes)} hashes")
    return [ImageSpan(r[0], r[1], h, (r[2], r[3], r[4])) for r, h in zip(rows, hashes)]


def embed_mac(key: bytes, request_id: str, images: list[ImageSpan], source: str = "") -> bytes:
    """The embedding handle's signature: this node's (EPD: the cluster's) encoder stored these images'
    embeddings, in its node's store or at `source`."""
    h = hmac.new(key, b"baton embeddings\0" + request_id.encode() + b"\0" + source.encode(), digestmod=hashlib.sha256)
    for s in images:
        h.update(f"{s.start}:{s.length}:{s.grid}:{s.hash};".encode())
    return h.digest()


@dataclass
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]             # images' placeholders expanded (one per embedding)
    sampling: SamplingParams
    images: list[ImageSpan] = field(default_factory=list)
    image_data: list[bytes] = field(default_factory=list)   # each image as sent (encoded), until encoded
    embed_source: str = ""                  # an encode server's EmbeddingSource JSON ("": the node's store)
    embed_mac: bytes = b""                  # the embeddings exist: signed by encode (embed_mac())
    lora: str = ""                          # the LoRA adapter it runs with ("": the base model)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"input_ids": np.asarray(self.prompt_token_ids, dtype=np.int64),
                "request_id": _string(self.request_id), "sampling": _string(self.sampling.to_json()),
                **_spans_arrays(self.images), "image_data": np.asarray(self.image_data, dtype=object).reshape(-1),
                "embed_source": _string(self.embed_source),
                "embed_mac": np.frombuffer(self.embed_mac, dtype=np.uint8).copy(), "lora": _string(self.lora)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> PrefillRequest:
        data = [bytes(x) for x in a["image_data"].reshape(-1)] if "image_data" in a else []
        return cls(_text(a["request_id"]), a["input_ids"].astype(np.int64).tolist(),
                   SamplingParams.from_json(_text(a["sampling"])), _spans(a),
                   data,
                   _text(a["embed_source"]) if "embed_source" in a else "",
                   a["embed_mac"].astype(np.uint8).tobytes() if "embed_mac" in a else b"",
                   _text(a["lora"]) if "lora" in a else "")


def images_of(req: PrefillRequest) -> list[ProcessedImage]:
    """A request's images as the encoder takes them (their patches are made there)."""
    if len(req.image_data) != len(req.images):
        raise InvalidRequestError("image_data", f"{len(req.image_data)} images for {len(req.images)} image spans")
    return [ProcessedImage(d, s.grid, s.hash, s.length) for s, d in zip(req.images, req.image_data)]


@dataclass
class KVHandle:
    request_id: str
    token_ids: list[int]          # prompt + the first sampled token
    num_prompt_tokens: int
    num_computed_tokens: int      # tokens whose K/V are in the blocks
    block_table: list[int]        # blocks of the node's pool, owned by this request from now on
    num_cached_tokens: int
    finish_reason: str            # "" unless prefill already finished it (max_tokens=1, EOS, stop)
    sampling: SamplingParams
    logprobs: list[float] = field(default_factory=list)
    source: str = ""              # PD: where decode reads the blocks from (kv.transfer.BlockSource JSON); "": this node
    prefill_seconds: float = 0.0  # how long prefill computed the batch this request was in (the front's queue time)
    cached_by_tier: list[int] = field(default_factory=list)   # num_cached_tokens per kv.tiers.TIER_NAMES
    images: list[ImageSpan] = field(default_factory=list)     # the prompt's images (their positions, block keys)
    embed_source: str = ""        # where an encode server holds their embeddings (PrefillRequest.embed_source)
    lora: str = ""                # the LoRA adapter its K/V was computed with ("": the base model)
    mac: bytes = b""              # HMAC-SHA256 of the rest under the node's secret (sign / verify)

    def _digest(self, key: bytes) -> bytes:
        h = hmac.new(key, digestmod=hashlib.sha256)
        for name, arr in self.to_arrays().items():
            if name != "mac":
                data = b"".join(x for x in arr.reshape(-1)) if arr.dtype == object else arr.tobytes()
                h.update(f"{name}:{arr.dtype.str}:{arr.size}:{len(data)}:".encode())
                h.update(data)
        return h.digest()

    def sign(self, key: bytes) -> KVHandle:
        self.mac = self._digest(key)
        return self

    def verified(self, key: bytes) -> bool:
        """Whether this node's prefill made the handle exactly as it is (block ids included)."""
        return hmac.compare_digest(self.mac, self._digest(key))

    @classmethod
    def from_sequence(cls, seq: Sequence, finish_reason: str, block_table: list[int]) -> KVHandle:
        return cls(seq.request_id, list(seq.token_ids), seq.num_prompt_tokens, seq.num_computed_tokens,
                   list(block_table), max(seq.num_cached_tokens, 0), finish_reason, seq.params,
                   list(seq.logprobs), cached_by_tier=list(seq.cached_by_tier or []),
                   images=list(seq.mm.spans) if seq.mm is not None else [], lora=seq.lora)

    def to_sequence(self, block_size: int, merge: int = 2, fetch: Callable[[str], torch.Tensor | None] | None = None,
                    background: Executor | None = None) -> Sequence:
        """The sequence decode continues: prompt and first token (a seeded request's draws are keyed by
        position: engine.sampler.noise); its blocks come through the
        KV connector (seq.kv_transfer) when the scheduler admits it. A prompt with images gets its
        M-RoPE positions back (the vision tower's `merge`), and reads its images' embeddings through
        `fetch` (in `background`) if it is ever recomputed."""
        mm = MultiModalPrompt.of(self.images, self.num_prompt_tokens, merge, fetch=fetch, background=background) \
            if self.images else None
        seq = Sequence(self.token_ids[: self.num_prompt_tokens], self.sampling, block_size, self.request_id, mm=mm,
                       lora=self.lora)
        for t in self.token_ids[self.num_prompt_tokens:]:
            seq.append(t)
        seq.num_cached_tokens = self.num_cached_tokens
        seq.cached_by_tier = list(self.cached_by_tier) or None
        seq.logprobs = list(self.logprobs)
        seq.kv_transfer = self
        return seq

    # ---- Triton tensors (serving.tensors.HANDLE) ------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "request_id": _string(self.request_id),
            "token_ids": np.asarray(self.token_ids, dtype=np.int64),
            "num_prompt_tokens": np.asarray([self.num_prompt_tokens], dtype=np.int32),
            "num_computed_tokens": np.asarray([self.num_computed_tokens], dtype=np.int32),
            "block_table": np.asarray(self.block_table, dtype=np.int64),
            "num_cached_tokens": np.asarray([self.num_cached_tokens], dtype=np.int32),
            "finish_reason": _string(self.finish_reason),
            "sampling": _string(self.sampling.to_json()),
            "logprobs": np.asarray(self.logprobs, dtype=np.float32),
            "source": _string(self.source),
            "prefill_seconds": np.asarray([self.prefill_seconds], dtype=np.float32),
            "cached_by_tier": np.asarray(self.cached_by_tier, dtype=np.int32),
            **_spans_arrays(self.images),
            "embed_source": _string(self.embed_source),
            "lora": _string(self.lora),
            "mac": np.frombuffer(self.mac, dtype=np.uint8).copy() if self.mac else np.zeros(0, np.uint8),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> KVHandle:
        return cls(_text(a["request_id"]), a["token_ids"].astype(np.int64).tolist(),
                   int(a["num_prompt_tokens"].reshape(-1)[0]), int(a["num_computed_tokens"].reshape(-1)[0]),
                   a["block_table"].astype(np.int64).tolist(), int(a["num_cached_tokens"].reshape(-1)[0]),
                   _text(a["finish_reason"]), SamplingParams.from_json(_text(a["sampling"])),
                   a["logprobs"].astype(np.float32).tolist(),
                   _text(a["source"]), float(a["prefill_seconds"].reshape(-1)[0]),
                   a["cached_by_tier"].astype(np.int32).tolist(), _spans(a),
                   _text(a["embed_source"]) if "embed_source" in a else "", _text(a["lora"]) if "lora" in a else "",
                   a["mac"].astype(np.uint8).tobytes())


@dataclass
class DraftCall:
    """Sequences to draft for (spec/remote.py): each `key`'s verified tokens from position `start`
    on (what the draft stage does not hold yet, and the last one again), k drafts each; `release`:
    keys whose requests ended (their draft KV is freed)."""

    keys: list[int]
    starts: list[int]
    tokens: list[list[int]]
    k: int
    release: list[int] = field(default_factory=list)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"keys": np.asarray(self.keys, dtype=np.int64), "starts": np.asarray(self.starts, dtype=np.int64),
                "lengths": np.asarray([len(t) for t in self.tokens], dtype=np.int64),
                "tokens": np.asarray([x for t in self.tokens for x in t], dtype=np.int64),
                "k": np.asarray([self.k], dtype=np.int32), "release": np.asarray(self.release, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> DraftCall:
        lengths = a["lengths"].astype(np.int64).tolist()
        flat = a["tokens"].astype(np.int64).tolist()
        keys, starts = a["keys"].astype(np.int64).tolist(), a["starts"].astype(np.int64).tolist()
        if not (len(keys) == len(starts) == len(lengths)) or sum(lengths) != len(flat) or min(lengths, default=1) < 1:
            raise ValueError("draft call: keys, starts and lengths must have one entry per sequence, lengths >= 1 "
                             "summing to the number of tokens")
        tokens, r = [], 0
        for n in lengths:
            tokens.append(flat[r:r + n])
            r += n
        return cls(keys, starts, tokens, int(a["k"].reshape(-1)[0]), a["release"].astype(np.int64).tolist())


@dataclass
class DraftReply:
    """Per key: its drafts (possibly none) and how many of its verified tokens the draft stage now
    holds (the next call sends from there: 0 after the stage lost its state, e.g. restarted)."""

    drafts: list[list[int]]
    synced: list[int]

    def to_arrays(self, k: int) -> dict[str, np.ndarray]:
        padded = np.full((len(self.drafts), k), -1, dtype=np.int64)
        for i, d in enumerate(self.drafts):
            padded[i, :len(d)] = d
        return {"drafts": padded.reshape(-1), "synced": np.asarray(self.synced, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], k: int) -> DraftReply:
        synced = a["synced"].astype(np.int64).tolist()
        rows = a["drafts"].astype(np.int64).reshape(len(synced), k).tolist() if synced else []
        return cls([[t for t in r if t >= 0] for r in rows], synced)


@dataclass
class TokenDelta:
    """One streamed response: what is new since the last one, and the usage so far."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str            # "" until the last response
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[float] = field(default_factory=list)
    cached_tokens_by_tier: list[int] = field(default_factory=list)     # kv.tiers.TIER_NAMES order
    speculative_tokens: list[int] = field(default_factory=list)        # drafted, accepted, verify steps

    def merged_after(self, held: TokenDelta | None) -> TokenDelta:
        """This delta appended to one held back before it (usage and finish reason are the newest)."""
        if held is None:
            return self
        return TokenDelta(self.request_id, held.token_ids + self.token_ids, held.text + self.text,
                          self.finish_reason, self.prompt_tokens, self.completion_tokens, self.cached_tokens,
                          held.logprobs + self.logprobs, self.cached_tokens_by_tier, self.speculative_tokens)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """serving.tensors.STREAM, in its order."""
        return {
            "d_token_ids": np.asarray(self.token_ids, dtype=np.int64),
            "d_text": _string(self.text),
            "d_finish_reason": _string(self.finish_reason),
            "d_prompt_tokens": np.asarray([self.prompt_tokens], dtype=np.int32),
            "d_completion_tokens": np.asarray([self.completion_tokens], dtype=np.int32),
            "d_cached_tokens": np.asarray([self.cached_tokens], dtype=np.int32),
            "d_logprobs": np.asarray(self.logprobs, dtype=np.float32),
            "d_request_id": _string(self.request_id),
            "d_num_input_tokens": np.asarray([self.prompt_tokens], dtype=np.int32),
            "d_num_output_tokens": np.asarray([len(self.token_ids)], dtype=np.int32),
            "d_cached_tokens_by_tier": np.asarray(self.cached_tokens_by_tier or [self.cached_tokens, 0, 0, 0],
                                                  dtype=np.int32),
            "d_speculative_tokens": np.asarray(self.speculative_tokens or [0, 0, 0], dtype=np.int32),
        }


# A stream that fails ends with a delta whose finish reason says so and whose text is the message.
ERROR_REASONS = ("error", "unavailable")      # a server fault; the stage itself is gone


def error_delta(request_id: str, message: str, unavailable: bool = False) -> TokenDelta:
    return TokenDelta(request_id, [], message, ERROR_REASONS[1] if unavailable else ERROR_REASONS[0], 0, 0, 0)


# ---- decode stub <-> decode worker (pickled over a ZeroMQ pair; `key` names a request in the stub) --

@dataclass
class AddRequest:
    key: int
    handle: KVHandle


@dataclass
class Cancel:
    key: int


@dataclass
class Stop:
    pass


@dataclass
class Ready:
    pass


@dataclass
class StepDeltas:
    """Everything one engine step produced: (key, delta, final) per request that heard."""

    items: list[tuple[int, TokenDelta, bool]]


@dataclass
class Failed:
    key: int
    message: str


@dataclass
class Stats:
    values: dict[str, float]
