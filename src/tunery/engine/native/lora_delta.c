/* LoRA deltas for the rows of a decode step, each run of rows with its own adapter, added into
 * the base projection's bf16 (fp32: `elem.h`) output: base += (x A^T) B^T per row, in fp32,
 * rounded once.
 *
 * A row's sums run in an order fixed by its adapter alone (x A^T in LANES running sums and a fixed
 * tree, u B^T over the rank in order), never by the other rows or the threads.
 */
#include <stdlib.h>

#include "elem.h"

#define BLOCK 64 /* output columns per task */
/* Bytes of an adapter's weights prefetched ahead of where a thread reads them: two threads
 * reading a few KB per task leave the hardware prefetcher too little run to ramp up on (the
 * kernel waited on memory at ~10 GB/s before this). */
#define AHEAD 4096

/* An adapter's group as `desc` describes it: in, r, parts, A (r, in) fp32, then for each part
 * out columns [c_lo, c_hi), rank columns [r_lo, r_hi), B (c_hi - c_lo, r_hi - r_lo) fp32. */
typedef struct {
    int64_t c_lo, c_hi, r_lo, r_hi;
    const float *b;
} Part;

typedef struct {
    int64_t row_lo, row_hi, c_lo, c_hi, u_offset;
    const Part *part;
} Task;

/* u[k * u_stride] = x_k . a for 4 rows x_k (x_stride apart): dot_f32_elem's order each */
static void dot4(const elem_t *x, int64_t x_stride, const float *a, int64_t n, float *u,
                 int64_t u_stride) {
    f32v acc[4] = {{0}, {0}, {0}, {0}};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES) {
        __builtin_prefetch(a + d + AHEAD / sizeof(float), 0, 3); /* A's next rows follow */
        f32v av = load_f32v(a + d);
        for (int k = 0; k < 4; k++) acc[k] += load_elemv(x + k * x_stride + d) * av;
    }
    for (int k = 0; k < 4; k++) {
        float s = sum_lanes(acc[k]);
        for (int64_t e = d; e < n; e++) s += elem_to_f32(x[k * x_stride + e]) * a[e];
        u[k * u_stride] = s;
    }
}

/* out[0:n] (n <= LANES) += the LANES sums acc, rounded once. */
static inline void add_sums(elem_t *out, int64_t n, f32v acc) {
    if (n == LANES) {
        store_elemv(out, load_elemv(out) + acc);
        return;
    }
    float delta[LANES];
    memcpy(delta, &acc, sizeof delta);
    for (int64_t l = 0; l < n; l++) out[l] = f32_to_elem(elem_to_f32(out[l]) + delta[l]);
}

/* out[0:n] (n <= LANES) += u B^T for one row, B's LANES columns held rank-major in `bt`. */
static void add_block(elem_t *out, int64_t n, const float *u, const f32v *bt, int64_t rank) {
    f32v acc = {0};
    for (int64_t j = 0; j < rank; j++) acc += u[j] * bt[j];
    add_sums(out, n, acc);
}

/* add_block for 4 rows (out and u `out_stride` and `u_stride` apart): each row's sums in the
 * same order as alone, four independent chains in flight instead of one. */
static void add_block4(elem_t *out, int64_t out_stride, int64_t n, const float *u,
                       int64_t u_stride, const f32v *bt, int64_t rank) {
    f32v acc[4] = {{0}, {0}, {0}, {0}};
    for (int64_t j = 0; j < rank; j++)
        for (int k = 0; k < 4; k++) acc[k] += u[k * u_stride + j] * bt[j];
    for (int k = 0; k < 4; k++) add_sums(out + k * out_stride, n, acc[k]);
}

#if (LANES == 16 && defined(__AVX512F__)) || (LANES == 8 && defined(__AVX2__))
#include <immintrin.h>
#endif

#if LANES == 16 && defined(__AVX512F__)
/* r[j] lane l = the old r[l] lane j: a 16 x 16 transpose in registers. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++)
        for (int h = 0; h < 2; h++) {
            __m512d a = _mm512_castps_pd(t[4 * i + h]), b = _mm512_castps_pd(t[4 * i + 2 + h]);
            r[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            r[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}
#elif LANES == 8 && defined(__AVX2__)
/* r[j] lane l = the old r[l] lane j: an 8 x 8 transpose in registers. */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)
        for (int h = 0; h < 2; h++) {
            __m256 a = t[4 * i + h], b = t[4 * i + 2 + h];
            r[4 * i + 2 * h] = _mm256_shuffle_ps(a, b, 0x44);
            r[4 * i + 2 * h + 1] = _mm256_shuffle_ps(a, b, 0xee);
        }
    for (int j = 0; j < 4; j++) {
        t[j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x20);
        t[4 + j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x31);
    }
    for (int j = 0; j < 8; j++) r[j] = t[j];
}
#endif

/* t (rank rows of LANES) = the block of B's rows b[0:n] (each `rank` values) transposed, the
 * lanes past n zero, in registers LANES ranks at a time (AVX-512: ~0.9x the time of reading a
 * B^T copy made once, which cost 5.5 MB and ~30 ms to build per adapter of Gemma 3 270M). */
static void transpose_block(const float *b, int64_t n, int64_t rank, float *t) {
#if LANES == 16 && defined(__AVX512F__)
    for (int64_t j0 = 0; j0 < rank; j0 += 16) {
        int64_t m = rank - j0 < 16 ? rank - j0 : 16;
        __mmask16 cols = (__mmask16)((1u << m) - 1);
        __m512 r[16];
        for (int64_t l = 0; l < 16; l++)
            r[l] = l < n ? _mm512_maskz_loadu_ps(cols, b + l * rank + j0) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t j = 0; j < m; j++) _mm512_store_ps(t + (j0 + j) * LANES, r[j]);
    }
#elif LANES == 8 && defined(__AVX2__)
    for (int64_t j0 = 0; j0 < rank; j0 += 8) {
        int64_t m = rank - j0 < 8 ? rank - j0 : 8;
        __m256i cols = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)m),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 r[8];
        for (int64_t l = 0; l < 8; l++)
            r[l] = l < n ? _mm256_maskload_ps(b + l * rank + j0, cols) : _mm256_setzero_ps();
        transpose8(r);
        for (int64_t j = 0; j < m; j++) _mm256_store_ps(t + (j0 + j) * LANES, r[j]);
    }
#else
    for (int64_t l = 0; l < LANES; l++)
        for (int64_t j = 0; j < rank; j++) t[j * LANES + l] = l < n ? b[l * rank + j] : 0.0f;
#endif
}

static void run_task(const Task *w, const float *u, int64_t r_max, elem_t *base,
                     int64_t base_stride, f32v *bt) {
    const Part *p = w->part;
    int64_t rank = p->r_hi - p->r_lo;
    for (int64_t c = w->c_lo; c < w->c_hi; c += LANES) {
        int64_t n = w->c_hi - c < LANES ? w->c_hi - c : LANES;
        /* its block of columns as rank rows of LANES, the weights ahead fetched meanwhile */
        const float *block = p->b + (c - p->c_lo) * rank;
        const char *ahead = (const char *)block + AHEAD;
        const char *end = (const char *)(p->b + (p->c_hi - p->c_lo) * rank);
        for (int64_t q = 0; q < rank * LANES * 4 && ahead + q < end; q += 64)
            __builtin_prefetch(ahead + q, 0, 3);
        transpose_block(block, n, rank, (float *)bt);
        int64_t row = w->row_lo;
        for (; row + 4 <= w->row_hi; row += 4) {
            const float *ur = u + (w->u_offset + row - w->row_lo) * r_max + p->r_lo;
            add_block4(base + row * base_stride + c, base_stride, n, ur, r_max, bt, rank);
        }
        for (; row < w->row_hi; row++) {
            const float *ur = u + (w->u_offset + row - w->row_lo) * r_max + p->r_lo;
            add_block(base + row * base_stride + c, n, ur, bt, rank);
        }
    }
}

int KERNEL(tunery_lora_add)(int64_t spans, const int64_t *row_lo, const int64_t *row_hi,
                            const int64_t *const *desc, const elem_t *x, int64_t x_stride,
                            elem_t *base, int64_t base_stride, int threads) {
    int64_t rows = 0, tasks = 0, r_max = 1;
    for (int64_t s = 0; s < spans; s++) {
        if (desc[s] == NULL) continue;
        rows += row_hi[s] - row_lo[s];
        r_max = desc[s][1] > r_max ? desc[s][1] : r_max;
        const Part *parts = (const Part *)(desc[s] + 4);
        for (int64_t p = 0; p < desc[s][2]; p++)
            tasks += (parts[p].c_hi - parts[p].c_lo + BLOCK - 1) / BLOCK;
    }
    if (rows == 0) return 0;
    float *u = malloc(sizeof(float) * rows * r_max);
    int64_t *u_row = malloc(sizeof(int64_t) * 2 * rows); /* (row, span) of each u row */
    int64_t *chunk = malloc(sizeof(int64_t) * rows);     /* first u row of each step 1 task */
    Task *list = malloc(sizeof(Task) * tasks);
    if (u == NULL || u_row == NULL || chunk == NULL || list == NULL) {
        free(u), free(u_row), free(chunk), free(list);
        return -1;
    }
    int64_t k = 0, t = 0, chunks = 0;
    for (int64_t s = 0; s < spans; s++) {
        if (desc[s] == NULL) continue;
        int64_t first = k;
        for (int64_t row = row_lo[s]; row < row_hi[s]; row++, k++) {
            if ((row - row_lo[s]) % 4 == 0) chunk[chunks++] = k;
            u_row[2 * k] = row;
            u_row[2 * k + 1] = s;
        }
        const Part *parts = (const Part *)(desc[s] + 4);
        for (int64_t p = 0; p < desc[s][2]; p++)
            for (int64_t c = parts[p].c_lo; c < parts[p].c_hi; c += BLOCK) {
                int64_t end = c + BLOCK < parts[p].c_hi ? c + BLOCK : parts[p].c_hi;
                list[t++] = (Task){row_lo[s], row_hi[s], c, end, first, &parts[p]};
            }
    }
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        /* 1. u = x A^T: per rank row of A, up to 4 rows of a span at a time */
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            int64_t i = chunk[c], n = rows - i < 4 ? rows - i : 4;
            const int64_t *d = desc[u_row[2 * i + 1]];
            const float *a = (const float *)(intptr_t)d[3];
            const elem_t *xr = x + u_row[2 * i] * x_stride;
            if (n == 4 && u_row[2 * (i + 3) + 1] == u_row[2 * i + 1]) {
                for (int64_t j = 0; j < d[1]; j++)
                    dot4(xr, x_stride, a + j * d[0], d[0], u + i * r_max + j, r_max);
                continue;
            }
            for (int64_t k = i; k < i + n && u_row[2 * k + 1] == u_row[2 * i + 1]; k++)
                for (int64_t j = 0; j < d[1]; j++)
                    u[k * r_max + j] =
                        dot_f32_elem(a + j * d[0], x + u_row[2 * k] * x_stride, d[0]);
        }
        /* 2. base += u B^T, a block of output columns of one part per task */
        f32v *bt = aligned_alloc(64, sizeof(f32v) * r_max);
        if (bt == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static) /* each thread one run of the weights, prefetched ahead */
        for (int64_t i = 0; i < t; i++)
            if (bt != NULL) run_task(&list[i], u, r_max, base, base_stride, bt);
        free(bt);
    }
    free(u), free(u_row), free(chunk), free(list);
    return failed ? -1 : 0;
}
