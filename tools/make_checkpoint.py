"""Write random-init Hugging Face checkpoints of given shapes, with a byte-level BPE tokenizer trained
on the Python standard library sources (present on every machine). Deterministic for a given seed.

    baton make-checkpoint small --out .cache/checkpoints/small
"""

from __future__ import annotations

import json
from pathlib import Path

from baton.tools.train.corpus import first_bytes, save_tokenizer, stdlib_texts, train_tokenizer

# name -> (architecture, shape). `vocab` is the tokenizer's size (the model's vocab_size matches).
PRESETS: dict[str, dict] = {
    "tiny-qwen3": dict(arch="Qwen3ForCausalLM", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32,
                       inter=128, vocab=512, tie=False, init=0.1),
    "tiny-qwen2": dict(arch="Qwen2ForCausalLM", hidden=64, layers=2, heads=4, kv_heads=4, head_dim=16,
                       inter=160, vocab=512, tie=True, init=0.1),
    "tiny-llama": dict(arch="LlamaForCausalLM", hidden=96, layers=3, heads=6, kv_heads=2, head_dim=16,
                       inter=192, vocab=512, tie=False, init=0.1,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # small's layer shapes (and so its kernels' code paths) in 2 layers, at test speed
    "mini-qwen3": dict(arch="Qwen3ForCausalLM", hidden=768, layers=2, heads=12, kv_heads=4, head_dim=64,
                       inter=2048, vocab=512, tie=False, init=0.02),
    "small": dict(arch="Qwen3ForCausalLM", hidden=768, layers=12, heads=12, kv_heads=4, head_dim=64,
                  inter=2048, vocab=32000, tie=False, init=0.02),
    "medium": dict(arch="Qwen3ForCausalLM", hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
                   inter=3072, vocab=32000, tie=False, init=0.02),
}


def hf_config(preset: dict, vocab: int, dtype: str, eos_id: int) -> dict:
    cfg = {
        "architectures": [preset["arch"]],
        "model_type": {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}[preset["arch"]],
        "vocab_size": vocab,
        "hidden_size": preset["hidden"],
        "intermediate_size": preset["inter"],
        "num_hidden_layers": preset["layers"],
        "num_attention_heads": preset["heads"],
        "num_key_value_heads": preset["kv_heads"],
        "head_dim": preset["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0 if preset["arch"] != "LlamaForCausalLM" else 500000.0,
        "tie_word_embeddings": preset["tie"],
        "initializer_range": preset["init"],
        "attention_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }
    if "rope_scaling" in preset:
        cfg["rope_scaling"] = preset["rope_scaling"]
    return cfg


def make_checkpoint(preset: str, out: str | Path, dtype: str = "bfloat16", seed: int = 0,
                    max_shard_size: str | None = None, tokenizer_bytes: int | None = None) -> Path:
    """Create (or overwrite) a checkpoint directory for `preset`; returns its path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = tokenizer_bytes or (4 << 20 if p["vocab"] > 4096 else 1 << 20)
    tok = train_tokenizer(p["vocab"], first_bytes((text for _, text in stdlib_texts()), budget))
    save_tokenizer(tok, out)
    vocab = max(p["vocab"], tok.get_vocab_size())   # pad the embedding to the preset's size, as Qwen does
    eos = tok.token_to_id("<|endoftext|>")
    cfg_dict = hf_config(p, vocab, dtype, eos)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    config = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="baton make-checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default=None, help="e.g. 100MB to write a sharded checkpoint")
    a = ap.parse_args(argv)
    path = make_checkpoint(a.preset, a.out, a.dtype, a.seed, a.max_shard_size)
    print(f"wrote {a.preset} checkpoint to {path}")
