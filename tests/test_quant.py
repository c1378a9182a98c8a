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
needs_kernel = pytest.mark.skipif(not int8_linear.kernel_supported(), reason="needs the CPU extension on AVX512-BF16 and VNNI")


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
    assert blob.numel() == -(-N // 64) * 64 * -(-K // 4) * 4
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


@needs_kernel
@pytest.mark.parametrize("N,K,G", [(130, 256, 32), (64, 768, 128), (3, 64, 64), (200, 1024, 128)])
def test_int4_kernel_equals_the_dequantized_product_and_is_batch_invariant(N, K, G):
    """linear_int4 (Baton's packing, asymmetric zeros) against fp32 x @ dequant(W)^T (+ bias), then
    bf16-rounded; packing round trips; any row's result is bit-identical alone or in a batch."""
    from baton.kernels.int4_linear import Int4Data, Int4Linear, Int4Packed

    g = torch.Generator().manual_seed(N * K + G)
    d = Int4Data(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8),
                 torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8),
                 torch.rand(N, K // G, generator=g) * 0.02 + 1e-3, G)
    packed = Int4Packed.pack(d)
    back = packed.unpack()
    assert torch.equal(back.q, d.q) and torch.equal(back.zero, d.zero) and torch.equal(back.scale, d.scale)
    bias = torch.randn(N, generator=g).bfloat16()
    lin = Int4Linear(packed, bias)
    x = torch.randn(13, K, generator=g).bfloat16()
    y = lin.apply(x)
    ref = (x.float() @ d.dequantize().T + bias.float()).bfloat16().float()
    assert ((y.float() - ref).abs() <= ref.abs() * 2**-7 + 2e-3).all(), float((y.float() - ref).abs().max())
    for m in (1, 2, 5, 6, 7, 12):
        assert torch.equal(lin.apply(x[:m].contiguous()), y[:m])
    assert torch.equal(lin.apply(x[7:8].contiguous())[0], y[7])


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_kernels_keep_small_activations_beside_an_outlier_and_pass_nan_on(kind):
    """The quantized kernels multiply in integers, x cut into three bytes per element scaled to each
    128-k block's largest |x|: elements 2^12 below an outlier in their block stay exact (two bytes
    would keep 3 of their bits), so the product matches fp32 to one bf16 rounding; here the outliers
    meet zero weights, so the output is the small elements' share alone. A NaN in x makes its row's
    outputs NaN, and only its row's, as the bf16 kernel does."""
    from baton.kernels.int4_linear import Int4Data, Int4Linear, Int4Packed

    g = torch.Generator().manual_seed(5)
    N, K, spikes = 96, 384, [5, 200]
    if kind == "int8":
        w = torch.randn(N, K, generator=g) * 0.05
        w[:, spikes] = 0
        lin, ref_w = Int8Linear(Int8Weight.quantize(w, packed=True), None), \
            Int8Weight.quantize(w, packed=False).dequantize()
    else:
        d = Int4Data(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8),
                     torch.randint(0, 16, (N, K // 128), generator=g, dtype=torch.uint8),
                     torch.rand(N, K // 128, generator=g) * 0.02 + 1e-3, 128)
        d.q[:, spikes] = d.zero[:, [k // 128 for k in spikes]]
        lin, ref_w = Int4Linear(Int4Packed.pack(d), None), d.dequantize()
    assert (ref_w[:, spikes] == 0).all()
    x = torch.randn(4, K, generator=g)
    x[:, 5] = 4096.0                    # an outlier in the first block of every row
    x[1, 200] = -3000.0
    x = x.bfloat16()
    y = lin.apply(x).float()
    ref = (x.float() @ ref_w.T).bfloat16().float()
    assert ((y - ref).abs() <= ref.abs() * 2**-7 + 2e-3).all(), float((y - ref).abs().max())
    x[2, 300] = float("nan")
    y2 = lin.apply(x).float()
    assert y2[2].isnan().all()
    assert torch.equal(y2[[0, 1, 3]], y[[0, 1, 3]])


def test_int4_group_sizes_the_kernel_cannot_hold_are_errors_naming_them():
    """The formats pack K by 8s; a group size that is not a multiple of 8 (no producer writes one)
    is refused with its value, not computed wrongly."""
    from baton.kernels.int4_linear import Int4Data, Int4Packed

    d = Int4Data(torch.zeros(64, 48, dtype=torch.uint8), torch.zeros(64, 4, dtype=torch.uint8), torch.ones(64, 4), 12)
    with pytest.raises(ValueError, match="multiples of 8, not 48 and 12"):
        Int4Packed.pack(d)


def test_int8_weights_survive_the_shared_weight_store():
    from conftest import weight_store_round_trip

    w = torch.randn(130, 66)
    tensors = {"a": Int8Weight.quantize(w, True), "b": Int8Weight.quantize(w, False), "c": torch.ones(3)}
    back = weight_store_round_trip(tensors)
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


# ---- INT8 / FP8 KV cache ---------------------------------------------------------------------------
KV_DTYPES = [torch.int8, torch.float8_e4m3fn]


def _quantized_pool(dtype: torch.dtype, num_blocks: int = 12, bs: int = 16, kvh: int = 2, D: int = 64):
    from baton.backends.kv.pool import PoolSpec

    spec = PoolSpec(num_blocks, 3, bs, kvh, D, str(dtype).split(".")[-1])
    tensor = torch.zeros(spec.shape, dtype=spec.storage_dtype)
    return spec, tensor, spec.views(tensor)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
def test_kv_quantization_stores_what_its_definition_says(dtype, act):
    """store_kv into an int8/fp8 cache: per (token, kv head) scale = amax / qmax, element = x / scale
    rounded (int8: half up; fp8: torch's conversion), in the C++ kernel and the torch path alike."""
    from baton.kernels.kv_cache import QMAX, store_kv, store_kv_ref

    _, _, layers = _quantized_pool(dtype)
    _, _, ref_layers = _quantized_pool(dtype)
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(40, 2, 64, generator=g) * 4).to(act), torch.randn(40, 2, 64, generator=g).to(act)
    blocks, offsets = torch.tensor([5] * 16 + [2] * 16 + [9] * 8), torch.tensor(list(range(16)) * 2 + list(range(8)))
    store_kv(k, v, *layers[1][:2], blocks, offsets, *layers[1][2:])
    store_kv_ref(k, v, *ref_layers[1][:2], blocks, offsets, *ref_layers[1][2:])
    for a, b in zip(layers[1], ref_layers[1]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == dtype else a, b.view(torch.uint8) if b.dtype == dtype else b)
    kc, _, ks, _ = layers[1]
    for i in (0, 17, 39):
        for h in range(2):
            x = k[i, h].float()
            scale = x.abs().max() / QMAX[dtype]
            assert float(ks[blocks[i], offsets[i], h]) == pytest.approx(float(scale), rel=1e-6)
            row = kc[blocks[i], offsets[i], h].float() * ks[blocks[i], offsets[i], h]
            step = scale if dtype == torch.int8 else x.abs() * 2**-3 + scale * 2**-9   # int8 step; fp8: 3 mantissa bits
            assert ((row - x).abs() <= step / 2 + 1e-6).all()
    assert not layers[0][0].any() and not layers[2][2].any()       # other layers untouched


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
def test_quantized_kv_attention_equals_attention_over_the_dequantized_cache(dtype, act):
    """Decode and prefill attention reading an int8/fp8 cache (C++ kernels) equal the reference over
    the dequantized fp32 cache; a decode row equals the same row computed by prefill, bit for bit (a
    prefix cached by decode and recomputed by prefill must not differ)."""
    from baton.kernels.attention import (
        DecodeMeta,
        PrefillMeta,
        decode_attention,
        decode_attention_ref,
        prefill_attention,
        prefill_attention_ref,
    )
    from baton.kernels.kv_cache import store_kv

    _, _, layers = _quantized_pool(dtype)
    kc, vc, ks, vs = layers[0]
    g = torch.Generator().manual_seed(2)
    T, H = 45, 6
    k, v = (torch.randn(T, 2, 64, generator=g) * 3).to(act), torch.randn(T, 2, 64, generator=g).to(act)
    table = [7, 3, 10]
    blocks = torch.tensor([table[t // 16] for t in range(T)])
    store_kv(k, v, kc, vc, blocks, torch.arange(T) % 16, ks, vs)
    deq_k, deq_v = kc.float() * ks[..., None], vc.float() * vs[..., None]       # the dequantized cache
    q = torch.randn(T, H, 64, generator=g).to(act)
    pm = PrefillMeta.build([0], [T], [0], [table], 16)
    got = prefill_attention(q, k, v, kc, vc, pm, 0.125, ks, vs)
    want = prefill_attention_ref(q, k, v, deq_k, deq_v, pm, 0.125)
    tol = 1e-5 if act == torch.float32 else 2**-7
    assert ((got.float() - want.float()).abs() <= tol * (1 + want.float().abs())).all()
    for n in (1, 16, 17, T):
        dm = DecodeMeta.build([table], [n], 16)
        d = decode_attention(q[n - 1:n].contiguous(), kc, vc, dm, 0.125, ks, vs)
        ref = decode_attention_ref(q[n - 1:n].contiguous(), deq_k, deq_v, dm, 0.125)
        assert ((d.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all()
        if n == T:
            assert torch.equal(d[0], got[T - 1])


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_a_quantized_block_carries_its_scales(dtype):
    """A block's bytes are its K, V and scales: copying one block's span over another (what the
    hand-off, the transfer engine and the tiers do) reproduces its attention exactly. The pool holds
    1.88x (head_dim 64) / 1.94x (128) the blocks of bf16 in the same memory."""
    from baton.backends.kv.pool import PoolSpec
    from baton.kernels.attention import DecodeMeta, decode_attention
    from baton.kernels.kv_cache import store_kv

    spec, tensor, layers = _quantized_pool(dtype)
    g = torch.Generator().manual_seed(3)
    for kc, vc, ks, vs in layers:
        store_kv(torch.randn(16, 2, 64, generator=g), torch.randn(16, 2, 64, generator=g), kc, vc,
                 torch.full((16,), 4), torch.arange(16), ks, vs)
    tensor[9] = tensor[4]
    q = torch.randn(1, 6, 64, generator=g)
    for kc, vc, ks, vs in layers:
        a, b = (decode_attention(q, kc, vc, DecodeMeta.build([[blk]], [16], 16), 0.125, ks, vs) for blk in (4, 9))
        assert torch.equal(a, b) and a.abs().sum() > 0
    for D, ratio in ((64, 1.88), (128, 1.93)):
        plain, quant = (PoolSpec(1, 28, 16, 8, D, dt).block_bytes for dt in ("bfloat16", str(dtype).split(".")[-1]))
        assert plain / quant >= ratio


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_kv_outputs_do_not_depend_on_caching_chunking_or_batching(qwen3_dir, kv):
    """Over an int8/fp8 cache, greedy tokens are the same alone or batched, with prompts prefilled
    whole or in 16-token chunks, and with their prefix read back from the cache."""
    from conftest import prompts_of

    from baton import LLM, SamplingParams

    prompts = prompts_of(512, [40, 70, 23], seed=5)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    base = LLM(qwen3_dir, dtype="float32", kv_cache_dtype=kv, enable_prefix_caching=False, max_model_len=256)
    chunked = LLM(qwen3_dir, dtype="float32", kv_cache_dtype=kv, max_num_batched_tokens=16, max_model_len=256)
    try:
        alone = [base.generate([p], sp)[0].token_ids for p in prompts]
        assert [o.token_ids for o in base.generate(prompts, sp)] == alone
        assert [o.token_ids for o in chunked.generate(prompts, sp)] == alone
        again = chunked.generate(prompts, sp)                      # prefixes now cached
        assert [o.token_ids for o in again] == alone and all(o.num_cached_tokens for o in again)
    finally:
        base.close()
        chunked.close()


def test_kv_quantization_perplexity_stays_close(windows):
    """baton-tiny's held-out text: INT8 KV within +0.5% of bf16's perplexity, FP8 within +1.5%."""
    from baton import LLM
    from baton.backends.engine.scoring import score

    ppl = {}
    for kv in ("auto", "int8", "fp8"):
        llm = LLM(TARGET, dtype="bfloat16", kv_cache_dtype=kv)
        try:
            ppl[kv] = score(llm.engine, windows).perplexity
        finally:
            llm.close()
    assert ppl["int8"] <= ppl["auto"] * 1.005 and ppl["fp8"] <= ppl["auto"] * 1.015
    assert ppl["int8"] != ppl["auto"] != ppl["fp8"]            # the caches really were quantized


def test_bad_kv_cache_dtype_is_an_error_naming_the_field():
    from baton.backends.engine.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="kv_cache_dtype: expected 'auto' or 'int8'"):
        EngineConfig(model=str(TARGET), kv_cache_dtype="int4")


@pytest.mark.slow
def test_a_node_serves_int8_weights_over_an_int8_kv_cache():
    """Profile single_node_int8 through Triton: streamed tokens equal the offline engine's with the
    same quantization (prefill -> decode hand-off through the shared int8 pool, blocks with their
    scales), alone and 6 at once with shared prefixes; no block left in use, after a cancelled
    stream too."""
    import threading

    from conftest import blocks_in_use

    from baton import LLM, SamplingParams
    from baton.backends.serving.launcher import Node
    from baton_client import BatonClient

    prompts = ["def fibonacci(n):", "import os\nimport sys\n\nclass Config:", "    def __init__(self, path):"]
    prompts += [p + "\n    return" for p in prompts]
    llm = LLM(TARGET, dtype="bfloat16", quantization="int8", kv_cache_dtype="int8")
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = {p: o.token_ids for p, o in zip(prompts, llm.generate(prompts, sp))}
    llm.close()
    n = Node(str(TARGET), "single_node_int8", overrides={"max_model_len": 512, "kv_cache_memory_mb": 8})
    n.start(timeout=180, quiet=True)
    try:
        assert n.manager is not None
        client = BatonClient(n.grpc_url)
        chunks = list(client.stream(prompts[0], temperature=0.0, max_tokens=24, ignore_eos=True))
        assert [t for c in chunks for t in c.token_ids] == expected[prompts[0]]
        got: dict[str, list[int]] = {}

        def one(p: str) -> None:
            got[p] = client.generate(p, temperature=0.0, max_tokens=24, ignore_eos=True).token_ids

        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == expected
        for i, _ in enumerate(client.stream(prompts[1], temperature=0.0, max_tokens=200, ignore_eos=True)):
            if i == 2:
                break                                  # leaving the loop cancels the request
        assert blocks_in_use(n.manager.address) == 0
    finally:
        n.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's CUDA path needs a GPU")
@pytest.mark.parametrize("quantization,kv", [("int8", "auto"), ("", "int8"), ("", "fp8"), ("int8", "int8")])
def test_quantized_weights_and_kv_on_cuda_compute_what_the_cpu_computes(windows, quantization, kv):
    """The CUDA engine (Triton int8 GEMM, scaled-KV decode kernel, dequantizing prefill) scores
    held-out text like the CPU engine with the same quantization: logits within bf16 noise, top-1
    agreement above 97%, and it generates."""
    from baton import LLM, SamplingParams
    from baton.backends.engine.scoring import window_logits

    kw = {"dtype": "bfloat16", "quantization": quantization, "kv_cache_dtype": kv, "max_model_len": 512}
    gpu, cpu = LLM(TARGET, device="cuda", **kw), LLM(TARGET, **kw)
    try:
        for ids in windows:
            lg, lc = window_logits(gpu.engine, ids), window_logits(cpu.engine, ids)
            assert (lg - lc).abs().mean() < 0.05 * lc.abs().mean()
            assert (lg.argmax(-1) == lc.argmax(-1)).float().mean() > 0.97
        out = gpu.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        assert len(out[0].token_ids) == 16
    finally:
        gpu.close()
        cpu.close()
