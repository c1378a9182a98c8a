"""LoRA's cost in the offline engine: decode tok/s at batch 1 and 8 with no adapter, every request on
one adapter, and half the batch on each of two adapters, the arms alternating in one process
(rounds), on the same prompts. Adapters are random, rank --rank on every projection, written in
PEFT's format by this script.

    python benchmarks/lora.py --model .cache/checkpoints/small [--rank 16] [--rounds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from baton.backends.runtime import configure_process  # isort: skip

configure_process()  # before torch loads: OpenMP workers spin as in serving

import torch
from safetensors.torch import save_file

from baton import EngineConfig, LLMEngine, SamplingParams
from baton.backends.models.config import ModelConfig


def write_adapter(out: Path, cfg: ModelConfig, rank: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    H, KV, D, hid, inter = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    shapes = {"self_attn.q_proj": (H * D, hid), "self_attn.k_proj": (KV * D, hid), "self_attn.v_proj": (KV * D, hid),
              "self_attn.o_proj": (hid, H * D), "mlp.gate_proj": (inter, hid), "mlp.up_proj": (inter, hid),
              "mlp.down_proj": (hid, inter)}
    tensors = {}
    for i in range(cfg.num_layers):
        for name, (o, k) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{name}"
            tensors[p + ".lora_A.weight"] = torch.randn(rank, k, generator=g) / k ** 0.5
            tensors[p + ".lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                         "target_modules": [n.split(".")[1] for n in shapes]}))
    return out


def decode_rate(engine: LLMEngine, batch: list[list[int]], loras: list[str], new: int) -> float:
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    seqs = [engine.add_request(p, sp, lora=name) for p, name in zip(batch, loras)]
    while not all(s.num_output_tokens >= 1 for s in seqs):
        engine.step()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return len(batch) * (new - 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig.from_dir(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        loras = {n: str(write_adapter(Path(tmp, n), cfg, a.rank, s)) for s, n in enumerate(("a", "b"))}
        engine = LLMEngine(EngineConfig(model=a.model, dtype=a.dtype, max_model_len=512, kv_cache_memory_mb=512,
                                        enable_prefix_caching=False, lora_modules=loras))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(100, cfg.vocab_size - 1, (64,), generator=g).tolist() for _ in range(8)]
        arms = {"base": lambda n: [""] * n, "one adapter": lambda n: ["a"] * n,
                "two adapters": lambda n: ["a", "b"] * (n // 2) if n > 1 else ["a"]}
        rates: dict[str, dict[int, list[float]]] = {arm: {1: [], 8: []} for arm in arms}
        decode_rate(engine, prompts[:1], ["a"], 8)           # warm-up
        for _ in range(a.rounds):
            for bs in (1, 8):
                for arm, names in arms.items():
                    rates[arm][bs].append(decode_rate(engine, prompts[:bs], names(bs), a.new))
        engine.close()
    result = {"model": Path(a.model).name, "dtype": a.dtype, "rank": a.rank, "threads": a.threads,
              "host": platform.processor() or platform.machine(), "new_tokens": a.new, "rounds": a.rounds,
              "decode_tok_s": {arm: {str(bs): [round(x, 1) for x in v] for bs, v in per.items()}
                               for arm, per in rates.items()}}
    for bs in (1, 8):
        base = statistics.median(rates["base"][bs])
        for arm in arms:
            med = statistics.median(rates[arm][bs])
            print(f"batch {bs}  {arm:13s} {med:8.1f} tok/s  {med / base:.2f}x base")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
