/* y = x W^T for a decode step's rows: x (rows, in) fp32, W (out, in) bf16 or int8 packed in
 * panels, y (rows, out) fp32.
 *
 * For a CPU that runs the model in fp32 (no AVX512-BF16): the weights are bf16 values (the
 * model's own, widened exactly), so reading them as bf16 halves the bytes a memory-bound step
 * reads and changes no product. The panels (`tunery_linear_pack_f32`) hold PANEL outputs' weights
 * k-major, [out / PANEL][in][PANEL], zero-padded: a row's x[k], broadcast, multiplies PANEL
 * weights at once. Each y[r][j] is one running sum of fused multiply-adds over k in order: the
 * same whatever the rows, their count or the threads, so a row gets the same bits alone or in
 * any batch. Rows go 4 at a time (12 sums in registers); for more than 3 rows a panel is widened
 * once into an fp32 copy (the same values) that every row group reads.
 *
 * int8 panels (`tunery_linear_i8w`, the `fast-int8` backend) are laid out alike, one int8 per
 * weight, with one fp32 scale per output: y[r][j] = scale[j] * (the same running sum over the
 * int8 values, widened exactly). A quarter of fp32's bytes, and x stays fp32 (no activation
 * quantization), so the only error is the weights' rounding to int8.
 */
#include <stdlib.h>

#include "bf16.h"

#define PANEL (3 * LANES) /* outputs per panel: 3 vectors */

int tunery_linear_panel(void) { return PANEL; }

/* Columns of W copied per pass of a panel's rows: PANEL rows x 16 columns are read from W in
 * 16-element runs and written as one 16 x PANEL block of the panel (in L1). */
#define PACK_K 16

/* W (out, in) fp32, element (j, k) at w[j * row_stride + k * col_stride] (a transposed view
 * too), → bf16 panels [ceil(out / PANEL)][in][PANEL], zero-padded: each value's upper 16 bits
 * (its bf16 value when the lower 16 are zero). Returns how many values have nonzero lower bits,
 * i.e. are not bf16 values (the panels then hold them truncated: the caller discards them). */
int64_t tunery_linear_pack_f32(int64_t out, int64_t in, const uint32_t *w, int64_t row_stride,
                               int64_t col_stride, uint16_t *panels, int threads) {
    int64_t count = (out + PANEL - 1) / PANEL;
    int64_t inexact = 0;
#pragma omp parallel for schedule(static) reduction(+ : inexact) num_threads(threads > 0 ? threads : 1)
    for (int64_t p = 0; p < count; p++)
        for (int64_t k0 = 0; k0 < in; k0 += PACK_K) {
            int64_t k1 = k0 + PACK_K < in ? k0 + PACK_K : in;
            for (int64_t c = 0; c < PANEL; c++) {
                int64_t j = p * PANEL + c;
                for (int64_t k = k0; k < k1; k++) {
                    uint32_t bits = j < out ? w[j * row_stride + k * col_stride] : 0;
                    inexact += (bits & 0xFFFFu) != 0;
                    panels[(p * in + k) * PANEL + c] = (uint16_t)(bits >> 16);
                }
            }
        }
    return inexact;
}

/* LANES int8 values widened to fp32 (exactly). */
static inline f32v load_i8v(const int8_t *p) {
#if defined(__AVX512F__)
    return (f32v)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (f32v)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else /* GCC converts an int8 vector one lane at a time: widen to int32 first */
    i8v q;
    memcpy(&q, p, sizeof q);
    return __builtin_convertvector(__builtin_convertvector(q, i32v), f32v);
#endif
}

/* The panel's PANEL sums for R rows of x (R <= 4), into y's rows (`n` valid outputs). Always
 * inlined with R a constant, so the sums stay in registers. `wf`: the panel widened, or NULL to
 * widen its bf16 `w` (or, with `w` NULL, its int8 `wq`) as it goes. `scale`: the panel's
 * outputs' scales (int8 weights), each sum multiplied by its own at the end; NULL for none. */
static inline __attribute__((always_inline)) void panel_rows(int R, const float *x,
                                                             int64_t x_stride, const uint16_t *w,
                                                             const int8_t *wq, const float *wf,
                                                             int64_t in, const float *scale,
                                                             float *y, int64_t y_stride,
                                                             int64_t n) {
    f32v acc[4][3];
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < in; k++) {
        f32v w0, w1, w2;
        if (wf != NULL) {
            w0 = load_f32v(wf + k * PANEL), w1 = load_f32v(wf + k * PANEL + LANES);
            w2 = load_f32v(wf + k * PANEL + 2 * LANES);
        } else if (w != NULL) {
            w0 = load_bf16v(w + k * PANEL), w1 = load_bf16v(w + k * PANEL + LANES);
            w2 = load_bf16v(w + k * PANEL + 2 * LANES);
        } else {
            w0 = load_i8v(wq + k * PANEL), w1 = load_i8v(wq + k * PANEL + LANES);
            w2 = load_i8v(wq + k * PANEL + 2 * LANES);
        }
        for (int i = 0; i < R; i++) {
            f32v xb = broadcast_v(x[i * x_stride + k]);
            acc[i][0] = fma_v(xb, w0, acc[i][0]);
            acc[i][1] = fma_v(xb, w1, acc[i][1]);
            acc[i][2] = fma_v(xb, w2, acc[i][2]);
        }
    }
    if (scale != NULL)
        for (int i = 0; i < R; i++)
            for (int v = 0; v < 3; v++) acc[i][v] *= load_f32v(scale + v * LANES);
    for (int i = 0; i < R; i++) {
        if (n == PANEL) {
            memcpy(y + i * y_stride, acc[i], sizeof acc[i]);
            continue;
        }
        float sums[PANEL];
        memcpy(sums, acc[i], sizeof sums);
        memcpy(y + i * y_stride, sums, sizeof(float) * n);
    }
}

/* y = x W^T over the panels of bf16 `w` or (`w` NULL) int8 `wq` with its `scale` (one per output,
 * padded to whole panels). Returns 0, or -1 out of memory. */
static int linear_panels(int64_t rows, int64_t in, int64_t out, const float *x, int64_t x_stride,
                         const uint16_t *w, const int8_t *wq, const float *scale, float *y,
                         int64_t y_stride, int threads) {
    int64_t count = (out + PANEL - 1) / PANEL;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        size_t bytes = (sizeof(float) * in * PANEL + 63) / 64 * 64;
        float *wf = rows > 3 ? aligned_alloc(64, bytes) : NULL;
        if (rows > 3 && wf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < count; p++) {
            if (failed) continue;
            const uint16_t *wp = w != NULL ? w + p * in * PANEL : NULL;
            const int8_t *wqp = w == NULL ? wq + p * in * PANEL : NULL;
            const float *sp = scale != NULL ? scale + p * PANEL : NULL;
            int64_t n = out - p * PANEL < PANEL ? out - p * PANEL : PANEL;
            if (wf != NULL)
                for (int64_t k = 0; k < in * PANEL; k += LANES)
                    *(f32v *)(wf + k) = wp != NULL ? load_bf16v(wp + k) : load_i8v(wqp + k);
            float *yp = y + p * PANEL;
            int64_t r = 0;
            for (; r + 4 <= rows; r += 4)
                panel_rows(4, x + r * x_stride, x_stride, wp, wqp, wf, in, sp, yp + r * y_stride,
                           y_stride, n);
            const float *xr = x + r * x_stride;
            float *yr = yp + r * y_stride;
            if (rows - r == 3)
                panel_rows(3, xr, x_stride, wp, wqp, wf, in, sp, yr, y_stride, n);
            else if (rows - r == 2)
                panel_rows(2, xr, x_stride, wp, wqp, wf, in, sp, yr, y_stride, n);
            else if (rows - r == 1)
                panel_rows(1, xr, x_stride, wp, wqp, wf, in, sp, yr, y_stride, n);
        }
        free(wf);
    }
    return failed ? -1 : 0;
}

/* y = x W^T, W bf16 in panels (`tunery_linear_pack_f32`). Returns 0, or -1 out of memory. */
int tunery_linear_bf16w(int64_t rows, int64_t in, int64_t out, const float *x, int64_t x_stride,
                        const uint16_t *panels, float *y, int64_t y_stride, int threads) {
    return linear_panels(rows, in, out, x, x_stride, panels, NULL, NULL, y, y_stride, threads);
}

/* y = x (W scaled)^T, W int8 in panels [out / PANEL][in][PANEL] with one fp32 scale per output
 * (`scale`, padded to whole panels). Returns 0, or -1 out of memory. */
int tunery_linear_i8w(int64_t rows, int64_t in, int64_t out, const float *x, int64_t x_stride,
                      const int8_t *panels, const float *scale, float *y, int64_t y_stride,
                      int threads) {
    return linear_panels(rows, in, out, x, x_stride, NULL, panels, scale, y, y_stride, threads);
}
