/* y = x W^T for a decode step's rows: x (rows, in) fp32, W (out, in) bf16, y (rows, out) fp32.
 *
 * For a CPU that runs the model in fp32 (no AVX512-BF16): the weights are bf16 values (the
 * model's own, widened exactly), so reading them as bf16 halves the bytes a memory-bound step
 * reads and changes no product. Each y[r][j] is summed in LANES running fused multiply-adds
 * over k, then `sum_lanes`'s tree, then the tail in order: the same order whatever the rows,
 * their count or the threads, so a row gets the same bits alone or in any batch. Rows go 3 at a
 * time against 4 weight rows (12 sums in registers), the 4 weight rows staying in L1 while every
 * row passes: widened once into an fp32 copy there for more than 3 rows (the same values, so
 * the same bits), read as bf16 directly for fewer.
 */
#include <math.h>
#include <stdlib.h>
#ifdef __FMA__
#include <immintrin.h>
#endif

#include "bf16.h"

/* acc + a * b, rounded once (an FMA) where the CPU has one. */
static inline f32v fma_v(f32v a, f32v b, f32v acc) {
#if defined(__AVX512F__)
    return (f32v)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif defined(__FMA__)
    return (f32v)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
    return acc + a * b;
#endif
}

static inline float fma_s(float a, float b, float acc) {
#if defined(__FMA__) || defined(__AVX512F__)
    return fmaf(a, b, acc);
#else
    return acc + a * b;
#endif
}

/* Weight vector k of row j: widened from bf16 `w`, or read from its fp32 copy `wf`. */
static inline f32v weight_at(const uint16_t *w, const float *wf, int64_t k) {
    return wf != NULL ? load_f32v(wf + k) : load_bf16v(w + k);
}

/* y[i * y_stride + j] for R rows of x (R <= 3) and the 4 weight rows w[0..3] (or their fp32
 * copy wf, when not NULL). Always inlined with R a constant, so the 12 sums stay in
 * registers. */
static inline __attribute__((always_inline)) void rows_by_4(int R, const float *x,
                                                            int64_t x_stride, const uint16_t *w,
                                                            const float *wf, int64_t in, float *y,
                                                            int64_t y_stride) {
    f32v acc[3][4];
    memset(acc, 0, sizeof acc);
    int64_t k = 0;
    for (; k + LANES <= in; k += LANES) {
        f32v w0 = weight_at(w, wf, k), w1 = weight_at(w + in, wf ? wf + in : NULL, k);
        f32v w2 = weight_at(w + 2 * in, wf ? wf + 2 * in : NULL, k);
        f32v w3 = weight_at(w + 3 * in, wf ? wf + 3 * in : NULL, k);
        for (int i = 0; i < R; i++) {
            f32v xv = load_f32v(x + i * x_stride + k);
            acc[i][0] = fma_v(xv, w0, acc[i][0]);
            acc[i][1] = fma_v(xv, w1, acc[i][1]);
            acc[i][2] = fma_v(xv, w2, acc[i][2]);
            acc[i][3] = fma_v(xv, w3, acc[i][3]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < 4; j++) {
            float s = sum_lanes(acc[i][j]);
            for (int64_t t = k; t < in; t++)
                s = fma_s(x[i * x_stride + t], bf16_to_f32(w[j * in + t]), s);
            y[i * y_stride + j] = s;
        }
}

/* One output column j's rows, in the order of `rows_by_4`. */
static void rows_by_1(int64_t rows, const float *x, int64_t x_stride, const uint16_t *w,
                      int64_t in, float *y, int64_t y_stride) {
    for (int64_t r = 0; r < rows; r++) {
        f32v acc = {0};
        int64_t k = 0;
        for (; k + LANES <= in; k += LANES)
            acc = fma_v(load_f32v(x + r * x_stride + k), load_bf16v(w + k), acc);
        float s = sum_lanes(acc);
        for (; k < in; k++) s = fma_s(x[r * x_stride + k], bf16_to_f32(w[k]), s);
        y[r * y_stride] = s;
    }
}

/* Returns 0, or -1 out of memory. */
int tunery_linear_bf16w(int64_t rows, int64_t in, int64_t out, const float *x, int64_t x_stride,
                        const uint16_t *w, float *y, int64_t y_stride, int threads) {
    int64_t blocks = (out + 3) / 4;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *wf = rows > 3 ? aligned_alloc(64, (sizeof(float) * 4 * in + 63) / 64 * 64) : NULL;
        if (rows > 3 && wf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t j = 4 * b;
            const uint16_t *wj = w + j * in;
            if (failed) continue;
            if (j + 4 > out) {
                for (; j < out; j++)
                    rows_by_1(rows, x, x_stride, w + j * in, in, y + j, y_stride);
                continue;
            }
            if (wf != NULL)
                for (int64_t k = 0; k < 4 * in; k++) wf[k] = bf16_to_f32(wj[k]);
            int64_t r = 0;
            for (; r + 3 <= rows; r += 3)
                rows_by_4(3, x + r * x_stride, x_stride, wj, wf, in, y + r * y_stride + j,
                          y_stride);
            const float *xr = x + r * x_stride;
            float *yr = y + r * y_stride + j;
            if (rows - r == 2)
                rows_by_4(2, xr, x_stride, wj, wf, in, yr, y_stride);
            else if (rows - r == 1)
                rows_by_4(1, xr, x_stride, wj, wf, in, yr, y_stride);
        }
        free(wf);
    }
    return failed ? -1 : 0;
}
