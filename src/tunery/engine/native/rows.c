/* Row-wise work: the best logit of each row (a decode step), and RMS norms (a decode step's, and
 * training's forward and backward).
 *
 * Each row (each head of a row) is reduced alone in an order fixed by its length, so a row
 * gets the same bits whatever else is in the batch. Values are bf16 (fp32: `elem.h`).
 */
#include <math.h>

#include "elem.h"

/* out[r] = the index of row r's largest value, the first of equal ones (a NaN wins, as in
 * torch's max). */
void KERNEL(tunery_argmax)(int64_t rows, int64_t n, const elem_t *x, int64_t stride,
                           int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const elem_t *row = x + r * stride;
        f32v best = {0};
        i32v any_nan = {0};
        best -= INFINITY;
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES) {
            f32v v = load_elemv(row + j);
            i32v more = v > best; /* -1 where v wins: keep v there, best elsewhere */
            best = (f32v)(((i32v)v & more) | ((i32v)best & ~more));
            any_nan |= v != v;
        }
        float lanes[LANES], m = -INFINITY;
        int32_t nans[LANES];
        memcpy(lanes, &best, sizeof lanes);
        memcpy(nans, &any_nan, sizeof nans);
        int nan = 0;
        for (int l = 0; l < LANES; l++) {
            m = lanes[l] > m ? lanes[l] : m;
            nan |= nans[l] != 0;
        }
        for (; j < n; j++) {
            float v = elem_to_f32(row[j]);
            nan |= v != v;
            m = v > m ? v : m;
        }
        int64_t at = 0;
        for (j = 0; j < n; j++) {
            float v = elem_to_f32(row[j]);
            if (nan ? v != v : v == m) {
                at = j;
                break;
            }
        }
        out[r] = at;
    }
}

/* 1 / sqrt(mean(x^2) + eps) over n values, the sum of squares in LANES running sums and a fixed
 * tree. */
static inline float inverse_rms(const elem_t *x, int64_t n, float eps) {
    f32v acc = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES) {
        f32v v = load_elemv(x + d);
        acc += v * v;
    }
    float sum = sum_lanes(acc);
    for (; d < n; d++) sum += elem_to_f32(x[d]) * elem_to_f32(x[d]);
    return 1.0f / sqrtf(sum / (float)n + eps);
}

/* o = x * scale * w over n values, rounded once to the element type. */
static inline void scaled(const elem_t *x, int64_t n, float scale, const float *w, elem_t *o) {
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        store_elemv(o + d, load_elemv(x + d) * scale * load_f32v(w + d));
    for (; d < n; d++) o[d] = f32_to_elem(elem_to_f32(x[d]) * scale * w[d]);
}

/* Each of the `heads` chunks of n values in each row: x * inverse_rms(x) * w, head h's weights at
 * w + h * w_stride, into out (rows out_stride apart, heads n apart); with each (row, head)'s
 * 1 / rms kept in rstd (rows x heads) unless it is NULL. */
static void norm_rows(int64_t rows, int64_t heads, int64_t n, const elem_t *x, int64_t x_stride,
                      const float *w, int64_t w_stride, float eps, elem_t *out,
                      int64_t out_stride, float *rstd, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * heads * n > 32768)
    for (int64_t t = 0; t < rows * heads; t++) {
        const elem_t *xr = x + (t / heads) * x_stride + (t % heads) * n;
        elem_t *o = out + (t / heads) * out_stride + (t % heads) * n;
        float scale = inverse_rms(xr, n, eps);
        if (rstd != NULL) rstd[t] = scale;
        scaled(xr, n, scale, w + (t % heads) * w_stride, o);
    }
}

/* A decode step's RMS norm: each of the `heads` chunks of n values in each row, one weight for
 * all. */
void KERNEL(tunery_rms_norm)(int64_t rows, int64_t heads, int64_t n, const elem_t *x,
                             int64_t x_stride, const float *w, float eps, elem_t *out,
                             int64_t out_stride, int threads) {
    norm_rows(rows, heads, n, x, x_stride, w, 0, eps, out, out_stride, NULL, threads);
}

/* Training's RMS norm: as tunery_rms_norm, each head with its own weights (head h's at
 * w + h * w_stride; w_stride 0: one weight for all), out contiguous (rows, heads, n), and each
 * (row, head)'s 1 / rms kept in rstd (rows x heads) for the backward. */
void KERNEL(tunery_rms_norm_train)(int64_t rows, int64_t heads, int64_t n, const elem_t *x,
                                   int64_t x_stride, const float *w, int64_t w_stride, float eps,
                                   elem_t *out, float *rstd, int threads) {
    norm_rows(rows, heads, n, x, x_stride, w, w_stride, eps, out, heads * n, rstd, threads);
}

/* One row's (head's) norm backward: with xh = x * r and gw = g * w, o = (gw - xh * mean(gw * xh))
 * * r over n values, in fp32, rounded once. */
static inline void norm_back_row(const elem_t *xr, const elem_t *gr, const float *wr, float r,
                                 int64_t n, elem_t *o) {
    f32v acc = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        acc += load_elemv(gr + d) * load_f32v(wr + d) * (load_elemv(xr + d) * r);
    float dot = sum_lanes(acc);
    for (; d < n; d++) dot += elem_to_f32(gr[d]) * wr[d] * (elem_to_f32(xr[d]) * r);
    dot /= (float)n;
    for (d = 0; d + LANES <= n; d += LANES) {
        f32v xh = load_elemv(xr + d) * r;
        store_elemv(o + d, (load_elemv(gr + d) * load_f32v(wr + d) - xh * dot) * r);
    }
    for (; d < n; d++) {
        float xh = elem_to_f32(xr[d]) * r;
        o[d] = f32_to_elem((elem_to_f32(gr[d]) * wr[d] - xh * dot) * r);
    }
}

/* Its input gradient from the output's g (contiguous, as out): with xh = x * rstd and gw = g * w,
 * gx = (gw - xh * mean(gw * xh)) * rstd, in fp32, rounded once; gx contiguous (rows, heads, n). */
void KERNEL(tunery_rms_norm_backward)(int64_t rows, int64_t heads, int64_t n, const elem_t *x,
                                      int64_t x_stride, const elem_t *g, const float *w,
                                      int64_t w_stride, const float *rstd, elem_t *gx,
                                      int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * heads * n > 32768)
    for (int64_t t = 0; t < rows * heads; t++)
        norm_back_row(x + (t / heads) * x_stride + (t % heads) * n, g + t * n,
                      w + (t % heads) * w_stride, rstd[t], n, gx + t * n);
}

/* o = a + b over n values, rounded once (o may be b). */
static inline void add_rows(const elem_t *a, const elem_t *b, int64_t n, elem_t *o) {
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES) store_elemv(o + d, load_elemv(a + d) + load_elemv(b + d));
    for (; d < n; d++) o[d] = f32_to_elem(elem_to_f32(a[d]) + elem_to_f32(b[d]));
}

/* Training's residual step and the next norm, each row in one pass: s = x + norm(y) * w_out,
 * h = norm(s) * w_next, each value rounded as the three ops round theirs (the normed y, the
 * sum, h), with 1 / rms of y and of s kept. x and y rows `x_stride` and `y_stride` apart; s and
 * h contiguous (rows, n). */
void KERNEL(tunery_add_norm_train)(int64_t rows, int64_t n, const elem_t *x, int64_t x_stride,
                                   const elem_t *y, int64_t y_stride, const float *w_out,
                                   const float *w_next, float eps, elem_t *s, elem_t *h,
                                   float *rstd_y, float *rstd_s, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * n > 32768)
    for (int64_t r = 0; r < rows; r++) {
        const elem_t *xr = x + r * x_stride, *yr = y + r * y_stride;
        elem_t *sr = s + r * n;
        float scale = inverse_rms(yr, n, eps);
        rstd_y[r] = scale;
        scaled(yr, n, scale, w_out, sr); /* the normed y, then plus x */
        add_rows(xr, sr, n, sr);
        rstd_s[r] = inverse_rms(sr, n, eps);
        scaled(sr, n, rstd_s[r], w_next, h + r * n);
    }
}

/* Its backward for the gradients of s and h (contiguous, as s): g = g_s + the norm backward of
 * g_h (each rounded, as torch adds the two), then y's gradient g_y, the norm backward of g. g,
 * g_y contiguous (rows, n); `tmp` rows x n of scratch. */
void KERNEL(tunery_add_norm_backward)(int64_t rows, int64_t n, const elem_t *y, int64_t y_stride,
                                      const elem_t *s, const float *w_out, const float *w_next,
                                      const float *rstd_y, const float *rstd_s,
                                      const elem_t *g_s, const elem_t *g_h, elem_t *tmp,
                                      elem_t *g, elem_t *g_y, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * n > 32768)
    for (int64_t r = 0; r < rows; r++) {
        elem_t *gr = g + r * n, *from_h = tmp + r * n;
        norm_back_row(s + r * n, g_h + r * n, w_next, rstd_s[r], n, from_h);
        add_rows(g_s + r * n, from_h, n, gr);
        norm_back_row(y + r * y_stride, gr, w_out, rstd_y[r], n, g_y + r * n);
    }
}

/* Task t = (row, head) of the q and k heads: the head's values in qkv, its norm weights and
 * the row's rotary table rows. */
typedef struct {
    const elem_t *x, *c, *s;
    const float *w;
} qk_task;

static inline qk_task qk_task_of(int64_t t, int64_t heads, int64_t nh, int64_t hd,
                                 const elem_t *qkv, int64_t stride, const float *q_w,
                                 const float *k_w, const elem_t *cos, const elem_t *sin,
                                 const int64_t *pos) {
    int64_t r = t / heads, h = t % heads;
    return (qk_task){qkv + r * stride + h * hd, cos + pos[r] * hd, sin + pos[r] * hd,
                     h < nh ? q_w : k_w};
}

/* Gemma's q and k of each row: every head of the row's fused qkv RMS-normed (rounded to the
 * element type, as `tunery_rms_norm` does), then rotated for the row's position (cos and sin:
 * rows of tables in the element type, `hd` wide), in fp32 and rounded once. Row r's q head h
 * goes to q_out + h * q_head + r * q_row (k's alike): (B, nh, hd) for a decode step, (nh, T, hd)
 * for training, which also keeps each (row, head)'s 1 / rms in rstd (rows x (nh + nkv)) for the
 * backward (NULL: not kept). */
void KERNEL(tunery_qk_norm_rope)(int64_t rows, int64_t nh, int64_t nkv, int64_t hd,
                                 const elem_t *qkv, int64_t stride, const float *q_w,
                                 const float *k_w, float eps, const elem_t *cos,
                                 const elem_t *sin, const int64_t *pos, elem_t *q_out,
                                 int64_t q_head, int64_t q_row, elem_t *k_out, int64_t k_head,
                                 int64_t k_row, float *rstd, int threads) {
    int64_t heads = nh + nkv, half = hd / 2;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * heads * hd > 32768)
    for (int64_t t = 0; t < rows * heads; t++) {
        int64_t r = t / heads, h = t % heads;
        elem_t *o = h < nh ? q_out + h * q_head + r * q_row : k_out + (h - nh) * k_head + r * k_row;
        qk_task a = qk_task_of(t, heads, nh, hd, qkv, stride, q_w, k_w, cos, sin, pos);
        float y[hd];
        float scale = inverse_rms(a.x, hd, eps);
        if (rstd != NULL) rstd[t] = scale;
        int64_t d;
        for (d = 0; d < hd; d++)
            y[d] = elem_to_f32(f32_to_elem(elem_to_f32(a.x[d]) * scale * a.w[d]));
        for (d = 0; d < hd; d++) {
            float rotated = d < half ? -y[d + half] : y[d - half];
            o[d] = f32_to_elem(y[d] * elem_to_f32(a.c[d]) + rotated * elem_to_f32(a.s[d]));
        }
    }
}

/* The backward of `tunery_qk_norm_rope` (training's layout): from the gradients of q and k (head
 * h of row r at gq + h * g_head + r * g_row, k's after q's at gk likewise), each head's gradient
 * in qkv: the rotation's transpose, then the norm's backward (as `tunery_rms_norm_backward`), in
 * fp32 and rounded once, into grad (row r's heads at grad + r * grad_stride). */
void KERNEL(tunery_qk_norm_rope_backward)(int64_t rows, int64_t nh, int64_t nkv, int64_t hd,
                                          const elem_t *qkv, int64_t stride, const float *q_w,
                                          const float *k_w, const float *rstd,
                                          const elem_t *cos, const elem_t *sin,
                                          const int64_t *pos, const elem_t *gq,
                                          const elem_t *gk, int64_t g_head, int64_t g_row,
                                          elem_t *grad, int64_t grad_stride, int threads) {
    int64_t heads = nh + nkv, half = hd / 2;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * heads * hd > 32768)
    for (int64_t t = 0; t < rows * heads; t++) {
        int64_t r = t / heads, h = t % heads;
        const elem_t *g = h < nh ? gq + h * g_head + r * g_row : gk + (h - nh) * g_head + r * g_row;
        qk_task a = qk_task_of(t, heads, nh, hd, qkv, stride, q_w, k_w, cos, sin, pos);
        const elem_t *x = a.x, *c = a.c, *s = a.s;
        const float *w = a.w;
        float gw[hd]; /* the normed values' gradient, times the weight */
        float scale = rstd[t], dot = 0.0f;
        elem_t *o = grad + r * grad_stride + h * hd;
        if (half % LANES == 0) { /* as below, the halves side by side; the dot in LANES sums */
            f32v acc = {0};
            for (int64_t d = 0; d < half; d += LANES) {
                int64_t e = d + half;
                f32v g1 = load_elemv(g + d), g2 = load_elemv(g + e);
                f32v gw1 = (g1 * load_elemv(c + d) + g2 * load_elemv(s + e)) * load_f32v(w + d);
                f32v gw2 = (g2 * load_elemv(c + e) + -g1 * load_elemv(s + d)) * load_f32v(w + e);
                memcpy(gw + d, &gw1, sizeof gw1);
                memcpy(gw + e, &gw2, sizeof gw2);
                acc += gw1 * (load_elemv(x + d) * scale);
                acc += gw2 * (load_elemv(x + e) * scale);
            }
            f32v mean = broadcast_v(sum_lanes(acc) / (float)hd);
            for (int64_t d = 0; d < hd; d += LANES)
                store_elemv(o + d, (load_f32v(gw + d) - load_elemv(x + d) * scale * mean) * scale);
            continue;
        }
        int64_t d;
        for (d = 0; d < hd; d++) {
            /* o[d] = y[d] c[d] + rot(y)[d] s[d], rot(y)[d] = -y[d + half] (d < half), y[d - half] */
            float back = d < half ? elem_to_f32(g[d + half]) * elem_to_f32(s[d + half])
                                  : -elem_to_f32(g[d - half]) * elem_to_f32(s[d - half]);
            gw[d] = (elem_to_f32(g[d]) * elem_to_f32(c[d]) + back) * w[d];
            dot += gw[d] * (elem_to_f32(x[d]) * scale);
        }
        dot /= (float)hd;
        for (d = 0; d < hd; d++)
            o[d] = f32_to_elem((gw[d] - elem_to_f32(x[d]) * scale * dot) * scale);
    }
}
