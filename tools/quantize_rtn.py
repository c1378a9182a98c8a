"""Write a 4-bit (or 8-bit per channel) copy of a float checkpoint in the GPTQ, AWQ (GEMM) or
compressed-tensors (pack-quantized) layout, by round-to-nearest per group: no calibration, so
these are Baton's own stand-ins for what gptqmodel / autoawq / llmcompressor write (the layouts are
the same; the weights a real producer picks are better). For benchmarks, and for users without a
producer at hand. The lm_head and embeddings stay float, as the producers leave them by default;
`--lm-head` (GPTQ) quantizes the lm_head too, as gptqmodel does with lm_head=True.

    baton quantize-rtn CHECKPOINT --out DIR --format gptq|awq|compressed-tensors [--group-size 128]
                      [--asym] [--bits 4|8] [--lm-head]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FORMATS = ("gptq", "awq", "compressed-tensors")


def rtn_int4(w: torch.Tensor, group: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (q [N, K] 0..15, zero [N, K/G] 1..15, scale fp16 [N, K/G]); w ~ (q - zero) * scale."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    if sym:
        scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-8)
        zero = torch.full_like(scale, 8).long()
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(1, 15).long()
    scale = scale.half()
    q = torch.round(g / scale.float()[..., None] + zero[..., None]).clamp(0, 15).long().view(n, k)
    return q, zero, scale


def _words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] unsigned values -> [R, C * bits / 32] int32, element c at bits (c % per) * bits."""
    per = 32 // bits
    r, c = values.shape
    out = torch.zeros(r, c // per, dtype=torch.int64)
    for i in range(per):
        out |= values[:, i::per].to(torch.int64) << (bits * i)
    return (out - ((out >> 31) << 32)).to(torch.int32)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_linear(w: torch.Tensor, prefix: str, fmt: str, group: int, sym: bool, bits: int) -> dict[str, torch.Tensor]:
    n, k = w.shape
    if bits == 8:                       # compressed-tensors W8A16: symmetric, per channel
        scale = (w.float().abs().amax(1) / 127).clamp(min=1e-8).to(w.dtype)
        q = torch.round(w.float() / scale.float()[:, None]).clamp(-128, 127).long()
        return {f"{prefix}.weight_packed": _words(q + 128, 8), f"{prefix}.weight_scale": scale.view(n, 1),
                f"{prefix}.weight_shape": torch.tensor([n, k])}
    g = group or k
    q, zero, scale = rtn_int4(w, g, sym)
    if fmt == "gptq":                   # v1: zeros stored minus one
        return {f"{prefix}.qweight": _words(q, 4).T.contiguous(), f"{prefix}.qzeros": _words((zero - 1).T.contiguous(), 4),
                f"{prefix}.scales": scale.T.contiguous(), f"{prefix}.g_idx": (torch.arange(k) // g).int()}
    if fmt == "awq":
        order = torch.tensor(AWQ_ORDER)

        def nibble_order(m: torch.Tensor) -> torch.Tensor:
            r, c = m.shape
            return m.view(r, c // 8, 8)[..., order].reshape(r, c)

        return {f"{prefix}.qweight": _words(nibble_order(q.T.contiguous()), 4),
                f"{prefix}.qzeros": _words(nibble_order(zero.T.contiguous()), 4), f"{prefix}.scales": scale.T.contiguous()}
    out = {f"{prefix}.weight_packed": _words(q, 4), f"{prefix}.weight_scale": scale.to(w.dtype),
           f"{prefix}.weight_shape": torch.tensor([n, k])}
    if not sym:
        out[f"{prefix}.weight_zero_point"] = _words(zero.T.contiguous(), 4).T.contiguous()
    return out


def quantization_config(fmt: str, group: int, sym: bool, bits: int, lm_head: bool = False) -> dict:
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group or -1, "sym": sym, "desc_act": False,
                "checkpoint_format": "gptq", "lm_head": lm_head}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    strategy = "group" if bits == 4 and group else "channel"
    weights = {"num_bits": bits, "type": "int", "symmetric": sym or bits == 8, "strategy": strategy,
               "group_size": group if strategy == "group" else None, "actorder": None, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "format": "pack-quantized"}}}


def quantize_checkpoint(src: str | Path, out: str | Path, fmt: str, group: int = 128, sym: bool = True,
                        bits: int = 4, lm_head: bool = False) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "awq":
        sym = False                     # AWQ checkpoints carry zero points
    if bits == 8 and fmt != "compressed-tensors":
        raise ValueError("8-bit: compressed-tensors (W8A16) only")
    if lm_head and fmt != "gptq":
        raise ValueError("lm_head: a quantized lm_head is written in the GPTQ layout only")
    src, out = Path(src), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                t = sf.get_tensor(name)
                if name.startswith("model.layers.") and name.endswith("_proj.weight") or \
                        (lm_head and name == "lm_head.weight"):
                    tensors |= pack_linear(t, name[: -len(".weight")], fmt, group, sym, bits)
                else:
                    tensors[name] = t
    cfg = json.loads((src / "config.json").read_text())
    if lm_head and "lm_head.qweight" not in tensors:    # tied: the head is the embedding, quantized apart
        tensors |= pack_linear(tensors["model.embed_tokens.weight"], "lm_head", fmt, group, sym, bits)
        cfg["tie_word_embeddings"] = False
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg["quantization_config"] = quantization_config(fmt, group, sym, bits, lm_head)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="baton quantize-rtn", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--group-size", type=int, default=128, help="0: one group per output channel")
    ap.add_argument("--asym", action="store_true", help="zero points per group (AWQ always has them)")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--lm-head", action="store_true", help="quantize the lm_head too (GPTQ lm_head=true)")
    a = ap.parse_args(argv)
    path = quantize_checkpoint(a.checkpoint, a.out, a.format, a.group_size, not a.asym, a.bits, a.lm_head)
    print(f"wrote a {a.bits}-bit {a.format} checkpoint (round-to-nearest) to {path}")


if __name__ == "__main__":
    main()
