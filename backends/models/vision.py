"""The Qwen2.5-VL vision tower: pixels (patches) -> visual embeddings in the language model's width.

Patch embedding (a Conv3d whose kernel equals its stride, so one GEMM over flattened patches), blocks
of RMSNorm + attention with 2-D rotary + SwiGLU MLP, where most blocks attend within windows of
`window_size` pixels and the blocks in `fullatt_block_indexes` attend over the whole image, then a
merger (RMSNorm, 2x2 neighbouring patches concatenated, MLP with GELU) that gives one embedding per
merged patch: what replaces one <|image_pad|> token. Computed as transformers does, op for op."""

from __future__ import annotations

import itertools

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from baton.kernels.linear import native_half_matmul
from baton.kernels.norm import rms_norm

from ..loader.safetensors_loader import checkpoint_files

Grid = tuple[int, int, int]      # (t, h, w) in patches


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    window_size: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    in_channels: int
    rope_theta: float

    @classmethod
    def from_hf_dict(cls, v: dict) -> VisionConfig:
        act = v.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"vision_config.hidden_act={act!r} is not supported (silu only)")
        rope = v.get("rope_parameters") or {}
        return cls(depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
                   intermediate_size=v["intermediate_size"], out_hidden_size=v["out_hidden_size"],
                   fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
                   window_size=v.get("window_size", 112), patch_size=v.get("patch_size", 14),
                   spatial_merge_size=v.get("spatial_merge_size", 2),
                   temporal_patch_size=v.get("temporal_patch_size", 2), in_channels=v.get("in_channels", 3),
                   rope_theta=float(rope.get("rope_theta", 10000.0)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def load_vision_weights(model_dir: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tower's tensors (named without their prefix: `visual.` in Hugging Face's files,
    `model.visual.` as newer transformers name them in memory)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                for prefix in ("visual.", "model.visual."):
                    if name.startswith(prefix):
                        t = sf.get_tensor(name)
                        out[name[len(prefix):]] = t.to(dtype) if t.is_floating_point() else t
    if not out:
        raise ValueError(f"{str(model_dir)!r} has no vision tower tensors (visual.*)")
    return out


def vision_positions(grids: list[Grid], merge: int) -> torch.Tensor:
    """(h, w) patch coordinates [N, 2], in the merged-block-major order patches arrive in."""
    out = []
    for t, h, w in grids:
        hp = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        wp = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hw = torch.stack([hp.transpose(1, 2).flatten(), wp.transpose(1, 2).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def window_index(grids: list[Grid], merge: int, window: int, patch: int) -> tuple[torch.Tensor, list[int]]:
    """Merged patches reordered so each attention window is contiguous, and the windows' bounds in
    patches (cumulative): windows are window/patch/merge merged patches on a side, tiled from the
    top left; partial windows at the right and bottom edges are smaller."""
    side = window // merge // patch
    unit = merge * merge
    order, bounds, base = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for y in range(0, gh, side):
                for x in range(0, gw, side):
                    win = idx[ti, y:y + side, x:x + side].flatten()
                    order.append(win + base)
                    bounds.append(bounds[-1] + win.numel() * unit)
        base += t * gh * gw
    return torch.cat(order), bounds


def image_bounds(grids: list[Grid]) -> list[int]:
    """Cumulative patch counts per frame: full attention stays within one image (and frame)."""
    bounds = [0]
    for t, h, w in grids:
        bounds += [bounds[-1] + h * w * (i + 1) for i in range(t)]
    return bounds


class VisionTower:
    def __init__(self, cfg: VisionConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.out_dtype = weights["patch_embed.proj.weight"].dtype   # the language model's
        if self.out_dtype in (torch.bfloat16, torch.float16) and not native_half_matmul(self.out_dtype):
            # computed in fp32 (a private copy of the weights; the embeddings rounded back at the end)
            weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
        self.w = weights
        self.dtype = weights["patch_embed.proj.weight"].dtype       # the one it computes in
        self.patch_weight = weights["patch_embed.proj.weight"].reshape(cfg.hidden_size, -1)
        if self.patch_weight.shape[1] != cfg.patch_dim:
            raise ValueError(f"visual.patch_embed.proj.weight: {cfg.patch_dim} inputs expected, "
                             f"got {self.patch_weight.shape[1]}")
        d = cfg.head_dim // 2
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))

    def max_embedding_bytes(self, max_pixels: int) -> int:
        """The largest image's embeddings (a processor resizes to at most max_pixels)."""
        side = self.cfg.patch_size * self.cfg.spatial_merge_size
        return max_pixels // (side * side) * self.cfg.out_hidden_size * self.out_dtype.itemsize

    def num_embeddings(self, grid: Grid) -> int:
        t, h, w = grid
        return t * h * w // self.cfg.spatial_merge_size ** 2

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """pixels [N, patch_dim] (N = Σ t·h·w over `grids`) -> embeddings [N / merge², out_hidden]."""
        cfg, w = self.cfg, self.w
        merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size ** 2
        n = pixels.shape[0]
        if pixels.dim() != 2 or pixels.shape[1] != cfg.patch_dim or n != sum(t * h * ww for t, h, ww in grids):
            raise ValueError(f"pixels {tuple(pixels.shape)} do not match grids {grids}")
        x = F.linear(pixels.to(self.dtype), self.patch_weight)
        order, win_bounds = window_index(grids, merge, cfg.window_size, cfg.patch_size)
        # rows to window order, merged blocks kept together
        x = x.view(n // unit, unit, -1)[order].reshape(n, -1)
        freqs = vision_positions(grids, merge).float()[..., None] * self.inv_freq   # [N, 2, d/2]
        freqs = freqs.view(n // unit, unit, -1)[order].reshape(n, -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)                   # [N, 1, head_dim]
        full_bounds = image_bounds(grids)
        for i in range(cfg.depth):
            p = f"blocks.{i}."
            bounds = full_bounds if i in cfg.fullatt_block_indexes else win_bounds
            x = x + self._attention(rms_norm(x, w[p + "norm1.weight"], 1e-6), p + "attn.", cos, sin, bounds)
            h = rms_norm(x, w[p + "norm2.weight"], 1e-6)
            m = p + "mlp."
            g = F.silu(F.linear(h, w[m + "gate_proj.weight"], w[m + "gate_proj.bias"]))
            x = x + F.linear(g * F.linear(h, w[m + "up_proj.weight"], w[m + "up_proj.bias"]),
                             w[m + "down_proj.weight"], w[m + "down_proj.bias"])
        x = rms_norm(x, w["merger.ln_q.weight"], 1e-6).view(n // unit, -1)
        x = F.linear(F.gelu(F.linear(x, w["merger.mlp.0.weight"], w["merger.mlp.0.bias"])),
                     w["merger.mlp.2.weight"], w["merger.mlp.2.bias"])
        return x[torch.argsort(order)].to(self.out_dtype)

    def _attention(self, x: torch.Tensor, p: str, cos: torch.Tensor, sin: torch.Tensor,
                   bounds: list[int]) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        n, H = x.shape[0], cfg.num_heads
        q, k, v = F.linear(x, w[p + "qkv.weight"], w[p + "qkv.bias"]).view(n, 3, H, -1).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)       # in fp32, cast back (as transformers)
        out = torch.empty_like(q)
        # each window (or image) alone; a run of equal windows in one call, as [windows, H, L, D]
        # (4-D: torch's flash kernel on CPU; 3-D takes the math path, 2x slower on a full layer)
        a = bounds[0]
        for L, run in itertools.groupby(b - a for a, b in zip(bounds, bounds[1:])):
            b = a + L * len(list(run))
            if L:
                qkv = [t[a:b].view(-1, L, H, t.shape[-1]).transpose(1, 2) for t in (q, k, v)]
                out[a:b] = F.scaled_dot_product_attention(*qkv).transpose(1, 2).reshape(b - a, H, -1)
            a = b
        return F.linear(out.reshape(n, -1), w[p + "proj.weight"], w[p + "proj.bias"])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)
