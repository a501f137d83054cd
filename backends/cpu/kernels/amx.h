/* AMX tiles (AMX-TILE, AMX-BF16, AMX-INT8) for the cpu kernels, native or modelled in C: decode's bf16
 * 16-row groups and int8 and fp8 4-row groups (paged_decode.c), and bf16 prefill (flash_prefill.c).
 *
 * HAL_AMX is 1 where the build has tiles: natively when the compiler targets AMX-TILE and AMX-BF16
 * (-march=native on Sapphire Rapids and later; HAL_AMX_INT8 also needs AMX-INT8) and HAL_AMX_OFF is
 * not defined, or as a C model of the instructions with HAL_AMX_EMULATE (HAL_CPU_AMX=emulate), which
 * proves the tile code's layouts, strides and order on any CPU; slowly. Native tiles also need
 * Linux's consent per process (arch_prctl ARCH_REQ_XCOMP_PERM): amx_grant() asks once, and without
 * it the AVX-512 paths run.
 *
 * The model follows the SDM: TDPBF16PS per output element, for each dim pair k in order, the even then
 * the odd product added in fp32, bf16 denormal inputs read as zero; TDPBSUD and TDPBUSD as int32 sums
 * of byte products, wrapping. Tile shapes come from the configuration (palette 1). */
#ifndef HAL_CPU_AMX_H
#define HAL_CPU_AMX_H
#include <stdint.h>
#include <string.h>

enum { AMX_NONE = 0, AMX_NATIVE = 1, AMX_EMULATED = 2, AMX_REFUSED = 3 };  /* hal_amx_state() */

#if defined(HAL_AMX_EMULATE)
#include <stdio.h>
#include <stdlib.h>
#define HAL_AMX 1
#define HAL_AMX_INT8 1
#define HAL_AMX_NATIVE 0
typedef struct {
    uint8_t row[16][64];
    int rows, colsb;
} amx_model_tile;
static _Thread_local amx_model_tile amx_model[8];

static inline void amx_model_config(const uint8_t *cfg) {
    for (int t = 0; t < 8; t++) {
        uint16_t cb;
        memcpy(&cb, cfg + 16 + 2 * t, 2);
        amx_model[t].colsb = cb;
        amx_model[t].rows = cfg[48 + t];
        memset(amx_model[t].row, 0, sizeof amx_model[t].row);
    }
}
static inline void amx_model_load(int t, const void *base, int64_t stride) {
    amx_model_tile *x = &amx_model[t];
    memset(x->row, 0, sizeof x->row);
    for (int r = 0; r < x->rows; r++) memcpy(x->row[r], (const uint8_t *)base + r * stride, (size_t)x->colsb);
}
static inline void amx_model_store(int t, void *base, int64_t stride) {
    const amx_model_tile *x = &amx_model[t];
    for (int r = 0; r < x->rows; r++) memcpy((uint8_t *)base + r * stride, x->row[r], (size_t)x->colsb);
}
/* the shapes a tile product needs (the hardware faults otherwise): A's dim groups = B's rows, C's
 * rows = A's, C's columns = B's */
static inline void amx_model_shapes(const amx_model_tile *C, const amx_model_tile *A, const amx_model_tile *B) {
    if (A->colsb / 4 != B->rows || C->rows != A->rows || C->colsb != B->colsb || !C->rows || !B->rows) {
        fprintf(stderr, "hal amx model: tile product of shapes C %dx%d, A %dx%d, B %dx%d\n", C->rows, C->colsb,
                A->rows, A->colsb, B->rows, B->colsb);
        abort();
    }
}
static inline float amx_model_bf16(const uint8_t *p) {  /* denormals read as zero */
    uint16_t b;
    memcpy(&b, p, 2);
    if ((b & 0x7f80) == 0) b &= 0x8000;
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void amx_model_dpbf16ps(int c, int a, int b) {
    amx_model_tile *C = &amx_model[c];
    const amx_model_tile *A = &amx_model[a], *B = &amx_model[b];
    amx_model_shapes(C, A, B);
    for (int m = 0; m < C->rows; m++) {
        float acc[16];
        memcpy(acc, C->row[m], sizeof acc);
        for (int k = 0; k < A->colsb / 4; k++)
            for (int n = 0; n < C->colsb / 4; n++) {
                acc[n] += amx_model_bf16(A->row[m] + 4 * k) * amx_model_bf16(B->row[k] + 4 * n);
                acc[n] += amx_model_bf16(A->row[m] + 4 * k + 2) * amx_model_bf16(B->row[k] + 4 * n + 2);
            }
        memcpy(C->row[m], acc, sizeof acc);
    }
}
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
/* TDPBSUD / TDPBUSD: C (int32) += A . B over groups of four bytes, signed A and unsigned B or the
 * reverse; the sums wrap as the instructions' do */
static inline void amx_model_dpb(int c, int a, int b, int a_signed) {
    amx_model_tile *C = &amx_model[c];
    const amx_model_tile *A = &amx_model[a], *B = &amx_model[b];
    amx_model_shapes(C, A, B);
    for (int m = 0; m < C->rows; m++) {
        uint32_t acc[16];
        memcpy(acc, C->row[m], sizeof acc);
        for (int k = 0; k < A->colsb / 4; k++)
            for (int n = 0; n < C->colsb / 4; n++)
                for (int i = 0; i < 4; i++) {
                    const int x = a_signed ? (int8_t)A->row[m][4 * k + i] : A->row[m][4 * k + i];
                    const int y = a_signed ? B->row[k][4 * n + i] : (int8_t)B->row[k][4 * n + i];
                    acc[n] += (uint32_t)(x * y);
                }
        memcpy(C->row[m], acc, sizeof acc);
    }
}
#undef _tile_dpbsud
#undef _tile_dpbusd
#define _tile_dpbsud(c, a, b) amx_model_dpb(c, a, b, 1)
#define _tile_dpbusd(c, a, b) amx_model_dpb(c, a, b, 0)
#define _tile_loadconfig(cfg) amx_model_config((const uint8_t *)(cfg))
#define _tile_release() ((void)0)
#define _tile_loadd(t, base, stride) amx_model_load(t, base, stride)
#define _tile_stored(t, base, stride) amx_model_store(t, base, stride)
#define _tile_zero(t) memset(amx_model[t].row, 0, sizeof amx_model[t].row)
#define _tile_dpbf16ps(c, a, b) amx_model_dpbf16ps(c, a, b)
static inline int amx_grant(void) { return AMX_EMULATED; }

#elif defined(__AMX_TILE__) && defined(__AMX_BF16__) && !defined(HAL_AMX_OFF)
#define HAL_AMX 1
#if defined(__AMX_INT8__)
#define HAL_AMX_INT8 1
#else
#define HAL_AMX_INT8 0
#endif
#define HAL_AMX_NATIVE 1
#include <immintrin.h>
#include <sys/syscall.h>
long syscall(long number, ...);              /* <unistd.h> declares it only with _DEFAULT_SOURCE */
/* gcc 12's tileloadd asm does not say that it reads memory (only tilestored has a "memory" clobber),
 * and its ldtilecfg names only the configuration's first 8 bytes, so the stores that fill a staging
 * buffer, a local array or the configuration before them could legally be dropped or moved after
 * them; these say what they read. (The C model calls real functions and cannot show this.) */
#undef _tile_loadd
#define _tile_loadd(dst, base, stride)                                                                  \
    __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #dst "|tileloadd\t%%tmm" #dst ", [%0+%1*1]}"     \
                     ::"r"((const void *)(base)), "r"((long)(stride)) : "memory")
#define _tile_loadconfig(cfg) __asm__ volatile("ldtilecfg\t%0" ::"m"(*(const uint8_t(*)[64])(cfg)))
static inline int amx_grant(void) {  /* once per process: Linux lends tile state only on request */
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0
                         ? AMX_NATIVE : AMX_REFUSED;
    return state;
}

#else
#define HAL_AMX 0
#define HAL_AMX_INT8 0
#define HAL_AMX_NATIVE 0
static inline int amx_grant(void) { return AMX_NONE; }
#endif

#if HAL_AMX
/* tile t: rows[t] rows of colsb[t] bytes (palette 1); per thread, before its tiles */
static inline void amx_configure_shapes(const uint8_t rows[8], const uint16_t colsb[8]) {
    uint8_t cfg[64] __attribute__((aligned(64)));
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1;
    for (int t = 0; t < 8; t++) {
        memcpy(cfg + 16 + 2 * t, &colsb[t], 2);
        cfg[48 + t] = rows[t];
    }
    _tile_loadconfig(cfg);
}
static inline void amx_configure(void) {  /* the bf16 paths: every tile 16 rows x 64 bytes */
    static const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 16, 16};
    static const uint16_t colsb[8] = {64, 64, 64, 64, 64, 64, 64, 64};
    amx_configure_shapes(rows, colsb);
}
#endif
#endif
