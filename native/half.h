/* fp16 <-> float in plain C, exactly (subnormals, infinities and NaNs too, rounding to nearest even): the
 * portable kernels', the head quantizer's (pack.c, both ways) and the fp16 KV cache's; the AVX2 and AVX-512
 * kernels convert with F16C, which gives the same bits. */
#ifndef FROMAGE_HALF_H
#define FROMAGE_HALF_H
#include <stdint.h>

static inline float fm_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, f = h & 1023;
    union { uint32_t u; float x; } v;
    if (e == 0) { v.x = (float)f * 5.9604645e-8f; v.u |= sign; return v.x; } /* zero, subnormal */
    v.u = sign | (e == 31 ? 0x7F800000u | (f << 13) : ((e + 112) << 23) | (f << 13));
    return v.x;
}

static inline uint16_t fm_float_to_half(float x) {
    union { float x; uint32_t u; } v = {x};
    const uint16_t sign = (uint16_t)((v.u >> 16) & 0x8000);
    const uint32_t a = v.u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return sign | 0x7C00 | (a > 0x7F800000u ? 0x200 | ((a >> 13) & 0x3FF) : 0); /* inf, NaN */
    if (a >= 0x477FF000u) return sign | 0x7C00;  /* rounds past 65504: infinity */
    if (a < 0x38800000u) {                       /* below 2^-14: a subnormal half (or zero) */
        union { uint32_t u; float x; } s = {a};
        s.x += 0.5f;                             /* the float adder rounds to the half's 2^-24 step, to even */
        return sign | (uint16_t)(s.u - 0x3F000000u);
    }
    const uint32_t odd = (a >> 13) & 1;
    return sign | (uint16_t)((a + 0xC8000FFFu + odd) >> 13);  /* rebias the exponent by -112, round to even */
}
#endif
