/* Vector helpers shared by the cpu backend's AVX-512 kernels. */
#ifndef HAL_CPU_SIMD_H
#define HAL_CPU_SIMD_H
#if defined(__AVX512F__)
#include <immintrin.h>

/* e^x for 16 floats, ~1 ulp: 2^(x log2 e) split into an integer power (scalef) and a degree-6
 * polynomial of the fraction in [-0.5, 0.5]; -inf (and anything below -104) gives 0. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* 2^t for 16 floats, within 2e-7 relative: an integer power (scalef: far below the range gives 0) and
 * a degree-5 polynomial of the fraction in [-0.5, 0.5] (a fit of 2^f weighted by 1 / 2^f). For the
 * prefill's unmasked tiles, where no -inf needs to map to 0. */
static inline __m512 exp2_512(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.326091491e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.670180643e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550712235e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402222420e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470026e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000049f));
    return _mm512_scalef_ps(p, n);
}

/* softcap * tanh(x / softcap) = softcap * (1 - 2 / (e^(2x / softcap) + 1)) */
static inline __m512 softcap512(__m512 x, float softcap) {
    __m512 e = exp512(_mm512_mul_ps(x, _mm512_set1_ps(2.f / softcap)));
    __m512 th = _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
    return _mm512_mul_ps(th, _mm512_set1_ps(softcap));
}
#endif
#endif
