/* Training's MLP activation, Gemma's gelu-tanh(gate) * up over the fused gate/up output, forward
 * and backward in one pass each. torch runs it as a gelu, a mul and, backward, a gelu_backward,
 * two muls and the chunk's zero-filled gradient: ~50 ms of a 1 s step of 4 x 200-token
 * examples, each op a pass over memory. Values are bf16 (fp32: `elem.h`); each value is
 * computed in fp32 and rounded once, where torch rounds after each op.
 */
#include <math.h>
#include <string.h>

#include "elem.h"

#define GELU_C 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_A 0.044715f

/* tanh(y) = 1 - 2 / (1 + exp(2y)): exactly +-1 where exp(2y) is inf or 0. */
static inline f32v tanh_v(f32v y) {
    return broadcast_v(1.0f) - broadcast_v(2.0f) / (broadcast_v(1.0f) + exp_v(y + y));
}

/* gelu's inner tanh, tanh(c (x + a x^3)), for x. */
static inline f32v gelu_tanh(f32v x) {
    return tanh_v(broadcast_v(GELU_C) * (x + broadcast_v(GELU_A) * x * x * x));
}

/* gelu(x) = (x / 2) (1 + t) and its slope d gelu / dx, t = `gelu_tanh`, as the kernels below
 * work them out in fp32 for LANES values x. */
static inline f32v gelu_of(f32v x, f32v t) {
    return broadcast_v(0.5f) * x * (broadcast_v(1.0f) + t);
}

static inline f32v gelu_slope(f32v x, f32v t) {
    f32v inner = broadcast_v(GELU_C) * (broadcast_v(1.0f) + broadcast_v(3.0f * GELU_A) * x * x);
    return broadcast_v(0.5f) * (broadcast_v(1.0f) + t) +
           broadcast_v(0.5f) * x * (broadcast_v(1.0f) - t * t) * inner;
}

#if !defined(TUNERY_FP32) && defined(__AVX512F__)
/* A bf16 gate has 2^16 possible values: `gelu_of` and `gelu_slope` of each, worked out once when
 * the library loads (the same fp32 arithmetic, so the same values) and then looked up 16 at a
 * time by gathers from 512 KB, where the tanh's exp and division cost ~3x that per value. */
#define GELU_TABLE 1
static float gelu_values[1 << 16], gelu_slopes[1 << 16];

__attribute__((constructor)) static void gelu_tables(void) {
    for (int32_t b = 0; b < (1 << 16); b += LANES) {
        uint16_t bits[LANES];
        for (int l = 0; l < LANES; l++) bits[l] = (uint16_t)(b + l);
        f32v x = load_bf16v(bits), t = gelu_tanh(x);
        f32v value = gelu_of(x, t), slope = gelu_slope(x, t);
        memcpy(gelu_values + b, &value, sizeof value);
        memcpy(gelu_slopes + b, &slope, sizeof slope);
    }
}

/* table[bits of each of the 16 bf16 values at p] */
static inline f32v gelu_lookup(const float *table, const uint16_t *p) {
    __m512i at = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (f32v)_mm512_i32gather_ps(at, table, 4);
}
#endif

/* out[r] (f values) = gelu(gu[r][0:f]) * gu[r][f:2f] for each of `rows` rows of 2f values. */
void KERNEL(tunery_gelu_times)(int64_t rows, int64_t f, const elem_t *gu, elem_t *out,
                               int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const elem_t *gate = gu + r * 2 * f, *up = gate + f;
        elem_t *o = out + r * f;
        int64_t j = 0;
        for (; j + LANES <= f; j += LANES) {
#ifdef GELU_TABLE
            f32v act = gelu_lookup(gelu_values, gate + j);
#else
            f32v x = load_elemv(gate + j);
            f32v act = gelu_of(x, gelu_tanh(x));
#endif
            store_elemv(o + j, act * load_elemv(up + j));
        }
        for (; j < f; j++) {
            float x = elem_to_f32(gate[j]);
            float act = 0.5f * x * (1.0f + tanhf(GELU_C * (x + GELU_A * x * x * x)));
            o[j] = f32_to_elem(act * elem_to_f32(up[j]));
        }
    }
}

/* The gradient of `tunery_gelu_times` for the output's g (rows x f): grad[r] (2f values) = the
 * gate's g * up * gelu'(gate), then the up's g * gelu(gate). */
void KERNEL(tunery_gelu_times_backward)(int64_t rows, int64_t f, const elem_t *gu, const elem_t *g,
                                        elem_t *grad, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const elem_t *gate = gu + r * 2 * f, *up = gate + f, *gr = g + r * f;
        elem_t *d_gate = grad + r * 2 * f, *d_up = d_gate + f;
        int64_t j = 0;
        for (; j + LANES <= f; j += LANES) {
#ifdef GELU_TABLE
            f32v value = gelu_lookup(gelu_values, gate + j);
            f32v slope = gelu_lookup(gelu_slopes, gate + j);
#else
            f32v x = load_elemv(gate + j), t = gelu_tanh(x);
            f32v value = gelu_of(x, t), slope = gelu_slope(x, t);
#endif
            f32v go = load_elemv(gr + j);
            store_elemv(d_gate + j, go * load_elemv(up + j) * slope);
            store_elemv(d_up + j, go * value);
        }
        for (; j < f; j++) {
            float x = elem_to_f32(gate[j]), go = elem_to_f32(gr[j]);
            float t = tanhf(GELU_C * (x + GELU_A * x * x * x));
            float inner = GELU_C * (1.0f + 3.0f * GELU_A * x * x);
            float slope = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * inner;
            d_gate[j] = f32_to_elem(go * elem_to_f32(up[j]) * slope);
            d_up[j] = f32_to_elem(go * 0.5f * x * (1.0f + t));
        }
    }
}
