/* AMX tiles for the kernels that use them (`head_loss.c`, `tiles.c`): whether the compiler
 * targets them (AMX), the kernel's permission, and one tile configuration for all their uses.
 */
#ifndef TUNERY_AMX_H
#define TUNERY_AMX_H

#include <stdint.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && \
    defined(__AVX512BF16__)
#define AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Whether this process may use AMX tiles: the kernel's permission, asked once (Linux >= 5.16;
 * oneDNN asks too). */
static inline int amx_permitted(void) {
    static int state = 0; /* 0 unknown, 1 yes, -1 no */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                    18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
    return state == 1;
}

/* This thread's tiles: all eight 16 rows of 64 bytes (16 fp32 sums, or 32 bf16 values). */
static inline void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((packed)) config = {0};
    config.palette = 1;
    for (int t = 0; t < 8; t++) config.colsb[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
}

/* Tiles 0-3 set to zero: the sums of a pass (two row groups by two output tiles). */
static inline void amx_zero_sums(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* Sums tiles 0 to n - 1 (n 1-4) += the A tile at a (rows lda bytes apart) times the B tiles at
 * b, b + step, b + 2 step, b + 3 step (bf16 values; 1 KB each, rows 64 bytes apart): one A load
 * for the n products. Uses tiles 4-7. */
static inline __attribute__((always_inline)) void amx_products(int64_t n, const void *a,
                                                               int64_t lda, const uint16_t *b,
                                                               int64_t step) {
    _tile_loadd(4, a, lda);
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (n > 1) {
        _tile_loadd(6, b + step, 64);
        _tile_dpbf16ps(1, 4, 6);
    }
    if (n > 2) {
        _tile_loadd(7, b + 2 * step, 64);
        _tile_dpbf16ps(2, 4, 7);
    }
    if (n > 3) {
        _tile_loadd(5, b + 3 * step, 64);
        _tile_dpbf16ps(3, 4, 5);
    }
}

/* Sums tile 2i + j += A_i B_j for the A tiles at a0, a1 (rows lda bytes apart; a1 read only
 * where `two_a`) and the B tiles at b0, b1 (1 KB each, rows 64 bytes apart; b1 only where
 * `two_b`): a 2 x 2 block of products, one tile load each. Uses tiles 4-7. */
static inline __attribute__((always_inline)) void amx_pair_products(int two_a, int two_b,
                                                                    const void *a0,
                                                                    const void *a1, int64_t lda,
                                                                    const uint16_t *b0,
                                                                    const uint16_t *b1) {
    _tile_loadd(4, a0, lda);
    _tile_loadd(6, b0, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (two_b) {
        _tile_loadd(7, b1, 64);
        _tile_dpbf16ps(1, 4, 7);
    }
    if (two_a) {
        _tile_loadd(5, a1, lda);
        _tile_dpbf16ps(2, 5, 6);
        if (two_b) _tile_dpbf16ps(3, 5, 7);
    }
}

/* Sums tiles 0 to n - 1 loaded from c, c + step, ... (fp32, rows ldc bytes apart). */
static inline __attribute__((always_inline)) void amx_load_sums(int64_t n, const float *c,
                                                                int64_t step, int64_t ldc) {
    _tile_loadd(0, c, ldc);
    if (n > 1) _tile_loadd(1, c + step, ldc);
    if (n > 2) _tile_loadd(2, c + 2 * step, ldc);
    if (n > 3) _tile_loadd(3, c + 3 * step, ldc);
}

/* Sums tiles 0 to n - 1 stored at c, c + step, ... (fp32, rows ldc bytes apart). */
static inline __attribute__((always_inline)) void amx_store_sums(int64_t n, float *c,
                                                                 int64_t step, int64_t ldc) {
    _tile_stored(0, c, ldc);
    if (n > 1) _tile_stored(1, c + step, ldc);
    if (n > 2) _tile_stored(2, c + 2 * step, ldc);
    if (n > 3) _tile_stored(3, c + 3 * step, ldc);
}

/* r[i][j] <-> r[j][i]: a 16 x 16 block of 32-bit values transposed in registers (64 shuffles,
 * where 16 scatters of 16 lanes each cost several times as long). */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; k++) {
            t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0xdd);
        }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
    }
}
#else
#define AMX 0
#endif

#endif
