/* A LoRA group's products in a training step of few rows (`fast_train.LORA_FP32_MAX_ROWS`), in
 * fp32 on the master weights, each direction in one call instead of a dozen torch ops.
 *
 * The group is `lora_delta.c`'s desc: A (R, in) stacked over its members, and each member's part
 * of the output columns with its B (out_p, r_p) on its ranks [r_lo, r_hi). x, y and the
 * gradients of the activations are bf16 (fp32: `elem.h`); u = x A^T is kept in fp32 for the
 * backward. `in` must be a multiple of 2 LANES, every part's rank and columns of LANES
 * (`tunery_lora_train_fits`): the products run over whole vectors, no tails.
 *
 * At a seed step's sizes (30-70 rows, rank 16) torch's route costs ~20 µs an op for products of
 * a few µs each: forward x.to(fp32), x A^T, then per member u B^T and an add into its columns;
 * backward a dozen more. Gemma 3 270M's four groups at 45 rows (2 cores, AVX-512): forward
 * 339-361 -> 171-192 µs a layer, backward 588-651 -> 372-437 µs; the seed `train()` 2.36-2.45 ->
 * 2.28-2.29 s (medians of 5 alternating runs).
 */
#include <stdlib.h>
#include <string.h>

#include "elem.h"

#define ROWS4 4 /* rows per register block */

typedef struct {
    int64_t c_lo, c_hi, r_lo, r_hi;
    const float *b;
} TrainPart;

/* desc (see `LoraDesc`): in, R, parts, A, then each part's c_lo, c_hi, r_lo, r_hi, B. */
#define DESC_IN(d) ((d)[0])
#define DESC_R(d) ((d)[1])
#define DESC_PARTS(d) ((d)[2])
#define DESC_A(d) ((const float *)(intptr_t)(d)[3])
#define DESC_PART(d, p) (((const TrainPart *)((d) + 4))[p])

/* Whether the kernels take this desc: `in`, every part's rank and columns whole vectors. */
int KERNEL(tunery_lora_train_fits)(const int64_t *desc) {
    if (DESC_IN(desc) % (2 * LANES)) return 0;
    for (int64_t p = 0; p < DESC_PARTS(desc); p++) {
        TrainPart part = DESC_PART(desc, p);
        if ((part.r_hi - part.r_lo) % LANES || (part.c_hi - part.c_lo) % LANES) return 0;
    }
    return 1;
}

/* Blocks of `unit` columns over the parts, each part's last one partial where `unit` does not
 * divide its columns. */
static int64_t column_blocks(const int64_t *desc, int64_t unit) {
    int64_t blocks = 0;
    for (int64_t p = 0; p < DESC_PARTS(desc); p++)
        blocks += (DESC_PART(desc, p).c_hi - DESC_PART(desc, p).c_lo + unit - 1) / unit;
    return blocks;
}

/* Block t of `column_blocks(desc, unit)`: its part (returned), its first column relative to the
 * part's (*c), and where the part's B values start among all parts' (*b_at). */
static int64_t column_block(const int64_t *desc, int64_t unit, int64_t t, int64_t *c,
                            int64_t *b_at) {
    int64_t p = 0;
    *b_at = 0;
    for (;; p++) {
        TrainPart part = DESC_PART(desc, p);
        int64_t blocks = (part.c_hi - part.c_lo + unit - 1) / unit;
        if (t < blocks) break;
        t -= blocks;
        *b_at += (part.c_hi - part.c_lo) * (part.r_hi - part.r_lo);
    }
    *c = t * unit;
    return p;
}

/* rows x n values of `src` (rows `stride` apart) widened to fp32 into dst (rows n apart), the
 * rows split among the team (inside a parallel region). */
static void widen_all(const elem_t *src, int64_t stride, int64_t rows, int64_t n, float *dst) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; i++)
        for (int64_t d = 0; d < n; d += LANES) {
            f32v v = load_elemv(src + i * stride + d);
            memcpy(dst + i * n + d, &v, sizeof v);
        }
}

/* out[k][j] = x_k . a_j for 4 rows of x and 4 of a (`in` values each), 16 sums at once. */
static void dots4x4(const float *const x[4], const float *const a[4], int64_t in,
                    float out[4][4]) {
    f32v acc[4][4];
    memset(acc, 0, sizeof acc);
    for (int64_t d = 0; d < in; d += LANES) {
        f32v av[4], xv[4];
        for (int j = 0; j < 4; j++) av[j] = load_f32v(a[j] + d);
        for (int k = 0; k < 4; k++) xv[k] = load_f32v(x[k] + d);
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) acc[k][j] = fma_v(xv[k], av[j], acc[k][j]);
    }
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 4; j++) out[k][j] = sum_lanes(acc[k][j]);
}

/* u (rows x R) = x A^T for the 4-row block at r0 (n real rows) of xf, x widened (the block's
 * missing rows repeat its first: their sums are dropped). */
static void u_block(const int64_t *desc, const float *xf, int64_t r0, int64_t n, float *u) {
    int64_t in = DESC_IN(desc), r = DESC_R(desc);
    const float *a = DESC_A(desc), *xs[4];
    for (int k = 0; k < 4; k++) xs[k] = xf + (r0 + (k < n ? k : 0)) * in;
    for (int64_t j0 = 0; j0 < r; j0 += 4) {
        const float *rows[4];
        for (int j = 0; j < 4; j++) rows[j] = a + (j0 + j < r ? j0 + j : j0) * in;
        float out[4][4];
        dots4x4(xs, rows, in, out);
        for (int64_t k = 0; k < n; k++)
            for (int j = 0; j < 4 && j0 + j < r; j++) u[(r0 + k) * r + j0 + j] = out[k][j];
    }
}

/* y[row][c0 .. c0 + LANES) += scale * u_part(row) B^T for the LANES columns whose B rows are
 * transposed in bt (rank vectors), every row: 8 rows at a time, so that eight sum chains are in
 * flight (an FMA's latency is four of its issue slots). */
static void add_columns(int64_t rows, const float *u, int64_t r, int64_t r_lo, int64_t rank,
                        const f32v *bt, float scale, elem_t *y, int64_t y_stride, int64_t c0) {
    for (int64_t i = 0; i < rows; i += 8) {
        int64_t n = rows - i < 8 ? rows - i : 8;
        const float *ui[8];
        for (int64_t k = 0; k < 8; k++) ui[k] = u + (i + (k < n ? k : 0)) * r + r_lo;
        f32v acc[8] = {{0}};
        for (int64_t j = 0; j < rank; j++)
            for (int k = 0; k < 8; k++) acc[k] = fma_v(broadcast_v(ui[k][j]), bt[j], acc[k]);
        for (int64_t k = 0; k < n; k++) {
            elem_t *out = y + (i + k) * y_stride + c0;
            store_elemv(out, load_elemv(out) + acc[k] * broadcast_v(scale));
        }
    }
}

/* B's rows [c, c + LANES) of a rank-`rank` part, transposed: rank vectors of LANES columns. */
static void transpose_rows(const float *b, int64_t rank, f32v *bt) {
    for (int64_t k = 0; k < rank; k++) {
        float lane[LANES];
        for (int64_t l = 0; l < LANES; l++) lane[l] = b[l * rank + k];
        memcpy(&bt[k], lane, sizeof lane);
    }
}

/* The forward: u (rows x R, fp32) = x A^T, then y += scale * u_p B_p^T on each part's columns
 * (fp32 sums, rounded once into y). Every part's columns a multiple of LANES. Returns 0, or -1
 * out of memory. */
int KERNEL(tunery_lora_train_forward)(int64_t rows, const int64_t *desc, float scale,
                                      const elem_t *x, int64_t x_stride, elem_t *y,
                                      int64_t y_stride, float *u, int threads) {
    int64_t in = DESC_IN(desc), r = DESC_R(desc);
    int64_t blocks = (rows + ROWS4 - 1) / ROWS4, columns = column_blocks(desc, LANES);
    float *xf = malloc(sizeof(float) * (rows > 0 ? rows : 1) * in);
    if (xf == NULL) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        widen_all(x, x_stride, rows, in, xf);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            int64_t r0 = blk * ROWS4;
            u_block(desc, xf, r0, rows - r0 < ROWS4 ? rows - r0 : ROWS4, u);
        }
        f32v *bt = aligned_alloc(64, sizeof(f32v) * (r > 0 ? r : 1));
        if (bt == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < columns; t++) {
            if (bt == NULL) continue;
            int64_t c, b_at;
            TrainPart part = DESC_PART(desc, column_block(desc, LANES, t, &c, &b_at));
            int64_t rank = part.r_hi - part.r_lo;
            transpose_rows(part.b + c * rank, rank, bt);
            add_columns(rows, u, r, part.r_lo, rank, bt, scale, y, y_stride, part.c_lo + c);
        }
        free(bt);
    }
    free(xf);
    return failed ? -1 : 0;
}

/* gu (rows x R) for the 8-row block at i0 (n real rows): gu[i][r_lo + k] = sum over the part's
 * columns c of g[i][c] B[c][k], B's row c read as it lies (its rank values are the vector). */
static void gu_block(const int64_t *desc, const float *gf, int64_t out, int64_t i0, int64_t n,
                     float *gu) {
    int64_t r = DESC_R(desc);
    for (int64_t p = 0; p < DESC_PARTS(desc); p++) {
        TrainPart part = DESC_PART(desc, p);
        int64_t rank = part.r_hi - part.r_lo;
        for (int64_t k0 = 0; k0 < rank; k0 += LANES) {
            const float *gi[8];
            for (int k = 0; k < 8; k++) gi[k] = gf + (i0 + (k < n ? k : 0)) * out;
            f32v acc[8] = {{0}};
            for (int64_t c = part.c_lo; c < part.c_hi; c++) {
                f32v b = load_f32v(part.b + (c - part.c_lo) * rank + k0);
                for (int k = 0; k < 8; k++) acc[k] = fma_v(broadcast_v(gi[k][c]), b, acc[k]);
            }
            for (int64_t k = 0; k < n; k++)
                memcpy(gu + (i0 + k) * r + part.r_lo + k0, &acc[k], sizeof acc[k]);
        }
    }
}

/* grad_b rows [c, c + 8) of a part (c relative to its columns; fewer at its end): scale *
 * sum over rows i of g[i][c] u[i][r_lo + k]. */
static void grad_b_rows(TrainPart part, const float *gf, int64_t out, const float *u, int64_t r,
                        int64_t rows, int64_t c, float scale, float *gb) {
    int64_t rank = part.r_hi - part.r_lo, width = part.c_hi - part.c_lo;
    int64_t m = width - c < 8 ? width - c : 8;
    for (int64_t k0 = 0; k0 < rank; k0 += LANES) {
        f32v acc[8] = {{0}};
        for (int64_t i = 0; i < rows; i++) {
            f32v ui = load_f32v(u + i * r + part.r_lo + k0);
            const float *gi = gf + i * out + part.c_lo + c;
            for (int k = 0; k < 8; k++) acc[k] = fma_v(broadcast_v(gi[k < m ? k : 0]), ui, acc[k]);
        }
        for (int64_t k = 0; k < m; k++) {
            f32v v = acc[k] * broadcast_v(scale);
            memcpy(gb + (c + k) * rank + k0, &v, sizeof v);
        }
    }
}

/* grad_a rows [j0, j0 + 4) (fewer at R's end), 2 LANES columns from d: scale * sum over rows i
 * of gu[i][j] x[i][d] (eight sum chains in flight). */
static void grad_a_block(const float *gu, int64_t r, const float *xf, int64_t in, int64_t rows,
                         int64_t j0, int64_t d, float scale, float *ga) {
    int64_t m = r - j0 < 4 ? r - j0 : 4;
    f32v acc[4][2] = {{{0}}};
    for (int64_t i = 0; i < rows; i++) {
        f32v x0 = load_f32v(xf + i * in + d), x1 = load_f32v(xf + i * in + d + LANES);
        const float *gi = gu + i * r + j0;
        for (int k = 0; k < 4; k++) {
            f32v gk = broadcast_v(gi[k < m ? k : 0]);
            acc[k][0] = fma_v(gk, x0, acc[k][0]);
            acc[k][1] = fma_v(gk, x1, acc[k][1]);
        }
    }
    for (int64_t k = 0; k < m; k++)
        for (int h = 0; h < 2; h++) {
            f32v v = acc[k][h] * broadcast_v(scale);
            memcpy(ga + (j0 + k) * in + d + h * LANES, &v, sizeof v);
        }
}

/* gx rows [i0, i0 + n) (n <= 4), 2 LANES columns from d: += scale * sum over j of gu[i][j]
 * A[j][d] (fp32 sums, rounded once; eight sum chains in flight). */
static void gx_block(const float *gu, int64_t r, const float *a, int64_t in, int64_t i0,
                     int64_t n, int64_t d, float scale, elem_t *gx, int64_t gx_stride) {
    const float *gi[4];
    for (int k = 0; k < 4; k++) gi[k] = gu + (i0 + (k < n ? k : 0)) * r;
    f32v acc[4][2] = {{{0}}};
    for (int64_t j = 0; j < r; j++) {
        f32v a0 = load_f32v(a + j * in + d), a1 = load_f32v(a + j * in + d + LANES);
        for (int k = 0; k < 4; k++) {
            f32v gk = broadcast_v(gi[k][j]);
            acc[k][0] = fma_v(gk, a0, acc[k][0]);
            acc[k][1] = fma_v(gk, a1, acc[k][1]);
        }
    }
    for (int64_t k = 0; k < n; k++)
        for (int h = 0; h < 2; h++) {
            elem_t *o = gx + (i0 + k) * gx_stride + d + h * LANES;
            store_elemv(o, load_elemv(o) + acc[k][h] * broadcast_v(scale));
        }
}

/* The backward of `tunery_lora_train_forward` for the output's gradient g (rows x out): gu = g_p
 * B_p on each part's ranks; grad_a (R x in) = scale * gu^T x; each part's grad_b (its columns x
 * its rank, one after another in grad_b) = scale * g_p^T u_p; and, where gx is given, gx (rows x
 * in) += scale * gu A (fp32 sums, rounded once). All fp32 but x, g and gx. Returns 0, or -1 out
 * of memory. */
int KERNEL(tunery_lora_train_backward)(int64_t rows, const int64_t *desc, float scale,
                                       const elem_t *x, int64_t x_stride, const elem_t *g,
                                       int64_t g_stride, const float *u, float *grad_a,
                                       float *grad_b, elem_t *gx, int64_t gx_stride,
                                       int threads) {
    int64_t in = DESC_IN(desc), r = DESC_R(desc), out = 0, b_size = 0;
    for (int64_t p = 0; p < DESC_PARTS(desc); p++) {
        TrainPart part = DESC_PART(desc, p);
        if (part.c_hi > out) out = part.c_hi;
        b_size += (part.c_hi - part.c_lo) * (part.r_hi - part.r_lo);
    }
    if (rows <= 0) { /* no rows: no gradient */
        memset(grad_a, 0, sizeof(float) * r * in);
        memset(grad_b, 0, sizeof(float) * b_size);
        return 0;
    }
    float *gf = malloc(sizeof(float) * rows * out), *xf = malloc(sizeof(float) * rows * in);
    float *gu = malloc(sizeof(float) * rows * r);
    if (gf == NULL || xf == NULL || gu == NULL) {
        free(gf), free(xf), free(gu);
        return -1;
    }
    int64_t b_blocks = column_blocks(desc, 8);
    int64_t row8 = (rows + 7) / 8, row4 = (rows + 3) / 4, pairs = in / (2 * LANES);
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        widen_all(g, g_stride, rows, out, gf);
        widen_all(x, x_stride, rows, in, xf);
        /* gu by 8-row blocks, and each part's grad_b by 8 of its columns (no barrier between) */
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < row8; t++)
            gu_block(desc, gf, out, t * 8, rows - t * 8 < 8 ? rows - t * 8 : 8, gu);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < b_blocks; t++) {
            int64_t c, b_at;
            int64_t p = column_block(desc, 8, t, &c, &b_at);
            grad_b_rows(DESC_PART(desc, p), gf, out, u, r, rows, c, scale, grad_b + b_at);
        }
        /* then from gu: grad_a, and gx */
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < (r + 3) / 4 * pairs; t++)
            grad_a_block(gu, r, xf, in, rows, t / pairs * 4, t % pairs * 2 * LANES, scale, grad_a);
        if (gx != NULL) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < row4 * pairs; t++) {
                int64_t i0 = t / pairs * 4;
                gx_block(gu, r, DESC_A(desc), in, i0, rows - i0 < 4 ? rows - i0 : 4,
                         t % pairs * 2 * LANES, scale, gx, gx_stride);
            }
        }
    }
    free(gf), free(xf), free(gu);
    return 0;
}
