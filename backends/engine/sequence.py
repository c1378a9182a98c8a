"""A request's state inside the engine."""

from __future__ import annotations

import itertools
from enum import Enum
from typing import TYPE_CHECKING

from ..kv.hashing import ROOT, hash_blocks, lora_keys
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from ..multimodal.prompt import MultiModalPrompt


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class TokenHistory:
    """A request's tokens and parameters: what sampling reads (penalties, bans), also of an earlier
    length of a sequence (a speculative step's draft rows)."""

    def __init__(self, token_ids: list[int], num_prompt_tokens: int, params: SamplingParams) -> None:
        self.token_ids, self.num_prompt_tokens, self.params = token_ids, num_prompt_tokens, params

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class Sequence(TokenHistory):
    _ids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, block_size: int,
                 request_id: str | None = None, extra_keys: tuple = (), mm: MultiModalPrompt | None = None,
                 lora: str = "") -> None:
        super().__init__(list(token_ids), len(token_ids), params)
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.block_size = block_size
        self.lora = lora                  # the LoRA adapter it runs with ("": the base model)
        # an adapter's K/V differs from the base model's: its blocks are cached under keys of their own
        self.extra_keys = extra_keys + lora_keys(lora)
        self.mm = mm                      # images in the prompt: their spans, embeddings, M-RoPE positions
        self.status = Status.WAITING
        self.num_computed_tokens = 0      # tokens whose K/V is in the pool
        self.num_cached_tokens = -1       # prompt tokens served from the prefix cache (-1: not yet admitted)
        self.num_published_blocks = 0     # full blocks already in the prefix index
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self._extend_hashes()
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.detok = None                 # Detokenizer when text is streamed or stop strings are set
        self.prefill_only = False         # ends after its first token, K/V handed on (kv.connector.HANDOFF)
        self.kv_transfer = None           # KV to adopt through the KV connector (decode: prefill's KVHandle)
        self.kv_handle = None             # the KVHandle a producer connector made when this sequence ended
        self.loading = False              # external K/V being loaded into its blocks: not stepped until in place
        self.cached_by_tier: list[int] | None = None   # cached prompt tokens per kv.tiers.TIER_NAMES
        self.num_reused_blocks = 0        # of those, leading blocks this pool already cached (not loaded)
        self.num_draft = 0                # speculative tokens at the end of token_ids, not yet verified
        self.spec_drafted = 0             # draft tokens verified for this request
        self.spec_accepted = 0            # of those, accepted
        self.spec_steps = 0               # target steps that verified drafts of it
        self.spec_w = 0.0                 # its verifying steps, each weight decaying per step (spec/adaptive.py)
        self.spec_sum = 0.0               # tokens they emitted, so weighted
        self.spec_sq = 0.0                # and their squares
        self.spec_idle = 0                # steps since it last drafted, once below the break-even
        self.spec_probes = 0              # probes it made below the break-even (each waits twice as long)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        if self.num_tokens % self.block_size == 0:
            self._extend_hashes()

    def drop_tail(self, n: int) -> None:
        """Remove the last n tokens (rejected or unscheduled drafts), and the hashes of blocks they filled."""
        if n > 0:
            del self.token_ids[-n:]
            del self.block_hashes[self.num_tokens // self.block_size:]

    def _extend_hashes(self) -> None:
        parent = self.block_hashes[-1] if self.block_hashes else ROOT
        start = len(self.block_hashes) * self.block_size
        # a block with an image's placeholders keys on that image
        self.block_hashes += hash_blocks(self.token_ids, self.block_size, self.extra_keys, parent, start,
                                         self.mm.keys_for if self.mm is not None else None)
