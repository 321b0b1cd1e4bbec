/* One decode step's attention for many rows at once, each row on its own KV cache.
 *
 * Every (row, kv head) is computed by one thread in an order fixed by the row's own cache
 * (its length, its ring), never by the batch: a row gets the same bits alone or among any
 * others. Inputs and caches are bf16 (fp32: `elem.h`); scores, softmax and sums are fp32, and
 * the softmax weights are rounded to bf16 before they weigh V, as torch's bf16 attention on a
 * CPU does (in fp32, not rounded). The exponentials are `exp_v`'s, LANES at a time.
 *
 * Each thread takes one run of (row, kv head) tasks of about equal cost and fetches the next
 * task's keys and values while it computes one: between two layers the step's weights stream
 * through the caches, so the KV caches are cold (32 rows at ~50 slots, 18 layers, the caches
 * flushed before: 3.6-3.9 -> 3.0-3.5 ms). The fetches are spread over the task's score loop, a
 * slot's worth a key: all at its start, they waited on the core's few outstanding misses as
 * long as the task itself (a real 32-row step of Gemma 3 270M: 3.9 -> 2.5 ms at ~30 slots,
 * 8.2 -> 5.5 ms at ~100).
 */
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "elem.h"

/* Scores ph[0:n] → exp(score - max), rounded to the element type in place; returns the fp32
 * weights' sum (V is summed with them rounded). LANES scores at a time (`exp_v`), the tail
 * alone. */
static float softmax_weights(float *ph, int64_t n) {
    float m = -INFINITY;
    int64_t j;
    for (j = 0; j < n; j++)
        if (ph[j] > m) m = ph[j];
    f32v sums = {0};
    elem_t rounded[LANES];
    for (j = 0; j + LANES <= n; j += LANES) {
        f32v e = exp_v(load_f32v(ph + j) - broadcast_v(m));
        sums += e;
        store_elemv(rounded, e);
        f32v r = load_elemv(rounded);
        memcpy(ph + j, &r, sizeof r);
    }
    float total = sum_lanes(sums);
    for (; j < n; j++) {
        float e = expf(ph[j] - m);
        total += e;
        ph[j] = round_elem(e);
    }
    return total;
}

/* acc[0:hd] = sum_j ph[j] * v[j], in order of j, LANES columns at a time, then the tail. */
static void weigh_values(const float *ph, int64_t n, int64_t hd, const elem_t *v, float *acc) {
    int64_t d = 0;
    for (; d + LANES <= hd; d += LANES) {
        f32v sum = {0};
        for (int64_t j = 0; j < n; j++) sum += ph[j] * load_elemv(v + j * hd + d);
        memcpy(acc + d, &sum, sizeof sum);
    }
    for (; d < hd; d++) {
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) sum += ph[j] * elem_to_f32(v[j * hd + d]);
        acc[d] = sum;
    }
}

/* The slots a row attends over: those filled so far, at most its ring's size. */
static inline int64_t filled(int64_t pos, int64_t size) { return pos + 1 < size ? pos + 1 : size; }

/* A task's keys and values, to fetch into L2 ahead of it (bytes 0: none). */
typedef struct {
    const char *k, *v;
    int64_t bytes;
} task_data;

/* Task t's (row t / nkv, kv head t % nkv) */
static task_data data_of(int64_t t, int64_t nkv, int64_t hd, elem_t *const *k_cache,
                         elem_t *const *v_cache, const int64_t *pos, const int64_t *size) {
    int64_t r = t / nkv, g = t % nkv;
    return (task_data){(const char *)(k_cache[r] + g * size[r] * hd),
                       (const char *)(v_cache[r] + g * size[r] * hd),
                       filled(pos[r], size[r]) * hd * (int64_t)sizeof(elem_t)};
}

/* Bytes [lo, hi) of its keys and values fetched into L2. */
static inline void fetch(task_data next, int64_t lo, int64_t hi) {
    for (int64_t off = lo; off < hi && off < next.bytes; off += 64) {
        __builtin_prefetch(next.k + off, 0, 2);
        __builtin_prefetch(next.v + off, 0, 2);
    }
}

/* The 4 query heads of one kv head at once (hd a multiple of LANES): each K and V row read and
 * widened once for all four, every sum in the order `dot_f32_elem` and `weigh_values` take. */
static void attend4(int64_t n, int64_t hd, const float *qf, const elem_t *k, const elem_t *v,
                    float scale, float *p, float *acc, float *totals, task_data next) {
    int64_t share = (next.bytes / n + 63) / 64 * 64; /* of the next task's data, a key each */
    for (int64_t j = 0; j < n; j++) {
        fetch(next, j * share, (j + 1) * share);
        f32v s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t d = 0; d < hd; d += LANES) {
            f32v kv = load_elemv(k + j * hd + d);
            s0 += load_f32v(qf + d) * kv;
            s1 += load_f32v(qf + hd + d) * kv;
            s2 += load_f32v(qf + 2 * hd + d) * kv;
            s3 += load_f32v(qf + 3 * hd + d) * kv;
        }
        p[j] = sum_lanes(s0) * scale;
        p[n + j] = sum_lanes(s1) * scale;
        p[2 * n + j] = sum_lanes(s2) * scale;
        p[3 * n + j] = sum_lanes(s3) * scale;
    }
    for (int h = 0; h < 4; h++) totals[h] = softmax_weights(p + h * n, n);
    for (int64_t d = 0; d < hd; d += LANES) {
        f32v a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t j = 0; j < n; j++) {
            f32v vv = load_elemv(v + j * hd + d);
            a0 += p[j] * vv;
            a1 += p[n + j] * vv;
            a2 += p[2 * n + j] * vv;
            a3 += p[3 * n + j] * vv;
        }
        memcpy(acc + d, &a0, sizeof a0);
        memcpy(acc + hd + d, &a1, sizeof a1);
        memcpy(acc + 2 * hd + d, &a2, sizeof a2);
        memcpy(acc + 3 * hd + d, &a3, sizeof a3);
    }
}

/* Row r, kv head g: its query heads attend over the filled slots of the row's cache. */
static void attend(int64_t r, int64_t g, int64_t nh, int64_t nkv, int64_t hd,
                   const elem_t *q, elem_t *const *k_cache, elem_t *const *v_cache,
                   const int64_t *pos, const int64_t *size, float scale, elem_t *out,
                   float *work, task_data next) {
    int64_t per = nh / nkv;
    int64_t n = filled(pos[r], size[r]);
    const elem_t *k = k_cache[r] + g * size[r] * hd;
    const elem_t *v = v_cache[r] + g * size[r] * hd;
    float *qf = work;           /* (per, hd) */
    float *acc = qf + per * hd; /* (per, hd) */
    float *totals = acc + per * hd; /* (per,) */
    float *p = totals + per;        /* (per, n) */
    const elem_t *qr = q + (r * nh + g * per) * hd; /* the group's heads, one after another */
    int64_t d = 0;
    for (; d + LANES <= per * hd; d += LANES) {
        f32v x = load_elemv(qr + d);
        memcpy(qf + d, &x, sizeof x);
    }
    for (; d < per * hd; d++) qf[d] = elem_to_f32(qr[d]);
    if (per == 4 && hd % LANES == 0) { /* Gemma 3's grouping: the 4 heads share each read */
        attend4(n, hd, qf, k, v, scale, p, acc, totals, next);
    } else {
        fetch(next, 0, next.bytes);
        for (int64_t h = 0; h < per; h++) {
            float *ph = p + h * n;
            for (int64_t j = 0; j < n; j++)
                ph[j] = dot_f32_elem(qf + h * hd, k + j * hd, hd) * scale;
            totals[h] = softmax_weights(ph, n);
            weigh_values(ph, n, hd, v, acc + h * hd);
        }
    }
    for (int64_t h = 0; h < per; h++) {
        float inverse = 1.0f / totals[h];
        elem_t *o = out + (r * nh + g * per + h) * hd;
        const float *a = acc + h * hd;
        for (d = 0; d + LANES <= hd; d += LANES) store_elemv(o + d, load_f32v(a + d) * inverse);
        for (; d < hd; d++) o[d] = f32_to_elem(a[d] * inverse);
    }
}

/* q (B, nh, hd); k_new, v_new rows of (nkv, hd), k_stride and v_stride elements apart;
 * k_cache[r] and v_cache[r] (nkv, size[r], hd). Writes row r's new key and value at slot
 * pos[r] % size[r], then out (B, nh, hd) = attention over the slots filled so far. Returns 0,
 * or -1 when out of memory. */
int KERNEL(tunery_decode_attention)(int64_t rows, int64_t nh, int64_t nkv, int64_t hd,
                                    const elem_t *q, const elem_t *k_new, int64_t k_stride,
                                    const elem_t *v_new, int64_t v_stride,
                                    elem_t *const *k_cache, elem_t *const *v_cache,
                                    const int64_t *pos, const int64_t *size, float scale,
                                    elem_t *out, int threads) {
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t slot = pos[r] % size[r];
        for (int64_t g = 0; g < nkv; g++) {
            memcpy(k_cache[r] + (g * size[r] + slot) * hd, k_new + r * k_stride + g * hd,
                   hd * sizeof(elem_t));
            memcpy(v_cache[r] + (g * size[r] + slot) * hd, v_new + r * v_stride + g * hd,
                   hd * sizeof(elem_t));
        }
        if (size[r] > longest) longest = size[r];
    }
    int64_t per = nh / nkv;
    int64_t tasks = rows * nkv;
    int teams = tasks < threads ? (int)tasks : (threads > 0 ? threads : 1);
    int64_t each = 2 * per * hd + per + per * longest;
    float *work = malloc(sizeof(float) * each * teams);
    if (work == NULL) return -1;
    /* one run of tasks a thread, of about equal cost (the slots read): see the top */
    int64_t total = 0;
    for (int64_t r = 0; r < rows; r++) total += filled(pos[r], size[r]) * nkv;
#pragma omp parallel num_threads(teams)
    {
#ifdef _OPENMP
        int me = omp_get_thread_num(), team = omp_get_num_threads();
#else
        int me = 0, team = 1;
#endif
        float *mine = work + each * me;
        /* tasks [lo, hi): those whose cost starts in this thread's share of the total */
        int64_t lo = tasks, hi = tasks, seen = 0;
        for (int64_t t = 0; t < tasks; t++) {
            int64_t share = seen * team / (total > 0 ? total : 1);
            if (share >= me && lo == tasks) lo = t;
            if (share > me) { hi = t; break; }
            seen += filled(pos[t / nkv], size[t / nkv]);
        }
        if (lo < hi) {
            task_data first = data_of(lo, nkv, hd, k_cache, v_cache, pos, size);
            fetch(first, 0, first.bytes);
        }
        for (int64_t t = lo; t < hi; t++) {
            task_data next = {NULL, NULL, 0};
            if (t + 1 < hi) next = data_of(t + 1, nkv, hd, k_cache, v_cache, pos, size);
            attend(t / nkv, t % nkv, nh, nkv, hd, q, k_cache, v_cache, pos, size, scale, out,
                   mine, next);
        }
    }
    free(work);
    return 0;
}
