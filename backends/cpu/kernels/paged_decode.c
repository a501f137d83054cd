/* Paged attention for short query runs (decode and multi-token decode) on the cpu backend.
 *
 * One work item is (sequence b, KV head h): its G = Hq / Hkv query heads times q_len query tokens
 * form R <= MAX_ROWS rows that share every key and value row they read, so each K/V row of the
 * sequence is read from memory once per KV head (FlashDecoding's grouping, Dao et al. 2023).
 * Keys are visited in tiles of up to TILE tokens gathered through the block table; per tile: the
 * R x TILE scores (fp32 dot products), the options of SPEC section 2 (soft-cap, ALiBi, causal and
 * window masks), and one online-softmax update (running max m, denominator l, accumulator acc).
 * Everything accumulates in fp32 whatever the storage dtype.
 *
 * Storage formats decoded here (hal/kv_formats.py is the contract): FMT_F32 / FMT_F16 / FMT_BF16
 * (the "auto" rows of the model dtype) everywhere; int8, fp8_e4m3 and fp8_e5m2 rows on the AVX-512
 * BF16 path (bf16 models), decoded exactly in registers, their scales applied to scores and weights. An MLA cache is MQA over one row per token, [c_kv; k_pe]:
 * the caller passes the same rows as K and V with Dv = kv_lora_rank, so V is the row's first Dv
 * channels and each row is read once for every head (absorbed MLA, FlashMLA's "MQA mode"). Built with -march=native on the machine that runs it:
 * the AVX-512 path when the compiler targets it, plain C loops otherwise.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#include "simd.h"
#endif

enum { FMT_F32 = 0, FMT_F16 = 1, FMT_BF16 = 2, FMT_INT8 = 3, FMT_E4M3 = 4, FMT_E5M2 = 5 };
enum { TILE = 16, MAX_ROWS = 256, MAX_DIM = 1024, SPLIT = 512 };  /* SPLIT: keys per split, a multiple of TILE */

typedef struct {
    const void *q;           /* [T, Hq, D] in the model dtype */
    const uint8_t *k, *v;    /* rows of one layer: [num_blocks, bs, Hkv, width] bytes */
    const int32_t *block_table, *seq_lens, *cu_q;
    const uint8_t *active;   /* [B]: 1 = this kernel computes sequence b, 0 = leave its rows alone */
    void *out;               /* [T, Hq, Dv] model dtype */
    float *lse;              /* [T, Hq] or NULL */
    const float *alibi, *sinks; /* [Hq] or NULL */
    int64_t bt_stride;       /* columns of block_table */
    int B, Hq, Hkv, D, Dv, bs;
    int dtype;               /* model dtype of q/out: FMT_* */
    int kfmt, vfmt;          /* storage format of K and V rows */
    int64_t k_width, v_width; /* bytes per row */
    float scale, softcap;    /* softcap 0 = none */
    int causal, window;      /* window < 0 = none */
    int64_t *rows_read;      /* NULL, or incremented by the number of K rows each work item loads */
    const float *k_scale, *v_scale; /* fp8 rows: the layer's per-KV-head scales [Hkv]; else NULL */
} decode_args;

/* ---- element conversions ------------------------------------------------------------------ */
static inline float bf16_to_f32(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);          /* round to nearest even */
}
static inline float f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) { if (m == 0) u = s; else { float f = ldexpf((float)m, -24); memcpy(&u, &f, 4); u |= s; } }
    else if (e == 31) u = s | 0x7f800000u | (m << 13);
    else u = s | ((e + 112) << 23) | (m << 13);
    float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, 0);
#else
    __fp16 h = (__fp16)f; uint16_t u; memcpy(&u, &h, 2); return u;
#endif
}

/* row of `n` values in format `fmt` -> fp32 */
static void load_row(float *dst, const uint8_t *src, int fmt, int n) {
    int i = 0;
    if (fmt == FMT_F32) { memcpy(dst, src, (size_t)n * 4); return; }
#if defined(__AVX512F__)
    if (fmt == FMT_BF16) {
        for (; i + 16 <= n; i += 16) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(src + 2 * i));
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)));
        }
    } else if (fmt == FMT_F16) {
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * i))));
    }
#endif
    const uint16_t *s16 = (const uint16_t *)src;
    for (; i < n; i++) dst[i] = fmt == FMT_BF16 ? bf16_to_f32(s16[i]) : f16_to_f32(s16[i]);
}

static void store_row(void *dst, const float *src, int fmt, int n) {
    if (fmt == FMT_F32) { memcpy(dst, src, (size_t)n * 4); return; }
    uint16_t *d16 = (uint16_t *)dst;
    for (int i = 0; i < n; i++) d16[i] = fmt == FMT_BF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
}

/* ---- vector helpers ------------------------------------------------------------------------- */
static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
    float s = 0.f;
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int n) { /* y += a * x */
    int i = 0;
#if defined(__AVX512F__)
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

static inline void scal(float *y, float a, int n) {
    int i = 0;
#if defined(__AVX512F__)
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(va, _mm512_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] *= a;
}

/* ---- one (sequence, KV head) work item ----------------------------------------------------- */
static void decode_item(const decode_args *a, int b, int h, float *ws) {
    const int G = a->Hq / a->Hkv, q0 = a->cu_q[b], ql = a->cu_q[b + 1] - q0, S = a->seq_lens[b];
    const int R = ql * G, D = a->D, Dv = a->Dv;
    float *qf = ws;                      /* [R, D] queries, pre-scaled */
    float *acc = qf + (size_t)R * D;     /* [R, Dv] */
    float *m = acc + (size_t)R * Dv, *l = m + R, *s = l + R; /* [R], [R], [R, TILE] */
    float *kf = s + (size_t)R * TILE;    /* [TILE, D] decoded keys */
    float *vf = kf + (size_t)TILE * D;   /* [TILE, Dv] decoded values */
    int *pos = (int *)(vf + (size_t)TILE * Dv); /* [R] absolute position of each row's query */
    const size_t qsz = a->dtype == FMT_F32 ? 4 : 2;
    for (int t = 0; t < ql; t++)
        for (int g = 0; g < G; g++) {
            int r = t * G + g, hq = h * G + g;
            load_row(qf + (size_t)r * D, (const uint8_t *)a->q + ((size_t)(q0 + t) * a->Hq + hq) * D * qsz, a->dtype, D);
            scal(qf + (size_t)r * D, a->scale, D);
            pos[r] = S - ql + t;
            m[r] = a->sinks ? a->sinks[hq] : -INFINITY;
            l[r] = a->sinks ? 1.f : 0.f;
        }
    memset(acc, 0, sizeof(float) * (size_t)R * Dv);
    /* the keys any row can see */
    int hi = a->causal ? (pos[R - 1] + 1 < S ? pos[R - 1] + 1 : S) : S;
    int lo = a->window >= 0 ? (pos[0] - a->window > 0 ? pos[0] - a->window : 0) : 0;
    const int32_t *table = a->block_table + (int64_t)b * a->bt_stride;
    const int64_t kb = (int64_t)a->bs * a->Hkv * a->k_width, vb = (int64_t)a->bs * a->Hkv * a->v_width;
    for (int j0 = lo; j0 < hi; j0 += TILE) {
        int n = hi - j0 < TILE ? hi - j0 : TILE;
        if (a->rows_read) __atomic_fetch_add(a->rows_read, (int64_t)n, __ATOMIC_RELAXED);
        for (int i = 0; i < n; i++) {    /* gather and decode the tile's key and value rows */
            int j = j0 + i;
            int64_t blk = table[j / a->bs], off = (int64_t)(j % a->bs) * a->Hkv + h;
            load_row(kf + (size_t)i * D, a->k + blk * kb + off * a->k_width, a->kfmt, D);
            load_row(vf + (size_t)i * Dv, a->v + blk * vb + off * a->v_width, a->vfmt, Dv);
        }
        for (int r = 0; r < R; r++) {
            float *sr = s + (size_t)r * TILE, mt = -INFINITY;
            const float slope = a->alibi ? a->alibi[h * G + r % G] : 0.f;
            for (int i = 0; i < n; i++) {
                int j = j0 + i;
                float x = dot(qf + (size_t)r * D, kf + (size_t)i * D, D);
                if (a->softcap > 0.f) x = a->softcap * tanhf(x / a->softcap);
                if (a->alibi) x -= slope * fabsf((float)(pos[r] - j));
                if ((a->causal && j > pos[r]) || (a->window >= 0 && j < pos[r] - a->window)) x = -INFINITY;
                sr[i] = x;
                mt = x > mt ? x : mt;
            }
            float m_new = mt > m[r] ? mt : m[r];
            if (m_new == -INFINITY) continue;          /* nothing visible yet */
            float alpha = expf(m[r] - m_new), lsum = 0.f;
            scal(acc + (size_t)r * Dv, alpha, Dv);
            for (int i = 0; i < n; i++) {
                float p = expf(sr[i] - m_new);
                lsum += p;
                if (p != 0.f) axpy(acc + (size_t)r * Dv, p, vf + (size_t)i * Dv, Dv);
            }
            l[r] = l[r] * alpha + lsum;
            m[r] = m_new;
        }
    }
    const size_t osz = a->dtype == FMT_F32 ? 4 : 2;
    for (int t = 0; t < ql; t++)
        for (int g = 0; g < G; g++) {
            int r = t * G + g, hq = h * G + g;
            float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            scal(acc + (size_t)r * Dv, inv, Dv);
            store_row((uint8_t *)a->out + ((size_t)(q0 + t) * a->Hq + hq) * Dv * osz, acc + (size_t)r * Dv, a->dtype, Dv);
            if (a->lse) a->lse[(size_t)(q0 + t) * a->Hq + hq] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
        }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* ---- the AVX-512 BF16 path: bf16 q and K/V rows, D % 32 == 0, Dv % 64 == 0 ------------------
 * Scores: VDPBF16PS of the bf16 query against the bf16 key (exact products, fp32 sums), four rows
 * reduced together. Softmax: vector exp over a tile's 16 scores per row. P.V: fp32 FMAs into
 * register-blocked accumulators (4 rows x 64 dims), V converted bf16 -> fp32 by a shift. */

static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) { /* [sum a0, .. sum a3] */
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 t2 = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
    __m256 t3 = _mm256_add_ps(_mm512_castps512_ps256(t2), _mm512_extractf32x8_ps(t2, 1));
    return _mm_add_ps(_mm256_castps256_ps128(t3), _mm256_extractf128_ps(t3, 1));
}

static inline __m512 bf16x16_to_f32(const uint8_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Quantized rows (hal/kv_formats.py): int8 values then the row's fp16 scale; fp8 bit patterns with a
 * per-head scale. A value decodes as fp32(q) * scale rounded to bf16, exactly what cache.read returns
 * (so attention on a quantized cache equals attention on its read-back). e4m3 goes through fp16 (its
 * 7 magnitude bits shifted into fp16's exponent and mantissa) and comes out 2^-8 too small: its
 * scale carries the 256. */
static inline int elem_size(int fmt) { return fmt == FMT_BF16 ? 2 : 1; }

static inline __m512 q16_to_f32(const uint8_t *p, int fmt) {      /* 16 stored values -> fp32, unscaled */
    if (fmt == FMT_BF16) return bf16x16_to_f32(p);
    __m128i x = _mm_loadu_si128((const __m128i *)p);
    if (fmt == FMT_INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x));
    __m256i u = _mm256_cvtepu8_epi16(x);
    if (fmt == FMT_E5M2) return _mm512_cvtph_ps(_mm256_slli_epi16(u, 8));
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8),
                                _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x7f)), 7));
    return _mm512_cvtph_ps(h);
}

static inline __m512 bf16_round(__m512 x) {                       /* x rounded to bf16, as fp32 */
    __m256i b = (__m256i)_mm512_cvtneps_pbh(x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline __m512 dq16(const uint8_t *p, int fmt, __m512 scale) { /* 16 values decoded as cache.read does */
    if (fmt == FMT_BF16) return bf16x16_to_f32(p);
    return bf16_round(_mm512_mul_ps(q16_to_f32(p, fmt), scale));
}

static inline __m512bh dq32_bf16(const uint8_t *p, int fmt, __m512 scale) { /* 32 decoded values as bf16 */
    if (fmt == FMT_BF16) return (__m512bh)_mm512_loadu_si512(p);
    return _mm512_cvtne2ps_pbh(_mm512_mul_ps(q16_to_f32(p + 16, fmt), scale), _mm512_mul_ps(q16_to_f32(p, fmt), scale));
}

/* the factor a row's decoded values are multiplied by */
static inline float row_scale(const uint8_t *row, int64_t width, int fmt, const float *head_scale, int h) {
    if (fmt == FMT_INT8) { uint16_t sc; memcpy(&sc, row + width - 2, 2); return f16_to_f32(sc); }
    if (fmt == FMT_E4M3) return head_scale[h] * 256.f;
    if (fmt == FMT_E5M2) return head_scale[h];
    return 1.f;
}

static int fast_path_applies(const decode_args *a) {
    const int kf = a->kfmt, vf = a->vfmt;
    const int ok_k = kf == FMT_BF16 || kf == FMT_INT8 || kf == FMT_E4M3 || kf == FMT_E5M2;
    const int ok_v = vf == FMT_BF16 || vf == FMT_INT8 || vf == FMT_E4M3 || vf == FMT_E5M2;
    const int64_t k_bytes = (int64_t)a->D * elem_size(kf) + (kf == FMT_INT8 ? 2 : 0);
    return a->dtype == FMT_BF16 && ok_k && ok_v && kf == vf && a->D % 32 == 0 && a->Dv % 64 == 0 && a->k_width == k_bytes
           && a->v_width >= (int64_t)a->Dv * elem_size(vf)  /* MLA: V is the first Dv channels of K's row */
           && ((kf != FMT_E4M3 && kf != FMT_E5M2) || a->k_scale) && ((vf != FMT_E4M3 && vf != FMT_E5M2) || a->v_scale);
}

/* one sequence b, KV heads [h0, h1): all rows of those heads, one pass over their tokens */
/* Keys [split * SPLIT, (split + 1) * SPLIT) of sequence b for KV heads [h0, h1). With partial == NULL
 * the item covers the whole sequence and stores the output; otherwise it stores its unnormalized
 * accumulator, running max and denominator there ([NH][R][Dv + 2]) for merge_splits(). */
static inline __attribute__((always_inline)) void decode_item_impl(const decode_args *a, int b, int h0, int h1, float *ws,
                                                                   int split, float *partial, const int KF, const int VF) {
    const int G = a->Hq / a->Hkv, q0 = a->cu_q[b], ql = a->cu_q[b + 1] - q0, S = a->seq_lens[b];
    const int R = ql * G, R4 = (R + 3) & ~3, D = a->D, Dv = a->Dv, NH = h1 - h0;
    /* workspace per head: q bf16 [R4, D] | acc [R4, Dv] | m, l [R4] | s [R4, TILE] (scores, then p) */
    const size_t per_head = (size_t)R4 * D / 2 + (size_t)R4 * Dv + 2 * (size_t)R4 + (size_t)R4 * TILE;
    int pos_first = S - ql;
    for (int hh = 0; hh < NH; hh++) {
        float *base = ws + hh * per_head;
        uint16_t *qb = (uint16_t *)base;
        float *acc = base + (size_t)R4 * D / 2, *m = acc + (size_t)R4 * Dv, *l = m + R4;
        const int h = h0 + hh;
        memset(qb, 0, sizeof(uint16_t) * (size_t)R4 * D);
        for (int r = 0; r < R; r++) {
            int t = r / G, g = r % G, hq = h * G + g;
            memcpy(qb + (size_t)r * D, (const uint16_t *)a->q + ((size_t)(q0 + t) * a->Hq + hq) * D, 2 * (size_t)D);
        }
        for (int r = 0; r < R4; r++) {
            int hq = h * G + (r % G);
            m[r] = (r < R && a->sinks && split == 0) ? a->sinks[hq] : -INFINITY;  /* the sink counts once */
            l[r] = (r < R && a->sinks && split == 0) ? 1.f : 0.f;
        }
        memset(acc, 0, sizeof(float) * (size_t)R4 * Dv);
    }
    int hi = S < (split + 1) * SPLIT ? S : (split + 1) * SPLIT;
    int lo = a->window >= 0 ? (pos_first - a->window > 0 ? pos_first - a->window : 0) : 0;
    if (lo < split * SPLIT) lo = split * SPLIT;
    const int32_t *table = a->block_table + (int64_t)b * a->bt_stride;
    const int64_t kb = (int64_t)a->bs * a->Hkv * a->k_width, vb = (int64_t)a->bs * a->Hkv * a->v_width;
    const int64_t kt = (int64_t)a->Hkv * a->k_width, vt = (int64_t)a->Hkv * a->v_width;
    const __m512 vscale = _mm512_set1_ps(a->scale);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const uint8_t *krow[TILE], *vrow[TILE];
    for (int j0 = lo; j0 < hi; j0 += TILE) {
        const int n = hi - j0 < TILE ? hi - j0 : TILE;
        if (a->rows_read) __atomic_fetch_add(a->rows_read, (int64_t)n * NH, __ATOMIC_RELAXED);
        for (int i = 0; i < n; i++) {
            int j = j0 + i;
            int64_t blk = table[j / a->bs], off = j % a->bs;
            krow[i] = a->k + blk * kb + off * kt;
            vrow[i] = a->v + blk * vb + off * vt;
        }
        if (j0 + TILE < hi) {                 /* prefetch the next tile's rows of these heads into L2 */
            const int n2 = hi - j0 - TILE < TILE ? hi - j0 - TILE : TILE;
            for (int i = 0; i < n2; i++) {
                int j = j0 + TILE + i;
                int64_t blk = table[j / a->bs], off = j % a->bs;
                const char *kp = (const char *)(a->k + blk * kb + off * kt + (int64_t)h0 * a->k_width);
                const char *vp = (const char *)(a->v + blk * vb + off * vt + (int64_t)h0 * a->v_width);
                for (int64_t c = 0; c < (int64_t)NH * a->k_width; c += 64) _mm_prefetch(kp + c, _MM_HINT_T1);
                for (int64_t c = 0; c < (int64_t)NH * a->v_width; c += 64) _mm_prefetch(vp + c, _MM_HINT_T1);
            }
        }
        /* scores s[r][i] = scale * q_r . k_i, four rows at a time; token-major over the tile so that a
         * token's rows of all the group's heads (contiguous in a block) are read in address order */
        for (int i = 0; i < n; i++)
            for (int hh = 0; hh < NH; hh++) {
                const int h = h0 + hh;
                const uint16_t *qb = (const uint16_t *)(ws + hh * per_head);
                float *s = ws + hh * per_head + (size_t)R4 * D / 2 + (size_t)R4 * Dv + 2 * (size_t)R4;
                const uint8_t *kp = krow[i] + (int64_t)h * a->k_width;
                const __m512 ks = _mm512_set1_ps(row_scale(kp, a->k_width, KF, a->k_scale, h));
                const int kes = elem_size(KF);
                for (int r = 0; r < R4; r += 4) {
                    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
                    for (int d = 0; d < D; d += 32) {
                        __m512bh kv = dq32_bf16(kp + kes * d, KF, ks);
                        c0 = _mm512_dpbf16_ps(c0, (__m512bh)_mm512_loadu_si512(qb + (size_t)(r + 0) * D + d), kv);
                        c1 = _mm512_dpbf16_ps(c1, (__m512bh)_mm512_loadu_si512(qb + (size_t)(r + 1) * D + d), kv);
                        c2 = _mm512_dpbf16_ps(c2, (__m512bh)_mm512_loadu_si512(qb + (size_t)(r + 2) * D + d), kv);
                        c3 = _mm512_dpbf16_ps(c3, (__m512bh)_mm512_loadu_si512(qb + (size_t)(r + 3) * D + d), kv);
                    }
                    __m128 sc = reduce4(c0, c1, c2, c3);
                    float tmp[4];
                    _mm_storeu_ps(tmp, sc);
                    s[(size_t)(r + 0) * TILE + i] = tmp[0];
                    s[(size_t)(r + 1) * TILE + i] = tmp[1];
                    s[(size_t)(r + 2) * TILE + i] = tmp[2];
                    s[(size_t)(r + 3) * TILE + i] = tmp[3];
                }
            }
        for (int hh = 0; hh < NH; hh++) {
            const int h = h0 + hh;
            float *base = ws + hh * per_head;
            float *acc = base + (size_t)R4 * D / 2, *m = acc + (size_t)R4 * Dv, *l = m + R4, *s = l + R4;
            float vsc[TILE] = {0};           /* each row's V scale (1 for bf16) */
            if (VF == FMT_BF16)
                for (int i = 0; i < n; i++) vsc[i] = 1.f;
            else
                for (int i = 0; i < n; i++) vsc[i] = row_scale(vrow[i] + (int64_t)h * a->v_width, a->v_width, VF, a->v_scale, h);
            /* softmax update per row over the tile */
            const __mmask16 valid = (__mmask16)((1u << n) - 1u);
            const __m512i jv = _mm512_add_epi32(_mm512_set1_epi32(j0), lane);
            for (int r = 0; r < R; r++) {
                const int p_r = pos_first + r / G, hq = h * G + r % G;
                __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, s + (size_t)r * TILE), vscale);
                if (a->softcap > 0.f) x = softcap512(x, a->softcap);
                if (a->alibi) {
                    __m512 dist = _mm512_abs_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(p_r), jv)));
                    x = _mm512_fnmadd_ps(_mm512_set1_ps(a->alibi[hq]), dist, x);
                }
                __mmask16 vis = valid;
                if (a->causal) vis &= _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(p_r));
                if (a->window >= 0) vis &= _mm512_cmpge_epi32_mask(jv, _mm512_set1_epi32(p_r - a->window));
                x = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), x);
                float mt = _mm512_reduce_max_ps(x);
                float m_new = mt > m[r] ? mt : m[r];
                float *pr = s + (size_t)r * TILE;
                if (m_new == -INFINITY) { _mm512_storeu_ps(pr, _mm512_setzero_ps()); continue; }
                __m512 p = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(x, _mm512_set1_ps(m_new))));
                float alpha = expf(m[r] - m_new);
                l[r] = l[r] * alpha + _mm512_reduce_add_ps(p);
                m[r] = m_new;
                _mm512_storeu_ps(pr, p);
                if (alpha != 1.f) scal(acc + (size_t)r * Dv, alpha, Dv);
            }
            for (int r = R; r < R4; r++) _mm512_storeu_ps(s + (size_t)r * TILE, _mm512_setzero_ps());
            /* acc[r] += sum_i p[r][i] * v_i, four rows x 64 dims in registers */
            for (int r = 0; r < R4; r += 4) {
                const float *p0 = s + (size_t)r * TILE, *p1 = p0 + TILE, *p2 = p1 + TILE, *p3 = p2 + TILE;
                for (int d = 0; d < Dv; d += 64) {
                    float *a0 = acc + (size_t)r * Dv + d, *a1 = a0 + Dv, *a2 = a1 + Dv, *a3 = a2 + Dv;
                    __m512 x00 = _mm512_loadu_ps(a0), x01 = _mm512_loadu_ps(a0 + 16), x02 = _mm512_loadu_ps(a0 + 32), x03 = _mm512_loadu_ps(a0 + 48);
                    __m512 x10 = _mm512_loadu_ps(a1), x11 = _mm512_loadu_ps(a1 + 16), x12 = _mm512_loadu_ps(a1 + 32), x13 = _mm512_loadu_ps(a1 + 48);
                    __m512 x20 = _mm512_loadu_ps(a2), x21 = _mm512_loadu_ps(a2 + 16), x22 = _mm512_loadu_ps(a2 + 32), x23 = _mm512_loadu_ps(a2 + 48);
                    __m512 x30 = _mm512_loadu_ps(a3), x31 = _mm512_loadu_ps(a3 + 16), x32 = _mm512_loadu_ps(a3 + 32), x33 = _mm512_loadu_ps(a3 + 48);
                    for (int i = 0; i < n; i++) {
                        const int ves = elem_size(VF);
                        const uint8_t *vp = vrow[i] + (int64_t)h * a->v_width + ves * d;
                        const __m512 vs = _mm512_set1_ps(vsc[i]);
                        __m512 v0 = dq16(vp, VF, vs), v1 = dq16(vp + 16 * ves, VF, vs);
                        __m512 v2 = dq16(vp + 32 * ves, VF, vs), v3 = dq16(vp + 48 * ves, VF, vs);
                        __m512 w = _mm512_set1_ps(p0[i]);
                        x00 = _mm512_fmadd_ps(w, v0, x00); x01 = _mm512_fmadd_ps(w, v1, x01); x02 = _mm512_fmadd_ps(w, v2, x02); x03 = _mm512_fmadd_ps(w, v3, x03);
                        w = _mm512_set1_ps(p1[i]);
                        x10 = _mm512_fmadd_ps(w, v0, x10); x11 = _mm512_fmadd_ps(w, v1, x11); x12 = _mm512_fmadd_ps(w, v2, x12); x13 = _mm512_fmadd_ps(w, v3, x13);
                        w = _mm512_set1_ps(p2[i]);
                        x20 = _mm512_fmadd_ps(w, v0, x20); x21 = _mm512_fmadd_ps(w, v1, x21); x22 = _mm512_fmadd_ps(w, v2, x22); x23 = _mm512_fmadd_ps(w, v3, x23);
                        w = _mm512_set1_ps(p3[i]);
                        x30 = _mm512_fmadd_ps(w, v0, x30); x31 = _mm512_fmadd_ps(w, v1, x31); x32 = _mm512_fmadd_ps(w, v2, x32); x33 = _mm512_fmadd_ps(w, v3, x33);
                    }
                    _mm512_storeu_ps(a0, x00); _mm512_storeu_ps(a0 + 16, x01); _mm512_storeu_ps(a0 + 32, x02); _mm512_storeu_ps(a0 + 48, x03);
                    _mm512_storeu_ps(a1, x10); _mm512_storeu_ps(a1 + 16, x11); _mm512_storeu_ps(a1 + 32, x12); _mm512_storeu_ps(a1 + 48, x13);
                    _mm512_storeu_ps(a2, x20); _mm512_storeu_ps(a2 + 16, x21); _mm512_storeu_ps(a2 + 32, x22); _mm512_storeu_ps(a2 + 48, x23);
                    _mm512_storeu_ps(a3, x30); _mm512_storeu_ps(a3 + 16, x31); _mm512_storeu_ps(a3 + 32, x32); _mm512_storeu_ps(a3 + 48, x33);
                }
            }
        }
    }
    for (int hh = 0; hh < NH; hh++) {
        const int h = h0 + hh;
        float *base = ws + hh * per_head;
        float *acc = base + (size_t)R4 * D / 2, *m = acc + (size_t)R4 * Dv, *l = m + R4;
        if (partial) {
            for (int r = 0; r < R; r++) {
                float *dst = partial + ((size_t)hh * R + r) * (Dv + 2);
                memcpy(dst, acc + (size_t)r * Dv, sizeof(float) * Dv);
                dst[Dv] = m[r];
                dst[Dv + 1] = l[r];
            }
            continue;
        }
        for (int r = 0; r < R; r++) {
            int t = r / G, hq = h * G + r % G;
            float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            scal(acc + (size_t)r * Dv, inv, Dv);
            store_row((uint16_t *)a->out + ((size_t)(q0 + t) * a->Hq + hq) * Dv, acc + (size_t)r * Dv, a->dtype, Dv);
            if (a->lse) a->lse[(size_t)(q0 + t) * a->Hq + hq] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
        }
    }
}

static void decode_item_bf16(const decode_args *a, int b, int h0, int h1, float *ws, int split, float *partial) {
    switch (a->kfmt) {                    /* one specialised copy per row format (K and V share it) */
    case FMT_INT8: decode_item_impl(a, b, h0, h1, ws, split, partial, FMT_INT8, FMT_INT8); break;
    case FMT_E4M3: decode_item_impl(a, b, h0, h1, ws, split, partial, FMT_E4M3, FMT_E4M3); break;
    case FMT_E5M2: decode_item_impl(a, b, h0, h1, ws, split, partial, FMT_E5M2, FMT_E5M2); break;
    default: decode_item_impl(a, b, h0, h1, ws, split, partial, FMT_BF16, FMT_BF16); break;
    }
}

/* Combine the splits of (sequence b, heads [h0, h1)) in split order (exact LSE merge, fixed order so
 * the result does not depend on the batch) and store the output. */
static void merge_splits(const decode_args *a, int b, int h0, int h1, int nsplit, const float *partial) {
    const int G = a->Hq / a->Hkv, q0 = a->cu_q[b], R = (a->cu_q[b + 1] - q0) * G, Dv = a->Dv, NH = h1 - h0;
    float o[MAX_DIM];
    for (int hh = 0; hh < NH; hh++)
        for (int r = 0; r < R; r++) {
            float M = -INFINITY, L = 0.f;
            for (int sp = 0; sp < nsplit; sp++) {
                float ms = partial[(((size_t)sp * NH + hh) * R + r) * (Dv + 2) + Dv];
                M = ms > M ? ms : M;
            }
            memset(o, 0, sizeof(float) * Dv);
            if (M != -INFINITY)
                for (int sp = 0; sp < nsplit; sp++) {
                    const float *src = partial + (((size_t)sp * NH + hh) * R + r) * (Dv + 2);
                    if (src[Dv] == -INFINITY) continue;
                    float wgt = expf(src[Dv] - M);
                    L += src[Dv + 1] * wgt;
                    axpy(o, wgt, src, Dv);
                }
            int t = r / G, hq = (h0 + hh) * G + r % G;
            scal(o, L > 0.f ? 1.f / L : 0.f, Dv);
            store_row((uint16_t *)a->out + ((size_t)(q0 + t) * a->Hq + hq) * Dv, o, a->dtype, Dv);
            if (a->lse) a->lse[(size_t)(q0 + t) * a->Hq + hq] = L > 0.f ? M + logf(L) : -INFINITY;
        }
}
#endif

/* Whether hal_paged_decode handles these formats and head dims here: auto rows always; quantized rows
 * only on the AVX-512 BF16 path (bf16 model, D % 32 == 0, Dv % 64 == 0). */
int hal_decode_supports(int dtype, int kfmt, int vfmt, int D, int Dv) {
    if (kfmt <= FMT_BF16 && vfmt <= FMT_BF16) return 1;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return dtype == FMT_BF16 && kfmt > FMT_BF16 && vfmt > FMT_BF16 && D % 32 == 0 && Dv % 64 == 0;
#else
    (void)dtype; (void)D; (void)Dv;
    return 0;
#endif
}

/* Computes the active sequences; returns 0, or 1 (and computes nothing) when an active sequence has more
 * than MAX_ROWS rows or a head dim exceeds MAX_DIM: the caller must not mark such sequences active. */
int hal_paged_decode(const decode_args *a, int num_threads) {
    const int G = a->Hq / a->Hkv;
    int max_rows = 0;
    for (int b = 0; b < a->B; b++) {
        int r = (a->cu_q[b + 1] - a->cu_q[b]) * G;
        if (a->active[b] && r > max_rows) max_rows = r;
    }
    if (max_rows > MAX_ROWS || a->D > MAX_DIM || a->Dv > MAX_DIM) return 1;
    const int R4 = (max_rows + 3) & ~3;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (fast_path_applies(a)) {
        /* items: (sequence, group of KV heads, split of SPLIT keys). Head groups spread a small batch over
         * the threads; splits (always SPLIT keys, whatever the batch, then merged in order) spread a long
         * sequence over them: a sequence's arithmetic never depends on the rest of the batch. */
        int groups = (2 * num_threads + a->B - 1) / a->B;
        groups = groups < 1 ? 1 : (groups > a->Hkv ? a->Hkv : groups);
        while (a->Hkv % groups) groups++;
        const int hpg = a->Hkv / groups;
        int *first = (int *)malloc(sizeof(int) * (size_t)(a->B + 1));   /* first item of each sequence */
        int64_t *poff = (int64_t *)malloc(sizeof(int64_t) * (size_t)(a->B + 1)); /* its partial buffer */
        first[0] = 0; poff[0] = 0;
        for (int b = 0; b < a->B; b++) {
            int ql = a->cu_q[b + 1] - a->cu_q[b], ns = (a->seq_lens[b] + SPLIT - 1) / SPLIT;
            int on = a->active[b] && ql > 0;
            ns = ns < 1 ? 1 : ns;
            first[b + 1] = first[b] + (on ? groups * ns : 0);
            poff[b + 1] = poff[b] + (on && ns > 1 ? (int64_t)groups * ns * hpg * ql * G * (a->Dv + 2) : 0);
        }
        const int items = first[a->B];
        float *partials = poff[a->B] ? (float *)malloc(sizeof(float) * (size_t)poff[a->B]) : NULL;
        const size_t per_head = (size_t)R4 * a->D / 2 + (size_t)R4 * a->Dv + 2 * (size_t)R4 + (size_t)R4 * TILE;
        const size_t bytes = (per_head * hpg * sizeof(float) + 4095) / 64 * 64;
#ifdef _OPENMP
        #pragma omp parallel num_threads(num_threads)
#endif
        {
            float *ws = (float *)aligned_alloc(64, bytes);
#ifdef _OPENMP
            #pragma omp for schedule(dynamic, 1)
#endif
            for (int it = 0; it < items; it++) {
                int b = 0;
                while (first[b + 1] <= it) b++;
                const int ns = (a->seq_lens[b] + SPLIT - 1) / SPLIT > 1 ? (a->seq_lens[b] + SPLIT - 1) / SPLIT : 1;
                const int k = it - first[b], g = k / ns, sp = k % ns;
                const int R = (a->cu_q[b + 1] - a->cu_q[b]) * G;
                float *part = ns > 1 ? partials + poff[b] + ((int64_t)g * ns + sp) * hpg * R * (a->Dv + 2) : NULL;
                decode_item_bf16(a, b, g * hpg, (g + 1) * hpg, ws, sp, part);
            }
            free(ws);
#ifdef _OPENMP
            #pragma omp for schedule(dynamic, 1)
#endif
            for (int it = 0; it < a->B * groups; it++) {
                const int b = it / groups, g = it % groups;
                const int ns = (a->seq_lens[b] + SPLIT - 1) / SPLIT;
                if (first[b + 1] == first[b] || ns <= 1) continue;
                const int R = (a->cu_q[b + 1] - a->cu_q[b]) * G;
                merge_splits(a, b, g * hpg, (g + 1) * hpg, ns, partials + poff[b] + (int64_t)g * ns * hpg * R * (a->Dv + 2));
            }
        }
        free(partials); free(first); free(poff);
        return 0;
    }
#endif
    if (a->kfmt > FMT_BF16 || a->vfmt > FMT_BF16) return 1;  /* quantized rows need the path above */
    const size_t ws_floats = (size_t)max_rows * (a->D + a->Dv + 2 + TILE) + (size_t)TILE * (a->D + a->Dv) + max_rows + 64;
    const int items = a->B * a->Hkv;
#ifdef _OPENMP
    #pragma omp parallel num_threads(num_threads)
#endif
    {
        float *ws = (float *)aligned_alloc(64, ((ws_floats * sizeof(float)) + 63) / 64 * 64);
#ifdef _OPENMP
        #pragma omp for schedule(dynamic, 1)
#endif
        for (int it = 0; it < items; it++) {
            int b = it / a->Hkv, h = it % a->Hkv;
            if (a->active[b] && a->cu_q[b + 1] > a->cu_q[b]) decode_item(a, b, h, ws);
        }
        free(ws);
    }
    return 0;
}
