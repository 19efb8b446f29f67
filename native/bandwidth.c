/* The streaming reads `fromage bench` measures the machine's read bandwidth with (its roofline).
 * Each thread reads its share of the array as `streams` forward streams side by side: one core's
 * bandwidth is bounded by how far its prefetchers run ahead per stream, so several streams read
 * faster than one (on the 2-core CI machines: ~20 GB/s with one stream per thread, ~23-26 with
 * eight), and the decoder's kernels read that way too. The share is either one contiguous part per
 * thread, or pieces taken in turn, so that the threads read near each other. */
#include "kernels.h"
#include <stddef.h>
#include <omp.h>

/* The sum of `streams` runs of `each` floats (each a multiple of 8) from a, read side by side. */
static inline __attribute__((always_inline)) float read_streams(const float *a, size_t each, const int streams) {
#ifdef FM_AVX2
    __m256 acc[8];
    for (int s = 0; s < streams; s++) acc[s] = _mm256_setzero_ps();
    for (size_t i = 0; i < each; i += 8)
        for (int s = 0; s < streams; s++) acc[s] = _mm256_add_ps(acc[s], _mm256_loadu_ps(a + s * each + i));
    for (int s = 1; s < streams; s++) acc[0] = _mm256_add_ps(acc[0], acc[s]);
    return hsum(acc[0]);
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
        const size_t share = piece ? piece : n / nt, each = share / ((size_t)streams * 8) * 8;
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
