/* Attention of a small packed training step (`fast_train.DENSE_ATTENTION_MAX_TOKENS`), forward
 * and backward each in one call, where torch's dense path takes a dozen ops each way (bmm, casts,
 * scale, mask, softmax) and as many autograd nodes.
 *
 * q (H, T, D), k and v (Hkv, T, D), each query head h reading kv head h / (H / Hkv). Token i
 * attends to token j when j <= i, i - j < window (0: no window) and both are of one example
 * (segments[i] == segments[j]; NULL: one example). Scores, softmax and sums are fp32; the
 * softmax weights are rounded to the element type before they weigh V, as torch's bf16
 * attention on a CPU does. The weights are kept (fp32, (H, T, T), zero where masked) for the
 * backward. Values bf16 (fp32: `elem.h`).
 */
#include <math.h>
#include <string.h>

#include "elem.h"

static inline int attends(int64_t i, int64_t j, int64_t window, const int64_t *segments) {
    return j <= i && (window <= 0 || i - j < window) &&
           (segments == NULL || segments[i] == segments[j]);
}

/* sum_d a[d] * b[d] over d (d a multiple of LANES). */
static inline float dot_elem(const elem_t *a, const elem_t *b, int64_t d) {
    f32v acc = {0};
    for (int64_t x = 0; x < d; x += LANES) acc = fma_v(load_elemv(a + x), load_elemv(b + x), acc);
    return sum_lanes(acc);
}

/* acc[0:d] += w * v[0:d] (fp32 acc). */
static inline void axpy(float w, const elem_t *v, float *acc, int64_t d) {
    f32v wv = broadcast_v(w);
    for (int64_t x = 0; x < d; x += LANES) {
        f32v a = load_f32v(acc + x);
        a = fma_v(wv, load_elemv(v + x), a);
        memcpy(acc + x, &a, sizeof a);
    }
}

/* o[0:d] = acc[0:d], rounded to the element type. */
static inline void store_row(elem_t *o, const float *acc, int64_t d) {
    for (int64_t x = 0; x < d; x += LANES) store_elemv(o + x, load_f32v(acc + x));
}

/* out (T, H*D) and p (H, T, T): the forward. */
void KERNEL(tunery_train_attention)(int64_t h_count, int64_t kv_count, int64_t t_count,
                                    int64_t d, const elem_t *q, const elem_t *k, const elem_t *v,
                                    const int64_t *segments, int64_t window, float scale,
                                    elem_t *out, float *p, int threads) {
    int64_t per = h_count / kv_count;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(dynamic, 4)
    for (int64_t task = 0; task < h_count * t_count; task++) {
        int64_t h = task / t_count, i = task % t_count, g = h / per;
        const elem_t *qi = q + (h * t_count + i) * d;
        const elem_t *kg = k + g * t_count * d, *vg = v + g * t_count * d;
        float *pi = p + (h * t_count + i) * t_count;
        float m = -INFINITY;
        for (int64_t j = 0; j < t_count; j++) {
            pi[j] = 0.0f;
            if (!attends(i, j, window, segments)) continue;
            pi[j] = dot_elem(qi, kg + j * d, d) * scale;
            if (pi[j] > m) m = pi[j];
        }
        float total = 0.0f;
        for (int64_t j = 0; j < t_count; j++)
            if (attends(i, j, window, segments)) total += pi[j] = expf(pi[j] - m);
        float acc[d];
        memset(acc, 0, sizeof acc);
        for (int64_t j = 0; j < t_count; j++) {
            if (!attends(i, j, window, segments)) continue;
            pi[j] /= total;
            axpy(round_elem(pi[j]), vg + j * d, acc, d);
        }
        store_row(out + (i * h_count + h) * d, acc, d);
    }
}

/* The backward for the output's gradient go (T, H*D) and the forward's weights p: dq (H, T, D),
 * dk and dv (Hkv, T, D). ds (H, T, T) is scratch: the scores' gradient. */
void KERNEL(tunery_train_attention_backward)(int64_t h_count, int64_t kv_count, int64_t t_count,
                                             int64_t d, const elem_t *q, const elem_t *k,
                                             const elem_t *v, const int64_t *segments,
                                             int64_t window, float scale, const float *p,
                                             const elem_t *go, float *ds, elem_t *dq,
                                             elem_t *dk, elem_t *dv, int threads) {
    int64_t per = h_count / kv_count;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float acc[d], acc2[d];
        /* 1. each query row: dp = go_i . v_j, ds = p (dp - sum_j p dp), dq = scale ds k */
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < h_count * t_count; task++) {
            int64_t h = task / t_count, i = task % t_count, g = h / per;
            const elem_t *gi = go + (i * h_count + h) * d;
            const elem_t *kg = k + g * t_count * d, *vg = v + g * t_count * d;
            const float *pi = p + (h * t_count + i) * t_count;
            float *si = ds + (h * t_count + i) * t_count;
            float inner = 0.0f;
            for (int64_t j = 0; j < t_count; j++) {
                si[j] = attends(i, j, window, segments) ? dot_elem(gi, vg + j * d, d) : 0.0f;
                inner += pi[j] * si[j];
            }
            memset(acc, 0, sizeof acc);
            for (int64_t j = 0; j < t_count; j++) {
                if (!attends(i, j, window, segments)) continue;
                si[j] = pi[j] * (si[j] - inner);
                axpy(si[j] * scale, kg + j * d, acc, d);
            }
            store_row(dq + (h * t_count + i) * d, acc, d);
        }
        /* 2. each key row of each kv head, over its query heads and the rows that attend to it:
         * dk = scale sum ds q, dv = sum p (rounded, as the forward weighed v) go */
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < kv_count * t_count; task++) {
            int64_t g = task / t_count, j = task % t_count;
            memset(acc, 0, sizeof acc);
            memset(acc2, 0, sizeof acc2);
            for (int64_t h = g * per; h < (g + 1) * per; h++)
                for (int64_t i = j; i < t_count; i++) {
                    if (!attends(i, j, window, segments)) continue;
                    axpy(ds[(h * t_count + i) * t_count + j] * scale, q + (h * t_count + i) * d,
                         acc, d);
                    axpy(round_elem(p[(h * t_count + i) * t_count + j]),
                         go + (i * h_count + h) * d, acc2, d);
                }
            store_row(dk + (g * t_count + j) * d, acc, d);
            store_row(dv + (g * t_count + j) * d, acc2, d);
        }
    }
}
