/* Attention for long query runs (prefill, chunked prefill) on bf16 tensors: FlashAttention-2's
 * forward pass (Dao, 2023) with AVX-512 BF16 dot products.
 *
 * A work item is (sequence b, KV head h, query tile): QT query tokens times the G = Hq / Hkv query
 * heads of KV head h, R = QT * G rows. Keys and values are visited in tiles of KT = 32 tokens,
 * gathered from contiguous rows (dense) or through the block table (paged), and repacked so that
 * every multiply is a VDPBF16PS with no horizontal sums:
 *   scores: K^T packed as [D/2][KT] dword pairs (k[t][2i], k[t][2i+1]); a row's query pair is
 *           broadcast and multiplied into 16 scores at once;
 *   P.V:    V packed as [KT/2][Dv] dword pairs (v[2u][d], v[2u+1][d]); a row's probability pair
 *           (rounded to bf16, as FlashAttention does) is broadcast into 16 output channels.
 * Scores, softmax statistics and the output accumulate in fp32. The options of SPEC section 2
 * (causal bottom-right, window, soft-cap, ALiBi, sinks) and the LSE are applied per row.
 * Requires AVX512F + AVX512_BF16 (hal_flash_prefill_available() says whether it was built). On CPUs
 * with AMX both products run on tiles instead, on the same packed operands (amx.h, amx_*_tile).
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

enum { KT = 32, ROWS = 64, MAXD = 256 };

int hal_flash_prefill_available(void) { return 1; }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);
}

typedef struct {
    uint32_t kp[MAXD / 2][KT];    /* K^T tile, dword pairs along D */
    uint32_t vp[KT / 2][MAXD];    /* V tile, dword pairs along tokens */
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

#if HAL_AMX
/* Both products on AMX tiles (amx.h; every tile 16 rows x 64 bytes), 16 rows at a time, on the same
 * packed K^T and V and bf16 probabilities: C = the scores (16 rows x 16 keys) += A (16 query rows x 32
 * dims) B (kp: 16 dim pairs x 16 keys); the accumulator (16 rows x 16 channels) += A (pp: 16 rows x 16
 * key pairs) B (vp: 16 key pairs x 16 channels). Rows past R hold zeros (queries, probabilities). */
static void amx_scores_tile(workspace *w, int R, int D) {
    for (int r0 = 0; r0 < R; r0 += 16) {
        _tile_zero(0);
        _tile_zero(1);
        for (int c = 0; c < D / 32; c++) {
            _tile_loadd(4, &w->qs[r0][32 * c], 2 * MAXD);
            _tile_loadd(5, &w->kp[16 * c][0], 4 * KT);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, &w->kp[16 * c][16], 4 * KT);
            _tile_dpbf16ps(1, 4, 6);
        }
        _tile_stored(0, &w->s[r0][0], 4 * KT);
        _tile_stored(1, &w->s[r0][16], 4 * KT);
    }
}

static void amx_pv_tile(workspace *w, int R, int Dv) {
    for (int r0 = 0; r0 < R; r0 += 16) {
        _tile_loadd(4, w->pp[r0], 4 * (KT / 2));
        for (int d = 0; d < Dv; d += 64) {
            const int nb = Dv - d < 64 ? (Dv - d) / 16 : 4;  /* blocks of 16 channels */
            float *c0 = &w->acc[r0][d];
            _tile_loadd(0, c0, 4 * MAXD);
            _tile_loadd(5, &w->vp[0][d], 4 * MAXD);
            _tile_dpbf16ps(0, 4, 5);
            _tile_stored(0, c0, 4 * MAXD);
            if (nb > 1) {
                _tile_loadd(1, c0 + 16, 4 * MAXD);
                _tile_loadd(6, &w->vp[0][d + 16], 4 * MAXD);
                _tile_dpbf16ps(1, 4, 6);
                _tile_stored(1, c0 + 16, 4 * MAXD);
            }
            if (nb > 2) {
                _tile_loadd(2, c0 + 32, 4 * MAXD);
                _tile_loadd(7, &w->vp[0][d + 32], 4 * MAXD);
                _tile_dpbf16ps(2, 4, 7);
                _tile_stored(2, c0 + 32, 4 * MAXD);
            }
            if (nb > 3) {
                _tile_loadd(3, c0 + 48, 4 * MAXD);
                _tile_loadd(5, &w->vp[0][d + 48], 4 * MAXD);
                _tile_dpbf16ps(3, 4, 5);
                _tile_stored(3, c0 + 48, 4 * MAXD);
            }
        }
    }
}
#endif

static void run_item(const prefill_args *a, int b, int h, int t0, int t1, workspace *w, int amx_on) {
    const int amx = HAL_AMX && amx_on;        /* (a constant without tiles: that build keeps its code) */
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
    if (amx) {                                /* rows past R: zeros through their 16-row group */
        for (int r = 0; r < R; r++) memcpy(w->qs[r], a->q + ((size_t)w->qt[r] * a->Hq + w->hq[r]) * D, 2 * (size_t)D);
        for (int r = R; r < ((R + 15) & ~15); r++) {
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
    const int64_t row_k = (int64_t)a->Hkv * D * 2, row_v = (int64_t)a->Hkv * Dv * 2;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int j0 = lo; j0 < hi; j0 += KT) {
        const int n = hi - j0 < KT ? hi - j0 : KT;
        for (int i = 0; i < KT; i++) {
            int j = j0 + (i < n ? i : n - 1);     /* the tile's padding repeats its last row (masked off) */
            if (a->block_table) {
                int64_t blk = a->block_table[(int64_t)b * a->bt_stride + j / a->bs], off = j % a->bs;
                w->krow[i] = a->k + (blk * a->bs + off) * row_k + (int64_t)h * D * 2;
                w->vrow[i] = a->v + (blk * a->bs + off) * row_v + (int64_t)h * Dv * 2;
            } else {
                w->krow[i] = a->k + (int64_t)(a->cu_k[b] + j) * row_k + (int64_t)h * D * 2;
                w->vrow[i] = a->v + (int64_t)(a->cu_k[b] + j) * row_v + (int64_t)h * Dv * 2;
            }
        }
        /* pack K^T: kp[i][t] = dword i of key t */
        for (int t = 0; t < KT; t++) {
            const uint32_t *kr = (const uint32_t *)w->krow[t];
            for (int i = 0; i < D / 2; i++) w->kp[i][t] = kr[i];
        }
        /* pack V: vp[u][d] = (v[2u][d], v[2u+1][d]) */
        for (int u = 0; u < KT / 2; u++) {
            const __m512i *v0 = (const __m512i *)w->vrow[2 * u], *v1 = (const __m512i *)w->vrow[2 * u + 1];
            for (int d = 0; d < Dv; d += 32) {
                __m512i x0 = _mm512_loadu_si512(v0 + d / 32), x1 = _mm512_loadu_si512(v1 + d / 32);
                /* interleave 16-bit lanes; unpack works per 128-bit lane, so restore channel order */
                __m512i lo16 = _mm512_unpacklo_epi16(x0, x1), hi16 = _mm512_unpackhi_epi16(x0, x1);
                __m512i idx_a = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), idx_b = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
                _mm512_storeu_si512(&w->vp[u][d], _mm512_permutex2var_epi64(lo16, idx_a, hi16));
                _mm512_storeu_si512(&w->vp[u][d + 16], _mm512_permutex2var_epi64(lo16, idx_b, hi16));
            }
        }
        /* scores: 4 rows x 32 keys per pass */
#if HAL_AMX
        if (amx) amx_scores_tile(w, R, D);
#endif
        for (int r = 0; !amx && r < R; r += 4) {
            __m512 c[4][2];
            for (int x = 0; x < 4; x++) c[x][0] = c[x][1] = _mm512_setzero_ps();
            const uint32_t *qr[4];
            for (int x = 0; x < 4; x++) {
                int rr = r + x < R ? r + x : R - 1;
                qr[x] = (const uint32_t *)(a->q + ((size_t)w->qt[rr] * a->Hq + w->hq[rr]) * D);
            }
            for (int i = 0; i < D / 2; i++) {
                __m512bh k0 = (__m512bh)_mm512_loadu_si512(&w->kp[i][0]), k1 = (__m512bh)_mm512_loadu_si512(&w->kp[i][16]);
                for (int x = 0; x < 4; x++) {
                    __m512bh qq = (__m512bh)_mm512_set1_epi32((int)qr[x][i]);
                    c[x][0] = _mm512_dpbf16_ps(c[x][0], qq, k0);
                    c[x][1] = _mm512_dpbf16_ps(c[x][1], qq, k1);
                }
            }
            for (int x = 0; x < 4 && r + x < R; x++) {
                _mm512_storeu_ps(&w->s[r + x][0], c[x][0]);
                _mm512_storeu_ps(&w->s[r + x][16], c[x][1]);
            }
        }
        /* online softmax per row */
        for (int r = 0; r < R; r++) {
            __m512 x[2];
            __mmask16 vis[2];
            for (int half = 0; half < 2; half++) {
                __m512i jv = _mm512_add_epi32(_mm512_set1_epi32(j0 + 16 * half), lane);
                __m512 v = _mm512_mul_ps(_mm512_loadu_ps(&w->s[r][16 * half]), _mm512_set1_ps(a->scale));
                if (a->softcap > 0.f) v = softcap512(v, a->softcap);
                if (a->alibi) {
                    __m512 dist = _mm512_abs_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(w->pos[r]), jv)));
                    v = _mm512_fnmadd_ps(_mm512_set1_ps(a->alibi[w->hq[r]]), dist, v);
                }
                __mmask16 k = _mm512_cmplt_epi32_mask(jv, _mm512_set1_epi32(j0 + n));
                if (a->causal) k &= _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(w->pos[r]));
                if (a->window >= 0) k &= _mm512_cmpge_epi32_mask(jv, _mm512_set1_epi32(w->pos[r] - a->window));
                vis[half] = k;
                x[half] = _mm512_mask_blend_ps(k, _mm512_set1_ps(-INFINITY), v);
            }
            float mt = _mm512_reduce_max_ps(_mm512_max_ps(x[0], x[1]));
            float m_new = mt > w->m[r] ? mt : w->m[r];
            if (m_new == -INFINITY) { memset(w->pp[r], 0, sizeof(w->pp[r])); continue; }
            __m512 p0 = _mm512_maskz_mov_ps(vis[0], exp512(_mm512_sub_ps(x[0], _mm512_set1_ps(m_new))));
            __m512 p1 = _mm512_maskz_mov_ps(vis[1], exp512(_mm512_sub_ps(x[1], _mm512_set1_ps(m_new))));
            float alpha = expf(w->m[r] - m_new);
            w->l[r] = w->l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
            w->m[r] = m_new;
            /* probabilities as bf16 pairs: element 2u in the low half of dword u */
            __m512bh pb = _mm512_cvtne2ps_pbh(p1, p0);   /* [p0 (16), p1 (16)] as 32 bf16 */
            _mm512_storeu_si512(w->pp[r], (__m512i)pb);
            if (alpha != 1.f) {
                __m512 va = _mm512_set1_ps(alpha);
                for (int d = 0; d < Dv; d += 16) _mm512_storeu_ps(&w->acc[r][d], _mm512_mul_ps(va, _mm512_loadu_ps(&w->acc[r][d])));
            }
        }
        /* P.V: 2 rows x 128 channels in registers */
#if HAL_AMX
        if (amx) amx_pv_tile(w, R, Dv);
#endif
        for (int r = 0; !amx && r < R; r += 2) {
            const int r2 = r + 1 < R ? r + 1 : r;
            for (int d0 = 0; d0 < Dv; d0 += 128) {
                const int nd = Dv - d0 < 128 ? (Dv - d0) / 16 : 8;
                __m512 o0[8], o1[8];
                for (int c = 0; c < nd; c++) { o0[c] = _mm512_loadu_ps(&w->acc[r][d0 + 16 * c]); o1[c] = _mm512_loadu_ps(&w->acc[r2][d0 + 16 * c]); }
                for (int u = 0; u < KT / 2; u++) {
                    __m512bh w0 = (__m512bh)_mm512_set1_epi32((int)w->pp[r][u]), w1 = (__m512bh)_mm512_set1_epi32((int)w->pp[r2][u]);
                    for (int c = 0; c < nd; c++) {
                        __m512bh vv = (__m512bh)_mm512_loadu_si512(&w->vp[u][d0 + 16 * c]);
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
    for (int r = 0; r < R; r++) {
        float inv = w->l[r] > 0.f ? 1.f / w->l[r] : 0.f;
        uint16_t *o = a->out + ((size_t)w->qt[r] * a->Hq + w->hq[r]) * Dv;
        for (int d = 0; d < Dv; d++) o[d] = f32_to_bf16(w->acc[r][d] * inv);
        if (a->lse) a->lse[(size_t)w->qt[r] * a->Hq + w->hq[r]] = w->l[r] > 0.f ? w->m[r] + logf(w->l[r]) : -INFINITY;
    }
}

/* 0 on success; 1 when the shapes are outside what this kernel handles (nothing computed). */
int hal_flash_prefill(const prefill_args *a, int num_threads) {
    const int G = a->Hq / a->Hkv;
    if (a->D % 32 || a->Dv % 16 || a->D > MAXD || a->Dv > MAXD || G > ROWS) return 1;
    const int qt = ROWS / G;  /* query tokens per tile */
    const int amx = amx_grant() == AMX_NATIVE || amx_grant() == AMX_EMULATED;  /* asked before the threads */
    int items = 0;
    for (int b = 0; b < a->B; b++)
        if (a->active[b]) items += a->Hkv * ((a->cu_q[b + 1] - a->cu_q[b] + qt - 1) / qt);
    int *plan = (int *)malloc(sizeof(int) * 3 * (size_t)(items > 0 ? items : 1));
    int it = 0;
    for (int b = 0; b < a->B; b++) {
        if (!a->active[b]) continue;
        int ql = a->cu_q[b + 1] - a->cu_q[b];
        for (int t0 = ql - ((ql + qt - 1) / qt) * qt; t0 < ql; t0 += qt)   /* longest (last) tiles first */
            for (int h = 0; h < a->Hkv; h++) { plan[3 * it] = b; plan[3 * it + 1] = h; plan[3 * it + 2] = t0; it++; }
    }
#ifdef _OPENMP
    #pragma omp parallel num_threads(num_threads)
#endif
    {
        workspace *w = (workspace *)aligned_alloc(64, (sizeof(workspace) + 63) / 64 * 64);
#if HAL_AMX
        if (amx) amx_configure();
#endif
#ifdef _OPENMP
        #pragma omp for schedule(dynamic, 1)
#endif
        for (int i = 0; i < items; i++) {
            int b = plan[3 * i], h = plan[3 * i + 1], t0 = plan[3 * i + 2], ql = a->cu_q[b + 1] - a->cu_q[b];
            int s0 = t0 < 0 ? 0 : t0, s1 = t0 + qt < ql ? t0 + qt : ql;
            run_item(a, b, h, s0, s1, w, amx);
        }
#if HAL_AMX
        if (amx) _tile_release();
#endif
        free(w);
    }
    free(plan);
    return 0;
}
#else
int hal_flash_prefill_available(void) { return 0; }
int hal_flash_prefill(const prefill_args *a, int num_threads) { (void)a; (void)num_threads; return 1; }
#endif
