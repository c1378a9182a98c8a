"""Quantization: weight-only INT8 (kernels/int8_linear.py), quantized at load, served through the
engine and a Triton node; the formats' dequantization against straightforward references."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from baton.kernels import int8_linear
from baton.kernels.int8_linear import Int8Linear, Int8Weight, pack_int8, unpack_int8
from baton.kernels.quant import quantize_int8

TARGET = ROOT / "models" / "baton-tiny"
SLICE = (ROOT / "models" / "heldout-slice.txt").read_text(encoding="utf-8")
needs_kernel = pytest.mark.skipif(not int8_linear.kernel_supported(), reason="needs the CPU extension on AVX512-BF16")


def test_int8_quantization_follows_its_definition():
    """Symmetric, per output channel: scale = max|w| / 127, q = round(w / scale) in [-127, 127]."""
    w = torch.randn(37, 70) * torch.linspace(0.01, 3, 37)[:, None]
    q, s = quantize_int8(w)
    for n in range(37):
        scale = max(abs(float(v)) for v in w[n]) / 127
        assert float(s[n]) == pytest.approx(scale, rel=1e-6)
        assert q[n].tolist() == [max(-127, min(127, round(float(v) / scale))) for v in w[n]]
    assert (Int8Weight.quantize(w, False).dequantize() - w).abs().max() <= s.max() / 2 + 1e-6


@pytest.mark.parametrize("N,K", [(64, 64), (130, 66), (5, 7), (200, 1023)])
def test_int8_packing_round_trips(N, K):
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    blob = pack_int8(q)
    assert blob.numel() == -(-N // 64) * 64 * (K + K % 2)
    assert torch.equal(unpack_int8(blob, N, K), q)


@needs_kernel
@pytest.mark.parametrize("N,K", [(130, 66), (64, 7), (1024, 768), (3, 5)])
def test_int8_kernel_equals_the_dequantized_product_and_is_batch_invariant(N, K):
    """linear_int8 against fp32 x @ dequant(W)^T (+ bias), then bf16-rounded; any row's result is
    bit-identical whether it runs alone or in a batch of any size."""
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g) * 0.05
    bias = torch.randn(N, generator=g).bfloat16()
    lin = Int8Linear(Int8Weight.quantize(w, packed=True), bias)
    ref_w = Int8Weight.quantize(w, packed=False).dequantize()
    x = torch.randn(13, K, generator=g).bfloat16()
    y = lin.apply(x)
    ref = (x.float() @ ref_w.T + bias.float()).bfloat16().float()
    # one bf16 rounding of the output apart (fp32 sums in another order)
    assert ((y.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-3).all()
    for m in (1, 2, 5, 6, 7, 12):
        assert torch.equal(lin.apply(x[:m].contiguous()), y[:m])
    assert torch.equal(lin.apply(x[7:8].contiguous())[0], y[7])


def test_int8_weights_survive_the_shared_weight_store():
    from baton.backends.loader import weight_store

    w = torch.randn(130, 66)
    tensors = {"a": Int8Weight.quantize(w, True), "b": Int8Weight.quantize(w, False), "c": torch.ones(3)}
    name = f"test-int8-{torch.randint(0, 10**9, ()).item()}"
    try:
        weight_store.publish(name, tensors)
        back = weight_store.attach(name)
    finally:
        weight_store.unlink(name)
    for k in ("a", "b"):
        assert isinstance(back[k], Int8Weight) and back[k].shape == (130, 66)
        assert back[k].packed == tensors[k].packed
        assert torch.equal(back[k].dequantize(), tensors[k].dequantize())
    assert torch.equal(back["c"], tensors["c"])


def _dequantized_reference_weights() -> dict[str, torch.Tensor]:
    """baton-tiny's prepared fp32 weights with every GEMM weight (lm_head too) replaced by its int8
    round trip: the model INT8 quantization defines."""
    from baton.backends.loader.safetensors_loader import load_state_dict
    from baton.backends.models.config import ModelConfig
    from baton.backends.models.decoder import LINEARS, prepare_weights

    cfg = ModelConfig.from_dir(TARGET)
    w = prepare_weights(cfg, load_state_dict(TARGET, torch.float32))
    names = [f"layers.{i}.{n}.weight" for i in range(cfg.num_layers) for n in LINEARS]
    w["lm_head"] = w.get("lm_head", w["embed"])
    for name in names + ["lm_head"]:
        w[name] = Int8Weight.quantize(w[name].bfloat16(), False).dequantize()
    return w


@pytest.fixture(scope="module")
def windows() -> list[list[int]]:
    from transformers import AutoTokenizer

    from baton.tools.train.tiny import heldout_slice_windows

    tok = AutoTokenizer.from_pretrained(str(TARGET))
    return [list(map(int, w)) for w in heldout_slice_windows(tok, SLICE, 256, 2)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_int8_model_computes_the_dequantized_model(windows, dtype):
    """Teacher-forced logits of LLM(quantization="int8") on held-out text are those of the fp32 model
    whose weights are the int8 round trip: closer to it than to the original model's (by 5x and more
    with fp32 activations), so the engine runs the quantized model and not something near the
    original."""
    from baton import LLM
    from baton.backends.engine.scoring import window_logits

    q = LLM(TARGET, dtype=dtype, quantization="int8")
    ref = LLM(TARGET, dtype="float32", weights=_dequantized_reference_weights())
    orig = LLM(TARGET, dtype="float32")
    try:
        for ids in windows:
            lq, lr, lo = (window_logits(e.engine, ids) for e in (q, ref, orig))
            to_ref, to_orig = (lq - lr).abs().mean(), (lq - lo).abs().mean()
            # bf16 activations round as much as int8 weights do: there only the order is asserted
            assert to_ref * (5 if dtype == "float32" else 1) < to_orig, (float(to_ref), float(to_orig))
            assert (lq.argmax(-1) == lr.argmax(-1)).float().mean() > 0.97
    finally:
        for e in (q, ref, orig):
            e.close()


def test_int8_perplexity_and_greedy_tokens_stay_close(windows):
    """Quality on baton-tiny's held-out text: INT8 perplexity within 1% of bf16's, top-1 agreement
    with bf16 above 97%."""
    from baton import LLM
    from baton.backends.engine.scoring import score

    bf, q = LLM(TARGET, dtype="bfloat16"), LLM(TARGET, dtype="bfloat16", quantization="int8")
    try:
        sb, sq = score(bf.engine, windows), score(q.engine, windows)
    finally:
        bf.close()
        q.close()
    assert sq.perplexity == pytest.approx(sb.perplexity, rel=0.01)
    assert (sq.argmax == sb.argmax).float().mean() > 0.97


def test_bad_quantization_settings_are_errors_naming_the_field():
    from baton import LLM
    from baton.backends.engine.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="quantization: unknown method 'int3'"):
        EngineConfig(model=str(TARGET), quantization="int3")
    with pytest.raises(ConfigError, match="quantization: expected str"):
        EngineConfig(model=str(TARGET), quantization=8)     # type: ignore[arg-type]
    llm = LLM(TARGET, dtype="float32", quantization=None, max_model_len=64)   # vLLM's "not quantized"
    llm.close()
