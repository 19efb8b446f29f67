/* The decoder's AVX2 + FMA + F16C copy (kernels.h; chosen at run time by dispatch.c). */
#if defined(__x86_64__)
#define FM_ISA avx2
#define FM_ISA_AVX2 1
#include "kernels.h"
#include "decoder.c"
#include "kernels.c"
#include "head_top.c"
#include "bandwidth.c"
#endif
