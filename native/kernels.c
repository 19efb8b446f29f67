/* The linear layers: fp32 (K, N) matrices, and MatMulNBits' 4/8-bit blocks (met by int16-rounded activations).
 *
 * Batch-1 decoding reads every weight once per token, so these loops are about streaming memory:
 * each thread walks a contiguous stretch of the matrix front to back. Prefill (T > 1) reuses each
 * weight for 6 tokens from registers. */
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <omp.h>

#include "kernels.h"

/* Grow-only, per calling thread, kept for the thread's lifetime (for a prefill, one fp32 matrix in panels:
 * 7 MB for the default model's largest). */
static _Thread_local float *scratch_buf[2];
static _Thread_local size_t scratch_cap[2];

float *fm_scratch(int slot, size_t floats) {
    if (floats > scratch_cap[slot]) {
        free(scratch_buf[slot]);
        size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
        scratch_buf[slot] = aligned_alloc(64, bytes);
        scratch_cap[slot] = scratch_buf[slot] ? floats : 0;
    }
    return scratch_buf[slot];
}

/* y += x[k0:k1] @ W[k0:k1, :] for W (K, N). Rows are taken four at a time, one from each quarter of
 * k0..k1: four long forward streams. A core's read bandwidth here is bounded by how far ahead its
 * prefetchers run per stream, so four concurrent streams read faster than one, and faster than four
 * adjacent rows (which, for a narrow matrix, are short streams that keep restarting): 576-wide
 * matrices went from ~10 to ~16 GB/s on one core. */
static void f32_rows(const float *W, int N, const float *x, int k0, int k1, float *y) {
    const int q = (k1 - k0) / 4;
    for (int k = k0; k < k0 + q; k++) {
        const float *w0 = W + (size_t)k * N, *w1 = w0 + (size_t)q * N, *w2 = w1 + (size_t)q * N, *w3 = w2 + (size_t)q * N;
        const float a0 = x[k], a1 = x[k + q], a2 = x[k + 2 * q], a3 = x[k + 3 * q];
        int n = 0;
#ifdef FM_AVX2
        const __m256 x0 = _mm256_set1_ps(a0), x1 = _mm256_set1_ps(a1), x2 = _mm256_set1_ps(a2), x3 = _mm256_set1_ps(a3);
        for (; n + 8 <= N; n += 8) {
            __m256 acc = _mm256_loadu_ps(y + n);
            acc = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + n), acc);
            acc = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + n), acc);
            acc = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w2 + n), acc);
            acc = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w3 + n), acc);
            _mm256_storeu_ps(y + n, acc);
        }
#endif
        for (; n < N; n++) y[n] += a0 * w0[n] + a1 * w1[n] + a2 * w2[n] + a3 * w3[n];
    }
    for (int k = k0 + 4 * q; k < k1; k++) fm_axpy(x[k], W + (size_t)k * N, y, N);
}

/* How one token's fp32 matrix is shared: its K rows of row_bytes, cut into pieces of about
 * PIECE_BYTES (a multiple of 4 rows; the same number per thread) dealt to the threads in turn, so
 * that the threads read memory near each other: against one contiguous half per thread, ~5-9 % faster
 * on the default model here (3 of 4 same-process A/B runs; the 4th -2 %), as the streaming reads of
 * `fromage bench` show too. Returns the rows per piece. */
enum { PIECE_BYTES = 256 << 10 };

static int piece_rows(int K, size_t row_bytes, int threads) {
    const size_t per_round = (size_t)threads * PIECE_BYTES;
    const size_t pieces = ((size_t)K * row_bytes + per_round - 1) / per_round * threads;
    return (int)(((size_t)K + pieces - 1) / pieces + 3) / 4 * 4;
}

/* One token through an fp32 matrix: the rows split between threads (the LM head too: splitting its
 * columns instead made each thread hop between 4 KiB pieces of 576 rows, ~18 % slower); each thread
 * sums a partial y, then the partials are added. */
static int f32_gemv(const fm_linear *L, const float *x, float *y, int accumulate) {
    const int K = L->K, N = L->N, threads = omp_get_max_threads();
    float *part = fm_scratch(0, (size_t)threads * N);
    if (!part) return -2;
#pragma omp parallel
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int rows = piece_rows(K, sizeof(float) * N, nt);
        float *p = part + (size_t)id * N;
        memset(p, 0, sizeof(float) * N);
        for (int k0 = id * rows; k0 < K; k0 += nt * rows) f32_rows(L->w, N, x, k0, k0 + rows < K ? k0 + rows : K, p);
#pragma omp barrier
        const int cols = ((N + nt - 1) / nt + 7) / 8 * 8, n0 = id * cols, n1 = n0 + cols < N ? n0 + cols : N;
        for (int t = 0; t < nt; t++)  /* y[n0:n1] (+)= the sum of the partials, in vectorisable loops */
            if (t == 0 && !accumulate) memcpy(y + n0, part + n0, sizeof(float) * (n1 > n0 ? n1 - n0 : 0));
            else for (int n = n0; n < n1; n++) y[n] += part[(size_t)t * N + n];
    }
    return 0;
}

/* Several tokens: y[t][0:width] (+)= x[t] @ P[:, 0:width] for a panel P (K rows, row stride ldp) of at
 * most 16 columns, in tiles of 6 tokens x 16 columns held in registers (12 accumulators). */
enum { TILE_T = 6, PANEL = 16 };

static void gemm_panel(const float *P, size_t ldp, int width, const float *x, int T, int K, float *y, int ldy,
                       int accumulate) {
    for (int t0 = 0; t0 < T; t0 += TILE_T) {
        const int rows = T - t0 < TILE_T ? T - t0 : TILE_T;
        const float *xr[TILE_T];
        for (int r = 0; r < TILE_T; r++) xr[r] = x + (size_t)(t0 + (r < rows ? r : 0)) * K;
        float out[TILE_T][PANEL];
#ifdef FM_AVX2
        if (width == PANEL) {
            __m256 a[TILE_T][2];
            for (int r = 0; r < TILE_T; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
            for (int k = 0; k < K; k++) {
                const float *w = P + (size_t)k * ldp;
                __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
                for (int r = 0; r < TILE_T; r++) {
                    __m256 xb = _mm256_broadcast_ss(xr[r] + k);
                    a[r][0] = _mm256_fmadd_ps(xb, w0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(xb, w1, a[r][1]);
                }
            }
            for (int r = 0; r < TILE_T; r++) _mm256_storeu_ps(out[r], a[r][0]), _mm256_storeu_ps(out[r] + 8, a[r][1]);
        } else
#endif
        {
            memset(out, 0, sizeof out);
            for (int k = 0; k < K; k++)
                for (int r = 0; r < TILE_T; r++) fm_axpy(xr[r][k], P + (size_t)k * ldp, out[r], width);
        }
        for (int r = 0; r < rows; r++) {
            float *yr = y + (size_t)(t0 + r) * ldy;
            for (int j = 0; j < width; j++) yr[j] = (accumulate ? yr[j] : 0.f) + out[r][j];
        }
    }
}

/* The matrix is first copied into panels of 16 columns (panel-major: each panel's K rows of 16
 * contiguous), the threads splitting the rows, so that W is read front to back; then the threads
 * split the panels and the tiles walk each panel row by row. (Copying a few panels at a time instead,
 * each row a 256-byte run at a stride of N floats, made a 32-token fp32 prefill ~2.5x slower.) */
static int f32_gemm(const fm_linear *L, const float *x, int T, float *y, int accumulate) {
    const int K = L->K, N = L->N, panels = (N + PANEL - 1) / PANEL;
    float *packed = fm_scratch(0, (size_t)K * panels * PANEL);
    if (!packed) return -2;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int k = 0; k < K; k++)
            for (int p = 0; p < panels; p++) {
                const int n = p * PANEL, width = N - n < PANEL ? N - n : PANEL;
                memcpy(packed + ((size_t)p * K + k) * PANEL, L->w + (size_t)k * N + n, sizeof(float) * width);
            }
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            const int n = p * PANEL, width = N - n < PANEL ? N - n : PANEL;
            gemm_panel(packed + (size_t)p * K * PANEL, PANEL, width, x, T, K, y + n, N, accumulate);
        }
    }
    return 0;
}

/* ---- 4/8-bit blocks (one record per column) ---------------------------------------------------- */
/* Column n is one record: nb = K/32 scales d and minimums m (fp16), then nb blocks of 32 unsigned q
 * (MatMulNBits' packing: 4-bit two per byte, element 2i in the low nibble; 8-bit one per byte);
 * weight = d * q + m. So
 *     x . w_column = sum_b d * (x_b . q_b) + sum_b m * S_b,   S_b = the sum of x over block b,
 * the second sum being one short dot product per column. (d, m) in fp16 lose nothing for GGUF grids.
 * A column's scales sit next to its blocks, so that a column is one stretch of memory (with the
 * scales in an array of their own, a second stream, the same kernel was ~7-16 % slower).
 *
 * For x_b . q_b the AVX2 path rounds each block of x to int16 with its own scale sx_b (relative error
 * <= 2^-16 of the block's largest |x|: logits move by ~1e-5, not the ~3 % of int8 activations) and
 * multiplies with pmaddwd: 4x fewer instructions per weight than converting every weight to fp32. */

static inline size_t record_bytes(const fm_linear *L) { return (size_t)L->K / FM_BLOCK * (4 + FM_BLOCK * L->bits / 8); }
static inline const uint16_t *record_dm(const fm_linear *L, int n) {
    return (const uint16_t *)(L->q + (size_t)n * record_bytes(L));
}
static inline const uint8_t *record_q(const fm_linear *L, int n) {
    return L->q + (size_t)n * record_bytes(L) + (size_t)4 * (L->K / FM_BLOCK);
}

static inline float half_to_float(uint16_t h) {
#ifdef FM_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, f = h & 1023;
    union { uint32_t u; float x; } v;
    if (e == 0) { v.x = (float)f * 5.9604645e-8f; v.u |= sign; return v.x; } /* zero, subnormal */
    v.u = sign | (e == 31 ? 0x7F800000u | (f << 13) : ((e + 112) << 23) | (f << 13));
    return v.x;
#endif
}

static inline float block_value(const uint8_t *q, int i, int bits) {
    return (float)(bits == 4 ? (i & 1 ? q[i / 2] >> 4 : q[i / 2] & 15) : q[i]);
}

#ifdef FM_AVX2
/* x16_b . q_b as 8 int32 lanes. 4-bit: x16 is [16 even | 16 odd] elements, matching the nibbles. */
static inline __m256i block_dot(const uint8_t *q, const int16_t *x16, int bits) {
    const __m256i *xv = (const __m256i *)x16;
    if (bits == 4) {
        __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(v, _mm256_set1_epi16(15)), _mm256_loadu_si256(xv)),
                                _mm256_madd_epi16(_mm256_srli_epi16(v, 4), _mm256_loadu_si256(xv + 1)));
    }
    __m256i v0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    __m256i v1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
    return _mm256_add_epi32(_mm256_madd_epi16(v0, _mm256_loadu_si256(xv)), _mm256_madd_epi16(v1, _mm256_loadu_si256(xv + 1)));
}

/* For one column: scale[b] = d_b * sx_b, and the minimums' term sum_b m_b * S_b (8 blocks at a time). */
static inline float column_scales(const uint16_t *dm, int nb, const float *sx, const float *sums, float *scale) {
    __m256 macc = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + b)));
        _mm256_storeu_ps(scale + b, _mm256_mul_ps(d, _mm256_loadu_ps(sx + b)));
        macc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + nb + b))),
                               _mm256_loadu_ps(sums + b), macc);
    }
    float mterm = hsum(macc);
    for (; b < nb; b++) scale[b] = _cvtsh_ss(dm[b]) * sx[b], mterm += _cvtsh_ss(dm[nb + b]) * sums[b];
    return mterm;
}

/* y[n] += x . w_n for columns n0..n1, four at a time (x shared), one from each quarter of the range:
 * the thread reads four forward streams, as f32_rows does (one stream: ~20 % slower, two threads). */
static inline __attribute__((always_inline)) void nbits_columns(const fm_linear *L, int n0, int n1, const int16_t *x16,
                                                                const float *sx, const float *sums, float *y,
                                                                const int bits) {
    const int nb = L->K / FM_BLOCK, qb = FM_BLOCK * bits / 8, quarter = (n1 - n0) / 4;
    float scale[4][nb];
    for (int i = 0; i < quarter; i++) {
        const int n[4] = {n0 + i, n0 + i + quarter, n0 + i + 2 * quarter, n0 + i + 3 * quarter};
        const uint8_t *col[4];
        float m[4];
        __m256 acc[4];
        for (int j = 0; j < 4; j++) {
            m[j] = column_scales(record_dm(L, n[j]), nb, sx, sums, scale[j]);
            col[j] = record_q(L, n[j]), acc[j] = _mm256_setzero_ps();
        }
        for (int b = 0; b < nb; b++) {
            const int16_t *xb = x16 + (size_t)b * FM_BLOCK;
            for (int j = 0; j < 4; j++)
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(col[j] + (size_t)b * qb, xb, bits)),
                                         _mm256_broadcast_ss(scale[j] + b), acc[j]);
        }
        for (int j = 0; j < 4; j++) y[n[j]] += hsum(acc[j]) + m[j];
    }
    for (int n = n0 + 4 * quarter; n < n1; n++) {
        const uint8_t *col = record_q(L, n);
        const float m = column_scales(record_dm(L, n), nb, sx, sums, scale[0]);
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++)
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(col + (size_t)b * qb, x16 + (size_t)b * FM_BLOCK, bits)),
                                  _mm256_broadcast_ss(scale[0] + b), acc);
        y[n] += hsum(acc) + m;
    }
}

/* Per block: S_b, sx_b and x16_b (4-bit: de-interleaved to [even | odd]); rounding to nearest even. */
static void nbits_prepare(const float *x, int K, int bits, float *sums, float *sx, int16_t *x16) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int b = 0; b < K / FM_BLOCK; b++) {
        const float *xb = x + (size_t)b * FM_BLOCK;
        const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
                     v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        sums[b] = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
        sx[b] = top / 32767.f;
        const __m256 scale = _mm256_set1_ps(top > 0.f ? 32767.f / top : 0.f);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, scale)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, scale));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, scale)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, scale));
        if (bits == 4) { /* (i0, i1) -> even elements 0..14 and odd 1..15 of the block; (i2, i3) -> 16..31 */
#define PICK(a, b, imm) _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps( \
            _mm256_castsi256_ps(a), _mm256_castsi256_ps(b), imm)), 0xD8)
            const __m256i e01 = PICK(i0, i1, 0x88), o01 = PICK(i0, i1, 0xDD), e23 = PICK(i2, i3, 0x88),
                          o23 = PICK(i2, i3, 0xDD);
#undef PICK
            i0 = e01, i1 = e23, i2 = o01, i3 = o23;
        }
        /* packs interleaves 128-bit halves; the permute puts the 16 values back in order */
        _mm256_storeu_si256((__m256i *)(x16 + (size_t)b * FM_BLOCK), _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8));
        _mm256_storeu_si256((__m256i *)(x16 + (size_t)b * FM_BLOCK + 16),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8));
    }
}
#endif

/* One token: the columns split between threads, a contiguous half each (pieces dealt in turn, as
 * f32_gemv does, were ~7 % slower here). */
static int nbits_gemv(const fm_linear *L, const float *x, float *y, int accumulate) {
    const int K = L->K, N = L->N, nb = K / FM_BLOCK;
    float *sums = fm_scratch(0, (size_t)2 * nb + K / 2 + 16);
    if (!sums) return -2;
#ifdef FM_AVX2
    float *sx = sums + nb;
    int16_t *x16 = (int16_t *)(sx + nb + (16 - 2 * nb % 16) % 16);  /* 64-byte aligned */
    nbits_prepare(x, K, L->bits, sums, sx, x16);
#else
    for (int b = 0; b < nb; b++) {
        sums[b] = 0.f;
        for (int i = 0; i < FM_BLOCK; i++) sums[b] += x[(size_t)b * FM_BLOCK + i];
    }
#endif
#pragma omp parallel
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int chunk = ((N + nt - 1) / nt + 7) / 8 * 8, n0 = id * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        if (n0 < n1) {
            if (!accumulate) memset(y + n0, 0, sizeof(float) * (n1 - n0));
#ifdef FM_AVX2
            if (L->bits == 4) nbits_columns(L, n0, n1, x16, sx, sums, y, 4);
            else nbits_columns(L, n0, n1, x16, sx, sums, y, 8);
#else
            const int qb = FM_BLOCK * L->bits / 8;
            for (int n = n0; n < n1; n++)  /* portable path: fp32 products */
                for (int b = 0; b < nb; b++) {
                    const uint8_t *q = record_q(L, n) + (size_t)b * qb;
                    const uint16_t *dm = record_dm(L, n);
                    float p = 0.f;
                    for (int i = 0; i < FM_BLOCK; i++) p += block_value(q, i, L->bits) * x[(size_t)b * FM_BLOCK + i];
                    y[n] += half_to_float(dm[b]) * p + half_to_float(dm[nb + b]) * sums[b];
                }
#endif
        }
    }
    return 0;
}

/* w[0..32) = d * q + m for one block, in element order. */
static inline void dequantize_block(const uint8_t *q, float d, float m, int bits, float *w) {
#ifdef FM_AVX2
    __m128i lo, hi;  /* the block's 32 values as bytes, in order */
    if (bits == 4) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)q), low = _mm_set1_epi8(15);
        const __m128i a = _mm_and_si128(raw, low), b = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        lo = _mm_unpacklo_epi8(a, b), hi = _mm_unpackhi_epi8(a, b);
    } else {
        lo = _mm_loadu_si128((const __m128i *)q), hi = _mm_loadu_si128((const __m128i *)(q + 16));
    }
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++)
        _mm256_storeu_ps(w + 8 * i, _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), vm));
#else
    for (int i = 0; i < FM_BLOCK; i++) w[i] = d * block_value(q, i, bits) + m;
#endif
}

#ifdef FM_AVX2
/* r[i][j] <-> r[j][i] for 8 vectors of 8 floats. */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++)
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
}
#endif

/* Several tokens: each thread dequantizes 16 columns at a time into an fp32 panel (8 columns' blocks
 * transposed in registers into panel rows: storing each value on its own was ~1/3 of an int4 prefill),
 * then runs the fp32 tiles on it. */
static int nbits_gemm(const fm_linear *L, const float *x, int T, float *y, int accumulate) {
    const int K = L->K, N = L->N, nb = K / FM_BLOCK, qb = FM_BLOCK * L->bits / 8, panels = (N + PANEL - 1) / PANEL;
    float *buffers = fm_scratch(0, (size_t)omp_get_max_threads() * K * PANEL);
    if (!buffers) return -2;
#pragma omp parallel
    {
        float *panel = buffers + (size_t)omp_get_thread_num() * K * PANEL;
#pragma omp for schedule(static)
        for (int s = 0; s < panels; s++) {
            const int n0 = s * PANEL, width = N - n0 < PANEL ? N - n0 : PANEL;
            int j = 0;
#ifdef FM_AVX2
            for (; j + 8 <= width; j += 8)
                for (int b = 0; b < nb; b++) {
                    float w[8][FM_BLOCK];
                    for (int c = 0; c < 8; c++) {
                        const uint16_t *dm = record_dm(L, n0 + j + c);
                        dequantize_block(record_q(L, n0 + j + c) + (size_t)b * qb, half_to_float(dm[b]),
                                         half_to_float(dm[nb + b]), L->bits, w[c]);
                    }
                    for (int g = 0; g < FM_BLOCK; g += 8) {
                        __m256 r[8];
                        for (int c = 0; c < 8; c++) r[c] = _mm256_loadu_ps(w[c] + g);
                        transpose8(r);
                        for (int i = 0; i < 8; i++) _mm256_storeu_ps(panel + (size_t)(b * FM_BLOCK + g + i) * PANEL + j, r[i]);
                    }
                }
#endif
            for (; j < width; j++)
                for (int b = 0; b < nb; b++) {
                    const uint8_t *q = record_q(L, n0 + j) + (size_t)b * qb;
                    const uint16_t *dm = record_dm(L, n0 + j);
                    float w[FM_BLOCK], *col = panel + (size_t)b * FM_BLOCK * PANEL + j;
                    dequantize_block(q, half_to_float(dm[b]), half_to_float(dm[nb + b]), L->bits, w);
                    for (int i = 0; i < FM_BLOCK; i++) col[i * PANEL] = w[i];
                }
            gemm_panel(panel, PANEL, width, x, T, K, y + n0, N, accumulate);
        }
    }
    return 0;
}

int fm_linear_forward(const fm_linear *L, const float *x, int T, float *y, int accumulate) {
    if (L->kind == FM_F32) {
        return T == 1 ? f32_gemv(L, x, y, accumulate) : f32_gemm(L, x, T, y, accumulate);
    }
    return T == 1 ? nbits_gemv(L, x, y, accumulate) : nbits_gemm(L, x, T, y, accumulate);
}
