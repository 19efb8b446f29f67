/* The machine probes `fromage bench` times between its runs: the streaming reads it measures the read
 * bandwidth with (its roofline), and a loop of FMAs on registers, the cores' arithmetic rate at the time.
 *
 * The streaming reads. Each thread reads its share of the array as `streams` forward streams side by side
 * (the decoder's one-row kernels read one per thread: a claimed chunk's panels in turn), several vectors of a
 * stream at a time into separate sums, so that no chain of adds bounds a stream. The share is either one
 * contiguous part per thread, or pieces taken in turn, so that the threads read near each other. */
#include "kernels.h"
#include <stddef.h>
#include <stdint.h>
#include <omp.h>

/* The sum of `streams` runs of `each` floats (each a multiple of 32) from a, read side by side. */
static inline __attribute__((always_inline)) float read_streams(const float *a, size_t each, const int streams) {
#ifdef FM_AVX2
    const int U = streams >= 4 ? 1 : 4 / streams;  /* vectors of a run per step, each into its own sum: 4 sums in all */
    __m256 acc[8][4];
    for (int s = 0; s < streams; s++)
        for (int u = 0; u < U; u++) acc[s][u] = _mm256_setzero_ps();
    for (size_t i = 0; i < each; i += 8 * U)
        for (int s = 0; s < streams; s++)
            for (int u = 0; u < U; u++) acc[s][u] = _mm256_add_ps(acc[s][u], _mm256_loadu_ps(a + s * each + i + 8 * u));
    __m256 total = _mm256_setzero_ps();
    for (int s = 0; s < streams; s++)
        for (int u = 0; u < U; u++) total = _mm256_add_ps(total, acc[s][u]);
    return hsum(total);
#else
    float total = 0.f;
    for (size_t i = 0; i < each; i++)
        for (int s = 0; s < streams; s++) total += a[s * each + i];
    return total;
#endif
}

float fm_stream_read(const float *a, size_t n, int streams, size_t piece) {
    streams = streams >= 8 ? 8 : streams >= 4 ? 4 : streams >= 2 ? 2 : 1;
    float total = 0.f;
#pragma omp parallel reduction(+ : total)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const size_t share = piece ? piece : n / nt, each = share / ((size_t)streams * 32) * 32;
        for (size_t start = (size_t)id * share; start + share <= n; start += piece ? (size_t)nt * share : n) {
            const float *mine = a + start;
            switch (streams) {  /* a constant count each, so the accumulators stay in registers */
                case 8: total += read_streams(mine, each, 8); break;
                case 4: total += read_streams(mine, each, 4); break;
                case 2: total += read_streams(mine, each, 2); break;
                default: total += read_streams(mine, each, 1);
            }
        }
    }
    return total;
}

/* The FMA loop: each thread updates FMA_CHAINS independent vectors by fused multiply-adds, iterations times:
 * more chains than an FMA's latency times the FMAs a core issues per cycle, so the loop runs at the rate the
 * core gives this thread now (on shared machines that moves: another tenant's work takes the core's slots).
 * In the portable copy, a multiply and an add. */
#if defined(FM_AVX512)
typedef __m512 fma_vec;
#define VSET(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VFIRST(a) _mm512_cvtss_f32(a)
#elif defined(FM_AVX2)
typedef __m256 fma_vec;
#define VSET(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VFIRST(a) _mm256_cvtss_f32(a)
#else
typedef float fma_vec;
#define VSET(x) (x)
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VADD(a, b) ((a) + (b))
#define VFIRST(a) (a)
#endif
enum { FMA_CHAINS = 12 };
static volatile float fma_sink;  /* the loop's result, so that the compiler keeps the loop */

double fm_fma_loop(int64_t iterations) {
    double flops = 0.;
#pragma omp parallel reduction(+ : flops)
    {
        fma_vec acc[FMA_CHAINS];
        for (int i = 0; i < FMA_CHAINS; i++) acc[i] = VSET(0.001f * (float)i);
        const fma_vec m = VSET(0.9999f), c = VSET(0.0001f);
        for (int64_t k = 0; k < iterations; k++)
#pragma GCC unroll 12
            for (int i = 0; i < FMA_CHAINS; i++) acc[i] = VFMA(acc[i], m, c);
        for (int i = 1; i < FMA_CHAINS; i++) acc[0] = VADD(acc[0], acc[i]);
        fma_sink = VFIRST(acc[0]);
        flops += 2. * FMA_CHAINS * (double)(sizeof(fma_vec) / sizeof(float)) * (double)iterations;
    }
    return flops;
}

#ifdef FM_ISA_PORTABLE  /* plain C, the same in every copy: one, under its own name */
double fm_core_round_trip_here(int rounds) {  /* fm_core_round_trip's, on the decode thread (dispatch.c) */
    static volatile int64_t ball __attribute__((aligned(64)));
    double seconds = 0.;
    if (omp_get_max_threads() < 2) return 0.;
    ball = 0;
#pragma omp parallel num_threads(2)
    if (omp_get_num_threads() == 2) {
        const int me = omp_get_thread_num();
#pragma omp barrier
        const double start = omp_get_wtime();
        for (int64_t i = 0; i < rounds; i++) {  /* thread 0 serves 2i + 1, thread 1 returns 2i + 2 */
            while (ball != 2 * i + me) {}
            ball = 2 * i + me + 1;
        }
        if (me == 0) {
            while (ball != 2 * (int64_t)rounds) {}
            seconds = omp_get_wtime() - start;
        }
    }
    return rounds > 0 ? seconds / rounds * 1e9 : 0.;
}
#endif
