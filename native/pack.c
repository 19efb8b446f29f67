/* Laying weights out for the kernels (load time, plain C for the baseline CPU): fp32 matrices and
 * MatMulNBits' 4/8-bit blocks in panels of 16 columns, and the 8-bit copy of an fp32 head with which
 * greedy and top-k rows find their candidates (fm_quantize8). */
#include <math.h>
#include <string.h>

#include "decode_thread.h"
#include "fromage_native.h"
#include "half.h"

void fm_pack(const float *src, int64_t K, int64_t N, float *dst) {
    const int64_t panels = (N + FM_PANEL - 1) / FM_PANEL;
    for (int64_t p = 0; p < panels; p++) {
        const int64_t n0 = p * FM_PANEL, width = N - n0 < FM_PANEL ? N - n0 : FM_PANEL;
        for (int64_t k = 0; k < K; k++) {
            float *d = dst + (p * K + k) * FM_PANEL;
            memcpy(d, src + k * N + n0, sizeof(float) * width);
            memset(d + width, 0, sizeof(float) * (FM_PANEL - width));
        }
    }
}

int fm_pack_nbits(const uint8_t *q, const uint16_t *dm, int64_t K, int64_t N, int32_t bits, uint8_t *dst) {
    if ((bits != 4 && bits != 8) || K <= 0 || K % FM_BLOCK || N <= 0) return -1;
    const int64_t nb = K / FM_BLOCK, panels = (N + FM_PANEL - 1) / FM_PANEL, block = FM_BLOCK * bits / 8,
                  record = 4 * FM_PANEL + FM_PANEL * block;
    memset(dst, 0, (size_t)(panels * nb * record));
    for (int64_t n = 0; n < N; n++) {
        const int64_t i = n % FM_PANEL;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *rec = dst + (n / FM_PANEL * nb + b) * record, *vectors = rec + 4 * FM_PANEL + 4 * i;
            uint16_t *h = (uint16_t *)rec;
            const uint8_t *blk = q + (n * nb + b) * block;
            h[i] = dm[n * 2 * nb + b], h[FM_PANEL + i] = dm[n * 2 * nb + nb + b];
            for (int k = 0; k < 16 * (bits / 4); k++) /* 4-bit: element k low, k + 16 high, in vector k / 4 */
                vectors[64 * (k / 4) + k % 4] = bits == 8 ? blk[k]
                    : (uint8_t)((blk[k / 2] >> (4 * (k & 1)) & 15) | (blk[(k + 16) / 2] >> (4 * (k & 1)) & 15) << 4);
        }
    }
    return 0;
}

/* The fp16 value nearest x on the side `up` (1: >= x, 0: <= x). */
static uint16_t half_toward(float x, int up) {
    uint16_t h = fm_float_to_half(x);
    const float v = fm_half_to_float(h);
    if (up ? v >= x : v <= x) return h;
    const int away = (v < x) == !(h & 0x8000);  /* a step away from zero grows |v| */
    if ((h & 0x7FFF) == 0) return up ? 1 : 0x8001;
    return (uint16_t)(away ? h + 1 : h - 1);
}

static int quantize8(const float *w, int64_t K, int64_t N, uint8_t *q, uint16_t *dm, float *bound) {
    if (K <= 0 || K % FM_BLOCK || N <= 0) return -1;
    const int64_t nb = K / FM_BLOCK;
    /* 16 columns at a time, so that each row of w is read as a run of 16 floats, not one float a line */
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t n0 = 0; n0 < N; n0 += FM_PANEL) {
        const int width = N - n0 < FM_PANEL ? (int)(N - n0) : FM_PANEL;
        double err[FM_PANEL] = {0}, top[FM_PANEL] = {0};
        for (int64_t b = 0; b < nb; b++) {
            float lo[FM_PANEL], hi[FM_PANEL];
            for (int i = 0; i < width; i++) lo[i] = INFINITY, hi[i] = -INFINITY;
            for (int k = 0; k < FM_BLOCK; k++)
                for (int i = 0; i < width; i++) {
                    const float v = w[(b * FM_BLOCK + k) * N + n0 + i];
                    lo[i] = v < lo[i] ? v : lo[i], hi[i] = v > hi[i] ? v : hi[i];
                }
            double m[FM_PANEL], d[FM_PANEL];
            for (int i = 0; i < width; i++) {
                const int64_t n = n0 + i;
                const uint16_t mh = half_toward(lo[i], 0);
                const uint16_t dh = half_toward((float)(((double)hi[i] - fm_half_to_float(mh)) / 255.), 1);
                m[i] = fm_half_to_float(mh), d[i] = fm_half_to_float(dh);
                dm[n * 2 * nb + b] = dh, dm[n * 2 * nb + nb + b] = mh;
                top[i] = 255. * d[i] + fabs(m[i]) > top[i] ? 255. * d[i] + fabs(m[i]) : top[i];
            }
            for (int k = 0; k < FM_BLOCK; k++)
                for (int i = 0; i < width; i++) {
                    const double v = w[(b * FM_BLOCK + k) * N + n0 + i];
                    const double r = d[i] > 0. ? nearbyint((v - m[i]) / d[i]) : 0.;
                    const uint8_t u = (uint8_t)(r < 0. ? 0. : r > 255. ? 255. : r);
                    q[((n0 + i) * nb + b) * FM_BLOCK + k] = u;
                    const double e = fabs(v - (d[i] * u + m[i]));
                    err[i] = e > err[i] ? e : err[i];
                }
        }
        for (int i = 0; i < width; i++)  /* rounded up to floats: bounds */
            bound[n0 + i] = nextafterf((float)err[i], INFINITY), bound[N + n0 + i] = nextafterf((float)top[i], INFINITY);
    }
    return 0;
}

typedef struct {
    const float *w;
    int64_t K, N;
    uint8_t *q;
    uint16_t *dm;
    float *bound;
    int rc;
} quantize8_call;

static void quantize8_job(void *a) {
    quantize8_call *c = a;
    c->rc = quantize8(c->w, c->K, c->N, c->q, c->dm, c->bound);
}

int fm_quantize8(const float *w, int64_t K, int64_t N, uint8_t *q, uint16_t *dm, float *bound) {
    quantize8_call c = {w, K, N, q, dm, bound, 0};
    fm_on_decode_thread(quantize8_job, &c);  /* its team too (decode_thread.c) */
    return c.rc;
}
