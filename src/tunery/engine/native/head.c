/* The vocab head's best token for each row of a decode step, without the full matmul.
 *
 * A greedy step only needs the argmax of h.W^T over a 262k vocabulary, most of whose logits are
 * far from the top. So the head is read once as int8 (one scale per vocab row: half the bytes
 * of bf16, a quarter of fp32) and multiplied with each row quantized: to int8 by AVX512-VNNI
 * (twice the multiply-adds of bf16 per instruction), or where the CPU has only AVX2 to int16
 * by vpmaddwd on the weights widened in registers (as many multiply-adds per instruction as
 * AVX2's int8 vpmaddubsw + vpmaddwd pair, whose int16 sums would saturate with 8-bit rows and
 * leave bounds too loose with 7-bit ones: measured 4k-16k candidates a row on Gemma's states).
 * Each approximate logit comes with a bound on its error (Cauchy-Schwarz on the two
 * quantization errors, which are known: |e_h.w| <= |e_h| |w| and |q_h.e_w| <= |q_h| |e_w|), so
 * every token whose upper bound reaches the best lower bound is a candidate; only those get
 * their exact fp32 dot product of the row and the weights (both bf16, or both fp32). The answer
 * is the argmax of the exact logits (for bf16 weights rounded to bf16, as a bf16 head rounds
 * them), the first of equal ones as greedy decoding picks, over the whole vocabulary: no token
 * outside the candidates can beat or tie it.
 *
 * A row's answer depends only on that row and the weights (the candidate set is defined by the
 * final bounds, not by the scan order), so it is the same in any batch and with any thread count.
 */
#include <math.h>
#include <stdlib.h>

#include "bf16.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HEAD_INT8 2 /* AVX512-VNNI */
#include "amx.h"
#if AMX && defined(__AMX_INT8__)
#define HEAD_AMX 1    /* and AMX's int8 tiles, for many rows */
#define AMX_MIN_ROWS 4
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HEAD_INT8 1 /* AVX2 */
#else
#define HEAD_INT8 0
#endif

#if HEAD_INT8 == 1
#define GROUP 2 /* weight columns per packed group: vpmaddwd's pairs */
typedef int16_t hq_t; /* a row's values, signed */
#define HQ_BIAS 0
#else
#define GROUP 4 /* vpdpbusd's quads */
typedef uint8_t hq_t; /* a row's values fed as q + 128 */
#define HQ_BIAS 128
#endif

#define BLOCK 16 /* vocab rows per packed block: one register of int32 sums */
#define TILE 2   /* blocks per vocab tile */
#define ROWS 8   /* batch rows per row tile */

/* 2: AVX512-VNNI, 1: AVX2, 0: no kernel on this CPU. */
int tunery_head_supported(void) { return HEAD_INT8; }

/* fmax(m, |x|) and fmin(lim, fmax(-lim, r)), NaN handled alike (a NaN x leaves m; a NaN r is
 * -lim), without their libm calls: GCC keeps those calls for the NaN rules, and the pack made six
 * per weight (Gemma's 262k x 640 head: 1.1 s of a server's start-up, now 0.55 s on 2 cores). */
static inline double max_abs(double m, double x) {
    double a = fabs(x);
    return a > m ? a : m;
}

static inline double clamp_q(double r, double lim) {
    r = r > -lim ? r : -lim;
    return r < lim ? r : lim;
}

/* Element i of a row of bf16 (fp32 = 0) or fp32 values. */
static inline float value_at(const void *p, int fp32, int64_t i) {
    return fp32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}


/* w (v_count, c) bf16 (or with `fp32` fp32) → packed int8 in blocks of BLOCK vocab rows,
 * [block][c/GROUP][BLOCK][GROUP], and
 * per vocab row: its scale (max |w| / 127), |w|_2 and |w - scale q|_2 (both rounded up), and
 * 128 Σq (the correction for feeding h as unsigned bytes). `packed` and the per-row arrays have
 * room for v_count rounded up to BLOCK, zeroed by the caller. c must be a multiple of 4. */
void tunery_head_pack(int64_t v_count, int64_t c, const void *w, int fp32, int8_t *packed,
                      float *scale, float *norm, float *err_norm, int32_t *offset, int threads) {
    int64_t groups = c / GROUP;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t v = 0; v < v_count; v++) {
        const char *row = (const char *)w + v * c * (fp32 ? 4 : 2);
        double absmax = 0;
        for (int64_t j = 0; j < c; j++) absmax = max_abs(absmax, value_at(row, fp32, j));
        double s = absmax / 127.0, inv = absmax > 0 ? 127.0 / absmax : 0;
        double sq = 0, err = 0;
        int32_t sum = 0;
        int8_t *block = packed + (v / BLOCK) * groups * BLOCK * GROUP + (v % BLOCK) * GROUP;
        for (int64_t j = 0; j < c; j++) {
            double x = value_at(row, fp32, j);
            double q = clamp_q(nearbyint(x * inv), 127);
            block[(j / GROUP) * BLOCK * GROUP + j % GROUP] = (int8_t)q;
            sum += (int32_t)q;
            sq += x * x;
            err += (x - q * s) * (x - q * s);
        }
        scale[v] = (float)s;
        norm[v] = nextafterf((float)sqrt(sq), INFINITY);
        err_norm[v] = nextafterf((float)sqrt(err), INFINITY);
        offset[v] = 128 * sum;
    }
}

#if HEAD_INT8

/* One row of the batch as the scan reads it. */
typedef struct {
    float scale;     /* of its int8 copy */
    float err_coef;  /* |h - scale q|_2 plus a margin for fp32 rounding: times |w|_2 */
    float quant_norm; /* |scale q|_2: times |e_w|_2 */
    int finite;
} row_info;

#endif

#if HEAD_INT8 == 2

/* The register-blocked inner loop: sums[i][j] = the int8 dot products of row i of hq (8 rows,
 * or 1) with the BLOCK vocab rows of block j of the tile at w. */

/* 8 rows x 2 blocks, the hot loop, in assembly: GCC 12 compiles the same loop from intrinsics
 * at half the speed (measured: 4.1 vs 8.4 G vpdpbusd/s a core). 16 sums in zmm16-31, the two
 * blocks' 64 bytes in zmm0-1, each row's four bytes broadcast into zmm2-5; the next tile's
 * bytes are prefetched into L2 meanwhile (the loop is too busy to stream them from memory on
 * demand). The tile (20 KB) and the rows (C bytes each, ≤ 32 rows) stay in L1. */
static void dot_8x2(const uint8_t *hq, int64_t c, int64_t groups, const int8_t *w,
                    int32_t sums[ROWS][TILE][BLOCK]) {
    const int8_t *next = w + 2 * groups * 64;
    const uint8_t *h5 = hq + 5 * c;
    int64_t n = groups;
    __asm__ volatile(
        "vpxord %%zmm16, %%zmm16, %%zmm16\n"
        "vmovdqa64 %%zmm16, %%zmm17\n vmovdqa64 %%zmm16, %%zmm18\n vmovdqa64 %%zmm16, %%zmm19\n"
        "vmovdqa64 %%zmm16, %%zmm20\n vmovdqa64 %%zmm16, %%zmm21\n vmovdqa64 %%zmm16, %%zmm22\n"
        "vmovdqa64 %%zmm16, %%zmm23\n vmovdqa64 %%zmm16, %%zmm24\n vmovdqa64 %%zmm16, %%zmm25\n"
        "vmovdqa64 %%zmm16, %%zmm26\n vmovdqa64 %%zmm16, %%zmm27\n vmovdqa64 %%zmm16, %%zmm28\n"
        "vmovdqa64 %%zmm16, %%zmm29\n vmovdqa64 %%zmm16, %%zmm30\n vmovdqa64 %%zmm16, %%zmm31\n"
        "1:\n"
        "prefetcht1 (%[next])\n prefetcht1 (%[next], %[g])\n"
        "vmovdqu64 (%[w]), %%zmm0\n vmovdqu64 (%[w], %[g]), %%zmm1\n"
        "vpbroadcastd (%[h]), %%zmm2\n"
        "vpdpbusd %%zmm0, %%zmm2, %%zmm16\n vpdpbusd %%zmm1, %%zmm2, %%zmm17\n"
        "vpbroadcastd (%[h], %[c]), %%zmm3\n"
        "vpdpbusd %%zmm0, %%zmm3, %%zmm18\n vpdpbusd %%zmm1, %%zmm3, %%zmm19\n"
        "vpbroadcastd (%[h], %[c], 2), %%zmm4\n"
        "vpdpbusd %%zmm0, %%zmm4, %%zmm20\n vpdpbusd %%zmm1, %%zmm4, %%zmm21\n"
        "vpbroadcastd (%[h], %[c3]), %%zmm5\n"
        "vpdpbusd %%zmm0, %%zmm5, %%zmm22\n vpdpbusd %%zmm1, %%zmm5, %%zmm23\n"
        "vpbroadcastd (%[h], %[c], 4), %%zmm2\n"
        "vpdpbusd %%zmm0, %%zmm2, %%zmm24\n vpdpbusd %%zmm1, %%zmm2, %%zmm25\n"
        "vpbroadcastd (%[h5]), %%zmm3\n"
        "vpdpbusd %%zmm0, %%zmm3, %%zmm26\n vpdpbusd %%zmm1, %%zmm3, %%zmm27\n"
        "vpbroadcastd (%[h5], %[c]), %%zmm4\n"
        "vpdpbusd %%zmm0, %%zmm4, %%zmm28\n vpdpbusd %%zmm1, %%zmm4, %%zmm29\n"
        "vpbroadcastd (%[h5], %[c], 2), %%zmm5\n"
        "vpdpbusd %%zmm0, %%zmm5, %%zmm30\n vpdpbusd %%zmm1, %%zmm5, %%zmm31\n"
        "add $64, %[w]\n add $64, %[next]\n add $4, %[h]\n add $4, %[h5]\n"
        "dec %[n]\n jnz 1b\n"
        "vmovdqa64 %%zmm16, 0(%[s])\n vmovdqa64 %%zmm17, 64(%[s])\n"
        "vmovdqa64 %%zmm18, 128(%[s])\n vmovdqa64 %%zmm19, 192(%[s])\n"
        "vmovdqa64 %%zmm20, 256(%[s])\n vmovdqa64 %%zmm21, 320(%[s])\n"
        "vmovdqa64 %%zmm22, 384(%[s])\n vmovdqa64 %%zmm23, 448(%[s])\n"
        "vmovdqa64 %%zmm24, 512(%[s])\n vmovdqa64 %%zmm25, 576(%[s])\n"
        "vmovdqa64 %%zmm26, 640(%[s])\n vmovdqa64 %%zmm27, 704(%[s])\n"
        "vmovdqa64 %%zmm28, 768(%[s])\n vmovdqa64 %%zmm29, 832(%[s])\n"
        "vmovdqa64 %%zmm30, 896(%[s])\n vmovdqa64 %%zmm31, 960(%[s])\n"
        : [w] "+r"(w), [next] "+r"(next), [h] "+r"(hq), [h5] "+r"(h5), [n] "+r"(n)
        : [g] "r"(groups * 64), [c] "r"(c), [c3] "r"(3 * c), [s] "r"(sums)
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm16", "xmm17",
          "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26",
          "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}

static void dot_1x2(const uint8_t *hq, int64_t c, int64_t groups, const int8_t *w,
                    int32_t sums[ROWS][TILE][BLOCK]) {
    (void)c;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0;
    for (int64_t k = 0; k < groups; k++) {
        int32_t four;
        memcpy(&four, hq + 4 * k, sizeof four);
        __m512i hb = _mm512_set1_epi32(four);
        s0 = _mm512_dpbusd_epi32(s0, hb, _mm512_loadu_si512(w + k * 64));
        s1 = _mm512_dpbusd_epi32(s1, hb, _mm512_loadu_si512(w + (groups + k) * 64));
    }
    _mm512_store_si512(sums[0][0], s0);
    _mm512_store_si512(sums[0][1], s1);
}

static void dot_1x1(const uint8_t *hq, int64_t groups, const int8_t *w, int32_t *sums) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = 0; k < groups; k++) {
        int32_t four;
        memcpy(&four, hq + 4 * k, sizeof four);
        s = _mm512_dpbusd_epi32(s, _mm512_set1_epi32(four), _mm512_loadu_si512(w + k * 64));
    }
    _mm512_store_si512(sums, s);
}

/* Each sum's bounds for rows [r0, r0+NR) (sums[i], i < NR) and the NV blocks from vocab row v0:
 * the largest upper one of each block stored in the row's `upper` (at the block's index; a
 * padding token's bound is -inf), the lower ones raising the row's best lower bound (both kept
 * per lane in `bounds_max`). With `high` (NR = NV = 1) only the block's 16 upper bounds are
 * stored there: `block_highs`, which recomputes them bit for bit. */
static inline __attribute__((always_inline)) void
bound_sums(const int NR, const int NV, int64_t r0, int64_t v0, int64_t v_count,
           int32_t sums[][TILE][BLOCK], const float *scale, const float *norm,
           const float *err_norm, const int32_t *offset, const row_info *info, float *bounds_max,
           float *upper, int64_t v_padded, float *high_out) {
#pragma GCC unroll 2
    for (int j = 0; j < NV; j++) {
        int64_t v = v0 + j * BLOCK;
        __mmask16 valid = v + BLOCK <= v_count ? 0xffff : (__mmask16)((1u << (v_count - v)) - 1);
        __m512 s = _mm512_loadu_ps(scale + v), n = _mm512_loadu_ps(norm + v);
        __m512 e = _mm512_loadu_ps(err_norm + v);
        __m512i off = _mm512_loadu_si512(offset + v);
        __m512 none = _mm512_set1_ps(-INFINITY);
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++) {
            const row_info *ri = &info[r0 + i];
            __m512i exact = _mm512_sub_epi32(_mm512_load_si512(sums[i][j]), off);
            __m512 approx = _mm512_mul_ps(_mm512_cvtepi32_ps(exact),
                                          _mm512_mul_ps(s, _mm512_set1_ps(ri->scale)));
            __m512 bound = _mm512_fmadd_ps(n, _mm512_set1_ps(ri->err_coef),
                                           _mm512_mul_ps(e, _mm512_set1_ps(ri->quant_norm)));
            /* margins for the rounding of approx itself: a few ulps of it */
            bound = _mm512_fmadd_ps(_mm512_abs_ps(approx), _mm512_set1_ps(1e-6f), bound);
            __m512 lower = _mm512_mask_sub_ps(none, valid, approx, bound);
            __m512 high = _mm512_mask_add_ps(none, valid, approx, bound);
            if (high_out != NULL) {
                _mm512_storeu_ps(high_out, high);
                return;
            }
            __m512 *most = (__m512 *)bounds_max + 2 * (r0 + i);
            most[0] = _mm512_max_ps(most[0], lower);
            most[1] = _mm512_max_ps(most[1], high);
            upper[(r0 + i) * v_padded + v / BLOCK] = _mm512_reduce_max_ps(high);
        }
    }
}

/* The int8 sums of rows [r0, r0+NR) against the TILE-or-fewer blocks at `w`, then their
 * bounds. */
static inline __attribute__((always_inline)) void
scan(const int NR, const int NV, int64_t r0, int64_t v0, int64_t v_count, int64_t groups,
     const uint8_t *hq, int64_t c, const int8_t *w, const float *scale, const float *norm,
     const float *err_norm, const int32_t *offset, const row_info *info, float *bounds_max,
     float *upper, int64_t v_padded) {
    int32_t sums[ROWS][TILE][BLOCK] __attribute__((aligned(64)));
    if (NV == 1)
        for (int i = 0; i < NR; i++) dot_1x1(hq + (r0 + i) * c, groups, w, sums[i][0]);
    else if (NR == ROWS)
        dot_8x2(hq + r0 * c, c, groups, w, sums);
    else
        dot_1x2(hq + r0 * c, c, groups, w, sums);
    bound_sums(NR, NV, r0, v0, v_count, sums, scale, norm, err_norm, offset, info, bounds_max,
               upper, v_padded, NULL);
}

/* Row r's upper bounds of the 16 tokens of block b, as the scan computed them (the same integer
 * sums, the same float operations). */
static void block_highs(int64_t r, int64_t b, int64_t v_count, int64_t c, const uint8_t *hq,
                        const int8_t *packed, const float *scale, const float *norm,
                        const float *err_norm, const int32_t *offset, const row_info *info,
                        float high[BLOCK]) {
    int32_t sums[1][TILE][BLOCK] __attribute__((aligned(64)));
    int64_t groups = c / 4;
    dot_1x1(hq + r * c, groups, packed + b * groups * BLOCK * 4, sums[0][0]);
    bound_sums(1, 1, r, b * BLOCK, v_count, sums, scale, norm, err_norm, offset, info, NULL, NULL,
               0, high);
}

#if HEAD_AMX
/* scan_blocks by AMX tiles (rows >= AMX_MIN_ROWS, c a multiple of 64): C (16 rows x 16 vocab
 * rows, int32) += A (16 rows x 64 bytes of hq, unsigned) B (16 quads x 16 vocab rows x 4
 * bytes, signed), where B is 1 KB of a packed block as it lies. The same integer sums as
 * vpdpbusd's (no saturation either way), so the same bounds and answers; hq has room for its
 * rows rounded up to 16. Two blocks and two row groups a pass, the tile's bytes streamed once
 * for the first pair of row groups, from cache for the rest. The next tile is prefetched a pass
 * ahead into L2, not L1: its 20 KB beside the current tile and 32 rows' 20 KB overflowed L1
 * (48 KB), and the row tiles' loads waited on L2 (32 rows: 11.1-11.9 -> 9.2-10.4 ms a step).
 * For more than 4 rows half of it is fetched between the rows' bounds (32 rows of Gemma 3
 * 270M's states, the head cold: 12.4 -> 9.0 ms, 16 rows 8.2 -> 7.1 ms). */
static void scan_blocks_amx(int64_t rows, int64_t b_lo, int64_t b_hi, int64_t v_count, int64_t c,
                            const uint8_t *hq, const int8_t *packed, const float *scale,
                            const float *norm, const float *err_norm, const int32_t *offset,
                            const row_info *info, float *bounds_max, float *upper,
                            int64_t v_padded) {
    int64_t groups = c / 4, steps = c / 64, row_groups = (rows + 15) / 16;
    int32_t sums[32][TILE][BLOCK] __attribute__((aligned(64)));
    for (int64_t b = b_lo; b < b_hi; b += TILE) {
        const int8_t *w0 = packed + b * groups * BLOCK * 4, *w1 = w0 + groups * BLOCK * 4;
        const char *next = (const char *)(w0 + TILE * groups * BLOCK * 4);
        int two = b + 1 < b_hi;
        for (int64_t g0 = 0; g0 < row_groups; g0 += 2) {
            int both = row_groups - g0 > 1;
            const uint8_t *x0 = hq + g0 * 16 * c, *x1 = x0 + 16 * c;
            amx_zero_sums();
            int fetch = g0 == 0 && b + TILE < b_hi; /* the next tile, into L2 */
            int64_t lines = 32 * steps, early = rows > 4 ? 16 : 32; /* lines a step here */
            for (int64_t k = 0; k < steps; k++) {
                if (fetch)
                    for (int l = 0; l < early; l++)
                        _mm_prefetch(next + (k * early + l) * 64, _MM_HINT_T1);
                _tile_loadd(4, w0 + k * 1024, 64);
                _tile_loadd(6, x0 + k * 64, c);
                _tile_dpbusd(0, 6, 4);
                if (two) {
                    _tile_loadd(5, w1 + k * 1024, 64);
                    _tile_dpbusd(1, 6, 5);
                }
                if (both) {
                    _tile_loadd(7, x1 + k * 64, c);
                    _tile_dpbusd(2, 7, 4);
                    if (two) _tile_dpbusd(3, 7, 5);
                }
            }
            _tile_stored(0, sums[0][0], TILE * BLOCK * 4);
            if (two) _tile_stored(1, sums[0][1], TILE * BLOCK * 4);
            if (both) _tile_stored(2, sums[16][0], TILE * BLOCK * 4);
            if (both && two) _tile_stored(3, sums[16][1], TILE * BLOCK * 4);
            int64_t r0 = g0 * 16, nr = rows - r0 < 32 ? rows - r0 : 32;
            /* the rest of the next tile's lines between the rows' bounds: all in the steps,
             * they queued on the core's few outstanding misses and stalled the tiles, and none
             * were in flight while the bounds were computed */
            int64_t done = steps * early, chunks = (nr + 3) / 4;
            int64_t each = fetch ? (lines - done + chunks - 1) / chunks : 0;
            for (int64_t i = 0; i < nr; i += 4) {
                for (int64_t l = 0; l < each && done < lines; l++, done++)
                    _mm_prefetch(next + done * 64, _MM_HINT_T1);
                int n = nr - i < 4 ? (int)(nr - i) : 4;
                if (two)
                    bound_sums(n, 2, r0 + i, b * BLOCK, v_count, sums + i, scale, norm,
                               err_norm, offset, info, bounds_max, upper, v_padded, NULL);
                else
                    bound_sums(n, 1, r0 + i, b * BLOCK, v_count, sums + i, scale, norm,
                               err_norm, offset, info, bounds_max, upper, v_padded, NULL);
            }
        }
    }
}
#endif

/* All rows against the vocab blocks [b_lo, b_hi), a tile at a time: its bytes are read from
 * memory once, then from cache for each 8 rows (and each row past those). */
static void scan_blocks(int64_t rows, int64_t b_lo, int64_t b_hi, int64_t v_count, int64_t c,
                        const uint8_t *hq, const int8_t *packed, const float *scale,
                        const float *norm, const float *err_norm, const int32_t *offset,
                        const row_info *info, float *bounds_max, float *upper,
                        int64_t v_padded) {
    int64_t groups = c / 4;
    for (int64_t b = b_lo; b < b_hi; b += TILE) {
        const int8_t *w = packed + b * groups * BLOCK * 4;
        int64_t r = 0;
        if (b + TILE <= b_hi) {
            for (; r + ROWS <= rows; r += ROWS)
                scan(ROWS, TILE, r, b * BLOCK, v_count, groups, hq, c, w, scale, norm, err_norm,
                     offset, info, bounds_max, upper, v_padded);
            for (; r < rows; r++)
                scan(1, TILE, r, b * BLOCK, v_count, groups, hq, c, w, scale, norm, err_norm,
                     offset, info, bounds_max, upper, v_padded);
        } else { /* the last, lone block */
            for (; r + ROWS <= rows; r += ROWS)
                scan(ROWS, 1, r, b * BLOCK, v_count, groups, hq, c, w, scale, norm, err_norm,
                     offset, info, bounds_max, upper, v_padded);
            for (; r < rows; r++)
                scan(1, 1, r, b * BLOCK, v_count, groups, hq, c, w, scale, norm, err_norm,
                     offset, info, bounds_max, upper, v_padded);
        }
    }
}

/* Row r's candidates: the tokens whose upper bound reaches `threshold`, in ascending order,
 * into `token`; their count, or more than `cap` (then not all written). Only the blocks whose
 * largest upper bound (`block_max`, one per block) reaches it are looked into: their bounds are
 * recomputed (`block_highs`), which costs less than storing every token's bound in the scan
 * and reading them all back (a peaked row has a few candidates in a few blocks). */
static int64_t candidates(int64_t r, const float *block_max, int64_t blocks, float threshold,
                          int32_t *token, int64_t cap, int64_t v_count, int64_t c,
                          const uint8_t *hq, const int8_t *packed, const float *scale,
                          const float *norm, const float *err_norm, const int32_t *offset,
                          const row_info *info) {
    __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 t = _mm512_set1_ps(threshold);
    float high[BLOCK] __attribute__((aligned(64)));
    int64_t n = 0;
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        __mmask16 valid = blocks - b0 >= 16 ? 0xffff : (__mmask16)((1u << (blocks - b0)) - 1);
        __mmask16 hit = _mm512_mask_cmp_ps_mask(valid, _mm512_loadu_ps(block_max + b0), t,
                                                _CMP_GE_OQ);
        for (; hit; hit &= hit - 1) {
            int64_t b = b0 + __builtin_ctz(hit);
            block_highs(r, b, v_count, c, hq, packed, scale, norm, err_norm, offset, info, high);
            __mmask16 keep = _mm512_cmp_ps_mask(_mm512_load_ps(high), t, _CMP_GE_OQ);
            if (n + __builtin_popcount(keep) > cap) return cap + 1;
            __m512i ids = _mm512_add_epi32(lanes, _mm512_set1_epi32((int32_t)(b * BLOCK)));
            _mm512_mask_compressstoreu_epi32(token + n, keep, ids);
            n += __builtin_popcount(keep);
        }
    }
    return n;
}

#elif HEAD_INT8 == 1

#define ROWS2 4 /* batch rows per register tile: 8 sums, 2 weight vectors, the row's pair */

/* sums[i] = the dot products of row i < NR of hq (int16) with the BLOCK vocab rows of the
 * block at w (int8 pairs of columns, widened to int16 in registers): vpmaddwd multiplies and
 * adds each pair into int32, whose sums cannot overflow (|q| bounded by the caller). While the
 * first rows read it, the next block is fetched into L2 (`next`, or NULL). */
static inline __attribute__((always_inline)) void dot_rows(const int NR, const hq_t *hq,
                                                           int64_t c, int64_t groups,
                                                           const int8_t *w, const int8_t *next,
                                                           int32_t sums[ROWS2][BLOCK]) {
    __m256i acc[ROWS2][2];
    for (int i = 0; i < NR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < groups; k++) {
        const int8_t *wk = w + k * BLOCK * GROUP;
        if (next && !(k & 1)) _mm_prefetch((const char *)(next + k * BLOCK * GROUP), _MM_HINT_T1);
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wk));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wk + 16)));
        for (int i = 0; i < NR; i++) {
            int32_t pair;
            memcpy(&pair, hq + i * c + GROUP * k, sizeof pair);
            __m256i hb = _mm256_set1_epi32(pair);
            acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(hb, w0));
            acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(hb, w1));
        }
    }
    for (int i = 0; i < NR; i++) {
        _mm256_store_si256((__m256i *)sums[i], acc[i][0]);
        _mm256_store_si256((__m256i *)(sums[i] + 8), acc[i][1]);
    }
}

/* Rows [r0, r0+NR)'s sums with the block of vocab rows from v: each one's bounds, the upper one
 * stored in the row's `upper` (a padding token's: -inf), both raising the row's per-lane
 * maxima in `bounds_max` (16 lower, then 16 upper). */
static inline __attribute__((always_inline)) void
bound_rows(const int NR, int64_t r0, int64_t v, int64_t v_count, int32_t sums[ROWS2][BLOCK],
           const float *scale, const float *norm, const float *err_norm, const row_info *info,
           float *bounds_max, float *upper, int64_t v_padded) {
    const __m256 none = _mm256_set1_ps(-INFINITY), sign = _mm256_set1_ps(-0.0f);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int half = 0; half < 2; half++) {
        int64_t at = v + 8 * half;
        __m256 valid = _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)(v_count - at)), lanes));
        __m256 s = _mm256_loadu_ps(scale + at), n = _mm256_loadu_ps(norm + at);
        __m256 e = _mm256_loadu_ps(err_norm + at);
        for (int i = 0; i < NR; i++) {
            const row_info *ri = &info[r0 + i];
            __m256i exact = _mm256_load_si256((const __m256i *)(sums[i] + 8 * half));
            __m256 approx = _mm256_mul_ps(_mm256_cvtepi32_ps(exact),
                                          _mm256_mul_ps(s, _mm256_set1_ps(ri->scale)));
            __m256 bound = _mm256_fmadd_ps(n, _mm256_set1_ps(ri->err_coef),
                                           _mm256_mul_ps(e, _mm256_set1_ps(ri->quant_norm)));
            bound = _mm256_fmadd_ps(_mm256_andnot_ps(sign, approx), _mm256_set1_ps(1e-6f), bound);
            __m256 lower = _mm256_blendv_ps(none, _mm256_sub_ps(approx, bound), valid);
            __m256 high = _mm256_blendv_ps(none, _mm256_add_ps(approx, bound), valid);
            float *most = bounds_max + 2 * BLOCK * (r0 + i) + 8 * half;
            _mm256_storeu_ps(most, _mm256_max_ps(_mm256_loadu_ps(most), lower));
            _mm256_storeu_ps(most + BLOCK, _mm256_max_ps(_mm256_loadu_ps(most + BLOCK), high));
            _mm256_storeu_ps(upper + (r0 + i) * v_padded + at, high);
        }
    }
}

#define ROW_GROUP(NR)                                                                         \
    do {                                                                                      \
        dot_rows(NR, hq + r * c, c, groups, w, r == 0 ? next : NULL, sums);                    \
        bound_rows(NR, r, b * BLOCK, v_count, sums, scale, norm, err_norm, info, bounds_max,  \
                   upper, v_padded);                                                          \
        r += NR;                                                                              \
    } while (0)

/* All rows against the vocab blocks [b_lo, b_hi), a block at a time: its bytes (c * 16) are
 * read from memory once, then from L1 for each ROWS2 rows. */
static void scan_blocks(int64_t rows, int64_t b_lo, int64_t b_hi, int64_t v_count, int64_t c,
                        const hq_t *hq, const int8_t *packed, const float *scale,
                        const float *norm, const float *err_norm, const int32_t *offset,
                        const row_info *info, float *bounds_max, float *upper,
                        int64_t v_padded) {
    (void)offset; /* signed rows need no correction */
    int64_t groups = c / GROUP;
    int32_t sums[ROWS2][BLOCK] __attribute__((aligned(32)));
    for (int64_t b = b_lo; b < b_hi; b++) {
        const int8_t *w = packed + b * groups * BLOCK * GROUP;
        const int8_t *next = b + 1 < b_hi ? w + groups * BLOCK * GROUP : NULL;
        int64_t r = 0;
        while (r + ROWS2 <= rows) ROW_GROUP(ROWS2);
        switch (rows - r) {
        case 3: ROW_GROUP(3); break;
        case 2: ROW_GROUP(2); break;
        case 1: ROW_GROUP(1); break;
        default: break;
        }
    }
}

/* Row r's candidates: the tokens whose upper bound reaches `threshold`, in ascending order,
 * written as int32 over the front of its `upper` (never ahead of the reading); their count. */
static int64_t candidates(float *upper, int64_t v_padded, float threshold) {
    int32_t *token = (int32_t *)upper;
    __m256 t = _mm256_set1_ps(threshold);
    int64_t n = 0;
    for (int64_t v = 0; v < v_padded; v += 8) {
        unsigned keep = (unsigned)_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(upper + v), t, _CMP_GE_OQ));
        for (; keep; keep &= keep - 1) token[n++] = (int32_t)(v + __builtin_ctz(keep));
    }
    return n;
}

#endif

/* out[r] = the index of row r's largest logit h_r.W^T (h and W (v_count, c) both bf16, or with
 * `fp32` both fp32; W packed by tunery_head_pack), exact in fp32 (for bf16 then rounded to bf16
 * as a bf16 head rounds its logits), the first of equal ones; -1 for a row that is not finite
 * or has more than `limit` candidates (the caller takes it another way). `upper`: room for
 * rows x v_count rounded up to BLOCK floats. Returns 0, or -1 out of memory / without the
 * kernel. */
/* A token's exact logit: the fp32 dot product of the row and its weights (fp32, or bf16 and
 * then rounded to bf16, as the bf16 head rounds it). */
static inline float exact_logit(const float *x, const char *weights, int64_t c, int fp32) {
    return fp32 ? dot_f32_f32(x, (const float *)weights, c)
                : bf16_to_f32(f32_to_bf16(dot_f32_bf16(x, (const uint16_t *)weights, c)));
}

int tunery_head_argmax(int64_t rows, int64_t c, int64_t v_count, const void *h,
                       int64_t h_stride, const int8_t *packed, const float *scale,
                       const float *norm, const float *err_norm, const int32_t *offset,
                       const void *w, int fp32, int64_t limit, float *upper, int64_t *out,
                       int threads) {
#if HEAD_INT8
    if (threads < 1) threads = 1;
    int64_t blocks = (v_count + BLOCK - 1) / BLOCK, v_padded = blocks * BLOCK;
    int64_t rows16 = (rows + 15) / 16 * 16; /* AMX reads row groups of 16 */
    hq_t *hq = malloc(rows16 * c * sizeof *hq);
    float *hf = malloc(rows * c * sizeof *hf);
    row_info *info = malloc(rows * sizeof *info);
    /* per thread and row: the lanes' best lower bounds (16), then upper ones (16) */
    float *bounds_max = aligned_alloc(64, 2 * BLOCK * threads * rows * sizeof *bounds_max);
    int status = 0;
    if (!hq || !hf || !info || !bounds_max) {
        status = -1;
        goto done;
    }
#if HEAD_INT8 == 1 /* int16, |q| small enough that c products of 127 |q| fit an int32 */
    double q_max = fmin(16383, floor(2147483647.0 / (127.0 * c)));
#else /* int8 fed as unsigned q + 128 */
    double q_max = 127;
#endif
    for (int64_t r = 0; r < rows; r++) {
        float *x = hf + r * c;
        double absmax = 0, total = 0;
        for (int64_t j = 0; j < c; j++) {
            x[j] = value_at(h, fp32, r * h_stride + j);
            absmax = max_abs(absmax, x[j]);
            total += (double)x[j] * x[j];
        }
        info[r].finite = isfinite(absmax) && isfinite(total);
        double s = info[r].finite && absmax > 0 ? absmax / q_max : 0;
        double inv = s > 0 ? 1.0 / s : 0, err = 0, quant = 0;
        for (int64_t j = 0; j < c; j++) {
            double q = info[r].finite ? clamp_q(nearbyint(x[j] * inv), q_max) : 0;
            hq[r * c + j] = (hq_t)(q + HQ_BIAS);
            err += (x[j] - q * s) * (x[j] - q * s);
            quant += (q * s) * (q * s);
        }
        /* The exact sums are fp32: their rounding (< c ulps of |h||w|) joins the error. */
        double margin = (double)c * 6e-8 * sqrt(total);
        info[r].scale = (float)s;
        info[r].err_coef = nextafterf((float)(sqrt(err) + margin), INFINITY) * 1.0001f;
        info[r].quant_norm = nextafterf((float)sqrt(quant), INFINITY) * 1.0001f;
    }
    for (int64_t i = 0; i < 2 * BLOCK * threads * rows; i++) bounds_max[i] = -INFINITY;
    for (int64_t i = rows * c; i < rows16 * c; i++) hq[i] = (hq_t)HQ_BIAS;
#if HEAD_AMX
    int tiles = rows >= AMX_MIN_ROWS && c % 64 == 0 && amx_permitted();
#endif

#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int t = 0, nt = 1;
#endif
        int64_t b_lo = blocks * t / nt, b_hi = blocks * (t + 1) / nt;
        float *most = bounds_max + 2 * BLOCK * t * rows;
#if HEAD_AMX
        if (tiles) {
            amx_configure();
            scan_blocks_amx(rows, b_lo, b_hi, v_count, c, hq, packed, scale, norm, err_norm,
                            offset, info, most, upper, v_padded);
            _tile_release();
        } else
#endif
            scan_blocks(rows, b_lo, b_hi, v_count, c, hq, packed, scale, norm, err_norm,
                        offset, info, most, upper, v_padded);
    }

#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t r = 0; r < rows; r++) {
        if (!info[r].finite) {
            out[r] = -1;
            continue;
        }
        float best = -INFINITY, most = -INFINITY;
        for (int t = 0; t < threads; t++) {
            const float *lanes = bounds_max + 2 * BLOCK * (t * rows + r);
            for (int l = 0; l < BLOCK; l++) {
                best = fmaxf(best, lanes[l]);
                most = fmaxf(most, lanes[BLOCK + l]);
            }
        }
        /* bf16 logits: a token up to one bf16 step (<= 2^-7 of the value, which lies within
         * [lower, upper]) below the best can round to a tie. fp32 ones are compared as they
         * are. */
        float step = fp32 ? 0 : fmaxf(fabsf(best), fabsf(most)) * (1.0f / 128) * 1.01f;
        float *row_upper = upper + r * v_padded;
        int64_t width = c * (fp32 ? 4 : 2); /* bytes of a weight row */
#if HEAD_INT8 == 2 /* the row's block maxima, then its candidates behind them */
        /* The exact logit of the token with the highest upper bound is a lower bound of the
         * best logit, most often far above the bounds' (an int8 logit's error bound is wide):
         * a higher threshold leaves fewer candidates, and no fewer than the answer needs. */
        int64_t top_block = 0;
        for (int64_t b = 1; b < blocks; b++)
            if (row_upper[b] > row_upper[top_block]) top_block = b;
        float high[BLOCK] __attribute__((aligned(64)));
        block_highs(r, top_block, v_count, c, hq, packed, scale, norm, err_norm, offset, info,
                    high);
        int lane = 0;
        for (int l = 1; l < BLOCK; l++)
            if (high[l] > high[lane]) lane = l;
        float known = exact_logit(hf + r * c, (const char *)w + (top_block * BLOCK + lane) * width,
                                  c, fp32);
        best = fmaxf(best, known);
        int32_t *token = (int32_t *)(row_upper + blocks);
        int64_t cap = limit < v_padded - blocks ? limit : v_padded - blocks;
        int64_t n = candidates(r, row_upper, blocks, best - step, token, cap, v_count, c, hq,
                               packed, scale, norm, err_norm, offset, info);
#else
        int64_t n = candidates(row_upper, v_padded, best - step);
        const int32_t *token = (const int32_t *)row_upper;
#endif
        if (n > limit || n > v_padded - blocks) { /* a flat row: exact logits for all of them
                                                    would cost more */
            out[r] = -1;
            continue;
        }
        float top = -INFINITY;
        int64_t at = -1;
        for (int64_t i = 0; i < n; i++) {
            if (i + 4 < n) /* the weights' rows are far apart: fetch ahead */
                for (int64_t off = 0; off < width; off += 64)
                    _mm_prefetch((const char *)w + token[i + 4] * width + off, _MM_HINT_T0);
            float logit = exact_logit(hf + r * c, (const char *)w + token[i] * width, c, fp32);
            if (at < 0 || logit > top) {
                top = logit;
                at = token[i];
            }
        }
        out[r] = at;
    }
done:
    free(bounds_max);
    free(info);
    free(hf);
    free(hq);
    return status;
#else
    (void)rows, (void)c, (void)v_count, (void)h, (void)h_stride, (void)packed, (void)scale;
    (void)norm, (void)err_norm, (void)offset, (void)w, (void)fp32, (void)limit, (void)upper;
    (void)out;
    (void)threads;
    return -1;
#endif
}
