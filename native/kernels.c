/* The linear layers: fp32 matrices (panels of 16 columns), and MatMulNBits' 4/8-bit blocks (one
 * record per output column, met by int16-rounded activations).
 *
 * Batch-1 decoding reads every weight once per token, so these loops are about streaming memory: the
 * threads claim chunks of output columns and read each chunk front to back. Several rows (a batched
 * step, a prompt) reuse each loaded weight for every row from registers and cache. */
#include "kernels.h"
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <omp.h>

/* One token: a matrix's columns are shared out in chunks of about CHUNK_BYTES of weights, each thread
 * claiming the next chunk from a counter when it is done with one. The two cores' speeds differ from
 * moment to moment on shared machines, so with a fixed split one waited ~1-2 ms per token for the
 * other; claimed chunks keep both reading until the matrix is done (default model: ~6 % faster than
 * the fixed split of rows, over 600 paired passes). Each output column is summed by one thread in a
 * fixed order, so the result does not depend on which thread took it. */
enum { CHUNK_BYTES = 128 << 10 };

static int chunk_columns(size_t column_bytes, int N, int threads) {
    const size_t bytes = column_bytes * N;
    int chunks = (int)((bytes + CHUNK_BYTES - 1) / CHUNK_BYTES);
    chunks = (chunks + threads - 1) / threads * threads;  /* whole rounds: a small matrix is one chunk per thread */
    return ((N + chunks - 1) / chunks + 3) / 4 * 4;
}

/* Runs body(n0, n1) over [0, N) in chunks of `chunk` columns claimed by OpenMP's threads. */
#define FOR_CLAIMED_CHUNKS(N, chunk, n0, n1, body)                                 \
    do {                                                                           \
        int next_ = 0;                                                             \
        _Pragma("omp parallel") for (;;) {                                         \
            const int n0 = __atomic_fetch_add(&next_, (chunk), __ATOMIC_RELAXED);  \
            if (n0 >= (N)) break;                                                  \
            const int n1 = n0 + (chunk) < (N) ? n0 + (chunk) : (N);                \
            body;                                                                  \
        }                                                                          \
    } while (0)

/* ---- fp32 matrices, in panels of 16 columns ------------------------------------------------------- */
/* An fp32 matrix (K, N) is laid out by fm_pack as panels: panel p holds the columns 16p..16p+15 as K
 * rows of 16 floats (the last panel zero-padded), so a 64-byte load is one k of 16 columns and a
 * panel is one forward stream. Every kernel here sums an output in one vector lane, acc = fma(x[k],
 * w[k], acc) for k ascending from 0, then adds it to y when accumulating: a row's result is the same
 * bits whatever else is in the call — other rows, one token or a prompt — and on the AVX-512 and AVX2
 * copies alike. Rows meet each loaded weight vector in registers (outer products, no horizontal
 * sums), x transposed first (xt[k * ldx + r]) so that the values a k needs are one line. */
enum { PANEL = FM_PANEL };
#if defined(FM_AVX512)
/* 2 panels x 12 rows: 24 accumulators of the 32 registers (a 16-row step: ~180 GFLOP/s of the 2 cores'
 * ~234 with the weights from memory; dot products per column with a horizontal sum: ~125) */
#define F32_PANELS 2
#define F32_ROWS 12
#define F32_PREFETCH 32
typedef __m512 f32_vec;
#define VEC_PER_PANEL 1
#define VEC_LOAD(p) _mm512_loadu_ps(p)
#define VEC_ZERO() _mm512_setzero_ps()
#define VEC_FMA(x, w, a) _mm512_fmadd_ps(_mm512_set1_ps(x), w, a)
#elif defined(FM_AVX2)
#define F32_PANELS 1
#define F32_ROWS 6  /* 12 accumulators of the 16 registers */
#define F32_PREFETCH 0
typedef __m256 f32_vec;
#define VEC_PER_PANEL 2
#define VEC_LOAD(p) _mm256_loadu_ps(p)
#define VEC_ZERO() _mm256_setzero_ps()
#define VEC_FMA(x, w, a) _mm256_fmadd_ps(_mm256_set1_ps(x), w, a)
#else
#define F32_PANELS 1
#define F32_ROWS 4
#endif
#ifdef VEC_PER_PANEL
enum { VEC = PANEL / VEC_PER_PANEL };
#endif

/* y[r][16 p_j + i] (+)= sum_k xt[k * ldx + r] * panel_j[k][i] for r < R and the NP panels p_j = p + j * step
 * (columns past N are not written). */
static inline __attribute__((always_inline)) void f32_tile(const float *W, int K, int N, int p, int step, const int NP,
                                                           const float *xt, size_t ldx, const int R, float *y,
                                                           size_t ldy, int accumulate) {
    const float *w[4];
    for (int j = 0; j < NP; j++) w[j] = W + (size_t)(p + j * step) * K * PANEL;
#if defined(FM_AVX2)
    f32_vec a[F32_ROWS][4 * VEC_PER_PANEL];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NP * VEC_PER_PANEL; j++) a[r][j] = VEC_ZERO();
    for (int k = 0; k < K; k++) {
        f32_vec v[4 * VEC_PER_PANEL];
        for (int j = 0; j < NP; j++) {
            const float *wk = w[j] + (size_t)k * PANEL;
            if (F32_PREFETCH && R > 1) _mm_prefetch((const char *)(wk + F32_PREFETCH * PANEL), _MM_HINT_T0);
            for (int i = 0; i < VEC_PER_PANEL; i++) v[j * VEC_PER_PANEL + i] = VEC_LOAD(wk + i * VEC);
        }
        const float *xk = xt + (size_t)k * ldx;
        for (int r = 0; r < R; r++)
            for (int j = 0; j < NP * VEC_PER_PANEL; j++) a[r][j] = VEC_FMA(xk[r], v[j], a[r][j]);
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NP; j++) {
            const int n0 = (p + j * step) * PANEL;
            float *yr = y + r * ldy + n0, out[PANEL];
            for (int i = 0; i < VEC_PER_PANEL; i++) memcpy(out + i * VEC, &a[r][j * VEC_PER_PANEL + i], sizeof(f32_vec));
            for (int i = 0; i < PANEL && n0 + i < N; i++) yr[i] = accumulate ? yr[i] + out[i] : out[i];
        }
#else
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NP; j++) {
            float acc[PANEL] = {0};
            for (int k = 0; k < K; k++)
                for (int i = 0; i < PANEL; i++) acc[i] += xt[(size_t)k * ldx + r] * w[j][(size_t)k * PANEL + i];
            const int n0 = (p + j * step) * PANEL;
            float *yr = y + r * ldy + n0;
            for (int i = 0; i < PANEL && n0 + i < N; i++) yr[i] = accumulate ? yr[i] + acc[i] : acc[i];
        }
#endif
}

/* Rows 0..B of xt against the panels p + j * step (j < NP), F32_ROWS rows at a time. */
static inline __attribute__((always_inline)) void f32_rows_of(const float *W, int K, int N, int p, int step, const int NP,
                                                              const float *xt, size_t ldx, int B, float *y, size_t ldy,
                                                              int accumulate) {
    int r = 0;
#define TILE(R) f32_tile(W, K, N, p, step, NP, xt + r, ldx, R, y + r * ldy, ldy, accumulate)
    for (; r + F32_ROWS <= B; r += F32_ROWS) TILE(F32_ROWS);
    switch (B - r) {  /* a constant row count each, so the accumulators stay in registers */
#if F32_ROWS > 6
        case 11: TILE(11); break;
        case 10: TILE(10); break;
        case 9: TILE(9); break;
        case 8: TILE(8); break;
        case 7: TILE(7); break;
        case 6: TILE(6); break;
#endif
        case 5: TILE(5); break;
        case 4: TILE(4); break;
        case 3: TILE(3); break;
        case 2: TILE(2); break;
        case 1: TILE(1); break;
    }
#undef TILE
}

/* dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: 8 x 8 tiles transposed in registers. */
static void transpose_tile(const float *src, size_t ld_src, int rows, int cols, float *dst, size_t ld_dst) {
    int r = 0;
#ifdef FM_AVX2
    for (; r + 8 <= rows; r += 8) {
        int c = 0;
        for (; c + 8 <= cols; c += 8) {
            __m256 v[8];
            for (int i = 0; i < 8; i++) v[i] = _mm256_loadu_ps(src + (r + i) * ld_src + c);
            fm_transpose8(v);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + (c + i) * ld_dst + r, v[i]);
        }
        for (; c < cols; c++)
            for (int i = 0; i < 8; i++) dst[c * ld_dst + r + i] = src[(r + i) * ld_src + c];
    }
#endif
    for (; r < rows; r++)
        for (int c = 0; c < cols; c++) dst[c * ld_dst + r] = src[r * ld_src + c];
}

/* Rows are transposed in blocks of ROW_BLOCK: block j is xt + j * ROW_BLOCK * K, (K, its rows), so that a
 * block's values sit beside the chunk's panels in L2, and a long prompt's k-th values are not 4 KiB
 * apart (that put them all in two L1 sets: a 512-token prefill ran ~10 % slower). */
enum { ROW_BLOCK = 48 };

/* The panels p0..p1 of W for the B rows of xt. One row (a decode step of one sequence): four panels
 * at a time, one from each quarter of the range, so four forward streams (a core's read bandwidth is
 * bounded by how far ahead its prefetchers run per stream). Several rows: F32_PANELS panels from as
 * many parts of the range, every row group of a block of rows meeting them from cache. */
static void f32_panels(const float *W, int K, int N, int p0, int p1, const float *xt, int B, float *y, size_t ldy,
                       int accumulate) {
    int p = p0;
    if (B == 1) {
        const int q = (p1 - p0) / 4;
        for (; p < p0 + q; p++) f32_tile(W, K, N, p, q, 4, xt, 1, 1, y, ldy, accumulate);
        switch (p1 - (p = p0 + 4 * q)) {  /* the rest side by side too */
            case 3: f32_tile(W, K, N, p, 1, 3, xt, 1, 1, y, ldy, accumulate); break;
            case 2: f32_tile(W, K, N, p, 1, 2, xt, 1, 1, y, ldy, accumulate); break;
            case 1: f32_tile(W, K, N, p, 0, 1, xt, 1, 1, y, ldy, accumulate); break;
        }
        return;
    }
    const int part = (p1 - p0) / F32_PANELS;
    for (int r0 = 0; r0 < B; r0 += ROW_BLOCK) {
        const int rows = B - r0 < ROW_BLOCK ? B - r0 : ROW_BLOCK;
        const float *block = xt + (size_t)r0 * K;
        for (p = p0; p < p0 + part; p++)
            f32_rows_of(W, K, N, p, part, F32_PANELS, block, rows, rows, y + r0 * ldy, ldy, accumulate);
        for (p = p0 + F32_PANELS * part; p < p1; p++)
            f32_rows_of(W, K, N, p, 0, 1, block, rows, rows, y + r0 * ldy, ldy, accumulate);
    }
}

/* xt = x (B, K) transposed in blocks of rows (ROW_BLOCK). */
static void transpose_rows(const float *x, int B, int K, float *xt) {
#pragma omp parallel for schedule(static) if (B > ROW_BLOCK) /* one block: not worth waking a thread */
    for (int r0 = 0; r0 < B; r0 += ROW_BLOCK) {
        const int rows = B - r0 < ROW_BLOCK ? B - r0 : ROW_BLOCK;
        transpose_tile(x + (size_t)r0 * K, (size_t)K, rows, K, xt + (size_t)r0 * K, (size_t)rows);
    }
}

static int f32_linear(const fm_linear *L, const float *x, int B, float *y, size_t ldy, int accumulate) {
    const int K = L->K, N = L->N, panels = (N + PANEL - 1) / PANEL;
    const float *xt = x;  /* one row is its own transpose */
    if (B > 1) {
        float *t = fm_scratch(0, (size_t)B * K);
        if (!t) return -2;
        transpose_rows(x, B, K, t);
        xt = t;
    }
    const int threads = omp_get_max_threads(), fair = panels / (4 * threads);
    int chunk = (chunk_columns(sizeof(float) * K, N, threads) + PANEL / 2) / PANEL;
    if (B == 1 && chunk < 8 && fair > chunk) chunk = fair < 8 ? fair : 8;  /* two panels per stream, 4 chunks a thread */
    if (chunk < 1) chunk = 1;
    FOR_CLAIMED_CHUNKS(panels, chunk, p0, p1, f32_panels(L->w, K, N, p0, p1, xt, B, y, ldy, accumulate));
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
/* A block's 32 q as two vectors of 16 int16 (4-bit: [16 even | 16 odd] elements, the nibbles). */
static inline void block_unpack(const uint8_t *q, int bits, __m256i *lo, __m256i *hi) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    if (bits == 4) {
        *lo = _mm256_and_si256(v, _mm256_set1_epi16(15)), *hi = _mm256_srli_epi16(v, 4);
    } else {
        *lo = v, *hi = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
    }
}

/* x16_b . q_b as 8 int32 lanes, for the unpacked block (lo, hi); x16 ordered as block_unpack's q. */
static inline __m256i unpacked_dot(__m256i lo, __m256i hi, const int16_t *x16) {
    const __m256i *xv = (const __m256i *)x16;
    return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(xv)), _mm256_madd_epi16(hi, _mm256_loadu_si256(xv + 1)));
}

static inline __m256i block_dot(const uint8_t *q, const int16_t *x16, int bits) {
    __m256i lo, hi;
    block_unpack(q, bits, &lo, &hi);
    return unpacked_dot(lo, hi, x16);
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

enum { NBITS_ROWS = 2 };  /* rows per pass over a chunk: the unpacked blocks need registers too */

/* y[r][n] += x[r] . w_n for R rows (x16 (R, K), sx and sums (R, nb)) and columns n0..n1, four at a
 * time, one from each quarter of the range: the thread reads four forward streams, as f32_panels
 * does (one stream: ~20 % slower, two threads). Each block is unpacked once for all R rows; each row
 * sums in the one-row order. */
static inline __attribute__((always_inline)) void nbits_columns(const fm_linear *L, int n0, int n1, const int16_t *x16,
                                                                const float *sx, const float *sums, const int R,
                                                                float *y, size_t ldy, const int bits) {
    const int K = L->K, nb = K / FM_BLOCK, qb = FM_BLOCK * bits / 8, quarter = (n1 - n0) / 4;
    float scale[NBITS_ROWS][4][nb];
    for (int i = 0; i < quarter; i++) {
        const int n[4] = {n0 + i, n0 + i + quarter, n0 + i + 2 * quarter, n0 + i + 3 * quarter};
        const uint8_t *col[4];
        float m[NBITS_ROWS][4];
        __m256 acc[NBITS_ROWS][4];
        for (int j = 0; j < 4; j++) {
            col[j] = record_q(L, n[j]);
            for (int r = 0; r < R; r++) {
                m[r][j] = column_scales(record_dm(L, n[j]), nb, sx + (size_t)r * nb, sums + (size_t)r * nb, scale[r][j]);
                acc[r][j] = _mm256_setzero_ps();
            }
        }
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < 4; j++) {
                __m256i lo, hi;
                block_unpack(col[j] + (size_t)b * qb, bits, &lo, &hi);
                for (int r = 0; r < R; r++)
                    acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(unpacked_dot(lo, hi, x16 + (size_t)r * K + b * FM_BLOCK)),
                                                _mm256_broadcast_ss(scale[r][j] + b), acc[r][j]);
            }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) y[r * ldy + n[j]] += hsum(acc[r][j]) + m[r][j];
    }
    for (int n = n0 + 4 * quarter; n < n1; n++) {
        const uint8_t *col = record_q(L, n);
        for (int r = 0; r < R; r++) {
            const int16_t *xr = x16 + (size_t)r * K;
            const float mr = column_scales(record_dm(L, n), nb, sx + (size_t)r * nb, sums + (size_t)r * nb, scale[0][0]);
            __m256 acc = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++)
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(col + (size_t)b * qb, xr + (size_t)b * FM_BLOCK, bits)),
                                      _mm256_broadcast_ss(scale[0][0] + b), acc);
            y[r * ldy + n] += hsum(acc) + mr;
        }
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

#ifdef FM_AVX512
/* 4-bit with VNNI's byte products (vpdpbusd: unsigned bytes times signed bytes, four to an int32).
 * Each int16 activation is split exactly as x = 256 h + l (h = x >> 8 signed, l = x & 255 unsigned),
 * so that x . q = 256 (q . h) + (l . q) with the nibbles q (0..15) as the unsigned operand against h
 * and as the signed one against l: the same int32 sums as pmaddwd's, in 4 byte-product instructions
 * per 64 weights instead of 4 pmaddwd + 2 adds, and no widening of the nibbles to int16 (Zen 4, one
 * thread: ~6-7 % faster than the AVX2 kernel on the default model's matrices; vpdpwssd in place of
 * pmaddwd + add measured no faster there, and 512-bit vectors of two blocks slower, so 8-bit blocks
 * keep the AVX2 kernel).
 * A pair of blocks (A, B: 32 bytes of q) is one vector; its int32 lanes are A's 4 then B's 4, scaled
 * by [s_A x 4 | s_B x 4]. The activations of a pair, 128 bytes: [h of A even | h of B even], the same
 * for the odd elements, then the l's (a last odd block: 16-byte parts, A's only). */
enum { NBITS_ROWS_VNNI = 4 };  /* rows per pass (the AVX-512 registers hold 4 x 4 accumulators) */

static void pairs_to_bytes(int16_t *x16, int K) {
    const int nb = K / FM_BLOCK;
    const __m512i lowbyte = _mm512_set1_epi16(255);
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        int16_t *p = x16 + (size_t)b * FM_BLOCK;  /* [A even | A odd | B even | B odd], 16 int16 each */
        const __m512i a = _mm512_loadu_si512(p), c = _mm512_loadu_si512(p + 32);
        const __m512i ev = _mm512_shuffle_i64x2(a, c, 0x44), od = _mm512_shuffle_i64x2(a, c, 0xEE);
        __m256i *out = (__m256i *)p;
        _mm256_storeu_si256(out, _mm512_cvtepi16_epi8(_mm512_srai_epi16(ev, 8)));
        _mm256_storeu_si256(out + 1, _mm512_cvtepi16_epi8(_mm512_srai_epi16(od, 8)));
        _mm256_storeu_si256(out + 2, _mm512_cvtepi16_epi8(_mm512_and_si512(ev, lowbyte)));
        _mm256_storeu_si256(out + 3, _mm512_cvtepi16_epi8(_mm512_and_si512(od, lowbyte)));
    }
    if (b < nb) {
        int16_t *p = x16 + (size_t)b * FM_BLOCK;
        const __m256i ev = _mm256_loadu_si256((const __m256i *)p), od = _mm256_loadu_si256((const __m256i *)(p + 16));
        __m128i *out = (__m128i *)p;
        _mm_storeu_si128(out, _mm256_cvtepi16_epi8(_mm256_srai_epi16(ev, 8)));
        _mm_storeu_si128(out + 1, _mm256_cvtepi16_epi8(_mm256_srai_epi16(od, 8)));
        _mm_storeu_si128(out + 2, _mm256_cvtepi16_epi8(_mm256_and_si256(ev, _mm256_set1_epi16(255))));
        _mm_storeu_si128(out + 3, _mm256_cvtepi16_epi8(_mm256_and_si256(od, _mm256_set1_epi16(255))));
    }
}

/* For one column and row: pair p's scales [s_2p x 4 | s_2p+1 x 4] at scale + 8 p (a last odd block's
 * [s x 4 | 0 x 4]), s_b = d_b * sx_b; returns the minimums' term sum_b m_b * S_b. */
static inline float column_pair_scales(const uint16_t *dm, int nb, const float *sx, const float *sums, float *scale) {
    __m256 macc = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= nb; b += 8) {
        const __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + b))), _mm256_loadu_ps(sx + b));
        macc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + nb + b))), _mm256_loadu_ps(sums + b), macc);
        for (int j = 0; j < 4; j++)
            _mm256_store_ps(scale + (size_t)(b + 2 * j) * 4,
                            _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1,
                                                                          2 * j + 1, 2 * j + 1)));
    }
    float mterm = hsum(macc);
    for (; b < nb; b += 2) {
        const float sa = _cvtsh_ss(dm[b]) * sx[b], sb = b + 1 < nb ? _cvtsh_ss(dm[b + 1]) * sx[b + 1] : 0.f;
        mterm += _cvtsh_ss(dm[nb + b]) * sums[b];
        if (b + 1 < nb) mterm += _cvtsh_ss(dm[nb + b + 1]) * sums[b + 1];
        _mm256_store_ps(scale + (size_t)b * 4, _mm256_set_m128(_mm_set1_ps(sb), _mm_set1_ps(sa)));
    }
    return mterm;
}

/* As nbits_columns for 4-bit, with the byte products: y[r][n] += x[r] . w_n, x8 (R rows of 2 K bytes,
 * pairs_to_bytes' layout); four columns at a time from the range's quarters, each row in the one-row order. */
static inline __attribute__((always_inline)) void nbits4_columns_vnni(const fm_linear *L, int n0, int n1, const uint8_t *x8,
                                                                      const float *sx, const float *sums, const int R,
                                                                      float *y, size_t ldy) {
    const int K = L->K, nb = K / FM_BLOCK, pairs = nb / 2, quarter = (n1 - n0) / 4, per = (nb + 1) / 2 * 8;
    float scale[NBITS_ROWS_VNNI][4][per] __attribute__((aligned(32)));
    const __m256i low = _mm256_set1_epi8(15), zero = _mm256_setzero_si256();
    for (int i = 0; i < quarter + (n1 - n0) % 4; i++) {
        const int cols = i < quarter ? 4 : 1;  /* the range's last (n1 - n0) % 4 columns: one at a time */
        const int n[4] = {i < quarter ? n0 + i : n0 + 4 * quarter + (i - quarter), n0 + i + quarter, n0 + i + 2 * quarter,
                          n0 + i + 3 * quarter};
        const uint8_t *col[4];
        float m[NBITS_ROWS_VNNI][4];
        __m256 acc[NBITS_ROWS_VNNI][4];
        for (int j = 0; j < cols; j++) {
            col[j] = record_q(L, n[j]);
            for (int r = 0; r < R; r++) {
                m[r][j] = column_pair_scales(record_dm(L, n[j]), nb, sx + (size_t)r * nb, sums + (size_t)r * nb, scale[r][j]);
                acc[r][j] = _mm256_setzero_ps();
            }
        }
#define PAIRS(C)                                                                                                       \
    for (int p = 0; p < pairs; p++)                                                                                    \
        for (int j = 0; j < C; j++) {                                                                                  \
            const __m256i q = _mm256_loadu_si256((const __m256i *)(col[j] + (size_t)p * 32));                          \
            const __m256i lo = _mm256_and_si256(q, low), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);          \
            for (int r = 0; r < R; r++) {                                                                              \
                const __m256i *xp = (const __m256i *)(x8 + (size_t)r * 2 * K + (size_t)p * 128);                       \
                const __m256i h = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, lo, _mm256_loadu_si256(xp)), hi,      \
                                                      _mm256_loadu_si256(xp + 1));                                     \
                const __m256i l = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, _mm256_loadu_si256(xp + 2), lo),      \
                                                      _mm256_loadu_si256(xp + 3), hi);                                 \
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(h, 8), l)),          \
                                            _mm256_load_ps(scale[r][j] + p * 8), acc[r][j]);                           \
            }                                                                                                          \
        }                                                                                                              \
    if (nb % 2)                                                                                                        \
        for (int j = 0; j < C; j++) {                                                                                  \
            const __m128i q = _mm_loadu_si128((const __m128i *)(col[j] + (size_t)pairs * 32));                         \
            const __m128i lo = _mm_and_si128(q, _mm256_castsi256_si128(low)),                                          \
                          hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm256_castsi256_si128(low));                       \
            for (int r = 0; r < R; r++) {                                                                              \
                const __m128i *xp = (const __m128i *)(x8 + (size_t)r * 2 * K + (size_t)pairs * 128);                   \
                const __m128i z = _mm_setzero_si128();                                                                 \
                const __m128i h = _mm_dpbusd_epi32(_mm_dpbusd_epi32(z, lo, _mm_loadu_si128(xp)), hi, _mm_loadu_si128(xp + 1)); \
                const __m128i l = _mm_dpbusd_epi32(_mm_dpbusd_epi32(z, _mm_loadu_si128(xp + 2), lo), _mm_loadu_si128(xp + 3), hi); \
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_zextsi128_si256(_mm_add_epi32(_mm_slli_epi32(h, 8), l))), \
                                            _mm256_load_ps(scale[r][j] + pairs * 8), acc[r][j]);                       \
            }                                                                                                          \
        }
        if (cols == 4) {
            PAIRS(4)
        } else {
            PAIRS(1)
        }
#undef PAIRS
        for (int r = 0; r < R; r++)
            for (int j = 0; j < cols; j++) y[r * ldy + n[j]] += hsum(acc[r][j]) + m[r][j];
    }
}
#endif

/* B tokens, each as a one-token step: the columns in claimed chunks, as f32_linear; x (B, K), per row
 * x16 (B, K), sx and sums (B, nb). */
static void nbits_chunk(const fm_linear *L, int n0, int n1, const float *x, int B, const int16_t *x16, const float *sx,
                        const float *sums, float *y, size_t ldy, int accumulate) {
    const int K = L->K, nb = K / FM_BLOCK;
    if (!accumulate)
        for (int r = 0; r < B; r++) memset(y + r * ldy + n0, 0, sizeof(float) * (n1 - n0));
#ifdef FM_AVX512
    if (L->bits == 4) {
        (void)x;
        int r = 0;
#define VNNI_ROWS(R) nbits4_columns_vnni(L, n0, n1, (const uint8_t *)(x16 + (size_t)r * K), sx + (size_t)r * nb, \
                                         sums + (size_t)r * nb, R, y + r * ldy, ldy)
        for (; r + NBITS_ROWS_VNNI <= B; r += NBITS_ROWS_VNNI) VNNI_ROWS(NBITS_ROWS_VNNI);
        if (B - r == 3) VNNI_ROWS(3);
        if (B - r == 2) VNNI_ROWS(2);
        if (B - r == 1) VNNI_ROWS(1);
#undef VNNI_ROWS
        return;
    }
#endif
#ifdef FM_AVX2
    (void)x;
    int r = 0;
#define ROWS(R)                                                                                                  \
    (L->bits == 4 ? nbits_columns(L, n0, n1, x16 + (size_t)r * K, sx + (size_t)r * nb, sums + (size_t)r * nb, R, \
                                  y + r * ldy, ldy, 4)                                                           \
                  : nbits_columns(L, n0, n1, x16 + (size_t)r * K, sx + (size_t)r * nb, sums + (size_t)r * nb, R, \
                                  y + r * ldy, ldy, 8))
    for (; r + NBITS_ROWS <= B; r += NBITS_ROWS) ROWS(NBITS_ROWS);
    for (; r < B; r++) ROWS(1);
#undef ROWS
#else
    (void)x16, (void)sx;
    const int qb = FM_BLOCK * L->bits / 8;
    for (int r = 0; r < B; r++)
        for (int n = n0; n < n1; n++)  /* portable path: fp32 products */
            for (int b = 0; b < nb; b++) {
                const uint8_t *q = record_q(L, n) + (size_t)b * qb;
                const uint16_t *dm = record_dm(L, n);
                const float *xb = x + (size_t)r * K + (size_t)b * FM_BLOCK;
                float p = 0.f;
                for (int i = 0; i < FM_BLOCK; i++) p += block_value(q, i, L->bits) * xb[i];
                y[r * ldy + n] += half_to_float(dm[b]) * p + half_to_float(dm[nb + b]) * sums[(size_t)r * nb + b];
            }
#endif
}

static int nbits_gemv(const fm_linear *L, const float *x, int B, float *y, size_t ldy, int accumulate) {
    const int K = L->K, N = L->N, nb = K / FM_BLOCK, chunk = chunk_columns(record_bytes(L), N, omp_get_max_threads());
    const size_t scales = ((size_t)2 * B * nb + 15) / 16 * 16;  /* sums, sx; then x16 64-byte aligned */
    float *sums = fm_scratch(0, scales + (size_t)B * K / 2);
    if (!sums) return -2;
    float *sx = sums + (size_t)B * nb;
    int16_t *x16 = (int16_t *)(sums + scales);
    for (int r = 0; r < B; r++) {
        const float *xr = x + (size_t)r * K;
#ifdef FM_AVX2
        nbits_prepare(xr, K, L->bits, sums + (size_t)r * nb, sx + (size_t)r * nb, x16 + (size_t)r * K);
#ifdef FM_AVX512
        if (L->bits == 4) pairs_to_bytes(x16 + (size_t)r * K, K);
#endif
#else
        for (int b = 0; b < nb; b++) {
            float *s = sums + (size_t)r * nb + b;
            *s = 0.f;
            for (int i = 0; i < FM_BLOCK; i++) *s += xr[(size_t)b * FM_BLOCK + i];
        }
#endif
    }
    FOR_CLAIMED_CHUNKS(N, chunk, n0, n1, nbits_chunk(L, n0, n1, x, B, x16, sx, sums, y, ldy, accumulate));
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

/* Columns n0..n0+width (at most PANEL) of a 4/8-bit L as an fp32 panel: dequantized 8 columns at a
 * time and their blocks transposed (storing each value on its own was ~1/3 of an int4 prefill). */
static void fill_panel(const fm_linear *L, int n0, int width, float *panel) {
    const int K = L->K, nb = K / FM_BLOCK, qb = FM_BLOCK * L->bits / 8;
    for (int j = 0; j < width; j += 8) {
        const int cols = width - j < 8 ? width - j : 8;
        for (int b = 0; b < nb; b++) {
            float w[8][FM_BLOCK];
            for (int c = 0; c < cols; c++) {
                const uint16_t *dm = record_dm(L, n0 + j + c);
                dequantize_block(record_q(L, n0 + j + c) + (size_t)b * qb, half_to_float(dm[b]),
                                 half_to_float(dm[nb + b]), L->bits, w[c]);
            }
            transpose_tile(w[0], FM_BLOCK, cols, FM_BLOCK, panel + (size_t)b * FM_BLOCK * PANEL + j, PANEL);
        }
    }
}

/* Several tokens of a 4/8-bit matrix: each thread takes panels of 16 columns, dequantizes one
 * (fill_panel) and runs the fp32 tiles over it. */
static int nbits_gemm(const fm_linear *L, const float *x, int T, float *y, int accumulate) {
    const int K = L->K, N = L->N, panels = (N + PANEL - 1) / PANEL;
    const size_t buffers = (size_t)omp_get_max_threads() * K * PANEL;
    float *panel_buffers = fm_scratch(0, buffers + (size_t)T * K);
    if (!panel_buffers) return -2;
    float *xt = panel_buffers + buffers;
    transpose_rows(x, T, K, xt);
#pragma omp parallel
    {
        float *panel = panel_buffers + (size_t)omp_get_thread_num() * K * PANEL;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            const int n0 = p * PANEL, width = N - n0 < PANEL ? N - n0 : PANEL;
            fill_panel(L, n0, width, panel);
            f32_panels(panel, K, width, 0, 1, xt, T, y + n0, N, accumulate);
        }
    }
    return 0;
}

int fm_linear_rows(const fm_linear *L, const float *x, int B, float *y, size_t ldy, int accumulate) {
    return L->kind == FM_F32 ? f32_linear(L, x, B, y, ldy, accumulate) : nbits_gemv(L, x, B, y, ldy, accumulate);
}

int fm_linear_forward(const fm_linear *L, const float *x, int T, float *y, int accumulate) {
    if (T > 1 && L->kind != FM_F32) return nbits_gemm(L, x, T, y, accumulate);
    return fm_linear_rows(L, x, T, y, (size_t)L->N, accumulate);
}
