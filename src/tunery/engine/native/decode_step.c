/* A whole decode step of Gemma 3 in one call: every layer's norms, projections (AMX tiles),
 * LoRA deltas, q/k heads, attention and MLP for a batch of rows, each row on its own KV cache and
 * adapter, by the kernels the step otherwise takes one Python call each for.
 *
 * A 32-row step is ~300 small ops; called from Python each cost ~20-40 us of interpreter and
 * dispatch on one core while the other core's OpenMP worker waits (perf: ~30% of the decode
 * thread's time, the worker spinning meanwhile). Here they are C calls one after another, each
 * the same kernel with the same arguments, so a row gets exactly the bits the Python step gives
 * it (`batch_decode.step_rows`), and so the same alone as in any batch.
 *
 * The MLP's gelu-tanh(gate) * up is torch's arithmetic: its op order, its tanh (SLEEF's
 * `Sleef_tanhf16_u10`, the one torch's AVX-512 kernels call, whose address the caller passes),
 * rounded to bf16 after the gelu and again after the product, as `F.gelu(gate) * up` does. The
 * gelu of a bf16 gate has 2^16 possible inputs, so it is worked out once for each of them
 * (`tunery_gelu_table`) and looked up: SLEEF's tanh on every gate of a 32-row step took ~2 ms.
 *
 * bf16 only, with AMX (the tiles): elsewhere the caller keeps the Python step.
 */
#include <stdlib.h>

#include "amx.h"
#include "elem.h"

#if AMX && !defined(TUNERY_FP32)

/* The kernels it runs (the other files' exported functions, bf16 builds) */
void tunery_rms_norm(int64_t rows, int64_t heads, int64_t n, const elem_t *x, int64_t x_stride,
                     const float *w, float eps, elem_t *out, int64_t out_stride, int threads);
int tunery_tiles_linear(int64_t rows, int64_t in, int64_t out, const uint16_t *x,
                        const uint16_t *wp, uint16_t *y, int threads);
int tunery_qtiles_linear(int64_t rows, int64_t in, int64_t out, const uint16_t *x,
                         const uint8_t *wp, int64_t sets, int64_t offsets, uint16_t *y,
                         int threads);
int tunery_lora_add(int64_t spans, const int64_t *row_lo, const int64_t *row_hi,
                    const int64_t *const *desc, const elem_t *x, int64_t x_stride, elem_t *base,
                    int64_t base_stride, int threads);
void tunery_qk_norm_rope(int64_t rows, int64_t nh, int64_t nkv, int64_t hd, const elem_t *qkv,
                         int64_t stride, const float *q_w, const float *k_w, float eps,
                         const elem_t *cos, const elem_t *sin, const int64_t *pos, elem_t *q_out,
                         int64_t q_head, int64_t q_row, elem_t *k_out, int64_t k_head,
                         int64_t k_row, float *rstd, int threads);
int tunery_decode_attention(int64_t rows, int64_t nh, int64_t nkv, int64_t hd, const elem_t *q,
                            const elem_t *k_new, int64_t k_stride, const elem_t *v_new,
                            int64_t v_stride, elem_t *const *k_cache, elem_t *const *v_cache,
                            const int64_t *pos, const int64_t *size, float scale, elem_t *out,
                            int threads);

typedef __m512 (*tanh16_fn)(__m512);

/* The model as `model` lays it out (int64 fields, pointers as integers): */
enum { M_LAYERS, M_HIDDEN, M_HEADS, M_KV_HEADS, M_HEAD_DIM, M_FF, M_FINAL_NORM, M_FIELDS };
/* then per layer: the four projections packed for the tiles (in `GROUPS` order: qkv, o, gu,
 * down), the six norms' fp32 weights, its RoPE kind's cos and sin tables (bf16, hd wide), and
 * each projection's pack (`tiles.c`): 0 bf16, else GGUF blocks with (kind & 3)
 * scale sets and (kind >> 2) offsets */
#define GROUPS 4
enum {
    L_QKV, L_O, L_GU, L_DOWN, L_LN_IN, L_Q_NORM, L_K_NORM, L_LN_POST_ATTN, L_LN_PRE_FF,
    L_LN_POST_FF, L_COS, L_SIN, L_KIND, L_FIELDS = L_KIND + GROUPS
};

/* y (rows, out) = x (rows, in) W^T for the layer's projection g, by its pack's kernel */
static int project(const int64_t *L, int g, int64_t rows, int64_t in, int64_t out,
                   const elem_t *x, elem_t *y, int threads) {
    const void *w = (const void *)(intptr_t)L[L_QKV + g];
    int64_t kind = L[L_KIND + g];
    if (kind == 0) return tunery_tiles_linear(rows, in, out, x, w, y, threads);
    return tunery_qtiles_linear(rows, in, out, x, w, kind & 3, kind >> 2, y, threads);
}

/* x += y, both (n values) bf16: in fp32, rounded once, as torch's bf16 add */
static void add_into(elem_t *x, const elem_t *y, int64_t n) {
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) store_elemv(x + j, load_elemv(x + j) + load_elemv(y + j));
    for (; j < n; j++) x[j] = f32_to_elem(elem_to_f32(x[j]) + elem_to_f32(y[j]));
}

/* table[b] = torch's bf16 `F.gelu(x, approximate="tanh")` of the bf16 value x with bits b, for
 * each of the 2^16 (see the top): a gate is a bf16 value, so the step's gelu is a lookup of
 * these. table holds 2^16 + 1 values (the last a pad for the gathers' 4-byte reads). */
void tunery_gelu_table(tanh16_fn tanh16, uint16_t *table) {
    const __m512 beta = _mm512_set1_ps((float)(0.7978845608028654)), /* sqrt(2 / pi) */
        kappa = _mm512_set1_ps(0.044715f), half = _mm512_set1_ps(0.5f),
        one = _mm512_set1_ps(1.0f);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int32_t b = 0; b < 1 << 16; b += 16) {
        __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32(b), iota), 16);
        __m512 x = _mm512_castsi512_ps(bits);
        __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        __m512 inner = _mm512_mul_ps(beta, _mm512_add_ps(x, _mm512_mul_ps(kappa, cube)));
        __m512 g = _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, tanh16(inner)));
        store_bf16v(table + b, (f32v)g);
    }
    table[1 << 16] = 0;
}

/* out (rows, f) = gelu_tanh(gate) * up of gu's rows (gate, up: f each), as torch computes
 * `F.gelu(gate, approximate="tanh") * up` in bf16: the gelu from `tunery_gelu_table`'s table,
 * the product in fp32 rounded to bf16. f a multiple of 16. */
void tunery_gelu_times_torch(int64_t rows, int64_t f, const elem_t *gu, elem_t *out,
                             const uint16_t *table, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < f; j += 16) {
            const __m256i *gate = (const __m256i *)(gu + r * 2 * f + j);
            __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(gate));
            __m512i g = _mm512_slli_epi32(_mm512_i32gather_epi32(b, table, 2), 16);
            f32v gelu = (f32v)_mm512_castsi512_ps(g);
            store_bf16v(out + r * f + j, gelu * load_bf16v(gu + r * 2 * f + f + j));
        }
}

/* One decode step for `rows` rows: x (rows, hidden) bf16, the tokens' scaled embeddings, is the
 * residual stream (overwritten); out (rows, hidden) its final norm. Row r is at position pos[r]
 * of its caches: layer i's K and V at k_cache[i * rows + r], v_cache[...] (kv_heads, size, hd),
 * ring size sizes[i * rows + r]. `spans` runs of rows [row_lo, row_hi) share an adapter: layer
 * i's group g's `lora_delta.c` desc for span s at lora[(i * GROUPS + g) * spans + s] (0: none).
 * gelu: `tunery_gelu_table`'s table.
 * Returns 0; -1 out of memory or where the tiles do not run. */
int tunery_decode_step(const int64_t *model, float eps, float scale, int64_t rows, elem_t *x,
                       const int64_t *pos, elem_t *const *k_cache, elem_t *const *v_cache,
                       const int64_t *sizes, int64_t spans, const int64_t *row_lo,
                       const int64_t *row_hi, const int64_t *lora, const uint16_t *gelu,
                       elem_t *out, int threads) {
    int64_t layers = model[M_LAYERS], c = model[M_HIDDEN], nh = model[M_HEADS];
    int64_t nkv = model[M_KV_HEADS], hd = model[M_HEAD_DIM], f = model[M_FF];
    int64_t width = (nh + 2 * nkv) * hd; /* the fused qkv's */
    int64_t sizes_of[] = {c, width, nh * hd, nkv * hd, nh * hd, c, c, 2 * f, f};
    int64_t total = 0;
    for (int k = 0; k < 9; k++) total += rows * sizes_of[k];
    elem_t *work = malloc(sizeof(elem_t) * total);
    if (work == NULL) return -1;
    elem_t *h = work, *qkv = h + rows * c, *q = qkv + rows * width, *k = q + rows * nh * hd;
    elem_t *a = k + rows * nkv * hd, *o = a + rows * nh * hd, *t = o + rows * c;
    elem_t *gu = t + rows * c, *m = gu + rows * 2 * f;
    int status = 0;
    for (int64_t i = 0; i < layers && status == 0; i++) {
        const int64_t *L = model + M_FIELDS + i * L_FIELDS;
        const int64_t *const *desc = (const int64_t *const *)(lora + i * GROUPS * spans);
#define W(field) ((const void *)(intptr_t)L[field])
        tunery_rms_norm(rows, 1, c, x, c, W(L_LN_IN), eps, h, c, threads);
        status |= project(L, 0, rows, c, width, h, qkv, threads);
        status |= tunery_lora_add(spans, row_lo, row_hi, desc, h, c, qkv, width, threads);
        tunery_qk_norm_rope(rows, nh, nkv, hd, qkv, width, W(L_Q_NORM), W(L_K_NORM), eps,
                            W(L_COS), W(L_SIN), pos, q, hd, nh * hd, k, hd, nkv * hd, NULL,
                            threads);
        status |= tunery_decode_attention(rows, nh, nkv, hd, q, k, nkv * hd,
                                          qkv + (nh + nkv) * hd, width, k_cache + i * rows,
                                          v_cache + i * rows, pos, sizes + i * rows, scale, a,
                                          threads);
        status |= project(L, 1, rows, nh * hd, c, a, o, threads);
        status |= tunery_lora_add(spans, row_lo, row_hi, desc + spans, a, nh * hd, o, c, threads);
        tunery_rms_norm(rows, 1, c, o, c, W(L_LN_POST_ATTN), eps, t, c, threads);
        add_into(x, t, rows * c);
        tunery_rms_norm(rows, 1, c, x, c, W(L_LN_PRE_FF), eps, h, c, threads);
        status |= project(L, 2, rows, c, 2 * f, h, gu, threads);
        status |= tunery_lora_add(spans, row_lo, row_hi, desc + 2 * spans, h, c, gu, 2 * f,
                                  threads);
        tunery_gelu_times_torch(rows, f, gu, m, gelu, threads);
        status |= project(L, 3, rows, f, c, m, o, threads);
        status |= tunery_lora_add(spans, row_lo, row_hi, desc + 3 * spans, m, f, o, c, threads);
        tunery_rms_norm(rows, 1, c, o, c, W(L_LN_POST_FF), eps, t, c, threads);
        add_into(x, t, rows * c);
#undef W
    }
    if (status == 0)
        tunery_rms_norm(rows, 1, c, x, c, (const float *)(intptr_t)model[M_FINAL_NORM], eps, out,
                        c, threads);
    free(work);
    return status == 0 ? 0 : -1;
}

int tunery_decode_step_supported(void) { return amx_permitted(); }

#else

int tunery_decode_step(void) { return -1; }
void tunery_gelu_times_torch(void) {}
void tunery_gelu_table(void) {}
int tunery_decode_step_supported(void) { return 0; }

#endif
