"""Quantize a checkpoint once with auto-round (Intel's quantizer, installed beside llmcompressor) and
export the same 4-bit weights in the AutoGPTQ and AutoAWQ layouts and as compressed-tensors. The
GPTQ and AWQ producers themselves do not install beside torch 2.13 CPU (gptqmodel needs torch >=
2.14.1; autoawq is archived and CUDA-only), and transformers cannot run those layouts on CPU, so
the reference logits come from transformers running the compressed-tensors export (decompressed by
compressed-tensors): the same weights in another container. Runs in the llmcompressor environment
(tools/producers/llmcompressor_checkpoints.py), never in CI:

    /tmp/llmc/bin/python tools/producers/autoround_checkpoints.py SRC OUT [--group-size 32] [--sym]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    import sysconfig

    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.src)
    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.float32)
    texts = [p.read_text(errors="ignore")[:2000] for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:32]]
    ar = AutoRound(model, tok, bits=4, group_size=a.group_size, sym=a.sym, iters=a.iters, nsamples=8, seqlen=128,
                   dataset=texts, device_map="cpu")
    out = Path(a.out)
    tmp = out / ".export"
    ar.quantize_and_save(str(tmp), format="auto_gptq,auto_awq,llm_compressor")
    exports = {p.name: p for p in tmp.rglob("config.json")}
    found = {}
    for cfg in tmp.rglob("config.json"):
        q = json.loads(cfg.read_text()).get("quantization_config", {})
        found[q.get("quant_method")] = cfg.parent
    for method, name in (("gptq", "gptq"), ("awq", "awq"), ("compressed-tensors", "compressed-tensors")):
        if method not in found:
            raise SystemExit(f"auto-round wrote no {method} export (found {sorted(found)}; {exports})")
        shutil.copytree(found[method], out / name, dirs_exist_ok=True)
    shutil.rmtree(tmp)
    ref = AutoModelForCausalLM.from_pretrained(str(out / "compressed-tensors"), dtype=torch.float32).eval()
    ids = tok(texts[-1], add_special_tokens=False).input_ids[:64]
    with torch.inference_mode():
        logits = ref(torch.tensor([ids])).logits[0]
    from safetensors.torch import save_file

    save_file({"input_ids": torch.tensor(ids), "logits": logits.contiguous()}, str(out / "reference_logits.safetensors"))
    shutil.rmtree(out / "compressed-tensors")            # the reference is kept, not the third copy
    (out / "PRODUCER.json").write_text(json.dumps({
        "producer": f"auto-round {auto_round.__version__}", "bits": 4, "group_size": a.group_size, "sym": a.sym,
        "iters": a.iters, "exports": ["gptq (auto_gptq)", "awq (auto_awq)"],
        "reference": "transformers + compressed-tensors on the llm_compressor export of the same weights",
        "source": Path(a.src).name, "python": sys.version.split()[0], "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
