"""EngineConfig: every engine knob with its one default. `LLM(model, **kw)`, the serving stages and
the deployment profiles all build it; `from_table` checks a profile's table (an unknown key or a
wrong type is an error naming the key and the file)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration key is unknown or has the wrong type or value; the message names it."""


@dataclass(frozen=True)
class EngineConfig:
    model: str = ""                      # Hugging Face checkpoint directory
    dtype: str = "auto"                  # "auto" (the checkpoint's), bfloat16/bf16, float16/fp16, float32/fp32
    device: str = "cpu"                  # "cpu" or "cuda[:N]" (CUDA: the offline engine only, for now)
    block_size: int = 16                 # tokens per KV block
    num_blocks: int = 0                  # KV pool size; 0: as many as kv_cache_memory_mb holds
    kv_cache_memory_mb: int = 1024
    max_model_len: int = 0               # prompt + output tokens; 0: the model's max_position_embeddings, at most 8192
    max_num_seqs: int = 64               # sequences in one step
    max_num_batched_tokens: int = 0      # tokens per step (a prefill chunk's size); 0: 2048, or max_model_len unchunked
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    threads: int = 0                     # torch intra-op threads, set by the entry point (LLM, a stage); 0: torch's
    seed: int = 0                        # sampling seed of requests without their own
    pack_weights: bool = True            # oneDNN-pack bf16/fp16 linear weights on CPU (the fast GEMV path)
    # weights (kernels/linear.py select_linear_method): "int8" quantizes a float checkpoint's GEMM
    # weights and lm_head per channel at load; "" runs the checkpoint as it is, float or pre-quantized
    # (GPTQ, AWQ, compressed-tensors: loader/quantized.py), and naming that format checks it
    quantization: str = ""
    # KV cache storage: "auto" (the model's dtype), "int8" or "fp8" (e4m3; "fp8_e4m3" too), one fp32 scale
    # per (token, kv head) inside each block: 1.88x (head_dim 64) or 1.94x (128) the blocks of bf16
    kv_cache_dtype: Literal["auto", "int8", "fp8", "fp8_e4m3"] = "auto"
    # speculative decoding (spec/config.py SpeculativeConfig: method, num_speculative_tokens, model,
    # max_batch, ...); {}: off. Offline: LLM(model, speculative_config={...}) as in vLLM
    speculative: dict = dataclasses.field(default_factory=dict)
    # KV tiers below the pool (kv/tiers.py TiersConfig: host_mb, store, disk_dir, redis, write policies);
    # {}: the pool only
    kv_tiers: dict = dataclasses.field(default_factory=dict)
    # a multimodal checkpoint's vision tower: load it and encode images in this engine (monolithic);
    # false where images arrive already encoded (the prefill stage behind an `encode` stage)
    vision: bool = True
    # LoRA adapters (PEFT directories) a request may name, as vLLM's --lora-modules: {name: path};
    # each is loaded at start, beside the base weights (models/lora.py)
    lora_modules: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "EngineConfig")
        for name in ("block_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.speculative:
            from ..spec.config import SpeculativeConfig

            SpeculativeConfig.from_table(self.speculative)
        if self.kv_tiers:
            from ..kv.tiers import TiersConfig

            TiersConfig.from_table(self.kv_tiers)
        from baton.kernels.linear import QUANTIZATIONS

        if self.quantization and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization: unknown method {self.quantization!r}; known: "
                              f"{', '.join(QUANTIZATIONS)} (or \"\" for none)")
        for name, path in self.lora_modules.items():
            if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
                raise ConfigError(f"lora_modules: expected {{name: adapter directory}}, got {name!r}: {path!r}")
        for name in ("num_blocks", "kv_cache_memory_mb", "max_model_len", "max_num_batched_tokens", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")

    def resolved_max_model_len(self, max_position_embeddings: int) -> int:
        return self.max_model_len or min(max_position_embeddings, 8192)

    def resolved_token_budget(self, max_model_len: int) -> int:
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return 2048 if self.enable_chunked_prefill else max(2048, max_model_len)

    def replace(self, **changes: Any) -> EngineConfig:
        return from_table(EngineConfig, dataclasses.asdict(self) | changes, "EngineConfig")


def check_types(obj: object, where: str) -> None:
    """Each field of a dataclass instance against its annotation (int, float, bool, str, Literal, unions)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{f.name}: expected {_describe(hints[f.name])}, got {value!r} (in {where})")


def from_table(cls: type[C], table: dict[str, Any], where: str) -> C:
    """cls(**table), refusing keys cls does not have; types are checked by cls itself."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; known: {sorted(known)}")
    try:
        return cls(**table)
    except ConfigError as e:
        raise ConfigError(f"{e} in {where}" if where not in str(e) else str(e)) from None


def _matches(value: object, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))
