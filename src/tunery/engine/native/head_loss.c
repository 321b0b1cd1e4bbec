/* Training's vocab head: each label row's cross-entropy and its gradient in one read of W.
 *
 * A training step needs, for each row h that predicts a label y, the loss logsumexp(z) - z_y
 * over the logits z = W h (262k of them for Gemma) and the gradient W^T (softmax(z) - onehot(y)).
 * Done as two matmuls, W (V x C: 671 MB in fp32) is read twice, and with the few label rows of a
 * small step (a dozen) each read is memory-bound. Here W goes by in blocks of BLOCK vocab rows:
 * a block's logits (the forward), then, while the block is still in cache, its softmax terms
 * times its rows added into the gradient (the backward). The softmax runs online, as flash
 * attention's does: each row keeps its running max m, the sum s of exp(z - m) and the gradient
 * sum g of exp(z - m) W_j, all rescaled when m grows. The threads take the blocks in turn, each
 * thread with its own (m, s, g) over its share; the shares are merged at the end.
 *
 * The gradient may skip the softmax terms that cannot matter, as Cut Cross-Entropy's gradient
 * filtering does. A term's probability is at most exp(z - m) / max(1, s) for its share's running
 * m and s (the max's own term is 1 in the final sum, and s sums terms of the final sum), so a term
 * under keep_min by that bound is left out of g: each left-out probability is below keep_min, and
 * with keep_min = bound / V the left-out mass is below `bound`, and so is the gradient's error in
 * units of the largest |W_j|. On a trained model's head most terms are that small: with bound =
 * 2^-8 (bf16's rounding) the gradient keeps 3-23% of the entries on Gemma 3 270M's seed steps
 * (3-40% with a contiguous share per thread and the bound exp(z - m) alone).
 * The loss is always exact (every logit is computed). keep_min = 0 keeps every term.
 *
 * W is fp32 or bf16 (rows of C values, the plain (V, C) layout); h and the results are fp32.
 * Sums run in another order than a matmul's, so results match torch's to fp32 rounding, not bit
 * for bit, and (with the thread split) not bit for bit across thread counts either.
 */
#include <math.h>
#include <stdlib.h>

#include "bf16.h"

#include "amx.h" /* AMX bf16 tiles (`head_loss_amx`) where the compiler targets them */

#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 48 /* vocab rows per block: 123 KB of fp32 W, kept in L2 between the two passes */
#define FWD_ROWS 4 /* label rows x vocab rows per logits tile: 8 sums in registers */
#define FWD_VOCAB 2
#define GRAD_VECS 8 /* vectors of C per pass of a row's gradient: 8 sums in registers */

/* LANES values of W's row j from column k, widened from bf16 unless `fp32`. */
static inline f32v load_w(const void *w, int fp32, int64_t c, int64_t j, int64_t k) {
    return fp32 ? load_f32v((const float *)w + j * c + k)
                : load_bf16v((const uint16_t *)w + j * c + k);
}

/* exp(x) for x <= 0 (a softmax term): Cephes' degree-5 polynomial on the reduced argument, then
 * times 2^n through the exponent bits. Relative error ~2 ulp; below -87 it is 2^-126-ish, not 0. */
static inline f32v exp_nonpositive(f32v x) {
    f32v lo = broadcast_v(-87.0f);
    i32v below = (i32v)(x < lo);
    u32v xb, lb;
    memcpy(&xb, &x, sizeof x);
    memcpy(&lb, &lo, sizeof lo);
    xb = (xb & ~(u32v)below) | (lb & (u32v)below);
    memcpy(&x, &xb, sizeof x);
    /* n = round(x / ln 2), x <= 0: truncating x / ln 2 - 0.5 rounds to nearest */
    i32v n = __builtin_convertvector(x * broadcast_v(1.44269504088896341f) - broadcast_v(0.5f), i32v);
    f32v nf = __builtin_convertvector(n, f32v);
    f32v r = x - nf * broadcast_v(0.693359375f) + nf * broadcast_v(2.12194440e-4f);
    f32v p = broadcast_v(1.9875691500e-4f);
    p = p * r + broadcast_v(1.3981999507e-3f);
    p = p * r + broadcast_v(8.3334519073e-3f);
    p = p * r + broadcast_v(4.1665795894e-2f);
    p = p * r + broadcast_v(1.6666665459e-1f);
    p = p * r + broadcast_v(5.0000001201e-1f);
    p = p * r * r + r + broadcast_v(1.0f);
    i32v bits = (n + 127) << 23;
    f32v scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* z[i][j] = h_i . W_{j0 + j} for R label rows and J vocab rows (R, J constants once inlined). */
static inline __attribute__((always_inline)) void logits_tile(int R, int J, int fp32,
                                                              const float *h, int64_t c,
                                                              const void *w, int64_t j0,
                                                              float *z, int64_t z_stride) {
    f32v acc[FWD_ROWS][FWD_VOCAB];
    memset(acc, 0, sizeof acc);
    /* the next tile's W rows, prefetched as these are read: each tile's rows are a few short
     * runs of lines that the hardware prefetcher does not ramp up for in time */
    const char *next = fp32 ? (const char *)((const float *)w + (j0 + J) * c)
                            : (const char *)((const uint16_t *)w + (j0 + J) * c);
    int64_t row_bytes = fp32 ? 4 * c : 2 * c, step = fp32 ? 4 * LANES : 2 * LANES;
    for (int64_t k = 0; k < c; k += LANES, next += step) {
        for (int j = 0; j < J; j++) __builtin_prefetch(next + j * row_bytes, 0, 3);
        f32v wv[FWD_VOCAB];
        for (int j = 0; j < J; j++) wv[j] = load_w(w, fp32, c, j0 + j, k);
        for (int i = 0; i < R; i++) {
            f32v hv = load_f32v(h + i * c + k);
            for (int j = 0; j < J; j++) acc[i][j] = fma_v(hv, wv[j], acc[i][j]);
        }
    }
#if LANES == 8 && defined(__AVX__)
    if (R == FWD_ROWS && J == FWD_VOCAB) { /* the 8 sums' lanes added by one transposing tree */
        __m256 t0 = _mm256_hadd_ps((__m256)acc[0][0], (__m256)acc[0][1]);
        __m256 t1 = _mm256_hadd_ps((__m256)acc[1][0], (__m256)acc[1][1]);
        __m256 t2 = _mm256_hadd_ps((__m256)acc[2][0], (__m256)acc[2][1]);
        __m256 t3 = _mm256_hadd_ps((__m256)acc[3][0], (__m256)acc[3][1]);
        __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
        __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                    _mm256_permute2f128_ps(u0, u1, 0x31));
        float out[8];
        _mm256_storeu_ps(out, sums); /* lane 2i + j: row i, vocab row j */
        for (int i = 0; i < FWD_ROWS; i++)
            for (int j = 0; j < FWD_VOCAB; j++) z[i * z_stride + j] = out[i * FWD_VOCAB + j];
        return;
    }
#endif
    for (int i = 0; i < R; i++)
        for (int j = 0; j < J; j++) z[i * z_stride + j] = sum_lanes(acc[i][j]);
}

/* The logits of the next min(left, FWD_ROWS) rows for J vocab rows (J a constant once inlined). */
static inline __attribute__((always_inline)) void logits_rows(int64_t left, int J, int fp32,
                                                              const float *h, int64_t c,
                                                              const void *w, int64_t j0,
                                                              float *z) {
    if (left >= 4) logits_tile(4, J, fp32, h, c, w, j0, z, BLOCK);
    else if (left == 3) logits_tile(3, J, fp32, h, c, w, j0, z, BLOCK);
    else if (left == 2) logits_tile(2, J, fp32, h, c, w, j0, z, BLOCK);
    else logits_tile(1, J, fp32, h, c, w, j0, z, BLOCK);
}

/* g[k0 .. k0 + GRAD_VECS * LANES) += sum_a e[a] W_{j0 + idx[a]} over one row's `count`
 * kept terms of a block (the block's W rows are in L2: the logits pass just read them). */
static inline __attribute__((always_inline)) void grad_row(int fp32, const float *e,
                                                           const int32_t *idx, int64_t count,
                                                           const void *w, int64_t c, int64_t j0,
                                                           int64_t k0, float *g) {
    f32v acc[GRAD_VECS];
    for (int v = 0; v < GRAD_VECS; v++) acc[v] = load_f32v(g + k0 + v * LANES);
    for (int64_t a = 0; a < count; a++) {
        f32v eb = broadcast_v(e[a]);
        int64_t j = j0 + idx[a];
        for (int v = 0; v < GRAD_VECS; v++)
            acc[v] = fma_v(eb, load_w(w, fp32, c, j, k0 + v * LANES), acc[v]);
    }
    for (int v = 0; v < GRAD_VECS; v++) memcpy(g + k0 + v * LANES, &acc[v], sizeof(f32v));
}

/* One thread's running softmax state over its vocab share. */
typedef struct {
    float *m, *s, *g; /* per row: max, sum of exp(z - m), gradient sum (rows x c) */
} share_t;

/* The block [j0, j0 + n) for all rows: logits into z (rows x BLOCK), the online softmax update,
 * each label's logit where the block holds it, and (g non-NULL) the gradient sums of the terms
 * at or above keep_min (each row's kept terms packed in z and idx, rows x BLOCK, counted in kept). */
static inline __attribute__((always_inline)) void block_pass(
    int fp32, int64_t rows, int64_t c, const float *h, const void *w, const int64_t *labels,
    int64_t j0, int64_t n, float *z, int32_t *idx, int32_t *kept, float keep_min, share_t st,
    float *label_logit) {
    /* vocab tiles outer: a tile's W rows stay in L1 while every row tile reads them */
    for (int64_t j = 0; j < n;) {
        int J = n - j < FWD_VOCAB ? 1 : FWD_VOCAB; /* a tail goes one vocab row at a time */
        for (int64_t r = 0; r < rows; r += FWD_ROWS) {
            const float *hr = h + r * c;
            float *zr = z + r * BLOCK + j;
            if (J == FWD_VOCAB) logits_rows(rows - r, FWD_VOCAB, fp32, hr, c, w, j0 + j, zr);
            else logits_rows(rows - r, 1, fp32, hr, c, w, j0 + j, zr);
        }
        j += J;
    }
    for (int64_t r = 0; r < rows; r++) {
        float *zr = z + r * BLOCK;
        if (labels[r] >= j0 && labels[r] < j0 + n) label_logit[r] = zr[labels[r] - j0];
        float top = zr[0];
        for (int64_t j = 1; j < n; j++) top = zr[j] > top ? zr[j] : top;
        if (top > st.m[r]) { /* a new max: what was summed shrinks by exp(old - new) */
            float shrink = expf(st.m[r] - top);
            st.s[r] *= shrink;
            if (st.g != NULL)
                for (int64_t k = 0; k < c; k++) st.g[r * c + k] *= shrink;
            st.m[r] = top;
        }
        f32v m = broadcast_v(st.m[r]);
        for (int64_t j = 0; j < BLOCK; j += LANES) { /* the lanes past n are never read */
            f32v e = exp_nonpositive(load_f32v(zr + j) - m);
            memcpy(zr + j, &e, sizeof e);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) sum += zr[j];
        st.s[r] += sum;
        if (st.g == NULL) continue;
        /* the terms the gradient keeps, packed to the front of the row's block */
        float least = keep_min * (st.s[r] > 1.0f ? st.s[r] : 1.0f);
        int32_t *ir = idx + r * BLOCK, count = 0;
        for (int64_t j = 0; j < n; j++)
            if (zr[j] >= least) zr[count] = zr[j], ir[count++] = (int32_t)j;
        kept[r] = count;
    }
    if (st.g == NULL) return;
    /* columns outer: a chunk of the block's W rows stays in L1 while every row reads it */
    for (int64_t k0 = 0; k0 < c; k0 += GRAD_VECS * LANES)
        for (int64_t r = 0; r < rows; r++)
            if (kept[r] > 0)
                grad_row(fp32, z + r * BLOCK, idx + r * BLOCK, kept[r], w, c, j0, k0, st.g + r * c);
}

#if AMX
/* The AMX path: a bf16 W's logits by tiles, for up to AMX_MAX_ROWS label rows.
 *
 * A tile product C += A B takes A = 16 vocab rows of W x 32 columns straight from W's plain
 * layout (a strided tile load) and B = the same 32 columns of 16 label rows, rounded to bf16
 * and laid out in column pairs once per call (`pack_rows`), so C holds a 16 x 16 block of
 * logits transposed: vocab rows down, label rows across. The online softmax then runs on whole
 * registers, one lane per label row. The logits are bf16 h times bf16 W summed in fp32, as a
 * bf16 matmul's; the gradient is summed in fp32 over the kept terms as in `block_pass`.
 * Two vocab tiles meet two groups of label rows at a time (`vocab_pair`): one tile load per
 * product, against 1.25 with one vocab tile and four groups (on Gemma 3 270M's head, 380 label
 * rows, 2 threads: the logits' products 62 -> 52 ms, the logits pass 85 -> 74 ms). */
#define AMX_TILE 16   /* vocab rows, and label rows, of a tile */
#define AMX_K 32      /* W's columns per tile product */
#define AMX_BLOCK 256 /* vocab rows per block: 320 KB of Gemma's W, in L2 for the gradient */
#define AMX_MAX_ROWS 1024

/* The label rows as B tiles: for group g and column chunk q, 16 rows of (32 row values: each
 * row's columns 2p and 2p + 1), bf16; rows past `rows` are zero. */
static void pack_rows(int64_t rows, int64_t c, const float *h, uint16_t *hb) {
    int64_t chunks = c / AMX_K, groups = (rows + AMX_TILE - 1) / AMX_TILE;
    memset(hb, 0, sizeof(uint16_t) * groups * chunks * AMX_TILE * AMX_K);
    for (int64_t r = 0; r < rows; r++) {
        int64_t g = r / AMX_TILE, n = r % AMX_TILE;
        for (int64_t k = 0; k < c; k++) {
            int64_t q = k / AMX_K, p = (k % AMX_K) / 2;
            hb[((g * chunks + q) * AMX_TILE + p) * AMX_K + 2 * n + k % 2] = f32_to_bf16(h[r * c + k]);
        }
    }
}

/* Two vocab tiles (16 rows each at w0, w1: stride c; w1 read only where `two`) times two groups'
 * rows (B tiles at h0, h1; h1 only where `both`): tiles 0-3 hold (w0, h0), (w0, h1), (w1, h0),
 * (w1, h1), stored into zt as group g's block at zt + g * AMX_BLOCK * 16, vocab row m, label row
 * n at m * 16 + n (zt points at the first tile's rows of the first group). One tile load per
 * product: both vocab tiles' rows stay in L1 while every group pair reads them. `next` (or NULL)
 * is prefetched 32 lines a chunk. */
static inline __attribute__((always_inline)) void vocab_pair(int two, int both,
                                                             const uint16_t *w0,
                                                             const uint16_t *w1, int64_t c,
                                                             const uint16_t *h0,
                                                             const uint16_t *h1, float *zt,
                                                             const char *next) {
    int64_t chunks = c / AMX_K, tile = AMX_TILE * AMX_K, group = AMX_BLOCK * AMX_TILE;
    amx_zero_sums();
    for (int64_t q = 0; q < chunks; q++) {
        if (next != NULL)
            for (int l = 0; l < 32; l++) _mm_prefetch(next + (q * 32 + l) * 64, _MM_HINT_T1);
        amx_pair_products(two, both, w0 + q * AMX_K, w1 + q * AMX_K, c * 2, h0 + q * tile,
                          h1 + q * tile);
    }
    _tile_stored(0, zt, 64);
    if (both) _tile_stored(1, zt + group, 64);
    if (two) _tile_stored(2, zt + AMX_TILE * AMX_TILE, 64);
    if (two && both) _tile_stored(3, zt + group + AMX_TILE * AMX_TILE, 64);
}

/* The gradient's tile operands, each a 16-bit pair per 32-bit lane: `perm` takes lanes
 * (a[i], b[i]) of two 16-value halves, as `_mm512_permutex2var_epi16` (b's values from 32) or
 * as `_mm512_permutexvar_epi16` of one register (b's from 16) reads them. */
static inline __m512i pair_index(int b_from) {
    int16_t idx[32];
    for (int i = 0; i < 16; i++) idx[2 * i] = (int16_t)i, idx[2 * i + 1] = (int16_t)(b_from + i);
    return _mm512_loadu_si512(idx);
}

/* The block's n W rows as B tiles of the gradient (rows past n zero): for vocab chunk q (32
 * rows) and column tile t (16 columns), 16 rows of (column i's values in vocab rows 2p, 2p + 1). */
static void pack_block(const uint16_t *w, int64_t c, int64_t n, uint16_t *wb) {
    __m512i perm = pair_index(32);
    int64_t col_tiles = c / AMX_TILE;
    for (int64_t q = 0; q < AMX_BLOCK / AMX_K; q++)
        for (int64_t p = 0; p < AMX_TILE; p++) {
            int64_t j = q * AMX_K + 2 * p;
            const uint16_t *ra = w + j * c, *rb = ra + c;
            for (int64_t t = 0; t < col_tiles; t++) {
                __m256i a = j < n ? _mm256_loadu_si256((const __m256i *)(ra + t * AMX_TILE))
                                  : _mm256_setzero_si256();
                __m256i b = j + 1 < n ? _mm256_loadu_si256((const __m256i *)(rb + t * AMX_TILE))
                                      : _mm256_setzero_si256();
                __m512i x = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), perm,
                                                      _mm512_castsi256_si512(b));
                _mm512_store_si512(wb + ((q * col_tiles + t) * AMX_TILE + p) * AMX_K, x);
            }
        }
}

/* One group's softmax terms z (z[j * 16 + i]: vocab row j, label row i; n rows) as bf16 A tiles:
 * ea[i * AMX_BLOCK + j], zero past n. Each pair of vocab rows makes one register of 16 label
 * rows' pairs; 16 such registers, transposed, are 16 label rows' next 32 terms. */
static void pack_terms(const float *z, int64_t n, uint16_t *ea) {
    __m512i perm = pair_index(16);
    for (int64_t j0 = 0; j0 < AMX_BLOCK; j0 += 2 * AMX_TILE) {
        __m512i r[AMX_TILE];
        for (int p = 0; p < AMX_TILE; p++) {
            int64_t j = j0 + 2 * p;
            __m512 e0 = j < n ? _mm512_load_ps(z + j * AMX_TILE) : _mm512_setzero_ps();
            __m512 e1 = j + 1 < n ? _mm512_load_ps(z + (j + 1) * AMX_TILE) : _mm512_setzero_ps();
            __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0); /* e0's 16 values, then e1's */
            r[p] = _mm512_permutexvar_epi16(perm, both);         /* label i's pair: lane i */
        }
        transpose16(r);
        for (int i = 0; i < AMX_TILE; i++) _mm512_store_si512(ea + i * AMX_BLOCK + j0, r[i]);
    }
}

/* gd += each group's terms (A tiles, ea) times the block's rows (B tiles, wb): the gradient of
 * a block whose softmax keeps many terms, on tiles. gd holds the sums as whole tiles (`sum_tile`:
 * contiguous 1 KB each, loaded and stored at a stride of one line). Four column tiles at a time
 * stay in L1 while every group's sums go by them, loaded and stored once over the block's vocab
 * chunks: the longer the block, the fewer times the sums wait in and out of the tiles (380 rows
 * of Gemma 3 270M's head, 2 threads: the gradient's share of the pass 90 ms with blocks of 128
 * and the sums in rows of c, 78 ms with blocks of 256 and the sums as whole tiles). */
static inline float *sum_tile(float *gd, int64_t col_tiles, int64_t g, int64_t t) {
    return gd + (g * col_tiles + t) * AMX_TILE * AMX_TILE;
}

/* One group's sums of n (1-4) column tiles from t (`grad_tiles`). */
static inline __attribute__((always_inline)) void column_tiles(int64_t n, int64_t col_tiles,
                                                               int64_t t, const uint16_t *eg,
                                                               const uint16_t *wb, float *gt) {
    int64_t tile = AMX_TILE * AMX_K, sums = AMX_TILE * AMX_TILE;
    amx_load_sums(n, gt, sums, 64);
    for (int64_t q = 0; q < AMX_BLOCK / AMX_K; q++)
        amx_products(n, eg + q * AMX_K, AMX_BLOCK * 2, wb + (q * col_tiles + t) * tile, tile);
    amx_store_sums(n, gt, sums, 64);
}

static void grad_tiles(int groups, int64_t c, const uint16_t *ea, const uint16_t *wb, float *gd) {
    int64_t col_tiles = c / AMX_TILE;
    for (int64_t t = 0; t < col_tiles; t += 4) {
        int64_t n = col_tiles - t < 4 ? col_tiles - t : 4;
        for (int g = 0; g < groups; g++) {
            const uint16_t *eg = ea + g * AMX_TILE * AMX_BLOCK;
            float *gt = sum_tile(gd, col_tiles, g, t);
            if (n == 4) column_tiles(4, col_tiles, t, eg, wb, gt); /* its count a constant */
            else column_tiles(n, col_tiles, t, eg, wb, gt);
        }
    }
}

/* A thread's buffers for `block_pass_amx`. */
typedef struct {
    float *zt;      /* the block's logits, then terms: groups x AMX_BLOCK x 16 */
    float *e;       /* each row's kept terms (rows x AMX_BLOCK) ... */
    int32_t *idx;   /* ... their vocab rows, then each row's count (rows) */
    uint16_t *rows; /* the block's W rows, 64-byte aligned and zero-padded (AMX_BLOCK x c) */
    float *wide;    /* the block's rows in fp32 (AMX_BLOCK x c) */
    uint16_t *wb;   /* the block's rows as the gradient's B tiles (AMX_BLOCK x c) */
    uint16_t *ea;   /* the terms as A tiles (groups x 16 x AMX_BLOCK) */
    float *gd;      /* the gradient sums of the blocks done on tiles (`sum_tile`: groups x c / 16) */
} amx_scratch_t;

/* `block_pass` for the block [j0, j0 + n) by tiles; `next` is the thread's next block (or NULL).
 * The gradient takes the kept terms one by one, or where they are many (a flat softmax: more
 * than an eighth of the block's terms) every term of the block by tile products into b.gd. */
static void block_pass_amx(int64_t rows, int64_t c, const uint16_t *hb, const uint16_t *w,
                           int64_t v, const int64_t *labels, int64_t j0, int64_t n,
                           amx_scratch_t b, float keep_min, share_t st, float *label_logit,
                           const char *next) {
    int groups = (int)((rows + AMX_TILE - 1) / AMX_TILE);
    int32_t *kept = b.idx + rows * AMX_BLOCK;
    /* The block's rows as the tiles read them: W itself where its rows are whole 64-byte lines
     * (a tile row across two lines costs two reads: W at 16 bytes past a line took 1.5x the
     * time), else an aligned copy, which also pads a last partial block with zero rows. */
    const uint16_t *block = w + j0 * c;
    if ((uintptr_t)block % 64 != 0 || n % AMX_TILE != 0) {
        memcpy(b.rows, block, sizeof(uint16_t) * n * c);
        memset(b.rows + n * c, 0, sizeof(uint16_t) * (-n & (AMX_TILE - 1)) * c);
        block = b.rows;
    }
    int64_t chunks = c / AMX_K, group_tiles = chunks * AMX_TILE * AMX_K;
    for (int64_t t = 0; t < n; t += 2 * AMX_TILE) {
        const uint16_t *w0 = block + t * c, *w1 = w0 + AMX_TILE * c;
        int two = n - t > AMX_TILE;
        /* two groups at a time, the pair's W rows read from L1 after the first */
        const char *ahead = next != NULL ? next + t * c * 2 : NULL;
        for (int g0 = 0; g0 < groups; g0 += 2) {
            const uint16_t *h0 = hb + g0 * group_tiles, *h1 = h0 + group_tiles;
            float *zt = b.zt + (g0 * AMX_BLOCK + t) * AMX_TILE;
            const char *fetch = g0 == 0 ? ahead : NULL;
            if (groups - g0 > 1) {
                if (two) vocab_pair(1, 1, w0, w1, c, h0, h1, zt, fetch);
                else vocab_pair(0, 1, w0, w1, c, h0, h1, zt, fetch);
            } else {
                if (two) vocab_pair(1, 0, w0, w1, c, h0, h1, zt, fetch);
                else vocab_pair(0, 0, w0, w1, c, h0, h1, zt, fetch);
            }
        }
    }
    int64_t terms = 0;
    for (int g = 0; g < groups; g++) {
        int64_t r0 = (int64_t)g * AMX_TILE, live = rows - r0 < AMX_TILE ? rows - r0 : AMX_TILE;
        __mmask16 valid = (__mmask16)((1u << live) - 1);
        float *z = b.zt + g * AMX_BLOCK * AMX_TILE;
        for (int64_t r = r0; r < r0 + live; r++)
            if (labels[r] >= j0 && labels[r] < j0 + n)
                label_logit[r] = z[(labels[r] - j0) * AMX_TILE + (r - r0)];
        __m512 top = _mm512_load_ps(z);
        for (int64_t j = 1; j < n; j++) top = _mm512_max_ps(top, _mm512_load_ps(z + j * AMX_TILE));
        __m512 m = _mm512_maskz_loadu_ps(valid, st.m + r0);
        __mmask16 grew = _mm512_mask_cmp_ps_mask(valid, top, m, _CMP_GT_OQ);
        __m512 s = _mm512_maskz_loadu_ps(valid, st.s + r0);
        if (grew) { /* a new max: what was summed shrinks by exp(old - new) */
            __m512 grown = _mm512_mask_mov_ps(m, grew, top);
            __m512 shrink = (__m512)exp_nonpositive((f32v)_mm512_sub_ps(m, grown));
            s = _mm512_mul_ps(s, shrink);
            m = grown;
            _mm512_mask_storeu_ps(st.m + r0, valid, m);
            float factor[AMX_TILE];
            _mm512_storeu_ps(factor, shrink);
            for (unsigned bits = grew; st.g != NULL && bits; bits &= bits - 1) {
                int r = __builtin_ctz(bits);
                float *gr = st.g + (r0 + r) * c;
                for (int64_t k = 0; k < c; k++) gr[k] *= factor[r];
                for (int64_t t = 0; t < c / AMX_TILE; t++) {
                    float *dr = sum_tile(b.gd, c / AMX_TILE, g, t) + r * AMX_TILE;
                    for (int k = 0; k < AMX_TILE; k++) dr[k] *= factor[r];
                }
            }
        }
        /* how many terms the gradient may keep, counted as they are made: those at least
         * keep_min of the row's share before this block's terms join it (the list below keeps
         * those at least keep_min of the share after: no more than these) */
        __m512 least = _mm512_mul_ps(_mm512_set1_ps(keep_min), _mm512_max_ps(s, _mm512_set1_ps(1.0f)));
        __mmask16 counted = st.g != NULL ? valid : 0;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            __m512 ej = (__m512)exp_nonpositive((f32v)_mm512_sub_ps(_mm512_load_ps(z + j * AMX_TILE), m));
            _mm512_store_ps(z + j * AMX_TILE, ej);
            sum = _mm512_add_ps(sum, ej);
            terms += __builtin_popcount(_mm512_mask_cmp_ps_mask(counted, ej, least, _CMP_GE_OQ));
        }
        s = _mm512_add_ps(s, sum);
        _mm512_mask_storeu_ps(st.s + r0, valid, s);
    }
    if (st.g == NULL) return;
    if (terms * 8 > rows * n) { /* many (a flat softmax): every term, by tile products */
        pack_block(block, c, n, b.wb);
        for (int g = 0; g < groups; g++)
            pack_terms(b.zt + g * AMX_BLOCK * AMX_TILE, n, b.ea + g * AMX_TILE * AMX_BLOCK);
        grad_tiles(groups, c, b.ea, b.wb, b.gd);
        return;
    }
    /* few: the kept terms, packed to the front of each row's block */
    for (int g = 0; g < groups; g++) {
        int64_t r0 = (int64_t)g * AMX_TILE, live = rows - r0 < AMX_TILE ? rows - r0 : AMX_TILE;
        __mmask16 valid = (__mmask16)((1u << live) - 1);
        const float *z = b.zt + g * AMX_BLOCK * AMX_TILE;
        __m512 s = _mm512_maskz_loadu_ps(valid, st.s + r0);
        __m512 least =
            _mm512_mul_ps(_mm512_set1_ps(keep_min), _mm512_max_ps(s, _mm512_set1_ps(1.0f)));
        for (int64_t r = r0; r < r0 + live; r++) kept[r] = 0;
        for (int64_t j = 0; j < n; j++) {
            unsigned bits = _mm512_mask_cmp_ps_mask(valid, _mm512_load_ps(z + j * AMX_TILE),
                                                    least, _CMP_GE_OQ);
            for (; bits; bits &= bits - 1) {
                int64_t r = r0 + __builtin_ctz(bits);
                b.e[r * AMX_BLOCK + kept[r]] = z[j * AMX_TILE + (r - r0)];
                b.idx[r * AMX_BLOCK + kept[r]++] = (int32_t)j;
            }
        }
    }
    /* With more kept terms than vocab rows, the block's rows are widened to fp32 once rather
     * than at each term: a term then costs a quarter of the instructions. */
    int widen = terms > n;
    if (widen)
        for (int64_t j = 0; j < n; j++)
            for (int64_t k = 0; k < c; k += LANES) {
                f32v x = load_bf16v(w + (j0 + j) * c + k);
                memcpy(b.wide + j * c + k, &x, sizeof x);
            }
    for (int64_t k0 = 0; k0 < c; k0 += GRAD_VECS * LANES)
        for (int64_t r = 0; r < rows; r++) {
            if (kept[r] == 0) continue;
            const float *er = b.e + r * AMX_BLOCK;
            const int32_t *ir = b.idx + r * AMX_BLOCK;
            if (widen) grad_row(1, er, ir, kept[r], b.wide, c, 0, k0, st.g + r * c);
            else grad_row(0, er, ir, kept[r], w, c, j0, k0, st.g + r * c);
        }
}

/* All of `tunery_head_loss`'s work for a bf16 W by tiles (rows <= AMX_MAX_ROWS, c a multiple
 * of AMX_K): each thread's share into state (laid out as there), the labels' logits into
 * label_logit. Returns the threads used, or -1 out of memory. */
static int head_loss_amx(int64_t rows, int64_t c, int64_t v, const float *h, const uint16_t *w,
                         const int64_t *labels, float *state, float *label_logit, int with_grad,
                         float keep_min, int nt) {
    int64_t per = rows * (2 + (with_grad ? c : 0));
    int64_t groups = (rows + AMX_TILE - 1) / AMX_TILE, padded = groups * AMX_TILE;
    uint16_t *hb = aligned_alloc(64, sizeof(uint16_t) * padded * c);
    if (hb == NULL) return -1;
    pack_rows(rows, c, h, hb);
    int used = 1, failed = 0;
#pragma omp parallel num_threads(nt)
    {
        int t = 0, count = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), count = omp_get_num_threads();
#endif
#pragma omp single
        used = count;
        float *mine = state + per * t;
        share_t st = {mine, mine + rows, with_grad ? mine + 2 * rows : NULL};
        /* the running max starts at the label's logit, as the tiles round it */
        for (int64_t r = 0; r < rows; r++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < c; k++)
                acc += bf16_to_f32(f32_to_bf16(h[r * c + k])) * bf16_to_f32(w[labels[r] * c + k]);
            st.m[r] = acc, st.s[r] = 0.0f;
        }
        if (st.g != NULL) memset(st.g, 0, sizeof(float) * rows * c);
        amx_scratch_t b = {
            aligned_alloc(64, sizeof(float) * padded * AMX_BLOCK),
            malloc(sizeof(float) * rows * AMX_BLOCK),
            malloc(sizeof(int32_t) * rows * (AMX_BLOCK + 1)),
            aligned_alloc(64, sizeof(uint16_t) * AMX_BLOCK * c),
            with_grad ? aligned_alloc(64, sizeof(float) * AMX_BLOCK * c) : NULL,
            with_grad ? aligned_alloc(64, sizeof(uint16_t) * AMX_BLOCK * c) : NULL,
            with_grad ? aligned_alloc(64, sizeof(uint16_t) * padded * AMX_BLOCK) : NULL,
            with_grad ? aligned_alloc(64, sizeof(float) * padded * c) : NULL,
        };
        int ok = b.zt != NULL && b.e != NULL && b.idx != NULL && b.rows != NULL &&
                 (!with_grad || (b.wide != NULL && b.wb != NULL && b.ea != NULL && b.gd != NULL));
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        if (ok) {
            if (b.gd != NULL) memset(b.gd, 0, sizeof(float) * padded * c);
            amx_configure();
            int64_t blocks = (v + AMX_BLOCK - 1) / AMX_BLOCK;
            for (int64_t k = t; k < blocks; k += count) {
                int64_t j0 = k * AMX_BLOCK, n = v - j0 < AMX_BLOCK ? v - j0 : AMX_BLOCK;
                int64_t after = k + count; /* this thread's next block, fetched meanwhile */
                const char *next = after * AMX_BLOCK + AMX_BLOCK <= v
                                       ? (const char *)(w + after * AMX_BLOCK * c) : NULL;
                block_pass_amx(rows, c, hb, w, v, labels, j0, n, b, keep_min, st, label_logit,
                               next);
            }
            _tile_release();
            if (st.g != NULL) /* the tiles' sums join the kept terms' (one running max) */
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t t = 0; t < c / AMX_TILE; t++) {
                        const float *dr = sum_tile(b.gd, c / AMX_TILE, r / AMX_TILE, t) +
                                          (r % AMX_TILE) * AMX_TILE;
                        for (int k = 0; k < AMX_TILE; k++) st.g[r * c + t * AMX_TILE + k] += dr[k];
                    }
        }
        free(b.zt);
        free(b.e);
        free(b.idx);
        free(b.rows);
        free(b.wide);
        free(b.wb);
        free(b.ea);
        free(b.gd);
    }
    free(hb);
    return failed ? -1 : used;
}

/* Whether `tunery_head_loss` multiplies a bf16 W by AMX tiles here (for up to this many rows),
 * 0 where not: the build's CPU or the kernel lacks them. */
int tunery_head_loss_amx_rows(void) { return amx_permitted() ? AMX_MAX_ROWS : 0; }
#else
int tunery_head_loss_amx_rows(void) { return 0; }
#endif

/* h . W_j: a label's logit, a lower bound of its row's max (bf16.h's dot products). */
static float logit(int fp32, const float *h, const void *w, int64_t c, int64_t j) {
    return fp32 ? dot_f32_f32(h, (const float *)w + j * c, c)
                : dot_f32_bf16(h, (const uint16_t *)w + j * c, c);
}

/* For each of `rows` label rows h_r (fp32, rows x c, contiguous) and label y_r: loss[r] =
 * logsumexp(W h_r) - (W h_r)[y_r] and, when `grad` is non-NULL, grad[r] = W^T (softmax(W h_r) -
 * onehot(y_r)) (rows x c), its softmax terms below `keep_min` left out. W (v x c) fp32 (`fp32`
 * nonzero) or bf16, contiguous.
 * Returns 0; -1 out of memory; -2 a label outside [0, v); -3 c not a multiple of the tiles'. */
int tunery_head_loss(int64_t rows, int64_t c, int64_t v, const float *h, const void *w, int fp32,
                     const int64_t *labels, float *loss, float *grad, float keep_min, int threads) {
    if (c % (GRAD_VECS * LANES) != 0) return -3;
    for (int64_t r = 0; r < rows; r++)
        if (labels[r] < 0 || labels[r] >= v) return -2;
    if (rows == 0) return 0;
    int nt = threads > 0 ? threads : 1;
    int64_t per = rows * (2 + (grad != NULL ? c : 0)); /* one share's m, s and g */
    float *state = malloc(sizeof(float) * per * nt);
    float *label_logit = malloc(sizeof(float) * rows);
    int failed = state == NULL || label_logit == NULL;
    int used = 1;
#if AMX
    if (!failed && !fp32 && rows <= AMX_MAX_ROWS && c % AMX_K == 0 && amx_permitted()) {
        used = head_loss_amx(rows, c, v, h, w, labels, state, label_logit, grad != NULL, keep_min,
                             nt);
        failed = used < 0;
    } else
#endif
    if (!failed) {
#pragma omp parallel num_threads(nt)
        {
            int t = 0, count = 1;
#ifdef _OPENMP
            t = omp_get_thread_num(), count = omp_get_num_threads();
#endif
#pragma omp single
            used = count;
            float *mine = state + per * t;
            share_t st = {mine, mine + rows, grad != NULL ? mine + 2 * rows : NULL};
            /* the running max starts at the label's logit (the max is at least that), so the
             * gradient leaves terms out from the first block on */
            for (int64_t r = 0; r < rows; r++)
                st.m[r] = logit(fp32, h + r * c, w, c, labels[r]), st.s[r] = 0.0f;
            if (st.g != NULL) memset(st.g, 0, sizeof(float) * rows * c);
            float *z = aligned_alloc(64, sizeof(float) * rows * BLOCK);
            /* each row's kept terms (rows x BLOCK), then their counts (rows) */
            int32_t *idx = malloc(sizeof(int32_t) * rows * (BLOCK + 1));
            int32_t *kept = idx != NULL ? idx + rows * BLOCK : NULL;
            if (z != NULL) /* a partial block's lanes past its rows are exponentiated, not read */
                memset(z, 0, sizeof(float) * rows * BLOCK);
            if (z == NULL || idx == NULL) {
#pragma omp atomic write
                failed = 1;
            }
            /* the threads take turns over the blocks, so that each meets the likely maxima
             * early wherever they lie (single characters, often the max, end Gemma's vocab) */
            int64_t blocks = (v + BLOCK - 1) / BLOCK;
            for (int64_t b = t; b < blocks && z != NULL && idx != NULL; b += count) {
                int64_t j0 = b * BLOCK, n = v - j0 < BLOCK ? v - j0 : BLOCK;
                if (fp32) block_pass(1, rows, c, h, w, labels, j0, n, z, idx, kept, keep_min, st,
                                        label_logit);
                else block_pass(0, rows, c, h, w, labels, j0, n, z, idx, kept, keep_min, st,
                                        label_logit);
            }
            free(z);
            free(idx);
        }
    }
    if (failed) {
        free(state);
        free(label_logit);
        return -1;
    }
    for (int64_t r = 0; r < rows; r++) {
        float top = -INFINITY;
        for (int t = 0; t < used; t++) top = fmaxf(top, state[per * t + r]);
        double sum = 0.0;
        for (int t = 0; t < used; t++) {
            const float *mine = state + per * t;
            float weight = expf(mine[r] - top);
            sum += (double)mine[rows + r] * weight;
            if (grad == NULL) continue;
            float *gr = grad + r * c;
            const float *share = mine + 2 * rows + r * c;
            for (int64_t k = 0; k < c; k++) gr[k] = (t == 0 ? 0.0f : gr[k]) + share[k] * weight;
        }
        loss[r] = top + (float)log(sum) - label_logit[r];
        if (grad == NULL) continue;
        float inv = (float)(1.0 / sum), *gr = grad + r * c;
        for (int64_t k = 0; k < c; k++)
            gr[k] = gr[k] * inv - (fp32 ? ((const float *)w)[labels[r] * c + k]
                                        : bf16_to_f32(((const uint16_t *)w)[labels[r] * c + k]));
    }
    free(state);
    free(label_logit);
    return 0;
}

/* LANES logits of a row from index j, widened from bf16 unless `fp32`; and back. */
static inline f32v load_z(const void *z, int fp32, int64_t j) {
    return fp32 ? load_f32v((const float *)z + j) : load_bf16v((const uint16_t *)z + j);
}

static inline void store_z(void *z, int fp32, int64_t j, f32v x) {
    if (fp32) memcpy((float *)z + j, &x, sizeof x);
#ifdef __AVX512BF16__ /* to nearest even in one instruction (denormals to zero: < 2^-126) */
    else _mm256_storeu_si256((__m256i *)((uint16_t *)z + j), (__m256i)_mm512_cvtneps_pbh((__m512)x));
#else
    else store_bf16v((uint16_t *)z + j, x);
#endif
}

static inline float load_z1(const void *z, int fp32, int64_t j) {
    return fp32 ? ((const float *)z)[j] : bf16_to_f32(((const uint16_t *)z)[j]);
}

static inline void store_z1(void *z, int fp32, int64_t j, float x) {
    if (fp32) ((float *)z)[j] = x;
    else ((uint16_t *)z)[j] = f32_to_bf16(x);
}

/* One row of n logits z, in place: softmax(z) - onehot(label), and its loss. Three passes (the
 * max, the sum of exp(z - max), the terms), the row read from cache after the first. */
static float softmax_xent_row(int64_t n, void *z, int fp32, int64_t label) {
    f32v top_v = broadcast_v(-INFINITY);
    int64_t tail = n - n % LANES;
    for (int64_t j = 0; j < tail; j += LANES) {
        f32v x = load_z(z, fp32, j);
        u32v greater = (u32v)(x > top_v), xb, tb;
        memcpy(&xb, &x, sizeof x);
        memcpy(&tb, &top_v, sizeof top_v);
        tb = (xb & greater) | (tb & ~greater);
        memcpy(&top_v, &tb, sizeof tb);
    }
    float top = -INFINITY;
    for (int l = 0; l < LANES; l++) top = fmaxf(top, top_v[l]);
    for (int64_t j = tail; j < n; j++) top = fmaxf(top, load_z1(z, fp32, j));
    f32v m = broadcast_v(top), acc = {0};
    for (int64_t j = 0; j < tail; j += LANES) acc += exp_v(load_z(z, fp32, j) - m);
    float sum = sum_lanes(acc);
    for (int64_t j = tail; j < n; j++) sum += expf(load_z1(z, fp32, j) - top);
    float picked = load_z1(z, fp32, label), inv = 1.0f / sum;
    f32v inv_v = broadcast_v(inv);
    for (int64_t j = 0; j < tail; j += LANES)
        store_z(z, fp32, j, exp_v(load_z(z, fp32, j) - m) * inv_v);
    for (int64_t j = tail; j < n; j++) store_z1(z, fp32, j, expf(load_z1(z, fp32, j) - top) * inv);
    store_z1(z, fp32, label, expf(picked - top) * inv - 1.0f);
    return top + logf(sum) - picked;
}

/* For each of `rows` rows of v logits z (bf16, or fp32 where `fp32`; contiguous), in place: the
 * row becomes d loss / d z = softmax(z) - onehot(label), rounded to z's type, and loss[r] =
 * logsumexp(z) - z[label] in fp32 (from the logits, not from a rounded probability). torch's
 * softmax plus the label's update take 3-4x as long over a chunk of the vocab head's logits.
 * Returns 0; -2 a label outside [0, v). */
int tunery_softmax_xent(int64_t rows, int64_t v, void *z, int fp32, const int64_t *labels,
                        float *loss, int threads) {
    for (int64_t r = 0; r < rows; r++)
        if (labels[r] < 0 || labels[r] >= v) return -2;
    size_t item = fp32 ? sizeof(float) : sizeof(uint16_t);
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        loss[r] = softmax_xent_row(v, (char *)z + (size_t)r * v * item, fp32, labels[r]);
    return 0;
}
