"""Triton kernels against the torch references: on a GPU for real, else in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest) on small shapes, since the interpreter is slow."""

import pytest
import torch

triton = pytest.importorskip("triton")

from baton.kernels import attention  # noqa: E402
from baton.kernels.attention import DecodeMeta  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _pool(num_blocks, page, kvh, d, dtype, layers=2):
    pool = torch.randn(num_blocks, layers, 2, page, kvh, d, device=DEV).to(dtype)
    return pool[:, 1, 0], pool[:, 1, 1]


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("group, d", [(1, 64), (4, 64), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention(group, d, dtype, splits):
    from baton.kernels.gpu.decode_attention import decode_attention

    torch.manual_seed(0)
    page, kvh, nb = 16, 2, 24
    kc, vc = _pool(nb, page, kvh, d, dtype)
    lens = [1, 16, 37, 96]          # a single token, an exact page, ragged, the longest
    tables = [torch.randperm(nb)[: -(-n // page)].tolist() for n in lens]
    meta = DecodeMeta.build(tables, lens, page)
    q = torch.randn(len(lens), kvh * group, d, device=DEV).to(dtype)
    bt, cl = meta.block_tables.to(DEV), meta.context_lens.to(DEV)
    out = decode_attention(q, kc, vc, bt, cl, d ** -0.5, max(lens), splits=splits)
    ref = attention.decode_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), meta, d ** -0.5)
    assert _rel(out.cpu(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_decode_attention_every_block_of_the_pool():
    from baton.kernels.gpu.decode_attention import decode_attention

    page, kvh, d, nb = 16, 1, 64, 6
    kc, vc = _pool(nb, page, kvh, d, torch.float32)
    meta = DecodeMeta.build([list(range(nb))[::-1]], [nb * page], page)
    q = torch.randn(1, 4, d, device=DEV)
    out = decode_attention(q, kc, vc, meta.block_tables.to(DEV), meta.context_lens.to(DEV), 0.125, nb * page, splits=2)
    assert _rel(out.cpu(), attention.decode_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), meta, 0.125)) < 1e-5


@pytest.mark.parametrize("group, d", [(1, 64), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_with_cached_prefix(group, d, dtype):
    from baton.kernels.gpu.prefill_attention import prefill_attention
    from baton.kernels.kv_cache import store_kv_ref

    torch.manual_seed(1)
    page, kvh, nb = 16, 2, 40
    kc, vc = _pool(nb, page, kvh, d, dtype)
    q_lens, prefixes = [5, 40, 1, 33], [0, 32, 7, 16]        # fresh, long prefix, one token, mid-page
    tables = [torch.randperm(nb)[: -(-(n + p) // page)].tolist() for n, p in zip(q_lens, prefixes)]
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    T = sum(q_lens)
    q = torch.randn(T, kvh * group, d, device=DEV).to(dtype)
    k, v = torch.randn(T, kvh, d, device=DEV).to(dtype), torch.randn(T, kvh, d, device=DEV).to(dtype)
    sb, so = [], []
    for n, p, bt in zip(q_lens, prefixes, tables):
        sb += [bt[j // page] for j in range(p, p + n)]
        so += [j % page for j in range(p, p + n)]
    store_kv_ref(k, v, kc, vc, torch.tensor(sb), torch.tensor(so))
    meta = attention.PrefillMeta.build(starts, q_lens, prefixes, tables, page)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEV)
    out = prefill_attention(q, kc, vc, bt, starts, q_lens, prefixes, d ** -0.5, block_m=16, block_n=16)
    ref = attention.prefill_attention_ref(q.cpu(), k.cpu(), v.cpu(), kc.cpu(), vc.cpu(), meta, d ** -0.5)
    assert _rel(out.cpu(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear(m, with_bias):
    from baton.kernels import quant
    from baton.kernels.gpu.quant_linear import int8_linear

    torch.manual_seed(2)
    w, sc = quant.quantize_int8(torch.randn(96, 160))
    x = torch.randn(m, 160).to(torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16) if with_bias else None
    ref = quant.int8_linear_ref(x, w, sc, bias)
    out = int8_linear(x.to(DEV), w.to(DEV), sc.to(DEV), bias.to(DEV) if with_bias else None)
    assert _rel(out.cpu(), ref) < 1e-2
    split = int8_linear(x.to(DEV), w.to(DEV), sc.to(DEV), bias.to(DEV) if with_bias else None,
                        cfg=(16, 32, 32, 4, 2, 3))          # split-K partials, bias added once
    assert _rel(split.cpu(), ref) < 1e-2
    assert _rel(quant.int8_linear(x, w, sc, bias), ref) < 1e-2       # CPU fast path


@pytest.mark.parametrize("fmt", ["gptq", "gptq-v2", "awq", "gptq-act-order"])
@pytest.mark.parametrize("m", [1, 20])
def test_int4_linear(fmt, m):
    from baton.kernels import quant
    from baton.kernels.gpu.quant_linear import int4_linear

    torch.manual_seed(3)
    N, K, G = 64, 256, 64
    q, z, s = quant.quantize_int4(torch.randn(N, K), G)
    if fmt == "awq":
        w = quant.pack_awq(q, z, s.half(), G)
    else:
        w = quant.pack_gptq(q, z, s.half(), G, zero_offset=0 if fmt == "gptq-v2" else 1)
    if fmt == "gptq-act-order":
        w.g_idx = torch.randperm(K) // G % (K // G)   # a permuted group assignment
        w.g_idx = w.g_idx.to(torch.int32)
    x = torch.randn(m, K).to(torch.bfloat16)
    ref = quant.int4_linear_ref(x, w)
    dev_w = quant.Int4Weight(w.qweight.to(DEV), w.qzeros.to(DEV), w.scales.to(DEV), G, w.fmt,
                             w.g_idx.to(DEV) if w.g_idx is not None else None, w.zero_offset)
    assert _rel(int4_linear(x.to(DEV), dev_w).cpu(), ref) < 1e-2
    assert _rel(int4_linear(x.to(DEV), dev_w, reshape=False).cpu(), ref) < 1e-2
    assert _rel(int4_linear(x.to(DEV), dev_w, cfg=(16, 32, 64, 4, 2, 2)).cpu(), ref) < 1e-2
    assert _rel(quant.int4_linear(x, w), ref) < 1e-2                  # CPU fast path


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_kv_store_and_decode(qdtype):
    """Store quantizes rows (per block, slot, kv head scale); decode dequantizes. Triton kernels and
    the CPU path both match the reference, and the result stays close to unquantized attention."""
    from baton.kernels import kv_cache
    from baton.kernels.gpu.decode_attention import decode_attention as gpu_decode
    from baton.kernels.gpu.kv_cache import store_kv as gpu_store

    if qdtype == torch.float8_e4m3fn and DEV == "cpu":
        pytest.skip("numpy (the Triton interpreter) has no fp8; fp8 runs on the GPU")
    torch.manual_seed(4)
    page, kvh, d, nb, group = 16, 2, 64, 12, 4
    lens = [20, 45]
    tables = [[3, 7], [0, 11, 5]]
    T = sum(lens)
    k, v = torch.randn(T, kvh, d).to(torch.bfloat16), torch.randn(T, kvh, d).to(torch.bfloat16)
    sb = torch.tensor([tables[i][j // page] for i, n in enumerate(lens) for j in range(n)])
    so = torch.tensor([j % page for n in lens for j in range(n)])

    def fresh():
        kc = torch.zeros(nb, page, kvh, d, dtype=qdtype)
        return kc, kc.clone(), torch.zeros(nb, page, kvh), torch.zeros(nb, page, kvh)

    ref_c = fresh()
    kv_cache.store_kv_ref(k, v, *ref_c[:2], sb, so, *ref_c[2:])
    cpu_c = fresh()
    kv_cache.store_kv(k, v, *cpu_c[:2], sb, so, *cpu_c[2:])
    dev_c = [t.to(DEV) for t in fresh()]
    gpu_store(k.to(DEV), v.to(DEV), dev_c[0], dev_c[1], sb.to(DEV), so.to(DEV), dev_c[2], dev_c[3])
    for a, b in zip(ref_c, cpu_c):
        torch.testing.assert_close(a.float(), b.float())
    for a, c in zip(ref_c[2:], dev_c[2:]):                  # scales
        torch.testing.assert_close(a, c.cpu(), atol=1e-7, rtol=1e-5)
    for a, c in zip(ref_c[:2], dev_c[:2]):
        # a GPU's fp32 division is not IEEE-rounded, so a value on a rounding tie may land one
        # quantization step away on a few elements
        a, c = a.float(), c.cpu().float()
        off = (a - c).abs() > 0
        step = 1.0 if qdtype == torch.int8 else 0.13 * a.abs().clamp(min=1)
        assert off.float().mean() < 1e-3 and ((a - c).abs() <= step).all()

    meta = DecodeMeta.build(tables, lens, page)
    q = torch.randn(2, kvh * group, d).to(torch.bfloat16)
    ref = attention.decode_attention_ref(q, *ref_c[:2], meta, d ** -0.5, *ref_c[2:])
    cpu = attention.decode_attention(q, *cpu_c[:2], meta, d ** -0.5, *cpu_c[2:])
    gpu = gpu_decode(q.to(DEV), *dev_c[:2], meta.block_tables.to(DEV), meta.context_lens.to(DEV), d ** -0.5,
                     max(lens), dev_c[2], dev_c[3], splits=2)
    assert _rel(cpu, ref) < 1e-2 and _rel(gpu.cpu(), ref) < 1e-2
    # quantization error against full-precision attention stays small
    fp_k, fp_v = torch.zeros(nb, page, kvh, d), torch.zeros(nb, page, kvh, d)
    kv_cache.store_kv_ref(k.float(), v.float(), fp_k, fp_v, sb, so)
    exact = attention.decode_attention_ref(q.float(), fp_k, fp_v, meta, d ** -0.5)
    assert _rel(ref, exact) < (0.02 if qdtype == torch.int8 else 0.08)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_rope_silu(dtype):
    from baton.kernels import norm, rotary
    from baton.kernels.activation import silu_and_mul_ref
    from baton.kernels.gpu import activation as gact
    from baton.kernels.gpu import norm as gnorm
    from baton.kernels.gpu import rotary as grot

    torch.manual_seed(5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x, r, w = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype), torch.randn(96).to(dtype)
    assert _rel(gnorm.rms_norm(x.to(DEV), w.to(DEV), 1e-6).cpu(), norm.rms_norm_ref(x, w, 1e-6)) < tol
    res = r.clone().to(DEV)
    out = gnorm.add_rms_norm(x.to(DEV), res, w.to(DEV), 1e-6)
    assert _rel(res.cpu(), (x.float() + r.float()).to(dtype)) < tol
    assert _rel(out.cpu(), norm.rms_norm_ref((x.float() + r.float()).to(dtype), w, 1e-6)) < tol
    g = torch.randn(5, 2 * 80).to(dtype)
    assert _rel(gact.silu_and_mul(g.to(DEV)).cpu(), silu_and_mul_ref(g)) < tol

    cache = rotary.RotaryCache(1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32)), 64, dtype)
    T, H, KV, D = 6, 4, 2, 32
    qkv = torch.randn(T, H + 2 * KV, D).to(dtype)
    nw = torch.randn(H + KV, D).to(dtype)
    pos = torch.tensor([0, 1, 9, 31, 62, 63])
    expected = rotary.apply_rotary_ref(norm.rms_norm_ref(qkv[:, : H + KV], nw, 1e-6), pos, cache)
    dq = qkv.to(DEV)
    grot.qk_norm_rope_(dq[:, : H + KV], nw.to(DEV), cache.cos.to(DEV), cache.sin_signed.to(DEV), pos.to(DEV), 1e-6)
    assert _rel(dq[:, : H + KV].cpu(), expected) < tol
    assert torch.equal(dq[:, H + KV:].cpu(), qkv[:, H + KV:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn path needs CUDA")
def test_flash_attn_paged_prefill_matches_reference():
    flash_attn = pytest.importorskip("flash_attn", reason="flash-attn not installed (the `gpu` extra)")
    assert flash_attn
    page, kvh, d, nb = 256, 2, 64, 8
    kc, vc = _pool(nb, page, kvh, d, torch.bfloat16)
    q_lens, prefixes, tables = [100, 300], [0, 256], [[2], [5, 1, 6]]
    q = torch.randn(sum(q_lens), kvh * 4, d, device=DEV).to(torch.bfloat16)
    meta = attention.PrefillMeta.build([0, 100], q_lens, prefixes, tables, page)
    out = attention.prefill_attention(q, None, None, kc, vc, meta, d ** -0.5)
    ref = attention.prefill_attention_ref(q.cpu(), None, None, kc.cpu(), vc.cpu(), meta, d ** -0.5)
    assert _rel(out.cpu(), ref) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="end-to-end dispatch needs CUDA")
def test_public_ops_dispatch_to_gpu():
    """The ops the engine calls pick the Triton kernels for CUDA tensors."""
    from baton.kernels import activation, norm

    x = torch.randn(4, 64, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(64, device=DEV, dtype=torch.bfloat16)
    assert _rel(norm.rms_norm(x, w, 1e-6).cpu(), norm.rms_norm_ref(x.cpu(), w.cpu(), 1e-6)) < 1e-2
    g = torch.randn(4, 128, device=DEV, dtype=torch.bfloat16)
    assert _rel(activation.silu_and_mul(g).cpu(), activation.silu_and_mul_ref(g.cpu())) < 1e-2
