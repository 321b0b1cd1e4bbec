/* Row-wise work of a decode step: the best logit of each row, and RMS norms.
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

/* Each of the `heads` chunks of n values in each row: x / sqrt(mean(x^2) + eps) * w, with the
 * sum of squares in LANES running sums and a fixed tree. */
void KERNEL(tunery_rms_norm)(int64_t rows, int64_t heads, int64_t n, const elem_t *x,
                             int64_t x_stride, const float *w, float eps, elem_t *out,
                             int64_t out_stride, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * heads * n > 32768)
    for (int64_t t = 0; t < rows * heads; t++) {
        const elem_t *xr = x + (t / heads) * x_stride + (t % heads) * n;
        elem_t *o = out + (t / heads) * out_stride + (t % heads) * n;
        f32v acc = {0};
        int64_t d = 0;
        for (; d + LANES <= n; d += LANES) {
            f32v v = load_elemv(xr + d);
            acc += v * v;
        }
        float sum = sum_lanes(acc);
        for (; d < n; d++) sum += elem_to_f32(xr[d]) * elem_to_f32(xr[d]);
        float scale = 1.0f / sqrtf(sum / (float)n + eps);
        for (d = 0; d + LANES <= n; d += LANES)
            store_elemv(o + d, load_elemv(xr + d) * scale * load_f32v(w + d));
        for (; d < n; d++) o[d] = f32_to_elem(elem_to_f32(xr[d]) * scale * w[d]);
    }
}

/* Gemma's q and k of each row: every head of the row's fused qkv RMS-normed (rounded to the
 * element type, as `tunery_rms_norm` does), then rotated for the row's position (cos and sin:
 * rows of tables in the element type, `hd` wide), in fp32 and rounded once. q_out (B, nh, hd),
 * k_out (B, nkv, hd). */
void KERNEL(tunery_qk_norm_rope)(int64_t rows, int64_t nh, int64_t nkv, int64_t hd,
                                 const elem_t *qkv, int64_t stride, const float *q_w,
                                 const float *k_w, float eps, const elem_t *cos,
                                 const elem_t *sin, const int64_t *pos, elem_t *q_out,
                                 elem_t *k_out, int threads) {
    int64_t heads = nh + nkv, half = hd / 2;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * heads * hd > 32768)
    for (int64_t t = 0; t < rows * heads; t++) {
        int64_t r = t / heads, h = t % heads;
        const elem_t *x = qkv + r * stride + h * hd;
        const float *w = h < nh ? q_w : k_w;
        elem_t *o = h < nh ? q_out + (r * nh + h) * hd : k_out + (r * nkv + h - nh) * hd;
        const elem_t *c = cos + pos[r] * hd, *s = sin + pos[r] * hd;
        float y[hd];
        float sum = 0.0f;
        f32v acc = {0};
        int64_t d = 0;
        for (; d + LANES <= hd; d += LANES) {
            f32v v = load_elemv(x + d);
            acc += v * v;
        }
        sum = sum_lanes(acc);
        for (; d < hd; d++) sum += elem_to_f32(x[d]) * elem_to_f32(x[d]);
        float scale = 1.0f / sqrtf(sum / (float)hd + eps);
        for (d = 0; d < hd; d++) y[d] = elem_to_f32(f32_to_elem(elem_to_f32(x[d]) * scale * w[d]));
        for (d = 0; d < hd; d++) {
            float rotated = d < half ? -y[d + half] : y[d - half];
            o[d] = f32_to_elem(y[d] * elem_to_f32(c[d]) + rotated * elem_to_f32(s[d]));
        }
    }
}
