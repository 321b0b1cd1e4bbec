/* GGUF blocks packed for AMX tiles (`tiles.c` packs them; `tiles.c` and `head_topk.c` read
 * them): a record per 16 x 32 tile of W (16 outputs, 32 inputs), its 512 int8 codes in the
 * tiles' input pairs, then `sets` x 16 fp32 scales (a set per 16 inputs, or one per 32), then as
 * many offsets where the format has them.
 */
#ifndef TUNERY_BLOCKS_H
#define TUNERY_BLOCKS_H

#include <stdint.h>

#include "amx.h"

#define BLOCKS_TILE 512 /* codes of a 16 x 32 tile */

/* Bytes of one tile's record: codes, scales, offsets. */
static inline int64_t blocks_record(int64_t sets, int64_t offsets) {
    return BLOCKS_TILE + 64 * sets * (1 + (offsets != 0));
}

#if AMX
/* A record's tile in bf16, in the tiles' layout (16 input pairs of 64 bytes): each value
 * scale * code (- offset) in fp32, rounded to nearest even. */
static inline void dequantize(const uint8_t *r, int sets, int offsets, uint16_t *tile) {
    const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    const float *sc = (const float *)(r + BLOCKS_TILE), *of = sc + 16 * sets;
    __m512 s[2][2], m[2][2]; /* [set][outputs 0-7 or 8-15], each output's twice (its pair) */
    for (int h = 0; h < sets; h++) {
        __m512 v = _mm512_loadu_ps(sc + 16 * h);
        s[h][0] = _mm512_permutexvar_ps(lo, v), s[h][1] = _mm512_permutexvar_ps(hi, v);
        if (offsets) {
            v = _mm512_loadu_ps(of + 16 * h);
            m[h][0] = _mm512_permutexvar_ps(lo, v), m[h][1] = _mm512_permutexvar_ps(hi, v);
        }
    }
    for (int p = 0; p < 16; p++) {
        int h = sets == 2 ? p / 8 : 0; /* pair p holds inputs 2p and 2p + 1 */
        const __m128i *codes = (const __m128i *)(r + p * 32);
        __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(codes)));
        __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(codes + 1)));
        f0 = _mm512_mul_ps(f0, s[h][0]), f1 = _mm512_mul_ps(f1, s[h][1]);
        if (offsets) f0 = _mm512_sub_ps(f0, m[h][0]), f1 = _mm512_sub_ps(f1, m[h][1]);
        _mm512_store_si512((__m512i *)(tile + p * 32), (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
    }
}

#endif

#endif
