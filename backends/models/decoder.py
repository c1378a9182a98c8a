"""Decoder-only transformer for Llama / Qwen2 / Qwen3 checkpoints on flat token batches with paged KV.

The families differ only by flags in ModelConfig (q/k/v bias, q/k RMSNorm, rope scaling). Weights
are fused at load (q|k|v and gate|up) so each layer runs 4 GEMMs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from baton.kernels import (
    AttentionBatch, LinearWeight, RotaryCache, add_rms_norm, linear, paged_attention, qk_norm_rope_, rms_norm,
    silu_and_mul,
)
from baton.kernels.int4_linear import Int4Data, Int4Packed
from baton.kernels.int8_linear import Int8Weight
from baton.kernels.linear import Linear, LinearMethod, StoredWeight
from baton.kernels.quant import Int4Weight

from ..loader.quantized import RAW_SUFFIXES, QuantConfig, read_linear
from ..loader.safetensors_loader import load_state_dict, take
from .config import ModelConfig
from .lora import LoRABatch

Checkpoint = torch.Tensor | Int4Data | Int8Weight     # a linear weight as prepare_weights gives it


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    qk_norm: torch.Tensor | None   # [Hq + Hkv, D]: q_norm repeated per q head, then k_norm per kv head
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


def _fuse(parts: list[Checkpoint], name: str) -> Checkpoint:
    """Projections that share their input, stacked along the output dimension (one GEMM)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)                                        # type: ignore[arg-type]
    if all(isinstance(p, Int4Data) for p in parts):
        return Int4Data.cat(parts, name)                               # type: ignore[arg-type]
    if all(isinstance(p, Int8Weight) and not p.packed for p in parts):
        q = torch.cat([p.qweight for p in parts])                      # type: ignore[union-attr]
        return Int8Weight(q, torch.cat([p.scale for p in parts]), tuple(q.shape), False)  # type: ignore[union-attr]
    raise ValueError(f"{name}: its projections are stored in different forms (some quantized, some not)")


def load_weights(cfg: ModelConfig, model_dir: str | Path, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> dict[str, Checkpoint]:
    """A checkpoint directory -> prepare_weights' output (a pre-quantized one read as `quant` says)."""
    return prepare_weights(cfg, load_state_dict(model_dir, dtype, RAW_SUFFIXES if quant else ()), quant)


def prepare_weights(cfg: ModelConfig, state: dict[str, torch.Tensor],
                    quant: QuantConfig | None = None) -> dict[str, Checkpoint]:
    """Checkpoint tensors -> the fused tensors the model runs on (q|k|v, gate|up, stacked q/k norms),
    under flat names. This is what a node publishes once in shared memory for all its stages. A
    pre-quantized checkpoint's linears come out as its quantized data (Int4Data / Int8Weight)."""
    H, KV, D, hidden, inter = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size

    def lin(prefix: str, n: int, k: int) -> Checkpoint:
        if quant is not None and quant.quantized(prefix):
            return read_linear(state, prefix, n, k, quant)
        return take(state, prefix + ".weight")

    out: dict[str, Checkpoint] = {}
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        out[o + "qkv.weight"] = _fuse([lin(a + f"{n}_proj", r * D, hidden) for n, r in zip("qkv", (H, KV, KV))],
                                      a + "q|k|v_proj")
        if cfg.qkv_bias:
            out[o + "qkv.bias"] = torch.cat([take(state, a + f"{n}_proj.bias") for n in "qkv"])
        if cfg.qk_norm:
            qn, kn = take(state, a + "q_norm.weight"), take(state, a + "k_norm.weight")
            out[o + "qk_norm"] = torch.cat([qn.expand(cfg.num_heads, -1), kn.expand(cfg.num_kv_heads, -1)]).contiguous()
        out[o + "o.weight"] = lin(a + "o_proj", hidden, H * D)
        if cfg.o_bias:
            out[o + "o.bias"] = take(state, a + "o_proj.bias")
        out[o + "gate_up.weight"] = _fuse([lin(m + "gate_proj", inter, hidden), lin(m + "up_proj", inter, hidden)],
                                          m + "gate|up_proj")
        out[o + "down.weight"] = lin(m + "down_proj", hidden, inter)
        if cfg.mlp_bias:
            out[o + "gate_up.bias"] = torch.cat([take(state, m + "gate_proj.bias"), take(state, m + "up_proj.bias")])
            out[o + "down.bias"] = take(state, m + "down_proj.bias")
        out[o + "input_norm"] = take(state, p + "input_layernorm.weight")
        out[o + "post_norm"] = take(state, p + "post_attention_layernorm.weight")
    out["embed"] = take(state, "model.embed_tokens.weight")
    out["norm"] = take(state, "model.norm.weight")
    if quant is not None and quant.lm_head:          # GPTQ lm_head=true: the head is a quantized linear too
        out["lm_head"] = read_linear(state, "lm_head", cfg.vocab_size, hidden, quant)
        return out
    if any(k.startswith("lm_head.") and k != "lm_head.weight" for k in state):
        raise ValueError("the checkpoint's lm_head is stored quantized, but its quantization config does not say "
                         "so (GPTQ: lm_head=true)")
    head = state.pop("lm_head.weight", None)
    if head is None and not cfg.tie_word_embeddings:
        raise ValueError("checkpoint is missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
    if head is not None:
        out["lm_head"] = head
    return out


LINEARS = ("qkv", "o", "gate_up", "down")
_NO_NORM = torch.empty(0, dtype=torch.bfloat16)     # the fused decode step's "no final norm"


def _quantized(w: object) -> bool:
    """A checkpoint's 4-bit lm_head (GPTQ lm_head=true): the layers' method runs it, not the head's."""
    return isinstance(w, (Int4Data, Int4Packed, Int4Weight))


def process_linears(cfg: ModelConfig, weights: dict[str, Checkpoint], method: LinearMethod) -> dict[str, StoredWeight]:
    """prepare_weights' output with every GEMM weight in the form `method` stores it (oneDNN-packed
    bytes, int8), for a node to publish: stages then run on the shared copy. The lm_head is processed
    by `method.head`; a tied one gets its own processed copy unless that method keeps weights as they
    are (the embedding stays plain for the lookup). Consumes `weights`: each input tensor is dropped as soon as it is
    processed, so this never holds two copies of the model."""
    out: dict[str, StoredWeight] = {}
    for i in range(cfg.num_layers):
        for n in LINEARS:
            name = f"layers.{i}.{n}.weight"
            out[name] = method.process(weights.pop(name))
    if "lm_head" in weights:
        head = weights.pop("lm_head")
        out["lm_head"] = (method if _quantized(head) else method.head).process(head)
    else:
        head = method.head.process(weights["embed"])
        if head is not weights["embed"]:
            out["lm_head"] = head
    out.update(weights)
    weights.clear()
    return out


class DecoderLM:
    def __init__(self, cfg: ModelConfig, weights: dict[str, StoredWeight] | dict[str, Checkpoint],
                 max_positions: int,
                 method: LinearMethod, final_norm: bool = True) -> None:
        """`weights` from prepare_weights or process_linears (possibly views into a node's shared
        weight file); `method` wraps each linear weight (and processes plain ones it is given).
        final_norm=False: the output is the last layer's residual stream (an EAGLE head's predicted
        feature, which the target's lm_head reads as it is)."""
        self.cfg = cfg
        self.method = method
        w = weights

        def lin(name: str) -> Linear:
            return method.create(w[name + ".weight"], w.get(name + ".bias"))

        self.layers = [
            LayerWeights(input_norm=w[f"layers.{i}.input_norm"], qkv=lin(f"layers.{i}.qkv"),
                         qk_norm=w.get(f"layers.{i}.qk_norm"), o=lin(f"layers.{i}.o"),
                         post_norm=w[f"layers.{i}.post_norm"], gate_up=lin(f"layers.{i}.gate_up"),
                         down=lin(f"layers.{i}.down"))
            for i in range(cfg.num_layers)
        ]
        self.embed = w["embed"]
        self.norm = w["norm"] if final_norm else None
        head = w.get("lm_head", self.embed)
        self.lm_head = (method if _quantized(head) else method.head).create(head)
        # the plain tensor lm_head rows can be cut from (None: an untied head stored processed). A
        # tied head's rows are the embedding's, also when a node publishes it processed (oneDNN-packed)
        head = w.get("lm_head")
        self._head_rows_of = self.embed if head is None or cfg.tie_word_embeddings else \
            head if isinstance(head, torch.Tensor) else None
        self.rope = RotaryCache(cfg.rope_inv_freq(), max_positions, self.embed.dtype, str(self.embed.device))
        self.scale = cfg.head_dim ** -0.5
        self._fused = self._fused_decode_args()
        # called between two layers of an op-by-op forward: a prefill process lets a waiting decode
        # step of the same cores in (stages/cores.py CoreShare.between_layers)
        self.between_layers: Callable[[], None] | None = None

    def _fused_decode_args(self) -> tuple[list, list] | None:
        """Per-layer tensors for the C++ decode step (decode_forward_bf16): the fast path the weight
        method offers when every GEMM runs one of its kernels (bf16 or int8, on packed bytes); None
        otherwise (the step then runs op by op)."""
        if self.embed.dtype != torch.bfloat16:
            return None
        w, opt = [], []
        for L in self.layers:
            fw = [self.method.fused_decode_weight(lw) for lw in (L.qkv, L.o, L.gate_up, L.down)]
            if any(f is None for f in fw):
                return None
            (qkv, s0, p0), (o, s1, p1), (gate_up, s2, p2), (down, s3, p3) = fw   # type: ignore[misc]
            w += [L.input_norm, qkv, o, L.post_norm, gate_up, down]
            opt += [L.qkv.bias, L.qk_norm, L.o.bias, L.gate_up.bias, L.down.bias, s0, s1, s2, s3, p0, p1, p2, p3]
        return w, opt

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, batch: AttentionBatch,
                kv_layers: list[tuple[torch.Tensor, ...]],
                inputs_embeds: torch.Tensor | None = None, lora: LoRABatch | None = None) -> torch.Tensor:
        """Token ids [T], or their embeddings [T, hidden] (inputs_embeds: e.g. with visual features
        spliced in), at explicit positions [T] (or [3, T] for M-RoPE) -> final-normed hidden states [T, hidden]. kv_layers: per
        layer its K and V caches, and their scales when the cache is INT8/FP8 (KVPool.layers).
        lora: the LoRA adapters of the batch's rows (models/lora.py); None: the base model only."""
        cfg = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = F.embedding(input_ids, self.embed) if inputs_embeds is None else inputs_embeds.to(self.embed.dtype)
        T, H, KV, D, eps = h.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        rope = self.rope
        if positions.dim() == 2:             # [3, T] M-RoPE positions: per-token tables, looked up in order
            rope = rope.mrope_rows(positions, cfg.mrope_section)
            positions = torch.arange(T, device=positions.device)
        if self._fused is not None and batch.prefill is None and batch.decode is not None and lora is None:
            # all decodes: the same kernels in one C++ call (bit-identical, no per-op Python)
            d = batch.decode
            return torch.ops.baton_cpu.decode_forward_bf16(
                h, positions, self._fused[0], self._fused[1], [t for kv in kv_layers for t in kv], d.block_tables,
                d.context_lens, batch.slot_blocks, batch.slot_offsets, rope.cos, rope.sin_signed,
                self.norm if self.norm is not None else _NO_NORM,
                H, KV, D, cfg.intermediate_size, eps, self.scale)
        residual = h
        x = rms_norm(h, self.layers[0].input_norm, eps)
        for i, L in enumerate(self.layers):
            if i:
                if self.between_layers is not None:
                    self.between_layers()
                x, residual = add_rms_norm(h, residual, L.input_norm, eps)
            qkv = self._linear(x, L.qkv, lora, i, "qkv").view(T, H + 2 * KV, D)
            qk_norm_rope_(qkv[:, : H + KV], L.qk_norm, positions, rope, eps)
            k_cache, v_cache, *scales = kv_layers[i]
            o = paged_attention(qkv[:, :H], qkv[:, H:H + KV], qkv[:, H + KV:], k_cache, v_cache, batch, self.scale,
                                *scales)
            h = self._linear(o.view(T, H * D), L.o, lora, i, "o")
            x, residual = add_rms_norm(h, residual, L.post_norm, eps)
            h = self._linear(silu_and_mul(self._linear(x, L.gate_up, lora, i, "gate_up")), L.down, lora, i, "down")
        if self.norm is None:
            return h + residual
        x, _ = add_rms_norm(h, residual, self.norm, eps)
        return x

    @staticmethod
    def _linear(x: torch.Tensor, w: Linear, lora: LoRABatch | None, layer: int, name: str) -> torch.Tensor:
        y = linear(x, w)
        return y if lora is None else lora.add_(y, x, layer, name)

    def head_over(self, n: int) -> Linear | None:
        """An lm_head over the first n token ids only (a drafter's vocabulary: spec/config.py
        draft_vocab), or None when it cannot be cut (n covers the vocabulary, or the head is stored
        processed)."""
        if self._head_rows_of is None or not 0 < n < self._head_rows_of.shape[0]:
            return None
        return self.method.head.create(self.method.head.process(self._head_rows_of[:n].contiguous()))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None,
               head: Linear | None = None) -> torch.Tensor:
        """fp32 logits of the given rows of `hidden` (every row when None): a sequence's last row to
        sample from, or k+1 rows of one sequence to verify k draft tokens; `head`: a head_over()."""
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return linear(hidden, head or self.lm_head).float()
