/* A packed training step's attention by AMX tiles, forward and backward each in one call, for
 * any number of tokens: each example's queries meet only its own keys, so no work or memory goes
 * to the pairs of different examples, and nothing of T x T size is kept for the backward.
 *
 * q (H, T, D), k and v (Hkv, T, D) bf16, each query head h reading kv head h / (H / Hkv); the
 * examples lie end to end (`starts`: n + 1 offsets). Token i attends to token j of its example
 * when j <= i and i - j < window (0: no window). Scores are bf16 products summed in fp32 (as
 * oneDNN's bf16 matmul sums them), scaled and softmaxed in fp32; the weights p = exp(s - lse)
 * are rounded to bf16 to weigh V. The forward keeps each row's log-sum-exp (H, T) only: the
 * backward makes the same scores again (same tiles, same order, same bits) and from them the
 * same p.
 *
 * Backward, per example: dp = dO V^T, ds = p (dp - sum_j p dp) scale (fp32, rounded to bf16),
 * dq = ds K; then each block of keys sums over the query heads that read it: dk = ds^T Q and
 * dv = p^T dO, from ds and p kept transposed for the example (H x L x L bf16 each).
 *
 * Every product is C (16 rows, fp32) += A (16 rows x 32 bf16) B (32 x 16, bf16 pairs): the B
 * operands (K^T, V, V^T, K, Q, dO) are packed first into 1 KB tiles (`pack_transposed`,
 * `pack_plain`), the A operands are row-major buffers (queries' rows, p's and ds's rows, their
 * transposes).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"

#define TR 16  /* rows of a tile (queries or keys), and columns of an output tile */
#define TC 32  /* bf16 values a tile row multiplies (a chunk of the inner dimension) */
#define TILE (TR * TC)

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

#if AMX
/* x (rows n_valid, row stride `stride` values) as B = x^T (K = x's columns, N = its rows) →
 * tiles for `mm16`: tile (nb, kc) at out + (nb * kcs + kc) * TILE holds B's rows 32kc.. and
 * columns 16nb.. as 16 row pairs r, each the 16 columns' pair (B[32kc + 2r][n], B[32kc + 2r +
 * 1][n]) = x[n][32kc + 2r], x[n][32kc + 2r + 1]: a tile row is one 4-byte pair from each of 16
 * rows of x (a gather; rows from n_valid on zero). K is kcs chunks of 32, N nbs blocks of 16. */
static void pack_transposed(const uint16_t *x, int64_t stride, int64_t n_valid, int64_t kcs,
                            int64_t nbs, uint16_t *out) {
    __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                        13, 14, 15),
                                      _mm512_set1_epi32((int32_t)stride * 2));
    for (int64_t nb = 0; nb < nbs; nb++) {
        int64_t left = n_valid - nb * TR;
        __mmask16 valid = left >= TR ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        const uint16_t *first = x + (valid ? nb * TR * stride : 0);
        for (int64_t kc = 0; kc < kcs; kc++) {
            uint16_t *t = out + (nb * kcs + kc) * TILE;
            for (int r = 0; r < TR; r++) {
                __m512i pairs = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, rows,
                                                            first + kc * TC + 2 * r, 1);
                _mm512_storeu_si512(t + r * 2 * TR, pairs);
            }
        }
    }
}

/* x (rows k_valid, row stride `stride` values, 16nbs columns) as B = x (K = its rows, N = its
 * columns) → `pack_transposed`'s tiles: a tile row interleaves two rows of x (rows from k_valid
 * on zero). */
static void pack_plain(const uint16_t *x, int64_t stride, int64_t k_valid, int64_t kcs,
                       int64_t nbs, uint16_t *out) {
    __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                          24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                          16, 0);
    for (int64_t nb = 0; nb < nbs; nb++)
        for (int64_t kc = 0; kc < kcs; kc++) {
            uint16_t *t = out + (nb * kcs + kc) * TILE;
            for (int r = 0; r < TR; r++) {
                int64_t k0 = kc * TC + 2 * r;
                const uint16_t *at = x + k0 * stride + nb * TR;
                __m256i a = k0 < k_valid ? _mm256_loadu_si256((const __m256i *)at)
                                         : _mm256_setzero_si256();
                __m256i b = k0 + 1 < k_valid ? _mm256_loadu_si256((const __m256i *)(at + stride))
                                             : _mm256_setzero_si256();
                __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
                _mm512_storeu_si512(t + r * 2 * TR, _mm512_permutexvar_epi16(interleave, both));
            }
        }
}

/* C[0:16][16nb:16nb + 16] for nb in [nb_lo, nb_hi) (fp32, row stride ldc, column 0 at c)
 * (+)= A (16 rows, stride lda, bf16) over its chunks kc_lo.. kc_hi of 32 values, times B's tiles
 * (`pack_transposed` or `pack_plain`, kcs chunks a column block). Four output tiles at a time,
 * one A load for them (`amx_products`). */
static void mm16(const uint16_t *a, int64_t lda, int64_t kc_lo, int64_t kc_hi,
                 const uint16_t *b, int64_t kcs, int64_t nb_lo, int64_t nb_hi, float *c,
                 int64_t ldc, int accumulate) {
    for (int64_t nb = nb_lo; nb < nb_hi; nb += 4) {
        int64_t n = nb_hi - nb < 4 ? nb_hi - nb : 4;
        float *cn = c + nb * TR;
        const uint16_t *bt = b + nb * kcs * TILE;
        if (accumulate) amx_load_sums(n, cn, TR, ldc * 4);
        else amx_zero_sums();
        for (int64_t kc = kc_lo; kc < kc_hi; kc++)
            amx_products(n, a + kc * TC, lda * 2, bt + kc * TILE, kcs * TILE);
        amx_store_sums(n, cn, TR, ldc * 4);
    }
}

/* dst (16 x d bf16, contiguous) = rows 0..rows-1 of src (stride ld), zero below. */
static void load_rows(uint16_t *dst, const uint16_t *src, int64_t ld, int64_t rows, int64_t d) {
    for (int64_t r = 0; r < TR; r++) {
        if (r < rows) memcpy(dst + r * d, src + r * ld, sizeof(uint16_t) * d);
        else memset(dst + r * d, 0, sizeof(uint16_t) * d);
    }
}

/* 16 rows of x (bf16, stride ld) over columns [c_lo, c_hi) (multiples of 16) → their
 * transpose at out (columns c of x become rows of out, stride ld): out[c * ld + r] = x[r][c].
 * 32 columns at a time: each pair of rows makes, per 16 columns, one register of the columns'
 * pairs (one 4-byte word each); 16 such registers, transposed (`transpose16`), hold the 32
 * columns' rows, half a register each (twice as fast as scattering the words). */
static void transpose_rows(const uint16_t *x, int64_t ld, int64_t c_lo, int64_t c_hi,
                           uint16_t *out) {
    __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                          24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                          16, 0);
    for (int64_t c = c_lo; c < c_hi; c += 32) {
        int two = c + 16 < c_hi; /* a second block of 16 columns */
        __m512i w[16];
        for (int64_t p = 0; p < TR / 2; p++)
            for (int h = 0; h < 2; h++) {
                if (h == 1 && !two) {
                    w[8 + p] = _mm512_setzero_si512();
                    continue;
                }
                const uint16_t *at = x + 2 * p * ld + c + 16 * h;
                __m256i a = _mm256_loadu_si256((const __m256i *)at);
                __m256i b = _mm256_loadu_si256((const __m256i *)(at + ld));
                __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
                w[8 * h + p] = _mm512_permutexvar_epi16(interleave, both);
            }
        transpose16(w); /* w[k]: column c + k's 16 rows, then column c + 16 + k's */
        for (int k = 0; k < 16; k++) {
            _mm256_storeu_si256((__m256i *)(out + (c + k) * ld), _mm512_castsi512_si256(w[k]));
            if (two)
                _mm256_storeu_si256((__m256i *)(out + (c + 16 + k) * ld),
                                    _mm512_extracti64x4_epi64(w[k], 1));
        }
    }
}

/* The geometry of the call: sizes, and each example's offset into the packed buffers. */
typedef struct {
    int64_t h, g, t, d, per, window, n_ex, tpad, lmax;
    const int64_t *starts;
    int64_t *pad_at; /* example e's first row in a buffer of tpad rows (its rows padded to 32) */
    float scale;
} Shape;

/* The keys [lo, hi] (relative to the example) that query rows i0..i0 + rows - 1 reach. */
static void key_range(const Shape *s, int64_t i0, int64_t rows, int64_t *lo, int64_t *hi) {
    *hi = i0 + rows - 1;
    *lo = s->window > 0 && i0 - s->window + 1 > 0 ? i0 - s->window + 1 : 0;
}

/* Scores (16 x key blocks over [lo, hi], fp32, stride ld, column 0 the example's first key) of
 * the 16 query rows qb (16 x d) against the example's packed K^T (kt: d / 32 chunks). */
static void scores(const Shape *s, const uint16_t *qb, const uint16_t *kt, int64_t lo,
                   int64_t hi, float *sc, int64_t ld) {
    mm16(qb, s->d, 0, s->d / TC, kt, s->d / TC, lo / TR, hi / TR + 1, sc, ld, 0);
}

/* x where lane l's key j + l is in [from, to], else fill. */
static inline f32v keep_keys(f32v x, int64_t j, int64_t from, int64_t to, f32v fill) {
    i32v at = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    at += (int32_t)j;
    i32v in = (at >= (int32_t)from) & (at <= (int32_t)to);
    return (f32v)(((i32v)x & in) | ((i32v)fill & ~in));
}

/* The keys [*j_lo, *j_hi) that row i's vectors cover (whole vectors of 16 from the example's
 * first key), its first key `from` inside them. */
static inline int64_t row_keys(const Shape *s, int64_t i, int64_t *j_lo, int64_t *j_hi) {
    int64_t from = s->window > 0 && i - s->window + 1 > 0 ? i - s->window + 1 : 0;
    *j_lo = from / 16 * 16;
    *j_hi = i / 16 * 16 + 16;
    return from;
}

/* Row i's softmax weights over its keys, in place in its scores sc (fp32, relative to the
 * example; zero in [j_lo, j_hi) outside its keys), from its log-sum-exp; returns it, computed
 * first where `lse` is NaN. 16 keys at a time (`exp_v`). */
static float weights(const Shape *s, float *sc, int64_t i, float lse) {
    int64_t j_lo, j_hi, from = row_keys(s, i, &j_lo, &j_hi);
    f32v scale = broadcast_v(s->scale), zero = broadcast_v(0.0f);
    if (isnan(lse)) {
        f32v m = broadcast_v(-INFINITY), total = zero;
        for (int64_t j = j_lo; j < j_hi; j += 16)
            m = (f32v)_mm512_max_ps((__m512)m, (__m512)keep_keys(load_f32v(sc + j) * scale, j,
                                                                 from, i, m));
        f32v top = broadcast_v(_mm512_reduce_max_ps((__m512)m));
        for (int64_t j = j_lo; j < j_hi; j += 16)
            total += keep_keys(exp_v(load_f32v(sc + j) * scale - top), j, from, i, zero);
        lse = top[0] + logf(sum_lanes(total));
    }
    f32v l = broadcast_v(lse);
    for (int64_t j = j_lo; j < j_hi; j += 16) {
        f32v p = keep_keys(exp_v(load_f32v(sc + j) * scale - l), j, from, i, zero);
        memcpy(sc + j, &p, sizeof p);
    }
    return lse;
}

static int shape_of(Shape *s, int64_t h, int64_t g, int64_t t, int64_t d, int64_t n_ex,
                    const int64_t *starts, int64_t window, float scale) {
    *s = (Shape){h, g, t, d, g > 0 ? h / g : 0, window, n_ex, 0, 0, starts, NULL, scale};
    if (!amx_permitted() || g < 1 || h % g || d % TC || n_ex < 1 || starts[0] != 0 ||
        starts[n_ex] != t)
        return -1;
    s->pad_at = malloc(sizeof(int64_t) * n_ex);
    if (s->pad_at == NULL) return -1;
    for (int64_t e = 0; e < n_ex; e++) {
        int64_t len = starts[e + 1] - starts[e];
        if (len < 1) {
            free(s->pad_at);
            return -1;
        }
        s->pad_at[e] = s->tpad;
        s->tpad += round_up(len, TC);
        if (round_up(len, TC) > s->lmax) s->lmax = round_up(len, TC);
    }
    return 0;
}

/* x (heads, T, D) of one head, example e → `mm16`'s B tiles at out + pad_at[e] * d: as B = x^T
 * (K = D, N = the example's tokens) when `transposed`, else as B = x (K = tokens, N = D).
 * `stride` is the row stride of x's tokens (D, or H·D for dO's (T, H, D)). */
static void pack_example(const Shape *s, const uint16_t *x, int64_t stride, int64_t e,
                         int transposed, uint16_t *out) {
    int64_t len = s->starts[e + 1] - s->starts[e], lp = round_up(len, TC);
    const uint16_t *first = x + s->starts[e] * stride;
    uint16_t *dst = out + s->pad_at[e] * s->d;
    if (transposed) pack_transposed(first, stride, len, s->d / TC, lp / TR, dst);
    else pack_plain(first, stride, len, lp / TC, s->d / TR, dst);
}

int tunery_tiles_attention(int64_t h_count, int64_t kv_count, int64_t t_count, int64_t d,
                           const uint16_t *q, const uint16_t *k, const uint16_t *v,
                           int64_t n_ex, const int64_t *starts, int64_t window, float scale,
                           uint16_t *out, float *lse, int threads) {
    Shape s;
    if (shape_of(&s, h_count, kv_count, t_count, d, n_ex, starts, window, scale)) return -1;
    uint16_t *kt = aligned_alloc(64, sizeof(uint16_t) * kv_count * s.tpad * d);
    uint16_t *vp = aligned_alloc(64, sizeof(uint16_t) * kv_count * s.tpad * d);
    int failed = kt == NULL || vp == NULL;
    if (!failed) {
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
        {
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < n_ex * kv_count * 2; task++) {
                int64_t e = task / (kv_count * 2), g = task / 2 % kv_count, kind = task % 2;
                const uint16_t *x = (kind ? v : k) + g * t_count * d;
                pack_example(&s, x, d, e, !kind, (kind ? vp : kt) + g * s.tpad * d);
            }
            float *sc = aligned_alloc(64, sizeof(float) * TR * s.lmax);
            float *ob = aligned_alloc(64, sizeof(float) * TR * d);
            uint16_t *qb = aligned_alloc(64, sizeof(uint16_t) * TR * d);
            uint16_t *pb = aligned_alloc(64, sizeof(uint16_t) * TR * s.lmax);
            int ok = sc != NULL && ob != NULL && qb != NULL && pb != NULL;
            if (!ok) {
#pragma omp atomic write
                failed = 1;
            }
            if (ok) amx_configure();
            /* tasks: (example, head, block of 16 queries), examples' blocks one after another */
            int64_t blocks = s.tpad / TR;
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < h_count * blocks; task++) {
                if (!ok) continue;
                int64_t h = task / blocks, blk = task % blocks, e = 0;
                while (e + 1 < n_ex && s.pad_at[e + 1] <= blk * TR) e++;
                int64_t start = starts[e], len = starts[e + 1] - start;
                int64_t i0 = blk * TR - s.pad_at[e], rows = len - i0 < TR ? len - i0 : TR;
                if (rows <= 0) continue; /* the example's padding */
                int64_t g = h / s.per, lo, hi, lp = round_up(len, TC);
                key_range(&s, i0, rows, &lo, &hi);
                load_rows(qb, q + (h * t_count + start + i0) * d, d, rows, d);
                scores(&s, qb, kt + (g * s.tpad + s.pad_at[e]) * d, lo, hi, sc, s.lmax);
                int64_t c_lo = lo / TC * TC, c_hi = round_up(hi + 1, TC);
                for (int64_t r = 0; r < TR; r++) {
                    float *row = sc + r * s.lmax;
                    uint16_t *prow = pb + r * s.lmax;
                    memset(prow + c_lo, 0, sizeof(uint16_t) * (c_hi - c_lo));
                    if (r >= rows) continue;
                    int64_t i = i0 + r, j_lo, j_hi;
                    row_keys(&s, i, &j_lo, &j_hi);
                    lse[h * t_count + start + i] = weights(&s, row, i, NAN);
                    for (int64_t j = j_lo; j < j_hi; j += 16)
                        store_bf16v(prow + j, load_f32v(row + j));
                }
                mm16(pb, s.lmax, c_lo / TC, c_hi / TC, vp + (g * s.tpad + s.pad_at[e]) * d,
                     lp / TC, 0, d / TR, ob, d, 0);
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t x = 0; x < d; x += 16)
                        store_bf16v(out + ((start + i0 + r) * h_count + h) * d + x,
                                    load_f32v(ob + r * d + x));
            }
            if (ok) _tile_release();
            free(sc);
            free(ob);
            free(qb);
            free(pb);
        }
    }
    free(kt);
    free(vp);
    free(s.pad_at);
    return failed ? -1 : 0;
}

int tunery_tiles_attention_backward(int64_t h_count, int64_t kv_count, int64_t t_count,
                                    int64_t d, const uint16_t *q, const uint16_t *k,
                                    const uint16_t *v, int64_t n_ex, const int64_t *starts,
                                    int64_t window, float scale, const float *lse,
                                    const uint16_t *go, uint16_t *dq, uint16_t *dk, uint16_t *dv,
                                    int threads) {
    Shape s;
    if (shape_of(&s, h_count, kv_count, t_count, d, n_ex, starts, window, scale)) return -1;
    size_t per_head = sizeof(uint16_t) * s.tpad * d;
    /* B packs: K^T and V^T (scores, dp), K (dq); per query head Q and dO (dk, dv) */
    uint16_t *kt = aligned_alloc(64, per_head * kv_count);
    uint16_t *vt = aligned_alloc(64, per_head * kv_count);
    uint16_t *kp = aligned_alloc(64, per_head * kv_count);
    uint16_t *qp = aligned_alloc(64, per_head * h_count);
    uint16_t *gp = aligned_alloc(64, per_head * h_count);
    /* one example's ds^T and p^T, (H, L, L) bf16 each */
    size_t square = sizeof(uint16_t) * h_count * s.lmax * s.lmax;
    uint16_t *dst = aligned_alloc(64, square), *pt = aligned_alloc(64, square);
    int failed = kt == NULL || vt == NULL || kp == NULL || qp == NULL || gp == NULL ||
                 dst == NULL || pt == NULL;
    if (!failed) {
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
        {
            int64_t packs = 3 * kv_count + 2 * h_count;
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < n_ex * packs; task++) {
                int64_t e = task / packs, which = task % packs;
                if (which < 3 * kv_count) {
                    int64_t g = which / 3, kind = which % 3;
                    const uint16_t *x = (kind == 1 ? v : k) + g * t_count * d;
                    uint16_t *to = (kind == 0 ? kt : kind == 1 ? vt : kp) + g * s.tpad * d;
                    pack_example(&s, x, d, e, kind < 2, to);
                } else {
                    int64_t h = (which - 3 * kv_count) / 2, kind = (which - 3 * kv_count) % 2;
                    if (kind) pack_example(&s, go + h * d, h_count * d, e, 0, gp + h * s.tpad * d);
                    else pack_example(&s, q + h * t_count * d, d, e, 0, qp + h * s.tpad * d);
                }
            }
            float *sc = aligned_alloc(64, sizeof(float) * TR * s.lmax);
            float *dp = aligned_alloc(64, sizeof(float) * TR * s.lmax);
            float *acc = aligned_alloc(64, sizeof(float) * TR * d * 2);
            uint16_t *qb = aligned_alloc(64, sizeof(uint16_t) * TR * d);
            uint16_t *gb = aligned_alloc(64, sizeof(uint16_t) * TR * d);
            uint16_t *db = aligned_alloc(64, sizeof(uint16_t) * TR * s.lmax);
            uint16_t *pb = aligned_alloc(64, sizeof(uint16_t) * TR * s.lmax);
            int ok = sc != NULL && dp != NULL && acc != NULL && qb != NULL && gb != NULL &&
                     db != NULL && pb != NULL;
            if (!ok) {
#pragma omp atomic write
                failed = 1;
            }
            if (ok) amx_configure();
            for (int64_t e = 0; e < n_ex; e++) {
                int64_t start = starts[e], len = starts[e + 1] - start, lp = round_up(len, TC);
                int64_t at = s.pad_at[e] * d, blocks = round_up(len, TR) / TR;
                /* 0. ds^T and p^T zero, where step 1 writes only the pairs that attend */
#pragma omp for schedule(static)
                for (int64_t row = 0; row < h_count * lp; row++) {
                    int64_t h = row / lp, j = row % lp;
                    memset(dst + (h * s.lmax + j) * s.lmax, 0, sizeof(uint16_t) * lp);
                    memset(pt + (h * s.lmax + j) * s.lmax, 0, sizeof(uint16_t) * lp);
                }
                /* 1. each block of 16 queries of each head: dq, and ds^T, p^T for step 2 */
#pragma omp for schedule(dynamic, 1)
                for (int64_t task = 0; task < h_count * blocks; task++) {
                    if (!ok) continue;
                    int64_t h = task / blocks, i0 = task % blocks * TR, g = h / s.per;
                    int64_t rows = len - i0 < TR ? len - i0 : TR, lo, hi;
                    key_range(&s, i0, rows, &lo, &hi);
                    int64_t c_lo = lo / TC * TC, c_hi = round_up(hi + 1, TC);
                    load_rows(qb, q + (h * t_count + start + i0) * d, d, rows, d);
                    load_rows(gb, go + ((start + i0) * h_count + h) * d, h_count * d, rows, d);
                    scores(&s, qb, kt + g * s.tpad * d + at, lo, hi, sc, s.lmax);
                    scores(&s, gb, vt + g * s.tpad * d + at, lo, hi, dp, s.lmax);
                    for (int64_t r = 0; r < TR; r++) {
                        uint16_t *drow = db + r * s.lmax, *pbrow = pb + r * s.lmax;
                        memset(drow + c_lo, 0, sizeof(uint16_t) * (c_hi - c_lo));
                        memset(pbrow + c_lo, 0, sizeof(uint16_t) * (c_hi - c_lo));
                        int64_t i = i0 + r, j_lo, j_hi;
                        if (r >= rows) continue;
                        row_keys(&s, i, &j_lo, &j_hi);
                        float *prow = sc + r * s.lmax, *dprow = dp + r * s.lmax;
                        weights(&s, prow, i, lse[h * t_count + start + i]);
                        f32v sums = broadcast_v(0.0f);
                        for (int64_t j = j_lo; j < j_hi; j += 16)
                            sums += load_f32v(prow + j) * load_f32v(dprow + j);
                        f32v inner = broadcast_v(sum_lanes(sums)), sv = broadcast_v(scale);
                        for (int64_t j = j_lo; j < j_hi; j += 16) {
                            f32v pj = load_f32v(prow + j);
                            store_bf16v(drow + j, pj * (load_f32v(dprow + j) - inner) * sv);
                            store_bf16v(pbrow + j, pj);
                        }
                    }
                    uint16_t *dsh = dst + h * s.lmax * s.lmax, *pth = pt + h * s.lmax * s.lmax;
                    transpose_rows(db, s.lmax, c_lo, c_hi, dsh + i0);
                    transpose_rows(pb, s.lmax, c_lo, c_hi, pth + i0);
                    mm16(db, s.lmax, c_lo / TC, c_hi / TC, kp + g * s.tpad * d + at, lp / TC, 0,
                         d / TR, acc, d, 0);
                    for (int64_t r = 0; r < rows; r++)
                        for (int64_t x = 0; x < d; x += 16)
                            store_bf16v(dq + (h * t_count + start + i0 + r) * d + x,
                                        load_f32v(acc + r * d + x));
                }
                /* 2. each block of 16 keys of each kv head: dk and dv over its query heads */
#pragma omp for schedule(dynamic, 1)
                for (int64_t task = 0; task < kv_count * blocks; task++) {
                    if (!ok) continue;
                    int64_t g = task / blocks, j0 = task % blocks * TR;
                    int64_t rows = len - j0 < TR ? len - j0 : TR;
                    int64_t last = s.window > 0 && j0 + TR - 1 + s.window - 1 < len - 1
                                       ? j0 + TR - 1 + s.window - 1 : len - 1;
                    int64_t c_lo = j0 / TC, c_hi = last / TC + 1;
                    float *ak = acc, *av = acc + TR * d;
                    for (int64_t h = g * s.per; h < (g + 1) * s.per; h++) {
                        int more = h > g * s.per;
                        const uint16_t *qh = qp + h * s.tpad * d + at;
                        const uint16_t *gh = gp + h * s.tpad * d + at;
                        mm16(dst + (h * s.lmax + j0) * s.lmax, s.lmax, c_lo, c_hi, qh, lp / TC,
                             0, d / TR, ak, d, more);
                        mm16(pt + (h * s.lmax + j0) * s.lmax, s.lmax, c_lo, c_hi, gh, lp / TC, 0,
                             d / TR, av, d, more);
                    }
                    for (int64_t r = 0; r < rows; r++)
                        for (int64_t x = 0; x < d; x += 16) {
                            int64_t row = (g * t_count + start + j0 + r) * d + x;
                            store_bf16v(dk + row, load_f32v(ak + r * d + x));
                            store_bf16v(dv + row, load_f32v(av + r * d + x));
                        }
                }
            }
            if (ok) _tile_release();
            free(sc);
            free(dp);
            free(acc);
            free(qb);
            free(gb);
            free(db);
            free(pb);
        }
    }
    free(kt);
    free(vt);
    free(kp);
    free(qp);
    free(gp);
    free(dst);
    free(pt);
    free(s.pad_at);
    return failed ? -1 : 0;
}

int tunery_tiles_attention_supported(void) { return amx_permitted(); }
#else
int tunery_tiles_attention(void) { return -1; }
int tunery_tiles_attention_backward(void) { return -1; }
int tunery_tiles_attention_supported(void) { return 0; }
#endif
