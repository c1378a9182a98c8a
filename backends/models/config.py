"""Model shape and family flags, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# HF architecture name -> family. Families differ only by flags below (qkv bias, q/k norm).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2_5_VLForConditionalGeneration": "qwen2",     # its language model; the vision tower: models/vision.py
}


class ModelConfigError(ValueError):
    """The checkpoint directory or its config.json cannot be served."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    torch_dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # multimodal (Qwen2.5-VL): the rotary frequencies split between (temporal, height, width) positions,
    # the placeholder token one image embedding replaces, and the vision tower's config.json section
    mrope_section: tuple[int, ...] = ()
    image_token_id: int | None = None
    vision_config: dict | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir)
        if not path.is_dir():
            raise ModelConfigError(f"model directory not found: {str(model_dir)!r}")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelConfigError(f"no config.json in model directory {str(model_dir)!r}")
        cfg = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_hf_dict(cfg, gen)

    @classmethod
    def from_hf_dict(cls, cfg: dict, gen: dict | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            raise ModelConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(ARCHITECTURES)}"
            )
        vision = cfg.get("vision_config") if family == "qwen2" and "vision_config" in cfg else None
        if isinstance(cfg.get("text_config"), dict):    # transformers >= 5 nests the language model's settings
            cfg = {**cfg, **cfg["text_config"]}
        if cfg.get("use_sliding_window"):
            raise ModelConfigError("use_sliding_window=true is not supported (full attention only)")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ModelConfigError(f"num_attention_heads={heads} not a multiple of num_key_value_heads={kv_heads}")
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        # transformers >= 5 may fold theta/scaling into `rope_parameters`.
        params = cfg.get("rope_parameters")
        if isinstance(params, dict):
            rope_theta = rope_theta or params.get("rope_theta")
            if params.get("rope_type", "default") != "default" and rope_scaling is None:
                rope_scaling = params
        mrope = tuple((rope_scaling or {}).get("mrope_section") or (params or {}).get("mrope_section") or ())
        if vision is not None and not mrope:
            raise ModelConfigError("a Qwen2.5-VL config needs rope_scaling.mrope_section")
        if mrope and sum(mrope) * 2 != head_dim:
            raise ModelConfigError(f"mrope_section {list(mrope)} must cover head_dim/2 = {head_dim // 2} frequencies")
        if rope_scaling is not None and (rope_scaling.get("rope_type") or rope_scaling.get("type")) == "mrope":
            rope_scaling = None          # old configs name M-RoPE as a scaling type; its frequencies are default
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type") or rope_scaling.get("type")
            if kind not in ("default", "llama3", "linear"):
                raise ModelConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
            if kind == "default":
                rope_scaling = None
        dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        eos = (gen or {}).get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else bias,
            o_bias=bias if family == "llama" else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            torch_dtype=getattr(torch, dtype_name) if isinstance(dtype_name, str) else torch.float32,
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            mrope_section=mrope,
            image_token_id=cfg.get("image_token_id") if vision is not None else None,
            vision_config=vision,
        )

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies (fp32), with Llama-3 / linear scaling applied as transformers does."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.rope_scaling
        if s is None:
            return inv
        kind = s.get("rope_type") or s.get("type")
        if kind == "linear":
            return inv / float(s["factor"])
        # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        return torch.where(medium, blended, scaled)
