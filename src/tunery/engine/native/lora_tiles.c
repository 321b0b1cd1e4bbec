/* The long-sum products of a LoRA training step's gradients, c = scale u^T g, by AMX tiles.
 *
 * With the step's rows n in the hundreds, a LoRA's weight gradients sum over the rows: grad_b =
 * g^T u and grad_a = gu^T x are (wide x rank) or (rank x wide) products whose inner dimension is
 * n. oneDNN's bf16 matmul, whose kernels are made for a long output, takes them at 7-15 GB/s of
 * g on 2 cores (Gemma 3 270M's gate and up at 832 rows: 240-450 us for [16, 832] x [832, 2048]).
 * Here each thread takes a share of g's column pairs, and walks the rows in blocks of BLOCK
 * chunks of 32: for each of its column pairs in turn, the pair's sums come into tiles 0-3 (r / 16
 * x 2 of them), and for every 32 rows g's two 64-byte segments per row pair are interleaved into
 * two B tiles (rows of (g[2p][c], g[2p + 1][c]) pairs) in L1 and meet u's columns, transposed
 * once per call into A tiles. So g is read once, each row left to right within a block (the same
 * shape measured 183 us, about what reading g from L3 costs here: ~18 GB/s).
 *
 * u (n x r) and g (n x m) are bf16 with rows ldu and ldg values apart, r 16 or 32, m a multiple
 * of 32; c is r x m fp32 (rows m apart). The sums run over the rows in chunks of 32 in order: the
 * same bits whatever the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "amx.h"

#define CHUNK 32 /* rows of g (and of u) a tile product sums over */
#define BLOCK 8  /* chunks of rows a column pair's sums take in the tiles at a time */

#if AMX
/* Lanes i of the low and high halves of a 512-bit value (a's 16 values, then b's) as pairs:
 * (a[i], b[i]) in 32-bit lane i. */
static inline __m512i pairs_of(__m256i a, __m256i b) {
    __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                          24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                          16, 0);
    return _mm512_permutexvar_epi16(interleave,
                                    _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

/* u's 16 columns from 16t, rows 32q .. 32q + 31 (zero from n on), as an A tile at `at`: row i is
 * column 16t + i's 32 values. Each row pair makes one register of the 16 columns' pairs; 16 such
 * registers, transposed, are the 16 columns' rows. */
static void pack_u(const uint16_t *u, int64_t ldu, int64_t n, int64_t q, int64_t t,
                   uint16_t *at) {
    __m512i w[16];
    for (int p = 0; p < 16; p++) {
        int64_t i = q * CHUNK + 2 * p;
        __m256i a = i < n ? _mm256_loadu_si256((const __m256i *)(u + i * ldu + 16 * t))
                          : _mm256_setzero_si256();
        __m256i b = i + 1 < n ? _mm256_loadu_si256((const __m256i *)(u + (i + 1) * ldu + 16 * t))
                              : _mm256_setzero_si256();
        w[p] = pairs_of(a, b);
    }
    transpose16(w);
    for (int i = 0; i < 16; i++) _mm512_store_si512(at + i * CHUNK, w[i]);
}

/* g's 32 columns from c0, rows 32q .. 32q + 31 (zero from n on), as two B tiles at bt (columns
 * c0 .. c0 + 15) and bt + 512 (the next 16): row p holds the pairs (g[32q + 2p][c],
 * g[32q + 2p + 1][c]). */
static inline void pack_g(const uint16_t *g, int64_t ldg, int64_t n, int64_t q, int64_t c0,
                          uint16_t *bt) {
    __m512i lo_index = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                        40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                        32, 0);
    __m512i hi_index = _mm512_add_epi16(lo_index, _mm512_set1_epi16(16));
    for (int p = 0; p < 16; p++) {
        int64_t i = q * CHUNK + 2 * p;
        __m512i a = i < n ? _mm512_loadu_si512(g + i * ldg + c0) : _mm512_setzero_si512();
        __m512i b = i + 1 < n ? _mm512_loadu_si512(g + (i + 1) * ldg + c0) : _mm512_setzero_si512();
        _mm512_store_si512(bt + p * CHUNK, _mm512_permutex2var_epi16(a, lo_index, b));
        _mm512_store_si512(bt + 512 + p * CHUNK, _mm512_permutex2var_epi16(a, hi_index, b));
    }
}

/* A tile of sums (16 x 16: ranks k0.., columns j0..) times scale into c: c[k][j] (r x m), or
 * c[j][k] (m x r) where `transposed` (each column's ranks a row: a LoRA B's gradient as laid
 * out, with no copy after). */
static void put_tile(const float *t, float scale, int64_t k0, int64_t j0, int64_t r, int64_t m,
                     int transposed, float *c) {
    __m512 s = _mm512_set1_ps(scale);
    if (!transposed) {
        for (int i = 0; i < 16; i++)
            _mm512_storeu_ps(c + (k0 + i) * m + j0, _mm512_mul_ps(s, _mm512_load_ps(t + 16 * i)));
        return;
    }
    __m512i w[16];
    for (int i = 0; i < 16; i++) w[i] = (__m512i)_mm512_mul_ps(s, _mm512_load_ps(t + 16 * i));
    transpose16(w);
    for (int j = 0; j < 16; j++) _mm512_storeu_ps(c + (j0 + j) * r + k0, (__m512)w[j]);
}
#endif

/* c (r x m, fp32; m x r where `transposed`) = scale * u^T g (see the top). Returns 0; -1 where it does not run (no tiles,
 * the shapes) or out of memory. */
int tunery_lora_tiles_tn(int64_t n, int64_t r, int64_t m, const uint16_t *u, int64_t ldu,
                         const uint16_t *g, int64_t ldg, float scale, int transposed, float *c,
                         int threads) {
#if AMX
    if (!amx_permitted() || (r != 16 && r != 32) || m % 32 || m < 32 || n < 0) return -1;
    if (n == 0) {
        memset(c, 0, sizeof(float) * r * m);
        return 0;
    }
    int64_t chunks = (n + CHUNK - 1) / CHUNK, ranks = r / 16, pairs = m / 32;
    uint16_t *at = aligned_alloc(64, sizeof(uint16_t) * ranks * chunks * 16 * CHUNK);
    if (at == NULL) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < ranks * chunks; k++)
            pack_u(u, ldu, n, k % chunks, k / chunks, at + k * 16 * CHUNK);
        uint16_t bt[2][2 * 16 * CHUNK] __attribute__((aligned(64)));
        int t = 0, count = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), count = omp_get_num_threads();
#endif
        int64_t lo = pairs * t / count, hi = pairs * (t + 1) / count;
        /* this thread's sums: column pair cp's tiles (2t + h: ranks 16t.., columns 32cp +
         * 16h..) at sums + (cp - lo) * 4 * 256 */
        float *sums = aligned_alloc(64, sizeof(float) * (hi > lo ? hi - lo : 1) * 4 * 256);
        if (sums == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            amx_configure();
            for (int64_t q0 = 0; q0 < chunks; q0 += BLOCK) {
                int64_t q1 = q0 + BLOCK < chunks ? q0 + BLOCK : chunks;
                for (int64_t cp = lo; cp < hi; cp++) {
                    float *own = sums + (cp - lo) * 4 * 256;
                    if (q0 == 0) amx_zero_sums();
                    else amx_load_sums(2 * ranks, own, 256, 64);
                    for (int64_t q = q0; q < q1; q++) {
                        uint16_t *b = bt[q & 1];
                        pack_g(g, ldg, n, q, cp * 32, b);
                        const uint16_t *a0 = at + q * 16 * CHUNK, *a1 = a0 + chunks * 16 * CHUNK;
                        amx_pair_products(ranks == 2, 1, a0, a1, 64, b, b + 512);
                    }
                    amx_store_sums(2 * ranks, own, 256, 64);
                }
            }
            for (int64_t cp = lo; cp < hi; cp++)
                for (int64_t k = 0; k < ranks; k++)
                    for (int h = 0; h < 2; h++)
                        put_tile(sums + ((cp - lo) * 4 + 2 * k + h) * 256, scale, 16 * k,
                                 cp * 32 + 16 * h, r, m, transposed, c);
            _tile_release();
            free(sums);
        }
    }
    free(at);
    return failed ? -1 : 0;
#else
    (void)n, (void)r, (void)m, (void)u, (void)ldu, (void)g, (void)ldg, (void)scale, (void)c;
    (void)transposed, (void)threads;
    return -1;
#endif
}
