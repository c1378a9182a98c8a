"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .errors import InvalidRequestError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                   # -1 or 0 = off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0   # on prompt + output tokens (transformers/vLLM convention)
    presence_penalty: float = 0.0     # on output tokens
    frequency_penalty: float = 0.0    # on output tokens
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)   # stop strings (not included in the output)
    ignore_eos: bool = False
    logprobs: bool = False            # return the logprob of each chosen token
    min_tokens: int = 0               # EOS and stop_token_ids cannot be sampled before this many tokens
    bad_words_token_ids: list[list[int]] = field(default_factory=list)   # token sequences never generated

    def __post_init__(self) -> None:
        def num(name: str, integer: bool = False) -> float:
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok:
                raise InvalidRequestError(name, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
            if not math.isfinite(v):             # NaN compares false with every bound
                raise InvalidRequestError(name, f"must be finite, got {v!r}")
            return v

        if num("max_tokens", True) < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if num("temperature") < 0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < num("top_p") <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if num("top_k", True) < -1:
            raise InvalidRequestError("top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= num("min_p") <= 1:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p}")
        if num("repetition_penalty") <= 0:
            raise InvalidRequestError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= num(name) <= 2:
                raise InvalidRequestError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None:
            num("seed", True)
        if not 0 <= num("min_tokens", True) <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not all(isinstance(w, list) and w and all(isinstance(t, int) and t >= 0 for t in w)
                   for w in self.bad_words_token_ids):
            raise InvalidRequestError("bad_words", f"must be non-empty token id lists, got {self.bad_words_token_ids!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(x, str) and x for x in self.stop):
            raise InvalidRequestError("stop", f"must be non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids!r}")

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> SamplingParams:
        """Parameters validated where the request entered (preprocess) and carried between stages:
        rebuilt without checking them again."""
        params = object.__new__(cls)
        params.__dict__.update(json.loads(text))
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def has_bans(self) -> bool:
        """Tokens are masked out depending on the output so far (min_tokens, bad_words)."""
        return self.min_tokens > 0 or bool(self.bad_words_token_ids)
