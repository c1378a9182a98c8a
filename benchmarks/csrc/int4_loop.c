// The inner loops of the 4-bit GEMV, alone: how many 4-bit weights per second one thread multiplies
// with the weight held in L2 (no memory in the way), for the widening the int4 kernel used until
// 2026-12-02 (nibbles -> bf16 with one shift and one VPTERNLOG per 16 columns, VDPBF16PS) and the
// integer products it uses now (VPDPBUSD, x as three or two signed bytes). Arms alternate in one
// process. benchmarks/README.md ("the int8 and int4 kernels multiply in integers") has the results.
//
//   gcc -O3 -march=native -o /tmp/int4_loop benchmarks/csrc/int4_loop.c && taskset -c 1 /tmp/int4_loop
// (-O3 as the extension is built: at -O2 GCC keeps the pieces loop and its accumulators in memory)
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define KP 512   // k-pairs: K = 1024
#define NB 16    // blocks of 64 columns: N = 1024; 512 KiB of 4-bit weights
static uint32_t *W, *X, *XA, *XB, *XC;
static float Y[NB * 64];

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static void bf16_widening(void) {
  const __m512i nib = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  for (int nb = 0; nb < NB; nb++) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int kp = 0; kp < KP; kp += 4) {
      const uint32_t* p = W + (nb * KP / 4 + kp / 4) * 64;
      __m512i v[4];
      for (int j = 0; j < 4; j++) v[j] = _mm512_loadu_si512(p + 16 * j);
      for (int i = 0; i < 4; i++) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(X[kp + i]);
        for (int j = 0; j < 4; j++) {
          const __m512i s = i ? _mm512_srli_epi32(v[j], 4 * i) : v[j];
          acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_ternarylogic_epi32(s, nib, magic, 0xEA), xv);
        }
      }
    }
    for (int j = 0; j < 4; j++) _mm512_storeu_ps(Y + nb * 64 + 16 * j, acc[j]);
  }
}

static inline __attribute__((always_inline)) void integer(int pieces) {   // pieces: a constant where inlined
  const __m512i m = _mm512_set1_epi32(0x0F0F0F0F);
  const uint32_t* xs[3] = {XA, XB, XC};
  for (int nb = 0; nb < NB; nb++) {
    __m512i a[3][4];
    for (int q = 0; q < 3; q++) for (int j = 0; j < 4; j++) a[q][j] = _mm512_setzero_si512();
    for (int k8 = 0; k8 < KP / 4; k8++) {      // as linear_int4 does for one row: widen 64 columns, then multiply
      const uint32_t* p = W + (nb * KP / 4 + k8) * 64;
      __m512i lo[4], hi[4];
      for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_loadu_si512(p + 16 * j);
        lo[j] = _mm512_and_si512(v, m), hi[j] = _mm512_and_si512(_mm512_srli_epi32(v, 4), m);
      }
      for (int q = 0; q < pieces; q++) {
        const __m512i xv = _mm512_set1_epi32(xs[q][2 * k8]);
        for (int j = 0; j < 4; j++) a[q][j] = _mm512_dpbusd_epi32(a[q][j], lo[j], xv);
      }
      for (int q = 0; q < pieces; q++) {
        const __m512i xv = _mm512_set1_epi32(xs[q][2 * k8 + 1]);
        for (int j = 0; j < 4; j++) a[q][j] = _mm512_dpbusd_epi32(a[q][j], hi[j], xv);
      }
    }
    for (int j = 0; j < 4; j++)
      _mm512_storeu_ps(Y + nb * 64 + 16 * j, _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(a[0][j], a[1][j]), a[2][j])));
  }
}
static void integer3(void) { integer(3); }
static void integer2(void) { integer(2); }

int main(void) {
  W = aligned_alloc(64, NB * KP / 4 * 64 * 4);
  X = aligned_alloc(64, KP * 4), XA = aligned_alloc(64, KP * 4), XB = aligned_alloc(64, KP * 4), XC = aligned_alloc(64, KP * 4);
  for (int i = 0; i < NB * KP / 4 * 64; i++) W[i] = rand();
  for (int i = 0; i < KP; i++) X[i] = 0x3f803f80, XA[i] = rand(), XB[i] = rand(), XC[i] = rand();
  struct { const char* name; void (*f)(void); } arms[] = {
      {"bf16 widening + VDPBF16PS", bf16_widening}, {"VPDPBUSD, x in 3 bytes", integer3}, {"VPDPBUSD, x in 2 bytes", integer2}};
  const double weights = (double)NB * 64 * KP * 2;
  for (int round = 0; round < 5; round++) {
    for (int a = 0; a < 3; a++) {
      arms[a].f();
      const double t = now();
      for (int r = 0; r < 400; r++) arms[a].f();
      printf("%-28s %6.1f G weights/s   ", arms[a].name, weights * 400 / (now() - t) / 1e9);
    }
    printf("\n");
  }
  printf("(%g)\n", Y[0]);
  return 0;
}
