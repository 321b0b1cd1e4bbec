/* bf16 <-> fp32 for the native kernels, one value or 16 at a time (GCC/Clang vector
 * extensions: one AVX-512 register, or two or four narrower ones where the CPU has no AVX-512).
 * Rounding to bf16 is to nearest even, NaN kept, as torch rounds.
 */
#ifndef TUNERY_BF16_H
#define TUNERY_BF16_H

#include <stdint.h>
#include <string.h>

#define LANES 16

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

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

static inline f32x16 load_bf16x16(const uint16_t *p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    f32x16 f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline f32x16 load_f32x16(const float *p) {
    f32x16 f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline void store_bf16x16(uint16_t *p, f32x16 f) {
    u32x16 u;
    memcpy(&u, &f, sizeof u);
    u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    u32x16 nan = (u32x16)((u & 0x7fffffffu) > 0x7f800000u);
    rounded = (rounded & ~nan) | (0x7fc0u & nan);
    u16x16 h = __builtin_convertvector(rounded, u16x16);
    memcpy(p, &h, sizeof h);
}

/* The 16 lanes summed in a fixed tree: 8 pairs, 4, 2, 1. */
static inline float sum_lanes(f32x16 v) {
    float a[LANES];
    memcpy(a, &v, sizeof a);
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) a[l] += a[l + w];
    return a[0];
}

/* sum_i a[i] * b[i] over n values: 16 running sums, then `sum_lanes`'s tree, then the tail in
 * order. Every kernel's fp32-by-bf16 dot product, so they all round alike. */
static inline float dot_f32_bf16(const float *a, const uint16_t *b, int64_t n) {
    f32x16 acc = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) acc += load_f32x16(a + i) * load_bf16x16(b + i);
    float s = sum_lanes(acc);
    for (; i < n; i++) s += a[i] * bf16_to_f32(b[i]);
    return s;
}

/* The same over fp32 values, in the same order (the head's exact logits for fp32 weights). */
static inline float dot_f32_f32(const float *a, const float *b, int64_t n) {
    f32x16 acc = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) acc += load_f32x16(a + i) * load_f32x16(b + i);
    float s = sum_lanes(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#endif
