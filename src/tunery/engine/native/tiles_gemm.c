/* A bf16 matmul y = x W^T for a training step's many rows, by AMX tiles, W packed by
 * `tunery_tiles_pack` (`tiles.c`: 16 outputs x 32 inputs a tile, in input pairs).
 *
 * `tiles.c`'s linear streams W once past all the rows, which suits a few rows. With hundreds, W
 * is read once per block of rows instead, and what counts is keeping both operands near the
 * tiles: a thread takes its share of the output tiles in blocks whose W (at most W_BLOCK bytes)
 * stays in L2, and within a block goes row pair by row pair, the 32 rows of x in L1 while the
 * block's output tile pairs are multiplied against them: four sums (two row groups x two output
 * tiles) over all of x's inputs in tiles 0-3, one tile load per product.
 *
 * A pair's sums leave the tiles as fp32 and are rounded to bf16 into y while the next pair's
 * products run (its conversion interleaved with their loop), not after them: on an AMX Xeon,
 * Gemma 3 270M's training shapes at 512-1024 rows ran at 2.4-2.8 TFLOP/s (2 threads) with the
 * conversion after each pair and 2.6-3.5 with it interleaved; oneDNN's packed matmul 1.4-3.2.
 *
 * Each output's sum runs over the inputs in chunks of 32 in order, as in `tiles.c`: a row gets
 * the same bits as there, whatever the other rows and the thread count.
 *
 * A second product may join the same sums: y = x W^T + x2 W2^T, x2's inputs after x's (a LoRA's
 * delta: s (x A^T) B^T with x2 = x A^T and W2 = s B; in the backward g W + s (g B) A). Then y
 * is written once, where adding the delta after read and wrote all of it again (Gemma 3 270M's
 * gate and up at 832 rows: 0.38 ms each a layer). The sums are those of one product over x and
 * x2 side by side, bit for bit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "amx.h"

#define TILE_OUT 16        /* outputs per tile */
#define TILE_IN 32         /* inputs per tile */
#define TILE (TILE_OUT * TILE_IN)
#define PAIR_ROWS 32       /* rows of a pass: two groups of 16 */
#define W_BLOCK (1 << 20)  /* bytes of W a thread keeps in L2 while every row pair reads it */

#if AMX
/* Rows [lo, hi) of a pair's sums c (four 16 x 16 fp32 tiles: group g's output tiles at c +
 * (2g + m) 256) rounded to bf16 into y's rows r0 + lo .. and output tiles o, o + 1; rows at or
 * past `valid` (a last, partial pair's) are not written. */
static inline void store_rows(const float *c, int lo, int hi, int valid, int64_t r0, int64_t o,
                              int64_t out, uint16_t *y) {
    if (hi > valid) hi = valid;
    for (int r = lo; r < hi; r++) {
        const float *a = c + ((r / 16) * 2 * 16 + r % 16) * 16;
        __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(a + 256), _mm512_load_ps(a));
        _mm512_storeu_si512(y + (r0 + r) * out + o * TILE_OUT, v);
    }
}

/* A pair's rows whose sums wait in a buffer to be stored into y. */
typedef struct {
    const float *c;
    int done, valid;
    int64_t r0, o;
} pending_t;

/* Tiles 0-3 += x's 32 rows at x0 (rows `in` apart) times output tiles o and o + 1 (their packed
 * W at b0, b1), the pending pair's rows stored meanwhile, `per` rows a chunk of inputs. */
static inline __attribute__((always_inline)) void pair_products(int64_t in, const uint16_t *x0,
                                                                const uint16_t *b0,
                                                                const uint16_t *b1,
                                                                pending_t *wait, int per,
                                                                int64_t out, uint16_t *y) {
    int64_t chunks = in / TILE_IN;
    const uint16_t *x1 = x0 + 16 * in;
    for (int64_t q = 0; q < chunks; q++) {
        amx_pair_products(1, 1, x0 + q * TILE_IN, x1 + q * TILE_IN, in * 2, b0 + q * TILE,
                          b1 + q * TILE);
        if (wait->c != NULL && wait->done < PAIR_ROWS) {
            int hi = wait->done + per;
            store_rows(wait->c, wait->done, hi, wait->valid, wait->r0, wait->o, out, y);
            wait->done = hi;
        }
    }
    if (wait->c != NULL) {
        store_rows(wait->c, wait->done, PAIR_ROWS, wait->valid, wait->r0, wait->o, out, y);
        wait->done = PAIR_ROWS;
    }
}

/* A last pair of x's rows (rows x in) fewer than 32: copied, with zero rows after; NULL where
 * there is none (or no x), or out of memory (*failed set). */
static uint16_t *padded_tail(int64_t rows, int64_t in, const uint16_t *x, int *failed) {
    int64_t full = rows / PAIR_ROWS * PAIR_ROWS, left = rows - full;
    if (left == 0 || x == NULL) return NULL;
    uint16_t *tail = calloc((size_t)PAIR_ROWS * in, sizeof(uint16_t));
    if (tail == NULL) *failed = 1;
    else memcpy(tail, x + full * in, sizeof(uint16_t) * left * in);
    return tail;
}
#endif

/* y (rows x out, bf16) = x (rows x in, bf16, contiguous) W^T + x2 (rows x in2, contiguous) W2^T
 * for W and W2 packed by `tunery_tiles_pack` (in2 = 0: no second product); in and in2 multiples
 * of 32, out of 32. Returns 0; -1 where it does not run (no tiles, the shapes) or out of memory. */
int tunery_tiles_gemm(int64_t rows, int64_t in, int64_t out, const uint16_t *x,
                      const uint16_t *wp, int64_t in2, const uint16_t *x2, const uint16_t *wp2,
                      uint16_t *y, int threads) {
#if AMX
    if (!amx_permitted() || rows < 1 || in % TILE_IN || in2 % TILE_IN || in2 < 0 ||
        out % (2 * TILE_OUT))
        return -1;
    int64_t chunks = in / TILE_IN, chunks2 = in2 / TILE_IN, pairs = out / (2 * TILE_OUT);
    int64_t full = rows / PAIR_ROWS * PAIR_ROWS;
    int failed = 0;
    uint16_t *tail = padded_tail(rows, in, x, &failed);
    uint16_t *tail2 = in2 > 0 ? padded_tail(rows, in2, x2, &failed) : NULL;
    if (failed) {
        free(tail);
        free(tail2);
        return -1;
    }
    int64_t block = W_BLOCK / (in * 2 * 2 * TILE_OUT); /* output tile pairs of a W block */
    if (block < 1) block = 1;
    int per = (int)((PAIR_ROWS + chunks - 1) / chunks);
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        int t = 0, count = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), count = omp_get_num_threads();
#endif
        float sums[2][4 * TILE_OUT * TILE_OUT] __attribute__((aligned(64)));
        int next = 0;
        pending_t wait = {NULL, 0, 0, 0, 0};
        amx_configure();
        int64_t lo = pairs * t / count, hi = pairs * (t + 1) / count;
        for (int64_t b = lo; b < hi; b += block) {
            int64_t end = b + block < hi ? b + block : hi;
            for (int64_t r0 = 0; r0 < rows; r0 += PAIR_ROWS) {
                const uint16_t *x0 = r0 < full ? x + r0 * in : tail;
                const uint16_t *x20 = in2 == 0 ? NULL : r0 < full ? x2 + r0 * in2 : tail2;
                for (int64_t p = b; p < end; p++) {
                    const uint16_t *b0 = wp + 2 * p * chunks * TILE, *b1 = b0 + chunks * TILE;
                    amx_zero_sums();
                    pair_products(in, x0, b0, b1, &wait, per, out, y);
                    if (in2 > 0) {
                        const uint16_t *c0 = wp2 + 2 * p * chunks2 * TILE;
                        pair_products(in2, x20, c0, c0 + chunks2 * TILE, &wait, per, out, y);
                    }
                    float *c = sums[next];
                    _tile_stored(0, c, 64);
                    _tile_stored(1, c + 256, 64);
                    _tile_stored(2, c + 512, 64);
                    _tile_stored(3, c + 768, 64);
                    int valid = rows - r0 < PAIR_ROWS ? (int)(rows - r0) : PAIR_ROWS;
                    wait = (pending_t){c, 0, valid, r0, 2 * p};
                    next ^= 1;
                }
            }
        }
        if (wait.c != NULL) store_rows(wait.c, 0, PAIR_ROWS, wait.valid, wait.r0, wait.o, out, y);
        _tile_release();
    }
    free(tail);
    free(tail2);
    return 0;
#else
    (void)rows, (void)in, (void)out, (void)x, (void)wp, (void)in2, (void)x2, (void)wp2, (void)y;
    (void)threads;
    return -1;
#endif
}
