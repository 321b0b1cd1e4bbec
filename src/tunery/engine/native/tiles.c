/* A bf16 linear layer y = x W^T for a few rows (decode steps, a prompt's blocks, a small training
 * step) by AMX tiles, W read once from a copy packed for them.
 *
 * With few rows, a matmul is a stream of W through the cores, so what counts is reading W at the
 * memory's rate. A tile product C += A B takes B = 16 outputs x 32 inputs of W, laid out in input
 * pairs (`tunery_tiles_pack`: each tile's 1 KB contiguous, the tiles in the order they are read),
 * and A = 16 rows of x; two output tiles go at once, so four sums are in flight. Up to 1024 rows
 * (row groups of 16, two a pass, each pass after the first reading W's tiles from cache): the
 * whole-step kernel sends a batch of prompts' rows in one call, W read from memory once.
 *
 * Each output's sum runs over the inputs in chunks of 32 in order, the same for any number of
 * rows (up to MAX_ROWS) and any thread count: a row gets the same bits alone as among others.
 * On an AMX Xeon these are oneDNN's bits up to 32 rows (which it computes the same way, measured
 * on Gemma 3 270M's shapes), at 0.78-0.84x its time for 1-46 rows.
 *
 * W may instead be the GGUF file's blocks (`tunery_qtiles_pack`: int8 codes with a scale, and
 * for Q4_K an offset, per block of 16 or 32 inputs; `blocks.h`'s records, in the order the tiles
 * are read): ~1.1-1.25 bytes a weight instead of 2, for a decode step that streams W. Each tile
 * is made back into bf16 in the cores (`dequantize`: scale * code - offset in fp32, rounded to
 * nearest even) by the first pass, which later passes read, then multiplied the same way. Where
 * those bf16 values are W's own (the caller checks every one against the model's tensor when it
 * packs, `gguf_blocks`), a row gets exactly the bits of the bf16 pack.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "amx.h"
#include "blocks.h"

#define TILE_OUT 16  /* outputs per tile */
#define TILE_IN 32   /* inputs per tile */
#define MAX_ROWS 1024 /* row groups of 16, two a pass */
#define TILE (TILE_OUT * TILE_IN)
#define AHEAD 32768  /* bytes of W prefetched ahead of each stream of tiles (bf16) */
#define AHEAD_BLOCKS 16384 /* ... of records */

/* W (out x in, bf16, contiguous) → wp: for output tile o and input chunk q, the 16 x 32 tile as
 * 16 input pairs p, each with the 16 outputs' pair (W[16o + n][32q + 2p], W[..][32q + 2p + 1]).
 * out a multiple of 16, in of 32. */
void tunery_tiles_pack(int64_t out, int64_t in, const uint16_t *w, uint16_t *wp) {
    int64_t chunks = in / TILE_IN;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out / TILE_OUT; o++)
        for (int64_t q = 0; q < chunks; q++) {
            uint16_t *t = wp + (o * chunks + q) * TILE_OUT * TILE_IN;
            for (int n = 0; n < TILE_OUT; n++) {
                const uint16_t *row = w + (TILE_OUT * o + n) * in + TILE_IN * q;
                for (int p = 0; p < TILE_IN / 2; p++) {
                    t[p * 2 * TILE_OUT + 2 * n] = row[2 * p];
                    t[p * 2 * TILE_OUT + 2 * n + 1] = row[2 * p + 1];
                }
            }
        }
}

/* Bytes of one tile's record (`blocks.h`). */
int64_t tunery_qtiles_record(int64_t sets, int64_t offsets) { return blocks_record(sets, offsets); }

/* q (out x in int8), scale (out x in / block fp32), offset (as scale, or NULL) → wp, records of
 * `tunery_qtiles_record(32 / block, offset != NULL)` bytes. block 16 or 32; out a multiple of 16,
 * in of 32; wp 64-byte aligned. */
void tunery_qtiles_pack(int64_t out, int64_t in, const int8_t *q, const float *scale,
                        int64_t block, const float *offset, uint8_t *wp) {
    int64_t sets = TILE_IN / block, chunks = in / TILE_IN, per_row = in / block;
    int64_t rec = tunery_qtiles_record(sets, offset != NULL);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out / TILE_OUT; o++)
        for (int64_t c = 0; c < chunks; c++) {
            uint8_t *r = wp + (o * chunks + c) * rec;
            int8_t *codes = (int8_t *)r;
            float *sc = (float *)(r + TILE), *of = sc + TILE_OUT * sets;
            for (int n = 0; n < TILE_OUT; n++) {
                int64_t row = TILE_OUT * o + n;
                const int8_t *src = q + row * in + TILE_IN * c;
                for (int p = 0; p < TILE_IN / 2; p++) {
                    codes[p * 2 * TILE_OUT + 2 * n] = src[2 * p];
                    codes[p * 2 * TILE_OUT + 2 * n + 1] = src[2 * p + 1];
                }
                for (int64_t s = 0; s < sets; s++) {
                    sc[s * TILE_OUT + n] = scale[row * per_row + c * sets + s];
                    if (offset != NULL) of[s * TILE_OUT + n] = offset[row * per_row + c * sets + s];
                }
            }
        }
}

#if AMX
/* rows r0 .. r_hi of y, output tiles o (and o + 1 where `two`), from the sums c[g][m] of group g
 * (0-1) and output tile m (0-1), rounded to bf16 */
static void store_rows(float c[2][2][16][16], int64_t r0, int64_t r_hi, int two, int64_t o,
                       int64_t out, uint16_t *y) {
    for (int64_t r = r0; r < r_hi; r++) {
        int g = (int)((r - r0) / 16), i = (int)((r - r0) % 16);
        for (int m = 0; m <= two; m++) {
            __m256bh v = _mm512_cvtneps_pbh(_mm512_load_ps(c[g][m][i]));
            _mm256_storeu_si256((__m256i *)(y + r * out + (o + m) * TILE_OUT), (__m256i)v);
        }
    }
}

/* Output tiles o (and o + 1 where `two`) for every row of xp (groups x 16 rows, zero-padded).
 * B tiles: from the bf16 pack at w (rec 0), or made from the records at w (rec bytes each, in
 * `sets` and `offsets`) into `strip` (chunks x 2 tiles) by the first pass, each chunk's while the
 * one before multiplies, and read there by later passes. */
static inline __attribute__((always_inline)) void output_tiles(
    int64_t rows, int groups, int64_t in, const uint16_t *xp, const void *w, int64_t rec,
    int sets, int offsets, int two, int64_t o, int64_t out, uint16_t *strip, uint16_t *y) {
    int64_t chunks = in / TILE_IN;
    int64_t bytes = rec > 0 ? rec : 2 * TILE, ahead = rec > 0 ? AHEAD_BLOCKS : AHEAD;
    const char *w0 = w, *w1 = w0 + chunks * bytes; /* the two output tiles' streams */
    float c[2][2][16][16] __attribute__((aligned(64)));
    for (int g0 = 0; g0 < groups; g0 += 2) {
        int both = groups - g0 > 1;
        const uint16_t *x0 = xp + g0 * 16 * in, *x1 = x0 + 16 * in;
        amx_zero_sums();
        if (g0 == 0 && rec > 0) {
            dequantize((const uint8_t *)w0, sets, offsets, strip);
            if (two) dequantize((const uint8_t *)w1, sets, offsets, strip + TILE);
        }
        for (int64_t q = 0; q < chunks; q++) {
            const uint16_t *b0 = (const uint16_t *)(w0 + q * bytes), *b1 = b0 + chunks * TILE;
            if (rec > 0) b0 = strip + q * 2 * TILE, b1 = b0 + TILE;
            if (g0 == 0) { /* each stream's tile `ahead` bytes on, while this one is read */
                const char *next = w0 + q * bytes + ahead;
                for (int l = 0; l < bytes / 64; l++) _mm_prefetch(next + l * 64, _MM_HINT_T0);
                for (int l = 0; two && l < bytes / 64; l++)
                    _mm_prefetch(next + chunks * bytes + l * 64, _MM_HINT_T0);
                if (rec > 0 && q + 1 < chunks) {
                    dequantize((const uint8_t *)(w0 + (q + 1) * rec), sets, offsets, strip + (q + 1) * 2 * TILE);
                    if (two)
                        dequantize((const uint8_t *)(w1 + (q + 1) * rec), sets, offsets,
                                   strip + (q + 1) * 2 * TILE + TILE);
                }
            }
            amx_pair_products(both, two, x0 + q * TILE_IN, x1 + q * TILE_IN, in * 2, b0, b1);
        }
        _tile_stored(0, c[0][0], 64);
        if (two) _tile_stored(1, c[0][1], 64);
        if (both) _tile_stored(2, c[1][0], 64);
        if (both && two) _tile_stored(3, c[1][1], 64);
        int64_t r0 = (int64_t)g0 * 16, r_hi = rows < r0 + 32 ? rows : r0 + 32;
        store_rows(c, r0, r_hi, two, o, out, y);
    }
}
#endif

/* Whether `tunery_tiles_linear` runs here: the build's CPU and the kernel allow AMX tiles. */
int tunery_tiles_supported(void) {
#if AMX
    return amx_permitted();
#else
    return 0;
#endif
}

/* y (rows x out, bf16) = x (rows x in, bf16, contiguous) W^T for W the bf16 pack (rec 0) or
 * records of rec bytes, `sets` and `offsets` (see `output_tiles`). */
static int linear(int64_t rows, int64_t in, int64_t out, const uint16_t *x, const void *w,
                  int64_t rec, int64_t sets, int64_t offsets, uint16_t *y, int threads) {
#if AMX
    if (!amx_permitted() || rows < 1 || rows > MAX_ROWS || in % TILE_IN || out % TILE_OUT)
        return -1;
    int groups = (int)((rows + 15) / 16);
    /* x padded with zero rows to whole groups of 16; read in place when it has them */
    uint16_t *padded = NULL;
    const uint16_t *xp = x;
    if (rows % 16) {
        padded = aligned_alloc(64, sizeof(uint16_t) * groups * 16 * in);
        if (padded == NULL) return -1;
        memcpy(padded, x, sizeof(uint16_t) * rows * in);
        memset(padded + rows * in, 0, sizeof(uint16_t) * (groups * 16 - rows) * in);
        xp = padded;
    }
    int64_t tiles = out / TILE_OUT, pairs = (tiles + 1) / 2, chunks = in / TILE_IN;
    int64_t stream = chunks * (rec > 0 ? rec : 2 * TILE); /* bytes of an output tile's W */
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        int t = 0, count = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), count = omp_get_num_threads();
#endif
        uint16_t *strip = rec > 0 ? aligned_alloc(64, sizeof(uint16_t) * chunks * 2 * TILE) : NULL;
        if (rec > 0 && strip == NULL) {
            failed = 1;
        } else {
            amx_configure();
            for (int64_t pr = pairs * t / count; pr < pairs * (t + 1) / count; pr++) {
                int64_t o = 2 * pr;
                const char *wo = (const char *)w + o * stream;
                if (rec == 0) /* the bf16 pack's loop compiled on its own */
                    output_tiles(rows, groups, in, xp, wo, 0, 0, 0, o + 1 < tiles, o, out, NULL, y);
                else
                    output_tiles(rows, groups, in, xp, wo, rec, (int)sets, offsets != 0,
                                 o + 1 < tiles, o, out, strip, y);
            }
            _tile_release();
            free(strip);
        }
    }
    free(padded);
    return failed ? -1 : 0;
#else
    (void)rows, (void)in, (void)out, (void)x, (void)w, (void)rec, (void)sets, (void)offsets;
    (void)y, (void)threads;
    return -1;
#endif
}

/* y (rows x out, bf16) = x (rows x in, bf16, contiguous) W^T for W packed by `tunery_tiles_pack`.
 * Returns 0; -1 where it does not run (no tiles, more than MAX_ROWS rows, shapes) or out of
 * memory. */
int tunery_tiles_linear(int64_t rows, int64_t in, int64_t out, const uint16_t *x,
                        const uint16_t *wp, uint16_t *y, int threads) {
    return linear(rows, in, out, x, wp, 0, 0, 0, y, threads);
}

/* The same for W packed by `tunery_qtiles_pack` with `sets` scale sets (1 or 2) and (`offsets`)
 * offsets. */
int tunery_qtiles_linear(int64_t rows, int64_t in, int64_t out, const uint16_t *x,
                         const uint8_t *wp, int64_t sets, int64_t offsets, uint16_t *y,
                         int threads) {
    if (sets != 1 && sets != 2) return -1;
    return linear(rows, in, out, x, wp, blocks_record(sets, offsets), sets, offsets, y, threads);
}
