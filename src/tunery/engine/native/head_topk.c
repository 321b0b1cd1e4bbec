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
        /* each row: the threads' heaps into the first one's, then largest first */
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
