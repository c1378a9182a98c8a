"""The baton passed from prefill to decode: a sequence's token ids, its KV block table (block ids
in the node's shared pool: the KV data itself never moves) and the sampling state. Serializes to
the plain tensors Triton carries between the two models."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.sampling_params import SamplingParams
from ..engine.sequence import Sequence


@dataclass
class KVHandle:
    token_ids: list[int]          # prompt + the first sampled token
    num_prompt_tokens: int
    num_computed_tokens: int      # tokens whose K/V are in the blocks
    block_table: list[int]
    num_cached_tokens: int
    finish_reason: str            # "" unless prefill already finished it (max_tokens=1, EOS, stop)
    sampling: str                 # SamplingParams as JSON
    gen_state: bytes = b""        # torch.Generator state of a seeded request
    logprobs: tuple[float, ...] = ()

    @classmethod
    def from_sequence(cls, seq: Sequence) -> KVHandle:
        return cls(list(seq.token_ids), seq.num_prompt_tokens, seq.num_computed_tokens, list(seq.block_table),
                   max(seq.num_cached_tokens, 0), seq.finish_reason or "", json.dumps(seq.params.__dict__),
                   bytes(seq.generator.get_state().numpy()) if seq.generator is not None else b"",
                   tuple(seq.logprobs))

    def to_sequence(self, block_size: int, request_id: str) -> Sequence:
        params = SamplingParams(**json.loads(self.sampling))
        seq = Sequence(self.token_ids[: self.num_prompt_tokens], params, block_size, request_id)
        for t in self.token_ids[self.num_prompt_tokens:]:
            seq.append(t)
        seq.num_computed_tokens = self.num_computed_tokens
        seq.num_published_blocks = self.num_computed_tokens // block_size
        seq.block_table = list(self.block_table)
        seq.num_cached_tokens = self.num_cached_tokens
        seq.logprobs = list(self.logprobs)
        if self.gen_state:
            seq.generator = torch.Generator()
            seq.generator.set_state(torch.frombuffer(bytearray(self.gen_state), dtype=torch.uint8))
        return seq

    # ---- Triton tensors -----------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "token_ids": np.asarray(self.token_ids, dtype=np.int64),
            "num_prompt_tokens": np.asarray([self.num_prompt_tokens], dtype=np.int32),
            "num_computed_tokens": np.asarray([self.num_computed_tokens], dtype=np.int32),
            "block_table": np.asarray(self.block_table, dtype=np.int64),
            "num_cached_tokens": np.asarray([self.num_cached_tokens], dtype=np.int32),
            "finish_reason": np.asarray([self.finish_reason.encode()], dtype=object),
            "sampling": np.asarray([self.sampling.encode()], dtype=object),
            "gen_state": np.frombuffer(self.gen_state, dtype=np.uint8).copy() if self.gen_state else np.zeros(0, np.uint8),
            "logprobs": np.asarray(self.logprobs, dtype=np.float32),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> KVHandle:
        def text(x: np.ndarray) -> str:
            v = x.reshape(-1)[0]
            return v.decode() if isinstance(v, bytes) else str(v)

        return cls(a["token_ids"].astype(np.int64).tolist(), int(a["num_prompt_tokens"].reshape(-1)[0]),
                   int(a["num_computed_tokens"].reshape(-1)[0]), a["block_table"].astype(np.int64).tolist(),
                   int(a["num_cached_tokens"].reshape(-1)[0]), text(a["finish_reason"]), text(a["sampling"]),
                   a["gen_state"].astype(np.uint8).tobytes(), tuple(a["logprobs"].astype(np.float32).tolist()))
