"""Draft heads that ride on a target model's final hidden states ("features": the normed hidden
state the target's lm_head reads), and their on-disk formats.

Medusa (Cai et al. 2024; FasterDecoding/Medusa): head k (0-based) maps the feature at position t
through `medusa_num_layers` residual blocks `x + SiLU(W x + b)` to logits for token t+k+2.
Files: `config.json` {medusa_num_heads, medusa_num_layers, hidden_size, vocab_size,
base_model_name_or_path, tie_lm_head} and `model.safetensors` with Medusa's key names
`{k}.{j}.linear.weight|bias`. Medusa also stores a per-head vocabulary projection `{k}.{L}.weight`;
with `tie_lm_head: true` (ours, to stay small) the heads use the target's lm_head instead and that key
is absent.

EAGLE (Li et al. 2024; SafeAILab/EAGLE, EAGLE-1 layout): predicts the target's next feature from
(embedding of token t+1, feature t): `fc` (2h -> h, bias) over concat(embedding, feature), then one
decoder layer of the target's architecture (causal, rotary). The predicted feature goes through the
target's lm_head. Files: `config.json` (the target's config with num_hidden_layers=1 and
`architectures: ["EagleQwen3"]`) and `model.safetensors` with `fc.weight`, `fc.bias` and
`layers.0.*` named as in the target (embeddings and lm_head come from the target). Unlike EAGLE-1,
layer 0 keeps its input_layernorm.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)   # starts as identity: head k begins as the target's head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, hidden: int, num_heads: int = 4, num_layers: int = 1) -> None:
        super().__init__()
        self.num_heads, self.num_layers = num_heads, num_layers
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)]) for _ in range(num_heads))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[..., h] -> [num_heads, ..., h]; apply the target's lm_head for logits."""
        return torch.stack([head(features) for head in self.heads])

    def save(self, out: Path, vocab_size: int, base: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        hidden = self.heads[0][0].linear.in_features
        state = {f"{k}.{key}": v.detach().to(torch.bfloat16).contiguous()
                 for k, head in enumerate(self.heads) for key, v in head.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = {"architectures": ["MedusaModel"], "medusa_num_heads": self.num_heads,
               "medusa_num_layers": self.num_layers, "hidden_size": hidden, "vocab_size": vocab_size,
               "base_model_name_or_path": base, "tie_lm_head": True}
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MedusaHeads:
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        heads = cls(cfg["hidden_size"], cfg["medusa_num_heads"], cfg["medusa_num_layers"])
        state = load_file(str(path / "model.safetensors"))
        heads.heads.load_state_dict({k: v.float() for k, v in state.items()})
        return heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class Qwen3Layer(nn.Module):
    """One Qwen3 decoder layer (q/k RMSNorm, GQA, neox RoPE, SwiGLU) with Hugging Face's key names."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        h, d = cfg["hidden_size"], cfg["head_dim"]
        self.nh, self.nkv, self.d = cfg["num_attention_heads"], cfg["num_key_value_heads"], d
        eps = cfg["rms_norm_eps"]
        # transformers >= 5 writes rope_parameters; older configs have rope_theta at the top level
        self.theta = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        attn = nn.Module()
        attn.q_proj = nn.Linear(h, self.nh * d, bias=False)
        attn.k_proj = nn.Linear(h, self.nkv * d, bias=False)
        attn.v_proj = nn.Linear(h, self.nkv * d, bias=False)
        attn.o_proj = nn.Linear(self.nh * d, h, bias=False)
        attn.q_norm = RMSNorm(d, eps)
        attn.k_norm = RMSNorm(d, eps)
        self.self_attn = attn
        mlp = nn.Module()
        mlp.gate_proj = nn.Linear(h, cfg["intermediate_size"], bias=False)
        mlp.up_proj = nn.Linear(h, cfg["intermediate_size"], bias=False)
        mlp.down_proj = nn.Linear(cfg["intermediate_size"], h, bias=False)
        self.mlp = mlp

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = 1.0 / self.theta ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d)
        ang = positions.float()[:, None] * inv[None]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos()[None, None], ang.sin()[None, None]   # [1, 1, T, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, h], causal over T starting at position 0."""
        B, T, _ = x.shape
        a = self.self_attn
        y = self.input_layernorm(x)
        q = a.q_norm(a.q_proj(y).view(B, T, self.nh, self.d)).transpose(1, 2)
        k = a.k_norm(a.k_proj(y).view(B, T, self.nkv, self.d)).transpose(1, 2)
        v = a.v_proj(y).view(B, T, self.nkv, self.d).transpose(1, 2)
        cos, sin = self.rope(torch.arange(T))
        q, k = rotate_neox(q, cos.to(q.dtype), sin.to(q.dtype)), rotate_neox(k, cos.to(k.dtype), sin.to(k.dtype))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nh != self.nkv)
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.d))
        y = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(y)) * self.mlp.up_proj(y))


class EagleHead(nn.Module):
    def __init__(self, target_cfg: dict) -> None:
        super().__init__()
        self.cfg = dict(target_cfg, num_hidden_layers=1, architectures=["EagleQwen3"])
        if "layer_types" in self.cfg:
            self.cfg["layer_types"] = self.cfg["layer_types"][:1]
        h = target_cfg["hidden_size"]
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList([Qwen3Layer(target_cfg)])

    def forward(self, next_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """next_embeds[:, t] embeds token t+1, features[:, t] is the target's feature at t;
        returns predicted features for t+1 (feed to the target's lm_head for token t+2)."""
        return self.layers[0](self.fc(torch.cat([next_embeds, features], dim=-1)))

    def save(self, out: Path, base: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(self.cfg, base_model_name_or_path=base, torch_dtype="bfloat16")
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EagleHead:
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        head = cls(cfg)
        state = load_file(str(path / "model.safetensors"))
        head.load_state_dict({k: v.float() for k, v in state.items()})
        return head
