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
 * BF16 path (bf16 models), where stored values enter the products exactly and their scales multiply
 * the fp32 scores and weights (so the result tracks the cache's exact values, value x scale, which
 * is what the conformance suite compares against). One exception: fp8 rows on AMX tiles (GQA decode)
 * read fp8 subnormals as zero (fp8_shift_words; the README's "Decisions the SPEC leaves open"), except
 * e4m3 values, whose P.V runs in fp16 (pv4_fp16), where they stay exact.
 *
 * An MLA cache is MQA over one row per token, [c_kv; k_pe]: the caller passes the same rows as K and
 * V with Dv = kv_lora_rank, so V is the row's first Dv channels and each row is read once for every
 * head (absorbed MLA, FlashMLA's "MQA mode").
 *
 * Built with -march=native on the machine that runs it: the AVX-512 BF16 path when the compiler
 * targets it, plain C loops otherwise; on CPUs with AMX, bf16 16-row groups and int8 and fp8 4-row
 * groups take their products on tiles (amx.h, amx_scores*, amx_pv*), but fp8_e4m3's P.V, which takes
 * fp16 FMAs (pv4_fp16; AVX512-FP16, which every CPU with AMX has).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include "simd.h"
#include "amx.h"

/* Per-thread scratch, kept from call to call (never freed: a few tens of KiB a thread). Allocated and
 * freed within each call, the workspaces were page-faulted in again whenever glibc had trimmed the
 * heap: at 16 keys (B1, 8 KV heads, one thread) clear_page took 9% of the call and malloc_consolidate
 * 4%. Each slot serves one buffer at a time on its thread. */
enum { SCR_WS, SCR_TMPQ, SCR_AMX_K, SCR_AMX_V, SCR_AMX8_Q, SCR_AMX8_K, SCR_AMX8_V, SCR_AMXF_Q, SCR_AMXF_K, SCR_AMXF_V, SCR_N };
static _Thread_local void *scr_ptr[SCR_N];
static _Thread_local size_t scr_size[SCR_N];
static void *scratch(int slot, size_t bytes) {
    if (scr_size[slot] < bytes) {
        free(scr_ptr[slot]);
        const size_t b = (bytes + 4095) & ~(size_t)4095;
        scr_ptr[slot] = aligned_alloc(64, b);
        scr_size[slot] = scr_ptr[slot] ? b : 0;
    }
    return scr_ptr[slot];
}
/* the fast path: AVX-512 with BF16 dot products and VNNI (every CPU with AVX512-BF16 has both) */
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) \
    && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define HAL_FAST 1
#else
#define HAL_FAST 0
#endif

enum { FMT_F32 = 0, FMT_F16 = 1, FMT_BF16 = 2, FMT_INT8 = 3, FMT_E4M3 = 4, FMT_E5M2 = 5, FMT_INT6 = 6, FMT_INT4 = 7 };
enum { TILE = 16, MAX_ROWS = 256, MAX_DIM = 1024, SPLIT = 512 };  /* SPLIT: keys per split of the AVX-512 path */
static inline int splits_of(int S) { const int n = (S + SPLIT - 1) / SPLIT; return n > 1 ? n : 1; }  /* a sequence's splits */

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
    const void *q2;          /* NULL, or each query row's last d2 values, [T, Hq, d2] (q then holds its first
                              * D - d2, [T, Hq, D - d2]): MLA's q_rope beside q_latent, joined here */
    int d2;
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
#else                                        /* round to nearest even, by hand */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);                 /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                /* rounds past 65504: Inf */
    if (a < 0x38800000u) {                                                   /* fp16 subnormal or 0 */
        float m;
        memcpy(&m, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(m * 16777216.f));          /* units of 2^-24, exact rounding */
    }
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);                        /* round the 13 dropped bits */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
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

#if HAL_FAST
/* ---- the AVX-512 BF16 path: bf16 model; bf16, int8 or fp8 rows; D % 32 == 0 (fp8 through the table:
 * D % 64 == 0), Dv % 64 == 0 ----
 * Both products run on dot-product instructions that take pairs of 16-bit values and sum in 32 bits:
 * VDPBF16PS on bf16 pairs (bf16 rows, and fp8 rows widened exactly to bf16) and VPDPWSSD on int16
 * pairs (int8 rows widened to int16 against int16 queries and weights). Scores: four query rows held
 * in registers against each key of a tile, reduced four at a time. P.V: a tile's weights rounded to
 * bf16 (int8 rows: quantized to int16 against the tile's largest), taken in token pairs against
 * value rows interleaved by 16-bit unpacks, so accumulators hold their dims in an interleaved order
 * that unpermute() undoes once at the end. Scales: the softmax scale, int8 rows' scales and fp8 heads'
 * scales multiply the fp32 scores and weights, never the stored values, so every stored value enters
 * the products exactly. Prefetch: see pf_cursor. */
/* FT: the longest tile (SPLIT is a multiple). A tile holds 8-16 KiB of one head's K and V rows, so they
 * stay in L1 between the scores and P.V: 32 tokens of bf16 rows; 8-bit rows 32 tokens in the shared
 * build (GQA: a head's 130-byte rows straddle three lines, 64 tokens of K and V would fill 24 KiB of
 * L1; C harness, B8x4096 and B1x32K, 8 alternated rounds: int8 3-4% and fp8 4-8% faster than 64) and
 * 64 in the MLA build (one 578-byte row per token: 64 measured 2-5% faster than 32); int6 and int4
 * rows 64 (5% faster than 32). The length is a compile-time constant per format: computed at run
 * time from the rows' bytes it cost 10-18% in code generation. */
enum { FT = 64, NUMAX = FT / 16 };
#ifdef HAL_STAGED16
enum { FT8 = 64 };
#else
enum { FT8 = 32 };
#endif
enum { FTF = 64 };  /* fp8 on AMX tiles (HAL_AMXF) */
static inline int tile_len(int fmt) {
    return fmt == FMT_F32 ? 16 : fmt == FMT_BF16 || fmt == FMT_F16 ? 32 : fmt == FMT_INT6 || fmt == FMT_INT4 ? 64 : FT8;
}
static inline int is_wide(int fmt) { return fmt == FMT_F16 || fmt == FMT_F32; }  /* fp16/fp32 models: fp32 FMAs */

static const uint8_t zero_row[2 * MAX_DIM] __attribute__((aligned(64)));  /* pads a tile's odd token */

static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) { /* [sum a0, .. sum a3] */
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 t2 = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
    __m256 t3 = _mm256_add_ps(_mm512_castps512_ps256(t2), _mm512_extractf32x8_ps(t2, 1));
    return _mm_add_ps(_mm256_castps256_ps128(t3), _mm256_extractf128_ps(t3, 1));
}

static inline __m128 reduce4i(__m512 a0, __m512 a1, __m512 a2, __m512 a3) { /* the same on int32 lanes */
    __m512i b0 = (__m512i)a0, b1 = (__m512i)a1, b2 = (__m512i)a2, b3 = (__m512i)a3;
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(b0, b1), _mm512_unpackhi_epi32(b0, b1));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(b2, b3), _mm512_unpackhi_epi32(b2, b3));
    __m512i t2 = _mm512_add_epi32((__m512i)_mm512_shuffle_ps((__m512)t0, (__m512)t1, 0x44),
                                  (__m512i)_mm512_shuffle_ps((__m512)t0, (__m512)t1, 0xEE));
    __m256i t3 = _mm256_add_epi32(_mm512_castsi512_si256(t2), _mm512_extracti64x4_epi64(t2, 1));
    return _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(t3), _mm256_extracti128_si256(t3, 1)));
}

/* Quantized rows (hal/kv_formats.py): int8 values then the row's fp16 scale; fp8 bit patterns with a
 * per-head scale. e4m3 goes through fp16 (its 7 magnitude bits shifted into fp16's exponent and
 * mantissa) and comes out 2^-8 too small: its scale carries the 256. */
static inline int is_int(int fmt) { return fmt == FMT_INT8 || fmt == FMT_INT6 || fmt == FMT_INT4; }  /* int16 products */
static inline int is_grp(int fmt) { return fmt == FMT_INT4; }  /* a scale per 32 channels, not per row */
static inline int row_scaled(int fmt) { return is_int(fmt) && !is_grp(fmt); }
static inline size_t boff(int fmt, int d) {  /* bytes before value d of a row (d % 32 == 0 for int6) */
    return fmt == FMT_F32 ? 4 * (size_t)d : fmt == FMT_BF16 || fmt == FMT_F16 ? 2 * (size_t)d
           : fmt == FMT_INT6 ? 3 * (size_t)d / 4 : fmt == FMT_INT4 ? (size_t)d / 2 : (size_t)d;
}

#if defined(__AVX512VBMI__)
#define INT6_OK 1  /* int6 and int4 rows need VPERMB */
/* int6: word i holds bytes 6i / 8 and the next; its field starts at bit (6i) % 8 = 0, 6, 4, 2 */
static inline __m512i int6_shift(void) {   /* shift that puts the field's top bit at bit 15: 10 - start */
    return _mm512_set1_epi64(0x800060004000aLL);
}
#else
#define INT6_OK 0
#endif

/* 16 fp16 or fp32 values -> fp32 */
static inline __m512 ld16f(const uint8_t *p, int fmt) {  /* also fp8 (e4m3 2^-8 small, as ld32's fp16 route) */
    if (fmt == FMT_F32) return _mm512_loadu_ps(p);
    if (fmt == FMT_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i h = fmt == FMT_E5M2 ? _mm256_slli_epi16(u, 8)
        : _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8),
                          _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x7f)), 7));
    return _mm512_cvtph_ps(h);
}

/* 32 stored values -> 32 16-bit lanes, exactly: bf16 for bf16 and fp8 rows, int16 for int8/int6 rows */
static inline __m512i ld32(const uint8_t *p, int fmt) {
    if (fmt == FMT_BF16) return _mm512_loadu_si512(p);
#if defined(__AVX512VBMI__)
    if (fmt == FMT_INT6) {                   /* 32 six-bit fields in 24 bytes: each word takes the two bytes
                                              * holding its field, shifts its top bit to bit 15, then back */
        const __m512i idx = _mm512_setr_epi64(0x0302020101000100LL, 0x0605050404030403LL, 0x0908080707060706LL,
                                              0x0c0b0b0a0a090a09LL, 0x0f0e0e0d0d0c0d0cLL, 0x12111110100f100fLL,
                                              0x1514141313121312LL, 0x1817171616151615LL);
        __m512i w = _mm512_permutexvar_epi8(idx, _mm512_maskz_loadu_epi8(0xffffffULL, p));
        return _mm512_srai_epi16(_mm512_sllv_epi16(w, int6_shift()), 10);
    }
    if (fmt == FMT_INT4) {                   /* 32 nibbles in 16 bytes: word i holds byte i / 2, shifted so
                                              * that its nibble (low for even i) tops bit 15, then back */
        const __m512i idx = _mm512_set_epi8(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12,
                                            11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8,
                                            7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4,
                                            3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  /* byte j: j / 4 */
        __m512i w = _mm512_permutexvar_epi8(idx, _mm512_maskz_loadu_epi8(0xffffULL, p));
        return _mm512_srai_epi16(_mm512_sllv_epi16(w, _mm512_set1_epi32(0x0008000c)), 12);
    }
#endif
    if (fmt == FMT_INT8) return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
    return (__m512i)_mm512_cvtne2ps_pbh(ld16f(p + 16, fmt), ld16f(p, fmt));  /* fp8 by the fp16 route */
}

/* fp8 rows through a table (AVX512-VBMI): the bf16 of each of the 128 magnitudes, split into its low
 * and high bytes; VPERMI2B looks 64 values up at once, the sign is ORed back in, and byte unpacks give
 * 2 x 32 bf16, exact (subnormals included), in the order of lut_dim(). A third of the instructions
 * of the fp16 route below. */
#if defined(__AVX512VBMI__)
#define FP8_LUT 1
#else
#define FP8_LUT 0
#endif
static inline int lut8(int fmt) { return FP8_LUT && (fmt == FMT_E4M3 || fmt == FMT_E5M2); }

static uint8_t fp8_tab[2][4][64] __attribute__((aligned(64)));  /* [e4m3, e5m2][lo 0-63, lo 64-127, hi, hi] */

static uint16_t fp8_magnitude_bf16(int e5m2, int m) {  /* bf16 bits of the fp8 magnitude m (7 bits) */
    float v;
    if (!e5m2) {                         /* e4m3fn: bias 7, no infinity, 0x7f NaN */
        const int e = m >> 3, f = m & 7;
        v = m == 0x7f ? NAN : e == 0 ? ldexpf((float)f, -9) : ldexpf(1.f + f / 8.f, e - 7);
    } else {                             /* e5m2: bias 15, IEEE specials */
        const int e = m >> 2, f = m & 3;
        v = e == 31 ? (f ? NAN : INFINITY) : e == 0 ? ldexpf((float)f, -16) : ldexpf(1.f + f / 4.f, e - 15);
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)(u >> 16);          /* exact: every fp8 value is a bf16 */
}

__attribute__((constructor)) static void fp8_tables_init(void) {
    for (int t = 0; t < 2; t++)
        for (int m = 0; m < 128; m++) {
            const uint16_t b = fp8_magnitude_bf16(t, m);
            fp8_tab[t][m >> 6][m & 63] = (uint8_t)(b & 0xff);
            fp8_tab[t][2 + (m >> 6)][m & 63] = (uint8_t)(b >> 8);
        }
}

#if FP8_LUT
/* the four table registers and the sign mask, loaded once per loop. `pin` makes them opaque to gcc (an
 * empty asm), for scores4: there, with 16 query registers live, gcc reloaded the tables from memory for
 * every lookup and spilled a key. C harness, alternated rounds, fp8_e4m3 B1 x 4096 in cache, one
 * thread: 0.568 -> 0.553 ms per layer (e5m2 0.559 -> 0.554); B8 x 4096 streamed, 2 threads: 2.80 -> 2.53.
 * Pinned in pv4 as well it was 1% slower than unpinned (gcc keeps them in registers there by itself);
 * MLA's staging and the AMX paths, no change either way. */
typedef struct { __m512i lo0, lo1, hi0, hi1, sign; } fp8_lut;
static inline __attribute__((always_inline)) fp8_lut fp8_lut_load(int fmt, int pin) {
    const int t = fmt == FMT_E5M2;
    fp8_lut r = {_mm512_load_si512(fp8_tab[t][0]), _mm512_load_si512(fp8_tab[t][1]), _mm512_load_si512(fp8_tab[t][2]),
                 _mm512_load_si512(fp8_tab[t][3]), _mm512_set1_epi8((char)0x80)};
    if (pin) __asm__("" : "+v"(r.lo0), "+v"(r.lo1), "+v"(r.hi0), "+v"(r.hi1), "+v"(r.sign));
    return r;
}

static inline __attribute__((always_inline)) void ld64_fp8_bytes(__m512i x, const fp8_lut *t, __m512i *z0, __m512i *z1) {
    const __m512i lo = _mm512_permutex2var_epi8(t->lo0, x, t->lo1);
    __m512i hi = _mm512_permutex2var_epi8(t->hi0, x, t->hi1);
    hi = _mm512_ternarylogic_epi32(hi, x, t->sign, 0xF8);  /* hi | (x & 0x80) */
    *z0 = _mm512_unpacklo_epi8(lo, hi);  /* per 128-bit lane L: dims 16 L + 0..7 */
    *z1 = _mm512_unpackhi_epi8(lo, hi);  /*                      dims 16 L + 8..15 */
}

static inline __attribute__((always_inline)) void ld64_fp8(const uint8_t *p, const fp8_lut *t, __m512i *z0, __m512i *z1) {
    ld64_fp8_bytes(_mm512_loadu_si512(p), t, z0, z1);
}

#endif

/* the dim that 16-bit lane j of z0 (j < 32) or z1 (j >= 32) of ld64_fp8 holds, within 64 */
static inline int lut_dim(int j) { const int z = j / 32, L = (j % 32) / 8, k = j % 8; return 16 * L + 8 * z + k; }

/* fp8 rows by shifts, for the tile paths (AMX-BF16): a byte at the top of a 16-bit word, shifted right
 * arithmetically by 4 (e4m3) or 3 (e5m2) and masked, puts its exponent and mantissa bits where bf16's
 * low exponent and mantissa bits are, its sign on top: the bf16 of its value times 2^-120 (e4m3) or
 * 2^-112 (e5m2), exactly, for every normal value. Subnormal fp8 values (below 2^-6, e4m3, or 2^-14,
 * e5m2, times the head's scale) become bf16 subnormals, which the tile unit reads as zero (the
 * README's "Decisions the SPEC leaves open"). The queries and weights that meet these rows are scaled
 * by 2^64 (exactly, as bf16), so that the products stay in fp32's normal range: scores come out 2^-56
 * (e4m3) or 2^-48 (e5m2) of their values, as do the P.V sums, and the scale factors carry the rest.
 * Keys take 5 instructions per 64 values, values 7, none of them lane-crossing shuffles, where the
 * table took 5 and 6, four and five of them shuffles (VPERMI2B, unpacks) on the one pipe that runs
 * them. C harness, fp8_e4m3, B/A medians of alternated passes: rows in L2 (B1 x 512, one thread)
 * 0.864 and 0.884 (200 passes); B8 x 4096 streamed, 2 threads: 0.935, 0.898 (10 passes). */
static inline int fp8_shift_bias(int fmt) { return fmt == FMT_E5M2 ? 112 : 120; }
static inline __attribute__((always_inline)) __m512i fp8_shift_words(__m512i w, const int fmt) {  /* byte at the top */
    return fmt == FMT_E5M2 ? _mm512_and_si512(_mm512_srai_epi16(w, 3), _mm512_set1_epi16((short)0x8FE0))
                           : _mm512_and_si512(_mm512_srai_epi16(w, 4), _mm512_set1_epi16((short)0x87F0));
}
/* 64 stored values -> their even bytes' (z0) and odd bytes' (z1) scaled bf16: dims 2j and 2j + 1 at
 * lane j (shift_dim) */
static inline __attribute__((always_inline)) void ld64_fp8_shift(const uint8_t *p, const int fmt, __m512i *z0, __m512i *z1) {
    const __m512i x = _mm512_loadu_si512(p);
    *z0 = fp8_shift_words(_mm512_slli_epi16(x, 8), fmt);
    *z1 = fp8_shift_words(x, fmt);
}
static inline int shift_dim(int j) { return j < 32 ? 2 * j : 2 * (j - 32) + 1; }
/* bf16 words times 2^64, zeros and subnormals (which the tile unit reads as zero) to zero; the caller
 * has checked that no exponent exceeds 190 */
static inline __m512i bf16_times_2_64(__m512i w) {
    return _mm512_maskz_add_epi16(_mm512_test_epi16_mask(w, _mm512_set1_epi16(0x7f80)), w, _mm512_set1_epi16(0x2000));
}

static inline __m512 dp(__m512 acc, __m512i x, __m512i y, int fmt) { /* acc += pairwise x . y */
    if (is_int(fmt)) return (__m512)_mm512_dpwssd_epi32((__m512i)acc, x, y);
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)y);
}

/* the factor a row's stored values are multiplied by */
static inline float row_scale(const uint8_t *row, int64_t width, int fmt, const float *head_scale, int h, int wide) {
    if (row_scaled(fmt)) { uint16_t sc; memcpy(&sc, row + width - 2, 2); return f16_to_f32(sc); }
    if (fmt == FMT_E4M3) return head_scale[h] * (FP8_LUT && !wide ? 1.f : 256.f);  /* the fp16 route is 2^-8 off */
    if (fmt == FMT_E5M2) return head_scale[h];
    return 1.f;
}

/* bytes of a row of `dim` values in format `fmt` (hal/kv_formats.py), dim % 32 == 0 */
static inline int64_t row_bytes(int fmt, int dim) {
    return (int64_t)boff(fmt, dim) + (row_scaled(fmt) ? 2 : is_grp(fmt) ? 2 * (int64_t)(dim / 32) : 0);
}

static int fast_path_applies(const decode_args *a) {
    const int kf = a->kfmt, vf = a->vfmt;
    const int fp8 = kf == FMT_E4M3 || kf == FMT_E5M2, wide = is_wide(a->dtype);
    if (wide && (kf == a->dtype || fp8))     /* fp16/fp32 models: their own rows, or fp8 rows, on fp32 FMAs */
        return vf == kf && a->D % 16 == 0 && a->Dv % 64 == 0 && a->k_width == (int64_t)boff(kf, a->D)
               && a->v_width >= (int64_t)boff(vf, a->Dv) && (!fp8 || (a->k_scale && a->v_scale));
    const int ok = kf == FMT_BF16 || kf == FMT_INT8 || kf == FMT_E4M3 || kf == FMT_E5M2 || (INT6_OK && (kf == FMT_INT6 || kf == FMT_INT4));
    /* integer rows: int16 products, finer than an fp16 model's inputs, not an fp32 model's */
    return (a->dtype == FMT_BF16 || (a->dtype == FMT_F16 && is_int(kf))) && ok && kf == vf && a->D % (lut8(kf) ? 64 : 32) == 0
           && a->Dv % 64 == 0 && a->k_width == row_bytes(kf, a->D)
           && a->v_width >= (int64_t)boff(vf, a->Dv)  /* MLA: V is the first Dv channels of K's row */
           && ((kf != FMT_E4M3 && kf != FMT_E5M2) || (a->k_scale && a->v_scale));
}

/* floats of workspace per KV head: q [R4, D] 16-bit (fp32 for fp16/fp32 models) | acc [R4, Dv] | qs, m, l [R4] | s [R4, FT] |
 * w [R4, max(Dv / 32, 4), FT / 2] weight pairs (int4: a set per group; pv4_fp16: four fp16 per key, 4 x FT / 2 words a row);
 * a multiple of 16 so that every head's block stays 64-byte aligned */
static inline size_t ws_per_head(int R4, int D, int Dv) {
    /* int4: weights per group of 32 value dims; pv4_fp16's fp16 weights take 4 sets' room */
    const size_t ng = Dv / 32 > 4 ? (size_t)Dv / 32 : 4;
    return ((size_t)R4 * D + (size_t)R4 * Dv + 3 * (size_t)R4 + (size_t)R4 * FT + (size_t)R4 * FT / 2 * ng + 15) & ~(size_t)15;
}

/* Prefetch of the next tile: its rows as regions in address order (per token, the group's heads' K
 * rows are contiguous, and so are consecutive tokens of a block), issued while the current tile
 * computes, into L2 (into L1 was twice as slow here). Two pacings, each the faster for its rows (C
 * harness, B8x4096): 16-bit rows, memory-bound, a line at a time (four at a time: 6% slower); 8-bit
 * rows, compute-bound, four lines per check (a line at a time with its own bounds checks cost as many
 * instructions as int8's scores: 6-9% slower). */
typedef struct {
    const char *p[2 * FT];   /* K regions of the tile's tokens, then their V regions */
    int64_t len[2 * FT];     /* bytes of each: a token's, or a run of a block's tokens when contiguous */
    int64_t klen, vlen;      /* bytes of one token's K / V rows of the item's heads */
    int n, nk, idx;          /* regions, how many are K's, the one being walked */
    int64_t lines;           /* lines of all regions, about (pacing) */
    int64_t off;             /* line at a time: bytes of it walked, from its first cache line */
    uintptr_t q, last;       /* four at a time: its next line and its last line */
    int rate, credit;        /* lines per compute step, and owed, in 1/16 lines */
} pf_cursor;

static inline void pf_lines(pf_cursor *c, int lines) {  /* fields in locals: c's stores would alias */
    int idx = c->idx;
    int64_t off = c->off;
    while (lines > 0 && idx < c->n) {
        const uintptr_t p = (uintptr_t)c->p[idx], len = (uintptr_t)c->len[idx];
        const uintptr_t first = (p & ~(uintptr_t)63) + (uintptr_t)off, last = (p + len - 1) & ~(uintptr_t)63;
        uintptr_t q = first;
        for (; q <= last && lines > 0; q += 64, lines--) _mm_prefetch((const char *)q, _MM_HINT_T1);
        if (q > last) { idx++; off = 0; } else off = (int64_t)(q - (p & ~(uintptr_t)63));
    }
    c->idx = idx;
    c->off = off;
}

static inline void pf_seek(pf_cursor *c, int idx) {  /* four at a time: c->q, c->last := region idx's lines */
    c->idx = idx;
    if (idx < c->n) {
        const uintptr_t p = (uintptr_t)c->p[idx], len = (uintptr_t)c->len[idx];
        c->q = p & ~(uintptr_t)63;
        c->last = (p + len - 1) & ~(uintptr_t)63;
    }
}

/* `steps` compute steps done: their share of the lines (an even spread over the tile, never bursts) */
static inline void pf_step(pf_cursor *c, int steps, const int four) {
    if (!four) {
        c->credit += c->rate * steps;
        pf_lines(c, c->credit >> 4);
        c->credit &= 15;
        return;
    }
    int credit = c->credit + c->rate * steps;
    while (credit >= 64 && c->idx < c->n) {  /* four lines earned */
        uintptr_t q = c->q;
        const uintptr_t last = c->last;
        if (q + 192 <= last) {
            _mm_prefetch((const char *)q, _MM_HINT_T1);
            _mm_prefetch((const char *)q + 64, _MM_HINT_T1);
            _mm_prefetch((const char *)q + 128, _MM_HINT_T1);
            _mm_prefetch((const char *)q + 192, _MM_HINT_T1);
            c->q = q + 256;
            credit -= 64;
        } else {                             /* the region's last one to three lines */
            for (; q <= last; q += 64, credit -= 16) _mm_prefetch((const char *)q, _MM_HINT_T1);
            pf_seek(c, c->idx + 1);
        }
    }
    c->credit = credit;
}

static inline int pf_four(int fmt) { return boff(fmt, 32) <= 32; }  /* 8-bit and smaller rows */

/* A work item: heads [h0, h1) of sequence b, keys of split `split` */
typedef struct { int b, h0, h1, split; } item_ref;

/* A thread's next item, claimed from the schedule's shared counter only as its current item starts its
 * last tile (whose prefetch then covers the next item's first tile), not as the current item starts.
 * Claimed at the start, one ahead, a thread that began a call a few microseconds before the other took
 * two items at once: at B1 x 1024 (two splits, two head groups, four items) the other thread finished
 * its two late and the first waited at the barrier for it. */
typedef struct {
    int *counter;                /* the schedule's first unclaimed item */
    const int *first;            /* the schedule (item_of) */
    int items, hpg;
    int it;                      /* the claimed item (items or more: none left), -1 before the claim */
    item_ref ref;                /* the claimed item, when there is one */
} item_claim;

/* Item `it` of the schedule (first[b]: sequence b's first item; a sequence's items: head group major,
 * then split) */
static item_ref item_of(const decode_args *a, const int *first, int it, int hpg) {
    int b = 0;
    while (first[b + 1] <= it) b++;
    const int ns = splits_of(a->seq_lens[b]);
    const int k = it - first[b], g = k / ns;
    return (item_ref){b, g * hpg, (g + 1) * hpg, k % ns};
}

/* the item `c` claims for its thread (claiming it now if not yet), or NULL when none is left */
static inline const item_ref *claim_next(const decode_args *a, item_claim *c) {
    if (c->it < 0) {
        c->it = __atomic_fetch_add(c->counter, 1, __ATOMIC_RELAXED);
        if (c->it < c->items) c->ref = item_of(a, c->first, c->it, c->hpg);
    }
    return c->it < c->items ? &c->ref : NULL;
}

/* the keys [lo, hi) an item attends to: its split, past the window's start */
static inline void item_keys(const decode_args *a, int b, int split, int *lo, int *hi) {
    const int S = a->seq_lens[b], pos_first = S - (a->cu_q[b + 1] - a->cu_q[b]);
    const int wlo = a->window >= 0 ? (pos_first - a->window > 0 ? pos_first - a->window : 0) : 0;
    *hi = S < (split + 1) * SPLIT ? S : (split + 1) * SPLIT;
    *lo = wlo > split * SPLIT ? wlo : split * SPLIT;
}

/* c := the K then V regions of tokens [t0, t1) of sequence b, heads from h0 (c->klen / vlen bytes per
 * token). Where an item has every head, a block's tokens lie back to back: a run of them is one region
 * (per tile, int8, 32 tokens: 4 regions instead of 64; their addresses one table lookup per block, not
 * per token). */
static inline void pf_fill(pf_cursor *c, const decode_args *a, int b, int h0, int t0, int t1) {
    const int32_t *table = a->block_table + (int64_t)b * a->bt_stride;
    const int64_t kb = (int64_t)a->bs * a->Hkv * a->k_width, vb = (int64_t)a->bs * a->Hkv * a->v_width;
    const int64_t kt = (int64_t)a->Hkv * a->k_width, vt = (int64_t)a->Hkv * a->v_width;
    const int whole = c->klen == kt && c->vlen == vt, mla = a->v == a->k;  /* MLA: V is part of K's rows */
    int nk = 0, nv = 0;
    const char *vp[FT];
    int64_t vl[FT];
    for (int t = t0; t < t1;) {
        const int64_t blk = table[t / a->bs], off = t % a->bs;
        const int run = whole ? (t1 - t < a->bs - off ? t1 - t : a->bs - off) : 1;
        c->p[nk] = (const char *)(a->k + blk * kb + off * kt + (int64_t)h0 * a->k_width);
        c->len[nk++] = run * c->klen;
        vp[nv] = (const char *)(a->v + blk * vb + off * vt + (int64_t)h0 * a->v_width);
        vl[nv++] = run * c->vlen;
        t += run;
    }
    c->nk = nk;
    c->n = nk;
    for (int i = 0; !mla && i < nv; i++) {
        c->p[c->n] = vp[i];
        c->len[c->n++] = vl[i];
    }
    c->lines = 0;
    for (int i = 0; i < c->n; i++) c->lines += c->len[i] / 64 + 1;
    c->off = 0;
    pf_seek(c, 0);
}

/* Within a tile, bf16 keys come from L2, a head's rows 2 KiB apart (GQA): the scores pull each key's
 * lines into L1 L1_AHEAD keys early. C harness, bf16 B8x4096, 6 alternated rounds: 5.20 -> 4.81 ms per
 * layer (distance 16 in the same rounds: 4.96; 2 and 4, with P.V's rows prefetched too, in another
 * run: 5.10 and 4.98 against 5.40 without); in cache 2% slower. 8-bit rows do without: compute-bound,
 * int8 took 7% longer with it, fp8 no change. The same for P.V's value rows gained nothing more and cost
 * 5% in cache. */
enum { L1_AHEAD = 8 };

/* where scores4 copies each key's fp16 row scales for softmax4 (row-scaled formats): kt[i] from
 * kh[i] + koff, vt[i] from vr[i] + voff. Beside the products their loads and stores are nearly free;
 * in loops of their own they took ~6% of int8's time in cache. C harness, alternated
 * rounds: int8 in cache, one thread, 0.513 -> 0.492 ms per layer; B8x4096 streamed 2.47 -> 2.38 */
typedef struct {
    const uint8_t *const *vr;
    int64_t koff, voff;
    uint16_t *kt, *vt;
} scale_copy;

/* st[i][r] (+)= q_r . k_i for four rows r over the tile's n keys, dims [c0, c0 + 32 NC): token-major,
 * one 4-wide store per key; rows4() turns it into rows */
static inline __attribute__((always_inline)) void scores4(const uint16_t *q, int D, int c0, const int NC,
                                                          const uint8_t *const *kh, int n, const int KF, float *s,
                                                          int first, pf_cursor *pf, const scale_copy *sc) {
    __m512i q0[4], q1[4], q2[4], q3[4];      /* (past NC: zero, never read; for gcc's flow analysis) */
    for (int c = NC; c < 4; c++) q0[c] = q1[c] = q2[c] = q3[c] = _mm512_setzero_si512();
    for (int c = 0; c < NC; c++) {
        q0[c] = _mm512_loadu_si512(q + 0 * (size_t)D + c0 + 32 * c);
        q1[c] = _mm512_loadu_si512(q + 1 * (size_t)D + c0 + 32 * c);
        q2[c] = _mm512_loadu_si512(q + 2 * (size_t)D + c0 + 32 * c);
        q3[c] = _mm512_loadu_si512(q + 3 * (size_t)D + c0 + 32 * c);
    }
#if FP8_LUT
    fp8_lut tab;
    if (lut8(KF)) tab = fp8_lut_load(KF, 1);
#endif
    for (int i = 0; i < n; i++) {
        if (pf && (!pf_four(KF) || (i & 3) == 3 || i == n - 1))  /* 8-bit rows: every fourth key, as pv4_int8 */
            pf_step(pf, pf_four(KF) ? (i & 3) + 1 : 1, pf_four(KF));
        if (!pf_four(KF) && i + L1_AHEAD < n)    /* 16-bit rows: the key L1_AHEAD on, from L2 into L1 */
            for (size_t l = 0; l < boff(KF, 32 * NC); l += 64)
                _mm_prefetch((const char *)kh[i + L1_AHEAD] + boff(KF, c0) + l, _MM_HINT_T0);
        if (sc) {                                /* the key's two row scales, beside its products */
            memcpy(sc->kt + i, kh[i] + sc->koff, 2);
            memcpy(sc->vt + i, sc->vr[i] + sc->voff, 2);
        }
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < NC; c++) {
            __m512i kv;
#if FP8_LUT
            __m512i kv1;
            if (lut8(KF)) {                      /* two chunks per lookup; q was permuted to match */
                ld64_fp8(kh[i] + c0 + 32 * c, &tab, &kv, &kv1);
                a0 = dp(a0, q0[c], kv, KF); a1 = dp(a1, q1[c], kv, KF);
                a2 = dp(a2, q2[c], kv, KF); a3 = dp(a3, q3[c], kv, KF);
                c++;
                kv = kv1;
            } else
#endif
                kv = ld32(kh[i] + boff(KF, c0 + 32 * c), KF);
            if (is_grp(KF)) {                    /* int4: each chunk is a group, times its own scale */
                uint16_t g16;
                memcpy(&g16, kh[i] + boff(KF, D) + 2 * ((c0 + 32 * c) / 32), 2);
                const __m512 sc = _mm512_cvtph_ps(_mm256_set1_epi16((short)g16)), z = _mm512_setzero_ps();
                a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)dp(z, q0[c], kv, KF)), sc, a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)dp(z, q1[c], kv, KF)), sc, a1);
                a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)dp(z, q2[c], kv, KF)), sc, a2);
                a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)dp(z, q3[c], kv, KF)), sc, a3);
                continue;
            }
            a0 = dp(a0, q0[c], kv, KF); a1 = dp(a1, q1[c], kv, KF);
            a2 = dp(a2, q2[c], kv, KF); a3 = dp(a3, q3[c], kv, KF);
        }
        const __m128 t = row_scaled(KF) ? reduce4i(a0, a1, a2, a3) : reduce4(a0, a1, a2, a3);
        _mm_storeu_ps(s + 4 * i, first ? t : _mm_add_ps(t, _mm_loadu_ps(s + 4 * i)));
    }
}

/* scores4 over the whole head dim, 128 dims (four 32-dim chunks in registers) at a time */
static inline __attribute__((always_inline)) void scores4_all(const uint16_t *q, int D, const uint8_t *const *kh, int n,
                                                              const int KF, float *s, pf_cursor *pf,
                                                              const scale_copy *sc) {
    for (int c0 = 0; c0 < D; c0 += 128) {
        pf_cursor *p = c0 == 0 ? pf : NULL;
        const scale_copy *z = c0 == 0 ? sc : NULL;
        switch ((D - c0) / 32 < 4 ? (D - c0) / 32 : 4) {
        case 1: scores4(q, D, c0, 1, kh, n, KF, s, c0 == 0, p, z); break;
        case 2: scores4(q, D, c0, 2, kh, n, KF, s, c0 == 0, p, z); break;
        case 3: scores4(q, D, c0, 3, kh, n, KF, s, c0 == 0, p, z); break;
        default: scores4(q, D, c0, 4, kh, n, KF, s, c0 == 0, p, z); break;
        }
    }
}

/* row_scales: dst[i] = the fp16 scale at rows[i] + off as fp32, for i < n (0 past n, up to 16 nu): the
 * 2-byte scales copied into t, then t converted (row_scales_convert, alone where scores4 did the copies) */
static inline void row_scales_convert(const uint16_t *t, int nu, float *dst) {
    for (int u = 0; u < nu; u++) _mm512_storeu_ps(dst + 16 * u, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t + 16 * u))));
}
static inline void row_scales(const uint8_t *const *rows, int64_t off, int n, int nu, float *dst) {
    uint16_t t[FT] = {0};
    for (int i = 0; i < n; i++) memcpy(t + i, rows[i] + off, 2);
    row_scales_convert(t, nu, dst);
}
/* softmax4's pipeline converts a head's scales (copied by scores4, see scale_copy) a head later:
 * converted right after the copies, the vector load waited for the 2-byte stores to retire, and so did
 * the softmax's chain behind it (C harness, int8 B1x4096 in cache, one thread: 0.550 -> 0.539 ms per
 * layer; scalar conversions one head early, the same; gathers, 0.577). */

/* st[i][r] = q_r . k_i for sixteen bf16 rows at once, rows in lanes: qt [D / 2][16] holds the rows'
 * query pairs, each key pair is broadcast; eight keys at a time, no horizontal sums */
static inline void scores16t(const uint32_t *qt, int D, const uint8_t *const *kh, int n, float *st,
                             pf_cursor *pf) {
    for (int i0 = 0; i0 < n; i0 += 8) {
        const uint32_t *k[8];
        for (int j = 0; j < 8; j++) k[j] = (const uint32_t *)(i0 + j < n ? kh[i0 + j] : zero_row);
        if (pf) pf_step(pf, 8, 0);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int p = 0; p < D / 2; p++) {
            const __m512bh qv = (__m512bh)_mm512_load_si512(qt + 16 * (size_t)p);
#define DPB(acc, j) acc = _mm512_dpbf16_ps(acc, qv, (__m512bh)_mm512_set1_epi32((int)k[j][p]))
            DPB(a0, 0); DPB(a1, 1); DPB(a2, 2); DPB(a3, 3); DPB(a4, 4); DPB(a5, 5); DPB(a6, 6); DPB(a7, 7);
#undef DPB
        }
        float *o = st + 16 * (size_t)i0;
        _mm512_store_ps(o, a0); _mm512_store_ps(o + 16, a1); _mm512_store_ps(o + 32, a2); _mm512_store_ps(o + 48, a3);
        _mm512_store_ps(o + 64, a4); _mm512_store_ps(o + 80, a5); _mm512_store_ps(o + 96, a6); _mm512_store_ps(o + 112, a7);
    }
}


#ifdef HAL_STAGED16
/* The build for int8/int6/fp8 MLA caches (-DHAL_STAGED16, see kernels/paged_decode.py): scores16t
 * for int8, int6 and fp8 keys, eight at a time widened once into 16-bit rows of a staging buffer
 * (int16; fp8: bf16 in ld64_fp8's order, as the query) instead of once per group of four rows (4x for
 * V2-Lite's 16 heads).
 * A build of its own because, compiled in, it slows the other paths through the code generation of
 * the shared item function alone (C harness: bf16 GQA decode 5-9%, bf16 MLA 8%). */
static inline __attribute__((always_inline)) void scores16t_staged(const uint32_t *qt, int D, const uint8_t *const *kh,
                                                                  int n, float *st, pf_cursor *pf, const int KF) {
    static __thread uint16_t stage[8][MAX_DIM] __attribute__((aligned(64)));
    const uint32_t *k = (const uint32_t *)stage[0];
    const int kw = MAX_DIM / 2;                  /* 32-bit pairs per staged row */
#if FP8_LUT
    fp8_lut tab;
    if (lut8(KF)) tab = fp8_lut_load(KF, 0);
#endif
    for (int i0 = 0; i0 < n; i0 += 8) {
        for (int j = 0; j < 8; j++) {
            const uint8_t *row = i0 + j < n ? kh[i0 + j] : zero_row;
#if FP8_LUT
            if (lut8(KF))
                for (int d = 0; d < D; d += 64) {
                    __m512i z0, z1;
                    ld64_fp8(row + d, &tab, &z0, &z1);
                    _mm512_store_si512(stage[j] + d, z0);
                    _mm512_store_si512(stage[j] + d + 32, z1);
                }
            else
#endif
                for (int d = 0; d < D; d += 32) _mm512_store_si512(stage[j] + d, ld32(row + boff(KF, d), KF));
        }
        if (pf) pf_step(pf, 8, pf_four(KF));
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int p = 0; p < D / 2; p++) {
            const __m512i qv = _mm512_load_si512(qt + 16 * (size_t)p);
#define DPB(acc, j) acc = dp(acc, qv, _mm512_set1_epi32((int)k[(j) * kw + p]), KF)
            DPB(a0, 0); DPB(a1, 1); DPB(a2, 2); DPB(a3, 3); DPB(a4, 4); DPB(a5, 5); DPB(a6, 6); DPB(a7, 7);
#undef DPB
        }
        if (is_int(KF)) {                        /* int32 sums to fp32 (the row scales come with the softmax) */
            a0 = _mm512_cvtepi32_ps((__m512i)a0); a1 = _mm512_cvtepi32_ps((__m512i)a1);
            a2 = _mm512_cvtepi32_ps((__m512i)a2); a3 = _mm512_cvtepi32_ps((__m512i)a3);
            a4 = _mm512_cvtepi32_ps((__m512i)a4); a5 = _mm512_cvtepi32_ps((__m512i)a5);
            a6 = _mm512_cvtepi32_ps((__m512i)a6); a7 = _mm512_cvtepi32_ps((__m512i)a7);
        }
        float *o = st + 16 * (size_t)i0;
        _mm512_store_ps(o, a0); _mm512_store_ps(o + 16, a1); _mm512_store_ps(o + 32, a2); _mm512_store_ps(o + 48, a3);
        _mm512_store_ps(o + 64, a4); _mm512_store_ps(o + 80, a5); _mm512_store_ps(o + 96, a6); _mm512_store_ps(o + 112, a7);
    }
}

static __attribute__((noinline)) void scores16t_quant(const uint32_t *qt, int D, const uint8_t *const *kh, int n,
                                                      float *st, pf_cursor *pf, int fmt) {
    switch (fmt) {
#if INT6_OK
    case FMT_INT6: scores16t_staged(qt, D, kh, n, st, pf, FMT_INT6); break;
#endif
#if FP8_LUT
    case FMT_E4M3: scores16t_staged(qt, D, kh, n, st, pf, FMT_E4M3); break;
    case FMT_E5M2: scores16t_staged(qt, D, kh, n, st, pf, FMT_E5M2); break;
#endif
    default: scores16t_staged(qt, D, kh, n, st, pf, FMT_INT8); break;
    }
}
#define STAGED16(fmt) ((fmt) == FMT_INT8 || ((fmt) == FMT_INT6 && INT6_OK) || lut8(fmt))
#else
#define STAGED16(fmt) 0
#endif

/* fp16/fp32 rows: st[i][r] = q_r . k_i for four rows, fp32 FMAs over the whole head dim (q in L1) */
static inline void scores4f(const float *q, int D, const uint8_t *const *kh, int n, const int KF, float *st,
                            pf_cursor *pf) {
    for (int i = 0; i < n; i++) {
        if (pf) pf_step(pf, 1, pf_four(KF));
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < D; d += 16) {
            const __m512 k = ld16f(kh[i] + boff(KF, d), KF);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), k, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + (size_t)D + d), k, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 2 * (size_t)D + d), k, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 3 * (size_t)D + d), k, a3);
        }
        _mm_storeu_ps(st + 4 * i, reduce4(a0, a1, a2, a3));
    }
}

/* fp16/fp32 rows: acc[r][d .. d + 64) += sum_i p[r][i] v_i, fp32 FMAs, dims in order */
static inline void pv4f(float *acc, int Dv, int d, const float *p, const uint8_t *const *vh, int n, const int VF) {
    __m512 x[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) x[r][c] = _mm512_loadu_ps(acc + (size_t)r * Dv + d + 16 * c);
    for (int i = 0; i < n; i++) {
        const uint8_t *vp = vh[i] + boff(VF, d);
        const __m512 v0 = ld16f(vp, VF), v1 = ld16f(vp + boff(VF, 16), VF);
        const __m512 v2 = ld16f(vp + boff(VF, 32), VF), v3 = ld16f(vp + boff(VF, 48), VF);
        for (int r = 0; r < 4; r++) {
            const __m512 w = _mm512_set1_ps(p[(size_t)r * FT + i]);
            x[r][0] = _mm512_fmadd_ps(w, v0, x[r][0]); x[r][1] = _mm512_fmadd_ps(w, v1, x[r][1]);
            x[r][2] = _mm512_fmadd_ps(w, v2, x[r][2]); x[r][3] = _mm512_fmadd_ps(w, v3, x[r][3]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + (size_t)r * Dv + d + 16 * c, x[r][c]);
}

static inline int amx_usable(void) { const int s = amx_grant(); return s == AMX_NATIVE || s == AMX_EMULATED; }

#if HAL_AMX
/* The tile rows of keys i0 .. i0 + 15 (each row_bytes of values): in place, *stride apart, when they
 * lie one stride apart (consecutive tokens of a block), else copied into stage + i0 row_bytes, zero
 * past n */
static inline const uint8_t *amx_key_rows(const uint8_t *const *kh, int n, int i0, size_t row_bytes, uint8_t *stage,
                                          int64_t *stride) {
    int direct = i0 + 16 <= n;
    const int64_t s = direct ? (int64_t)(kh[i0 + 1] - kh[i0]) : 0;
    for (int j = 2; direct && j < 16; j++) direct = (int64_t)(kh[i0 + j] - kh[i0]) == j * s;
    if (direct) {
        *stride = s;
        return kh[i0];
    }
    uint8_t *dst = stage + (size_t)i0 * row_bytes;
    for (int j = 0; j < 16; j++) {
        if (i0 + j < n) memcpy(dst + (size_t)j * row_bytes, kh[i0 + j], row_bytes);
        else memset(dst + (size_t)j * row_bytes, 0, row_bytes);
    }
    *stride = (int64_t)row_bytes;
    return dst;
}

/* The rows-in-lanes products on AMX tiles (bf16 rows and model, 16 rows a group; see amx.h). Tiles
 * 0-3 accumulate, 4, 6 and 7 take rows of the cache (or of the weights), 5 the other operand. */

/* st[i][r] = q_r . k_i for sixteen rows and the tile's n <= 64 keys, as scores16t leaves them: per 16
 * keys, C (16 keys x 16 rows, fp32) += A (16 keys x 32 dims of their rows) B (16 dim pairs x 16 rows:
 * qt, scores16t's query layout, is already AMX's pair-interleaved B), over D / 32 chunks. Sixteen keys
 * that lie a constant stride apart (consecutive tokens of one block) are loaded in place; others are
 * copied into `stage` (ft x D bf16) first, zero past n. Four accumulators in flight, one per 16 keys. */
static void amx_scores(const uint32_t *qt, int D, const uint8_t *const *kh, int n, float *st, uint16_t *stage,
                       pf_cursor *pf) {
    const int ng = (n + 15) / 16, nc = D / 32;
    const uint8_t *base[4];
    int64_t stride[4];
    for (int g = 0; g < ng; g++) base[g] = amx_key_rows(kh, n, 16 * g, 2 * (size_t)D, (uint8_t *)stage, &stride[g]);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int c = 0; c < nc; c++) {
        if (pf) pf_step(pf, n * (c + 1) / nc - n * c / nc, 0);
        _tile_loadd(5, qt + (size_t)c * 256, 64);
        _tile_loadd(4, base[0] + 64 * (size_t)c, stride[0]);
        _tile_dpbf16ps(0, 4, 5);
        if (ng > 1) { _tile_loadd(6, base[1] + 64 * (size_t)c, stride[1]); _tile_dpbf16ps(1, 6, 5); }
        if (ng > 2) { _tile_loadd(7, base[2] + 64 * (size_t)c, stride[2]); _tile_dpbf16ps(2, 7, 5); }
        if (ng > 3) { _tile_loadd(4, base[3] + 64 * (size_t)c, stride[3]); _tile_dpbf16ps(3, 4, 5); }
    }
    _tile_stored(0, st, 64);
    if (ng > 1) _tile_stored(1, st + 256, 64);
    if (ng > 2) _tile_stored(2, st + 512, 64);
    if (ng > 3) _tile_stored(3, st + 768, 64);
}

/* acc[16 rows][Dv] += the rows' weights (bf16 pairs, row r's pair k at w[r * WR + k], zero past the
 * tile's keys) times the tile's value rows, 64 dims at a time: C (16 rows x 16 dims, fp32, in acc) +=
 * A (16 rows x 16 token pairs of weights) B (16 token pairs x 16 dims). B needs each pair's two rows
 * interleaved, so they are staged (`stage`: 32 pairs x 64 dims) by the 16-bit unpacks pv4 uses, and
 * acc keeps pv4's dim order (ORDER_PAIRS). Tokens past n are staged as zeros: a stale row could hold
 * NaN, and 0 x NaN is NaN. */
static void amx_pv(float *acc, int Dv, const uint32_t *w, int WR, const uint8_t *const *vh, int n,
                   uint32_t *stage, pf_cursor *pf) {
    const int np = (n + 1) / 2, nt = (np + 15) / 16;   /* token pairs; chunks of 16 pairs (32 tokens) */
    for (int d = 0; d < Dv; d += 64) {
        for (int k = 0; k < 16 * nt; k++) {
            uint32_t *dst = stage + (size_t)k * 64;
            if (2 * k >= n) {
                memset(dst, 0, 256);
                continue;
            }
            const uint8_t *va = vh[2 * k] + 2 * (size_t)d, *vb = 2 * k + 1 < n ? vh[2 * k + 1] + 2 * (size_t)d : zero_row;
            const __m512i A0 = _mm512_loadu_si512(va), B0 = _mm512_loadu_si512(vb);
            const __m512i A1 = _mm512_loadu_si512(va + 64), B1 = _mm512_loadu_si512(vb + 64);
            _mm512_storeu_si512(dst, _mm512_unpacklo_epi16(A0, B0));
            _mm512_storeu_si512(dst + 16, _mm512_unpackhi_epi16(A0, B0));
            _mm512_storeu_si512(dst + 32, _mm512_unpacklo_epi16(A1, B1));
            _mm512_storeu_si512(dst + 48, _mm512_unpackhi_epi16(A1, B1));
        }
        if (pf) pf_step(pf, np, 0);
        float *c0 = acc + d;
        const int64_t rs = 4 * (int64_t)Dv;
        _tile_loadd(0, c0, rs); _tile_loadd(1, c0 + 16, rs); _tile_loadd(2, c0 + 32, rs); _tile_loadd(3, c0 + 48, rs);
        for (int t = 0; t < nt; t++) {
            const uint32_t *b = stage + (size_t)t * 16 * 64;
            _tile_loadd(4, w + 16 * t, 4 * (int64_t)WR);
            _tile_loadd(5, b, 256); _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, b + 16, 256); _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(7, b + 32, 256); _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, b + 48, 256); _tile_dpbf16ps(3, 4, 5);
        }
        _tile_stored(0, c0, rs); _tile_stored(1, c0 + 16, rs); _tile_stored(2, c0 + 32, rs); _tile_stored(3, c0 + 48, rs);
    }
}
#endif

/* int8 GQA decode on tiles is off in native builds: on the issue's machine kind (a Sapphire Rapids VM,
 * 2026-11-29) it ran 1.28x slower than the AVX-512 VNNI path in cache and 1.13x slower streamed (B1 and
 * B8 x 4096, alternated rounds): a 4-row group fills a quarter of each tile product, and a tile load
 * costs there about as much as a product. -DHAL_AMX_INT8_DECODE=1 builds it natively (tools/amx_check.sh
 * times it on other AMX machines); the C model's build keeps it, so the suite still checks its code. */
#ifndef HAL_AMX_INT8_DECODE
#define HAL_AMX_INT8_DECODE (!HAL_AMX_NATIVE)
#endif
#if HAL_AMX_INT8 && HAL_AMX_INT8_DECODE && !defined(HAL_STAGED16) && defined(__AVX512VBMI__)
#define HAL_AMX8 1
/* int8 rows, 4-row groups (GQA decode), on AMX-INT8 tiles, with the AVX-512 path's arithmetic: the
 * int16 queries and int16 weights each split into two bytes, so that the byte products (TDPBSUD,
 * TDPBUSD) give the same exact int32 sums as its VPDPWSSD, and the same floats after them. Tiles
 * (amx_configure_int8): 0, 1 a tile's scores (16 keys x 16 int32 columns), 2 keys (16 x 64 dims), 3
 * query planes (16 dim quads x 16 columns); 4 weight planes (8 x 32 keys), 5 staged values (8 key
 * quads x 16 dims x 4 keys), 6 P.V sums (8 x 16 dims). A tile is FT8 = 32 keys. */
static inline void amx_configure_int8(void) {
    static const uint8_t rows[8] = {16, 16, 16, 16, 8, 8, 8, 8};
    static const uint16_t colsb[8] = {64, 64, 64, 64, 32, 64, 64, 64};
    amx_configure_shapes(rows, colsb);
}

/* B of the scores for four int16 query rows q (D each), per 64 dims c: planes[c][k][n], 4-byte
 * groups of dims 64 c + 4 k .. + 3: column n < 4 the high bytes of row n's q + 32768 (unsigned), n in
 * 4 .. 7 their low bytes, n = 8 ones (a key's sum, to take the 32768 back off), zero past 8. */
static void amx_q_planes(const uint16_t *q, int D, uint8_t *planes) {
    memset(planes, 0, (size_t)D / 64 * 1024);
    for (int d = 0; d < D; d++) {
        uint8_t *g = planes + (size_t)(d / 64) * 1024 + (size_t)((d % 64) / 4) * 64 + d % 4;  /* row, byte */
        for (int r = 0; r < 4; r++) {
            const uint16_t u = (uint16_t)(q[(size_t)r * D + d] + 32768u);
            g[4 * r] = (uint8_t)(u >> 8);
            g[4 * (4 + r)] = (uint8_t)u;
        }
        g[4 * 8] = 1;
    }
}

/* st[i][r] = the int32 dot product of key i with row r (as a float, as reduce4i gives it) for the
 * tile's n <= 32 keys: 256 hi + lo - 32768 sum(k). Sixteen keys one stride apart load in place, others
 * are staged (`stage`: 32 x D bytes, zero past n). Copies the rows' scales as scores4 does (sc). */
static void amx_scores_int8(const uint8_t *planes, int D, const uint8_t *const *kh, int n, float *st, uint8_t *stage,
                            pf_cursor *pf, const scale_copy *sc) {
    const int ng = (n + 15) / 16;
    const uint8_t *base[2];
    int64_t stride[2];
    if (sc)
        for (int i = 0; i < n; i++) {
            memcpy(sc->kt + i, kh[i] + sc->koff, 2);
            memcpy(sc->vt + i, sc->vr[i] + sc->voff, 2);
        }
    for (int g = 0; g < ng; g++) base[g] = amx_key_rows(kh, n, 16 * g, (size_t)D, stage, &stride[g]);
    _tile_zero(0);
    _tile_zero(1);
    for (int c = 0; c < D / 64; c++) {
        if (pf) pf_step(pf, n * (c + 1) / (D / 64) - n * c / (D / 64), 1);
        _tile_loadd(3, planes + (size_t)c * 1024, 64);
        _tile_loadd(2, base[0] + 64 * (size_t)c, stride[0]);
        _tile_dpbsud(0, 2, 3);
        if (ng > 1) {
            _tile_loadd(2, base[1] + 64 * (size_t)c, stride[1]);
            _tile_dpbsud(1, 2, 3);
        }
    }
    int32_t sums[32][16] __attribute__((aligned(64)));
    _tile_stored(0, sums[0], 64);
    if (ng > 1) _tile_stored(1, sums[16], 64);
    for (int i = 0; i < n; i++) {
        const __m128i hi = _mm_load_si128((const __m128i *)sums[i]), lo = _mm_load_si128((const __m128i *)(sums[i] + 4));
        const __m128i x = _mm_sub_epi32(_mm_add_epi32(_mm_slli_epi32(hi, 8), lo), _mm_set1_epi32((int)((uint32_t)sums[i][8] << 15)));
        _mm_storeu_ps(st + 4 * i, _mm_cvtepi32_ps(x));
    }
}

static uint8_t amx8_planes_ix[4][64] __attribute__((aligned(64)));  /* see amx_pv_int8 */

__attribute__((constructor)) static void amx8_planes_init(void) {
    for (int p = 0; p < 256; p++) {          /* plane byte p: row m = p / 32 (high bytes for m < 4), key t */
        const int m = p / 32, t = p % 32 % 16, r = m % 4;  /* t: within its half, whose 128 bytes hold it */
        amx8_planes_ix[p / 64][p % 64] = (uint8_t)(2 * (8 * (t / 2) + 2 * r + t % 2) + (m < 4));
    }
}

/* acc[r][Dv] (rows r0 .. r0 + 3, ORDER_FP8_TABLE's dim order) += wscale[r] times the int32 sum over
 * the tile's keys of row r's int16 weight (softmax4's pair-major w4) times the key's int8 values: A =
 * the weights' high bytes (rows 0-3) and low bytes (rows 4-7), B = four keys' values interleaved by
 * byte and word unpacks (`stage`: 8 quads x 4 x 64 bytes), so 256 hi + lo is pv4_int8's exact sum.
 * Keys past n stage as zeros. */
static void amx_pv_int8(float *acc, int Dv, const uint32_t *w4, const float *wscale, const uint8_t *const *vh,
                        int n, int npairs, uint8_t *stage, pf_cursor *pf) {
    /* the weights' byte planes, wp[m][t]: key t of row m's high byte (m < 4) or row m - 4's low byte; in
     * w4 key t of row r is 16-bit word 8 (t / 2) + 2 r + t % 2, keys 0-15 in its first 128 bytes */
    uint8_t wp[8][32] __attribute__((aligned(64)));
    const __m512i s0 = _mm512_loadu_si512(w4), s1 = _mm512_loadu_si512(w4 + 16);
    const __m512i s2 = _mm512_loadu_si512(w4 + 32), s3 = _mm512_loadu_si512(w4 + 48);
    for (int j = 0; j < 4; j++) {
        const __m512i ix = _mm512_load_si512(amx8_planes_ix[j]);
        _mm512_store_si512(wp[2 * j], _mm512_mask_blend_epi8(0xFFFF0000FFFF0000ULL, _mm512_permutex2var_epi8(s0, ix, s1),
                                                             _mm512_permutex2var_epi8(s2, ix, s3)));
    }
    _tile_loadd(4, wp[0], 32);
    for (int d = 0; d < Dv; d += 64) {
        for (int j = 0; j < 8; j++) {
            const uint8_t *r0 = 4 * j < n ? vh[4 * j] + d : zero_row, *r1 = 4 * j + 1 < n ? vh[4 * j + 1] + d : zero_row;
            const uint8_t *r2 = 4 * j + 2 < n ? vh[4 * j + 2] + d : zero_row, *r3 = 4 * j + 3 < n ? vh[4 * j + 3] + d : zero_row;
            const __m512i a = _mm512_loadu_si512(r0), b = _mm512_loadu_si512(r1);
            const __m512i c = _mm512_loadu_si512(r2), e = _mm512_loadu_si512(r3);
            const __m512i ablo = _mm512_unpacklo_epi8(a, b), abhi = _mm512_unpackhi_epi8(a, b);
            const __m512i cdlo = _mm512_unpacklo_epi8(c, e), cdhi = _mm512_unpackhi_epi8(c, e);
            uint8_t *dst = stage + (size_t)j * 256;  /* vector q: per 128-bit lane L, dims 16 L + 4 q .. + 3 */
            _mm512_store_si512(dst, _mm512_unpacklo_epi16(ablo, cdlo));
            _mm512_store_si512(dst + 64, _mm512_unpackhi_epi16(ablo, cdlo));
            _mm512_store_si512(dst + 128, _mm512_unpacklo_epi16(abhi, cdhi));
            _mm512_store_si512(dst + 192, _mm512_unpackhi_epi16(abhi, cdhi));
        }
        if (pf) pf_step(pf, npairs, 1);
        for (int q = 0; q < 4; q++) {
            int32_t sums[8][16] __attribute__((aligned(64)));
            _tile_loadd(5, stage + 64 * q, 256);
            _tile_zero(6);
            _tile_dpbusd(6, 4, 5);
            _tile_stored(6, sums[0], 64);
            for (int r = 0; r < 4; r++) {
                float *row = acc + (size_t)r * Dv + d + 16 * q;
                const __m512i x = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums[r]), 8), _mm512_load_si512(sums[4 + r]));
                _mm512_storeu_ps(row, _mm512_fmadd_ps(_mm512_set1_ps(wscale[r]), _mm512_cvtepi32_ps(x), _mm512_loadu_ps(row)));
            }
        }
    }
}
#else
#define HAL_AMX8 0
#endif

#if HAL_AMX && FP8_LUT && !defined(HAL_STAGED16)
#define HAL_AMXF 1
/* fp8 rows, 4-row groups (GQA decode), on AMX-BF16 tiles: the rows widened to bf16 by shifts
 * (fp8_shift_words; keys by ld64_fp8's exact table for an item whose queries reach 2^64, or its
 * softmax scale times a K scale 2^70) into
 * staging, in their dim order (the queries' is permuted to match), then the products on tiles
 * (e4m3 values: P.V in fp16 instead, pv4_fp16 below). Tiles (amx_configure_fp8): 0, 1 scores (16 keys x 4 rows,
 * fp32: scores4's token-major layout), 2 staged keys (16 x 32 dims), 3 query pairs (16 dim pairs x 4
 * rows); 4 and 7 weights (4 rows x 16 key pairs: pairs 0-15 and 16-31), 5 staged value pairs (16 key
 * pairs x 16 dims), 6 P.V sums (4 rows x 16 dims, in acc). A tile is FTF = 64 keys: P.V's sums make
 * one round trip through acc per 64 keys, not per 32 as with 32-key tiles. C harness, fp8_e4m3,
 * B/A medians of alternated passes against 32-key tiles: rows in L2 (B1 x 512, one thread) 0.936 and
 * 0.949 (300 passes); streamed on 2 threads, B8 x 4096 0.980, 0.955 (10 passes) and 0.946 (20),
 * B1 x 16384 0.933, B16 x 1024 0.982. */
static inline void amx_configure_fp8(void) {
    static const uint8_t rows[8] = {16, 16, 16, 16, 4, 16, 4, 4};
    static const uint16_t colsb[8] = {16, 16, 64, 16, 64, 64, 64, 64};
    amx_configure_shapes(rows, colsb);
}

/* qp[p][r] = row r's dim pair p of four bf16 query rows (D each): B of the scores, 16 pairs a chunk */
static void amx_q_pairs(const uint16_t *q, int D, uint32_t *qp) {
    const uint32_t *q32 = (const uint32_t *)q;
    for (int p = 0; p < D / 2; p++)
        for (int r = 0; r < 4; r++) qp[4 * p + r] = q32[(size_t)r * (D / 2) + p];
}

/* st[i][r] = q_r . k_i (fp32) for four rows and n <= 32 keys (half of a tile); `stage`: 32 x D bf16. The next
 * tile's prefetches (pf) are issued between the tile products, here and in amx_pv_fp8, not during the
 * widening: the tile work is a third of fp8's time here, and lines requested only during the vector
 * phases left the memory idle through it. C harness, fp8_e4m3 B8 x 4096, alternated rounds: streamed
 * on 2 threads, time ratio median 0.90 and 0.92 (10 and 20 rounds); in cache on one thread 0.92. */
static void amx_scores_fp8(const uint32_t *qp, int D, const uint8_t *const *kh, int n, const int KF, const int shift,
                           float *st, uint16_t *stage, pf_cursor *pf) {
    const int ng = (n + 15) / 16;
    for (int i = n; i < 16 * ng; i++) memset(stage + (size_t)i * D, 0, 2 * (size_t)D);
    const fp8_lut tab = fp8_lut_load(KF, 0);
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d += 64) {
            __m512i z0, z1;
            if (shift) ld64_fp8_shift(kh[i] + d, KF, &z0, &z1);  /* the queries in shift_dim's order, x 2^64 */
            else ld64_fp8(kh[i] + d, &tab, &z0, &z1);           /* the exact table: in lut_dim's */
            _mm512_store_si512(stage + (size_t)i * D + d, z0);
            _mm512_store_si512(stage + (size_t)i * D + d + 32, z1);
        }
    _tile_zero(0);
    _tile_zero(1);
    for (int c = 0; c < D / 32; c++) {
        _tile_loadd(3, qp + 64 * (size_t)c, 16);
        _tile_loadd(2, stage + 32 * (size_t)c, 2 * (int64_t)D);
        _tile_dpbf16ps(0, 2, 3);
        if (pf) pf_step(pf, (n + 1) / 2 / (D / 32) + 1, 1);  /* the prefetches between the products */
        if (ng > 1) {
            _tile_loadd(2, stage + 16 * (size_t)D + 32 * (size_t)c, 2 * (int64_t)D);
            _tile_dpbf16ps(1, 2, 3);
        }
        if (pf) pf_step(pf, (n + 1) / 2 / (D / 32), 1);
    }
    _tile_stored(0, st, 16);
    if (ng > 1) _tile_stored(1, st + 64, 16);
}

/* acc[r][Dv] (four rows, ORDER_FP8_TABLE) += the weights (softmax4's pair-major bf16 pairs, w4[4 k + r])
 * times 2^64 times the tile's value pairs widened by shifts (fp8_shift_words: 2^-120 or 2^-112 of
 * their values), in the order of pv4's table route (`stage`: 32 pairs x 64 dims); keys past n stage as
 * zeros. The accumulators hold 2^-56 (e4m3) or 2^-48 (e5m2) of the sums. */
static void amx_pv_fp8(float *acc, int Dv, const uint32_t *w4, const uint8_t *const *vh, int n, int npairs,
                       const int VF, uint32_t *stage, pf_cursor *pf) {
    const int NP = npairs > 16 ? 32 : 16;     /* pairs staged: one weights tile or two */
    uint32_t wr[4][32] __attribute__((aligned(64)));  /* A: row r's pairs (0-15: tile 4, 16-31: tile 7) */
    for (int p0 = 0; p0 < NP; p0 += 16) {
        const uint32_t *w = w4 + 4 * p0;
        const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 16);
        const __m512i w2 = _mm512_loadu_si512(w + 32), w3 = _mm512_loadu_si512(w + 48);
        for (int r = 0; r < 4; r++) {         /* pair k of row r: dword 4 k + r, pairs 0-7 in w0 and w1 */
            const __m512i ix = _mm512_add_epi32(
                _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28), _mm512_set1_epi32(r));
            _mm512_store_si512(wr[r] + p0, bf16_times_2_64(_mm512_mask_blend_epi32(
                                               0xFF00, _mm512_permutex2var_epi32(w0, ix, w1),
                                               _mm512_permutex2var_epi32(w2, ix, w3))));
        }
    }
    _tile_loadd(4, wr[0], 128);
    if (NP > 16) _tile_loadd(7, wr[0] + 16, 128);
    const int64_t rs = 4 * (int64_t)Dv;
    const __m512i zz = _mm512_setzero_si512();
    for (int d = 0; d < Dv; d += 64) {
        for (int k = 0; k < NP; k++) {
            uint32_t *dst = stage + (size_t)k * 64;
            if (2 * k >= n) {
                memset(dst, 0, 256);
                continue;
            }
            const __m512i xa = _mm512_loadu_si512(vh[2 * k] + d);
            const __m512i xb = _mm512_loadu_si512(2 * k + 1 < n ? vh[2 * k + 1] + d : zero_row);
            /* a's and b's bytes paired (dims 16 L + 0..7, then 8..15, in 128-bit lane L), then each pair's
             * two bytes put at the tops of a dword's two words: [0, a, 0, b], dims 16 L + 4 c + 0..3 */
            const __m512i u0 = _mm512_unpacklo_epi8(xa, xb), u1 = _mm512_unpackhi_epi8(xa, xb);
            const __m512i L0 = fp8_shift_words(_mm512_unpacklo_epi8(zz, u0), VF);
            const __m512i H0 = fp8_shift_words(_mm512_unpackhi_epi8(zz, u0), VF);
            const __m512i L1 = fp8_shift_words(_mm512_unpacklo_epi8(zz, u1), VF);
            const __m512i H1 = fp8_shift_words(_mm512_unpackhi_epi8(zz, u1), VF);
            _mm512_store_si512(dst, L0);
            _mm512_store_si512(dst + 16, H0);
            _mm512_store_si512(dst + 32, L1);
            _mm512_store_si512(dst + 48, H1);
        }
        for (int c = 0; c < 64; c += 16) {    /* 16 dims: their sums loaded once for both weight tiles */
            float *c0 = acc + d + c;
            _tile_loadd(6, c0, rs);
            _tile_loadd(5, stage + c, 256);
            _tile_dpbf16ps(6, 4, 5);
            if (NP > 16) {
                _tile_loadd(5, stage + 16 * 64 + c, 256);
                _tile_dpbf16ps(6, 7, 5);
            }
            _tile_stored(6, c0, rs);
            if (pf) pf_step(pf, (npairs + 3) / 4, 1);
        }
    }
}
#if defined(__AVX512FP16__) && !defined(HAL_NO_PVF16)
#define HAL_PVF16 1
/* P.V of fp8_e4m3 rows in fp16 on AVX-512 (VFMADDPH), not on tiles; e5m2 keeps amx_pv_fp8. Measured
 * here: VDPBF16PS takes 2 cycles a zmm instruction, VFMADDPH and VPDPWSSD half a cycle, and the tile
 * unit's rate moves between minutes on this VM; P.V on tiles cost the same as in fp16 in its fast
 * minutes and more in its slow ones (below). An e4m3 byte is an fp16 exactly, times 2^-8: its sign, a
 * zero, its exponent and mantissa bits (s 0 eeee mmm 0000000, subnormals included, which fp16 keeps
 * whatever MXCSR says), two bit permutations of the byte (GF2P8AFFINEQB: the high and the low byte of
 * each word) and two unpacks per 64 values. The weights come from softmax4 as fp16 times 2^8, so the
 * products are w v (at most 448) and a tile's sums of at most 64 keys stay below 64 x 448 = 28672, in
 * fp16's range (65504); each flushes into the fp32 accumulators once per tile. The products carry fp16's
 * 11 bits, the sums round once a key, where the tiles rounded the weights to bf16's 8 bits and summed in
 * fp32: on bench shapes the outputs' rms error against the float64 reference was 1.90-1.99e-3 of their
 * rms, against the tiles' 1.81-1.87e-3 (bf16's own rounding about 1.1e-3). C harness, fp8_e4m3, B/A
 * medians against P.V on tiles: streamed on 2 threads, B8 x 4096 0.963, 0.973 and 0.979, B1 x 1024 0.834
 * and 0.837, B1 x 16384 0.930, B16 x 1024 0.976; rows in L2, one thread (B1 x 512), 0.786 in slow
 * minutes of the tile unit and 1.05-1.06 in fast ones; 2 threads (B8 x 256) 0.925 and 1.061. Full-size
 * bench: fp8_e4m3 at 1.6x bf16 at 8, 8, 7 and 7 of 8 points in four runs (the README). */
enum { PVF16_KEYS = 64 };  /* keys per flush: fp16 sums below 64 x 448 */

/* acc[r][Dv] (four rows, ORDER_F16; 2^-56 of the sums, as amx_pv_fp8's) += the weights of keys [k0, k1)
 * (wf: 16 fp16 per key, [r][j], row r's weight times 2^8 once per vector j: then each FMA broadcasts its
 * own from memory, {1to32}, where one broadcast for four FMAs took a VPBROADCASTW on the shuffle port)
 * times their values' dims [d, d + 64 ND) */
static inline __attribute__((always_inline)) void pv4_fp16_block(float *acc, int Dv, int d, const _Float16 *wf,
                                                                 const uint8_t *const *vh, int k0, int k1, pf_cursor *pf,
                                                                 const int ND) {
    const __m512i ahi = _mm512_set1_epi64(0x0204081020400080LL);  /* byte -> s 0 e3 e2 e1 e0 m2 m1 */
    const __m512i alo = _mm512_set1_epi64(0x0000000000000001LL);  /* byte -> m0 0 0 0 0 0 0 0 */
    __m512h s[4][4];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 2 * ND; j++) s[r][j] = _mm512_setzero_ph();
    for (int k = k0; k < k1; k++) {
        __m512i v[4];
        for (int hf = 0; hf < ND; hf++) {
            const __m512i x = _mm512_loadu_si512(vh[k] + d + 64 * hf);
            const __m512i h = _mm512_gf2p8affine_epi64_epi8(x, ahi, 0), l = _mm512_gf2p8affine_epi64_epi8(x, alo, 0);
            v[2 * hf] = _mm512_unpacklo_epi8(l, h);
            v[2 * hf + 1] = _mm512_unpackhi_epi8(l, h);
        }
        const _Float16 *wk = wf + 16 * k;
        for (int r = 0; r < 4; r++)
            for (int j = 0; j < 2 * ND; j++)
                s[r][j] = _mm512_fmadd_ph(_mm512_set1_ph(wk[4 * r + j]), _mm512_castsi512_ph(v[j]), s[r][j]);
        if (pf && (k & 1)) pf_step(pf, ND, 1);  /* pv_steps: a step per pair of keys and 64 dims */
    }
    /* fp16 lane t of v[2 hf + u] holds dim 64 hf + 16 (t / 8) + 8 u + t % 8; fp32 position
     * 64 hf + 32 g + 16 u + i (i < 16), from lane 16 g + i of v[2 hf + u]: ORDER_F16 */
    const __m512 out_scale = _mm512_set1_ps(0x1p-56f);
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 2 * ND; j++) {
            float *c = acc + (size_t)r * Dv + d + 64 * (j >> 1) + 16 * (j & 1);
            const __m512i sj = _mm512_castph_si512(s[r][j]);
            const __m512 f0 = _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_castsi512_si256(sj)));
            const __m512 f1 = _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_extracti64x4_epi64(sj, 1)));
            _mm512_storeu_ps(c, _mm512_fmadd_ps(f0, out_scale, _mm512_loadu_ps(c)));
            _mm512_storeu_ps(c + 32, _mm512_fmadd_ps(f1, out_scale, _mm512_loadu_ps(c + 32)));
        }
}

/* acc[r][Dv] (four rows, ORDER_F16) += wf's weights (softmax4's WF16 kind) times the values of n keys */
static __attribute__((noinline)) void pv4_fp16(float *acc, int Dv, const _Float16 *wf, const uint8_t *const *vh, int n,
                                               pf_cursor *pf) {
    for (int k0 = 0; k0 < n; k0 += PVF16_KEYS) {
        const int k1 = k0 + PVF16_KEYS < n ? k0 + PVF16_KEYS : n;
        int d = 0;
        for (; d + 128 <= Dv; d += 128) pv4_fp16_block(acc, Dv, d, wf, vh, k0, k1, pf, 2);
        if (d < Dv) pv4_fp16_block(acc, Dv, d, wf, vh, k0, k1, pf, 1);
    }
}
#define PVF16(fmt) ((fmt) == FMT_E4M3)  /* the V formats whose P.V runs in pv4_fp16 */
#else
#define HAL_PVF16 0
#define PVF16(fmt) 0
#endif
#else
#define HAL_AMXF 0
#endif

/* s[c][i] = st[i][c] for a 16 x 16 block: 4 x 4 transposes inside 128-bit lanes, then of the lanes */
static inline void transpose16(const float *st, float *s, size_t stride) {
    __m512 u[4][4];                          /* u[j][g] lane q: rows 4g .. 4g+3 of column 4q + j */
    for (int g = 0; g < 4; g++) {
        const __m512 r0 = _mm512_load_ps(st + 16 * (4 * g)), r1 = _mm512_load_ps(st + 16 * (4 * g + 1));
        const __m512 r2 = _mm512_load_ps(st + 16 * (4 * g + 2)), r3 = _mm512_load_ps(st + 16 * (4 * g + 3));
        const __m512 t0 = _mm512_unpacklo_ps(r0, r1), t1 = _mm512_unpackhi_ps(r0, r1);
        const __m512 t2 = _mm512_unpacklo_ps(r2, r3), t3 = _mm512_unpackhi_ps(r2, r3);
        u[0][g] = _mm512_shuffle_ps(t0, t2, 0x44); u[1][g] = _mm512_shuffle_ps(t0, t2, 0xEE);
        u[2][g] = _mm512_shuffle_ps(t1, t3, 0x44); u[3][g] = _mm512_shuffle_ps(t1, t3, 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        const __m512 a = _mm512_shuffle_f32x4(u[j][0], u[j][1], 0x44), b = _mm512_shuffle_f32x4(u[j][0], u[j][1], 0xEE);
        const __m512 c = _mm512_shuffle_f32x4(u[j][2], u[j][3], 0x44), d = _mm512_shuffle_f32x4(u[j][2], u[j][3], 0xEE);
        _mm512_storeu_ps(s + (size_t)(0 + j) * stride, _mm512_shuffle_f32x4(a, c, 0x88));
        _mm512_storeu_ps(s + (size_t)(4 + j) * stride, _mm512_shuffle_f32x4(a, c, 0xDD));
        _mm512_storeu_ps(s + (size_t)(8 + j) * stride, _mm512_shuffle_f32x4(b, d, 0x88));
        _mm512_storeu_ps(s + (size_t)(12 + j) * stride, _mm512_shuffle_f32x4(b, d, 0xDD));
    }
}

/* s[r][i] = st[i][r] for four rows, 16 keys at a time (keys past n are garbage the softmax masks off) */
static inline void rows4(float *s, const float *st, int n) {
    const __m512i idx[4] = {
        _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0),
        _mm512_setr_epi32(1, 5, 9, 13, 17, 21, 25, 29, 0, 0, 0, 0, 0, 0, 0, 0),
        _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 0, 0, 0, 0, 0, 0, 0, 0),
        _mm512_setr_epi32(3, 7, 11, 15, 19, 23, 27, 31, 0, 0, 0, 0, 0, 0, 0, 0)};
    for (int i0 = 0; i0 < n; i0 += 16) {
        const float *z = st + 4 * i0;
        const __m512 z0 = _mm512_loadu_ps(z), z1 = _mm512_loadu_ps(z + 16), z2 = _mm512_loadu_ps(z + 32), z3 = _mm512_loadu_ps(z + 48);
        for (int r = 0; r < 4; r++) {
            const __m512 lo = _mm512_permutex2var_ps(z0, idx[r], z1), hi = _mm512_permutex2var_ps(z2, idx[r], z3);
            _mm512_storeu_ps(s + (size_t)r * FT + i0, _mm512_shuffle_f32x4(lo, hi, 0x44));
        }
    }
}

/* acc[r] += sum over token pairs of w[r][pair] . (v_2k, v_2k+1), four rows, dims [d, d + 64). acc is
 * fp32 in the interleaved order; integer rows accumulate in int32 and add wscale[r] times the sum. Row r's
 * weight for pair k is w[r * rs + k * ks] (the per-row softmax: rs = WR, ks = 1; softmax4: rs = 1, ks = 4); int4
 * rows have a set per group of 32 dims (FT / 2 apart), and NG scales. */
static inline __attribute__((always_inline)) void pv4(float *acc, int Dv, int d, const uint32_t *w, int rs, int ks,
                                                      const float *wscale, int NG, const uint8_t *const *vh,
                                                      int npairs, const int VF, pf_cursor *pf) {
    const int g0 = is_grp(VF) ? d / 32 : 0, g1 = is_grp(VF) ? g0 + 1 : 0;
    float *a0 = acc + d, *a1 = a0 + Dv, *a2 = a1 + Dv, *a3 = a2 + Dv;
    __m512 x[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++)
            x[r][c] = is_int(VF) ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (size_t)r * Dv + d + 16 * c);
    for (int k = 0; k < npairs; k++) {
        if (pf && (!pf_four(VF) || (k & 3) == 3 || k == npairs - 1))  /* 8-bit rows: every fourth pair, as pv4_int8 */
            pf_step(pf, pf_four(VF) ? (k & 3) + 1 : 1, pf_four(VF));
        const uint8_t *va = vh[2 * k] + boff(VF, d), *vb = vh[2 * k + 1] + boff(VF, d);
        __m512i A0, B0, A1, B1;
        __m512i L0, H0, L1, H1;
#if FP8_LUT
        if (lut8(VF)) {                          /* the tokens' bytes paired first: then the lookup's unpacks */
            const __m512i xa = _mm512_loadu_si512(va), xb = _mm512_loadu_si512(vb);  /* give (a, b) bf16 pairs */
            const fp8_lut tab = fp8_lut_load(VF, 0);  /* (gcc keeps the tables in registers here) */
            ld64_fp8_bytes(_mm512_unpacklo_epi8(xa, xb), &tab, &L0, &H0);  /* in the order of the unpacks below */
            ld64_fp8_bytes(_mm512_unpackhi_epi8(xa, xb), &tab, &L1, &H1);
        } else
#endif
        {
            A0 = ld32(va, VF); B0 = ld32(vb, VF); A1 = ld32(va + boff(VF, 32), VF); B1 = ld32(vb + boff(VF, 32), VF);
            L0 = _mm512_unpacklo_epi16(A0, B0); H0 = _mm512_unpackhi_epi16(A0, B0);
            L1 = _mm512_unpacklo_epi16(A1, B1); H1 = _mm512_unpackhi_epi16(A1, B1);
        }
        for (int r = 0; r < 4; r++) {
            const __m512i w0 = _mm512_set1_epi32((int)w[(size_t)r * rs + g0 * (FT / 2) + (size_t)k * ks]);
            const __m512i w1 = _mm512_set1_epi32((int)w[(size_t)r * rs + g1 * (FT / 2) + (size_t)k * ks]);
            x[r][0] = dp(x[r][0], L0, w0, VF); x[r][1] = dp(x[r][1], H0, w0, VF);
            x[r][2] = dp(x[r][2], L1, w1, VF); x[r][3] = dp(x[r][3], H1, w1, VF);
        }
    }
    float *rows[4] = {a0, a1, a2, a3};
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) {
            if (is_int(VF))
                _mm512_storeu_ps(rows[r] + 16 * c, _mm512_fmadd_ps(_mm512_set1_ps(wscale[r * NG + (c < 2 ? g0 : g1)]),
                                                                   _mm512_cvtepi32_ps((__m512i)x[r][c]),
                                                                   _mm512_loadu_ps(rows[r] + 16 * c)));
            else
                _mm512_storeu_ps(rows[r] + 16 * c, x[r][c]);
        }
}

/* pv4 for int8 rows (weights as pv4's: softmax4's pair-major, rs = 1, ks = 4, or the per-row softmax's,
 * rs = WR, ks = 1): the sixteen int32 accumulators named and updated in place by VPDPWSSD. Through pv4's
 * array, and through its casts from fp32 vectors, gcc 12 kept the accumulators in two register sets and
 * copied one into the other after every pair (30 moves and two stack round trips per 16 products): alone,
 * with its rows in L1, P.V took 21.8 cycles per key instead of 17.9 (16 is the products' bound). The
 * prefetch cursor steps every fourth pair (and scores4 every fourth key) for 8-bit rows: every pair cost
 * about 3 cycles per key in its branches, and every fourth against every second, C harness, alternated
 * rounds: int8 B8x4096 2.49 -> 2.42 ms per layer, fp8_e4m3 2.76 -> 2.53, fp8 in cache 0.329 -> 0.314;
 * every eighth was slower again (int8 2.49). The per-row softmax's loop (int8 MLA caches) took it on
 * 2026-11-29: through pv4 an accumulator lived on the stack there too (9% of samples on its reload); MLA
 * int8 B1 x 4096 in cache 0.807 -> 0.785 ms (one thread), 0.446 -> 0.434 (two), streamed 0.425 -> 0.416.
 * int6 rows take it in softmax4's loop, where pv4 kept two accumulators on the stack too (6.8% of
 * samples; GQA int6 B1 x 4096 in cache 0.620 -> 0.607, B8 x 4096 streamed 2.80 -> 2.72; int8 within
 * noise), but not in the per-row one (int6 MLA caches: 0.917 -> 0.969 through this one). */
#define DP_INPLACE(acc, a, b) __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))
static inline __attribute__((always_inline)) void pv4_int8(float *acc, int Dv, int d, const uint32_t *w, int rs,
                                                           int ks, const float *wscale, const uint8_t *const *vh,
                                                           int npairs, const int VF, pf_cursor *pf) {
    __m512i x00 = _mm512_setzero_si512(), x01 = x00, x02 = x00, x03 = x00, x10 = x00, x11 = x00, x12 = x00, x13 = x00;
    __m512i x20 = x00, x21 = x00, x22 = x00, x23 = x00, x30 = x00, x31 = x00, x32 = x00, x33 = x00;
    for (int k = 0; k < npairs; k++) {
        if (pf && ((k & 3) == 3 || k == npairs - 1)) pf_step(pf, (k & 3) + 1, 1);
        const uint8_t *va = vh[2 * k] + boff(VF, d), *vb = vh[2 * k + 1] + boff(VF, d);
        const __m512i A0 = ld32(va, VF), B0 = ld32(vb, VF), A1 = ld32(va + boff(VF, 32), VF), B1 = ld32(vb + boff(VF, 32), VF);
        __m512i L0 = _mm512_unpacklo_epi16(A0, B0), H0 = _mm512_unpackhi_epi16(A0, B0);
        __m512i L1 = _mm512_unpacklo_epi16(A1, B1), H1 = _mm512_unpackhi_epi16(A1, B1);
        __asm__("" : "+v"(L0), "+v"(H0), "+v"(L1), "+v"(H1));  /* else gcc 12 stored L0 to the stack and
                                                                * reloaded it every pair (in cache, one thread:
                                                                * 0.493 -> 0.485 ms per layer) */
        const uint32_t *wk = w + ks * (size_t)k;
#define PV_ROW(r)                                                                                    \
        {                                                                                            \
            const __m512i wr = _mm512_set1_epi32((int)wk[(size_t)(r) * rs]);                         \
            DP_INPLACE(x##r##0, L0, wr); DP_INPLACE(x##r##1, H0, wr);                                \
            DP_INPLACE(x##r##2, L1, wr); DP_INPLACE(x##r##3, H1, wr);                                \
        }
        PV_ROW(0) PV_ROW(1) PV_ROW(2) PV_ROW(3)
#undef PV_ROW
    }
#define PV_STORE(r)                                                                                 \
    {                                                                                               \
        float *row = acc + (size_t)r * Dv + d;                                                      \
        const __m512 sc = _mm512_set1_ps(wscale[r]);                                                \
        _mm512_storeu_ps(row, _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(x##r##0), _mm512_loadu_ps(row))); \
        _mm512_storeu_ps(row + 16, _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(x##r##1), _mm512_loadu_ps(row + 16))); \
        _mm512_storeu_ps(row + 32, _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(x##r##2), _mm512_loadu_ps(row + 32))); \
        _mm512_storeu_ps(row + 48, _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(x##r##3), _mm512_loadu_ps(row + 48))); \
    }
    PV_STORE(0) PV_STORE(1) PV_STORE(2) PV_STORE(3)
#undef PV_STORE
}
#undef DP_INPLACE

/* pv4 for bf16 rows: the sixteen accumulators named and updated in place, as pv4_int8 does for int8.
 * Through pv4's array gcc 12 kept one of them on the stack in the per-row softmax's loop (MLA's 16
 * heads): a store and a reload around every pair's products, 15% of MLA's samples on that store. C
 * harness, alternated rounds, MLA bf16 B1 x 4096 in cache: one thread 0.779 -> 0.747 ms per layer, two
 * 0.396-0.440 -> 0.380-0.426; streamed (57 layers) 0.420 -> 0.415. GQA bf16 (softmax4's loop, where gcc
 * had kept them in registers) takes it too: routed there alone, the item function's code generation
 * moved and GQA in cache went 0.578 -> 0.596 ms, with both 0.573; streamed within noise (4.24-4.32
 * ms at B8 x 4096 over 18 rounds). fp8 rows gained nothing from it (GQA 0.551 -> 0.555, MLA -0.7%) and
 * keep pv4; dropping their branch from this function moved gcc's code generation of the other item
 * functions again, as fast or faster (alternated rounds: bf16 GQA in cache 0.576 -> 0.570, streamed
 * 4.26 -> 4.17; int8 0.489 and 2.51 -> 2.50; MLA 0.748 -> 0.747). */
#define DPBF_INPLACE(acc, a, b) __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))
static inline __attribute__((always_inline)) void pv4_16(float *acc, int Dv, int d, const uint32_t *w, int rs, int ks,
                                                         const uint8_t *const *vh, int npairs, const int VF,
                                                         pf_cursor *pf) {
    float *r0 = acc + d, *r1 = r0 + Dv, *r2 = r1 + Dv, *r3 = r2 + Dv;
    __m512 x00 = _mm512_loadu_ps(r0), x01 = _mm512_loadu_ps(r0 + 16), x02 = _mm512_loadu_ps(r0 + 32), x03 = _mm512_loadu_ps(r0 + 48);
    __m512 x10 = _mm512_loadu_ps(r1), x11 = _mm512_loadu_ps(r1 + 16), x12 = _mm512_loadu_ps(r1 + 32), x13 = _mm512_loadu_ps(r1 + 48);
    __m512 x20 = _mm512_loadu_ps(r2), x21 = _mm512_loadu_ps(r2 + 16), x22 = _mm512_loadu_ps(r2 + 32), x23 = _mm512_loadu_ps(r2 + 48);
    __m512 x30 = _mm512_loadu_ps(r3), x31 = _mm512_loadu_ps(r3 + 16), x32 = _mm512_loadu_ps(r3 + 32), x33 = _mm512_loadu_ps(r3 + 48);
    for (int k = 0; k < npairs; k++) {
        if (pf && (!pf_four(VF) || (k & 3) == 3 || k == npairs - 1))
            pf_step(pf, pf_four(VF) ? (k & 3) + 1 : 1, pf_four(VF));
        const uint8_t *va = vh[2 * k] + boff(VF, d), *vb = vh[2 * k + 1] + boff(VF, d);
        const __m512i A0 = ld32(va, VF), B0 = ld32(vb, VF), A1 = ld32(va + boff(VF, 32), VF), B1 = ld32(vb + boff(VF, 32), VF);
        const __m512i L0 = _mm512_unpacklo_epi16(A0, B0), H0 = _mm512_unpackhi_epi16(A0, B0);
        const __m512i L1 = _mm512_unpacklo_epi16(A1, B1), H1 = _mm512_unpackhi_epi16(A1, B1);
#define PV_ROW(r)                                                                                    \
        {                                                                                            \
            const __m512i wr = _mm512_set1_epi32((int)w[(size_t)(r) * rs + (size_t)k * ks]);         \
            DPBF_INPLACE(x##r##0, L0, wr); DPBF_INPLACE(x##r##1, H0, wr);                            \
            DPBF_INPLACE(x##r##2, L1, wr); DPBF_INPLACE(x##r##3, H1, wr);                            \
        }
        PV_ROW(0) PV_ROW(1) PV_ROW(2) PV_ROW(3)
#undef PV_ROW
    }
    _mm512_storeu_ps(r0, x00); _mm512_storeu_ps(r0 + 16, x01); _mm512_storeu_ps(r0 + 32, x02); _mm512_storeu_ps(r0 + 48, x03);
    _mm512_storeu_ps(r1, x10); _mm512_storeu_ps(r1 + 16, x11); _mm512_storeu_ps(r1 + 32, x12); _mm512_storeu_ps(r1 + 48, x13);
    _mm512_storeu_ps(r2, x20); _mm512_storeu_ps(r2 + 16, x21); _mm512_storeu_ps(r2 + 32, x22); _mm512_storeu_ps(r2 + 48, x23);
    _mm512_storeu_ps(r3, x30); _mm512_storeu_ps(r3 + 16, x31); _mm512_storeu_ps(r3 + 32, x32); _mm512_storeu_ps(r3 + 48, x33);
}
#undef DPBF_INPLACE

/* an accumulator row from the interleaved order of pv4 (per 32 dims: the unpacklo lanes, then the
 * unpackhi lanes; fp8 table rows: per 64 dims, see lut_dim) back to dims in order, times `mul` */
enum { ORDER_PAIRS = 0, ORDER_FP8_TABLE = 1, ORDER_NATURAL = 2, ORDER_F16 = 3 };  /* how pv4 / pv4f left the dims */

static inline void unpermute(float *dst, const float *acc, int Dv, float mul, int order) {
    if (order == ORDER_NATURAL) {            /* in order already (fp32 FMAs) */
        for (int d = 0; d < Dv; d++) dst[d] = mul * acc[d];
        return;
    }
    if (order == ORDER_F16) {                /* pv4_fp16: position 64 h + 32 g + 16 u + 8 L + k holds dim 64 h + 32 g + 16 L + 8 u + k */
        for (int d = 0; d < Dv; d += 32)
            for (int u = 0; u < 2; u++)
                for (int L = 0; L < 2; L++)
                    for (int k = 0; k < 8; k++) dst[d + 16 * L + 8 * u + k] = mul * acc[d + 16 * u + 8 * L + k];
        return;
    }
    if (order == ORDER_FP8_TABLE) {          /* ld64_fp8 order: position 16 c + 4 L + k holds dim 16 L + 4 c + k */
        for (int d = 0; d < Dv; d += 64)
            for (int c = 0; c < 4; c++)
                for (int L = 0; L < 4; L++)
                    for (int k = 0; k < 4; k++) dst[d + 16 * L + 4 * c + k] = mul * acc[d + 16 * c + 4 * L + k];
        return;
    }
    const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const __m512 vm = _mm512_set1_ps(mul);
    for (int c = 0; c < Dv; c += 32) {
        __m512 lo = _mm512_loadu_ps(acc + c), hi = _mm512_loadu_ps(acc + c + 16);
        _mm512_storeu_ps(dst + c, _mm512_mul_ps(vm, _mm512_permutex2var_ps(lo, i0, hi)));
        _mm512_storeu_ps(dst + c + 16, _mm512_mul_ps(vm, _mm512_permutex2var_ps(lo, i1, hi)));
    }
}

/* The softmax update of four rows straight from scores4's token-major scores: vector z holds keys
 * 4z .. 4z + 3 of the tile (in the order the tile visits them, see decode_item_impl), lane 4 t + r for
 * key 4z + t of row r0 + r. Every step (scales, masks, the
 * max, exp, sum, the weights' largest) serves the four rows at once, and a row's reductions over the
 * tile are vertical, across vectors, plus two lane swaps. The per-row loop it replaces (still used for
 * 16+ rows, fp32 FMAs and int4) took a quarter of int8's time in cache (C harness, switched off: 0.317
 * -> 0.236 ms per layer) on serial reductions, a scalar expf and branches. The weights come out
 * pair-major for pv4 (rs = 1, ks = 4): the 32-bit pair of keys 2k, 2k + 1 for row r at w4[4 k + r],
 * 16-bit position 8 k + 2 r + (key % 2) of each 8-key vector; pm_from_int16 / pm_from_bf16 give the
 * lane each position takes after the pack (int16) or the conversion (bf16). FTL: the format's tile
 * length. */
static uint16_t pm_from_int16[32], pm_from_bf16[32];

__attribute__((constructor)) static void pair_major_init(void) {
    for (int t = 0; t < 8; t++)
        for (int r = 0; r < 4; r++) {
            const int dst = 8 * (t / 2) + 2 * r + t % 2;
            pm_from_int16[dst] = (uint16_t)(t < 4 ? 8 * t + r : 8 * (t - 4) + 4 + r);  /* vpackssdw: per 128-bit lane */
            pm_from_bf16[dst] = (uint16_t)(t < 4 ? 4 * t + r : 16 + 4 * (t - 4) + r);  /* vcvtne2ps2bf16: halves */
        }
}

static inline __m512 swap_reduce_max(__m512 v) {  /* every 128-bit lane := the lane-wise max over the four */
    v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
    return _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
}

static inline __m512 swap_reduce_add(__m512 v) {
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
    return _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
}

/* the lane-wise max / sum of v[0 .. n), n = 4, 8 or 16 (a tile's vectors), as trees: short serial chains */
static inline __attribute__((always_inline)) __m512 tree_max(const __m512 *v, int n) {
    const __m512 x4 = _mm512_max_ps(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3]));
    if (n == 4) return x4;
    const __m512 x8 = _mm512_max_ps(x4, _mm512_max_ps(_mm512_max_ps(v[4], v[5]), _mm512_max_ps(v[6], v[7])));
    return n == 8 ? x8 : _mm512_max_ps(x8, tree_max(v + 8, 8));
}
static inline __attribute__((always_inline)) __m512 tree_add(const __m512 *v, int n) {
    const __m512 x4 = _mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3]));
    if (n == 4) return x4;
    const __m512 x8 = _mm512_add_ps(x4, _mm512_add_ps(_mm512_add_ps(v[4], v[5]), _mm512_add_ps(v[6], v[7])));
    return n == 8 ? x8 : _mm512_add_ps(x8, tree_add(v + 8, 8));
}

/* 2^t for the weights, t <= 0 (-inf in masked lanes gives NaN there: softmax4 zeroes them): a degree-4
 * polynomial on the fraction, relative error 2.7e-6 (fp32 evaluation), finer than the int16 weights'
 * step (3e-5 of the tile's largest) and bf16's (2^-9). Two FMAs and the clamp fewer than exp512 */
static inline __m512 exp2_weight(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(9.570071233264177e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5917774647425804e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402474474368573e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931218253861569e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999992617440314e-1f));
    return _mm512_scalef_ps(p, n);
}

enum { WF16 = 64 };  /* softmax4's weights as pv4_fp16 takes them (not a row format) */
static const uint16_t rep4_lo[32] __attribute__((aligned(64))) = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                                                  4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7};
static const uint16_t rep4_hi[32] __attribute__((aligned(64))) = {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11,
                                                                  12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15};

static inline __attribute__((always_inline)) void softmax4_body(const decode_args *a, const float *st, int n, int j0,
                                                                int r0, int R, int G, int h, int pos_first,
                                                                int causal_cut, int window_cut, const float *ktok,
                                                                const float *vtok, const float *qs, float *m, float *l,
                                                                float *acc, int Dv, uint32_t *w4, float *wscale,
                                                                const int VF, const int FTL) {
    enum { NZ = FT / 4 };
    const int nz = FTL / 4;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i tq = _mm512_srli_epi32(lane, 2), rq = _mm512_and_si512(lane, _mm512_set1_epi32(3));
    const __m512 qsv = _mm512_broadcast_f32x4(_mm_loadu_ps(qs + r0));
    const __mmask16 rows = _mm512_cmplt_epi32_mask(_mm512_add_epi32(rq, _mm512_set1_epi32(r0)), _mm512_set1_epi32(R));
    const __m512 ninf = _mm512_set1_ps(-INFINITY), zero = _mm512_setzero_ps();
    __m512 x[NZ], t[NZ];
    __mmask16 vis[NZ];
    if (!(a->softcap > 0.f) && !a->alibi && !causal_cut && !window_cut) {  /* decode's usual tile: no positions */
        for (int z = 0; z < nz; z++) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(st + 16 * z), qsv);
            if (ktok) v = _mm512_mul_ps(v, _mm512_permutexvar_ps(tq, _mm512_castps128_ps512(_mm_loadu_ps(ktok + 4 * z))));
            vis[z] = 4 * z + 4 <= n ? rows
                   : rows & _mm512_cmplt_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(4 * z), tq), _mm512_set1_epi32(n));
            x[z] = t[z] = _mm512_mask_blend_ps(vis[z], ninf, v);
        }
    } else {
        int32_t pr[4];
        float sl[4];
        for (int r = 0; r < 4; r++) {
            pr[r] = pos_first + (r0 + r) / G;
            sl[r] = a->alibi ? a->alibi[h * G + (r0 + r) % G] : 0.f;
        }
        const __m512i pv = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)pr));
        const __m512 slope = _mm512_broadcast_f32x4(_mm_loadu_ps(sl));
        for (int z = 0; z < nz; z++) {
            __m512 v = _mm512_loadu_ps(st + 16 * z);
            if (ktok) v = _mm512_mul_ps(v, _mm512_permutexvar_ps(tq, _mm512_castps128_ps512(_mm_loadu_ps(ktok + 4 * z))));
            v = _mm512_mul_ps(v, qsv);
            if (a->softcap > 0.f) v = softcap512(v, a->softcap);
            const __m512i jv = _mm512_add_epi32(_mm512_set1_epi32(j0 + 4 * z), tq);
            if (a->alibi) v = _mm512_fnmadd_ps(slope, _mm512_abs_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(pv, jv))), v);
            __mmask16 k = rows & _mm512_cmplt_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(4 * z), tq), _mm512_set1_epi32(n));
            if (causal_cut) k &= _mm512_cmple_epi32_mask(jv, pv);
            if (window_cut) k &= _mm512_cmpge_epi32_mask(jv, _mm512_sub_epi32(pv, _mm512_set1_epi32(a->window)));
            x[z] = t[z] = _mm512_mask_blend_ps(k, ninf, v);
            vis[z] = k;
        }
    }
    const __m512 mo = _mm512_broadcast_f32x4(_mm_loadu_ps(m + r0)), mn = _mm512_max_ps(mo, swap_reduce_max(tree_max(t, nz)));
    /* alpha = e^(m_old - m_new), 1 where the max held (both -inf included); exponents against 0 while
     * nothing is visible, so that masked lanes give e^-inf = 0, not NaN */
    const __m512 alpha = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mo, mn, _CMP_EQ_OQ), exp512(_mm512_sub_ps(mo, mn)),
                                              _mm512_set1_ps(1.f));
    const __m512 ms = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mn, ninf, _CMP_EQ_OQ), mn, zero);
    __m512 p[NZ];
    /* (x - m) log2 e, not x log2 e - m log2 e: the rounding of m log2 e (2^-24 of it) would shift every
     * exponent of the tile by as much, against alpha's: 4% at scores of 10^6, and inf or 0 for the max
     * itself past 2^31 */
    const __m512 l2e = _mm512_set1_ps(1.44269504088896341f);
    for (int z = 0; z < nz; z++)
        t[z] = p[z] = _mm512_maskz_mov_ps(vis[z], exp2_weight(_mm512_mul_ps(_mm512_sub_ps(x[z], ms), l2e)));
    const __m512 ln = _mm512_fmadd_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(l + r0)), alpha, swap_reduce_add(tree_add(t, nz)));
    _mm_storeu_ps(l + r0, _mm512_castps512_ps128(ln));
    _mm_storeu_ps(m + r0, _mm512_castps512_ps128(mn));
    if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_NEQ_UQ) & rows & 0xf) {
        float al[4];
        _mm_storeu_ps(al, _mm512_castps512_ps128(alpha));
        for (int r = 0; r < 4 && r0 + r < R; r++)
            if (al[r] != 1.f) scal(acc + (size_t)(r0 + r) * Dv, al[r], Dv);
    }
    if (is_int(VF)) {                        /* weight p * row scale, as int16 against the tile's largest */
        for (int z = 0; z < nz; z++)
            t[z] = p[z] = _mm512_mul_ps(p[z], _mm512_permutexvar_ps(tq, _mm512_castps128_ps512(_mm_loadu_ps(vtok + 4 * z))));
        const __m512 wm = swap_reduce_max(_mm512_max_ps(tree_max(t, nz), zero));
        const __m512 kq = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(wm, zero, _CMP_GT_OQ), _mm512_set1_ps(32767.f), wm);
        _mm_storeu_ps(wscale + r0, _mm512_castps512_ps128(_mm512_div_ps(wm, _mm512_set1_ps(32767.f))));
        const __m512i ix = _mm512_loadu_si512(pm_from_int16);
        for (int z = 0; z < nz; z += 2) {
            const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(p[z], kq));
            const __m512i i1 = z + 1 < nz ? _mm512_cvtps_epi32(_mm512_mul_ps(p[z + 1], kq)) : _mm512_setzero_si512();
            _mm512_storeu_si512(w4 + 8 * z, _mm512_permutexvar_epi16(ix, _mm512_packs_epi32(i0, i1)));
        }
    } else if (VF == WF16) {                 /* fp16 times 2^8, 4 copies: word 16 k + 4 r + j (pv4_fp16) */
        const __m512i i0 = _mm512_loadu_si512(rep4_lo), i1 = _mm512_loadu_si512(rep4_hi);
        _Float16 *wf = (_Float16 *)w4;
        for (int z = 0; z < nz; z++) {       /* keys 4 z .. 4 z + 3 */
            const __m512i h = _mm512_castsi256_si512(_mm256_castph_si256(
                _mm512_cvtxps_ph(_mm512_mul_ps(p[z], _mm512_set1_ps(0x1p8f)))));
            _mm512_storeu_si512(wf + 64 * z, _mm512_permutexvar_epi16(i0, h));
            _mm512_storeu_si512(wf + 64 * z + 32, _mm512_permutexvar_epi16(i1, h));
        }
    } else {
        const __m512i ix = _mm512_loadu_si512(pm_from_bf16);
        for (int z = 0; z < nz; z += 2) {
            const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(z + 1 < nz ? p[z + 1] : zero, p[z]);
            _mm512_storeu_si512(w4 + 8 * z, _mm512_permutexvar_epi16(ix, b));
        }
    }
}

/* softmax4 as one out-of-line function per kind of weight (int16 or bf16) and tile length, shared by the
 * row formats: inlined, it made int8's item function 24 KB instead of 14, and was no faster. */
#define SOFTMAX4_FN(name, VF, FTL)                                                                              \
    static __attribute__((noinline)) void name(const decode_args *a, const float *st, int n, int j0, int r0, int R, \
                                               int G, int h, int pos_first, int causal_cut, int window_cut,        \
                                               const float *ktok, const float *vtok, const float *qs, float *m,    \
                                               float *l, float *acc, int Dv, uint32_t *w4, float *wscale) {        \
        softmax4_body(a, st, n, j0, r0, R, G, h, pos_first, causal_cut, window_cut, ktok, vtok, qs, m, l, acc, Dv,  \
                      w4, wscale, VF, FTL);                                                                        \
    }
SOFTMAX4_FN(softmax4_int16_32, FMT_INT8, 32)
SOFTMAX4_FN(softmax4_int16_64, FMT_INT8, 64)
SOFTMAX4_FN(softmax4_bf16_32, FMT_BF16, 32)
SOFTMAX4_FN(softmax4_bf16_64, FMT_BF16, 64)
#if HAL_PVF16
SOFTMAX4_FN(softmax4_f16_64, WF16, 64)
#endif
#undef SOFTMAX4_FN

static inline __attribute__((always_inline)) void softmax4(const decode_args *a, const float *st, int n, int j0, int r0,
                                                           int R, int G, int h, int pos_first, int causal_cut,
                                                           int window_cut, const float *ktok, const float *vtok,
                                                           const float *qs, float *m, float *l, float *acc, int Dv,
                                                           uint32_t *w4, float *wscale, const int VF, const int FTL) {
    /* FTL: 32 or 64 (fp32 rows, 16 a tile, take the per-row softmax) */
    (
#if HAL_PVF16
        VF == WF16 ? softmax4_f16_64 :
#endif
        is_int(VF) ? (FTL == 32 ? softmax4_int16_32 : softmax4_int16_64) : (FTL == 32 ? softmax4_bf16_32 : softmax4_bf16_64))(
        a, st, n, j0, r0, R, G, h, pos_first, causal_cut, window_cut, ktok, vtok, qs, m, l, acc, Dv, w4, wscale);
}

/* Keys [split * SPLIT, (split + 1) * SPLIT) of sequence b for KV heads [h0, h1). With partial == NULL
 * the item covers the whole sequence and stores the output; otherwise it stores its unnormalized
 * accumulator, running max and denominator there ([NH][R][Dv + 2]) for merge_splits(). As its last tile
 * starts it claims this thread's next item through `next` and prefetches that item's first tile. */
static inline __attribute__((always_inline)) void decode_item_impl(const decode_args *a, int b, int h0, int h1, float *ws,
                                                                   int split, float *partial, item_claim *next,
                                                                   const int KF, const int VF, const int WIDE) {
    const int G = a->Hq / a->Hkv, q0 = a->cu_q[b], ql = a->cu_q[b + 1] - q0, S = a->seq_lens[b];
    const int R = ql * G, R4 = (R + 3) & ~3, D = a->D, Dv = a->Dv, NH = h1 - h0;
    const size_t per_head = ws_per_head(R4, D, Dv);
#define WS_Q(hh) ((uint16_t *)(ws + (hh) * per_head))
#define WS_ACC(hh) (ws + (hh) * per_head + (size_t)R4 * D)
#define WS_QS(hh) (WS_ACC(hh) + (size_t)R4 * Dv)
#define WS_M(hh) (WS_QS(hh) + R4)
#define WS_L(hh) (WS_M(hh) + R4)
#define WS_S(hh) (WS_L(hh) + R4)
#define WS_W(hh) ((uint32_t *)(WS_S(hh) + (size_t)R4 * FT))
    const int pos_first = S - ql;
    /* 16 or more bf16 rows (MLA's heads, wide GQA groups, multi-token decode): scores16t */
    const int use_t = (KF == FMT_BF16 || STAGED16(KF)) && !WIDE && R4 % 16 == 0;  /* STAGED16: the MLA build */
#if HAL_AMX
    const int AMX = KF == FMT_BF16 && VF == FMT_BF16 && use_t && amx_usable();  /* bf16 16-row groups on tiles */
#else
    enum { AMX = 0 };                         /* (a constant: the builds without tiles keep their code) */
#endif
    const int NG = is_grp(VF) ? Dv / 32 : 1, WR = (FT / 2) * NG;  /* weight sets per row (int4: per group) */
    const int quad = !WIDE && !use_t && !is_grp(VF);  /* softmax4 on scores4's output, not per row */
    const int vrow_dim = is_grp(VF) ? (int)(a->v_width * 16 / 9) : Dv;  /* int4 V rows: dim/2 + dim/16 bytes */
    uint16_t *tmp_q = use_t ? (uint16_t *)scratch(SCR_TMPQ, sizeof(uint16_t) * (size_t)R4 * D) : NULL;
    /* AMX (bf16 rows, 16-row groups: use_t): staging for keys that are not evenly spaced, and for value pairs */
#if HAL_AMX
    uint16_t *amx_k = AMX ? (uint16_t *)scratch(SCR_AMX_K, sizeof(uint16_t) * FT * (size_t)D) : NULL;
    uint32_t *amx_v = AMX ? (uint32_t *)scratch(SCR_AMX_V, sizeof(uint32_t) * 32 * 64) : NULL;
    if (AMX) amx_configure();
#endif
#if HAL_AMX8
    const int AMX8 = KF == FMT_INT8 && quad && D % 64 == 0 && amx_usable();  /* int8 4-row groups on AMX-INT8 tiles */
    uint8_t *amx8_q = AMX8 ? (uint8_t *)scratch(SCR_AMX8_Q, (size_t)NH * (R4 / 4) * (D / 64) * 1024) : NULL;
    uint8_t *amx8_k = AMX8 ? (uint8_t *)scratch(SCR_AMX8_K, (size_t)FT8 * D) : NULL;
    uint8_t *amx8_v = AMX8 ? (uint8_t *)scratch(SCR_AMX8_V, 8 * 256) : NULL;
    if (AMX8) amx_configure_int8();
#else
    enum { AMX8 = 0 };
#endif
#if HAL_AMXF
    const int AMXF = lut8(KF) && quad && amx_usable();  /* fp8 4-row groups on AMX-BF16 tiles */
    uint32_t *amxf_q = AMXF ? (uint32_t *)scratch(SCR_AMXF_Q, sizeof(uint32_t) * NH * (R4 / 4) * (size_t)D * 2) : NULL;
    uint16_t *amxf_k = AMXF ? (uint16_t *)scratch(SCR_AMXF_K, sizeof(uint16_t) * 32 * (size_t)D) : NULL;
    uint32_t *amxf_v = AMXF ? (uint32_t *)scratch(SCR_AMXF_V, sizeof(uint32_t) * 32 * 64) : NULL;
    if (AMXF) amx_configure_fp8();
    /* the keys by shifts where every query value of the item is below 2^64 (bf16 exponent <= 190), so
     * that the queries can take the 2^64 (fp8_shift_words), and the softmax scale times the head's K
     * scale below 2^70, so that it can take the 2^56; by the table otherwise (inf or NaN included) */
    int kshift = AMXF;
    for (int hh = 0; AMXF && hh < NH; hh++) {
        if (!(fabsf(a->scale * a->k_scale[h0 + hh]) < 0x1p70f)) kshift = 0;
        for (int r = 0; r < R; r++) {
            const uint16_t *qr = (const uint16_t *)a->q + ((size_t)(q0 + r / G) * a->Hq + (h0 + hh) * G + r % G) * D;
            __m512i mx = _mm512_setzero_si512();
            for (int d = 0; d < D; d += 32) mx = _mm512_max_epu16(mx, _mm512_and_si512(_mm512_loadu_si512(qr + d),
                                                                                     _mm512_set1_epi16(0x7fff)));
            if (_mm512_cmpgt_epu16_mask(mx, _mm512_set1_epi16(190 << 7 | 0x7f))) kshift = 0;
        }
    }
    const float shift_kmul = ldexpf(1.f, fp8_shift_bias(KF) - 64), shift_vmul = ldexpf(1.f, fp8_shift_bias(VF) - 64);
#else
    enum { AMXF = 0, kshift = 0 };
    const float shift_kmul = 1.f, shift_vmul = 1.f;  /* what the shifts' scores and sums lack */
#endif
    const int WRF = AMXF && PVF16(VF) ? 4 * (FT / 2) : WR;  /* pv4_fp16's weights: 4 fp16 per key and row */
    for (int hh = 0; hh < NH; hh++) {
        const int h = h0 + hh;
        uint16_t *qb = WS_Q(hh);
        float *qs = WS_QS(hh), *m = WS_M(hh), *l = WS_L(hh);
        memset(qb, 0, sizeof(float) * (size_t)R4 * D);
        for (int r = 0; r < R4; r++) qs[r] = 0.f;
        for (int r = 0; r < R; r++) {
            const int t = r / G, hq = h * G + r % G;
            const size_t qsz = a->dtype == FMT_F32 ? 4 : 2;
            const uint8_t *qrow = (const uint8_t *)a->q + ((size_t)(q0 + t) * a->Hq + hq) * D * qsz;
            const uint16_t *src = (const uint16_t *)qrow;  /* bf16 models */
            const float ks = is_int(KF) ? 1.f : row_scale(NULL, 0, KF, a->k_scale, h, WIDE);
            if (WIDE) {                          /* fp32 query */
                load_row((float *)qb + (size_t)r * D, qrow, a->dtype, D);
                qs[r] = a->scale * ks;
            } else if (lut8(KF)) {               /* bf16 query, dims in ld64_fp8's order (the shifts': times 2^64) */
                uint16_t ix[64];
                for (int j = 0; j < 64; j++) ix[j] = (uint16_t)(kshift ? shift_dim(j) : lut_dim(j));
                const __m512i i0 = _mm512_loadu_si512(ix), i1 = _mm512_loadu_si512(ix + 32);
                for (int d = 0; d < D; d += 64) {
                    const __m512i lo = _mm512_loadu_si512(src + d), hi = _mm512_loadu_si512(src + d + 32);
                    __m512i z0 = _mm512_permutex2var_epi16(lo, i0, hi), z1 = _mm512_permutex2var_epi16(lo, i1, hi);
                    if (kshift) {
                        z0 = bf16_times_2_64(z0);
                        z1 = bf16_times_2_64(z1);
                    }
                    _mm512_storeu_si512(qb + (size_t)r * D + d, z0);
                    _mm512_storeu_si512(qb + (size_t)r * D + d + 32, z1);
                }
                qs[r] = a->scale * ks * (kshift ? shift_kmul : 1.f);
            } else if (!is_int(KF)) {            /* bf16 query as given */
                memcpy(qb + (size_t)r * D, src, 2 * (size_t)D);
                qs[r] = a->scale * ks;
            } else {                             /* int16 query: q = Q * round(q / Q), Q = max |q| / 32767 */
                float qf[MAX_DIM];
                load_row(qf, qrow, a->dtype, D);
                __m512 vm = _mm512_setzero_ps();
                for (int d = 0; d < D; d += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_loadu_ps(qf + d)));
                const float mx = _mm512_reduce_max_ps(vm);
                const __m512 inv = _mm512_set1_ps(mx > 0.f ? 32767.f / mx : 0.f);
                for (int d = 0; d < D; d += 16)  /* round to nearest even, as lrintf */
                    _mm256_storeu_si256((__m256i *)(qb + (size_t)r * D + d),
                                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(qf + d), inv))));
                qs[r] = a->scale * (mx / 32767.f);
            }
        }
        if (use_t) {                             /* groups of 16 rows: [pair][row] as 32-bit bf16 pairs */
            uint32_t *qt = (uint32_t *)tmp_q;
            memcpy(qt, qb, sizeof(uint16_t) * (size_t)R4 * D);
            const uint32_t *rows = qt;
            uint32_t *dst = (uint32_t *)qb;
            for (int g = 0; g < R4 / 16; g++)
                for (int pi = 0; pi < D / 2; pi++)
                    for (int r = 0; r < 16; r++)
                        dst[((size_t)g * (D / 2) + pi) * 16 + r] = rows[(size_t)(16 * g + r) * (D / 2) + pi];
        }
        for (int r = 0; r < R4; r++) {
            const int hq = h * G + (r % G);
            m[r] = (r < R && a->sinks && split == 0) ? a->sinks[hq] : -INFINITY;  /* the sink counts once */
            l[r] = (r < R && a->sinks && split == 0) ? 1.f : 0.f;
        }
        memset(WS_ACC(hh), 0, sizeof(float) * (size_t)R4 * Dv);
        memset(WS_W(hh), 0, sizeof(uint32_t) * (size_t)R4 * (FT / 2) * NG);
        memset(WS_S(hh), 0, sizeof(float) * (size_t)R4 * FT);
#if HAL_AMX8
        for (int g = 0; AMX8 && g < R4 / 4; g++)
            amx_q_planes(qb + (size_t)4 * g * D, D, amx8_q + ((size_t)hh * (R4 / 4) + g) * (D / 64) * 1024);
#endif
#if HAL_AMXF
        for (int g = 0; AMXF && g < R4 / 4; g++)
            amx_q_pairs(qb + (size_t)4 * g * D, D, amxf_q + ((size_t)hh * (R4 / 4) + g) * 2 * (size_t)D);
#endif
    }
    int lo, hi;
    item_keys(a, b, split, &lo, &hi);
    const int32_t *table = a->block_table + (int64_t)b * a->bt_stride;
    const int64_t kb = (int64_t)a->bs * a->Hkv * a->k_width, vb = (int64_t)a->bs * a->Hkv * a->v_width;
    const int64_t kt = (int64_t)a->Hkv * a->k_width, vt = (int64_t)a->Hkv * a->v_width;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const uint8_t *krow[FT], *vrow[FT], *kh[FT], *vh[FT + 1];
    float st[4 * FT] __attribute__((aligned(64)));  /* a tile's scores of four rows, token-major */
    float st16[16 * FT] __attribute__((aligned(64)));  /* ... of sixteen rows (scores16t) */
    const int ft = AMXF ? FTF : tile_len(KF), NU = ft / 16;
    uint16_t kt16[2][FT], vt16[2][FT];       /* softmax4: fp16 row scales of heads hh and hh - 1 (finite past n) */
    memset(kt16, 0, sizeof kt16);
    memset(vt16, 0, sizeof vt16);
    pf_cursor cur;
    cur.klen = (int64_t)NH * a->k_width;
    cur.vlen = (int64_t)NH * a->v_width;
    if (lo < hi) {                            /* the first tile: all at once (the previous item's last */
        pf_fill(&cur, a, b, h0, lo, lo + ft < hi ? lo + ft : hi);  /* tile prefetched it when it knew) */
        pf_lines(&cur, 1 << 30);
    }
    for (int j0 = lo; j0 < hi; j0 += ft) {
        const int n = hi - j0 < ft ? hi - j0 : ft, npairs = (n + 1) / 2;
        if (a->rows_read) __atomic_fetch_add(a->rows_read, (int64_t)n * NH, __ATOMIC_RELAXED);
        /* masks only where they cut this tile: decode's keys all precede its first query */
        const int causal_cut = a->causal && j0 + n - 1 > pos_first;
        const int window_cut = a->window >= 0 && j0 < pos_first + ql - 1 - a->window;
        /* Keys take the tile's two halves in turn where no mask needs their positions: pair k is tokens
         * (k, half + k), swapped for odd k, so 0, h, h+1, 1, 2, h+2, ... Token after token, a head's rows
         * lie a constant stride apart (bf16 2 KiB, fp8 1 KiB), which trains the core's stride prefetcher,
         * and at a block's end it runs on into memory that belongs to other pages and is never read. The
         * swap keeps P.V's two loads per pair (keys 2k and 2k + 1) alternating too. C harness, B8x4096,
         * pages permuted: halves in turn, 3 rounds, bf16 4.87-4.90 -> 4.37 ms per layer, fp8 3.21-3.63 ->
         * 2.96-3.12; then the swap, 6 rounds, bf16 3.81 -> 3.33 (a fast-memory minute), fp8 3.24 -> 3.15.
         * int8 unchanged (its 130-byte rows are no whole number of lines apart). */
        const int alt = !causal_cut && !window_cut && !a->alibi && !AMX && !AMX8, half = (n + 1) / 2;  /* AMX: in order */
        for (int i = 0; i < n; i++) {
            const int k = i / 2, swap = (k & 1) && 2 * k + 1 < n;  /* (an odd n's last key stays token k) */
            const int j = j0 + (alt ? ((i % 2) ^ swap ? half + k : k) : i);
            const int64_t blk = table[j / a->bs], off = j % a->bs;
            krow[i] = a->k + blk * kb + off * kt;
            vrow[i] = a->v + blk * vb + off * vt;
        }
        const item_ref *nx;
        if (j0 + ft < hi) {                   /* the next tile, a few lines per key and head */
            pf_fill(&cur, a, b, h0, j0 + ft, j0 + 2 * ft < hi ? j0 + 2 * ft : hi);
        } else if ((nx = claim_next(a, next)) && nx->h1 - nx->h0 == NH) {  /* or this thread's next item's first */
            int nlo, nhi;
            item_keys(a, nx->b, nx->split, &nlo, &nhi);
            pf_fill(&cur, a, nx->b, nx->h0, nlo, nlo + ft < nhi ? nlo + ft : nhi);
        } else {
            cur.n = cur.nk = 0;
            cur.lines = 0;
        }
        /* spread over both products of every head: per key of the scores, per token pair of P.V (pv4) */
        const int pv_steps = WIDE ? 0 : npairs * ((Dv + 63) / 64);
        const int64_t pf_total = cur.lines;
        /* done as the tile ends (int8 5% faster than done at 90%, bf16 and MLA 3-4%: no burst at its end) */
        cur.rate = (int)((pf_total * 16) / ((int64_t)NH * (n + pv_steps)) + 1);
        cur.credit = 0;
        __mmask16 valid[NUMAX];
        for (int u = 0; u < NU; u++) {
            const int nu = n - 16 * u;
            valid[u] = (__mmask16)(nu >= 16 ? 0xffffu : nu > 0 ? (1u << nu) - 1u : 0u);
        }
        /* four-row groups (softmax4), staggered over the heads: head hh's scores, head hh - 1's softmax,
         * head hh - 2's P.V, so that the softmax's serial chain (~200 cycles) overlaps a P.V that does not
         * wait for it. The scores wait token-major in the s block of workspace head hh % 2 (unused by
         * softmax4 otherwise; head 1's exists whenever hh = 1 < NH), the weights in head hh's w block. C
         * harness, B8x4096, 6 alternated rounds, against the per-row softmax: int8 3.00 -> 2.79 ms per
         * layer, fp8 3.32 -> 3.25, bf16 within noise. Head hh - 1's softmax placed before head hh's scores
         * instead was as fast in cache and slower streamed: int8 2.89, fp8 3.39. P.V one head behind the
         * softmax (as it was until 2026-11-29) instead of two: int8 in cache, one thread, 0.58 against
         * 0.56 ms per layer. */
        float wsc[2][R4];                        /* the weights' scales of heads hh - 1 and hh - 2 */
        for (int hh = 0; quad && hh <= NH + 1; hh++) {
            if (hh < NH) {
                const int h = h0 + hh;
                const uint16_t *qb = WS_Q(hh);
                for (int i = 0; i < n; i++) kh[i] = krow[i] + (int64_t)h * a->k_width;
                /* head hh's rows' fp16 scales, copied with its first rows' scores, converted one head on.
                 * Two calls, not one with the struct built for every format: that made fp8's item
                 * function 5% slower in cache through code generation alone */
                if (row_scaled(KF)) {
                    const scale_copy sc = {vrow, a->k_width - 2, (int64_t)h * a->v_width + a->v_width - 2, kt16[hh & 1],
                                           vt16[hh & 1]};
#if HAL_AMX8
                    for (int r = 0; AMX8 && r < R4; r += 4)
                        amx_scores_int8(amx8_q + ((size_t)hh * (R4 / 4) + r / 4) * (D / 64) * 1024, D, kh, n,
                                        WS_S(hh & 1) + (size_t)r * FT, amx8_k, r == 0 ? &cur : NULL, r == 0 ? &sc : NULL);
#endif
                    for (int r = 0; !AMX8 && r < R4; r += 4)
                        scores4_all(qb + (size_t)r * D, D, kh, n, KF, WS_S(hh & 1) + (size_t)r * FT, r == 0 ? &cur : NULL,
                                    r == 0 ? &sc : NULL);
                } else {
#if HAL_AMXF
                    for (int r = 0; AMXF && r < R4; r += 4)
                        for (int k0 = 0; k0 < n; k0 += 32)  /* the tile's halves */
                            amx_scores_fp8(amxf_q + ((size_t)hh * (R4 / 4) + r / 4) * 2 * (size_t)D, D, kh + k0,
                                           n - k0 < 32 ? n - k0 : 32, KF, kshift, WS_S(hh & 1) + (size_t)r * FT + 4 * k0,
                                           amxf_k, r == 0 ? &cur : NULL);
#endif
                    for (int r = 0; !AMXF && r < R4; r += 4)
                        scores4_all(qb + (size_t)r * D, D, kh, n, KF, WS_S(hh & 1) + (size_t)r * FT, r == 0 ? &cur : NULL,
                                    NULL);
                }
            }
            if (hh > 0 && hh <= NH) {
                const int hp = hh - 1, h = h0 + hp;
                float ktok[FT] __attribute__((aligned(64))), vtok[FT] __attribute__((aligned(64)));
                if (row_scaled(KF)) {
                    row_scales_convert(kt16[hp & 1], NU, ktok);
                    row_scales_convert(vt16[hp & 1], NU, vtok);
                }
                for (int r = 0; r < R4; r += 4)
                    softmax4(a, WS_S(hp & 1) + (size_t)r * FT, n, j0, r, R, G, h, pos_first, causal_cut, window_cut,
                             row_scaled(KF) ? ktok : NULL, vtok, WS_QS(hp), WS_M(hp), WS_L(hp), WS_ACC(hp), Dv,
                             WS_W(hp) + (size_t)r * WRF, wsc[hp & 1], AMXF && PVF16(VF) ? WF16 : VF, ft);
            }
            if (hh > 1) {
                const int hv = hh - 2, h = h0 + hv;
                for (int i = 0; i < n; i++) vh[i] = vrow[i] + (int64_t)h * a->v_width;
                vh[n] = zero_row;
#if HAL_AMX8
                for (int r = 0; AMX8 && r < R4; r += 4)
                    amx_pv_int8(WS_ACC(hv) + (size_t)r * Dv, Dv, WS_W(hv) + (size_t)r * WR, wsc[hv & 1] + r, vh, n, npairs,
                                amx8_v, r == 0 ? &cur : NULL);
#endif
#if HAL_AMXF
                for (int r = 0; AMXF && r < R4; r += 4)
#if HAL_PVF16
                    if (PVF16(VF))
                        pv4_fp16(WS_ACC(hv) + (size_t)r * Dv, Dv, (const _Float16 *)(WS_W(hv) + (size_t)r * WRF), vh, n,
                                 r == 0 ? &cur : NULL);
                    else
#endif
                        amx_pv_fp8(WS_ACC(hv) + (size_t)r * Dv, Dv, WS_W(hv) + (size_t)r * WR, vh, n, npairs, VF, amxf_v,
                                   r == 0 ? &cur : NULL);
#endif
                for (int r = 0; !AMX8 && !AMXF && r < R4; r += 4)
                    for (int d = 0; d < Dv; d += 64) {
                        pf_cursor *p = r == 0 ? &cur : NULL;
                        if (VF == FMT_INT8 || VF == FMT_INT6)
                            pv4_int8(WS_ACC(hv) + (size_t)r * Dv, Dv, d, WS_W(hv) + (size_t)r * WR, 1, 4, wsc[hv & 1] + r,
                                     vh, npairs, VF, p);
                        else if (VF == FMT_BF16)
                            pv4_16(WS_ACC(hv) + (size_t)r * Dv, Dv, d, WS_W(hv) + (size_t)r * WR, 1, 4, vh, npairs, VF, p);
                        else
                            pv4(WS_ACC(hv) + (size_t)r * Dv, Dv, d, WS_W(hv) + (size_t)r * WR, 1, 4, wsc[hv & 1] + r, 1, vh,
                                npairs, VF, p);
                    }
            }
        }
        for (int hh = 0; !quad && hh < NH; hh++) {
            const int h = h0 + hh;
            uint16_t *qb = WS_Q(hh);
            float *acc = WS_ACC(hh), *qs = WS_QS(hh), *m = WS_M(hh), *l = WS_L(hh), *s = WS_S(hh);
            uint32_t *w = WS_W(hh);
            for (int i = 0; i < n; i++) {
                kh[i] = krow[i] + (int64_t)h * a->k_width;
                vh[i] = vrow[i] + (int64_t)h * a->v_width;
            }
            vh[n] = zero_row;
            /* scores: four rows at a time, up to 128 dims of their queries in registers */
            for (int g = 0; use_t && g < R4 / 16; g++) {
#if HAL_AMX
                if (AMX)
                    amx_scores((const uint32_t *)qb + (size_t)g * (D / 2) * 16, D, kh, n, st16, amx_k, g == 0 ? &cur : NULL);
                else
#endif
#ifdef HAL_STAGED16
                if (KF != FMT_BF16)
                    scores16t_quant((const uint32_t *)qb + (size_t)g * (D / 2) * 16, D, kh, n, st16, g == 0 ? &cur : NULL, KF);
                else
#endif
                scores16t((const uint32_t *)qb + (size_t)g * (D / 2) * 16, D, kh, n, st16, g == 0 ? &cur : NULL);
                for (int i0 = 0; i0 < n; i0 += 16)  /* keys past n: garbage the softmax masks off */
                    transpose16(st16 + 16 * i0, s + (size_t)(16 * g) * FT + i0, FT);
            }
            for (int r = 0; WIDE && r < R4; r += 4) {
                scores4f((const float *)qb + (size_t)r * D, D, kh, n, KF, st, r == 0 ? &cur : NULL);
                rows4(s + (size_t)r * FT, st, n);
            }
            for (int r = 0; !use_t && !WIDE && r < R4; r += 4) {
                scores4_all(qb + (size_t)r * D, D, kh, n, KF, st, r == 0 ? &cur : NULL, NULL);
                rows4(s + (size_t)r * FT, st, n);
            }
            /* softmax update per row over the tile (two halves of 16); the weights as bf16 (int8 rows:
             * int16) pairs */
            __m512 kmul[NUMAX], vmul[NUMAX];
            for (int u = 0; u < NU; u++) kmul[u] = vmul[u] = _mm512_set1_ps(1.f);
            if (row_scaled(KF)) {                /* the rows' fp16 scales */
                float ks[FT], vs[FT];
                row_scales(kh, a->k_width - 2, n, NU, ks);
                row_scales(vh, a->v_width - 2, n, NU, vs);
                for (int u = 0; u < NU; u++) {
                    kmul[u] = _mm512_loadu_ps(ks + 16 * u);
                    vmul[u] = _mm512_loadu_ps(vs + 16 * u);
                }
            }
            float wscale[R4 * NG];
            uint16_t tg[MAX_DIM / 32][FT];       /* int4 V: each token's group scales, per group */
            if (is_grp(VF))
                for (int i = 0; i < n; i++)
                    for (int g = 0; g < NG; g++) memcpy(&tg[g][i], vh[i] + boff(VF, vrow_dim) + 2 * g, 2);
            for (int r = 0; r < R; r++) {
                const int p_r = pos_first + r / G, hq = h * G + r % G;
                float *sr = s + (size_t)r * FT;
                __m512 x[NUMAX];
                __mmask16 vis[NUMAX];
                for (int u = 0; u < NU; u++) {
                    const __m512i jv = _mm512_add_epi32(_mm512_set1_epi32(j0 + 16 * u), lane);
                    x[u] = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(valid[u], sr + 16 * u), kmul[u]), _mm512_set1_ps(qs[r]));
                    if (a->softcap > 0.f) x[u] = softcap512(x[u], a->softcap);
                    if (a->alibi) {
                        __m512 dist = _mm512_abs_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(p_r), jv)));
                        x[u] = _mm512_fnmadd_ps(_mm512_set1_ps(a->alibi[hq]), dist, x[u]);
                    }
                    vis[u] = valid[u];
                    if (causal_cut) vis[u] &= _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(p_r));
                    if (window_cut) vis[u] &= _mm512_cmpge_epi32_mask(jv, _mm512_set1_epi32(p_r - a->window));
                    x[u] = _mm512_mask_blend_ps(vis[u], _mm512_set1_ps(-INFINITY), x[u]);
                }
                __m512 xm = x[0];
                for (int u = 1; u < NU; u++) xm = _mm512_max_ps(xm, x[u]);
                const float mt = _mm512_reduce_max_ps(xm), m_new = mt > m[r] ? mt : m[r];
                uint32_t *wr = w + (size_t)r * WR;
                for (int g = 0; g < NG; g++) wscale[r * NG + g] = 0.f;
                if (m_new == -INFINITY) {        /* nothing visible yet: weights 0 */
                    memset(wr, 0, sizeof(uint32_t) * WR);
                    if (WIDE) memset(sr, 0, sizeof(float) * FT);
                    continue;
                }
                const __m512 mn = _mm512_set1_ps(m_new);
                __m512 pu[NUMAX], psum = _mm512_setzero_ps();
                for (int u = 0; u < NU; u++) {
                    pu[u] = _mm512_maskz_mov_ps(vis[u], exp512(_mm512_sub_ps(x[u], mn)));
                    psum = _mm512_add_ps(psum, pu[u]);
                }
                const float alpha = m_new == m[r] ? 1.f : expf(m[r] - m_new);
                l[r] = l[r] * alpha + _mm512_reduce_add_ps(psum);
                m[r] = m_new;
                if (alpha != 1.f) scal(acc + (size_t)r * Dv, alpha, Dv);
                if (WIDE) {                      /* fp32 weights, in place of the scores */
                    for (int u = 0; u < NU; u++) _mm512_storeu_ps(sr + 16 * u, pu[u]);
                } else if (is_grp(VF)) {         /* int4: per group, weight p * group scale, as int16 */
                    for (int g = 0; g < NG; g++) {
                        __m512 wu[NUMAX], wm = _mm512_setzero_ps();
                        for (int u = 0; u < NU; u++) {
                            const __m512 gs = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tg[g] + 16 * u)));
                            wu[u] = _mm512_maskz_mov_ps(vis[u], _mm512_mul_ps(pu[u], gs));
                            wm = _mm512_max_ps(wm, wu[u]);
                        }
                        const float wmax = _mm512_reduce_max_ps(wm);
                        const __m512 k = _mm512_set1_ps(wmax > 0.f ? 32767.f / wmax : 0.f);
                        for (int u = 0; u < NU; u++)
                            _mm256_storeu_si256((__m256i *)(wr + g * (FT / 2) + 8 * u),
                                                _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(wu[u], k))));
                        wscale[r * NG + g] = wmax / 32767.f;
                    }
                } else if (is_int(VF)) {         /* weight p * row scale, as int16 against the tile's largest */
                    __m512 wu[NUMAX], wm = _mm512_setzero_ps();
                    for (int u = 0; u < NU; u++) { wu[u] = _mm512_mul_ps(pu[u], vmul[u]); wm = _mm512_max_ps(wm, wu[u]); }
                    const float wmax = _mm512_reduce_max_ps(wm);
                    const __m512 k = _mm512_set1_ps(wmax > 0.f ? 32767.f / wmax : 0.f);
                    for (int u = 0; u < NU; u++)
                        _mm256_storeu_si256((__m256i *)(wr + 8 * u), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(wu[u], k))));
                    wscale[r * NG] = wmax / 32767.f;
                } else {
                    for (int u = 0; u < NU; u += 2)
                        _mm512_storeu_si512(wr + 8 * u, (__m512i)_mm512_cvtne2ps_pbh(pu[u + 1], pu[u]));
                }
            }
            for (int r = R; WIDE && r < R4; r++) memset(s + (size_t)r * FT, 0, sizeof(float) * FT);
            for (int r = 0; WIDE && r < R4; r += 4)
                for (int d = 0; d < Dv; d += 64)
                    pv4f(acc + (size_t)r * Dv, Dv, d, s + (size_t)r * FT, vh, n, VF);
#if HAL_AMX
            for (int g = 0; AMX && g < R4 / 16; g++)
                amx_pv(acc + (size_t)16 * g * Dv, Dv, w + (size_t)16 * g * WR, WR, vh, n, amx_v, g == 0 ? &cur : NULL);
#endif
            for (int r = 0; !WIDE && !AMX && r < R4; r += 4)
                for (int d = 0; d < Dv; d += 64) {
                    if (VF == FMT_BF16)
                        pv4_16(acc + (size_t)r * Dv, Dv, d, w + (size_t)r * WR, WR, 1, vh, npairs, VF, r == 0 ? &cur : NULL);
                    else if (VF == FMT_INT8)
                        pv4_int8(acc + (size_t)r * Dv, Dv, d, w + (size_t)r * WR, WR, 1, wscale + r * NG, vh, npairs, VF,
                                 r == 0 ? &cur : NULL);
                    else
                        pv4(acc + (size_t)r * Dv, Dv, d, w + (size_t)r * WR, WR, 1, wscale + r * NG, NG, vh, npairs, VF,
                            r == 0 ? &cur : NULL);
                }
        }
    }
    for (int hh = 0; hh < NH; hh++) {
        const int h = h0 + hh;
        float *acc = WS_ACC(hh);
        const float *m = WS_M(hh), *l = WS_L(hh);
        const float vs = is_int(VF) ? 1.f : row_scale(NULL, 0, VF, a->v_scale, h, WIDE);
        for (int r = 0; AMXF && r < R; r++) scal(acc + (size_t)r * Dv, shift_vmul, Dv);  /* apart from vs: any scale */
        const int order = WIDE ? ORDER_NATURAL : AMXF && PVF16(VF) ? ORDER_F16 : lut8(VF) || AMX8 ? ORDER_FP8_TABLE : ORDER_PAIRS;
        float o[MAX_DIM];
        for (int r = 0; r < R; r++) {
            if (partial) {
                float *dst = partial + ((size_t)hh * R + r) * (Dv + 2);
                unpermute(dst, acc + (size_t)r * Dv, Dv, vs, order);
                dst[Dv] = m[r];
                dst[Dv + 1] = l[r];
                continue;
            }
            const int t = r / G, hq = h * G + r % G;
            unpermute(o, acc + (size_t)r * Dv, Dv, l[r] > 0.f ? vs / l[r] : 0.f, order);
            store_row((uint8_t *)a->out + ((size_t)(q0 + t) * a->Hq + hq) * Dv * (a->dtype == FMT_F32 ? 4 : 2), o, a->dtype, Dv);
            if (a->lse) a->lse[(size_t)(q0 + t) * a->Hq + hq] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
        }
    }
#undef WS_Q
#undef WS_ACC
#undef WS_QS
#undef WS_M
#undef WS_L
#undef WS_S
#undef WS_W
#if HAL_AMX
    if (AMX) _tile_release();
#endif
#if HAL_AMXF
    if (AMXF) _tile_release();
#endif
#if HAL_AMX8
    if (AMX8) _tile_release();
#endif
}

/* One function per row format, not one function with every format inlined: grown by softmax4's paths,
 * the shared function slowed the formats it did not touch (int4, C harness B8x4096: 4.52 -> 4.72 ms
 * per layer; split: 4.58). */
#define ITEM_FN(name, KF, VF, W)                                                                             \
    static __attribute__((noinline)) void name(const decode_args *a, int b, int h0, int h1, float *ws, int split, \
                                               float *partial, item_claim *next) {                                 \
        decode_item_impl(a, b, h0, h1, ws, split, partial, next, KF, VF, W);                                      \
    }
ITEM_FN(item_int8, FMT_INT8, FMT_INT8, 0)
#if INT6_OK
ITEM_FN(item_int6, FMT_INT6, FMT_INT6, 0)
ITEM_FN(item_int4, FMT_INT4, FMT_INT4, 0)
#endif
ITEM_FN(item_e4m3, FMT_E4M3, FMT_E4M3, 0)
ITEM_FN(item_e4m3_wide, FMT_E4M3, FMT_E4M3, 1)
ITEM_FN(item_e5m2, FMT_E5M2, FMT_E5M2, 0)
ITEM_FN(item_e5m2_wide, FMT_E5M2, FMT_E5M2, 1)
ITEM_FN(item_f16, FMT_F16, FMT_F16, 1)
ITEM_FN(item_f32, FMT_F32, FMT_F32, 1)
ITEM_FN(item_bf16, FMT_BF16, FMT_BF16, 0)
#undef ITEM_FN

static void decode_item_fast(const decode_args *a, int b, int h0, int h1, float *ws, int split, float *partial,
                             item_claim *next) {
    const int wide = is_wide(a->dtype);      /* fp16/fp32 model: fp32 FMAs for float rows (fp8 widened to fp32) */
    switch (a->kfmt) {                       /* one specialised copy per row format (K and V share it) */
    case FMT_INT8: item_int8(a, b, h0, h1, ws, split, partial, next); break;
#if INT6_OK
    case FMT_INT6: item_int6(a, b, h0, h1, ws, split, partial, next); break;
    case FMT_INT4: item_int4(a, b, h0, h1, ws, split, partial, next); break;
#endif
    case FMT_E4M3: (wide ? item_e4m3_wide : item_e4m3)(a, b, h0, h1, ws, split, partial, next); break;
    case FMT_E5M2: (wide ? item_e5m2_wide : item_e5m2)(a, b, h0, h1, ws, split, partial, next); break;
    case FMT_F16: item_f16(a, b, h0, h1, ws, split, partial, next); break;
    case FMT_F32: item_f32(a, b, h0, h1, ws, split, partial, next); break;
    default: item_bf16(a, b, h0, h1, ws, split, partial, next); break;
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
            store_row((uint8_t *)a->out + ((size_t)(q0 + t) * a->Hq + hq) * Dv * (a->dtype == FMT_F32 ? 4 : 2), o, a->dtype, Dv);
            if (a->lse) a->lse[(size_t)(q0 + t) * a->Hq + hq] = L > 0.f ? M + logf(L) : -INFINITY;
        }
}

#endif

/* Whether hal_paged_decode handles these formats and head dims here: auto rows always; quantized rows
 * only on the AVX-512 BF16 path (bf16 model, D % 32 == 0 (fp8 with VBMI: % 64), Dv % 64 == 0). */
int hal_decode_supports(int dtype, int kfmt, int vfmt, int D, int Dv) {
    if (kfmt <= FMT_BF16 && vfmt <= FMT_BF16) return 1;
#if HAL_FAST
    static const float one = 1.f;            /* the rules are fast_path_applies', on rows of these dims */
    decode_args a;
    memset(&a, 0, sizeof(a));
    a.dtype = dtype; a.kfmt = kfmt; a.vfmt = vfmt; a.D = D; a.Dv = Dv;
    a.k_width = row_bytes(kfmt, D); a.v_width = row_bytes(vfmt, Dv);
    a.k_scale = a.v_scale = &one;
    return fast_path_applies(&a);
#else
    (void)dtype; (void)D; (void)Dv;
    return 0;
#endif
}

/* AMX_NONE (no tiles in this build), AMX_NATIVE, AMX_EMULATED (HAL_AMX_EMULATE) or AMX_REFUSED (the CPU
 * has them, Linux did not grant them): whether bf16 16-row groups and int8 and fp8 4-row groups run on
 * tiles */
int hal_amx_state(void) {
#if HAL_FAST
    return amx_grant();
#else
    return AMX_NONE;                          /* the tile code is part of the AVX-512 BF16 path */
#endif
}

static int paged_decode_joined(const decode_args *a, int num_threads);

/* Computes the active sequences; returns 0, or 1 (and computes nothing) when an active sequence has more
 * than MAX_ROWS rows or a head dim exceeds MAX_DIM (the caller must not mark such sequences active), or
 * when q2 and d2 disagree (one given without the other). */
int hal_paged_decode(const decode_args *a, int num_threads) {
    if (!a->q2) return a->d2 ? 1 : paged_decode_joined(a, num_threads);
    /* the query rows joined: [T, Hq, D - d2] and [T, Hq, d2] -> [T, Hq, D] (MLA: q_latent, q_rope). A
     * copy of T x Hq x D values here instead of torch.cat in the caller: hal.mla_attention at 1 x 64
     * tokens (DeepSeek-V2-Lite, in cache), 4 alternated rounds: 51-57 -> 39-53 us a call */
    const size_t qsz = a->dtype == FMT_F32 ? 4 : 2, d1 = (size_t)(a->D - a->d2), d2 = (size_t)a->d2;
    if (a->d2 <= 0 || a->d2 >= a->D) return 1;
    const size_t rows = (size_t)a->cu_q[a->B] * (size_t)a->Hq;
    uint8_t *q = (uint8_t *)malloc(rows * (size_t)a->D * qsz + 1);
    if (!q) return 1;
    for (size_t r = 0; r < rows; r++) {
        memcpy(q + r * (size_t)a->D * qsz, (const uint8_t *)a->q + r * d1 * qsz, d1 * qsz);
        memcpy(q + (r * (size_t)a->D + d1) * qsz, (const uint8_t *)a->q2 + r * d2 * qsz, d2 * qsz);
    }
    decode_args joined = *a;
    joined.q = q;
    joined.q2 = NULL;
    joined.d2 = 0;
    const int rc = paged_decode_joined(&joined, num_threads);
    free(q);
    return rc;
}

static int paged_decode_joined(const decode_args *a, int num_threads) {
    (void)amx_grant();                        /* asked once, before any thread reads the answer */
    const int G = a->Hq / a->Hkv;
    int max_rows = 0;
    for (int b = 0; b < a->B; b++) {
        int r = (a->cu_q[b + 1] - a->cu_q[b]) * G;
        if (a->active[b] && r > max_rows) max_rows = r;
    }
    if (max_rows > MAX_ROWS || a->D > MAX_DIM || a->Dv > MAX_DIM) return 1;
#if HAL_FAST
    const int R4 = (max_rows + 3) & ~3;
    if (fast_path_applies(a)) {
        /* items: (sequence, group of KV heads, split of SPLIT keys). Head groups spread a small batch over
         * the threads; splits (always SPLIT keys, whatever the batch, then merged in order) spread a long
         * sequence over them: a sequence's arithmetic never depends on the rest of the batch. */
        int64_t splits = 0;                   /* (sequence, split) items with all heads in one */
        for (int b = 0; b < a->B; b++)
            if (a->active[b] && a->cu_q[b + 1] > a->cu_q[b]) splits += splits_of(a->seq_lens[b]);
        /* Head groups only when splits alone would leave threads unevenly loaded: the fewest groups that
         * give every thread the same number of items, where the splits are fewer than two per thread and
         * not a multiple of the threads. A group's rows are a slice of each token's rows, slices of short
         * rows (int8: 130 B per head) share cache lines with the next group's, read twice, and more items
         * cost more starts: C harness, 2 threads, in cache / streamed, ms per layer, against the rule
         * before and the claim one ahead: int8 B1 x 1024, 2 groups -> 1, 0.073 -> 0.067 / 0.099 ->
         * 0.089; int8 B1 x 512, 4 -> 2, 0.041 -> 0.037; bf16 B1 x 1024 0.084 -> 0.076 / 0.148 -> 0.118;
         * fp8 B1 x 1024 streamed 0.088 -> 0.093. (Two items per thread, the rule before, balanced a
         * thread that began late; item_claim does that now.) Grouping never changes a head's arithmetic. */
        int groups = 1;
        if (splits < 2 * num_threads && splits % num_threads) {
            int x = (int)splits, y = num_threads;  /* groups = num_threads / gcd(splits, num_threads) */
            while (y) { const int t = x % y; x = y; y = t; }
            groups = num_threads / x;
        }
        groups = groups > a->Hkv ? a->Hkv : groups;
        while (a->Hkv % groups) groups++;
        const int hpg = a->Hkv / groups;
        int *first = (int *)malloc(sizeof(int) * (size_t)(a->B + 1));   /* first item of each sequence */
        int64_t *poff = (int64_t *)malloc(sizeof(int64_t) * (size_t)(a->B + 1)); /* its partial buffer */
        first[0] = 0; poff[0] = 0;
        for (int b = 0; b < a->B; b++) {
            const int ql = a->cu_q[b + 1] - a->cu_q[b], ns = splits_of(a->seq_lens[b]), on = a->active[b] && ql > 0;
            first[b + 1] = first[b] + (on ? groups * ns : 0);
            poff[b + 1] = poff[b] + (on && ns > 1 ? (int64_t)groups * ns * hpg * ql * G * (a->Dv + 2) : 0);
        }
        const int items = first[a->B];
        int next_item = 0;                    /* the first item no thread has claimed */
        float *partials = poff[a->B] ? (float *)malloc(sizeof(float) * (size_t)poff[a->B]) : NULL;
        const size_t bytes = (ws_per_head(R4, a->D, a->Dv) * hpg * sizeof(float) + 4095) / 64 * 64;
#ifdef _OPENMP
        #pragma omp parallel num_threads(num_threads)
#endif
        {
            const unsigned int csr = hal_ftz_enter();
            float *ws = (float *)scratch(SCR_WS, bytes);
            /* dynamic schedule, each thread claiming its next item as its current one starts its last
             * tile, whose prefetch then covers the next one's first (item_claim) */
            int it = __atomic_fetch_add(&next_item, 1, __ATOMIC_RELAXED);
            while (it < items) {
                item_claim nx = {&next_item, first, items, hpg, -1, {0, 0, 0, 0}};
                const item_ref c = item_of(a, first, it, hpg);
                const int ns = splits_of(a->seq_lens[c.b]);
                const int R = (a->cu_q[c.b + 1] - a->cu_q[c.b]) * G;
                float *part = ns > 1 ? partials + poff[c.b] + ((int64_t)(c.h0 / hpg) * ns + c.split) * hpg * R * (a->Dv + 2) : NULL;
                decode_item_fast(a, c.b, c.h0, c.h1, ws, c.split, part, &nx);
                it = nx.it >= 0 ? nx.it : __atomic_fetch_add(&next_item, 1, __ATOMIC_RELAXED);  /* no tile: claim now */
            }
#ifdef _OPENMP
            #pragma omp barrier
            #pragma omp for schedule(dynamic, 1)
#endif
            for (int it = 0; it < a->B * groups; it++) {
                const int b = it / groups, g = it % groups;
                const int ns = splits_of(a->seq_lens[b]);
                if (first[b + 1] == first[b] || ns == 1) continue;
                const int R = (a->cu_q[b + 1] - a->cu_q[b]) * G;
                merge_splits(a, b, g * hpg, (g + 1) * hpg, ns, partials + poff[b] + (int64_t)g * ns * hpg * R * (a->Dv + 2));
            }
            hal_ftz_leave(csr);
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
        const unsigned int csr = hal_ftz_enter();
        float *ws = (float *)scratch(SCR_WS, ws_floats * sizeof(float));
#ifdef _OPENMP
        #pragma omp for schedule(dynamic, 1)
#endif
        for (int it = 0; it < items; it++) {
            int b = it / a->Hkv, h = it % a->Hkv;
            if (a->active[b] && a->cu_q[b + 1] > a->cu_q[b]) decode_item(a, b, h, ws);
        }
        hal_ftz_leave(csr);
    }
    return 0;
}
