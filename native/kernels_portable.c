/* The decoder's plain-C copy (kernels.h; chosen at run time by dispatch.c). */
#define FM_ISA portable
#define FM_ISA_PORTABLE 1
#include "kernels.h"
#include "decoder.c"
#include "kernels.c"
#include "head_top.c"
#include "bandwidth.c"

