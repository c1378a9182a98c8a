"""Each op's fast paths (fused C++ kernels, and the torch fallback) match its torch reference."""


import pytest
import torch
import torch.nn.functional as F

from baton.kernels import attention, cpu_ext, kv_cache, norm, rotary
from baton.kernels.activation import silu_and_mul, silu_and_mul_ref
from baton.kernels.attention import DecodeMeta, PrefillMeta
from baton.kernels.linear import (
    LinearWeight,
    PackedWeight,
    can_share_packed,
    linear,
    linear_ref,
    onednn_packs,
    pack_weight,
)


@pytest.fixture(autouse=True, params=["fused", "torch"])
def impl(request, monkeypatch):
    """Run every test on the fused CPU kernels and again on the plain torch path."""
    if request.param == "fused":
        if not cpu_ext.available():
            pytest.skip("fused CPU kernels could not be built here")
    else:
        monkeypatch.setitem(cpu_ext._state, "ok", False)
    return request.param


def _cache(num_blocks, bs, kvh, d, dtype, layers=3):
    # a block-major pool, like KVPool's, so the per-layer views are strided
    pool = torch.randn(num_blocks, layers, 2, bs, kvh, d).to(dtype)
    return pool[:, 1, 0], pool[:, 1, 1]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("group, d", [(1, 64), (4, 64), (8, 128), (3, 40)])   # d=40: the scalar C++ path
def test_decode_attention(dtype, tol, group, d):
    torch.manual_seed(0)
    bs, kvh, num_blocks = 16, 2, 40
    kc, vc = _cache(num_blocks, bs, kvh, d, dtype)
    lens = [1, 16, 37, 100]                        # one token, exact block, ragged, long
    tables = [torch.randperm(num_blocks)[: -(-n // bs)].tolist() for n in lens]
    meta = DecodeMeta.build(tables, lens, bs)
    q = torch.randn(len(lens), kvh * group, d).to(dtype)
    ref = attention.decode_attention_ref(q, kc, vc, meta, d ** -0.5)
    out = attention.decode_attention(q, kc, vc, meta, d ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_decode_attention_max_blocks():
    bs, kvh, d, num_blocks = 4, 1, 64, 12
    kc, vc = _cache(num_blocks, bs, kvh, d, torch.float32)
    meta = DecodeMeta.build([list(range(num_blocks))], [num_blocks * bs], bs)   # every block of the pool
    q = torch.randn(1, 4, d)
    torch.testing.assert_close(attention.decode_attention(q, kc, vc, meta, 0.125),
                               attention.decode_attention_ref(q, kc, vc, meta, 0.125))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("group, d", [(1, 64), (4, 64), (8, 128)])
def test_prefill_attention_with_cached_prefix(dtype, tol, group, d):
    """Several sequences in one call: no prefix, a block-aligned prefix, a ragged one, a single-token
    chunk and chunks longer than the fused kernel's 16-row tile; q is a view of a fused qkv, as the
    model passes it."""
    torch.manual_seed(1)
    bs, kvh, num_blocks = 16, 2, 40
    kc, vc = _cache(num_blocks, bs, kvh, d, dtype)
    q_lens, prefixes = [5, 20, 33, 1, 40], [0, 32, 7, 50, 0]
    perm, tables = torch.randperm(num_blocks).tolist(), []      # disjoint, scattered blocks
    for n, p in zip(q_lens, prefixes):
        tables.append(perm[: -(-(n + p) // bs)])
        perm = perm[len(tables[-1]):]
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    T, H = sum(q_lens), kvh * group
    qkv = torch.randn(T, H + 2 * kvh, d).to(dtype)
    q, k, v = qkv[:, :H], qkv[:, H:H + kvh], qkv[:, H + kvh:]
    slots_b, slots_o = [], []
    for n, p, bt in zip(q_lens, prefixes, tables):
        slots_b += [bt[j // bs] for j in range(p, p + n)]
        slots_o += [j % bs for j in range(p, p + n)]
    kv_cache.store_kv(k, v, kc, vc, torch.tensor(slots_b), torch.tensor(slots_o))
    meta = PrefillMeta.build(starts, q_lens, prefixes, tables, bs)
    ref = attention.prefill_attention_ref(q, k, v, kc, vc, meta, d ** -0.5)
    out = attention.prefill_attention(q, k, v, kc, vc, meta, d ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_store_kv_matches_reference():
    kc, vc = _cache(6, 4, 2, 8, torch.float32)
    kc2, vc2 = kc.clone(), vc.clone()
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    b, o = torch.tensor([3, 3, 0, 5, 1]), torch.tensor([0, 1, 3, 2, 0])
    kv_cache.store_kv(k, v, kc, vc, b, o)
    kv_cache.store_kv_ref(k, v, kc2, vc2, b, o)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms(dtype):
    x, r, w = torch.randn(7, 64).to(dtype), torch.randn(7, 64).to(dtype), torch.randn(64).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6), atol=tol, rtol=tol)
    out, res = norm.add_rms_norm(x, r.clone(), w, 1e-6)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, norm.rms_norm_ref(x + r, w, 1e-6), atol=tol, rtol=tol)
    per_head = torch.randn(3, 64).to(dtype)
    h = torch.randn(7, 3, 64).to(dtype)
    torch.testing.assert_close(norm.rms_norm(h, per_head, 1e-6), norm.rms_norm_ref(h, per_head, 1e-6))


def test_rotary_matches_transformers_convention():
    from baton.backends.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
    })
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=500000.0,
                         rope_scaling=cfg.rope_scaling)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(cfg.rope_inv_freq(), hf_inv.float())
    cache = rotary.RotaryCache(cfg.rope_inv_freq(), 128, torch.float32)
    x, pos = torch.randn(9, 3, 32), torch.tensor([0, 1, 5, 17, 64, 65, 100, 127, 3])
    torch.testing.assert_close(rotary.apply_rotary(x, *cache.lookup(pos)), rotary.apply_rotary_ref(x, pos, cache))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [True, False])
def test_qk_norm_rope_in_place_on_fused_qkv_view(dtype, with_norm):
    from baton.backends.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 64,
                                    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "head_dim": 32})
    cache = rotary.RotaryCache(cfg.rope_inv_freq(), 64, dtype)
    T, H, KV, D = 5, 4, 2, 32
    qkv = torch.randn(T, H + 2 * KV, D).to(dtype)
    w = torch.randn(H + KV, D).to(dtype) if with_norm else None
    pos = torch.tensor([0, 3, 7, 8, 63])
    x = qkv[:, : H + KV].clone()
    if with_norm:
        x = norm.rms_norm_ref(x, w, 1e-6)
    expected = rotary.apply_rotary_ref(x, pos, cache)
    v_before = qkv[:, H + KV:].clone()
    rotary.qk_norm_rope_(qkv[:, : H + KV], w, pos, cache, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(qkv[:, : H + KV], expected, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, H + KV:], v_before)          # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 8, 33])
def test_linear_and_activation(dtype, m):
    """fp16: packed where oneDNN supports it on this CPU, else F.linear (it must not fail)."""
    w, b = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    lw = LinearWeight(w, b)
    x = torch.randn(m, 64).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 0.25   # bf16/fp16 output rounding at |y| ~ 8-30
    torch.testing.assert_close(linear(x, lw).float(), linear_ref(x, lw).float(), atol=tol, rtol=2e-2)
    g = torch.randn(m, 128).to(dtype)
    torch.testing.assert_close(silu_and_mul(g), silu_and_mul_ref(g))


@pytest.mark.skipif(not onednn_packs(torch.bfloat16), reason="needs oneDNN's bf16 packing (AVX512BW/VL/DQ or "
                    "AVX-NE-CONVERT; on other CPUs bf16 weights stay unpacked)")
@pytest.mark.parametrize("m", [1, 17])
def test_packed_weight_bytes_wrap_back_exactly(impl, m):
    """pack_weight() copies oneDNN's blocked buffer out; wrapping those bytes (as a stage does with the node's
    shared file) must compute exactly what the private packed weight computes."""
    w, b = torch.randn(96, 64).to(torch.bfloat16), torch.randn(96).to(torch.bfloat16)
    pw = pack_weight(w)
    assert pw.blob.dtype == torch.uint8 and pw.shape == (96, 64)
    shared = pw.blob.clone()                                  # another owner of the same bytes
    if not can_share_packed(torch.bfloat16):                  # the torch path: a clear error, not a crash
        with pytest.raises(RuntimeError, match="CPU extension"):
            LinearWeight(PackedWeight(shared, pw.md, pw.shape, pw.dtype), b)
        return
    wrapped = LinearWeight(PackedWeight(shared, pw.md, pw.shape, pw.dtype), b)
    assert wrapped.weight is None and wrapped._blob is shared
    x = torch.randn(m, 64).to(torch.bfloat16)
    assert torch.equal(linear(x, wrapped), linear(x, LinearWeight(w, b)))


@pytest.mark.parametrize("m", [1, 5, 8, 12, 13, 40])
@pytest.mark.parametrize("n, k", [(96, 64), (100, 72), (1280, 768)])
def test_packed_linear_reads_onednn_layout(impl, m, n, k):
    """bf16 rows of any count go through linear_packed_bf16 over oneDNN's packed bytes (padded shapes
    and partial row groups too); the torch path keeps F.linear."""
    torch.manual_seed(2)
    w, b = (torch.randn(n, k) * 0.1).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
    lw = LinearWeight(w, b)
    if impl == "fused" and torch.ops.baton_cpu.packed_bf16_supported():
        assert lw.direct and pack_weight(w).layout == "n64k32p2"
    x = torch.randn(m, k).to(torch.bfloat16)
    ref = x.float() @ w.float().t() + b.float()
    torch.testing.assert_close(linear(x, lw).float(), ref, atol=0.05, rtol=1e-2)


def test_packed_linear_rows_do_not_depend_on_the_batch():
    """A row's result is bit-identical whatever it is batched with: alone, in any slice, at any offset
    (oneDNN's rows differ in the last bit with M; with prefix caching that flipped greedy tokens)."""
    if not (cpu_ext.available() and torch.ops.baton_cpu.packed_bf16_supported()):
        pytest.skip("needs the CPU extension on an AVX512-BF16 CPU")
    torch.manual_seed(3)
    lw = LinearWeight((torch.randn(1280, 768) * 0.05).to(torch.bfloat16), torch.randn(1280).to(torch.bfloat16))
    assert lw.direct
    x = torch.randn(150, 768).to(torch.bfloat16)
    full = linear(x, lw)
    for s, e in [(0, 1), (149, 150), (5, 12), (3, 16), (60, 150), (1, 131)]:
        assert torch.equal(linear(x[s:e].contiguous(), lw), full[s:e]), (s, e)


@pytest.mark.parametrize("m", [1, 2, 3, 7, 64, 65])
@pytest.mark.parametrize("n, k, bias", [(96, 64, True), (101, 77, False), (1024, 512, True)])
def test_fp32_linear_kernel(impl, m, n, k, bias):
    """fp32 rows up to F32_KERNEL_ROWS run linear_f32 (odd N and K: partial weight blocks, k tails);
    more rows, and the torch path, keep F.linear. Both agree with a float64 reference."""
    from baton.kernels.linear import F32_KERNEL_ROWS

    torch.manual_seed(4)
    w, b = torch.randn(n, k), torch.randn(n) if bias else None
    lw = LinearWeight(w, b)
    x = torch.randn(m, k)
    uses_kernel = impl == "fused" and torch.ops.baton_cpu.linear_f32_supported()
    assert lw.f32 == uses_kernel
    if uses_kernel:
        calls = []
        real = torch.ops.baton_cpu.linear_f32
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.ops.baton_cpu, "linear_f32", lambda *a: calls.append(1) or real(*a))
            y = linear(x, lw)
        assert bool(calls) == (m <= F32_KERNEL_ROWS)
    else:
        y = linear(x, lw)
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)


def test_fp32_linear_rows_do_not_depend_on_the_batch():
    """linear_f32's rows are bit-identical however they are batched (pairs, a lone last row, any offset)."""
    if not (cpu_ext.available() and torch.ops.baton_cpu.linear_f32_supported()):
        pytest.skip("needs the CPU extension on an AVX2+FMA CPU")
    torch.manual_seed(5)
    w, b = torch.randn(515, 203), torch.randn(515)
    x = torch.randn(40, 203)
    full = torch.ops.baton_cpu.linear_f32(x, w, b)
    for s, e in [(0, 1), (39, 40), (5, 12), (3, 16), (1, 40), (7, 8)]:
        assert torch.equal(torch.ops.baton_cpu.linear_f32(x[s:e].contiguous(), w, b), full[s:e]), (s, e)


@pytest.mark.parametrize("m, n, k", [(1, 64, 96), (5, 67, 203), (80, 130, 64)])
def test_bf16_linear_kernel_where_torch_has_no_native_bf16(impl, monkeypatch, m, n, k):
    """Without native bf16 GEMMs (AVX2: torch's bf16 F.linear converts element by element) plain bf16
    weights run linear_bf16 at any row count: within one bf16 rounding of torch's result (both
    accumulate in fp32 and round once), rows bit-identical however they are batched."""
    import importlib

    lin = importlib.import_module("baton.kernels.linear")    # the package's `linear` is the function
    monkeypatch.setattr(lin, "native_half_matmul", lambda dtype: False)    # as on such a CPU, anywhere
    torch.manual_seed(6)
    w, b, x = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16(), torch.randn(m, k).bfloat16()
    lw = LinearWeight(w, b, pack=False)
    assert lw.bf16 == (impl == "fused" and torch.ops.baton_cpu.linear_f32_supported())
    y = linear(x, lw)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(y.double(), ref, atol=0.05, rtol=1 / 128)          # one bf16 rounding
    torch.testing.assert_close(y, F.linear(x, w, b), atol=0.05, rtol=1 / 128)
    if lw.bf16:
        for s, e in [(0, 1), (m - 1, m), (1, m)]:
            assert torch.equal(linear(x[s:e].contiguous(), lw), y[s:e]), (s, e)
    # on a CPU with native bf16 GEMMs torch's own path stays
    monkeypatch.setattr(lin, "native_half_matmul", lambda dtype: True)
    assert not LinearWeight(w, b, pack=False).bf16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group, d", [(1, 64), (3, 64), (4, 128), (8, 64)])
def test_attention_rows_do_not_depend_on_the_kernel_or_chunk(impl, dtype, group, d):
    """A query's output is bit-identical from the decode kernel, from prefill as one row of a whole
    prompt, and from prefill as a row of a chunk after a cached prefix (head_dim a multiple of 16)."""
    if impl == "torch":
        pytest.skip("the torch paths make no bit-identity promise")
    torch.manual_seed(1)
    bs, kvh, L = 16, 2, 83
    kc, vc = _cache(8, bs, kvh, d, dtype)
    table = [6, 2, 7, 0, 5, 3]
    q = torch.randn(L, kvh * group, d).to(dtype)
    whole = attention.prefill_attention(q, None, None, kc, vc, PrefillMeta.build([0], [L], [0], [table], bs), 0.125)
    for start in (1, 16, 40, 82):                 # a chunk after a cached prefix of `start` tokens
        meta = PrefillMeta.build([0], [L - start], [start], [table], bs)
        part = attention.prefill_attention(q[start:].contiguous(), None, None, kc, vc, meta, 0.125)
        assert torch.equal(part, whole[start:]), start
    for n in (1, 16, 17, 50, 83):                 # the last query of an n-token context, as decode
        one = attention.decode_attention(q[n - 1:n].contiguous(), kc, vc, DecodeMeta.build([table], [n], bs), 0.125)
        assert torch.equal(one[0], whole[n - 1]), n


def test_decode_attention_reads_strided_q():
    """The model passes q as a view of the fused qkv rows."""
    kc, vc = _cache(8, 4, 2, 16, torch.float32)
    meta = DecodeMeta.build([[3, 1], [5]], [6, 2], 4)
    qkv = torch.randn(2, 8 + 4, 16)
    q = qkv[:, :8]
    torch.testing.assert_close(attention.decode_attention(q, kc, vc, meta, 0.25),
                               attention.decode_attention_ref(q.contiguous(), kc, vc, meta, 0.25))
