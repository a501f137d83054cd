/* Vector helpers shared by the cpu backend's AVX-512 kernels. */
#ifndef HAL_CPU_SIMD_H
#define HAL_CPU_SIMD_H

/* fp32 without denormals inside a kernel call: each thread sets FTZ (results below 2^-126 become 0)
 * and DAZ (such inputs read as 0) in its MXCSR as it starts and puts the caller's bits back as it
 * ends. A softmax weight falls below 2^-126 where a score trails the row's max by more than 87 (in
 * units of the scaled logits), and on Intel CPUs every arithmetic step on such a value takes a
 * microcode assist. Measured on the Intel AMX VM (C harness, int8 B8 x 4096 in cache, 2
 * threads, 2026-11-29), on the harness's fixed pattern, whose fp16 row scales span 2^-24 .. 1 and so
 * its scores: 5.2-6.2 ms per layer without, 3.0-3.7 with; on N(0, 1) data (no such spread) 2.8-4.0
 * either way. A weight that small changes no fp32 sum that also holds the max's weight 1, and the bf16
 * dot products (VDPBF16PS, TDPBF16PS) read denormal inputs as zero already. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
static inline unsigned int hal_ftz_enter(void) {
    const unsigned int m = _mm_getcsr();
    _mm_setcsr(m | 0x8040u);             /* FTZ (bit 15) | DAZ (bit 6) */
    return m;
}
static inline void hal_ftz_leave(unsigned int m) { _mm_setcsr(m); }
#else
static inline unsigned int hal_ftz_enter(void) { return 0; }
static inline void hal_ftz_leave(unsigned int m) { (void)m; }
#endif
#if defined(__AVX512F__)
#include <immintrin.h>

/* 2^t for 16 floats: an integer power (scalef: far below the range gives 0) times a polynomial of the
 * fraction in [-0.5, 0.5], c[0] its highest coefficient, k of them */
static inline __m512 pow2_512(__m512 t, const float *c, int k) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < k; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

/* e^x for 16 floats, ~1 ulp: 2^(x log2 e) with a degree-6 polynomial; -inf (and anything below -104)
 * gives 0 */
static inline __m512 exp512(__m512 x) {
    static const float c[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                               5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.f};
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    return pow2_512(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), c, 7);
}

/* 2^t for 16 floats, within 2e-7 relative: a degree-5 polynomial (a fit of 2^f weighted by 1 / 2^f).
 * For the prefill's unmasked tiles, where no -inf needs to map to 0. */
static inline __m512 exp2_512(__m512 t) {
    static const float c[6] = {1.326091491e-3f, 9.670180643e-3f, 5.550712235e-2f, 2.402222420e-1f,
                               6.931470026e-1f, 1.000000049f};
    return pow2_512(t, c, 6);
}

/* softcap * tanh(x / softcap) = softcap * (1 - 2 / (e^(2x / softcap) + 1)) */
static inline __m512 softcap512(__m512 x, float softcap) {
    __m512 e = exp512(_mm512_mul_ps(x, _mm512_set1_ps(2.f / softcap)));
    __m512 th = _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
    return _mm512_mul_ps(th, _mm512_set1_ps(softcap));
}
#endif
#endif
