"""Offline API: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import EngineConfig, from_table
from .llm_engine import LLMEngine
from .sampling_params import SamplingParams


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    logprobs: list[float] = field(default_factory=list)
    cached_by_tier: list[int] = field(default_factory=list)   # cached prompt tokens per kv.tiers.TIER_NAMES
    num_draft_tokens: int = 0         # speculative decoding: draft tokens the target verified
    num_accepted_tokens: int = 0      # of those, accepted
    num_spec_steps: int = 0           # target steps that verified drafts of this request

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per target step while speculating (1 + accepted drafts per step)."""
        return 1.0 + self.num_accepted_tokens / self.num_spec_steps if self.num_spec_steps else 1.0


class LLM:
    def __init__(self, model: str | Path, *, weights: dict[str, torch.Tensor] | None = None,
                 **engine_args: Any) -> None:
        """engine_args: EngineConfig fields (an unknown one is an error naming it);
        `speculative_config` is the `speculative` table (spec/config.py). `weights`: a
        node's shared prepared tensors (loader.weight_store.attach) instead of loading the checkpoint."""
        if "speculative_config" in engine_args:   # vLLM's name for the table
            engine_args["speculative"] = engine_args.pop("speculative_config") or {}
        if engine_args.get("quantization", "") is None:    # vLLM's "not quantized"
            engine_args["quantization"] = ""
        config = from_table(EngineConfig, {"model": str(model)} | engine_args, "LLM()")
        if config.threads:                    # the offline API is an entry point: it sets what it needs
            torch.set_num_threads(config.threads)
        self.engine = LLMEngine(config, weights=weights)

    def generate(self, prompts: str | list[int] | dict | list[str] | list[list[int]] | list[dict],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 lora: str | list[str] | None = None) -> list[RequestOutput]:
        """A prompt is text, token ids, or (as in vLLM) {"prompt": text or "prompt_token_ids": ids,
        "multi_modal_data": {"image": an image or a list of them}}: one image per <|image_pad|>.
        lora: the LoRA adapter (a name in `lora_modules`) for every prompt, or one per prompt."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        loras = lora if isinstance(lora, list) else [lora or ""] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} LoRA names for {len(prompts)} prompts")
        eng = self.engine
        seqs = []
        try:
            for p, sp, name in zip(prompts, params_list, loras):
                if isinstance(p, dict):
                    images = (p.get("multi_modal_data") or {}).get("image") or []
                    images = images if isinstance(images, list) else [images]
                    seqs.append(eng.add_request(p.get("prompt", p.get("prompt_token_ids")), sp, images=images,
                                                lora=name or ""))
                else:
                    seqs.append(eng.add_request(p, sp, lora=name or ""))
            while eng.has_unfinished():
                eng.step()
                if eng.idle_step:         # every sequence waits for KV being loaded: don't spin
                    time.sleep(0.0005)
        except BaseException:
            for s in seqs:
                eng.abort(s.request_id)
            raise
        tok = eng.tokenizer
        return [
            RequestOutput(
                request_id=s.request_id,
                prompt_token_ids=s.token_ids[: s.num_prompt_tokens],
                token_ids=s.output_token_ids,
                text=s.detok.text if s.detok is not None else (tok.decode(s.output_token_ids) if tok else ""),
                finish_reason=s.finish_reason or "",
                num_cached_tokens=max(s.num_cached_tokens, 0),
                logprobs=s.logprobs,
                cached_by_tier=s.cached_by_tier or [max(s.num_cached_tokens, 0), 0, 0, 0],
                num_draft_tokens=s.spec_drafted, num_accepted_tokens=s.spec_accepted, num_spec_steps=s.spec_steps,
            )
            for s in seqs
        ]

    def close(self) -> None:
        self.engine.close()
