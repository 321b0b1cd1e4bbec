/* One decode step's attention for many rows at once, each row on its own KV cache.
 *
 * Every (row, kv head) is computed by one thread in an order fixed by the row's own cache
 * (its length, its ring), never by the batch: a row gets the same bits alone or among any
 * others. Inputs and caches are bf16; scores, softmax and sums are fp32, and the softmax weights
 * are rounded to bf16 before they weigh V, as torch's bf16 attention on a CPU does.
 */
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16.h"

/* sum_d a[d] * b[d] over hd values: 16 running sums, then a fixed tree, then the tail */
static inline float dot(const float *a, const uint16_t *b, int64_t hd) {
    f32x16 acc = {0};
    int64_t d = 0;
    for (; d + LANES <= hd; d += LANES) acc += load_f32x16(a + d) * load_bf16x16(b + d);
    float s = sum_lanes(acc);
    for (; d < hd; d++) s += a[d] * bf16_to_f32(b[d]);
    return s;
}

/* Row r, kv head g: its query heads attend over the filled slots of the row's cache. */
static void attend(int64_t r, int64_t g, int64_t nh, int64_t nkv, int64_t hd,
                   const uint16_t *q, uint16_t *const *k_cache, uint16_t *const *v_cache,
                   const int64_t *pos, const int64_t *size, float scale, uint16_t *out,
                   float *work) {
    int64_t per = nh / nkv;
    int64_t n = pos[r] + 1 < size[r] ? pos[r] + 1 : size[r];
    const uint16_t *k = k_cache[r] + g * size[r] * hd;
    const uint16_t *v = v_cache[r] + g * size[r] * hd;
    float *qf = work;           /* (per, hd) */
    float *acc = qf + per * hd; /* (per, hd) */
    float *p = acc + per * hd;  /* (per, n) */
    for (int64_t h = 0; h < per; h++)
        for (int64_t d = 0; d < hd; d++)
            qf[h * hd + d] = bf16_to_f32(q[(r * nh + g * per + h) * hd + d]);
    for (int64_t h = 0; h < per; h++) {
        float *ph = p + h * n;
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            ph[j] = dot(qf + h * hd, k + j * hd, hd) * scale;
            if (ph[j] > m) m = ph[j];
        }
        float total = 0.0f; /* of the fp32 weights; V is summed with them rounded to bf16 */
        for (int64_t j = 0; j < n; j++) {
            float e = expf(ph[j] - m);
            total += e;
            ph[j] = bf16_to_f32(f32_to_bf16(e));
        }
        float *ah = acc + h * hd;
        int64_t d = 0;
        for (; d + LANES <= hd; d += LANES) { /* 16 columns of the output at a time */
            f32x16 sum = {0};
            for (int64_t j = 0; j < n; j++) sum += ph[j] * load_bf16x16(v + j * hd + d);
            memcpy(ah + d, &sum, sizeof sum);
        }
        for (; d < hd; d++) {
            float sum = 0.0f;
            for (int64_t j = 0; j < n; j++) sum += ph[j] * bf16_to_f32(v[j * hd + d]);
            ah[d] = sum;
        }
        float inverse = 1.0f / total;
        uint16_t *o = out + (r * nh + g * per + h) * hd;
        for (d = 0; d < hd; d++) o[d] = f32_to_bf16(ah[d] * inverse);
    }
}

/* q (B, nh, hd); k_new, v_new rows of (nkv, hd), k_stride and v_stride elements apart;
 * k_cache[r] and v_cache[r] (nkv, size[r], hd). Writes row r's new key and value at slot
 * pos[r] % size[r], then out (B, nh, hd) = attention over the slots filled so far. Returns 0,
 * or -1 when out of memory. */
int tunery_decode_attention(int64_t rows, int64_t nh, int64_t nkv, int64_t hd,
                            const uint16_t *q, const uint16_t *k_new, int64_t k_stride,
                            const uint16_t *v_new, int64_t v_stride, uint16_t *const *k_cache,
                            uint16_t *const *v_cache, const int64_t *pos, const int64_t *size,
                            float scale, uint16_t *out, int threads) {
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t slot = pos[r] % size[r];
        for (int64_t g = 0; g < nkv; g++) {
            memcpy(k_cache[r] + (g * size[r] + slot) * hd, k_new + r * k_stride + g * hd,
                   hd * sizeof(uint16_t));
            memcpy(v_cache[r] + (g * size[r] + slot) * hd, v_new + r * v_stride + g * hd,
                   hd * sizeof(uint16_t));
        }
        if (size[r] > longest) longest = size[r];
    }
    int64_t per = nh / nkv;
    int64_t tasks = rows * nkv;
    int teams = tasks < threads ? (int)tasks : (threads > 0 ? threads : 1);
    int64_t each = 2 * per * hd + per * longest;
    float *work = malloc(sizeof(float) * each * teams);
    if (work == NULL) return -1;
#pragma omp parallel num_threads(teams)
    {
#ifdef _OPENMP
        float *mine = work + each * omp_get_thread_num();
#else
        float *mine = work;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++)
            attend(t / nkv, t % nkv, nh, nkv, hd, q, k_cache, v_cache, pos, size, scale, out,
                   mine);
    }
    free(work);
    return 0;
}
