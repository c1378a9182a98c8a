"""LoRA adapters in PEFT's format, applied beside the base model's linears: y = W·x + B·(A·x)·scale for
the rows of the requests that name the adapter. Several adapters (and the base model) share one batch:
each adapter's rows are gathered, run through its two small GEMMs and added back (on a GPU punica's
grouped kernels do this in one launch; on CPU the GEMMs are tiny next to W's). The base weights stay
as they are (shared by every stage, packed or quantized), so an adapter costs only its own tensors.

A and B are multiplied in the model's dtype by the same linear method as its unquantized weights (on
CPU Baton's small-row kernels: torch's own matmul costs 3-4x as much at these sizes), as PEFT
computes them in the model's dtype."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.kernels.linear import Linear, LinearMethod, linear

from .config import ModelConfig

# a PEFT tensor name: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.lora_([AB])\.weight$")
# Baton's fused linears (models/decoder.py) and the projections stacked in each, in order
FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


class LoRAError(ValueError):
    """An adapter this server cannot load (its message names the adapter and what is wrong)."""


@dataclass
class LoRALinear:
    a: Linear            # [rank (summed over the stacked projections), in]
    b: Linear            # [out, rank], the scale folded in; block-diagonal for a fused linear


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int
    layers: list[dict[str, LoRALinear]]     # per layer, by fused linear name (absent: not adapted)

    @classmethod
    def load(cls, name: str, path: str | Path, cfg: ModelConfig, method: LinearMethod,
             dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoRAAdapter:
        """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) for a model of
        `cfg` running in `dtype`; `method`: a float linear method for that dtype (not a quantizing one)."""

        def weight(t: torch.Tensor) -> Linear:
            return method.create(method.process(t.to(device, dtype).contiguous()))

        d = Path(path)
        try:
            conf = json.loads((d / "adapter_config.json").read_text())
        except FileNotFoundError:
            raise LoRAError(f"LoRA adapter {name!r}: no adapter_config.json in {str(d)!r}") from None
        except json.JSONDecodeError as e:
            raise LoRAError(f"LoRA adapter {name!r}: adapter_config.json is not JSON ({e})") from None
        _check_config(name, conf)
        tensors = _read_tensors(name, d)
        r, alpha = int(conf.get("r", 8)), float(conf.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _NAME.search(key)
            if m is None:
                raise LoRAError(f"LoRA adapter {name!r}: tensor {key!r} adapts a module Baton cannot apply "
                                "LoRA to (only the attention and MLP projections)")
            layer, proj, ab = int(m[1]), m[2], m[3]
            if layer >= cfg.num_layers:
                raise LoRAError(f"LoRA adapter {name!r}: tensor {key!r} names layer {layer}, the model has "
                                f"{cfg.num_layers}")
            parts.setdefault((layer, proj), {})[ab] = t.float()
        H, KV, D, hidden, inter = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
        shapes = {"q": (H * D, hidden), "k": (KV * D, hidden), "v": (KV * D, hidden), "o": (hidden, H * D),
                  "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        layers: list[dict[str, LoRALinear]] = [{} for _ in range(cfg.num_layers)]
        for i in range(cfg.num_layers):
            for fused, projs in FUSED.items():
                got = [(p, parts.get((i, p))) for p in projs]
                if all(ab is None for _, ab in got):
                    continue
                a_rows, b_blocks = [], []
                for p, ab in got:
                    out, inp = shapes[p]
                    if ab is None:
                        b_blocks.append((out, None))
                        continue
                    if set(ab) != {"A", "B"}:
                        raise LoRAError(f"LoRA adapter {name!r}: layer {i} {p}_proj has lora_{'A' if 'B' in ab else 'B'} "
                                        "missing")
                    a, b = ab["A"], ab["B"]
                    if a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
                        raise LoRAError(f"LoRA adapter {name!r}: layer {i} {p}_proj is {tuple(b.shape)} x "
                                        f"{tuple(a.shape)}, the model needs [{out}, r] x [r, {inp}]")
                    a_rows.append(a)
                    b_blocks.append((out, b * scale))
                rank = sum(a.shape[0] for a in a_rows)
                bmat = torch.zeros(sum(o for o, _ in b_blocks), rank)
                row = col = 0
                for out, b in b_blocks:
                    if b is not None:
                        bmat[row:row + out, col:col + b.shape[1]] = b
                        col += b.shape[1]
                    row += out
                layers[i][fused] = LoRALinear(weight(torch.cat(a_rows)), weight(bmat))
        return cls(name, str(d), r, layers)


def checked_adapters(lora_modules: dict[str, str], model_dir: str) -> dict[str, str]:
    """Each adapter loaded once for `model_dir`'s model (a LoRAError naming what is wrong), before a
    node starts its processes; their paths made absolute (the stage processes run elsewhere)."""
    cfg = ModelConfig.from_dir(model_dir)
    for name, path in lora_modules.items():
        LoRAAdapter.load(name, path, cfg, LinearMethod())
    return {name: str(Path(path).resolve()) for name, path in lora_modules.items()}


def _check_config(name: str, conf: dict) -> None:
    """What PEFT can store that these adapters do not apply: refused, never silently dropped."""
    if conf.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"LoRA adapter {name!r}: peft_type {conf.get('peft_type')!r} is not LORA")
    refused = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out", "modules_to_save": "modules_to_save",
               "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}
    for key, what in refused.items():
        if conf.get(key):
            raise LoRAError(f"LoRA adapter {name!r}: {what} is not supported")
    if conf.get("bias", "none") != "none":
        raise LoRAError(f"LoRA adapter {name!r}: bias={conf['bias']!r} is not supported (only 'none')")


def _read_tensors(name: str, d: Path) -> dict[str, torch.Tensor]:
    f = d / "adapter_model.safetensors"
    if not f.exists():
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_model.safetensors in {str(d)!r}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"LoRA adapter {name!r}: adapter_model.safetensors unreadable ({e})") from None


class LoRABatch:
    """One step's adapters: for each adapter in it, the rows of the flat batch it applies to (a slice
    when they are one run, as when a batch has one adapter: no gather, no scatter)."""

    def __init__(self, groups: list[tuple[LoRAAdapter, slice | torch.Tensor]]) -> None:
        self.groups = groups

    @classmethod
    def of(cls, row_adapters: list[LoRAAdapter | None], device: torch.device | str = "cpu") -> LoRABatch | None:
        """Per flat-batch row its adapter (None: the base model); None when no row has one."""
        rows: dict[str, tuple[LoRAAdapter, list[int]]] = {}
        for i, a in enumerate(row_adapters):
            if a is not None:
                rows.setdefault(a.name, (a, []))[1].append(i)
        if not rows:
            return None
        return cls([(a, slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r) else
                     torch.tensor(r, dtype=torch.int64, device=device)) for a, r in rows.values()])

    def add_(self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> torch.Tensor:
        """y (= W·x of one linear, [T, out]) += each adapter's B·(A·x) on its rows."""
        for adapter, rows in self.groups:
            lin = adapter.layers[layer].get(name)
            if lin is None:
                continue
            if isinstance(rows, slice):
                y[rows].add_(linear(linear(x[rows], lin.a), lin.b))
            else:
                y.index_add_(0, rows, linear(linear(x.index_select(0, rows), lin.a), lin.b))
        return y
