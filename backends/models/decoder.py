"""Decoder-only transformer for Llama / Qwen2 / Qwen3 checkpoints on flat token batches with paged KV.

The families differ only by flags in ModelConfig (q/k/v bias, q/k RMSNorm, rope scaling). Weights
are fused at load (q|k|v and gate|up) so each layer runs 4 GEMMs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baton.kernels import (
    AttentionBatch, LinearWeight, RotaryCache, add_rms_norm, linear, paged_attention, qk_norm_rope_, rms_norm,
    silu_and_mul,
)

from ..loader.safetensors_loader import take
from .config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: LinearWeight
    qk_norm: torch.Tensor | None   # [Hq + Hkv, D]: q_norm repeated per q head, then k_norm per kv head
    o: LinearWeight
    post_norm: torch.Tensor
    gate_up: LinearWeight
    down: LinearWeight


class DecoderLM:
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], max_positions: int) -> None:
        self.cfg = cfg
        self.layers = [self._layer(cfg, state, f"model.layers.{i}.") for i in range(cfg.num_layers)]
        self.embed = take(state, "model.embed_tokens.weight")
        self.norm = take(state, "model.norm.weight")
        head = state.pop("lm_head.weight", None)
        if head is None:
            if not cfg.tie_word_embeddings:
                raise ValueError("checkpoint is missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
            head = self.embed
        self.lm_head = LinearWeight(head)
        self.rope = RotaryCache(cfg.rope_inv_freq(), max_positions, self.embed.dtype)
        self.scale = cfg.head_dim ** -0.5

    @staticmethod
    def _layer(cfg: ModelConfig, st: dict[str, torch.Tensor], p: str) -> LayerWeights:
        a, m = p + "self_attn.", p + "mlp."
        qkv_w = torch.cat([take(st, a + f"{n}_proj.weight") for n in "qkv"])
        qkv_b = torch.cat([take(st, a + f"{n}_proj.bias") for n in "qkv"]) if cfg.qkv_bias else None
        qk_norm = None
        if cfg.qk_norm:
            qn, kn = take(st, a + "q_norm.weight"), take(st, a + "k_norm.weight")
            qk_norm = torch.cat([qn.expand(cfg.num_heads, -1), kn.expand(cfg.num_kv_heads, -1)]).contiguous()
        gate_up = torch.cat([take(st, m + "gate_proj.weight"), take(st, m + "up_proj.weight")])
        gu_b = down_b = None
        if cfg.mlp_bias:
            gu_b = torch.cat([take(st, m + "gate_proj.bias"), take(st, m + "up_proj.bias")])
            down_b = take(st, m + "down_proj.bias")
        return LayerWeights(
            input_norm=take(st, p + "input_layernorm.weight"),
            qkv=LinearWeight(qkv_w, qkv_b),
            qk_norm=qk_norm,
            o=LinearWeight(take(st, a + "o_proj.weight"), take(st, a + "o_proj.bias") if cfg.o_bias else None),
            post_norm=take(st, p + "post_attention_layernorm.weight"),
            gate_up=LinearWeight(gate_up, gu_b),
            down=LinearWeight(take(st, m + "down_proj.weight"), down_b),
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids/positions: [T] -> final-normed hidden states [T, hidden]."""
        cfg = self.cfg
        T, H, KV, D, eps = input_ids.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        h = F.embedding(input_ids, self.embed)
        residual = h
        x = rms_norm(h, self.layers[0].input_norm, eps)
        for i, L in enumerate(self.layers):
            if i:
                x, residual = add_rms_norm(h, residual, L.input_norm, eps)
            qkv = linear(x, L.qkv).view(T, H + 2 * KV, D)
            qk_norm_rope_(qkv[:, : H + KV], L.qk_norm, positions, self.rope, eps)
            k_cache, v_cache = kv_layers[i]
            o = paged_attention(qkv[:, :H], qkv[:, H:H + KV], qkv[:, H + KV:], k_cache, v_cache, batch, self.scale)
            h = linear(o.view(T, H * D), L.o)
            x, residual = add_rms_norm(h, residual, L.post_norm, eps)
            h = linear(silu_and_mul(linear(x, L.gate_up)), L.down)
        x, _ = add_rms_norm(h, residual, self.norm, eps)
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()
