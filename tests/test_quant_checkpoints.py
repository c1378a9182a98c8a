"""Pre-quantized checkpoints (backends/loader/quantized.py): GPTQ, AWQ and compressed-tensors
files, written here straight from each format's published description (bit by bit, independent of
Baton's readers), read back to the weights that description defines, served by the engine, and
refused with an error naming the tensor or setting when they disagree with their config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from baton.backends.loader.quantized import (
    QuantizationError,
    checkpoint_quantization,
    read_linear,
    read_quant_config,
)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]          # nibble i of an AWQ word holds column AWQ_ORDER[i]


# ---- the formats, written from their descriptions ------------------------------------------------
def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> [R, C/8] int32, element c in bits 4*(c % 8) of word c // 8."""
    r, c = nibbles.shape
    out = torch.zeros(r, c // 8, dtype=torch.int64)
    for i in range(8):
        out |= nibbles[:, i::8].to(torch.int64) << (4 * i)
    return (out - ((out >> 31) << 32)).to(torch.int32)          # two's complement wrap


def random_int4(n: int, k: int, g: int, sym: bool, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    zero = torch.full((n, k // g), 8) if sym else torch.randint(1, 16, (n, k // g), generator=gen)
    scale = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.002).half()
    return {"q": q, "zero": zero, "scale": scale}


def reference_weight(d: dict[str, torch.Tensor], g: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """w[n, k] = (q[n, k] - zero[n, group(k)]) * scale[n, group(k)]."""
    k = d["q"].shape[1]
    groups = g_idx.long() if g_idx is not None else torch.arange(k) // g
    return (d["q"] - d["zero"][:, groups]).float() * d["scale"].float()[:, groups]


def write_gptq(d: dict[str, torch.Tensor], prefix: str, v1: bool, g_idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """AutoGPTQ: qweight [K/8, N] packs 8 consecutive k; qzeros [K/G, N/8] packs 8 consecutive n,
    v1 storing zero - 1; scales [K/G, N]; g_idx [K]."""
    k = d["q"].shape[1]
    G = k // d["zero"].shape[1]
    return {f"{prefix}.qweight": _gptq_qweight(d["q"]),
            f"{prefix}.qzeros": _words((d["zero"] - (1 if v1 else 0)).T.contiguous()),
            f"{prefix}.scales": d["scale"].T.contiguous(),
            f"{prefix}.g_idx": (g_idx if g_idx is not None else torch.arange(k) // G).int()}


def _gptq_qweight(q: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [K/8, N]: word (j, n) holds q[n, 8j + i] in nibble i."""
    return _words(q).T.contiguous()


def write_awq(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: qweight [K, N/8] and qzeros [K/G, N/8], column AWQ_ORDER[i] of each 8 in nibble i."""
    def interleave(m: torch.Tensor) -> torch.Tensor:       # [R, N]: reorder each 8 columns into nibble order
        r, n = m.shape
        return m.view(r, n // 8, 8)[..., AWQ_ORDER].reshape(r, n)

    return {f"{prefix}.qweight": _words(interleave(d["q"].T.contiguous())),
            f"{prefix}.qzeros": _words(interleave(d["zero"].T.contiguous())),
            f"{prefix}.scales": d["scale"].T.contiguous()}


def write_ct(d: dict[str, torch.Tensor], prefix: str, sym: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized 4-bit: signed q (q - 8) stored + 8, 8 per int32 along K;
    zero points (asymmetric) likewise along N, [N/8, K/G]; weight_scale [N, K/G]; weight_shape."""
    n, k = d["q"].shape
    out = {f"{prefix}.weight_packed": _words(d["q"]), f"{prefix}.weight_scale": d["scale"],
           f"{prefix}.weight_shape": torch.tensor([n, k])}
    if not sym:
        out[f"{prefix}.weight_zero_point"] = _words(d["zero"].T.contiguous()).T.contiguous()
    return out


def write_ct8(q: torch.Tensor, scale: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """8-bit per channel: q + 128 in byte i % 4 of word i // 4 along K; weight_scale [N, 1]."""
    u = (q.to(torch.int64) + 128)
    n, k = q.shape
    words = torch.zeros(n, k // 4, dtype=torch.int64)
    for i in range(4):
        words |= u[:, i::4] << (8 * i)
    return {f"{prefix}.weight_packed": (words - ((words >> 31) << 32)).to(torch.int32),
            f"{prefix}.weight_scale": scale.view(n, 1).bfloat16(), f"{prefix}.weight_shape": torch.tensor([n, k])}


def qconfig(fmt: str, g: int, sym: bool = True, v1: bool = True, desc_act: bool = False, bits: int = 4) -> dict:
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": g, "sym": sym, "desc_act": desc_act,
                "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": g, "zero_point": True, "version": "gemm"}
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if g else "channel",
               "group_size": g or None, "actorder": None, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "format": "pack-quantized"}}}


# ---- one linear ------------------------------------------------------------------------------------
CASES = [("gptq", 32, True, True, False), ("gptq", 64, False, True, False), ("gptq", 128, False, False, False),
         ("gptq", 32, True, True, True), ("gptq", 64, False, False, True), ("awq", 32, False, False, False),
         ("awq", 128, False, False, False), ("compressed-tensors", 32, True, False, False),
         ("compressed-tensors", 64, False, False, False), ("compressed-tensors", 0, True, False, False)]


@pytest.mark.parametrize("fmt,g,sym,v1,act", CASES)
def test_each_format_reads_back_the_weights_its_description_defines(tmp_path, fmt, g, sym, v1, act):
    n, k = 96, 256
    G = g or k
    d = random_int4(n, k, G, sym, seed=G + 7 * sym + 3 * act)
    if fmt == "awq":                     # AWQ is asymmetric (zero_point=true)
        d = random_int4(n, k, G, False, seed=G)
    g_idx = (torch.arange(k) // G)[torch.randperm(k, generator=torch.Generator().manual_seed(1))] if act else None
    prefix = "model.layers.0.mlp.down_proj"
    tensors = write_gptq(d, prefix, v1, g_idx) if fmt == "gptq" else write_awq(d, prefix) if fmt == "awq" else \
        write_ct(d, prefix, sym)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qconfig(fmt, g, sym, v1, act)}))
    qc = read_quant_config(tmp_path)
    assert qc is not None and qc.method == fmt
    got = read_linear(dict(tensors), prefix, n, k, qc)
    assert torch.equal(got.dequantize(), reference_weight(d, G, g_idx))


def test_compressed_tensors_w8a16_reads_back_per_channel_int8(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (64, 96), generator=gen, dtype=torch.int8)
    scale = torch.rand(64, generator=gen) * 0.01
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qconfig("compressed-tensors", 0, bits=8)}))
    qc = read_quant_config(tmp_path)
    assert qc is not None and qc.bits == 8
    got = read_linear(write_ct8(q, scale, "x"), "x", 64, 96, qc)
    assert torch.equal(got.dequantize(), q.float() * scale.bfloat16().float()[:, None])


# ---- whole checkpoints -------------------------------------------------------------------------------
def quantized_checkpoint(src: Path, out: Path, fmt: str, g: int, sym: bool = True, v1: bool = True,
                         act: bool = False, lm_head: bool = False) -> dict[str, torch.Tensor]:
    """`src` (a float checkpoint) with every layer linear (and with `lm_head`, GPTQ only, the
    lm_head) replaced by a random-rounded 4-bit version in `fmt`; returns the dequantized weight of
    each linear (the model the checkpoint defines)."""
    from safetensors.torch import load_file

    shutil.copytree(src, out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state |= load_file(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qconfig(fmt, g, sym, v1, act) | ({"lm_head": True} if lm_head else {})
    (out / "config.json").write_text(json.dumps(cfg))
    dense, tensors = {}, {}
    for name, w in state.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight") or (lm_head and name == "lm_head.weight"):
            prefix = name[: -len(".weight")]
            n, k = w.shape
            G = g or k
            # round-to-nearest per group (the producer's job; any valid q would do)
            wg = w.float().view(n, k // G, G)
            if sym:
                scale = (wg.abs().amax(-1) / 7.5).clamp(min=1e-6)
                zero = torch.full_like(scale, 8, dtype=torch.int64)
            else:
                lo, hi = wg.amin(-1), wg.amax(-1)
                scale = ((hi - lo) / 15).clamp(min=1e-6)
                zero = torch.round(-lo / scale).clamp(1, 15).long()
            scale = scale.half()
            q = torch.round(wg / scale.float()[..., None] + zero[..., None]).clamp(0, 15).long().view(n, k)
            d = {"q": q, "zero": zero, "scale": scale}
            g_idx = None
            if act and k // G > 1:       # act-order: columns assigned to groups in a permuted order
                g_idx = (torch.arange(k) // G)[torch.randperm(k, generator=torch.Generator().manual_seed(k))]  # shared input: one order
                d["q"] = torch.round(w.float() / scale.float()[:, g_idx] + zero[:, g_idx]).clamp(0, 15).long()
            tensors |= write_gptq(d, prefix, v1, g_idx) if fmt == "gptq" else write_awq(d, prefix) if fmt == "awq" \
                else write_ct(d, prefix, sym)
            dense[name] = reference_weight(d, G, g_idx)
        else:
            tensors[name] = w
    save_file(tensors, str(out / "model.safetensors"))
    return dense


def reference_llm(src: Path, dense: dict[str, torch.Tensor]):  # noqa: ANN201
    """The fp32 model whose layer linears are the checkpoint's dequantized weights."""
    from baton import LLM
    from baton.backends.loader.safetensors_loader import load_state_dict
    from baton.backends.models.config import ModelConfig
    from baton.backends.models.decoder import prepare_weights

    state = load_state_dict(src, torch.float32) | dense
    return LLM(src, dtype="float32", weights=prepare_weights(ModelConfig.from_dir(src), state), max_model_len=256)


@pytest.fixture(scope="module")
def mini(checkpoint) -> Path:                          # noqa: ANN001
    return checkpoint("mini-qwen3", dtype="bfloat16")    # hidden 768, MLP 2048: groups of 32..128


@pytest.mark.parametrize("fmt,g,sym,v1,act", [("gptq", 128, True, True, False), ("gptq", 64, False, False, True),
                                              ("awq", 128, False, False, False),
                                              ("compressed-tensors", 32, False, False, False)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_quantized_checkpoint_serves_the_model_it_defines(tmp_path, mini, fmt, g, sym, v1, act, dtype):
    """LLM(quantized checkpoint): the format is detected, and teacher-forced logits match the fp32
    model of the dequantized weights (bf16: Baton's int4 kernel; fp32: the reference path), closer
    to it than to the float model the checkpoint was made from."""
    out = tmp_path / "q"
    serves_the_model_it_defines(mini, out, quantized_checkpoint(mini, out, fmt, g, sym, v1, act), fmt, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_gptq_checkpoint_with_a_quantized_lm_head_serves_the_model_it_defines(tmp_path, mini, dtype):
    """GPTQ lm_head=true (as gptqmodel writes with lm_head=True): the head is read as a 4-bit linear
    and run by the int4 method, and the logits are those of the dequantized weights, head included."""
    from baton.kernels.int4_linear import Int4Linear

    out = tmp_path / "q"
    dense = quantized_checkpoint(mini, out, "gptq", 128, sym=False, lm_head=True)
    assert "lm_head.weight" in dense
    llm = serves_the_model_it_defines(mini, out, dense, "gptq", dtype, keep=True)
    try:
        assert isinstance(llm.engine.model.lm_head, Int4Linear)
    finally:
        llm.close()


def serves_the_model_it_defines(mini: Path, out: Path, dense: dict, fmt: str, dtype: str, keep: bool = False):  # noqa: ANN201
    """The checks of the two tests above; returns the quantized LLM when `keep`."""
    from conftest import prompts_of

    from baton import LLM
    from baton.backends.engine.scoring import window_logits

    q = LLM(out, dtype=dtype, max_model_len=256)
    ref = reference_llm(mini, dense)
    orig = LLM(mini, dtype="float32", max_model_len=256)
    try:
        assert q.engine.model.method.name == "int4" and q.engine.quant is not None and q.engine.quant.method == fmt
        ids = prompts_of(512, [120], seed=3)[0]
        lq, lr, lo = (window_logits(e.engine, ids) for e in (q, ref, orig))
        to_ref, to_orig = float((lq - lr).abs().mean()), float((lq - lo).abs().mean())
        assert to_ref * (20 if dtype == "float32" else 2) < to_orig, (to_ref, to_orig)
        assert (lq.argmax(-1) == lr.argmax(-1)).float().mean() > 0.9
    finally:
        for e in (ref, orig) if keep else (q, ref, orig):
            e.close()
    return q if keep else None


@pytest.mark.parametrize("act", [False, True])
def test_the_fused_decode_step_runs_int4_weights_bit_identically(tmp_path, mini, monkeypatch, act):
    """A 4-bit checkpoint's decode steps run in the one-call C++ decode step (int4 kernel inside; an
    act-order one with x permuted there), with the same tokens and logprobs, bit for bit, as the
    op-by-op forward."""
    from conftest import prompts_of

    from baton import LLM, SamplingParams
    from baton.kernels import int8_linear
    from baton.tools.quantize_rtn import quantize_checkpoint

    if not int8_linear.kernel_supported():
        pytest.skip("needs the CPU extension on AVX512-BF16")
    if act:
        ckpt = tmp_path / "q"
        quantized_checkpoint(mini, ckpt, "gptq", 64, sym=False, v1=True, act=True)
    else:
        ckpt = quantize_checkpoint(mini, tmp_path / "q", "gptq", 64, sym=False)
    llm = LLM(ckpt, dtype="bfloat16", max_model_len=256, enable_prefix_caching=False)
    try:
        model = llm.engine.model
        assert model.method.name == "int4" and model._fused is not None
        assert (model.layers[0].qkv.w.perm is not None) == act
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=True)
        prompts = prompts_of(512, [9, 40], seed=2)
        ops, calls = torch.ops.baton_cpu, []
        fused_op = ops.decode_forward_bf16
        monkeypatch.setattr(ops, "decode_forward_bf16", lambda *a: calls.append(1) or fused_op(*a))
        fused = llm.generate(prompts, sp)
        assert len(calls) >= 15
        model._fused = None
        op_by_op = llm.generate(prompts, sp)
    finally:
        llm.close()
    assert [(o.token_ids, o.logprobs) for o in fused] == [(o.token_ids, o.logprobs) for o in op_by_op]



# ---- bad checkpoints ----------------------------------------------------------------------------------
def test_disagreements_are_errors_naming_the_tensor_or_setting(tmp_path, mini):
    from baton import LLM

    out = tmp_path / "q"
    quantized_checkpoint(mini, out, "gptq", 64)
    good = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "model.safetensors")))

    def variant(name: str, tensors: dict, cfg_change: dict | None = None) -> Path:
        d = tmp_path / name
        shutil.copytree(out, d)
        save_file(tensors, str(d / "model.safetensors"))
        if cfg_change is not None:
            cfg = json.loads((d / "config.json").read_text())
            cfg["quantization_config"] |= cfg_change
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    t = dict(good)
    t["model.layers.1.mlp.up_proj.qweight"] = t["model.layers.1.mlp.up_proj.qweight"][:-8].contiguous()
    with pytest.raises(QuantizationError, match=r"'model.layers.1.mlp.up_proj.qweight' has shape \[88, 2048\]"):
        LLM(variant("short", t), max_model_len=64)
    with pytest.raises(QuantizationError, match=r"'model.layers.0.self_attn.q_proj.qzeros' has shape \[12, 96\].*"
                                                 r"group_size 128"):
        LLM(variant("group", good, {"group_size": 128}), max_model_len=64)
    with pytest.raises(QuantizationError, match="GPTQ with bits=8 is not supported"):
        LLM(variant("bits", good, {"bits": 8}), max_model_len=64)
    t = dict(good)
    t["model.layers.0.self_attn.o_proj.qzeros"] = t["model.layers.0.self_attn.o_proj.qzeros"].float()
    with pytest.raises(QuantizationError, match="'model.layers.0.self_attn.o_proj.qzeros' is torch.float32"):
        LLM(variant("dtype", t), max_model_len=64)
    with pytest.raises(QuantizationError, match="quantization: 'int8' given, but .* is a gptq 4-bit"):
        LLM(out, quantization="int8", max_model_len=64)
    with pytest.raises(QuantizationError, match="quantization: 'awq' given"):
        LLM(out, quantization="awq", max_model_len=64)
    with pytest.raises(QuantizationError, match="'gptq' needs a gptq checkpoint"):
        checkpoint_quantization("gptq", mini)
    with pytest.raises(QuantizationError, match="AWQ version 'gemv' is not supported"):
        LLM(variant("gemv", good, {"quant_method": "awq", "version": "gemv"}), max_model_len=64)


# ---- checkpoints written by a real producer ------------------------------------------------------------
FIXTURES = Path(__file__).parent / "fixtures" / "llmcompressor"


def check_producer_logits(ckpt: Path, reference: Path, method: str) -> None:
    """Baton's teacher-forced logits of `ckpt` against the producer-side reference: fp32 (the
    reference path) within 1e-4 of the largest logit with every argmax equal, bf16 (Baton's kernels)
    within 5% with 95% of them equal."""
    from safetensors.torch import load_file

    from baton import LLM
    from baton.backends.engine.scoring import window_logits

    ref = load_file(str(reference))
    ids, want = ref["input_ids"].tolist(), ref["logits"]
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 0.05)):
        llm = LLM(ckpt, dtype=dtype, max_model_len=256)
        try:
            assert llm.engine.quant is not None and llm.engine.quant.method == method
            got = window_logits(llm.engine, ids)
        finally:
            llm.close()
        assert (got - want).abs().max() <= tol * want.abs().max(), dtype
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= (1.0 if dtype == "float32" else 0.95)


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*") if p.is_dir()) or ["(none)"])
def test_llmcompressor_checkpoints_serve_what_transformers_computes_from_them(name):
    """tiny-qwen3 quantized by llmcompressor (GPTQ with calibration, tools/producers/): Baton's
    teacher-forced logits equal the ones transformers computed from the same files when they were
    made (compressed-tensors decompressing them), in fp32 on the reference path and in bf16 through
    Baton's kernels."""
    d = FIXTURES / name
    if not d.is_dir():
        pytest.skip("no producer fixtures")
    check_producer_logits(d, d / "reference_logits.safetensors", "compressed-tensors")


AUTOROUND = Path(__file__).parent / "fixtures" / "autoround"


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
@pytest.mark.parametrize("name", sorted(p.name for p in AUTOROUND.glob("*") if p.is_dir()) or ["(none)"])
def test_autoround_gptq_and_awq_exports_serve_the_producers_weights(name, fmt):
    """tiny-qwen3 quantized once by auto-round and exported in the AutoGPTQ and AutoAWQ layouts
    (tools/producers/): each export, read by Baton, gives the logits transformers computed from the
    same weights exported as compressed-tensors."""
    d = AUTOROUND / name
    if not d.is_dir():
        pytest.skip("no producer fixtures")
    check_producer_logits(d / fmt, d / "reference_logits.safetensors", fmt)


def test_int4_weights_survive_the_shared_weight_store():
    """What a node publishes for a 4-bit checkpoint (Baton's packed form, act-order permutation
    included, and the GPTQ layout other devices run) comes back from the shared file as it went in."""
    from conftest import weight_store_round_trip

    from baton.kernels.int4_linear import Int4Data, Int4LinearMethod, Int4Packed
    from baton.kernels.linear import LinearMethod
    from baton.kernels.quant import Int4Weight

    gen = torch.Generator().manual_seed(5)
    n, k, g = 128, 256, 64
    d = Int4Data(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                 torch.randint(1, 16, (n, k // g), generator=gen, dtype=torch.uint8), torch.rand(n, k // g) * 0.01, g,
                 (torch.arange(k) // g)[torch.randperm(k, generator=gen)])
    tensors = {"packed": Int4Packed.pack(d), "plain": Int4Packed.pack(Int4Data(d.q, d.zero, d.scale, g)),
               "gptq": Int4LinearMethod(torch.float32, "cpu", LinearMethod()).process(d)}
    assert isinstance(tensors["gptq"], Int4Weight)
    back = weight_store_round_trip(tensors)
    assert isinstance(back["packed"], Int4Packed) and back["packed"].perm is not None
    assert torch.equal(back["packed"].unpack().dequantize(), d.dequantize())
    assert back["plain"].perm is None and back["plain"].group_size == g
    w = back["gptq"]
    assert isinstance(w, Int4Weight) and w.group_size == g and torch.equal(w.g_idx.long(), d.g_idx)
    from baton.kernels.quant import dequantize_int4

    assert torch.equal(dequantize_int4(w), d.dequantize())


@pytest.mark.slow
def test_a_node_serves_a_gptq_checkpoint(tmp_path):
    """A 4-bit GPTQ checkpoint through Triton (single_node, detected from its config): the node
    publishes the packed weights once, every stage runs them, and streams equal the offline engine's."""
    from conftest import ROOT, blocks_in_use

    from baton import LLM, SamplingParams
    from baton.backends.serving.launcher import Node
    from baton.tools.quantize_rtn import quantize_checkpoint
    from baton_client import BatonClient

    ckpt = quantize_checkpoint(ROOT / "models" / "baton-tiny", tmp_path / "gptq", "gptq", 128, sym=False)
    prompts = ["def fibonacci(n):", "class Config:\n    def __init__(self"]
    llm = LLM(ckpt, dtype="bfloat16")
    expected = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20,
                                                                          ignore_eos=True))]
    llm.close()
    n = Node(str(ckpt), "single_node", overrides={"dtype": "bfloat16", "max_model_len": 512, "kv_cache_memory_mb": 8})
    n.start(timeout=180, quiet=True)
    try:
        assert n.manager is not None
        client = BatonClient(n.grpc_url)
        got = [client.generate(p, temperature=0.0, max_tokens=20, ignore_eos=True).token_ids for p in prompts]
        assert got == expected
        assert blocks_in_use(n.manager.address) == 0
    finally:
        n.stop()
