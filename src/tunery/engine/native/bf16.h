/* bf16 <-> fp32 for the native kernels, one value or a vector of LANES at a time (GCC/Clang
 * vector extensions of one register: 16 lanes with AVX-512, else 8). Rounding to bf16 is to
 * nearest even, NaN kept, as torch rounds.
 */
#ifndef TUNERY_BF16_H
#define TUNERY_BF16_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

/* One register's lanes. Not 16 everywhere: without AVX-512, GCC 12 keeps a loop-carried 64-byte
 * vector in memory, spilling and reloading it each iteration (measured: a 32-row LoRA delta of 8
 * adapters took 1.2 ms a layer's MLP on 2 AVX2 cores). Sums therefore run in another order on
 * such a CPU, and the same one on each row, call and thread count there. */
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif

typedef float f32v __attribute__((vector_size(4 * LANES)));
typedef uint32_t u32v __attribute__((vector_size(4 * LANES)));
typedef int32_t i32v __attribute__((vector_size(4 * LANES)));
typedef uint16_t u16v __attribute__((vector_size(2 * LANES)));
typedef int8_t i8v __attribute__((vector_size(LANES)));

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline f32v load_bf16v(const uint16_t *p) {
    u16v h;
    memcpy(&h, p, sizeof h);
    u32v u = __builtin_convertvector(h, u32v) << 16;
    f32v f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline f32v load_f32v(const float *p) {
    f32v f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline void store_bf16v(uint16_t *p, f32v f) {
    u32v u;
    memcpy(&u, &f, sizeof u);
    u32v rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    u32v nan = (u32v)((u & 0x7fffffffu) > 0x7f800000u);
    rounded = (rounded & ~nan) | (0x7fc0u & nan);
    u16v h = __builtin_convertvector(rounded, u16v);
    memcpy(p, &h, sizeof h);
}

/* The lanes summed in a fixed tree: (16,) 8 pairs, 4, 2, 1. */
static inline float sum_lanes(f32v v) {
    float a[LANES];
    memcpy(a, &v, sizeof a);
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) a[l] += a[l + w];
    return a[0];
}

/* sum_i a[i] * b[i] over n values: 16 running sums, then `sum_lanes`'s tree, then the tail in
 * order. Every kernel's fp32-by-bf16 dot product, so they all round alike. */
static inline float dot_f32_bf16(const float *a, const uint16_t *b, int64_t n) {
    f32v acc = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) acc += load_f32v(a + i) * load_bf16v(b + i);
    float s = sum_lanes(acc);
    for (; i < n; i++) s += a[i] * bf16_to_f32(b[i]);
    return s;
}

/* The same over fp32 values, in the same order (the head's exact logits for fp32 weights). */
static inline float dot_f32_f32(const float *a, const float *b, int64_t n) {
    f32v acc = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) acc += load_f32v(a + i) * load_f32v(b + i);
    float s = sum_lanes(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* acc + a * b, rounded once (an FMA) where the CPU has one. */
static inline f32v fma_v(f32v a, f32v b, f32v acc) {
#if defined(__AVX512F__)
    return (f32v)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif defined(__FMA__)
    return (f32v)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
    return acc + a * b;
#endif
}

/* x broadcast to every lane. */
static inline f32v broadcast_v(float x) {
#if defined(__AVX512F__)
    return (f32v)_mm512_set1_ps(x);
#elif defined(__AVX__)
    return (f32v)_mm256_set1_ps(x);
#else
    f32v v;
    for (int l = 0; l < LANES; l++) v[l] = x;
    return v;
#endif
}

/* exp(x), ~2 ulp, where the CPU has AVX-512: 2^x' for x' = x log2(e) (clamped to [-150, 128]:
 * 0 and inf beyond), split into n = round(x') and f in [-1/2, 1/2], 2^f by its degree-6 Taylor
 * polynomial (FMAs), times 2^n by `scalef`. Elsewhere expf per lane. */
static inline f32v exp_v(f32v x) {
#ifdef __AVX512F__
    __m512 t = _mm512_mul_ps((__m512)x, _mm512_set1_ps(1.44269504088896341f));
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-150.0f)), _mm512_set1_ps(128.0f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return (f32v)_mm512_scalef_ps(p, n);
#else
    float a[LANES];
    memcpy(a, &x, sizeof a);
    for (int l = 0; l < LANES; l++) a[l] = expf(a[l]);
    memcpy(&x, a, sizeof a);
    return x;
#endif
}

#endif
