"""Quantize a checkpoint with llmcompressor (vLLM's quantization tool) and save what Baton's tests
and benchmarks read: the compressed-tensors checkpoint, plus reference logits computed by
transformers from that checkpoint (decompressed by compressed-tensors itself).

llmcompressor pins numpy >= 2 and its own transformers, which the Triton stub cannot use, so this
runs in a separate environment, never in CI:

    python3.11 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/python tools/producers/llmcompressor_checkpoints.py SRC OUT --scheme W4A16 --group-size 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def calibration(tokenizer, n: int, length: int) -> list[list[int]]:  # noqa: ANN001
    """Windows of the Python standard library's own sources (on every machine, no download)."""
    import sysconfig

    ids: list[int] = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]:
        ids += tokenizer(f.read_text(errors="ignore"), add_special_tokens=False).input_ids
        if len(ids) > n * length:
            break
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--scheme", default="W4A16", choices=["W4A16", "W4A16_ASYM", "W8A16"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--algorithm", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    a = ap.parse_args()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.src)
    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.bfloat16)
    bits = 8 if a.scheme == "W8A16" else 4
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=a.scheme != "W4A16_ASYM",
                               strategy="channel" if bits == 8 else "group",
                               group_size=None if bits == 8 else a.group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    modifier = (GPTQModifier if a.algorithm == "gptq" else QuantizationModifier)(
        config_groups={"group_0": scheme}, ignore=["lm_head"])
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": calibration(tok, a.samples, a.length)})
    oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=a.length, num_calibration_samples=a.samples)
    out = Path(a.out)
    model.save_pretrained(str(out), save_compressed=True)
    tok.save_pretrained(str(out))
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (Path(a.src) / extra).is_file():
            (out / extra).write_bytes((Path(a.src) / extra).read_bytes())
    # reference: the saved checkpoint as transformers + compressed-tensors run it (decompressed)
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = calibration(tok, 1, 64)[0]
    with torch.inference_mode():
        logits = ref(torch.tensor([ids])).logits[0]
    from safetensors.torch import save_file

    save_file({"input_ids": torch.tensor(ids), "logits": logits.contiguous()}, str(out / "reference_logits.safetensors"))
    import llmcompressor

    (out / "PRODUCER.json").write_text(json.dumps({
        "producer": f"llmcompressor {llmcompressor.__version__}", "algorithm": a.algorithm, "scheme": a.scheme,
        "group_size": a.group_size, "source": Path(a.src).name, "python": sys.version.split()[0],
        "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
