/* Row-wise work of a decode step: the best logit of each row, and RMS norms.
 *
 * Each row (each head of a row) is reduced alone in an order fixed by its length, so a row
 * gets the same bits whatever else is in the batch.
 */
#include <math.h>

#include "bf16.h"

/* out[r] = the index of row r's largest value, the first of equal ones (a NaN wins, as in
 * torch's max). */
void tunery_argmax_bf16(int64_t rows, int64_t n, const uint16_t *x, int64_t stride,
                        int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * stride;
        f32x16 best = {0};
        i32x16 any_nan = {0};
        best -= INFINITY;
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES) {
            f32x16 v = load_bf16x16(row + j);
            i32x16 more = v > best; /* -1 where v wins: keep v there, best elsewhere */
            best = (f32x16)(((i32x16)v & more) | ((i32x16)best & ~more));
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
            float v = bf16_to_f32(row[j]);
            nan |= v != v;
            m = v > m ? v : m;
        }
        int64_t at = 0;
        for (j = 0; j < n; j++) {
            float v = bf16_to_f32(row[j]);
            if (nan ? v != v : v == m) {
                at = j;
                break;
            }
        }
        out[r] = at;
    }
}

/* Each of the `heads` chunks of n values in each row: x / sqrt(mean(x^2) + eps) * w, with the
 * sum of squares in 16 running sums and a fixed tree. */
void tunery_rms_norm(int64_t rows, int64_t heads, int64_t n, const uint16_t *x,
                     int64_t x_stride, const float *w, float eps, uint16_t *out,
                     int64_t out_stride, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * heads * n > 32768)
    for (int64_t t = 0; t < rows * heads; t++) {
        const uint16_t *xr = x + (t / heads) * x_stride + (t % heads) * n;
        uint16_t *o = out + (t / heads) * out_stride + (t % heads) * n;
        f32x16 acc = {0};
        int64_t d = 0;
        for (; d + LANES <= n; d += LANES) {
            f32x16 v = load_bf16x16(xr + d);
            acc += v * v;
        }
        float sum = sum_lanes(acc);
        for (; d < n; d++) sum += bf16_to_f32(xr[d]) * bf16_to_f32(xr[d]);
        float scale = 1.0f / sqrtf(sum / (float)n + eps);
        for (d = 0; d + LANES <= n; d += LANES)
            store_bf16x16(o + d, load_bf16x16(xr + d) * scale * load_f32x16(w + d));
        for (; d < n; d++) o[d] = f32_to_bf16(bf16_to_f32(xr[d]) * scale * w[d]);
    }
}

/* Gemma's q and k of each row: every head of the row's fused qkv RMS-normed (rounded to bf16,
 * as `tunery_rms_norm` does), then rotated for the row's position (cos and sin: rows of bf16
 * tables, `hd` wide), in fp32 and rounded once. q_out (B, nh, hd), k_out (B, nkv, hd). */
void tunery_qk_norm_rope(int64_t rows, int64_t nh, int64_t nkv, int64_t hd, const uint16_t *qkv,
                         int64_t stride, const float *q_w, const float *k_w, float eps,
                         const uint16_t *cos, const uint16_t *sin, const int64_t *pos,
                         uint16_t *q_out, uint16_t *k_out, int threads) {
    int64_t heads = nh + nkv, half = hd / 2;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) \
    if (rows * heads * hd > 32768)
    for (int64_t t = 0; t < rows * heads; t++) {
        int64_t r = t / heads, h = t % heads;
        const uint16_t *x = qkv + r * stride + h * hd;
        const float *w = h < nh ? q_w : k_w;
        uint16_t *o = h < nh ? q_out + (r * nh + h) * hd : k_out + (r * nkv + h - nh) * hd;
        const uint16_t *c = cos + pos[r] * hd, *s = sin + pos[r] * hd;
        float y[hd];
        float sum = 0.0f;
        f32x16 acc = {0};
        int64_t d = 0;
        for (; d + LANES <= hd; d += LANES) {
            f32x16 v = load_bf16x16(x + d);
            acc += v * v;
        }
        sum = sum_lanes(acc);
        for (; d < hd; d++) sum += bf16_to_f32(x[d]) * bf16_to_f32(x[d]);
        float scale = 1.0f / sqrtf(sum / (float)hd + eps);
        for (d = 0; d < hd; d++) y[d] = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[d]) * scale * w[d]));
        for (d = 0; d < hd; d++) {
            float rotated = d < half ? -y[d + half] : y[d - half];
            o[d] = f32_to_bf16(y[d] * bf16_to_f32(c[d]) + rotated * bf16_to_f32(s[d]));
        }
    }
}
