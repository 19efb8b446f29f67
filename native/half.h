/* fp16 -> float in plain C, exactly (subnormals, infinities and NaNs too): the portable kernels' and the
 * head quantizer's (pack.c); the AVX2 and AVX-512 kernels convert with F16C. */
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
#endif
