/* Training's MLP activation, Gemma's gelu-tanh(gate) * up over the fused gate/up output, forward
 * and backward in one pass each. torch runs it as a gelu, a mul and, backward, a gelu_backward,
 * two muls and the chunk's zero-filled gradient: ~50 ms of a 1 s step of 4 x 200-token
 * examples, each op a pass over memory. Values are bf16 (fp32: `elem.h`); each value is
 * computed in fp32 and rounded once, where torch rounds after each op.
 */
#include <math.h>

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

/* out[r] (f values) = gelu(gu[r][0:f]) * gu[r][f:2f] for each of `rows` rows of 2f values. */
void KERNEL(tunery_gelu_times)(int64_t rows, int64_t f, const elem_t *gu, elem_t *out,
                               int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const elem_t *gate = gu + r * 2 * f, *up = gate + f;
        elem_t *o = out + r * f;
        int64_t j = 0;
        for (; j + LANES <= f; j += LANES) {
            f32v x = load_elemv(gate + j);
            f32v act = broadcast_v(0.5f) * x * (broadcast_v(1.0f) + gelu_tanh(x));
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
            f32v x = load_elemv(gate + j), t = gelu_tanh(x), go = load_elemv(gr + j);
            f32v half_x = broadcast_v(0.5f) * x, one_t = broadcast_v(1.0f) + t;
            f32v inner = broadcast_v(GELU_C) * (broadcast_v(1.0f) + broadcast_v(3.0f * GELU_A) * x * x);
            f32v slope = broadcast_v(0.5f) * one_t + half_x * (broadcast_v(1.0f) - t * t) * inner;
            store_elemv(d_gate + j, go * load_elemv(up + j) * slope);
            store_elemv(d_up + j, go * half_x * one_t);
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
