/* `tiles.c`'s bf16 linear layer y = x W^T, reading W as the GGUF file's block-quantized codes
 * (int8 values with a scale, and for Q4_K an offset, per block of 16 or 32 inputs) instead of
 * its bf16 copy: ~1.1-1.25 bytes a weight instead of 2, for a decode step that streams W.
 *
 * Each 16 x 32 tile of W is made back into bf16 (`dequantize`: scale * code - offset in fp32,
 * rounded to nearest even) in the cores, then multiplied as `tiles.c` does, same tiles, same
 * order of sums. Where those bf16 values are W's own (the caller checks every one of them
 * against the model's tensor when it packs, `gguf_blocks`), a row gets exactly `tiles_linear`'s
 * bits, and so the same alone as in any batch.
 *
 * A packed tile is a record (`blocks.h`: codes, scales, offsets); records are in the order the
 * tiles are read (`tiles_pack`'s).
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
#define TILE (TILE_OUT * TILE_IN)
#define MAX_ROWS 1024
#define AHEAD 16384 /* bytes of records prefetched ahead of each stream */

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
/* rows r0 .. r_hi of y, output tiles o (and o + 1 where `two`), from the sums c[g][m] */
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

/* Output tiles o (and o + 1 where `two`) for every row of xp (groups x 16 rows, zero-padded):
 * the first pass makes the tiles of records r0 (and r1) back into bf16 in `strip` (chunks x 2
 * tiles), later passes read them there. */
static void output_tiles(int64_t rows, int groups, int64_t in, const uint16_t *xp,
                         const uint8_t *r0, int sets, int offsets, int two, int64_t o,
                         int64_t out, uint16_t *strip, uint16_t *y) {
    int64_t chunks = in / TILE_IN, rec = tunery_qtiles_record(sets, offsets);
    const uint8_t *r1 = r0 + chunks * rec;
    float c[2][2][16][16] __attribute__((aligned(64)));
    for (int g0 = 0; g0 < groups; g0 += 2) {
        int both = groups - g0 > 1;
        const uint16_t *x0 = xp + g0 * 16 * in, *x1 = x0 + 16 * in;
        amx_zero_sums();
        if (g0 == 0) { /* chunk 0 made ahead; each step makes the next while this one multiplies */
            dequantize(r0, sets, offsets, strip);
            if (two) dequantize(r1, sets, offsets, strip + TILE);
        }
        for (int64_t q = 0; q < chunks; q++) {
            uint16_t *b0 = strip + q * 2 * TILE, *b1 = b0 + TILE;
            if (g0 == 0 && q + 1 < chunks) {
                const char *ahead = (const char *)(r0 + q * rec) + AHEAD;
                for (int l = 0; l < rec / 64; l++) _mm_prefetch(ahead + l * 64, _MM_HINT_T0);
                for (int l = 0; two && l < rec / 64; l++)
                    _mm_prefetch(ahead + chunks * rec + l * 64, _MM_HINT_T0);
                dequantize(r0 + (q + 1) * rec, sets, offsets, b0 + 2 * TILE);
                if (two) dequantize(r1 + (q + 1) * rec, sets, offsets, b1 + 2 * TILE);
            }
            _tile_loadd(4, b0, 64);
            _tile_loadd(6, x0 + q * TILE_IN, in * 2);
            _tile_dpbf16ps(0, 6, 4);
            if (two) {
                _tile_loadd(5, b1, 64);
                _tile_dpbf16ps(1, 6, 5);
            }
            if (both) {
                _tile_loadd(7, x1 + q * TILE_IN, in * 2);
                _tile_dpbf16ps(2, 7, 4);
                if (two) _tile_dpbf16ps(3, 7, 5);
            }
        }
        _tile_stored(0, c[0][0], 64);
        if (two) _tile_stored(1, c[0][1], 64);
        if (both) _tile_stored(2, c[1][0], 64);
        if (both && two) _tile_stored(3, c[1][1], 64);
        int64_t lo = (int64_t)g0 * 16, hi = rows < lo + 32 ? rows : lo + 32;
        store_rows(c, lo, hi, two, o, out, y);
    }
}
#endif

/* y (rows x out, bf16) = x (rows x in, bf16) W^T for W packed by `tunery_qtiles_pack` with
 * `sets` scale sets and (`offsets`) offsets. Returns 0; -1 where it does not run (no tiles,
 * more than MAX_ROWS rows, shapes) or out of memory. */
int tunery_qtiles_linear(int64_t rows, int64_t in, int64_t out, const uint16_t *x,
                         const uint8_t *wp, int64_t sets, int64_t offsets, uint16_t *y,
                         int threads) {
#if AMX
    if (!amx_permitted() || rows < 1 || rows > MAX_ROWS || in % TILE_IN || out % TILE_OUT ||
        (sets != 1 && sets != 2))
        return -1;
    int groups = (int)((rows + 15) / 16);
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
    int64_t strip_bytes = sizeof(uint16_t) * chunks * 2 * TILE;
    int64_t chunk = chunks * tunery_qtiles_record(sets, offsets);
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        int t = 0, count = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), count = omp_get_num_threads();
#endif
        uint16_t *strip = aligned_alloc(64, strip_bytes);
        if (strip == NULL) {
            failed = 1;
        } else {
            amx_configure();
            for (int64_t pr = pairs * t / count; pr < pairs * (t + 1) / count; pr++) {
                int64_t o = 2 * pr;
                output_tiles(rows, groups, in, xp, wp + o * chunk, (int)sets, offsets != 0,
                             o + 1 < tiles, o, out, strip, y);
            }
            _tile_release();
            free(strip);
        }
    }
    free(padded);
    return failed ? -1 : 0;
#else
    (void)rows, (void)in, (void)out, (void)x, (void)wp, (void)sets, (void)offsets, (void)y;
    (void)threads;
    return -1;
#endif
}
