/* The linear layers: fp32 matrices and MatMulNBits' 4/8-bit blocks, both in panels of 16 columns (the
 * blocks met by int16-rounded activations).
 *
 * Batch-1 decoding reads every weight once per token, so these loops are about streaming memory: the
 * threads claim chunks of output columns and read each chunk front to back. Several rows (a batched
 * step, a prompt) reuse each loaded weight for every row from registers and cache. */
#include "kernels.h"
#include "half.h"
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <omp.h>

/* One token: a matrix's columns are shared out in chunks of about CHUNK_BYTES of weights, each thread
 * claiming the next chunk from a counter when it is done with one. The two cores' speeds differ from
 * moment to moment on shared machines, so with a fixed split of a large matrix one waited for the other;
 * claimed chunks keep both reading until it is done. A matrix of a chunk a thread (a layer's, 0.2-1.1 MB for
 * the default model) is not claimed: each thread takes its own, as the counter's line would cross between
 * the cores twice a thread (several hundred ns where they sit on different L3s). Each output column is summed
 * by one thread in a fixed order, so the result does not depend on which thread took it. A thread reads its
 * chunk's panels one after the other: the panels of a matrix are contiguous, so that is one forward stream
 * (claim_list). */
enum { CHUNK_BYTES = 1 << 20 };  /* each chunk's stream starts cold: the prefetchers ramp up again */
/* Several rows spend ~B times longer on each byte: larger chunks, claimed as one row's (a core that the server's
 * other threads share finishes fewer). */
enum { ROWS_CHUNK_BYTES = 2 << 20 };

static int chunk_columns(size_t column_bytes, int N, int threads, size_t chunk_bytes) {
    const size_t bytes = column_bytes * N;
    int chunks = (int)((bytes + chunk_bytes - 1) / chunk_bytes);
    chunks = (chunks + threads - 1) / threads * threads;  /* whole rounds: a small matrix is one chunk per thread */
    return ((N + chunks - 1) / chunks + 3) / 4 * 4;
}

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

/* The panels p0..p1 of W for the B rows of xt. One row (a decode step of one sequence): the panels in turn.
 * Several rows: F32_PANELS panels from as many parts of the range, every row group of a block of rows
 * meeting them from cache. */
static void f32_panels(const float *W, int K, int N, int p0, int p1, const float *xt, int B, float *y, size_t ldy,
                       int accumulate) {
    if (B == 1) {  /* one forward stream */
        for (int p = p0; p < p1; p++) f32_tile(W, K, N, p, 0, 1, xt, 1, 1, y, ldy, accumulate);
        return;
    }
    const int part = (p1 - p0) / F32_PANELS;
    for (int r0 = 0; r0 < B; r0 += ROW_BLOCK) {
        const int rows = B - r0 < ROW_BLOCK ? B - r0 : ROW_BLOCK;
        const float *block = xt + (size_t)r0 * K;
        for (int p = p0; p < p0 + part; p++)
            f32_rows_of(W, K, N, p, part, F32_PANELS, block, rows, rows, y + r0 * ldy, ldy, accumulate);
        for (int p = p0 + F32_PANELS * part; p < p1; p++)
            f32_rows_of(W, K, N, p, 0, 1, block, rows, rows, y + r0 * ldy, ldy, accumulate);
    }
}

/* The block of rows from r0 of x (B, K) transposed into xt (blocks of ROW_BLOCK rows). */
static void transpose_block(const float *x, int B, int K, float *xt, int r0) {
    const int rows = B - r0 < ROW_BLOCK ? B - r0 : ROW_BLOCK;
    transpose_tile(x + (size_t)r0 * K, (size_t)K, rows, K, xt + (size_t)r0 * K, (size_t)rows);
}

/* ---- 4/8-bit blocks ------------------------------------------------------------------------------ */
/* Both store unsigned q per block of 32 weights with a scale d and a minimum m (fp16): weight = d * q
 * + m (the GGUF grids: (d, m) in fp16 lose nothing). So for a column
 *     x . w = sum_b d_b * (x_b . q_b) + sum_b m_b * S_b,   S_b = the sum of x over block b.
 * x_b . q_b is taken in integers: each block of x is rounded to int16 with its own scale sx_b (relative
 * error <= 2^-16 of the block's largest |x|: logits move by ~1e-5, not the ~3 % of int8 activations).
 * Both are laid out in panels of 16 columns, as the fp32 matrices (below). */

static inline float half_to_float(uint16_t h) {
#ifdef FM_AVX2
    return _cvtsh_ss(h);
#else
    return fm_half_to_float(h);
#endif
}

/* Per block of x: S_b, sx_b and x16_b (rounded to nearest even), the latter as the bytes the panels'
 * kernels take: x8 = [h (K) | l (K)], x16 = 256 h + l (h signed, l unsigned); and, when ls is given (the
 * AVX-512 8-bit kernel's), ls_b = 128 * the sum of the block's l. */
static void nbits_prepare(const float *x, int K, float *sums, float *sx, int32_t *ls, uint8_t *x8) {
    for (int b = 0; b < K / FM_BLOCK; b++) {
        const float *xb = x + (size_t)b * FM_BLOCK;
#ifdef FM_AVX2
        const __m256 sign = _mm256_set1_ps(-0.f);
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
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, scale)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, scale));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, scale)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, scale));
        /* packs interleaves 128-bit halves; each permute puts the values back in order */
        const __m256i a = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8),  /* x16 of 0..15 */
                      c = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);  /* 16..31 */
        const __m256i low = _mm256_set1_epi16(255);
        _mm256_storeu_si256((__m256i *)(x8 + (size_t)b * FM_BLOCK), _mm256_permute4x64_epi64(
            _mm256_packs_epi16(_mm256_srai_epi16(a, 8), _mm256_srai_epi16(c, 8)), 0xD8));
        _mm256_storeu_si256((__m256i *)(x8 + K + (size_t)b * FM_BLOCK), _mm256_permute4x64_epi64(
            _mm256_packus_epi16(_mm256_and_si256(a, low), _mm256_and_si256(c, low)), 0xD8));
#else
        float top = 0.f, s = 0.f;
        for (int i = 0; i < FM_BLOCK; i++) top = fabsf(xb[i]) > top ? fabsf(xb[i]) : top, s += xb[i];
        sums[b] = s, sx[b] = top / 32767.f;
        const float scale = top > 0.f ? 32767.f / top : 0.f;
        for (int i = 0; i < FM_BLOCK; i++) {
            const int v = (int)lrintf(xb[i] * scale);
            x8[(size_t)b * FM_BLOCK + i] = (uint8_t)(int8_t)(v >> 8), x8[K + (size_t)b * FM_BLOCK + i] = (uint8_t)(v & 255);
        }
#endif
        if (ls) {
            int32_t l = 0;
            for (int i = 0; i < FM_BLOCK; i++) l += x8[K + (size_t)b * FM_BLOCK + i];
            ls[b] = 128 * l;
        }
    }
}

/* Floats of scratch for B rows of nbits_prepare: sums, sx and ls (B, nb) each, then 2 K bytes per row, 64-byte
 * aligned (nbits_scratch). */
static size_t nbits_floats(int B, int K) { return (3 * (size_t)B * (K / FM_BLOCK) + 15) / 16 * 16 + (size_t)B * K / 2; }

static void nbits_scratch(float *sums, int B, int K, float **sx, int32_t **ls, uint8_t **rows) {
    const size_t nb = (size_t)K / FM_BLOCK, scales = (3 * B * nb + 15) / 16 * 16;
    *sx = sums + B * nb, *ls = (int32_t *)(sums + 2 * B * nb), *rows = (uint8_t *)(sums + scales);
}

/* ---- 4/8-bit panels ------------------------------------------------------------------------------- */
/* fm_pack_nbits lays a 4/8-bit matrix out in panels of 16 columns, as the fp32 ones: panel p is nb
 * records of q_record(bits) bytes, record b = [d (16 fp16) | m (16 fp16) | the block's q as 64-byte
 * vectors], the 4 bytes of lane i of a vector belonging to column 16p + i. 4-bit: 4 vectors, byte j of
 * vector v holding q[32b + 4v + j] in its low nibble and q[32b + 16 + 4v + j] in its high one; 8-bit:
 * 8 vectors, byte j of vector v = q[32b + 4v + j]. A vector (4-bit: its nibbles) is then 4 k of 16
 * columns: the operand of VNNI's vpdpbusd (each int32 lane sums 4 byte products) against 4 activation
 * bytes broadcast, so the 16 columns' sums build up in lanes (no horizontal sums) and a block's
 * x16 . q is an exact int32. The activations are split exactly as x16 = 256 h + l (h = x16 >> 8 signed,
 * l = x16 & 255 unsigned): x16 . q = 256 (q . h) + (l . q), q the unsigned operand against h and the
 * signed one against l -- for 8-bit, as q - 128 (q ^ 0x80) on AVX-512: l . q = l . (q - 128) + 128 sum(l)
 * (ls_b), and as its nibbles on AVX2: l . q = l . q_low + 16 (l . q_high). Per row and
 * block: acc = fma(float(x16 . q), d sx_b, acc), then acc = fma(m, S_b, acc), so a row's result does
 * not depend on the other rows of the call. AVX2 has no vpdpbusd: pmaddubsw (pairs of byte products;
 * nibble operands never saturate it) and pmaddwd by ones give the same int32s. */
static inline int q_record(int bits) { return 4 * PANEL + PANEL * FM_BLOCK * bits / 8; }

#if defined(FM_AVX512)
#define QB_HALVES 1  /* vectors per 16 columns */
#define QB_ROWS 6     /* 18 accumulators, a panel's unpacked weights and broadcasts: no spills */
#define QB_PREFETCH 2048
#define QV(op) _mm512_##op
#define QV_SI(op) _mm512_##op##_si512
typedef __m512i qb_ints;
typedef __m512 qb_floats;
static inline qb_ints qb_dot(qb_ints acc, qb_ints u, qb_ints s) { return _mm512_dpbusd_epi32(acc, u, s); }
/* acc + h . q for 8-bit q = lo + 16 hi: q itself is vpdpbusd's unsigned operand */
static inline qb_ints q8_dot_h(qb_ints acc, qb_ints q, qb_ints lo, qb_ints hi, qb_ints h) {
    (void)lo, (void)hi;
    return _mm512_dpbusd_epi32(acc, q, h);
}
static inline qb_floats qb_halfs(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)p)); }
#elif defined(FM_AVX2)
#define QB_HALVES 2
#define QB_ROWS 3  /* with a panel half's unpacked weights, what 16 ymm registers hold */
#define QV(op) _mm256_##op
#define QV_SI(op) _mm256_##op##_si256
typedef __m256i qb_ints;
typedef __m256 qb_floats;
static inline qb_ints qb_dot(qb_ints acc, qb_ints u, qb_ints s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
/* acc + h . q for 8-bit q = lo + 16 hi, by its nibbles (whole bytes could saturate pmaddubsw) */
static inline qb_ints q8_dot_h(qb_ints acc, qb_ints q, qb_ints lo, qb_ints hi, qb_ints h) {
    (void)q;
    return qb_dot(_mm256_add_epi32(acc, _mm256_slli_epi32(qb_dot(_mm256_setzero_si256(), hi, h), 4)), lo, h);
}
static inline qb_floats qb_halfs(const uint16_t *p) { return _mm256_cvtph_ps(_mm_load_si128((const __m128i *)p)); }
#else
#define QB_ROWS 4
#endif
#ifdef QV  /* the rest is the same on both vector widths */
static inline qb_ints qb_load(const uint8_t *p) { return QV_SI(load)((const void *)p); }
static inline qb_ints qb_low(qb_ints v) { return QV_SI(and)(v, QV(set1_epi8)(15)); }
static inline qb_ints qb_high(qb_ints v) { return QV_SI(and)(QV(srli_epi16)(v, 4), QV(set1_epi8)(15)); }
static inline qb_ints qb_bytes4(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return QV(set1_epi32)(v); }
static inline qb_ints qb_zero(void) { return QV_SI(setzero)(); }
static inline qb_floats qb_int_sum(qb_ints h, qb_ints l) { return QV(cvtepi32_ps)(QV(add_epi32)(QV(slli_epi32)(h, 8), l)); }
static inline qb_ints qb_add_shifted(qb_ints l, qb_ints l16) { return QV(add_epi32)(l, QV(slli_epi32)(l16, 4)); }
static inline qb_floats qb_fma(qb_floats a, qb_floats b, qb_floats c) { return QV(fmadd_ps)(a, b, c); }
static inline qb_floats qb_mul1(qb_floats a, float b) { return QV(mul_ps)(a, QV(set1_ps)(b)); }
static inline qb_floats qb_fma1(qb_floats a, float b, qb_floats c) { return QV(fmadd_ps)(a, QV(set1_ps)(b), c); }
static inline qb_floats qb_fzero(void) { return QV(setzero_ps)(); }
static inline void qb_store(float *p, qb_floats v) { QV(storeu_ps)(p, v); }
#endif
#ifndef QB_PREFETCH
#define QB_PREFETCH 0
#endif
#ifdef FM_AVX512
#define NEEDS_LS 1  /* its 8-bit kernel takes l . (q - 128) + ls */
#else
#define NEEDS_LS 0
#endif
#ifdef QB_HALVES
enum { QB_LANES = PANEL / QB_HALVES };
#endif

static inline const uint8_t *q_panel(const fm_linear *L, int p) {
    return L->q + (size_t)p * (L->K / FM_BLOCK) * q_record(L->bits);
}

/* q[k] of lane i in a record (the scalar reading of the layout above). */
static inline int q_at(const uint8_t *rec, int bits, int i, int k) {
    if (bits == 8) return rec[4 * PANEL + 64 * (k / 4) + 4 * i + k % 4];
    const uint8_t byte = rec[4 * PANEL + 64 * (k % 16 / 4) + 4 * i + k % 4];
    return k < 16 ? byte & 15 : byte >> 4;
}

/* y[r][16 p + i] (+)= x[r] . w_{16 p + i} for r < R and panel p (columns past N are not written); x8 row r:
 * [h (K bytes) | l (K bytes)], sx, sums and ls (R, nb). A vector of QB_LANES columns at a time (QB_HALVES). */
static inline __attribute__((always_inline)) void q_tile(const fm_linear *L, int p, const uint8_t *x8, const float *sx,
                                                         const float *sums, const int32_t *ls, const int R, float *y,
                                                         size_t ldy, int accumulate, const int bits) {
    (void)ls;  /* the AVX-512 8-bit kernel's alone */
    const int K = L->K, nb = K / FM_BLOCK, record = q_record(bits);
    const uint8_t *w = q_panel(L, p);
#ifdef QB_HALVES
    enum { MAX_ROWS = QB_ROWS > 1 ? QB_ROWS : 1 };
    qb_floats acc[MAX_ROWS][QB_HALVES];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < QB_HALVES; j++) acc[r][j] = qb_fzero();
    for (int b = 0; b < nb; b++) {
        qb_ints h[MAX_ROWS][QB_HALVES], l[MAX_ROWS][QB_HALVES], l16[MAX_ROWS][QB_HALVES];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < QB_HALVES; j++) h[r][j] = l[r][j] = l16[r][j] = qb_zero();
        for (int v = 0; v < bits; v++)  /* 4 or 8 vectors */
            for (int j = 0; j < QB_HALVES; j++) {
                const uint8_t *wv = w + (size_t)b * record + 64 * v;
                if (QB_PREFETCH && R > 1 && j == 0) _mm_prefetch((const char *)(wv + QB_PREFETCH), _MM_HINT_T0);
                const qb_ints raw = qb_load(wv + 4 * PANEL + 32 * j), lo = qb_low(raw), hi = qb_high(raw);
#ifdef FM_AVX512
                const qb_ints q_signed = _mm512_xor_si512(raw, _mm512_set1_epi8((char)0x80));  /* 8-bit q - 128 */
#endif
                for (int r = 0; r < R; r++) {
                    const uint8_t *xh = x8 + (size_t)r * 2 * K + (size_t)b * FM_BLOCK + 4 * v, *xl = xh + K;
                    if (bits == 4) {
                        h[r][j] = qb_dot(qb_dot(h[r][j], lo, qb_bytes4(xh)), hi, qb_bytes4(xh + 16));
                        l[r][j] = qb_dot(qb_dot(l[r][j], qb_bytes4(xl), lo), qb_bytes4(xl + 16), hi);
                    } else {
                        const qb_ints xlv = qb_bytes4(xl);
                        h[r][j] = q8_dot_h(h[r][j], raw, lo, hi, qb_bytes4(xh));
#ifdef FM_AVX512  /* l . q = l . (q - 128) + ls: one vpdpbusd (no saturation) where pmaddubsw needs nibbles */
                        l[r][j] = qb_dot(l[r][j], xlv, q_signed);
#else
                        l[r][j] = qb_dot(l[r][j], xlv, lo), l16[r][j] = qb_dot(l16[r][j], xlv, hi);
#endif
                    }
                }
            }
        for (int j = 0; j < QB_HALVES; j++) {
            const uint16_t *dm = (const uint16_t *)(w + (size_t)b * record) + QB_LANES * j;
            const qb_floats d = qb_halfs(dm), m = qb_halfs(dm + PANEL);
            for (int r = 0; r < R; r++) {
#ifdef FM_AVX512
                const qb_ints l8 = QV(add_epi32)(l[r][j], QV(set1_epi32)(ls[(size_t)r * nb + b]));
#else
                const qb_ints l8 = qb_add_shifted(l[r][j], l16[r][j]);
#endif
                const qb_floats dot = qb_int_sum(h[r][j], bits == 4 ? l[r][j] : l8);
                acc[r][j] = qb_fma(dot, qb_mul1(d, sx[(size_t)r * nb + b]), acc[r][j]);
                acc[r][j] = qb_fma1(m, sums[(size_t)r * nb + b], acc[r][j]);
            }
        }
    }
    const int n0 = p * PANEL;
    for (int r = 0; r < R; r++) {
        float *yr = y + r * ldy + n0, out[PANEL];
        for (int c = 0; c < QB_HALVES; c++) qb_store(out + c * QB_LANES, acc[r][c]);
        for (int i = 0; i < PANEL && n0 + i < L->N; i++) yr[i] = accumulate ? yr[i] + out[i] : out[i];
    }
#else
    const int n0 = p * PANEL;
    for (int r = 0; r < R; r++)
        for (int i = 0; i < PANEL && n0 + i < L->N; i++) {
            float acc = 0.f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *rec = w + (size_t)b * record, *xh = x8 + (size_t)r * 2 * K + (size_t)b * FM_BLOCK;
                const uint16_t *dm = (const uint16_t *)rec;
                int32_t dot = 0;
                for (int k = 0; k < FM_BLOCK; k++) dot += q_at(rec, bits, i, k) * (256 * (int8_t)xh[k] + xh[K + k]);
                acc = fmaf((float)dot, half_to_float(dm[i]) * sx[(size_t)r * nb + b], acc);
                acc = fmaf(half_to_float(dm[PANEL + i]), sums[(size_t)r * nb + b], acc);
            }
            y[r * ldy + n0 + i] = accumulate ? y[r * ldy + n0 + i] + acc : acc;
        }
#endif
}

/* The panels p0..p1 for B rows, in turn (one row: one forward stream), QB_ROWS rows at a time meeting each
 * unpacked weight vector. */
static inline __attribute__((always_inline)) void q_panels(const fm_linear *L, int p0, int p1, const uint8_t *x8,
                                                           const float *sx, const float *sums, const int32_t *ls,
                                                           int B, float *y, size_t ldy, int accumulate,
                                                           const int bits) {
    const int K = L->K, nb = K / FM_BLOCK;
    for (int p = p0; p < p1; p++) {
        int r = 0;
#define TILE(R) q_tile(L, p, x8 + (size_t)r * 2 * K, sx + (size_t)r * nb, sums + (size_t)r * nb, \
                       ls + (size_t)r * nb, R, y + r * ldy, ldy, accumulate, bits)
        for (; r + QB_ROWS <= B; r += QB_ROWS) TILE(QB_ROWS);
        switch (B - r) {  /* a constant row count each, so the accumulators stay in registers */
#if QB_ROWS > 5
            case 5: TILE(5); break;
#endif
#if QB_ROWS > 4
            case 4: TILE(4); break;
#endif
#if QB_ROWS > 3
            case 3: TILE(3); break;
#endif
#if QB_ROWS > 2
            case 2: TILE(2); break;
#endif
            case 1: TILE(1); break;
        }
#undef TILE
    }
}

/* ---- the entry points ---------------------------------------------------------------------------- */
/* Row r of x rounded for L's 4/8-bit kernels into in (nbits_prepare). */
static void prepare_row(const fm_linear *L, const float *x, int r, const rows_input *in) {
    const int K = L->K, nb = K / FM_BLOCK;
    nbits_prepare(x + (size_t)r * K, K, in->sums + (size_t)r * nb, in->sx + (size_t)r * nb,
                  NEEDS_LS && L->bits == 8 ? in->ls + (size_t)r * nb : NULL, in->x8 + (size_t)r * 2 * K);
}

/* Floats of scratch prepare_rows needs for B rows of L, a multiple of 16. */
static size_t rows_floats(const fm_linear *L, int B) {
    return L->kind == FM_F32 ? (B > 1 ? ((size_t)B * L->K + 15) / 16 * 16 : 0) : nbits_floats(B, L->K);
}

/* The B rows of x for L's kernels laid out in mem (rows_floats(L, B) floats, 64-byte aligned): x itself (one row is
 * its own transpose) or its transpose (fp32 matrices), the rounded rows (4/8-bit ones); prepare_share fills them. */
static void prepare_rows(const fm_linear *L, const float *x, int B, float *mem, rows_input *in) {
    if (L->kind == FM_F32) {
        *in = (rows_input){.xt = B > 1 ? mem : x};
        return;
    }
    float *sx;
    int32_t *ls;
    uint8_t *x8;
    nbits_scratch(mem, B, L->K, &sx, &ls, &x8);
    *in = (rows_input){NULL, mem, sx, ls, x8};
}

/* Row r's share of filling prepare_rows' layout: a 4/8-bit matrix's row r rounded, or, for an fp32 one, the block of
 * rows starting at r transposed. */
static void prepare_share(const fm_linear *L, const float *x, int B, int r, const rows_input *in) {
    if (L->kind != FM_F32) prepare_row(L, x, r, in);
    else if (B > 1 && r % ROW_BLOCK == 0) transpose_block(x, B, L->K, (float *)in->xt, r);
}

/* One row of x for L's kernels in the calling thread's scratch (fm_scratch slot 0), rounded. 0, or -2 when out of
 * memory. */
static int prepare_one(const fm_linear *L, const float *x, rows_input *in) {
    const size_t need = rows_floats(L, 1);
    float *mem = need ? fm_scratch(0, need) : NULL;
    if (need && !mem) return -2;
    prepare_rows(L, x, 1, mem, in);
    prepare_share(L, x, 1, 0, in);
    return 0;
}

/* Panels per claimed chunk of L for B rows and `threads` threads. */
static int panel_chunk(const fm_linear *L, int B, int threads) {
    const size_t column_bytes = L->kind == FM_F32 ? sizeof(float) * L->K
                                                  : (size_t)(L->K / FM_BLOCK) * q_record(L->bits) / PANEL;
    const int chunk = (chunk_columns(column_bytes, L->N, threads, B > 1 ? ROWS_CHUNK_BYTES : CHUNK_BYTES)
                       + PANEL / 2) / PANEL;
    return chunk < 1 ? 1 : chunk;
}

/* y (+)= x @ W for the panels p0..p1 - 1. */
static void run_panels(const fm_linear *L, int p0, int p1, const rows_input *in, int B, float *y, size_t ldy,
                       int accumulate) {
    if (L->kind == FM_F32) f32_panels(L->w, L->K, L->N, p0, p1, in->xt, B, y, ldy, accumulate);
    else if (L->bits == 4) q_panels(L, p0, p1, in->x8, in->sx, in->sums, in->ls, B, y, ldy, accumulate, 4);
    else q_panels(L, p0, p1, in->x8, in->sx, in->sums, in->ls, B, y, ldy, accumulate, 8);
}

/* The calling thread's share of the n matrices' chunks, taken as one list: matrix j's chunks (of chunk[j] panels) are
 * the list's first[j] .. first[j + 1] - 1, claimed from *next (0 at the start) until none is left; a list of a chunk
 * a thread at most is not claimed (above): each thread takes its own. */
static void claim_list(const fm_linear *L, int n, const int *first, const int *chunk, const rows_input *in, int B,
                       float *const *y, const size_t *ldy, int accumulate, int *next) {
    const int total = first[n], alone = total <= omp_get_num_threads();
    for (int c = alone ? omp_get_thread_num() : __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); c < total;
         c = alone ? total : __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) {
        int j = 0;
        while (c >= first[j + 1]) j++;
        const int panels = (L[j].N + PANEL - 1) / PANEL, p0 = (c - first[j]) * chunk[j];
        run_panels(L + j, p0, p0 + chunk[j] < panels ? p0 + chunk[j] : panels, in + j, B, y[j], ldy[j], accumulate);
    }
}

/* Chunks of L for B rows and `threads` threads: their panels, and their count. */
static int chunks_of(const fm_linear *L, int B, int threads, int *chunk) {
    *chunk = panel_chunk(L, B, threads);
    return ((L->N + PANEL - 1) / PANEL + *chunk - 1) / *chunk;
}

int fm_linear_alone(const fm_linear *L, const float *x, float *y, int accumulate) {
    rows_input in;
    if (prepare_one(L, x, &in)) return -2;
    run_panels(L, 0, (L->N + PANEL - 1) / PANEL, &in, 1, y, (size_t)L->N, accumulate);
    return 0;
}

int fm_linear_team(const fm_linear *L, const float *x, float *y, int accumulate, int *next) {
    rows_input in;
    const int rc = prepare_one(L, x, &in);  /* each thread its own */
    int chunk, first[2] = {0, chunks_of(L, 1, omp_get_num_threads(), &chunk)};
    const size_t ldy = (size_t)L->N;
    if (!rc) claim_list(L, 1, first, &chunk, &in, 1, &y, &ldy, accumulate, next);
#pragma omp barrier
    return rc;
}

/* fm_linear_rows_team's layout of its n matrices in st for `threads` threads: which have rows of their own (a matrix with
 * the same rows as the one before shares its), and their chunks in whole rounds; returns the floats of scratch their
 * rows take (rows_prepare). */
static size_t rows_layout(const fm_linear *L, int n, const float *const *x, int B, int threads, fm_rows_team *st) {
    size_t need = 0;
    st->first[0] = 0;
    for (int j = 0; j < n; j++) {
        st->own[j] = j == 0 || x[j] != x[j - 1] || L[j].K != L[j - 1].K || L[j].kind != L[j - 1].kind
                     || L[j].bits != L[j - 1].bits;
        need += st->own[j] ? rows_floats(L + j, B) : 0;
        /* whole rounds over all n: on 2 threads and 2 matrices of a chunk each, a thread takes one */
        st->first[j + 1] = st->first[j] + chunks_of(L + j, B, (threads + n - 1) / n, st->chunk + j);
    }
    return need;
}

/* The matrices' rows laid out in mem (rows_layout's floats; prepare_rows). */
static void rows_prepare(const fm_linear *L, int n, const float *const *x, int B, float *mem, fm_rows_team *st) {
    for (int j = 0; j < n; j++) {
        if (j > 0 && !st->own[j]) {
            st->in[j] = st->in[j - 1];
            continue;
        }
        prepare_rows(L + j, x[j], B, mem, st->in + j);
        mem += rows_floats(L + j, B);
    }
}

/* The calling thread's share of fm_linear_rows_team laid out in st: a share of the rows filled in (prepare_share),
 * then the matrices' chunks (claim_list). */
static void rows_share(const fm_linear *L, int n, const float *const *x, int B, float *const *y, const size_t *ldy,
                       int accumulate, fm_rows_team *st) {
#pragma omp for collapse(2) schedule(static)
    for (int j = 0; j < n; j++)
        for (int r = 0; r < B; r++)
            if (st->own[j]) prepare_share(L + j, x[j], B, r, st->in + j);
    claim_list(L, n, st->first, st->chunk, st->in, B, y, ldy, accumulate, &st->next);
}

int fm_linear_rows_team(const fm_linear *L, int n, const float *const *x, int B, float *const *y, const size_t *ldy,
                        int accumulate, fm_rows_team *st) {
#pragma omp single
    {
        const size_t need = n < 1 || n > FM_MAX_MATRICES ? 0 : rows_layout(L, n, x, B, omp_get_num_threads(), st);
        float *mem = need ? fm_scratch(0, need) : NULL;
        st->rc = n < 1 || n > FM_MAX_MATRICES ? -1 : need && !mem ? -2 : 0;
        if (!st->rc) rows_prepare(L, n, x, B, mem, st);
        st->next = 0;
    }  /* its barrier: the layout before any thread reads it */
    const int rc = st->rc;  /* read before the barrier, after which a thread may start the next call's single */
    if (!rc) rows_share(L, n, x, B, y, ldy, accumulate, st);
#pragma omp barrier
    return rc;
}

int fm_linear_rows(const fm_linear *L, const float *x, int B, float *y, size_t ldy, int accumulate) {
    fm_rows_team st;  /* laid out by the calling thread before the team starts */
    const size_t need = rows_layout(L, 1, &x, B, omp_get_max_threads(), &st);
    float *mem = need ? fm_scratch(0, need) : NULL;
    if (need && !mem) return -2;
    rows_prepare(L, 1, &x, B, mem, &st);
    st.next = 0;
#pragma omp parallel
    rows_share(L, 1, &x, B, &y, &ldy, accumulate, &st);
    return 0;
}
