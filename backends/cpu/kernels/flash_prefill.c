/* Attention for long query runs (prefill, chunked prefill) on bf16 tensors: FlashAttention-2's
 * forward pass (Dao, 2023) with AVX-512 BF16 dot products.
 *
 * A work item is (sequence b, KV head h, query tile): QT query tokens times the G = Hq / Hkv query
 * heads of KV head h, R = QT * G rows. Keys and values are visited in tiles of KT = 32 tokens (64 in
 * builds with AMX tiles), gathered from contiguous rows (dense) or through the block table (paged),
 * and repacked so that every multiply is a VDPBF16PS with no horizontal sums:
 *   scores: K^T packed as [D/2][KT] dword pairs (k[t][2i], k[t][2i+1]); a row's query pair is
 *           broadcast and multiplied into 16 scores at once;
 *   P.V:    V packed as [KT/2][Dv] dword pairs (v[2u][d], v[2u+1][d]); a row's probability pair
 *           (rounded to bf16, as FlashAttention does) is broadcast into 16 output channels.
 * Scores, softmax statistics and the output accumulate in fp32. The options of SPEC section 2
 * (causal bottom-right, window, soft-cap, ALiBi, sinks) and the LSE are applied per row.
 * A thread takes a work unit at a time: one sequence's KV head and a run of its query tiles, which
 * share the packed key tiles (pack_cache: each is packed once per unit, not once per query tile).
 * Requires AVX512F + AVX512_BF16 (hal_flash_prefill_available() says whether it was built). On CPUs
 * with AMX both products run on tiles instead, on the same packed operands, pipelined with the
 * softmax (amx.h, amx_item).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const uint16_t *q;            /* [T, Hq, D] bf16 */
    const uint8_t *k, *v;         /* dense: [S, Hkv, D|Dv] bf16; paged: [num_blocks, bs, Hkv, D|Dv] */
    const int32_t *cu_q, *cu_k;   /* [B+1]; cu_k NULL when paged */
    const int32_t *seq_lens;      /* [B] (paged), NULL when dense */
    const int32_t *block_table;   /* [B, bt_stride] (paged), NULL when dense */
    const uint8_t *active;        /* [B]: compute sequence b here */
    uint16_t *out;                /* [T, Hq, Dv] bf16 */
    float *lse;                   /* [T, Hq] or NULL */
    const float *alibi, *sinks;   /* [Hq] or NULL */
    int64_t bt_stride;
    int B, Hq, Hkv, D, Dv, bs;
    float scale, softcap;         /* softcap 0 = none */
    int causal, window;           /* window < 0 = none */
} prefill_args;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include "simd.h"
#include "amx.h"

#ifndef HAL_PREFILL_KT                /* keys a tile: 32, or 64 with tiles (fewer accumulator round trips) */
#define HAL_PREFILL_KT (HAL_AMX ? 64 : 32)
#endif
#ifndef HAL_PREFILL_ROWS              /* query rows a work item (64 or 128 alike on the AMX VM: kept at 64) */
#define HAL_PREFILL_ROWS 64
#endif
enum { KT = HAL_PREFILL_KT, KH = KT / 16, ROWS = HAL_PREFILL_ROWS, MAXD = 256 };
#ifndef LAZY
#define LAZY 5.5f                       /* ~ln 256: FA4 lets the max lag by 8 in base 2 */
#endif
_Static_assert(KT == 32 || KT == 64, "HAL_PREFILL_KT: 32 or 64");

int hal_flash_prefill_available(void) { return 1; }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);
}

typedef struct {
    uint32_t kp[1 + HAL_AMX][MAXD / 2][KT];  /* K^T tile, dword pairs along D (with tiles: two, in turn) */
    uint32_t vp[1 + HAL_AMX][KT / 2][MAXD];  /* V tile, dword pairs along tokens */
    float s[ROWS][KT];            /* scores, then probabilities */
    uint32_t pp[ROWS][KT / 2];    /* probabilities as bf16 pairs */
    float acc[ROWS][MAXD];
#if HAL_AMX
    uint16_t qs[ROWS][MAXD];      /* AMX: the item's query rows, one stride apart, zero past R */
#endif
    float m[ROWS], l[ROWS];
    int pos[ROWS], hq[ROWS], qt[ROWS];
    const uint8_t *krow[KT], *vrow[KT];
} workspace;

/* A row's softmax over a tile in two passes. The tile path runs them a 16-row group at a time, so that
 * the group's new maxima, rescales and sums are vector work across the rows (amx_item); softmax_row
 * runs them for one row. Pass 1 (softmax_max_row): row r's scores scaled, soft-capped, ALiBi-biased
 * and masked (-inf), written back, and their max. Pass 2 (softmax_exp_row): their exponentials against the row's new max, as bf16
 * pairs, and their sum. `mask` 0: every key of the tile is visible to every row of the group. */
static inline __m512 softmax_max_row_v(const prefill_args *a, workspace *w, int r, int j0, int n, int mask) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 xm = _mm512_set1_ps(-INFINITY);
    for (int u = 0; u < KH; u++) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(&w->s[r][16 * u]), _mm512_set1_ps(a->scale));
        if (a->softcap > 0.f) v = softcap512(v, a->softcap);
        if (a->alibi || mask) {
            const __m512i jv = _mm512_add_epi32(_mm512_set1_epi32(j0 + 16 * u), lane);
            if (a->alibi) {
                __m512 dist = _mm512_abs_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(w->pos[r]), jv)));
                v = _mm512_fnmadd_ps(_mm512_set1_ps(a->alibi[w->hq[r]]), dist, v);
            }
            if (mask) {
                __mmask16 k = _mm512_cmplt_epi32_mask(jv, _mm512_set1_epi32(j0 + n));
                if (a->causal) k &= _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(w->pos[r]));
                if (a->window >= 0) k &= _mm512_cmpge_epi32_mask(jv, _mm512_set1_epi32(w->pos[r] - a->window));
                v = _mm512_mask_blend_ps(k, _mm512_set1_ps(-INFINITY), v);
            }
        }
        _mm512_storeu_ps(&w->s[r][16 * u], v);
        xm = _mm512_max_ps(xm, v);
    }
    return xm;                                /* the max is over its lanes */
}

static inline __m512 softmax_exp_row_v(workspace *w, int r, float m) {
    __m512 p[KH], ps = _mm512_setzero_ps();
    for (int u = 0; u < KH; u++) {
        const __m512 x = _mm512_loadu_ps(&w->s[r][16 * u]);
        const __mmask16 vis = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        p[u] = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(x, _mm512_set1_ps(m))));
        ps = _mm512_add_ps(ps, p[u]);
    }
    for (int u = 0; u < KH; u += 2)           /* [p[u] (16), p[u + 1] (16)] as 32 bf16 */
        _mm512_storeu_si512(&w->pp[r][8 * u], (__m512i)_mm512_cvtne2ps_pbh(p[u + 1], p[u]));
    return ps;                                /* the sum is over its lanes */
}

/* The same two passes for a tile that needs no mask, soft-cap or ALiBi, with a positive scale: pass 1
 * takes the max of the raw scores (the max of the scaled scores is the scale times it, exactly: rounding
 * is monotonic) and writes nothing back; pass 2 takes 2^((x scale - m) log2 e). Per 16 scores, 16
 * vector instructions where the general passes take 21. */
static inline int softmax_unbiased(const prefill_args *a) {  /* the options let the lighter passes apply */
    return !a->alibi && !(a->softcap > 0.f) && a->scale > 0.f;
}

static inline __m512 softmax_max_raw_v(const workspace *w, int r) {
    __m512 xm = _mm512_loadu_ps(&w->s[r][0]);
    for (int u = 1; u < KH; u++) xm = _mm512_max_ps(xm, _mm512_loadu_ps(&w->s[r][16 * u]));
    return xm;
}

static inline __m512 softmax_exp2_row_v(workspace *w, int r, float m, float scale) {
    /* (x scale - m) log2 e, with x scale rounded as the max m was: x scale log2 e - m log2 e in one FMA
     * would shift the tile's exponents by the rounding of m log2 e (2^-24 of it) against alpha's, 4% at
     * scores of 10^6, and past 2^31 make the max's own weight inf or 0 */
    const __m512 sc = _mm512_set1_ps(scale), mv = _mm512_set1_ps(m), l2e = _mm512_set1_ps(1.44269504088896341f);
    __m512 p[KH], ps = _mm512_setzero_ps();
    for (int u = 0; u < KH; u++) {
        p[u] = exp2_512(_mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(&w->s[r][16 * u]), sc), mv), l2e));
        ps = _mm512_add_ps(ps, p[u]);
    }
    for (int u = 0; u < KH; u += 2)
        _mm512_storeu_si512(&w->pp[r][8 * u], (__m512i)_mm512_cvtne2ps_pbh(p[u + 1], p[u]));
    return ps;
}

/* 16 rows' lane-wise partials v[0..15] -> one vector whose lane i is row i's max (or sum) over its lanes:
 * four levels of pairwise shuffles, 45 instructions where 16 separate reductions take about 130 (and
 * `perf` put a fifth of the tile path's vector samples on those) */
#define REDUCE16(name, op)                                                                                \
    static inline __m512 name(const __m512 *v) {                                                        \
        __m512 a[8], b[4], c[2];                                                                        \
        for (int k = 0; k < 8; k++)                                                                     \
            a[k] = op(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1])); \
        for (int k = 0; k < 4; k++)                                                                     \
            b[k] = op(_mm512_shuffle_ps(a[2 * k], a[2 * k + 1], 0x44), _mm512_shuffle_ps(a[2 * k], a[2 * k + 1], 0xEE)); \
        for (int k = 0; k < 2; k++)                                                                     \
            c[k] = op(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),                               \
                      _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));                              \
        return op(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));     \
    }
REDUCE16(reduce16_max, _mm512_max_ps)
REDUCE16(reduce16_add, _mm512_add_ps)
#undef REDUCE16

/* The online softmax of row r over the tile's keys j0 .. j0 + n - 1 (scores in w->s[r]): its running max
 * and sum, its probabilities as bf16 pairs (w->pp[r]) and its accumulator rescaled; the lighter passes
 * where the row sees the whole tile unbiased */
static inline void softmax_row(const prefill_args *a, workspace *w, int r, int j0, int n, int Dv) {
    const int plain = softmax_unbiased(a) && n == KT && (!a->causal || w->pos[r] >= j0 + n - 1) &&
                      (a->window < 0 || w->pos[r] - a->window <= j0);
    const float mt = plain ? a->scale * _mm512_reduce_max_ps(softmax_max_raw_v(w, r))
                           : _mm512_reduce_max_ps(softmax_max_row_v(a, w, r, j0, n, 1));
    const float m_new = mt > w->m[r] ? mt : w->m[r];
    if (m_new == -INFINITY) { memset(w->pp[r], 0, sizeof(w->pp[r])); return; }
    const float alpha = expf(w->m[r] - m_new);
    w->l[r] = w->l[r] * alpha + _mm512_reduce_add_ps(plain ? softmax_exp2_row_v(w, r, m_new, a->scale)
                                                           : softmax_exp_row_v(w, r, m_new));
    w->m[r] = m_new;
    if (alpha != 1.f) {
        __m512 va = _mm512_set1_ps(alpha);
        for (int d = 0; d < Dv; d += 16) _mm512_storeu_ps(&w->acc[r][d], _mm512_mul_ps(va, _mm512_loadu_ps(&w->acc[r][d])));
    }
}

#if HAL_AMX
/* Both products on AMX tiles (amx.h; every tile 16 rows x 64 bytes), 16 rows (a group) at a time, on the
 * same packed K^T and V and bf16 probabilities: C = the scores (16 rows x 16 keys) += A (16 query rows x
 * 32 dims) B (kp: 16 dim pairs x 16 keys); the accumulator (16 rows x 16 channels) += A (pp: 16 rows x
 * 16 key pairs) B (vp: 16 key pairs x 16 channels). Rows past R hold zeros (queries, probabilities).
 * Each product is cut into steps, so that the vector work of the softmax can run between them. */
static void amx_scores_step(workspace *w, const uint32_t (*kp)[KT], int r0, int c, int D) {
    if (c == D / 32) {                        /* the last step: the scores out; C: tiles 0 .. KH - 1 */
        _tile_stored(0, &w->s[r0][0], 4 * KT);
        _tile_stored(1, &w->s[r0][16], 4 * KT);
        if (KT > 32) {
            _tile_stored(2, &w->s[r0][32], 4 * KT);
            _tile_stored(3, &w->s[r0][48], 4 * KT);
        }
        return;
    }
    if (c == 0) {
        _tile_zero(0);
        _tile_zero(1);
        if (KT > 32) { _tile_zero(2); _tile_zero(3); }
    }
    _tile_loadd(4, &w->qs[r0][32 * c], 2 * MAXD);  /* A: 4; B: 5, 6 */
    _tile_loadd(5, &kp[16 * c][0], 4 * KT);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, &kp[16 * c][16], 4 * KT);
    _tile_dpbf16ps(1, 4, 6);
    if (KT > 32) {
        _tile_loadd(5, &kp[16 * c][32], 4 * KT);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, &kp[16 * c][48], 4 * KT);
        _tile_dpbf16ps(3, 4, 6);
    }
}

/* one 16-channel block of 16 rows' accumulator: ct += A (4: keys 0-31; 5: keys 32-63) B (6, 7) */
#define AMX_PV_BLOCK(ct)                                                                                  \
    do {                                                                                                \
        _tile_loadd(ct, c0, 4 * MAXD);                                                                  \
        _tile_loadd(6, vp + 16 * blk, 4 * vs);                                                          \
        _tile_dpbf16ps(ct, 4, 6);                                                                       \
        if (KT > 32) {                                                                                  \
            _tile_loadd(7, vp + (size_t)16 * vs + 16 * blk, 4 * vs);                                    \
            _tile_dpbf16ps(ct, 5, 7);                                                                   \
        }                                                                                               \
        _tile_stored(ct, c0, 4 * MAXD);                                                                 \
    } while (0)

static void amx_pv_step(workspace *w, const uint32_t *vp, int vs, int r0, int blk) {
    if (blk == 0) {
        _tile_loadd(4, w->pp[r0], 4 * (KT / 2));
        if (KT > 32) _tile_loadd(5, &w->pp[r0][16], 4 * (KT / 2));
    }
    float *c0 = &w->acc[r0][16 * blk];
    switch (blk & 3) {                        /* tile numbers are immediates */
    case 0: AMX_PV_BLOCK(0); break;
    case 1: AMX_PV_BLOCK(1); break;
    case 2: AMX_PV_BLOCK(2); break;
    default: AMX_PV_BLOCK(3); break;
    }
}


/* The same products for two groups at once (32 rows: r0 and r0 + 16), so that each K^T and V tile load
 * serves both: per 16 rows and 64 keys, 34 tile loads where one group at a time takes 46 (the scores'
 * query tiles are loaded twice as often, their key tiles and P.V's value tiles half as often), and as
 * many products. The scores run in halves of 32 keys (their four accumulators are 2 groups x 2 key
 * blocks, stored after each half, so only while another block's softmax runs: see amx_item); steps:
 * KT / 32 halves x (D / 32 + 1). P.V: tiles 4-7 the two groups' probabilities, 2-3 the value pairs,
 * 0-1 the two groups' accumulator blocks. */
static void amx_scores_step2(workspace *w, const uint32_t (*kp)[KT], int r0, int step, int D) {
    const int nc = D / 32 + 1, k0 = 32 * (step / nc), c = step % nc;
    if (c == D / 32) {
        _tile_stored(0, &w->s[r0][k0], 4 * KT);
        _tile_stored(1, &w->s[r0][k0 + 16], 4 * KT);
        _tile_stored(2, &w->s[r0 + 16][k0], 4 * KT);
        _tile_stored(3, &w->s[r0 + 16][k0 + 16], 4 * KT);
        return;
    }
    if (c == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    _tile_loadd(4, &w->qs[r0][32 * c], 2 * MAXD);
    _tile_loadd(6, &kp[16 * c][k0], 4 * KT);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, &kp[16 * c][k0 + 16], 4 * KT);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, &w->qs[r0 + 16][32 * c], 2 * MAXD);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
}

static void amx_pv_step2(workspace *w, const uint32_t *vp, int vs, int r0, int blk) {
    if (blk == 0) {
        _tile_loadd(4, w->pp[r0], 4 * (KT / 2));
        _tile_loadd(6, w->pp[r0 + 16], 4 * (KT / 2));
        if (KT > 32) {
            _tile_loadd(5, &w->pp[r0][16], 4 * (KT / 2));
            _tile_loadd(7, &w->pp[r0 + 16][16], 4 * (KT / 2));
        }
    }
    float *c0 = &w->acc[r0][16 * blk], *c1 = &w->acc[r0 + 16][16 * blk];
    _tile_loadd(0, c0, 4 * MAXD);
    _tile_loadd(2, vp + 16 * blk, 4 * vs);
    _tile_dpbf16ps(0, 4, 2);
    _tile_loadd(1, c1, 4 * MAXD);
    _tile_dpbf16ps(1, 6, 2);
    if (KT > 32) {
        _tile_loadd(3, vp + (size_t)16 * vs + 16 * blk, 4 * vs);
        _tile_dpbf16ps(0, 5, 3);
        _tile_dpbf16ps(1, 7, 3);
    }
    _tile_stored(0, c0, 4 * MAXD);
    _tile_stored(1, c1, 4 * MAXD);
}
#endif

/* Row pointers of keys j0 .. j0 + n - 1 of sequence b, KV head h; the tile's padding repeats its last row
 * (masked off) */
static void tile_rows(const prefill_args *a, int b, int h, int j0, int n, workspace *w) {
    const int D = a->D, Dv = a->Dv;
    const int64_t row_k = (int64_t)a->Hkv * D * 2, row_v = (int64_t)a->Hkv * Dv * 2;
    for (int i = 0; i < KT; i++) {
        int j = j0 + (i < n ? i : n - 1);
        if (a->block_table) {
            int64_t blk = a->block_table[(int64_t)b * a->bt_stride + j / a->bs], off = j % a->bs;
            w->krow[i] = a->k + (blk * a->bs + off) * row_k + (int64_t)h * D * 2;
            w->vrow[i] = a->v + (blk * a->bs + off) * row_v + (int64_t)h * Dv * 2;
        } else {
            w->krow[i] = a->k + (int64_t)(a->cu_k[b] + j) * row_k + (int64_t)h * D * 2;
            w->vrow[i] = a->v + (int64_t)(a->cu_k[b] + j) * row_v + (int64_t)h * Dv * 2;
        }
    }
}

/* Pack the tile at w's row pointers: kp[i][t] = dword i of key t (K^T); vp[u * vs + d] = (v[2u][d],
 * v[2u+1][d]) (V in token pairs), vs >= Dv rounded up to 32 */
static void pack_tile(const workspace *w, int D, int Dv, uint32_t (*kp)[KT], uint32_t *vp, int vs) {
    for (int t = 0; t < KT; t++) {
        const uint32_t *kr = (const uint32_t *)w->krow[t];
        for (int i = 0; i < D / 2; i++) kp[i][t] = kr[i];
    }
    const __m512i idx_a = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), idx_b = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int u = 0; u < KT / 2; u++) {
        const uint16_t *v0 = (const uint16_t *)w->vrow[2 * u], *v1 = (const uint16_t *)w->vrow[2 * u + 1];
        for (int d = 0; d < Dv; d += 32) {
            const __mmask32 m = Dv - d < 32 ? 0xffffu : 0xffffffffu;  /* a last 16 channels: no read past the row */
            __m512i x0 = _mm512_maskz_loadu_epi16(m, v0 + d), x1 = _mm512_maskz_loadu_epi16(m, v1 + d);
            /* interleave 16-bit lanes; unpack works per 128-bit lane, so restore channel order */
            __m512i lo16 = _mm512_unpacklo_epi16(x0, x1), hi16 = _mm512_unpackhi_epi16(x0, x1);
            _mm512_storeu_si512(vp + (size_t)u * vs + d, _mm512_permutex2var_epi64(lo16, idx_a, hi16));
            _mm512_storeu_si512(vp + (size_t)u * vs + d + 16, _mm512_permutex2var_epi64(lo16, idx_b, hi16));
        }
    }
}

/* A unit's packed tiles (K^T and V pairs of whole KT-key tiles of one sequence and KV head), kept while
 * the unit's query tiles run, so that each is packed once per unit rather than once per query tile */
typedef struct {
    uint32_t *buf;                /* tile i at buf + i * tile_dw: kp [D/2][KT], then vp [KT/2][vs] */
    uint8_t *done;                /* [tiles]: tile i packed */
    size_t tile_dw;
    int vs;
} pack_cache;

/* A tile of keys: j0 .. j0 + n - 1, packed (kp, vp with rows vs dwords apart) */
typedef struct {
    const uint32_t (*kp)[KT];
    const uint32_t *vp;
    int vs, j0, n;
} key_tile;

static inline int tile_len(int j0, int hi) {  /* tiles end on multiples of KT, and at hi */
    return (j0 / KT + 1) * KT < hi ? (j0 / KT + 1) * KT - j0 : hi - j0;
}

/* A tile that starts on a multiple of KT and whose KT keys the sequence holds comes from the unit's cache
 * (packed on first use), even where this item sees only its first n (a causal cut: the rest are masked,
 * as the reference masks them); any other goes into w's private buffer `slot`, its padding repeating its
 * last visible row. */
static key_tile prepare_tile(const prefill_args *a, int b, int h, int j0, int n, workspace *w, pack_cache *pc,
                             int slot) {
    const int D = a->D, Dv = a->Dv, S = a->block_table ? a->seq_lens[b] : a->cu_k[b + 1] - a->cu_k[b];
    if (pc && j0 % KT == 0 && j0 + KT <= S) {
        uint32_t *t = pc->buf + (size_t)(j0 / KT) * pc->tile_dw;
        if (!pc->done[j0 / KT]) {
            tile_rows(a, b, h, j0, KT, w);
            pack_tile(w, D, Dv, (uint32_t(*)[KT])t, t + (size_t)(D / 2) * KT, pc->vs);
            pc->done[j0 / KT] = 1;
        }
        return (key_tile){(const uint32_t(*)[KT])t, t + (size_t)(D / 2) * KT, pc->vs, j0, n};
    }
    tile_rows(a, b, h, j0, n, w);
    pack_tile(w, D, Dv, w->kp[slot], &w->vp[slot][0][0], MAXD);
    return (key_tile){(const uint32_t(*)[KT])w->kp[slot], &w->vp[slot][0][0], MAXD, j0, n};
}

#if HAL_AMX
/* A block's tile steps: its scores (`sc`) or P.V (`pv`), for one group or (two) a pair */
static inline void amx_block_step(workspace *w, const key_tile *t, int r0, int two, int is_pv, int step, int D) {
    if (is_pv) {
        if (two) amx_pv_step2(w, t->vp, t->vs, r0, step);
        else amx_pv_step(w, t->vp, t->vs, r0, step);
    } else {
        if (two) amx_scores_step2(w, t->kp, r0, step, D);
        else amx_scores_step(w, t->kp, r0, step, D);
    }
}

/* The tile path of an item's keys [lo, hi) for rows 0 .. R - 1 (G groups of 16), as one pipeline over
 * (key tile, block) pairs, a block being two groups where there are three or more (so that the next
 * block's scores never write rows whose softmax is running), else one: while the vector units run a
 * block's softmax, row by row, the tile unit runs P.V of the pair before it and the scores of the pair
 * after it, in steps between the rows (the next tile's scores of block 0 during this tile's last block,
 * this tile's last P.V during the next tile's first block). Measured on a Sapphire Rapids VM: a tile
 * load costs about as much as a tile product and neither overlaps the other, while vector work runs
 * beside both; the softmax's ~100 vector instructions a row thus run during the tile work instead of
 * after it. With one block, its P.V must finish before the next tile's softmax rewrites its
 * probabilities, so it runs first. */
static void amx_item(const prefill_args *a, int b, int h, workspace *w, pack_cache *pc, int R, int lo, int hi) {
    const int D = a->D, Dv = a->Dv, G = (R + 15) / 16, BG = G >= 3 ? 2 : 1, NB = (G + BG - 1) / BG;
    const int npv = Dv / 16;
#define BLOCK_TWO(bk) (BG == 2 && 2 * (bk) + 1 < G)
#define BLOCK_NSC(bk) (BLOCK_TWO(bk) ? (KT / 32) * (D / 32 + 1) : D / 32 + 1)
#define BLOCK_R0(bk) (16 * BG * (bk))
    int slot = 0;
    key_tile cur = prepare_tile(a, b, h, lo, tile_len(lo, hi), w, pc, slot), nxt = cur, prev = cur;
    int has_prev = 0;
    for (int c = 0; c < BLOCK_NSC(0); c++) amx_block_step(w, &cur, 0, BLOCK_TWO(0), 0, c, D);
    for (;;) {
        const int has_next = cur.j0 + cur.n < hi;
        if (NB == 1 && has_prev)
            for (int blk = 0; blk < npv; blk++) amx_block_step(w, &prev, 0, BLOCK_TWO(0), 1, blk, D);
        for (int bk = 0; bk < NB; bk++) {
            if (bk == (NB > 1) && has_next)   /* after prev's last P.V: nxt may reuse its private buffer */
                nxt = prepare_tile(a, b, h, cur.j0 + cur.n, tile_len(cur.j0 + cur.n, hi), w, pc, slot ^= 1);
            const key_tile *pv = bk > 0 ? &cur : NB > 1 && has_prev ? &prev : NULL;
            const key_tile *sc = bk + 1 < NB ? &cur : has_next ? &nxt : NULL;
            const int pv_b = bk > 0 ? bk - 1 : NB - 1, sc_b = bk + 1 < NB ? bk + 1 : 0;
            const int npv_g = pv ? npv : 0, nsc_g = sc ? BLOCK_NSC(sc_b) : 0, total = npv_g + nsc_g;
            const int g0 = BG * bk, gn = G - g0 < BG ? G - g0 : BG;
            int done = 0;
            for (int gg = 0; gg < gn; gg++) {
                /* the group's softmax in two passes of 16 rows; the block's tile steps spread over its rows */
                const int r0 = 16 * (g0 + gg), rl = R - r0 < 16 ? R - r0 : 16;
                const int mask = cur.n < KT || (a->causal && w->pos[r0] < cur.j0 + cur.n - 1) ||
                                 (a->window >= 0 && w->pos[r0 + rl - 1] - a->window > cur.j0);
                const int plain = !mask && softmax_unbiased(a);
                float mrow[16] __attribute__((aligned(64))), srow[16] __attribute__((aligned(64)));
                __m512 part[16];              /* each row's lane-wise max, then sum */
                for (int i = 0; i < 32; i++) {
                    if (i < 16)
                        part[i] = i >= rl ? _mm512_set1_ps(-INFINITY)
                                  : plain ? softmax_max_raw_v(w, r0 + i)
                                          : softmax_max_row_v(a, w, r0 + i, cur.j0, cur.n, mask);
                    else
                        part[i - 16] = i - 16 >= rl ? _mm512_setzero_ps()
                                       : plain ? softmax_exp2_row_v(w, r0 + i - 16, mrow[i - 16], a->scale)
                                               : softmax_exp_row_v(w, r0 + i - 16, mrow[i - 16]);
                    if (i == 15) {            /* the new maxima (0 where a row sees nothing yet), rescales */
                        const __m512 m_old = _mm512_loadu_ps(&w->m[r0]);
                        __m512 m_tile = reduce16_max(part);
                        if (plain) m_tile = _mm512_mul_ps(m_tile, _mm512_set1_ps(a->scale));
                        const __m512 m_max = _mm512_max_ps(m_old, m_tile);
                        /* a row's reference max moves only when its max passes it by more than LAZY (FA4's
                         * lazy rescale): the rows' exponentials stay below e^LAZY, and most tiles then
                         * rescale nothing */
                        const __mmask16 up = _mm512_cmp_ps_mask(m_max, _mm512_add_ps(m_old, _mm512_set1_ps(LAZY)), _CMP_GT_OQ);
                        const __m512 m_new = _mm512_mask_blend_ps(up, m_old, m_max);
                        _mm512_storeu_ps(&w->m[r0], m_new);
                        const __mmask16 none = _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
                        const __m512 m_use = _mm512_mask_blend_ps(none, m_new, _mm512_setzero_ps());
                        _mm512_store_ps(mrow, m_use);
                        _mm512_store_ps(srow, exp512(_mm512_sub_ps(m_old, m_use)));  /* alpha, for now */
                    }
                    for (const int upto = total * (32 * gg + i + 1) / (32 * gn); done < upto; done++) {
                        if (done < npv_g) amx_block_step(w, pv, BLOCK_R0(pv_b), BLOCK_TWO(pv_b), 1, done, D);
                        else amx_block_step(w, sc, BLOCK_R0(sc_b), BLOCK_TWO(sc_b), 0, done - npv_g, D);
                    }
                    if (i == 15) {            /* rows whose max moved: their accumulators rescaled */
                        __mmask16 moved = _mm512_cmp_ps_mask(_mm512_load_ps(srow), _mm512_set1_ps(1.f), _CMP_NEQ_OQ);
                        moved &= (__mmask16)((1u << rl) - 1);
                        _mm512_storeu_ps(&w->l[r0], _mm512_mul_ps(_mm512_loadu_ps(&w->l[r0]), _mm512_load_ps(srow)));
                        for (; moved; moved &= moved - 1) {
                            const int k = __builtin_ctz(moved);
                            const __m512 va = _mm512_set1_ps(srow[k]);
                            for (int d = 0; d < Dv; d += 16)
                                _mm512_storeu_ps(&w->acc[r0 + k][d], _mm512_mul_ps(va, _mm512_loadu_ps(&w->acc[r0 + k][d])));
                        }
                    }
                }
                _mm512_storeu_ps(&w->l[r0], _mm512_add_ps(_mm512_loadu_ps(&w->l[r0]), reduce16_add(part)));
            }
        }
        prev = cur;
        has_prev = 1;
        if (!has_next) break;
        cur = nxt;
    }
    for (int blk = 0; blk < npv; blk++) amx_block_step(w, &prev, BLOCK_R0(NB - 1), BLOCK_TWO(NB - 1), 1, blk, D);
#undef BLOCK_TWO
#undef BLOCK_NSC
#undef BLOCK_R0
}
#endif

static void run_item(const prefill_args *a, int b, int h, int t0, int t1, workspace *w, int amx_on, pack_cache *pc) {
#if !HAL_AMX
    (void)amx_on;                             /* (the build without tiles keeps its code) */
#endif
    const int G = a->Hq / a->Hkv, D = a->D, Dv = a->Dv;
    const int q0 = a->cu_q[b], ql = a->cu_q[b + 1] - q0;
    const int S = a->block_table ? a->seq_lens[b] : a->cu_k[b + 1] - a->cu_k[b];
    const int R = (t1 - t0) * G;
    for (int r = 0; r < R; r++) {
        int t = t0 + r / G, hq = h * G + r % G;
        w->qt[r] = q0 + t;
        w->hq[r] = hq;
        w->pos[r] = S - ql + t;
        w->m[r] = a->sinks ? a->sinks[hq] : -INFINITY;
        w->l[r] = a->sinks ? 1.f : 0.f;
        memset(w->acc[r], 0, sizeof(float) * Dv);
    }
#if HAL_AMX
    if (amx_on) {                             /* rows past R: zeros through their 16-row group */
        for (int r = 0; r < R; r++) memcpy(w->qs[r], a->q + ((size_t)w->qt[r] * a->Hq + w->hq[r]) * D, 2 * (size_t)D);
        for (int r = R; r < ((R + 15) & ~15); r++) {
            w->m[r] = -INFINITY;
            w->l[r] = 0.f;
            memset(w->qs[r], 0, sizeof w->qs[r]);
            memset(w->pp[r], 0, sizeof w->pp[r]);
            memset(w->acc[r], 0, sizeof w->acc[r]);
        }
    }
#endif
    /* keys any row of the tile can see: [lo, hi) */
    int hi = a->causal ? S - ql + t1 : S;
    if (hi > S) hi = S;
    int lo = a->window >= 0 ? S - ql + t0 - a->window : 0;
    if (lo < 0) lo = 0;
#if HAL_AMX
    if (amx_on) {
        amx_item(a, b, h, w, pc, R, lo, hi);
        goto out;
    }
#endif
    for (int j0 = lo, n; j0 < hi; j0 += n) {
        n = tile_len(j0, hi);
        const key_tile kt = prepare_tile(a, b, h, j0, n, w, pc, 0);
        const uint32_t(*kp)[KT] = kt.kp;
        const uint32_t *vp = kt.vp;
        const int vs = kt.vs;
        /* scores: 4 rows x 32 keys per pass */
        for (int r = 0; r < R; r += 4) {
            __m512 c[4][KH];
            for (int x = 0; x < 4; x++)
                for (int u = 0; u < KH; u++) c[x][u] = _mm512_setzero_ps();
            const uint32_t *qr[4];
            for (int x = 0; x < 4; x++) {
                int rr = r + x < R ? r + x : R - 1;
                qr[x] = (const uint32_t *)(a->q + ((size_t)w->qt[rr] * a->Hq + w->hq[rr]) * D);
            }
            for (int i = 0; i < D / 2; i++) {
                __m512bh kk[KH];
                for (int u = 0; u < KH; u++) kk[u] = (__m512bh)_mm512_loadu_si512(&kp[i][16 * u]);
                for (int x = 0; x < 4; x++) {
                    __m512bh qq = (__m512bh)_mm512_set1_epi32((int)qr[x][i]);
                    for (int u = 0; u < KH; u++) c[x][u] = _mm512_dpbf16_ps(c[x][u], qq, kk[u]);
                }
            }
            for (int x = 0; x < 4 && r + x < R; x++)
                for (int u = 0; u < KH; u++) _mm512_storeu_ps(&w->s[r + x][16 * u], c[x][u]);
        }
        for (int r = 0; r < R; r++) softmax_row(a, w, r, j0, n, Dv);
        /* P.V: 2 rows x 128 channels in registers */
        for (int r = 0; r < R; r += 2) {
            const int r2 = r + 1 < R ? r + 1 : r;
            for (int d0 = 0; d0 < Dv; d0 += 128) {
                const int nd = Dv - d0 < 128 ? (Dv - d0) / 16 : 8;
                __m512 o0[8], o1[8];
                for (int c = 0; c < nd; c++) { o0[c] = _mm512_loadu_ps(&w->acc[r][d0 + 16 * c]); o1[c] = _mm512_loadu_ps(&w->acc[r2][d0 + 16 * c]); }
                for (int u = 0; u < KT / 2; u++) {
                    __m512bh w0 = (__m512bh)_mm512_set1_epi32((int)w->pp[r][u]), w1 = (__m512bh)_mm512_set1_epi32((int)w->pp[r2][u]);
                    for (int c = 0; c < nd; c++) {
                        __m512bh vv = (__m512bh)_mm512_loadu_si512(vp + (size_t)u * vs + d0 + 16 * c);
                        o0[c] = _mm512_dpbf16_ps(o0[c], w0, vv);
                        o1[c] = _mm512_dpbf16_ps(o1[c], w1, vv);
                    }
                }
                for (int c = 0; c < nd; c++) {
                    _mm512_storeu_ps(&w->acc[r][d0 + 16 * c], o0[c]);
                    if (r2 != r) _mm512_storeu_ps(&w->acc[r2][d0 + 16 * c], o1[c]);
                }
            }
        }
    }
#if HAL_AMX
out:
#endif
    for (int r = 0; r < R; r++) {
        float inv = w->l[r] > 0.f ? 1.f / w->l[r] : 0.f;
        uint16_t *o = a->out + ((size_t)w->qt[r] * a->Hq + w->hq[r]) * Dv;
        for (int d = 0; d < Dv; d++) o[d] = f32_to_bf16(w->acc[r][d] * inv);
        if (a->lse) a->lse[(size_t)w->qt[r] * a->Hq + w->hq[r]] = w->l[r] > 0.f ? w->m[r] + logf(w->l[r]) : -INFINITY;
    }
}

enum { PACK_CAP = 64 << 20 };  /* most bytes of packed tiles a thread keeps (S = 128K keys at d128) */

/* 0 on success; 1 when the shapes are outside what this kernel handles (nothing computed). */
int hal_flash_prefill(const prefill_args *a, int num_threads) {
    const int G = a->Hq / a->Hkv;
    if (a->D % 32 || a->Dv % 16 || a->D > MAXD || a->Dv > MAXD || G > ROWS) return 1;
    const int qt = ROWS / G;  /* query tokens per tile */
    const int amx = amx_grant() == AMX_NATIVE || amx_grant() == AMX_EMULATED;  /* asked before the threads */
    /* Work units: a sequence's KV head and a run of its query tiles, which share their packed key tiles.
     * A (b, h) splits into as many runs as it takes to give each thread about four units; the units
     * with the latest (under a causal mask, longest) query tiles go first. */
    int groups = 0;
    for (int b = 0; b < a->B; b++) groups += a->active[b] ? a->Hkv : 0;
    const int runs = groups ? (4 * num_threads + groups - 1) / groups : 1;
    int units = 0;
    for (int b = 0; b < a->B; b++)
        if (a->active[b]) {
            const int nt = (a->cu_q[b + 1] - a->cu_q[b] + qt - 1) / qt;
            units += a->Hkv * (nt < runs ? nt : runs);
        }
    int *plan = (int *)malloc(sizeof(int) * 4 * (size_t)(units > 0 ? units : 1));
    int it = 0;
    for (int r = runs - 1; r >= 0; r--)
        for (int b = 0; b < a->B; b++) {
            if (!a->active[b]) continue;
            const int ql = a->cu_q[b + 1] - a->cu_q[b], nt = (ql + qt - 1) / qt, nr = nt < runs ? nt : runs;
            if (r >= nr) continue;
            for (int h = 0; h < a->Hkv; h++) {  /* query tiles [k0, k1) of nt, aligned to the sequence's end */
                plan[4 * it] = b; plan[4 * it + 1] = h;
                plan[4 * it + 2] = (int)((int64_t)nt * r / nr); plan[4 * it + 3] = (int)((int64_t)nt * (r + 1) / nr);
                it++;
            }
        }
    int max_s = 0;                            /* the longest sequence whose unit runs 2+ query tiles */
    for (int i = 0; i < units; i++) {
        const int b = plan[4 * i], S = a->block_table ? a->seq_lens[b] : a->cu_k[b + 1] - a->cu_k[b];
        if (plan[4 * i + 3] - plan[4 * i + 2] > 1 && S > max_s) max_s = S;
    }
    const int vs = (a->Dv + 31) & ~31, max_tiles = max_s / KT;
    const size_t tile_dw = (size_t)(a->D / 2) * KT + (size_t)(KT / 2) * vs;
    const int cache = max_tiles > 0 && (size_t)max_tiles * tile_dw * 4 <= PACK_CAP;
#ifdef _OPENMP
    #pragma omp parallel num_threads(num_threads)
#endif
    {
        const unsigned int csr = hal_ftz_enter();
        workspace *w = (workspace *)aligned_alloc(64, (sizeof(workspace) + 63) / 64 * 64);
        pack_cache pc = {NULL, NULL, tile_dw, vs};
        if (cache) {
            pc.buf = (uint32_t *)aligned_alloc(64, (size_t)max_tiles * tile_dw * 4);
            pc.done = (uint8_t *)malloc((size_t)max_tiles);
        }
#if HAL_AMX
        if (amx) amx_configure();
#endif
#ifdef _OPENMP
        #pragma omp for schedule(dynamic, 1)
#endif
        for (int i = 0; i < units; i++) {
            const int b = plan[4 * i], h = plan[4 * i + 1], ql = a->cu_q[b + 1] - a->cu_q[b];
            const int nt = (ql + qt - 1) / qt;
            /* one query tile packs each key tile once anyway: its private buffer, not the cache's pages */
            pack_cache *use = pc.buf && plan[4 * i + 3] - plan[4 * i + 2] > 1 ? &pc : NULL;
            if (use) memset(pc.done, 0, (size_t)max_tiles);
            for (int k = plan[4 * i + 3] - 1; k >= plan[4 * i + 2]; k--) {  /* the longest first: it packs */
                const int t0 = ql - (nt - k) * qt, s0 = t0 < 0 ? 0 : t0, s1 = t0 + qt;
                run_item(a, b, h, s0, s1, w, amx, use);
            }
        }
#if HAL_AMX
        if (amx) _tile_release();
#endif
        free(pc.buf);
        free(pc.done);
        free(w);
        hal_ftz_leave(csr);
    }
    free(plan);
    return 0;
}
#else
int hal_flash_prefill_available(void) { return 0; }
int hal_flash_prefill(const prefill_args *a, int num_threads) { (void)a; (void)num_threads; return 1; }
#endif
