"""Read a Hugging Face safetensors checkpoint (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """The checkpoint is missing files or tensors."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [d / n for n in names]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {str(model_dir)!r}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"checkpoint shard missing: {f}")
    return files


def load_state_dict(model_dir: str | Path, dtype: torch.dtype,
                    raw_suffixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors, read file by file in the order they are stored; floating ones cast to `dtype`
    except those whose name ends with one of `raw_suffixes` (a quantized linear's own tensors)."""
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                t = sf.get_tensor(name)
                keep = t.dtype == dtype or not t.is_floating_point() or name.endswith(raw_suffixes)
                out[name] = t if keep else t.to(dtype)
    return out


def take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Pop a required tensor, with an error naming it if absent."""
    try:
        return state.pop(name)
    except KeyError:
        raise CheckpointError(f"checkpoint is missing tensor {name!r}") from None
