"""Write random-init Hugging Face checkpoints of given shapes, with a byte-level BPE tokenizer trained
on the Python standard library sources (present on every machine). Deterministic for a given seed.

    baton make-checkpoint small --out .cache/checkpoints/small
"""

from __future__ import annotations

import json
from pathlib import Path

from baton.tools.train.corpus import (
    SPECIAL_TOKENS,
    first_bytes,
    save_tokenizer,
    stdlib_texts,
    train_tokenizer,
)

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


# Qwen2.5-VL architecture (Qwen2ForCausalLM text + the vision tower). `mrope` splits the text head's
# rotary frequencies between (temporal, height, width); `window` is the vision window in pixels.
VL_PRESETS: dict[str, dict] = {
    "tiny-qwen2.5-vl": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=512, tie=True, init=0.1,
                            mrope=[2, 3, 3], v_hidden=32, v_depth=4, v_heads=2, v_inter=64, v_fullatt=[1, 3],
                            window=56, min_pixels=56 * 56, max_pixels=28 * 28 * 16),
    # for benchmarks: a vision tower that costs about what the language model's prefill does
    "small-qwen2.5-vl": dict(hidden=512, layers=8, heads=8, kv_heads=4, inter=1536, vocab=8192, tie=True,
                             init=0.02, mrope=[8, 12, 12], v_hidden=384, v_depth=8, v_heads=6, v_inter=1024,
                             v_fullatt=[3, 7], window=112, min_pixels=56 * 56, max_pixels=28 * 28 * 256),
}
VL_SPECIALS = [*SPECIAL_TOKENS, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# ChatML with Qwen2.5-VL's image parts: each image becomes <|vision_start|><|image_pad|><|vision_end|>
# (the processor repeats <|image_pad|> once per visual embedding)
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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

    if preset in VL_PRESETS:
        return make_vl_checkpoint(preset, out, dtype, seed)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS | VL_PRESETS)}")
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


def make_vl_checkpoint(preset: str, out: str | Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A random-init Qwen2_5_VLForConditionalGeneration checkpoint with its processor files
    (preprocessor_config.json, a chat template with image parts)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    p = VL_PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = 4 << 20 if p["vocab"] > 4096 else 1 << 20
    tok = train_tokenizer(p["vocab"], first_bytes((text for _, text in stdlib_texts()), budget), VL_SPECIALS)
    save_tokenizer(tok, out, specials=VL_SPECIALS, chat_template=VL_CHAT_TEMPLATE)
    vocab = max(p["vocab"], tok.get_vocab_size())
    eos = tok.token_to_id("<|endoftext|>")
    ids = {name: tok.token_to_id(f"<|{name}|>") for name in ("vision_start", "vision_end", "image_pad", "video_pad")}
    text = dict(vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["inter"],
                num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=p["init"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": p["mrope"]},
                bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=p["tie"])
    vision = dict(depth=p["v_depth"], hidden_size=p["v_hidden"], num_heads=p["v_heads"],
                  intermediate_size=p["v_inter"], out_hidden_size=p["hidden"], fullatt_block_indexes=p["v_fullatt"],
                  window_size=p["window"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=p["init"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                              video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                              vision_end_token_id=ids["vision_end"], tie_word_embeddings=p["tie"],
                              bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True, "min_pixels": p["min_pixels"], "max_pixels": p["max_pixels"],
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="baton make-checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS | VL_PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default=None, help="e.g. 100MB to write a sharded checkpoint")
    a = ap.parse_args(argv)
    path = make_checkpoint(a.preset, a.out, a.dtype, a.seed, a.max_shard_size)
    print(f"wrote {a.preset} checkpoint to {path}")
