// Fused CPU kernels for the decode hot path. Each replaces several small torch ops (each ~5-25 us
// of dispatch + thread wake-up here) with one call. Math is fp32; storage is the tensor's dtype.
// Registered as torch.ops.baton_cpu.*; kernels/cpu_ext.py builds and loads this file.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

// Integer views of float / bf16 rows. may_alias: without it GCC may move the float reads and writes
// around the integer ones (strict aliasing), e.g. drop a bias added to a row just before it is rounded.
typedef uint32_t __attribute__((may_alias)) u32_alias;
typedef uint16_t __attribute__((may_alias)) u16_alias;
typedef int32_t __attribute__((may_alias, aligned(1))) i32_bytes;   // 4 bytes read as one int32, anywhere

// Row -> fp32. The bf16 case is a plain 16-bit shift so the compiler vectorizes it
// (c10::BFloat16's conversion goes through a union and stays scalar).
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void load_row<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  const u16_alias* s = reinterpret_cast<const u16_alias*>(src);
  u32_alias* d = reinterpret_cast<u32_alias*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

// fp8 e4m3 -> fp32, exactly: its sign, exponent and mantissa bits placed where fp32 keeps them read
// as an fp32 that is 2^120 too small (e4m3's bias is 7, fp32's 127; e4m3 subnormals land on fp32
// subnormals), then one exact multiply. torch converts the same way (bit-exact); NaN is never stored.
inline float fp8_bits_to_f32(uint32_t b) {
  const uint32_t u = ((b & 0x7fu) << 20) | ((b & 0x80u) << 24);
  float f;
  std::memcpy(&f, &u, 4);
  return f * 0x1p120f;
}

template <>
inline void load_row<c10::Float8_e4m3fn>(const c10::Float8_e4m3fn* src, float* dst, int64_t n) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = fp8_bits_to_f32(s[i]);
}

// A quantized KV cache (int8 or fp8 e4m3) holds one fp32 scale per (block, slot, kv head): a token
// row of one head is q * scale. Every kernel dequantizes an element the same way, exact conversion
// then ONE multiply by the row's scale, so decode and prefill read identical fp32 K/V.
template <typename T>
struct KVQuant {
  static constexpr bool quantized = false;
};
template <>
struct KVQuant<int8_t> {
  static constexpr bool quantized = true;
  static constexpr float qmax = 127.f;
};
template <>
struct KVQuant<c10::Float8_e4m3fn> {
  static constexpr bool quantized = true;
  static constexpr float qmax = 448.f;
};

// A K or V row of the cache -> fp32 (dequantized with `scale` when the cache is quantized).
template <typename T>
inline void load_kv_row(const T* src, float* dst, int64_t n, float scale) {
  load_row(src, dst, n);
  if constexpr (KVQuant<T>::quantized) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] *= scale;
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float p, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += p * x[i];
}

// fp32 row -> storage type. bf16: round to nearest even with integer ops so it vectorizes.
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <>
inline void store_row<at::BFloat16>(const float* src, at::BFloat16* dst, int64_t n) {
  const u32_alias* s = reinterpret_cast<const u32_alias*>(src);
  u16_alias* d = reinterpret_cast<u16_alias*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = s[i];
    const bool nan = (b & 0x7fffffffu) > 0x7f800000u;
    d[i] = nan ? static_cast<uint16_t>((b >> 16) | 0x40) : static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
  }
}

// exp(x) that vectorizes (libm's expf does not without -ffast-math), for x in [-87, 88]:
// 2^t = 2^round(t) * 2^f, f in [-0.5, 0.5], degree-6 Taylor of 2^f (rel. error ~1e-7).
__attribute__((always_inline)) inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float t = x * 1.4426950408889634f;
  const float r = (t + 12582912.f) - 12582912.f;  // round to nearest (magic constant 1.5 * 2^23)
  const float f = (t - r) * 0.6931471805599453f;  // back to natural-log units: 2^(t-r) = e^f
  float p = 1.f / 720;
  p = p * f + 1.f / 120;
  p = p * f + 1.f / 24;
  p = p * f + 1.f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Rows per thread chunk: below this a call stays on one thread (no OpenMP wake-up).
constexpr int64_t kRowGrain = 8;

template <typename T>
void rms_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += f32(x[i]) * f32(x[i]);
  const float r = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) {
    // transformers' order: normalize in fp32, round to the storage type, then scale
    const T y = static_cast<T>(f32(x[i]) * r);
    out[i] = w ? static_cast<T>(f32(w[i]) * f32(y)) : y;
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.stride(-1) == 1 && w.is_contiguous(), "rms_norm: last dim must be contiguous");
  auto x2 = x.reshape({-1, x.size(-1)});
  auto out = at::empty_like(x2, at::MemoryFormat::Contiguous);
  const int64_t rows = x2.size(0), n = x2.size(1), xs = x2.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) rms_row(xp + r * xs, wp, op + r * n, n, (float)eps);
    });
  });
  return out.view(x.sizes());
}

// residual <- x + residual (in place); returns rms_norm(residual) * w.
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous(), "add_rms_norm: tensors must be contiguous");
  auto out = at::empty_like(residual);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* row = rp + r * n;
        for (int64_t i = 0; i < n; ++i) row[i] = static_cast<scalar_t>(f32(xp[r * n + i]) + f32(row[i]));
        rms_row<scalar_t>(row, wp, op + r * n, n, (float)eps);
      }
    });
  });
  return out;
}

// In place on qk [T, heads, D] (a strided view of the fused qkv output): optional per-head RMSNorm
// (w: [heads, D]) then neox rotary with cos / sin_signed tables [max_pos, D] at `positions`.
void qk_norm_rope(at::Tensor qk, const c10::optional<at::Tensor>& w, const at::Tensor& cos,
                  const at::Tensor& sin_signed, const at::Tensor& positions, double eps) {
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1 && qk.stride(1) == qk.size(2), "qk_norm_rope: bad qk layout");
  const int64_t T = qk.size(0), H = qk.size(1), D = qk.size(2), ts = qk.stride(0), half = D / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qk.scalar_type(), "qk_norm_rope", [&] {
    scalar_t* base = qk.data_ptr<scalar_t>();
    const scalar_t* wp = w.has_value() ? w->data_ptr<scalar_t>() : nullptr;
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin_signed.data_ptr<scalar_t>();
    at::parallel_for(0, T * H, 4 * kRowGrain, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> tmp(D);
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = i / H, h = i % H;
        scalar_t* x = base + t * ts + h * D;
        if (wp) rms_row<scalar_t>(x, wp + h * D, tmp.data(), D, (float)eps);
        else std::memcpy(tmp.data(), x, D * sizeof(scalar_t));
        const scalar_t* c = cp + pos[t] * D;
        const scalar_t* s = sp + pos[t] * D;
        for (int64_t d = 0; d < D; ++d) {
          const float rot = f32(tmp[d < half ? d + half : d - half]);
          x[d] = static_cast<scalar_t>(f32(tmp[d]) * f32(c[d]) + rot * f32(s[d]));
        }
      }
    });
  });
}

// k/v: [T, kvh, D] (rows may be strided); caches: [num_blocks, bs, kvh, D] with a contiguous
// [kvh, D] per token. Token i goes to (blocks[i], offsets[i]).
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor kc, at::Tensor vc,
              const at::Tensor& blocks, const at::Tensor& offsets) {
  const int64_t T = k.size(0), row = k.size(1) * k.size(2);
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "store_kv: k/v rows must be contiguous");
  TORCH_CHECK(kc.stride(2) == kc.size(3) && kc.stride(3) == 1 && kc.stride(1) == row, "store_kv: bad cache layout");
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const size_t bytes = row * k.element_size();
  char* kb = static_cast<char*>(kc.data_ptr());
  char* vb = static_cast<char*>(vc.data_ptr());
  const char* ks = static_cast<const char*>(k.data_ptr());
  const char* vs = static_cast<const char*>(v.data_ptr());
  const int64_t es = k.element_size(), c0 = kc.stride(0), c1 = kc.stride(1);
  const int64_t kstride = k.stride(0) * es, vstride = v.stride(0) * es;
  TORCH_CHECK(vc.stride(0) == c0 && vc.stride(1) == c1, "store_kv: k and v caches must share a layout");
  for (int64_t i = 0; i < T; ++i) {
    const int64_t dst = (bp[i] * c0 + op[i] * c1) * es;
    std::memcpy(kb + dst, ks + i * kstride, bytes);
    std::memcpy(vb + dst, vs + i * vstride, bytes);
  }
}

// store_kv into an int8 / fp8 cache: each (token, kv head) row is quantized with its own scale,
// amax / qmax (at least 1e-8 / qmax), written to ksc/vsc [num_blocks, bs, kvh] (fp32 views into the
// same blocks). The arithmetic is kernels/kv_cache.py quantize_rows', so both paths store the same
// bytes: y = x / scale, int8 = floor(y + 0.5), fp8 = y rounded to nearest even.
template <typename T, typename Q>
void quantize_kv_row(const T* x, Q* out, float* scale, int64_t D, float* buf) {
  load_row(x, buf, D);
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(buf[d]));
  const float s = std::max(amax, 1e-8f) / KVQuant<Q>::qmax;
  *scale = s;
  for (int64_t d = 0; d < D; ++d) {
    const float y = buf[d] / s;
    if constexpr (std::is_same_v<Q, int8_t>)
      out[d] = static_cast<int8_t>(std::floor(y + 0.5f));
    else
      out[d] = static_cast<Q>(y);
  }
}

void store_kv_quant(const at::Tensor& k, const at::Tensor& v, at::Tensor kc, at::Tensor vc, at::Tensor ksc,
                    at::Tensor vsc, const at::Tensor& blocks, const at::Tensor& offsets) {
  const int64_t T = k.size(0), KV = k.size(1), D = k.size(2);
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1,
              "store_kv_quant: rows must be contiguous");
  TORCH_CHECK(ksc.scalar_type() == at::kFloat && vsc.scalar_type() == at::kFloat && ksc.stride(2) == 1,
              "store_kv_quant: scales must be fp32 [num_blocks, bs, kvh]");
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  auto run = [&](auto qtag) {
    using Q = decltype(qtag);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "store_kv_quant", [&] {
      at::parallel_for(0, T * KV, kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(D);
        for (int64_t it = begin; it < end; ++it) {
          const int64_t i = it / KV, h = it % KV, b = bp[i], o = op[i];
          quantize_kv_row(k.data_ptr<scalar_t>() + i * k.stride(0) + h * k.stride(1),
                          static_cast<Q*>(kc.data_ptr()) + b * kc.stride(0) + o * kc.stride(1) + h * kc.stride(2),
                          ksc.data_ptr<float>() + b * ksc.stride(0) + o * ksc.stride(1) + h, D, buf.data());
          quantize_kv_row(v.data_ptr<scalar_t>() + i * v.stride(0) + h * v.stride(1),
                          static_cast<Q*>(vc.data_ptr()) + b * vc.stride(0) + o * vc.stride(1) + h * vc.stride(2),
                          vsc.data_ptr<float>() + b * vsc.stride(0) + o * vsc.stride(1) + h, D, buf.data());
        }
      });
    });
  };
  if (kc.scalar_type() == at::kChar)
    run(int8_t{});
  else if (kc.scalar_type() == at::kFloat8_e4m3fn)
    run(c10::Float8_e4m3fn{});
  else
    TORCH_CHECK(false, "store_kv_quant: the cache must be int8 or float8_e4m3fn");
}

// One kv head's scales in a quantized cache's [num_blocks, bs, kvh] fp32 view: at(block) is the
// block's first row, row t at at(block)[t * s1]. Empty (ptr null) for a plain cache.
struct ScaleView {
  const float* ptr = nullptr;
  int64_t s0 = 0, s1 = 0;
  const float* at(int64_t block) const { return ptr ? ptr + block * s0 : nullptr; }
  float row(int64_t block, int64_t t) const { return ptr ? ptr[block * s0 + t * s1] : 1.f; }
  static ScaleView of(const c10::optional<at::Tensor>& s, int64_t head) {
    ScaleView v;
    if (s.has_value()) {
      TORCH_CHECK(s->scalar_type() == at::kFloat, "KV scales must be fp32 [num_blocks, bs, kvh]");
      v.ptr = s->data_ptr<float>() + head * s->stride(2);
      v.s0 = s->stride(0);
      v.s1 = s->stride(1);
    }
    return v;
  }
};

// Asks for the next block's rows while this one is computed: blocks are scattered through the
// pool and each row is short, so the hardware prefetcher does not follow and every row missed to
// DRAM in turn (measured: 2.5 GB/s at batch 32).
template <typename T>
inline void prefetch_rows(const T* base, int64_t row_stride, int64_t rows, int64_t D) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(base + t * row_stride) + off);
}

#ifdef __AVX512F__
// the reduction tree, for lanes j: (a_j + a_j+8), then (+ j+4), then (+ j+2), then lane 0 + lane 1
inline float hsum16(__m512 a) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m128 u = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 w = _mm_add_ps(u, _mm_movehl_ps(u, u));
  return _mm_cvtss_f32(_mm_add_ss(w, _mm_movehdup_ps(w)));
}

// fast_exp on 16 lanes (the same steps, with explicit FMAs)
inline __m512 fast_exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 magic = _mm512_set1_ps(12582912.f);
  const __m512 r = _mm512_sub_ps(_mm512_add_ps(t, magic), magic);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, r), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif

// Online-softmax update of one query vector with the `n` raw scores of a block (overwritten with
// probabilities); m, l: its running max and denominator. Returns the factor for the accumulator.
// A fixed order (16-wide chunks, then a fixed tree): decode and prefill get the same numbers.
inline float block_softmax(float* sc, int64_t n, float& m, float& l) {
#ifdef __AVX512F__
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 vmx = ninf;
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = n - t >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - t)) - 1);
    vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(ninf, k, sc + t));
  }
  const float mx = std::max(m, _mm512_reduce_max_ps(vmx));   // max is exact: any order
  // ~0 on the first block (m = -inf clamps to -87)
  const float corr = _mm512_cvtss_f32(fast_exp16(_mm512_set1_ps(m - mx)));
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = n - t >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 p = _mm512_maskz_mov_ps(k, fast_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + t), vm)));
    _mm512_mask_storeu_ps(sc + t, k, p);
    acc = _mm512_add_ps(acc, p);
  }
  const float sum = hsum16(acc);
#else
  float mx = m;
  for (int64_t t = 0; t < n; ++t) mx = sc[t] > mx ? sc[t] : mx;
  const float corr = fast_exp(m - mx);
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    sc[t] = fast_exp(sc[t] - mx);
    sum += sc[t];
  }
#endif
  l = __builtin_fmaf(l, corr, sum);
  m = mx;
  return corr;
}

// (declared on every CPU: the scalar paths tile the same way)
constexpr int64_t kPrefillTile = 16;   // query rows per work item
constexpr int64_t kKeys = 16;          // keys per score micro-tile: one AVX-512 register of fp32

template <int NV>
inline void qk_rows16(const float* q, int64_t D, const float* kr, float* sc, int64_t ldsc);
inline void softmax_pv(float* sc, int64_t n, const float* vf, int64_t D, float& m, float& l, float* acc);

#ifdef __AVX512F__
// 16 elements of the storage type -> fp32
template <typename T>
inline __m512 load16(const T* p) {   // any other type (double): through a buffer
  alignas(64) float f[16];
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
  return _mm512_load_ps(f);
}
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <>
inline __m512 load16<int8_t>(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
template <>
inline __m512 load16<c10::Float8_e4m3fn>(const c10::Float8_e4m3fn* p) {   // fp8_bits_to_f32 on 16 lanes
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i u = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7f)), 20),
                                    _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24));
  return _mm512_mul_ps(_mm512_castsi512_ps(u), _mm512_set1_ps(0x1p120f));
}

// 16 elements of a K/V row (dequantized: times the row's scale, as load_kv_row does)
template <typename T>
inline __m512 load16_kv(const T* p, float scale) {
  if constexpr (KVQuant<T>::quantized)
    return _mm512_mul_ps(load16(p), _mm512_set1_ps(scale));
  else
    return load16(p);
}

// ---- attention arithmetic shared by decode and prefill ----------------------------------------
// A query's output must not depend on which kernel computes it: a token's K/V computed by decode
// is later read as a cached prefix that prefill would otherwise recompute, and a one-token prefill
// chunk runs as a decode row. So both kernels (AVX-512, head_dim a multiple of 16) do, per query:
//   score_t = hsum16(16 lane sums; lane j: fma chain over d = j, j+16, ... from zero)
//   per KV block, in order: block_softmax (online max/denominator update), then
//   acc = acc * corr + sum_t p_t V_t (fma chain over the block's keys)
//   out = acc * (1 / l)
// with the score vectorized along d in decode and along keys in prefill. Without AVX-512 (or with
// another head_dim) both run the scalar form of the same steps: dot scores, then per block the same.
// The extension is built with -ffp-contract=off, so inlining cannot fuse a multiply-add differently
// at the two sites.

// scores[g * ld + t] = q_g . K_t for the `rows` keys of one block (D a multiple of 16, <= 256):
// 16 keys at a time are converted to fp32 rows (kr: [16][D] scratch; sc: [G][16] scratch) and
// scored by qk_rows16, prefill's micro-kernel, so both kernels do the very same arithmetic; it
// keeps several independent FMA chains in flight where a key-at-a-time loop waited on one.
// ksb: the block's scales for this head (row t at ksb[t * ss1]; unused for a plain cache).
template <typename T>
inline void decode_scores(const float* qf, int64_t G, int64_t D, const T* kb, int64_t ks1, int64_t rows,
                          float* scores, int64_t ld, const float* ksb, int64_t ss1, float* kr, float* sc) {
  for (int64_t c0 = 0; c0 < rows; c0 += kKeys) {
    const int64_t nk = std::min(kKeys, rows - c0);
    for (int64_t t = 0; t < kKeys; ++t) {
      float* dst = kr + t * D;
      if (t < nk) {
        const float st = KVQuant<T>::quantized ? ksb[(c0 + t) * ss1] : 1.f;
        for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(dst + c, load16_kv(kb + (c0 + t) * ks1 + c, st));
      } else {
        std::fill(dst, dst + D, 0.f);
      }
    }
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) qk_rows16<4>(qf + g * D, D, kr, sc + g * kKeys, kKeys);
    for (; g + 2 <= G; g += 2) qk_rows16<2>(qf + g * D, D, kr, sc + g * kKeys, kKeys);
    for (; g < G; ++g) qk_rows16<1>(qf + g * D, D, kr, sc + g * kKeys, kKeys);
    for (g = 0; g < G; ++g) std::memcpy(scores + g * ld + c0, sc + g * kKeys, nk * sizeof(float));
  }
}

// acc[g][d0 : d0 + 16W] = online-softmax weighted sum of V over all n context keys for NG heads:
// per block, acc = acc * corr[g][block] + sum_t p[g][t] V_t. The accumulators stay in registers;
// V rows are read through the block table.
template <int NG, int W, typename T>
inline void decode_pv(const float* p, int64_t ld, const float* corr, int64_t cld, int64_t n, const T* vp,
                      const int64_t* table, int64_t bs, int64_t vs0, int64_t vs1, int64_t voff, int64_t d0,
                      float* acc, int64_t D, const ScaleView& vsc) {
  __m512 a[NG][W];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < W; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t t0 = 0; t0 < n; t0 += bs) {
    const T* vb = vp + table[t0 / bs] * vs0 + voff + d0;
    const float* vsb = vsc.at(table[t0 / bs]);
    const int64_t rows = std::min(bs, n - t0);
    // the rows two blocks ahead (scattered blocks: the hardware prefetcher does not follow them)
    if (t0 + 2 * bs < n) prefetch_rows(vp + table[t0 / bs + 2] * vs0 + voff + d0, vs1, bs, 16 * W);
    for (int g = 0; g < NG; ++g) {
      const __m512 cg = _mm512_set1_ps(corr[g * cld + t0 / bs]);
      for (int c = 0; c < W; ++c) a[g][c] = _mm512_mul_ps(a[g][c], cg);
    }
    for (int64_t t = 0; t < rows; ++t) {
      __m512 v[W];
      const float st = KVQuant<T>::quantized ? vsb[t * vsc.s1] : 1.f;
      for (int c = 0; c < W; ++c) v[c] = load16_kv(vb + t * vs1 + 16 * c, st);
      for (int g = 0; g < NG; ++g) {
        const __m512 pg = _mm512_set1_ps(p[g * ld + t0 + t]);
        for (int c = 0; c < W; ++c) a[g][c] = _mm512_fmadd_ps(pg, v[c], a[g][c]);
      }
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < W; ++c) _mm512_storeu_ps(acc + g * D + d0 + 16 * c, a[g][c]);
}

template <int W, typename T>
inline void decode_pv_cols(const float* p, int64_t ld, const float* corr, int64_t cld, int64_t n, int64_t G,
                           const T* vp, const int64_t* table, int64_t bs, int64_t vs0, int64_t vs1, int64_t voff,
                           int64_t d0, float* acc, int64_t D, const ScaleView& vsc) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4)
    decode_pv<4, W>(p + g * ld, ld, corr + g * cld, cld, n, vp, table, bs, vs0, vs1, voff, d0, acc + g * D, D, vsc);
  for (; g + 2 <= G; g += 2)     // each V row loaded once for both heads (GQA groups of 2)
    decode_pv<2, W>(p + g * ld, ld, corr + g * cld, cld, n, vp, table, bs, vs0, vs1, voff, d0, acc + g * D, D, vsc);
  for (; g < G; ++g)
    decode_pv<1, W>(p + g * ld, ld, corr + g * cld, cld, n, vp, table, bs, vs0, vs1, voff, d0, acc + g * D, D, vsc);
}
#endif

// One (sequence, kv head) of paged decode attention: scores for the G query heads over all n keys,
// the online softmax block by block (corr: G x blocks scratch), then the weighted sum of V; acc gets
// the normalized output. Returns false when the vector path does not apply.
template <typename T>
bool decode_item_avx512(const float* qf, int64_t G, int64_t D, int64_t n, const T* kp, const T* vp,
                        const int64_t* table, int64_t bs, int64_t ks0, int64_t ks1, int64_t koff, int64_t vs0,
                        int64_t vs1, int64_t voff, float* scores, float* corr, float* acc, const ScaleView& ksc,
                        const ScaleView& vsc, float* kr, float* sc) {
#ifdef __AVX512F__
  if (D % 16 != 0 || D > 256 || G > 256) return false;   // decode_scores' k[16]; inv[256]
  for (int64_t t0 = 0; t0 < n; t0 += bs) {
    if (t0 == 0 && bs < n) prefetch_rows(kp + table[1] * ks0 + koff, ks1, bs, D);
    if (t0 + 2 * bs < n) prefetch_rows(kp + table[t0 / bs + 2] * ks0 + koff, ks1, bs, D);
    decode_scores(qf, G, D, kp + table[t0 / bs] * ks0 + koff, ks1, std::min(bs, n - t0), scores + t0, n,
                  ksc.at(table[t0 / bs]), ksc.s1, kr, sc);
  }
  const int64_t nblk = (n + bs - 1) / bs;
  float inv[256];
  for (int64_t g = 0; g < G; ++g) {
    float m = -INFINITY, l = 0.f;
    for (int64_t t0 = 0; t0 < n; t0 += bs)
      corr[g * nblk + t0 / bs] = block_softmax(scores + g * n + t0, std::min(bs, n - t0), m, l);
    inv[g] = 1.f / l;
  }
  int64_t d0 = 0;
  if (G <= 2)                  // a whole 128-column row per pass: each V row streams in once
    for (; d0 + 128 <= D; d0 += 128)
      decode_pv_cols<8>(scores, n, corr, nblk, n, G, vp, table, bs, vs0, vs1, voff, d0, acc, D, vsc);
  for (; d0 + 64 <= D; d0 += 64)
    decode_pv_cols<4>(scores, n, corr, nblk, n, G, vp, table, bs, vs0, vs1, voff, d0, acc, D, vsc);
  for (; d0 < D; d0 += 16)
    decode_pv_cols<1>(scores, n, corr, nblk, n, G, vp, table, bs, vs0, vs1, voff, d0, acc, D, vsc);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= inv[g];
  return true;
#else
  return false;
#endif
}

// Calls body(tag) with a value of the cache's element type: q's own type for a plain cache, int8_t
// or c10::Float8_e4m3fn for a quantized one (which then has scales).
template <typename Q, typename F>
void with_kv_type(const at::Tensor& kc, bool has_scales, const char* who, F&& body) {
  if (kc.scalar_type() == at::kChar) {
    TORCH_CHECK(has_scales, who, ": an int8 KV cache needs its scales");
    body(int8_t{});
  } else if (kc.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK(has_scales, who, ": an fp8 KV cache needs its scales");
    body(c10::Float8_e4m3fn{});
  } else {
    TORCH_CHECK(kc.scalar_type() == c10::CppTypeToScalarType<Q>::value, who, ": K/V must have q's dtype");
    body(Q{});
  }
}

// One query token per sequence over its paged context. q: [B, Hq, D]; caches [NB, bs, kvh, D] of
// q's dtype, or int8 / fp8 with k/v_scale [NB, bs, kvh] fp32; block_tables [B, max_blocks] int64;
// context_lens [B] int64. Parallel over (sequence, kv head).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_decode_attention: q heads must be contiguous");
  TORCH_CHECK(kc.stride(3) == 1 && vc.stride(3) == 1, "paged_decode_attention: head_dim must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), qs = q.stride(0);
  const int64_t bs = kc.size(1), KV = kc.size(2), G = H / KV, maxb = block_tables.size(1);
  auto out = at::empty({B, H, D}, q.options());
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  // strides hoisted: Tensor::stride() is an out-of-line call
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), ks2 = kc.stride(2);
  const int64_t vs0 = vc.stride(0), vs1 = vc.stride(1), vs2 = vc.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
   with_kv_type<scalar_t>(kc, k_scale.has_value() && v_scale.has_value(), "paged_decode_attention", [&](auto tag) {
    using KT = decltype(tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const KT* kp = static_cast<const KT*>(kc.data_ptr());
    const KT* vp = static_cast<const KT*>(vc.data_ptr());
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(G * D), acc(G * D), scores, corr, kr(kKeys * D), sc(G * kKeys);
      std::vector<float> krows(bs * D), vrows(bs * D), bsc(bs), m(G), l(G);   // the scalar path's
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / KV, h = idx % KV, n = lens[b];
        const ScaleView ksc = ScaleView::of(k_scale, h), vsc = ScaleView::of(v_scale, h);
        scores.resize(G * n);
        corr.resize(G * ((n + bs - 1) / bs));
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d) qf[g * D + d] = f32(qp[b * qs + (h * G + g) * D + d]) * (float)scale;
        if (decode_item_avx512(qf.data(), G, D, n, kp, vp, bt + b * maxb, bs, ks0, ks1, h * ks2, vs0, vs1,
                               h * vs2, scores.data(), corr.data(), acc.data(), ksc, vsc, kr.data(), sc.data())) {
          for (int64_t g = 0; g < G; ++g) store_row(acc.data() + g * D, op + (b * H + h * G + g) * D, D);
          continue;
        }
        // without the vector path: prefill's scalar arithmetic (dot scores, then per block the online
        // softmax and pv_rows), so a query gives the same bits from either kernel here too
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.f);
        for (int64_t t0 = 0; t0 < n; t0 += bs) {  // block by block: one table lookup per block
          const int64_t id = bt[b * maxb + t0 / bs], nb = std::min(bs, n - t0);
          const KT* kb = kp + id * ks0 + h * ks2;
          const KT* vb = vp + id * vs0 + h * vs2;
          if (t0 + bs < n) prefetch_rows(kp + bt[b * maxb + t0 / bs + 1] * ks0 + h * ks2, ks1, bs, D);
          for (int64_t t = 0; t < nb; ++t) {
            load_kv_row(kb + t * ks1, krows.data() + t * D, D, ksc.row(id, t));
            load_kv_row(vb + t * vs1, vrows.data() + t * D, D, vsc.row(id, t));
          }
          for (int64_t g = 0; g < G; ++g) {
            for (int64_t t = 0; t < nb; ++t) bsc[t] = dot(qf.data() + g * D, krows.data() + t * D, D);
            softmax_pv(bsc.data(), nb, vrows.data(), D, m[g], l[g], acc.data() + g * D);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* a = acc.data() + g * D;
          const float inv = 1.f / l[g];
          for (int64_t d = 0; d < D; ++d) a[d] *= inv;
          store_row(a, op + (b * H + h * G + g) * D, D);
        }
      }
    });
   });
  });
  return out;
}


// sc[v][0:16] = q_v . K_t for NV query vectors and 16 keys (kr: fp32 K rows, [16][D]), in the shared
// arithmetic: per (vector, key) the 16-lane fma chain along d that decode runs, then hsum16's tree
// done across keys at once (the adds pair the same lanes as hsum16; the shuffles only move them).
// Each K row is loaded once for the NV vectors. D must be a multiple of 16.
template <int NV>
inline void qk_rows16(const float* q, int64_t D, const float* kr, float* sc, int64_t ldsc) {
#ifdef __AVX512F__
  static_assert(kKeys == 16, "one __m512 of scores");
  __m512 y[NV][4];                                   // per 4 keys: their lanes j + (j+8), + (j+4)
  for (int g4 = 0; g4 < 4; ++g4) {
    __m512 a[NV][4];
    for (int v = 0; v < NV; ++v)
      for (int i = 0; i < 4; ++i) a[v][i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 16)
      for (int i = 0; i < 4; ++i) {
        const __m512 k = _mm512_loadu_ps(kr + (4 * g4 + i) * D + c);
        for (int v = 0; v < NV; ++v) a[v][i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + v * D + c), k, a[v][i]);
      }
    for (int v = 0; v < NV; ++v) {
      const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a[v][0], a[v][1], 0x44),
                                      _mm512_shuffle_f32x4(a[v][0], a[v][1], 0xEE));
      const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(a[v][2], a[v][3], 0x44),
                                      _mm512_shuffle_f32x4(a[v][2], a[v][3], 0xEE));
      y[v][g4] = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    }
  }
  // lanes come out as keys 0,4,8,12 | 1,5,9,13 | ...: a 4x4 transpose puts them back in order
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int v = 0; v < NV; ++v) {
    const __m512 z1 = _mm512_add_ps(_mm512_shuffle_ps(y[v][0], y[v][1], 0x44), _mm512_shuffle_ps(y[v][0], y[v][1], 0xEE));
    const __m512 z2 = _mm512_add_ps(_mm512_shuffle_ps(y[v][2], y[v][3], 0x44), _mm512_shuffle_ps(y[v][2], y[v][3], 0xEE));
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(z1, z2, 0x88), _mm512_shuffle_ps(z1, z2, 0xDD));
    _mm512_storeu_ps(sc + v * ldsc, _mm512_permutexvar_ps(order, s));
  }
#endif
}

// The same scores for any D, without the shared arithmetic (used when D % 16 != 0 or without AVX-512).
inline void qk_rows_scalar(const float* q, int64_t D, const float* kr, float* sc) {
  for (int t = 0; t < kKeys; ++t) sc[t] = dot(q, kr + t * D, D);
}

// acc[0:D] = acc * corr + sum_t p[t] V[t]. With AVX-512, 64 columns at a time held in registers.
inline void pv_rows(const float* p, int64_t n, const float* vf, int64_t D, float corr, float* acc) {
  int64_t d0 = 0;
#ifdef __AVX512F__
  const __m512 c = _mm512_set1_ps(corr);
  for (; d0 + 64 <= D; d0 += 64) {
    __m512 a[4];
    for (int j = 0; j < 4; ++j) a[j] = _mm512_mul_ps(_mm512_loadu_ps(acc + d0 + 16 * j), c);
    for (int64_t t = 0; t < n; ++t) {
      const __m512 pt = _mm512_set1_ps(p[t]);
      const float* vr = vf + t * D + d0;
      for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 16 * j), a[j]);
    }
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + d0 + 16 * j, a[j]);
  }
#endif
  if (d0 == D) return;
  for (int64_t d = d0; d < D; ++d) acc[d] *= corr;
  for (int64_t t = 0; t < n; ++t) axpy(p[t], vf + t * D + d0, acc + d0, D - d0);
}

inline void softmax_pv(float* sc, int64_t n, const float* vf, int64_t D, float& m, float& l, float* acc) {
  const float corr = block_softmax(sc, n, m, l);
  pv_rows(sc, n, vf, D, corr, acc);
}

// Causal attention of prefill chunks after a cached prefix, all sequences in one call, K/V read
// from the paged cache (the chunk's own K/V are stored there first). q: [T, H, D] rows of the flat
// batch; sequence i owns rows q_starts[i] .. +q_lens[i] at positions prefix_lens[i] + j.
//  1. every (block, kv head) the call reads is converted once to fp32 rows, K and V ([ldk][D],
//     zero-padded to a multiple of 16 keys);
//  2. a work item is (sequence, kv head, tile of 16 query rows): its G*rows query vectors sweep
//     the blocks once with an online softmax, in the arithmetic decode shares (qk_rows16,
//     block_softmax, pv_rows).
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                   const at::Tensor& block_tables, const at::Tensor& q_starts,
                                   const at::Tensor& q_lens, const at::Tensor& prefix_lens, double scale,
                                   const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_prefill_attention: q heads must be contiguous");
  TORCH_CHECK(kc.stride(3) == 1 && vc.stride(3) == 1, "paged_prefill_attention: head_dim must be contiguous");
  TORCH_CHECK(block_tables.is_contiguous() && q_starts.is_contiguous() && q_lens.is_contiguous() &&
              prefix_lens.is_contiguous(), "paged_prefill_attention: metadata must be contiguous");
  const int64_t H = q.size(1), D = q.size(2), qs = q.stride(0), S = q_starts.size(0);
  const int64_t bs = kc.size(1), KV = kc.size(2), G = H / KV, maxb = block_tables.size(1);
  const int64_t ldk = (bs + kKeys - 1) / kKeys * kKeys, blk = D * ldk;   // floats per converted block
  const int64_t *bt = block_tables.data_ptr<int64_t>(), *qst = q_starts.data_ptr<int64_t>();
  const int64_t *qln = q_lens.data_ptr<int64_t>(), *pre = prefix_lens.data_ptr<int64_t>();
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), ks2 = kc.stride(2);
  const int64_t vs0 = vc.stride(0), vs1 = vc.stride(1), vs2 = vc.stride(2);
  auto out = at::empty({q.size(0), H, D}, q.options());
  // blocks of each sequence in the conversion buffers, and the (sequence, tile) work list
  std::vector<int64_t> first_blk(S + 1, 0), blk_seq, item_seq, item_row;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t nblk = (pre[i] + qln[i] + bs - 1) / bs;
    first_blk[i + 1] = first_blk[i] + nblk;
    for (int64_t b = 0; b < nblk; ++b) blk_seq.push_back(i);
    for (int64_t r = 0; r < qln[i]; r += kPrefillTile) {
      item_seq.push_back(i);
      item_row.push_back(r);
    }
  }
  const int64_t nblk_all = first_blk[S];
  std::vector<float> kf(nblk_all * KV * blk), vf(nblk_all * KV * blk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_prefill_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    with_kv_type<scalar_t>(kc, k_scale.has_value() && v_scale.has_value(), "paged_prefill_attention", [&](auto tag) {
      using KT = decltype(tag);
      const KT* kp = static_cast<const KT*>(kc.data_ptr());
      const KT* vp = static_cast<const KT*>(vc.data_ptr());
      at::parallel_for(0, nblk_all * KV, 4, [&](int64_t begin, int64_t end) {
        for (int64_t it = begin; it < end; ++it) {
          const int64_t b = it / KV, h = it % KV, i = blk_seq[b], j = b - first_blk[i];
          const int64_t nb = std::min(bs, pre[i] + qln[i] - j * bs), id = bt[i * maxb + j];
          const ScaleView ksc = ScaleView::of(k_scale, h), vsc = ScaleView::of(v_scale, h);
          float* kfo = kf.data() + it * blk;
          float* vfo = vf.data() + it * blk;
          for (int64_t t = 0; t < ldk; ++t) {      // padding keys: zeros (finite scores, never read)
            if (t < nb) {
              load_kv_row(kp + id * ks0 + t * ks1 + h * ks2, kfo + t * D, D, ksc.row(id, t));
              load_kv_row(vp + id * vs0 + t * vs1 + h * vs2, vfo + t * D, D, vsc.row(id, t));
            } else {
              std::fill(kfo + t * D, kfo + (t + 1) * D, 0.f);
              std::fill(vfo + t * D, vfo + (t + 1) * D, 0.f);
            }
          }
        }
      });
    });
    const int64_t items = static_cast<int64_t>(item_seq.size()) * KV, nq_max = kPrefillTile * G;
#ifdef __AVX512F__
    const bool vec = D % 16 == 0;
#else
    const bool vec = false;
#endif
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(nq_max * D), acc(nq_max * D), sc(nq_max * ldk), m(nq_max), l(nq_max);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t i = item_seq[it / KV], r0 = item_row[it / KV], h = it % KV, p = pre[i];
        const int64_t rows = std::min(kPrefillTile, qln[i] - r0), nq = rows * G;
        for (int64_t r = 0; r < rows; ++r)       // query vector (r, g) at index r * G + g
          for (int64_t g = 0; g < G; ++g) {
            float* qv = qf.data() + (r * G + g) * D;
            load_row(qp + (qst[i] + r0 + r) * qs + (h * G + g) * D, qv, D);
            for (int64_t d = 0; d < D; ++d) qv[d] *= static_cast<float>(scale);
          }
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.f);
        const int64_t n_keys = p + r0 + rows;    // the tile's last row sees keys [0, n_keys)
        for (int64_t t0 = 0; t0 < n_keys; t0 += bs) {
          const int64_t nb = std::min(bs, n_keys - t0);
          const int64_t cb = (first_blk[i] + t0 / bs) * KV + h;
          const float* kfb = kf.data() + cb * blk;
          const float* vfb = vf.data() + cb * blk;
          const int64_t first_row = std::max<int64_t>(0, t0 - p - r0);   // earlier rows see none of it
          for (int64_t c0 = 0; c0 < nb; c0 += kKeys) {
            const float* kr = kfb + c0 * D;
            int64_t u = first_row * G;
            if (vec) {
              for (; u + 4 <= nq; u += 4) qk_rows16<4>(qf.data() + u * D, D, kr, sc.data() + u * ldk + c0, ldk);
              for (; u < nq; ++u) qk_rows16<1>(qf.data() + u * D, D, kr, sc.data() + u * ldk + c0, ldk);
            } else {
              for (; u < nq; ++u) qk_rows_scalar(qf.data() + u * D, D, kr, sc.data() + u * ldk + c0);
            }
          }
          for (int64_t r = first_row; r < rows; ++r) {
            const int64_t visible = std::min(nb, p + r0 + r + 1 - t0);   // causal: up to its own position
            for (int64_t g = 0; g < G; ++g) {
              const int64_t v = r * G + g;
              softmax_pv(sc.data() + v * ldk, visible, vfb, D, m[v], l[v], acc.data() + v * D);
            }
          }
        }
        for (int64_t v = 0; v < nq; ++v) {
          float* a = acc.data() + v * D;
          const float inv = 1.f / l[v];
          for (int64_t d = 0; d < D; ++d) a[d] *= inv;
          const int64_t r = v / G, g = v % G;
          store_row(a, op + ((qst[i] + r0 + r) * H + h * G + g) * D, D);
        }
      }
    });
  });
  return out;
}

// y[M, N] = x[M, K] @ W^T for a bf16 weight in oneDNN's packed layout for this CPU, read in place:
// blocks of [N/64][K/32][16 k-pairs][64 n][2] (checked against the weight's own values by
// kernels/linear.py before this path is used). Two k per VDPBF16PS into fp32 accumulators.
//
// Every output element is ONE accumulator chain over k = 0, 2, 4, ... from zero, whatever M is and
// wherever the row sits in the batch. That makes a token's result independent of what it is batched
// with: a prompt's tail computed after a cached prefix, a chunked prefill and a decode batch of any
// size give bit-identical rows (oneDNN picks its K-splitting by shape, so its rows drift by an ulp
// with M, enough to flip a greedy token of a bf16 model). Rows go in groups of up to 6 (24
// accumulators); a 64-column weight slab streams from memory once per tile of rows and is re-read
// from L2 by the next group. At decode sizes the kernel is bound by memory bandwidth, which oneDNN's
// kernel leaves partly unused here (small's 200 MB of GEMM weights at 1 row: 31.4 vs 19.9 GB/s,
// benchmarks/cpu_kernels.py).
constexpr int64_t kPackNB = 64, kPackKB = 32, kMaxGroup = 6;
// Software prefetch into L2, 16 KiB ahead of the stream. Decode reads the whole model from DRAM each
// step; on this Zen 4 host this lifts a 200 MB GEMV chain from ~20 to ~30 GB/s (an L1 prefetch 4 KiB
// ahead, the previous choice, was slower than none at all).
constexpr int64_t kPrefetchPairs = 64;

bool packed_bf16_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// the int8 / int4 kernels (integer products: VPDPBUSD)
bool quant_kernels_supported() {
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
// acc[r][j] += w[j] . x_r's k-pair (two k per VDPBF16PS): the accumulation step of every GEMM kernel
// here; xp points at row 0's pair, rows xstride pairs apart.
template <int R>
inline void dot_pairs(__m512 (&acc)[R][4], const __m512bh (&w)[4], const u32_alias* xp, int64_t xstride) {
  for (int r = 0; r < R; ++r) {
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * xstride]));
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], w[j], xv);
  }
}

template <int R>
inline void store_acc(const __m512 (&acc)[R][4], float* y) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + r * kPackNB + 16 * j, acc[r][j]);
}

template <int R>
inline void packed_rows(const uint16_t* wb, int64_t kpairs, const u32_alias* xpairs, int64_t xstride, float* y) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const uint16_t* p = wb + kp * kPackNB * 2;
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchPairs * kPackNB * 2), _MM_HINT_T1);
    __m512bh w[4];
    for (int j = 0; j < 4; ++j) w[j] = (__m512bh)_mm512_loadu_si512(p + 32 * j);
    dot_pairs<R>(acc, w, xpairs + kp, xstride);
  }
  store_acc<R>(acc, y);
}
#endif

#if defined(__AVX512BF16__)
// Calls f(std::integral_constant<int, R>) for R = rows (1..6): a row-group kernel's template argument.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

// x [M, K] bf16 as k-pairs, each row padded with zeros to kp_all pairs (`buf` holds a padded copy
// when K is short of that; the weights' pad is zeros, x's must not be NaN).
inline const u32_alias* x_pairs(const at::Tensor& x, int64_t kp_all, std::vector<uint16_t>& buf) {
  const int64_t M = x.size(0), K = x.size(1);
  if (kp_all * 2 == K) return reinterpret_cast<const u32_alias*>(x.data_ptr());
  buf.assign(M * kp_all * 2, 0);
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(buf.data() + m * kp_all * 2, static_cast<const uint16_t*>(x.data_ptr()) + m * K, K * 2);
  return reinterpret_cast<const u32_alias*>(buf.data());
}

// The tiling the weight-streaming GEMMs share. Output columns go in blocks of 64, split across
// threads; rows in tiles whose x (tile * kp_all * 4 bytes) stays in L2 while the column blocks'
// weights stream past it; a tile's rows in near-equal groups of <= 6 (8 rows: 4 + 4, not 6 + 2).
// group(rows, nb, m0, y) fills y[rows][64] in fp32 for block nb; finish(y_row, n0, nn) adjusts one
// row (a quantized weight's scales) before the bias and the bf16 store.
template <typename Group, typename Finish>
void tiled_gemm(int64_t M, int64_t N, int64_t kp_all, const c10::optional<at::Tensor>& bias, at::Tensor& out,
                Group&& group, Finish&& finish) {
  const int64_t nblocks = (N + kPackNB - 1) / kPackNB;
  const at::BFloat16* bp = bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t tile = std::max<int64_t>(kMaxGroup, (256 * 1024 / (kp_all * 4)) / kMaxGroup * kMaxGroup);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float y[kMaxGroup * kPackNB];
    for (int64_t t0 = 0; t0 < M; t0 += tile) {
      const int64_t t1 = std::min(M, t0 + tile);
      for (int64_t nb = b0; nb < b1; ++nb) {
        const int64_t n0 = nb * kPackNB, nn = std::min(kPackNB, N - n0);
        for (int64_t m0 = t0; m0 < t1;) {
          const int64_t left = t1 - m0, groups = (left + kMaxGroup - 1) / kMaxGroup;
          const int64_t rows = (left + groups - 1) / groups;
          group(rows, nb, m0, y);
          for (int64_t r = 0; r < rows; ++r) {
            float* yr = y + r * kPackNB;
            finish(yr, n0, nn);
            if (bp)
              for (int64_t c = 0; c < nn; ++c) yr[c] += static_cast<float>(bp[n0 + c]);
            store_row(yr, op + (m0 + r) * N + n0, nn);
          }
          m0 += rows;
        }
      }
    }
  });
}
#endif

at::Tensor linear_packed_bf16(const at::Tensor& x, const at::Tensor& blob, int64_t N, int64_t K,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "linear_packed_bf16: x must be a contiguous bf16 [M, K]");
  const int64_t M = x.size(0), nblocks = (N + kPackNB - 1) / kPackNB, kblocks = (K + kPackKB - 1) / kPackKB;
  TORCH_CHECK(blob.numel() >= nblocks * kblocks * kPackNB * kPackKB * 2, "linear_packed_bf16: blob too small");
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
#if defined(__AVX512BF16__)
  const int64_t kp_all = kblocks * kPackKB / 2;         // k-pairs per row, padded to whole k-blocks
  std::vector<uint16_t> buf;
  const u32_alias* xpairs = x_pairs(x, kp_all, buf);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(blob.data_ptr());
  tiled_gemm(M, N, kp_all, bias, out, [&](int64_t rows, int64_t nb, int64_t m0, float* y) {
    with_rows(rows, [&](auto R) {
      packed_rows<decltype(R)::value>(w + nb * kblocks * kPackKB * kPackNB, kp_all, xpairs + m0 * kp_all, kp_all, y);
    });
  }, [](float*, int64_t, int64_t) {});
#else
  TORCH_CHECK(false, "linear_packed_bf16: built without AVX512-BF16");
#endif
  return out;
}

// ---- fp32 GEMMs of a few rows (decode steps) on plain [N, K] weights ----------------------------
// torch's fp32 F.linear (MKL) is a GEMV at one row but a GEMM at two: measured on an AVX2 Zen 2 (one
// thread, the small VL model's layers) a decode step of 2 rows took 1.5x one of 1 row, while every
// weight byte is read once either way. This kernel streams 4 weight rows at a time and multiplies
// them into every x row while they are in L1, so a step's cost stays the weights' bytes up to a few
// rows. Each output is one fixed chain: 8 lane sums over k in steps of 8 (FMA), summed in a fixed
// order, then the k tail: a row's values do not depend on the batch it runs in.
bool linear_f32_supported() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));   // lanes i + i+4
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                                     // + i+2
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));                            // + i+1
}

// Eight weights as fp32: loaded (fp32), or widened from bf16 (its bits are fp32's top half).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// y[r][j] = x[r] . w[j] for R rows of x and J (<= 4) rows of w (W: float, or bf16 bits).
constexpr int PF = 8;
template <int R, int J, typename W>
inline void f32_block(const float* x, int64_t xs, const W* w, int64_t K, float* y, int64_t ys) {
  constexpr int64_t LINE = 64 / sizeof(W);      // weights per cache line: one prefetch each
  __m256 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[J];
    for (int j = 0; j < J; ++j) {
      if ((k & (LINE - 1)) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (j + PF) * K + k), _MM_HINT_T0);
      wv[j] = load8(w + j * K + k);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * xs + k);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      float v = hsum8(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) v = std::fma(x[r * xs + k], widen(w[j * K + k]), v);
      y[r * ys + j] = v;
    }
}

template <int J, typename W>
inline void f32_rows(const float* x, int64_t M, int64_t K, const W* w, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) f32_block<2, J>(x + m * K, K, w, K, y + m * N, N);
  if (m < M) f32_block<1, J>(x + m * K, K, w, K, y + m * N, N);
}

// out[M, N] (fp32) = x[M, K] (fp32) . w[N, K]^T + bias, over blocks of 4 weight rows.
template <typename W>
void f32_linear(const float* xp, const W* wp, const float* bp, float* op, int64_t M, int64_t N, int64_t K) {
  const int64_t blocks = (N + 3) / 4;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4, nn = std::min<int64_t>(4, N - n0);
      const W* wb = wp + n0 * K;
      switch (nn) {
        case 4: f32_rows<4>(xp, M, K, wb, op + n0, N); break;
        case 3: f32_rows<3>(xp, M, K, wb, op + n0, N); break;
        case 2: f32_rows<2>(xp, M, K, wb, op + n0, N); break;
        default: f32_rows<1>(xp, M, K, wb, op + n0, N); break;
      }
      if (bp)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < nn; ++j) op[m * N + n0 + j] += bp[n0 + j];
    }
  });
}
#endif

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.is_contiguous() &&
              w.is_contiguous() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "linear_f32: x [M, K] and w [N, K] must be contiguous fp32");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  auto out = at::empty({M, N}, x.options());
#if defined(__AVX2__) && defined(__FMA__)
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "linear_f32: bias must be a contiguous fp32 [N]");
    bp = bias->data_ptr<float>();
  }
  f32_linear(x.data_ptr<float>(), w.data_ptr<float>(), bp, out.data_ptr<float>(), M, N, K);
#else
  TORCH_CHECK(false, "linear_f32: built without AVX2 and FMA");
#endif
  return out;
}

// bf16 x and weights on a CPU without native bf16 GEMMs (AVX2: torch's bf16 F.linear converts element
// by element, ~13x slower than fp32 there): x widened to fp32 once, each weight widened in registers
// (a bf16 is fp32's top 16 bits), fp32 accumulation as linear_f32 (the same fixed chain per output:
// batch-invariant rows), the bias added in fp32, one rounding to bf16 at the end.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.is_contiguous() &&
              w.is_contiguous() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "linear_bf16: x [M, K] and w [N, K] must be contiguous bf16");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
#if defined(__AVX2__) && defined(__FMA__)
  const at::Tensor xf = x.to(at::kFloat);
  auto out = at::empty({M, N}, xf.options());
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N, "linear_bf16: bias must be a bf16 [N]");
    bf = bias->to(at::kFloat).contiguous();
  }
  f32_linear(xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
             bf.defined() ? bf.data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N, K);
  return out.to(at::kBFloat16);
#else
  TORCH_CHECK(false, "linear_bf16: built without AVX2 and FMA");
  return at::Tensor();
#endif
}

// ---- weight-only INT8 and INT4: integer products on VNNI ----------------------------------------
// Both quantized kernels multiply in integers: the weight's bytes (int8 q + 128, or int4 nibbles
// widened to bytes by one AND and one shift) against x cut into three signed bytes, 4 products per
// VPDPBUSD lane, exact int32 sums. Measured on this CPU (one thread, a 4-bit weight in L2; the loops
// alone in benchmarks/csrc/int4_loop.c): 52-73 G weights/s against 22-26 for the previous kernel,
// which widened nibbles to bf16 for VDPBF16PS and so was compute-bound below the memory's rate.
//
// x is made integer per row and per block of at most 128 k: S = 21 - floor(log2(max |x|)) so that
// t = rint(x * 2^S) has |t| <= 2^22, and t = 65536 a + 256 b + c with a in [-64, 64], b and c in
// [-128, 127]. An element within 2^14 of its block's largest is exact (a bf16 carries 8 significant
// bits); a smaller one is rounded to 2^-22 of that largest element: far below one rounding of the bf16
// output. Per block each piece's sum is exact in int32 and in fp32 (< 2^24), the weight's zero term
// is taken off per piece exactly, then the pieces are joined (65536 P_a + 256 P_b + P_c) and scaled by
// 2^-S (and the group's scale): the only fp32 roundings. Each row is computed alone, in the same order
// whatever the batch: batch-invariant rows, as the bf16 kernel's.
constexpr int64_t kPrefetchBytes = 16384, kXBlock = 128;

struct XPieces {
  std::vector<int8_t> q;      // [M][3][kpad]: a, b, c
  std::vector<float> blk;     // [M][nblk][4]: 2^-S, sum(a), sum(b), sum(c) over the block
  int64_t kpad = 0, xb = 0, nblk = 0;
  const int8_t* row(int64_t m) const { return q.data() + m * 3 * kpad; }
  const float* blocks(int64_t m) const { return blk.data() + m * nblk * 4; }
};

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
// x [M, K] bf16 -> XPieces over kpad >= K columns (the pad is zeros) in blocks of xb k (a multiple of
// 4; the last block may be short). Rows are independent: split across threads for prefill's many.
inline void x_pieces(const at::Tensor& x, int64_t kpad, int64_t xb, XPieces& p) {
  const int64_t M = x.size(0), K = x.size(1);
  p.kpad = kpad, p.xb = xb, p.nblk = (kpad + xb - 1) / xb;
  p.q.assign(M * 3 * kpad, 0);
  p.blk.resize(M * p.nblk * 4);
  const uint16_t* xs = static_cast<const uint16_t*>(x.data_ptr());
  auto load = [&](const uint16_t* r, int64_t k, int64_t k1) {   // 16 (or fewer, zero-filled) bf16 -> fp32
    const __mmask16 m = k1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k1 - k)) - 1);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r + k)), 16));
  };
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint16_t* r = xs + m * K;
      int8_t* out = p.q.data() + m * 3 * kpad;
      float* bl = p.blk.data() + m * p.nblk * 4;
      for (int64_t b = 0; b < p.nblk; ++b) {
        const int64_t k0 = b * xb, k1 = std::min(K, k0 + xb);
        __m512 mx = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t k = k0; k < k1; k += 16) {
          const __m512 v = load(r, k, k1);
          nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);      // MAXPS would drop a NaN
          mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        }
        const float top = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
        int e = 0;
        std::frexp(top, &e);                                  // top = f * 2^e, f in [0.5, 1)
        const int S = top > 0.f ? 22 - e : 0;                 // 21 - floor(log2(top))
        const __m512 s = _mm512_set1_ps(static_cast<float>(S));
        __m512i ta = _mm512_setzero_si512(), tb = ta, tc = ta;
        for (int64_t k = k0; k < k1; k += 16) {
          const __mmask16 mk = k1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k1 - k)) - 1);
          const __m512i t = _mm512_cvtps_epi32(_mm512_scalef_ps(load(r, k, k1), s));   // exact scaling, one rint
          const __m512i c = _mm512_srai_epi32(_mm512_slli_epi32(t, 24), 24);
          const __m512i t1 = _mm512_srai_epi32(_mm512_sub_epi32(t, c), 8);
          const __m512i bb = _mm512_srai_epi32(_mm512_slli_epi32(t1, 24), 24);
          const __m512i a = _mm512_srai_epi32(_mm512_sub_epi32(t1, bb), 8);
          _mm512_mask_cvtepi32_storeu_epi8(out + k, mk, a);
          _mm512_mask_cvtepi32_storeu_epi8(out + kpad + k, mk, bb);
          _mm512_mask_cvtepi32_storeu_epi8(out + 2 * kpad + k, mk, c);
          ta = _mm512_add_epi32(ta, a), tb = _mm512_add_epi32(tb, bb), tc = _mm512_add_epi32(tc, c);
        }
        bl[4 * b] = std::isfinite(top) ? std::ldexp(1.f, -S) : std::numeric_limits<float>::quiet_NaN();
        bl[4 * b + 1] = static_cast<float>(_mm512_reduce_add_epi32(ta));
        bl[4 * b + 2] = static_cast<float>(_mm512_reduce_add_epi32(tb));
        bl[4 * b + 3] = static_cast<float>(_mm512_reduce_add_epi32(tc));
      }
    }
  });
}

// acc[r][piece][j] += w (bytes of 16 columns x 4 k) . x piece's 4 bytes at xr + r * xstride
template <int R, int J>
inline void dot_pieces(__m512i (&acc)[R][3][J], const __m512i (&w)[J], const int8_t* xr, int64_t xstride, int64_t kpad) {
  for (int r = 0; r < R; ++r)
    for (int pc = 0; pc < 3; ++pc) {
      const __m512i xv = _mm512_set1_epi32(*reinterpret_cast<const i32_bytes*>(xr + r * xstride + pc * kpad));
      for (int j = 0; j < J; ++j) acc[r][pc][j] = _mm512_dpbusd_epi32(acc[r][pc][j], w[j], xv);
    }
}

// The joined block sum for 16 columns: sum over pieces of 256^(2 - piece) (acc - off * T_piece), off the
// weight's offset per column (int4's zero; int8's 128), each term exact in fp32.
inline __m512 join_pieces(const __m512i (&a)[3], __m512 off, const float* bl) {
  const __m512 pa = _mm512_fnmadd_ps(off, _mm512_set1_ps(bl[1]), _mm512_cvtepi32_ps(a[0]));
  const __m512 pb = _mm512_fnmadd_ps(off, _mm512_set1_ps(bl[2]), _mm512_cvtepi32_ps(a[1]));
  const __m512 pc = _mm512_fnmadd_ps(off, _mm512_set1_ps(bl[3]), _mm512_cvtepi32_ps(a[2]));
  return _mm512_fmadd_ps(pa, _mm512_set1_ps(65536.f), _mm512_fmadd_ps(pb, _mm512_set1_ps(256.f), pc));
}

// Calls f(rows constant, columns-per-pass constant): 16 J columns per pass, so that R * 3 * J int32
// accumulators stay in registers.
template <typename F>
inline void with_rows_vnni(int64_t rows, F&& f) {
  with_rows(rows, [&](auto R) {
    constexpr int r = decltype(R)::value;
    f(R, std::integral_constant<int, (r <= 2 ? 4 : r <= 4 ? 2 : 1)>{});
  });
}

// INT8, [N/64][K4][64 n][4 k] bytes q + 128 (kernels/int8_linear.py pack_int8), K4 = kpad / 4.
template <int R, int J>
inline void int8_rows(const uint8_t* wb, const XPieces& xp, int64_t m0, float* y) {
  const int64_t kpad = xp.kpad, xstride = 3 * kpad;
  const int8_t* x0 = xp.row(m0);
  const __m512 off = _mm512_set1_ps(128.f);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + r * kPackNB + 16 * j, _mm512_setzero_ps());
  for (int j0 = 0; j0 < 4; j0 += J)
    for (int64_t b = 0; b < xp.nblk; ++b) {
      __m512i acc[R][3][J];
      for (int r = 0; r < R; ++r)
        for (int pc = 0; pc < 3; ++pc)
          for (int j = 0; j < J; ++j) acc[r][pc][j] = _mm512_setzero_si512();
      const int64_t k1 = std::min(kpad, (b + 1) * xp.xb);
      for (int64_t k = b * xp.xb; k < k1; k += 4) {
        const uint8_t* p = wb + k * kPackNB + 64 * j0;
        __m512i w[J];
        for (int j = 0; j < J; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(p + 64 * j) + kPrefetchBytes, _MM_HINT_T1);
          w[j] = _mm512_loadu_si512(p + 64 * j);
        }
        dot_pieces<R, J>(acc, w, x0 + k, xstride, kpad);
      }
      for (int r = 0; r < R; ++r) {
        const float* bl = xp.blocks(m0 + r) + 4 * b;
        for (int j = 0; j < J; ++j) {
          float* yr = y + r * kPackNB + 16 * (j0 + j);
          const __m512i a[3] = {acc[r][0][j], acc[r][1][j], acc[r][2][j]};
          _mm512_storeu_ps(yr, _mm512_fmadd_ps(join_pieces(a, off, bl), _mm512_set1_ps(bl[0]), _mm512_loadu_ps(yr)));
        }
      }
    }
}
#endif

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale, int64_t N, int64_t K,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "linear_int8: x must be a contiguous bf16 [M, K]");
  const int64_t M = x.size(0), nblocks = (N + kPackNB - 1) / kPackNB, kpad = (K + 3) / 4 * 4;
  TORCH_CHECK(qw.scalar_type() == at::kChar && qw.numel() >= nblocks * kpad * kPackNB,
              "linear_int8: the packed int8 weight is too small for [", N, ", ", K, "]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() >= N, "linear_int8: scale must be fp32 [N]");
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
  XPieces xp;
  x_pieces(x, kpad, kXBlock, xp);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(qw.data_ptr<int8_t>());
  const float* sp = scale.data_ptr<float>();
  tiled_gemm(M, N, kpad / 2, bias, out, [&](int64_t rows, int64_t nb, int64_t m0, float* y) {
    with_rows_vnni(rows, [&](auto R, auto J) {
      int8_rows<decltype(R)::value, decltype(J)::value>(w + nb * kpad * kPackNB, xp, m0, y);
    });
  }, [&](float* yr, int64_t n0, int64_t nn) {
    for (int64_t c = 0; c < nn; ++c) yr[c] *= sp[n0 + c];
  });
#else
  TORCH_CHECK(false, "linear_int8: built without AVX512-BF16 and AVX512-VNNI");
#endif
  return out;
}

// y[M, N] = x[M, K] @ W^T for a 4-bit group-quantized weight, W[n, k] = (q - z) * s with q, z in
// 0..15 and (z, s) per (group of G consecutive k, n) (act-order checkpoints are permuted along K at
// load, kernels/int4_linear.py, and x with them). Packed as [N/64][K/8][64] uint32: column n's word
// for k = 8t..8t+7 holds k = 8t + i in the low nibble of byte i and k = 8t + 4 + i in its high nibble
// (i = 0..3), so one AND gives the bytes of k 8t..8t+3 and one shift and AND those of 8t+4..8t+7,
// each a VPDPBUSD operand for 16 columns. Scales [N/64][K/G][2][64] fp32: s, then z. A quarter of
// bf16's bytes per decode step.
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
template <int R, int J>
inline void int4_rows(const uint32_t* wb, const float* szb, int64_t G, const XPieces& xp, int64_t m0, float* y) {
  const int64_t kpad = xp.kpad, xstride = 3 * kpad, xb = xp.xb;
  const int8_t* x0 = xp.row(m0);
  const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + r * kPackNB + 16 * j, _mm512_setzero_ps());
  for (int j0 = 0; j0 < 4; j0 += J)
    for (int64_t b = 0; b < xp.nblk; ++b) {      // x blocks lie inside groups (xb divides G)
      __m512i acc[R][3][J];
      for (int r = 0; r < R; ++r)
        for (int pc = 0; pc < 3; ++pc)
          for (int j = 0; j < J; ++j) acc[r][pc][j] = _mm512_setzero_si512();
      for (int64_t k = b * xb; k < (b + 1) * xb; k += 8) {
        const uint32_t* p = wb + k / 8 * kPackNB + 16 * j0;
        __m512i lo[J], hi[J];
        for (int j = 0; j < J; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(p + 16 * j) + kPrefetchBytes, _MM_HINT_T1);
          const __m512i v = _mm512_loadu_si512(p + 16 * j);
          lo[j] = _mm512_and_si512(v, nib);
          hi[j] = _mm512_and_si512(_mm512_srli_epi32(v, 4), nib);
        }
        dot_pieces<R, J>(acc, lo, x0 + k, xstride, kpad);
        dot_pieces<R, J>(acc, hi, x0 + k + 4, xstride, kpad);
      }
      const float* sg = szb + (b * xb / G) * 2 * kPackNB;
      for (int r = 0; r < R; ++r) {
        const float* bl = xp.blocks(m0 + r) + 4 * b;
        for (int j = 0; j < J; ++j) {
          float* yr = y + r * kPackNB + 16 * (j0 + j);
          const __m512i a[3] = {acc[r][0][j], acc[r][1][j], acc[r][2][j]};
          const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(sg + 16 * (j0 + j)), _mm512_set1_ps(bl[0]));
          const __m512 z = _mm512_loadu_ps(sg + kPackNB + 16 * (j0 + j));
          _mm512_storeu_ps(yr, _mm512_fmadd_ps(join_pieces(a, z, bl), s, _mm512_loadu_ps(yr)));
        }
      }
    }
}
#endif

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sz, int64_t N, int64_t K,
                       int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "linear_int4: x must be a contiguous bf16 [M, K]");
  TORCH_CHECK(group_size % 8 == 0 && K % group_size == 0, "linear_int4: K must be a multiple of a group size that is a multiple of 8");
  const int64_t M = x.size(0), nblocks = (N + kPackNB - 1) / kPackNB, ngroups = K / group_size;
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.numel() >= nblocks * K / 2 * kPackNB,
              "linear_int4: the packed weight is too small for [", N, ", ", K, "]");
  TORCH_CHECK(sz.scalar_type() == at::kFloat && sz.numel() >= nblocks * ngroups * 2 * kPackNB,
              "linear_int4: scales must be fp32 [N/64][K/G][2][64]");
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
  // x blocks: the largest of 128, 64, 32, 16, 8 that divides the group (so none straddles two)
  int64_t xb = kXBlock;
  while (group_size % xb) xb /= 2;
  XPieces xp;
  x_pieces(x, K, xb, xp);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(qw.data_ptr<uint8_t>());
  const float* szp = sz.data_ptr<float>();
  tiled_gemm(M, N, K / 2, bias, out, [&](int64_t rows, int64_t nb, int64_t m0, float* y) {
    with_rows_vnni(rows, [&](auto R, auto J) {
      int4_rows<decltype(R)::value, decltype(J)::value>(w + nb * K / 8 * kPackNB, szp + nb * ngroups * 2 * kPackNB,
                                                         group_size, xp, m0, y);
    });
  }, [](float*, int64_t, int64_t) {});
#else
  TORCH_CHECK(false, "linear_int4: built without AVX512-BF16 and AVX512-VNNI");
#endif
  return out;
}

// One row of silu(gate) * up. silu(gate) is rounded to the storage type first, as F.silu(gate) * up does.
template <typename T>
void silu_mul_row(const T* g, const T* u, T* out, int64_t n, float* gb, float* ub, T* tmp) {
  load_row(g, gb, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gb[i] = gb[i] / (1.f + fast_exp(-gb[i]));
  store_row(gb, tmp, n);
  load_row(tmp, gb, n);
  load_row(u, ub, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gb[i] *= ub[i];
  store_row(gb, out, n);
}

// x: [T, 2N] = [gate | up] -> silu(gate) * up, [T, N].
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "silu_and_mul: x must be contiguous");
  const int64_t N = x.size(-1) / 2, rows = x.numel() / (2 * N);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = at::empty(sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
      std::vector<float> gb(N), ub(N);
      std::vector<scalar_t> tmp(N);
      for (int64_t r = b; r < e; ++r)
        silu_mul_row<scalar_t>(xp + r * 2 * N, xp + r * 2 * N + N, op + r * N, N, gb.data(), ub.data(), tmp.data());
    });
  });
  return out;
}

// A whole decode step of the decoder stack in one call, for batches of single-token decodes with
// bf16 weights the linear kernel reads in place: the same kernels in the same order as
// DecoderLM.forward, so the result is bit-identical to it, without ~100 Python-level op calls per
// step. h: the embedded tokens [T, hidden] (consumed). Per layer, `w` holds input_norm, qkv, o,
// post_norm, gate_up, down (packed bf16 blobs, int8 or int4 weights) and `opt` holds qkv bias,
// qk_norm, o bias, gate_up bias, down bias, then the scales of qkv, o, gate_up, down (each may be
// None; a scale marks its weight int8 or, with uint8 bytes, int4), then act-order int4 weights'
// permutations of x's columns (None otherwise); `kv` holds each layer's K and V cache, followed by their
// scales for an int8 / fp8 cache. An empty final_norm: no final
// norm, the residual stream is returned (an EAGLE head's predicted feature).
at::Tensor decode_forward_bf16(at::Tensor h, const at::Tensor& positions, at::TensorList w,
                               const c10::List<c10::optional<at::Tensor>>& opt, at::TensorList kv,
                               const at::Tensor& block_tables, const at::Tensor& context_lens,
                               const at::Tensor& slot_blocks, const at::Tensor& slot_offsets,
                               const at::Tensor& cos, const at::Tensor& sin_signed, const at::Tensor& final_norm,
                               int64_t H, int64_t KV, int64_t D, int64_t inter, double eps, double scale) {
  const int64_t layers = w.size() / 6, T = h.size(0), hidden = h.size(1), nqkv = (H + 2 * KV) * D;
  const int64_t per = static_cast<int64_t>(kv.size()) / std::max<int64_t>(layers, 1);   // K, V (+ their scales)
  TORCH_CHECK(per * layers == static_cast<int64_t>(kv.size()) && (per == 2 || per == 4),
              "decode_forward_bf16: K and V (and, for a quantized cache, their scales) per layer expected");
  TORCH_CHECK(static_cast<int64_t>(w.size()) == 6 * layers && static_cast<int64_t>(opt.size()) == 13 * layers,
              "decode_forward_bf16: 6 weights and 13 optional tensors per layer expected");
  auto opt_at = [&](int64_t i) { return opt.get(i); };   // a bias, the qk norm or a scale; may be None
  // a weight's kernel by what is passed: no scale: bf16 packed bytes; int8 bytes + scales: int8;
  // uint8 bytes + [N/64][K/G][2][64] scales: int4 (the group size follows from the scales' size)
  // (an act-order int4 weight also has a permutation of x's columns, 4 slots after its scale)
  auto lin = [&](const at::Tensor& x, const at::Tensor& wt, int64_t si, int64_t N, int64_t K, int64_t bi) {
    const c10::optional<at::Tensor> s = opt_at(si);
    if (!s.has_value()) return linear_packed_bf16(x, wt, N, K, opt_at(bi));
    if (wt.scalar_type() == at::kChar) return linear_int8(x, wt, *s, N, K, opt_at(bi));
    const int64_t groups = s->numel() / (((N + kPackNB - 1) / kPackNB) * 2 * kPackNB);
    TORCH_CHECK(groups > 0 && K % groups == 0, "decode_forward_bf16: int4 scales do not match the weight");
    const c10::optional<at::Tensor> perm = opt_at(si + 4);
    return linear_int4(perm.has_value() ? x.index_select(1, *perm) : x, wt, *s, N, K, K / groups, opt_at(bi));
  };
  at::Tensor residual = h, x = rms_norm(h, w[0], eps);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* L = w.data() + 6 * l;
    const int64_t o9 = 13 * l, s4 = o9 + 5;
    if (l) x = add_rms_norm(h, residual, L[0], eps);
    at::Tensor qkv = lin(x, L[1], s4, nqkv, hidden, o9).view({T, H + 2 * KV, D});
    qk_norm_rope(qkv.narrow(1, 0, H + KV), opt_at(o9 + 1), cos, sin_signed, positions, eps);
    const at::Tensor &kc = kv[per * l], &vc = kv[per * l + 1];
    c10::optional<at::Tensor> ksc, vsc;
    if (per == 4) {
      ksc = kv[per * l + 2];
      vsc = kv[per * l + 3];
      store_kv_quant(qkv.narrow(1, H, KV), qkv.narrow(1, H + KV, KV), kc, vc, *ksc, *vsc, slot_blocks, slot_offsets);
    } else {
      store_kv(qkv.narrow(1, H, KV), qkv.narrow(1, H + KV, KV), kc, vc, slot_blocks, slot_offsets);
    }
    at::Tensor o = paged_decode_attention(qkv.narrow(1, 0, H), kc, vc, block_tables, context_lens, scale, ksc, vsc);
    h = lin(o.view({T, H * D}), L[2], s4 + 1, hidden, H * D, o9 + 2);
    x = add_rms_norm(h, residual, L[3], eps);
    h = lin(silu_and_mul(lin(x, L[4], s4 + 2, 2 * inter, hidden, o9 + 3)), L[5], s4 + 3, hidden, inter, o9 + 4);
  }
  if (final_norm.numel() == 0) return h + residual;
  return add_rms_norm(h, residual, final_norm, eps);
}

}  // namespace

// Exported by libtorch_cpu (AOTInductor reloads constant packed weights with it); declared here
// because its header is not shipped.
namespace at::native {
at::Tensor mkldnn_tensor_from_data_ptr(void* data_ptr, at::IntArrayRef dims, at::ScalarType dtype,
                                       at::Device device, const uint8_t* opaque_metadata,
                                       int64_t opaque_metadata_size);
}

namespace {

// A oneDNN-packed weight over bytes someone else owns (a node's shared weight file): no copy.
// The caller keeps `blob` alive as long as the result is used.
at::Tensor mkldnn_from_blob(const at::Tensor& blob, at::IntArrayRef dims, at::ScalarType dtype,
                            const at::Tensor& md) {
  TORCH_CHECK(blob.is_contiguous() && md.is_contiguous() && md.scalar_type() == at::kByte,
              "mkldnn_from_blob: contiguous blob and uint8 descriptor expected");
  return at::native::mkldnn_tensor_from_data_ptr(blob.data_ptr(), dims, dtype, at::Device(at::kCPU),
                                                 md.data_ptr<uint8_t>(), md.numel());
}

}  // namespace

TORCH_LIBRARY(baton_cpu, m) {
  m.def("mkldnn_from_blob", &mkldnn_from_blob);
  m.def("linear_packed_bf16", &linear_packed_bf16);
  m.def("linear_f32", &linear_f32);
  m.def("linear_f32_supported", &linear_f32_supported);
  m.def("linear_bf16", &linear_bf16);
  m.def("linear_int8", &linear_int8);
  m.def("linear_int4", &linear_int4);
  m.def("packed_bf16_supported", &packed_bf16_supported);
  m.def("quant_kernels_supported", &quant_kernels_supported);
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("qk_norm_rope", &qk_norm_rope);
  m.def("store_kv", &store_kv);
  m.def("store_kv_quant", &store_kv_quant);
  m.def("paged_decode_attention", &paged_decode_attention);
  m.def("paged_prefill_attention", &paged_prefill_attention);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("decode_forward_bf16", &decode_forward_bf16);
}
