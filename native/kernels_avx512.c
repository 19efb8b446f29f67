/* The decoder's AVX-512 (F/BW/VL/DQ + VNNI) copy (kernels.h; chosen at run time by dispatch.c). */
#if defined(__x86_64__)
#define FM_ISA avx512
#define FM_ISA_AVX512 1
#include "kernels.h"
#include "decoder.c"
#include "kernels.c"
#include "head_top.c"
#include "bandwidth.c"
#endif
