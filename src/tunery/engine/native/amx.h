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
#else
#define AMX 0
#endif

#endif
