"""What the stages share: parameters from config.pbtxt, and building an engine on the node's pool."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..engine.llm_engine import LLMEngine
from ..kv.manager import RemoteBlockManager
from ..kv.pool import KVPool
from ..loader import weight_store
from .cores import CoreShare


@dataclass
class StageParams:
    model_dir: str
    dtype: str = "auto"
    max_model_len: int = 4096
    max_tokens_limit: int = 4096
    kv_pool: str = ""
    kv_address: str = ""
    max_num_seqs: int = 64
    threads: int = 0
    weights: str = ""              # name of the node's shared weight file ("" = load the checkpoint)
    run_dir: str = "/tmp"          # the node's run directory (sockets, logs)
    share_cores: int = 0           # prefill and decode share this many threads by load (0 = `threads` each)
    share_cores_policy: str = "fair"   # or "prefill_first" (stages/cores.py)
    prefill_chunk_tokens: int = 0      # the prefill engine's token budget per step (0 = the engine's default)
    stream_responses_per_step: int = 0   # decode coalesces tokens above this many responses a step (0 = never)

    @classmethod
    def from_model_config(cls, model_config: str | dict) -> StageParams:
        cfg = json.loads(model_config) if isinstance(model_config, str) else model_config
        raw = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        kw = {}
        for name, field in cls.__dataclass_fields__.items():
            if name in raw and raw[name] != "":
                kw[name] = int(raw[name]) if field.type == "int" else raw[name]
        return cls(**kw)


def node_engine(p: StageParams, stage: str = "decode") -> LLMEngine:
    """An engine on the node's shared pool (blocks allocated through the KV manager) and, when the
    node published them, its shared weights. The prefill stage's steps are capped at
    `prefill_chunk_tokens` (a long prompt runs in chunks, between which decode can step)."""
    pool = KVPool.attach(p.kv_pool)
    bm = RemoteBlockManager(p.kv_address, pool.spec.num_blocks, pool.spec.block_size)
    weights = weight_store.attach(p.weights) if p.weights else None
    return LLMEngine(p.model_dir, dtype=p.dtype, block_size=pool.spec.block_size, max_model_len=p.max_model_len,
                     max_num_seqs=p.max_num_seqs, num_threads=p.threads or None, pool=pool, block_manager=bm,
                     max_num_batched_tokens=(p.prefill_chunk_tokens or None) if stage == "prefill" else None,
                     weights=weights, pack_weights=weights is None)   # shared weights: no private copy


def core_share(p: StageParams, stage: str) -> CoreShare | None:
    return CoreShare(f"{p.run_dir}/cores", stage, p.share_cores, p.share_cores_policy) if p.share_cores else None
