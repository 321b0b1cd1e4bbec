/* The element type of a decode kernel's activations, tables and KV caches: bf16, or fp32 where
 * the kernel file is compiled with TUNERY_FP32 defined (`kernels_f32.c`, for CPUs that run the
 * model in fp32), whose exported names then end in `_f32`. Sums are fp32 either way; rounding
 * to the element type (`round_elem`) is the identity in fp32, and `dot_f32_elem` is
 * `dot_f32_bf16` or `dot_f32_f32` (the same order).
 */
#ifndef TUNERY_ELEM_H
#define TUNERY_ELEM_H

#include "bf16.h"

#ifdef TUNERY_FP32
typedef float elem_t;
#define KERNEL(name) name##_f32

static inline float elem_to_f32(elem_t x) { return x; }
static inline elem_t f32_to_elem(float f) { return f; }
static inline f32v load_elemv(const elem_t *p) { return load_f32v(p); }
static inline void store_elemv(elem_t *p, f32v f) { memcpy(p, &f, sizeof f); }
static inline float dot_f32_elem(const float *a, const elem_t *b, int64_t n) {
    return dot_f32_f32(a, b, n);
}
#else
typedef uint16_t elem_t;
#define KERNEL(name) name

static inline float elem_to_f32(elem_t x) { return bf16_to_f32(x); }
static inline elem_t f32_to_elem(float f) { return f32_to_bf16(f); }
static inline f32v load_elemv(const elem_t *p) { return load_bf16v(p); }
static inline void store_elemv(elem_t *p, f32v f) { store_bf16v(p, f); }
static inline float dot_f32_elem(const float *a, const elem_t *b, int64_t n) {
    return dot_f32_bf16(a, b, n);
}
#endif

static inline float round_elem(float f) { return elem_to_f32(f32_to_elem(f)); }

#endif
