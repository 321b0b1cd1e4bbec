/* A top-k sampler's inputs from a bf16 vocab head: each row's k largest logits and their tokens,
 * in one read of the head, without the (rows, vocab) logits.
 *
 * Sampling needs exact logits of the best tokens, which the int8 scan's bounds (`head.c`) cannot
 * narrow to a few for k in the tens: its error bounds are ~4 logits wide on Gemma's states,
 * so the 64th largest leaves 7k-49k tokens whose bound reaches it. So the head is multiplied in
 * full, by AMX tiles that read it as it lies: a tile A is 16 vocab rows x 32 inputs (64 bytes of
 * each row, one row stride apart), B the rows' 32 inputs in pairs (packed once a call), C the
 * 16 x 16 sums. Each logit is rounded to bf16, as a bf16 head's are, and offered to its row's
 * heap of the k largest (a vector compare with the rows' k-th largest so far; few pass once
 * the heaps fill). The full logits would be written and read back by a top-k: 16 MB for 32
 * rows of Gemma's 262k vocabulary, and torch's bf16 matmul and topk took ~44 ms there.
 *
 * A logit depends only on its row and vocab row (a C element is its A row times its B column),
 * the vocabulary's split between threads only on the thread count, and the heaps' order only on
 * (value, token): a row gets the same k in any batch and with any thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "amx.h"
#include "blocks.h"

#define TILE_IN 32 /* inputs per tile */

/* Whether `tunery_head_topk` runs here: AMX tiles. */
int tunery_head_topk_supported(void) {
#if AMX
    return amx_permitted();
#else
    return 0;
#endif
}

#if AMX

typedef struct {
    float value;
    int64_t token;
} scored;

/* The heaps keep the k largest: a min-heap where, on equal values, a larger token is smaller
 * (so the first of equal tokens stays, as greedy and a stable sort keep them). */
static inline int below(scored a, scored b) {
    return a.value < b.value || (a.value == b.value && a.token > b.token);
}

static void sift_down(scored *heap, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, m = i;
        if (l < n && below(heap[l], heap[m])) m = l;
        if (l + 1 < n && below(heap[l + 1], heap[m])) m = l + 1;
        if (m == i) return;
        scored t = heap[i];
        heap[i] = heap[m], heap[m] = t;
        i = m;
    }
}

/* Offers x to a heap of up to k holding n; the new count. */
static int64_t heap_offer(scored *heap, int64_t n, int64_t k, scored x) {
    if (n < k) {
        int64_t i = n++;
        heap[i] = x;
        while (i > 0 && below(heap[i], heap[(i - 1) / 2])) {
            scored t = heap[i];
            heap[i] = heap[(i - 1) / 2], heap[(i - 1) / 2] = t;
            i = (i - 1) / 2;
        }
    } else if (below(heap[0], x)) {
        heap[0] = x;
        sift_down(heap, n, 0);
    }
    return n;
}

/* One thread's heaps, one per row: its k largest of the vocab rows it reads. */
typedef struct {
    scored *heap;   /* rows x k */
    int64_t *count; /* rows */
    float *least;   /* rows rounded up to 16: a full heap's smallest value, else -inf */
} heaps;

/* h (rows, c) bf16 → hp: for row group g (16 rows, zero-padded) and input chunk q, the B tile
 * of 16 input pairs p, each with the 16 rows' pair (h[16g + n][32q + 2p], ..[32q + 2p + 1]). */
static void pack_rows(int64_t rows, int64_t c, const uint16_t *h, int64_t h_stride,
                      int64_t groups, uint16_t *hp) {
    int64_t chunks = c / TILE_IN;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t q = 0; q < chunks; q++) {
            uint16_t *t = hp + (g * chunks + q) * 16 * TILE_IN;
            for (int p = 0; p < TILE_IN / 2; p++)
                for (int n = 0; n < 16; n++)
                    for (int e = 0; e < 2; e++) {
                        int64_t r = 16 * g + n;
                        t[p * 32 + 2 * n + e] =
                            r < rows ? h[r * h_stride + TILE_IN * q + 2 * p + e] : 0;
                    }
        }
}

/* The sums of vocab rows v0 .. v0 + 15 (one per line of `sums`, its 16 row-group rows across)
 * into the heaps of rows 16g .. 16g + 15, each rounded to bf16 first. */
static void offer_tile(float sums[16][16], int64_t v0, int64_t v_count, int64_t g, int64_t rows,
                       int64_t k, heaps *hs) {
    int64_t r0 = 16 * g;
    __mmask16 live = rows - r0 >= 16 ? 0xffff : (__mmask16)((1u << (rows - r0)) - 1);
    for (int m = 0; m < 16 && v0 + m < v_count; m++) {
        __m512 v = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(_mm512_load_ps(sums[m])));
        __mmask16 pass =
            _mm512_mask_cmp_ps_mask(live, v, _mm512_loadu_ps(hs->least + r0), _CMP_GT_OQ);
        if (!pass) continue;
        float values[16] __attribute__((aligned(64)));
        _mm512_store_ps(values, v);
        for (; pass; pass &= pass - 1) {
            int64_t r = r0 + __builtin_ctz(pass);
            scored *heap = hs->heap + r * k;
            hs->count[r] = heap_offer(heap, hs->count[r], k, (scored){values[r - r0], v0 + m});
            if (hs->count[r] == k) hs->least[r] = heap[0].value;
        }
    }
}

/* Vocab rows [v_lo, v_hi) (multiples of 32, or v_hi the padded end) against every row, their
 * logits offered to `hs`. w's rows past v_count are read from `tail` (32 rows, zero-padded). */
static void scan_vocab(int64_t v_lo, int64_t v_hi, int64_t v_count, int64_t c, const uint16_t *w,
                       const uint16_t *tail, const uint16_t *hp, int64_t groups, int64_t rows,
                       int64_t k, heaps *hs) {
    int64_t chunks = c / TILE_IN, stride = 2 * c, tile = 16 * TILE_IN;
    float sums[4][16][16] __attribute__((aligned(64)));
    for (int64_t v0 = v_lo; v0 < v_hi; v0 += 32) {
        const uint16_t *a0 = v0 + 32 <= v_count ? w + v0 * c : tail, *a1 = a0 + 16 * c;
        const char *next = (const char *)(a0 + 32 * c); /* the next 32 rows, contiguous */
        int prefetch = v0 + 64 <= v_count;
        for (int64_t g0 = 0; g0 < groups; g0 += 2) {
            int both = groups - g0 > 1;
            const uint16_t *b0 = hp + g0 * chunks * tile, *b1 = b0 + chunks * tile;
            amx_zero_sums();
            for (int64_t q = 0; q < chunks; q++) {
                if (g0 == 0 && prefetch) /* 32 lines a step: all 32 rows by the last */
                    for (int l = 0; l < 32; l++) _mm_prefetch(next + (q * 32 + l) * 64, _MM_HINT_T0);
                _tile_loadd(4, a0 + q * TILE_IN, stride);
                _tile_loadd(5, a1 + q * TILE_IN, stride);
                _tile_loadd(6, b0 + q * tile, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 5, 6);
                if (both) {
                    _tile_loadd(7, b1 + q * tile, 64);
                    _tile_dpbf16ps(2, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, sums[0], 64);
            _tile_stored(1, sums[1], 64);
            if (both) _tile_stored(2, sums[2], 64);
            if (both) _tile_stored(3, sums[3], 64);
            for (int t = 0; t < (both ? 4 : 2); t++)
                offer_tile(sums[t], v0 + 16 * (t & 1), v_count, g0 + t / 2, rows, k, hs);
        }
    }
}

/* The sums of rows 16g .. 16g + 15 (one per line of `sums`) by vocab rows v0 .. v0 + 15 (its
 * columns) into those rows' heaps, each rounded to bf16 first: `offer_tile` transposed, each
 * row's tokens in order. */
static void offer_rows(float sums[16][16], int64_t v0, int64_t g, int64_t rows, int64_t k,
                       heaps *hs) {
    for (int i = 0; i < 16 && 16 * g + i < rows; i++) {
        int64_t r = 16 * g + i;
        __m512 v = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(_mm512_load_ps(sums[i])));
        __mmask16 pass = _mm512_cmp_ps_mask(v, _mm512_set1_ps(hs->least[r]), _CMP_GT_OQ);
        if (!pass) continue;
        float values[16] __attribute__((aligned(64)));
        _mm512_store_ps(values, v);
        scored *heap = hs->heap + r * k;
        for (; pass; pass &= pass - 1) {
            int m = __builtin_ctz(pass);
            hs->count[r] = heap_offer(heap, hs->count[r], k, (scored){values[m], v0 + m});
            if (hs->count[r] == k) hs->least[r] = heap[0].value;
        }
    }
}

/* Vocab tile pairs [p_lo, p_hi) of a head packed as GGUF blocks (`blocks.h`, `chunks` records
 * per 16 vocab rows) against every row of xp (groups x 16 rows of c, zero-padded), as
 * `tiles.c` multiplies: each tile made back into bf16 once, in `strip`, for every row group. */
static void scan_blocks(int64_t p_lo, int64_t p_hi, int64_t tiles, int64_t c, const uint8_t *wp,
                        int sets, int offsets, const uint16_t *xp, int64_t groups, int64_t rows,
                        int64_t k, uint16_t *strip, heaps *hs) {
    int64_t chunks = c / TILE_IN, rec = blocks_record(sets, offsets), tile = 16 * TILE_IN;
    float sums[2][2][16][16] __attribute__((aligned(64)));
    for (int64_t pr = p_lo; pr < p_hi; pr++) {
        int64_t o = 2 * pr;
        int two = o + 1 < tiles;
        const uint8_t *r0 = wp + o * chunks * rec, *r1 = r0 + chunks * rec;
        for (int64_t g0 = 0; g0 < groups; g0 += 2) {
            int both = groups - g0 > 1;
            const uint16_t *x0 = xp + g0 * 16 * c, *x1 = x0 + 16 * c;
            amx_zero_sums();
            for (int64_t q = 0; q < chunks; q++) {
                uint16_t *b0 = strip + q * 2 * tile, *b1 = b0 + tile;
                if (g0 == 0) {
                    const char *ahead = (const char *)(r0 + q * rec) + 16384;
                    for (int l = 0; l < rec / 64; l++) _mm_prefetch(ahead + l * 64, _MM_HINT_T0);
                    for (int l = 0; two && l < rec / 64; l++)
                        _mm_prefetch(ahead + chunks * rec + l * 64, _MM_HINT_T0);
                    dequantize(r0 + q * rec, sets, offsets, b0);
                    if (two) dequantize(r1 + q * rec, sets, offsets, b1);
                }
                _tile_loadd(4, b0, 64);
                _tile_loadd(6, x0 + q * TILE_IN, 2 * c);
                _tile_dpbf16ps(0, 6, 4);
                if (two) {
                    _tile_loadd(5, b1, 64);
                    _tile_dpbf16ps(1, 6, 5);
                }
                if (both) {
                    _tile_loadd(7, x1 + q * TILE_IN, 2 * c);
                    _tile_dpbf16ps(2, 7, 4);
                    if (two) _tile_dpbf16ps(3, 7, 5);
                }
            }
            _tile_stored(0, sums[0][0], 64);
            if (two) _tile_stored(1, sums[0][1], 64);
            if (both) _tile_stored(2, sums[1][0], 64);
            if (both && two) _tile_stored(3, sums[1][1], 64);
            for (int g = 0; g <= both; g++)
                for (int m = 0; m <= two; m++)
                    offer_rows(sums[g][m], 16 * (o + m), g0 + g, rows, k, hs);
        }
    }
}

/* The threads' heaps (`heap` threads x rows x k, `count` threads x rows) into each row's k
 * largest, largest first, into values and tokens (token -1 first: fewer than k finite). */
static void merge_heaps(int64_t rows, int64_t k, int threads, scored *heap, int64_t *count,
                        float *values, int64_t *tokens) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        scored *mine = heap + r * k;
        int64_t n = count[r];
        for (int t = 1; t < threads; t++)
            for (int64_t i = 0; i < count[t * rows + r]; i++)
                n = heap_offer(mine, n, k, heap[(t * rows + r) * k + i]);
        if (n < k) {
            tokens[r * k] = -1;
            continue;
        }
        for (int64_t end = k - 1; end > 0; end--) { /* the smallest to the back */
            scored s = mine[0];
            mine[0] = mine[end], mine[end] = s;
            sift_down(mine, end, 0);
        }
        for (int64_t i = 0; i < k; i++) {
            values[r * k + i] = mine[i].value;
            tokens[r * k + i] = mine[i].token;
        }
    }
}

#endif

/* values (rows, k) fp32, tokens (rows, k): row r's k largest logits h_r.W^T (h, W (v_count, c)
 * bf16, c a multiple of 32, W's rows contiguous), each an AMX fp32 sum rounded to bf16, largest
 * first, the first of equal ones first; tokens[r * k] = -1 for a row with fewer than k finite
 * logits (the caller takes it another way). 1 <= k <= v_count. Returns 0; -1 out of memory or
 * where it does not run (no tiles, shapes). */
int tunery_head_topk(int64_t rows, int64_t c, int64_t v_count, const uint16_t *h,
                     int64_t h_stride, const uint16_t *w, int64_t k, float *values,
                     int64_t *tokens, int threads) {
#if AMX
    if (!amx_permitted() || rows < 1 || c % TILE_IN || k < 1 || k > v_count) return -1;
    if (threads < 1) threads = 1;
    int64_t groups = (rows + 15) / 16, rows16 = groups * 16, pairs = (v_count + 31) / 32;
    uint16_t *hp = aligned_alloc(64, sizeof(uint16_t) * groups * c * 16);
    uint16_t *tail = aligned_alloc(64, sizeof(uint16_t) * 32 * c);
    scored *heap = malloc(sizeof(scored) * threads * rows * k);
    int64_t *count = calloc(threads * rows, sizeof(int64_t));
    float *least = malloc(sizeof(float) * threads * rows16);
    int status = hp && tail && heap && count && least ? 0 : -1;
    if (status == 0) {
        pack_rows(rows, c, h, h_stride, groups, hp);
        int64_t last = (pairs - 1) * 32; /* the last 32 rows, zero-padded */
        memset(tail, 0, sizeof(uint16_t) * 32 * c);
        memcpy(tail, w + last * c, sizeof(uint16_t) * (v_count - last) * c);
        for (int64_t i = 0; i < threads * rows16; i++) least[i] = -INFINITY;
#pragma omp parallel num_threads(threads)
        {
            int t = 0, nt = 1;
#ifdef _OPENMP
            t = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
            heaps hs = {heap + t * rows * k, count + t * rows, least + t * rows16};
            amx_configure();
            scan_vocab(32 * (pairs * t / nt), 32 * (pairs * (t + 1) / nt), v_count, c, w, tail,
                       hp, groups, rows, k, &hs);
            _tile_release();
        }
        merge_heaps(rows, k, threads, heap, count, values, tokens);
    }
    free(least);
    free(count);
    free(heap);
    free(tail);
    free(hp);
    return status;
#else
    (void)rows, (void)c, (void)v_count, (void)h, (void)h_stride, (void)w, (void)k;
    (void)values, (void)tokens, (void)threads;
    return -1;
#endif
}

/* `tunery_head_topk` for a head W (v_count, c) packed as GGUF blocks (`tiles.c`'s
 * `tunery_qtiles_pack`, `sets` scale sets, `offsets`), each tile made back into the bf16 values
 * the blocks round to, as `tiles.c` does: the same logits as the bf16 head of those values (an
 * AMX sum takes its products in the same order whichever operand holds the weights), reading
 * ~1.06 bytes a weight for Q8_0 instead of 2. v_count a multiple of 16. */
int tunery_head_topk_blocks(int64_t rows, int64_t c, int64_t v_count, const uint16_t *h,
                            int64_t h_stride, const uint8_t *wp, int64_t sets, int64_t offsets,
                            int64_t k, float *values, int64_t *tokens, int threads) {
#if AMX
    if (!amx_permitted() || rows < 1 || c % TILE_IN || v_count % 16 || k < 1 || k > v_count ||
        (sets != 1 && sets != 2))
        return -1;
    if (threads < 1) threads = 1;
    int64_t groups = (rows + 15) / 16, rows16 = groups * 16, tiles = v_count / 16;
    int64_t pairs = (tiles + 1) / 2;
    uint16_t *xp = aligned_alloc(64, sizeof(uint16_t) * rows16 * c);
    scored *heap = malloc(sizeof(scored) * threads * rows * k);
    int64_t *count = calloc(threads * rows, sizeof(int64_t));
    float *least = malloc(sizeof(float) * threads * rows16);
    int status = xp && heap && count && least ? 0 : -1;
    if (status == 0) {
        for (int64_t r = 0; r < rows16; r++) { /* the rows, zero-padded to whole groups */
            if (r < rows) memcpy(xp + r * c, h + r * h_stride, sizeof(uint16_t) * c);
            else memset(xp + r * c, 0, sizeof(uint16_t) * c);
        }
        for (int64_t i = 0; i < threads * rows16; i++) least[i] = -INFINITY;
#pragma omp parallel num_threads(threads) reduction(| : status)
        {
            int t = 0, nt = 1;
#ifdef _OPENMP
            t = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
            heaps hs = {heap + t * rows * k, count + t * rows, least + t * rows16};
            uint16_t *strip = aligned_alloc(64, sizeof(uint16_t) * (c / TILE_IN) * 2 * 16 * TILE_IN);
            if (strip == NULL) {
                status = -1;
            } else {
                amx_configure();
                scan_blocks(pairs * t / nt, pairs * (t + 1) / nt, tiles, c, wp, (int)sets,
                            offsets != 0, xp, groups, rows, k, strip, &hs);
                _tile_release();
                free(strip);
            }
        }
        if (status == 0) merge_heaps(rows, k, threads, heap, count, values, tokens);
    }
    free(least);
    free(count);
    free(heap);
    free(xp);
    return status;
#else
    (void)rows, (void)c, (void)v_count, (void)h, (void)h_stride, (void)wp, (void)sets;
    (void)offsets, (void)k, (void)values, (void)tokens, (void)threads;
    return -1;
#endif
}
