/* Internal: the linear layers and the small vector helpers the decoder uses.
 *
 * The decoder (decoder.c), these kernels (kernels.c) and the bandwidth probe (bandwidth.c) are compiled
 * once per instruction set, by the files kernels_<isa>.c, which define FM_ISA before including this
 * header: avx512 (AVX-512 F/BW/VL/DQ + VNNI, with AVX2/FMA/F16C), avx2 (AVX2 + FMA + F16C) and
 * portable (plain C, the only one on non-x86 CPUs). Each copy's public functions get the ISA's suffix
 * (fm_forward_avx512, ...); dispatch.c picks one copy at load by what the CPU has (FROMAGE_KERNELS
 * forces one). Compiled without FM_ISA (a build of decoder.c + kernels.c alone), the code is the AVX2
 * copy under the plain names; with FM_PORTABLE, the portable one. */
#ifndef FROMAGE_KERNELS_H
#define FROMAGE_KERNELS_H
#include <math.h>
#include <stddef.h>
#include <omp.h>

#ifdef FM_ISA
#define FM_PASTE_(a, b) a##_##b
#define FM_PASTE(a, b) FM_PASTE_(a, b)
#define fm_forward FM_PASTE(fm_forward, FM_ISA)
#define fm_forward_rows FM_PASTE(fm_forward_rows, FM_ISA)
#define fm_stream_read FM_PASTE(fm_stream_read, FM_ISA)
#define fm_fma_loop FM_PASTE(fm_fma_loop, FM_ISA)
#define fm_linear_rows FM_PASTE(fm_linear_rows, FM_ISA)
#define fm_linear_rows_team FM_PASTE(fm_linear_rows_team, FM_ISA)
#define fm_linear_team FM_PASTE(fm_linear_team, FM_ISA)
#define fm_linear_alone FM_PASTE(fm_linear_alone, FM_ISA)
#define fm_head_top FM_PASTE(fm_head_top, FM_ISA)
#endif

#if defined(__x86_64__) && defined(FM_ISA_AVX512)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include <immintrin.h>
#define FM_AVX2 1
#define FM_AVX512 1
#elif defined(__x86_64__) && !defined(FM_PORTABLE) && !defined(FM_ISA_PORTABLE)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#define FM_AVX2 1
#endif

#include "fromage_native.h"

/* y (B, ldy) = x (B, K) @ W for B rows (a prompt's positions or a batch's tokens), or y += x @ W when
 * accumulate (the residual adds); each weight is read once for all rows, and each row is bit-identical
 * to that row alone. Returns 0, or -2 when its scratch memory cannot be had. Parallel (OpenMP) inside. */
int fm_linear_rows(const fm_linear *L, const float *x, int B, float *y, size_t ldy, int accumulate);
enum { FM_MAX_MATRICES = 4 };
/* Rows as the panel kernels take them: x itself or transposed in blocks (fp32 matrices); each row rounded to 16 bits per
 * block (4/8-bit ones: kernels.c's nbits_prepare). */
typedef struct {
    const float *xt;
    float *sums, *sx;
    int32_t *ls;
    uint8_t *x8;
} rows_input;
typedef struct {  /* fm_linear_rows_team's layout */
    rows_input in[FM_MAX_MATRICES];  /* each matrix's rows */
    int first[FM_MAX_MATRICES + 1], chunk[FM_MAX_MATRICES], own[FM_MAX_MATRICES], next, rc;
} fm_rows_team;
/* fm_linear_rows for the n (<= FM_MAX_MATRICES) matrices L[j], y[j] (B, ldy[j]) (+)= x[j] (B, K_j) @ W_j (a layer's
 * MLP parts), called by every thread of an OpenMP team with the same arguments and st (shared): one thread lays the
 * rows out (a matrix with the same rows as the one before shares them), all round a share and claim the matrices'
 * chunks as one list; ends with the team's barrier. Returns 0, -2 (out of memory) or -1 (n out of range). */
int fm_linear_rows_team(const fm_linear *L, int n, const float *const *x, int B, float *const *y, const size_t *ldy,
                        int accumulate, fm_rows_team *st);
/* One row, y (+)= x @ W, called by every thread of an OpenMP team with the same arguments: the threads claim
 * the matrix's chunks from *next (0 before the first call; one counter per matrix), each reading x itself.
 * Ends with the team's barrier. Returns 0, or -2 (this thread's scratch memory could not be had). */
int fm_linear_team(const fm_linear *L, const float *x, float *y, int accumulate, int *next);
/* One row, y (+)= x @ W, by the calling thread alone (no team, no barrier). Returns 0, or -2 as fm_linear_team. */
int fm_linear_alone(const fm_linear *L, const float *x, float *y, int accumulate);
/* Rows x (B, K) that want only their top[r] (1..FM_MAX_TOP) largest logits, against the model's fp32 head with
 * its 8-bit copy (fm_model.head_q8): in y's rows (ldy apart), the exact logits of the panels that can hold one
 * of them or hold a head_q8_exact column, -INFINITY elsewhere (head_top.c). Returns 0, or -2 when out of
 * memory. */
int fm_head_top(const fm_model *m, const float *x, int B, const int32_t *top, float *y, size_t ldy);
/* Thread-local grow-only scratch: slot 0 belongs to the kernels, slot 1 to the decoder. */
float *fm_scratch(int slot, size_t floats);

/* fm_profile: the calling thread's switch and counters (dispatch.c). A forward pass starts with
 * double t = fm_op_start() (negative when profiling is off: the switch is read once per pass), then
 * t = fm_op_done(op, t) after each operation: TIMED(op, statement). */
extern _Thread_local int fm_profiling;
extern _Thread_local double fm_op_seconds[FM_OPS];
extern _Thread_local int64_t fm_op_calls;
static inline double fm_op_start(void) {
    if (!fm_profiling) return -1.;
    fm_op_calls++;
    return omp_get_wtime();
}
static inline double fm_op_done(int op, double since) {
    if (since < 0.) return since;
    const double now = omp_get_wtime();
    fm_op_seconds[op] += now - since;
    return now;
}
#define TIMED(op, ...) do { __VA_ARGS__; t = fm_op_done((op), t); } while (0)

/* Whether a decoding step stores the attention partials another thread merges past its caches: set on the decode
 * thread before each step's team starts (dispatch.c: fm_set_streamed_partials). */
extern int fm_partials_streamed;

#ifdef FM_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* r[i][j] <-> r[j][i] for 8 vectors of 8 floats. */
static inline void fm_transpose8(__m256 r[8]) {
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

static inline float fm_dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
#ifdef FM_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    s = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* exp(x) for a vector V of floats, P its intrinsics' prefix (Cephes' polynomial: within 2 ulp of expf; 0 below
 * -88.4): fm_exp8 for 8 floats, fm_exp16 for 16 with the same operations, so the same value in every lane. */
#define FM_EXP(name, V, VI, P, FLOOR, AS_FLOAT)                                                                   \
    static inline V name(V x) {                                                                                 \
        x = P##_max_ps(P##_min_ps(x, P##_set1_ps(88.3762626647949f)), P##_set1_ps(-88.3762626647949f));          \
        const V fx = FLOOR(P##_fmadd_ps(x, P##_set1_ps(1.44269504088896341f), P##_set1_ps(0.5f)));             \
        x = P##_fnmadd_ps(fx, P##_set1_ps(0.693359375f), x);                                                    \
        x = P##_fnmadd_ps(fx, P##_set1_ps(-2.12194440e-4f), x);                                                 \
        V y = P##_set1_ps(1.9875691500e-4f);                                                                    \
        y = P##_fmadd_ps(y, x, P##_set1_ps(1.3981999507e-3f));                                                  \
        y = P##_fmadd_ps(y, x, P##_set1_ps(8.3334519073e-3f));                                                  \
        y = P##_fmadd_ps(y, x, P##_set1_ps(4.1665795894e-2f));                                                  \
        y = P##_fmadd_ps(y, x, P##_set1_ps(1.6666665459e-1f));                                                  \
        y = P##_fmadd_ps(y, x, P##_set1_ps(5.0000001201e-1f));                                                  \
        y = P##_fmadd_ps(y, P##_mul_ps(x, x), P##_add_ps(x, P##_set1_ps(1.f)));                                 \
        const VI e = P##_slli_epi32(P##_add_epi32(P##_cvttps_epi32(fx), P##_set1_epi32(127)), 23);            \
        return P##_mul_ps(y, AS_FLOAT(e));                                                                      \
    }
#ifdef FM_AVX2
FM_EXP(fm_exp8, __m256, __m256i, _mm256, _mm256_floor_ps, _mm256_castsi256_ps)
#endif
#ifdef FM_AVX512
static inline __m512 fm_floor16(__m512 x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
FM_EXP(fm_exp16, __m512, __m512i, _mm512, fm_floor16, _mm512_castsi512_ps)
#endif

/* v[i] = exp(v[i] - shift); returns the sum. */
static inline float fm_exp_shifted(float *v, int n, float shift) {
    int i = 0;
    float sum = 0.f;
#ifdef FM_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = fm_exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), _mm256_set1_ps(shift)));
        _mm256_storeu_ps(v + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; i < n; i++) v[i] = expf(v[i] - shift), sum += v[i];
    return sum;
}

static inline void fm_axpy(float a, const float *x, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];  /* vectorised by the compiler (no reduction) */
}

#endif
