/* The decoder's forward pass: for each layer RMSNorm, QKV, rotary + KV cache append, causal
 * grouped-query attention, O projection, RMSNorm, gate/up, SiLU * up, down projection; then the
 * last position's logits and retrieval embedding. The same computation as export/llama_graph.py.
 * One path for every call: rows, each a sequence's next position (a batch) or a prompt's positions on one cache
 * (fm_forward), through forward_rows; one row alone through layers_one_row, several through layers_rows. */
#include "kernels.h" /* first: it names this copy's functions and sets the instruction set (FM_ISA) */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "half.h"

static void rms_norm_row(const float *x, const float *w, float *out, int E, float eps) {
    const float r = 1.f / sqrtf(fm_dot(x, x, E) / E + eps);
    for (int i = 0; i < E; i++) out[i] = x[i] * r * w[i];
}

/* rotate_half rotary on one head vector at one position (cos/sin rows of head_dim/2). */
static void rotate(float *v, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
    }
}

/* ATT_BLOCK cache positions per partial softmax, and per tile: a layer's cache is its blocks of ATT_BLOCK positions
 * in order, each holding its KV groups' tiles side by side (so the first positions of a cache are the first elements
 * of its buffers, whatever its capacity, and a run of (block, group) items is one forward stream). A key tile is
 * dimension-major (d rows of ATT_BLOCK floats), so a block's scores are ATT_BLOCK lanes of multiply-adds with no
 * sums across a vector; a value tile is position-major.
 * Up to FUSED_HEADS query heads of a group read each key and value once (AVX-512: 32 vector registers). */
enum { ATT_BLOCK = FM_KV_BLOCK, FUSED_HEADS = 3 };
/* (block, group) tiles whose scores a thread computes before their values, at most: up to 32 x 16 KiB of keys,
 * then of values; the scores, 24 KiB, stay in cache between the two. */
enum { STAGED_BLOCKS = 32 };

/* Where the tile of block b, group g starts in a layer's key or value cache of KV groups (elements). */
static inline size_t tile_at(int b, int g, int KV, int d) { return ((size_t)b * KV + g) * ATT_BLOCK * d; }

/* A (head, block) partial of attention: the sum of exp(score - top) * value (d floats), then the block's top score
 * and the sum of exp(score - top), in whole 64-byte lines (a partial is written as whole lines, and two threads'
 * partials never share one). */
static inline size_t partial_floats(int d) { return ((size_t)d + 2 + 15) / 16 * 16; }

/* A KV cache's element: an fp32 float, or an fp16 half (fm_model.kv_half). */
static inline void *kv_at(void *cache, size_t elements, int half) { return (char *)cache + (elements << (half ? 1 : 2)); }

/* dst = src (n floats) as halves, rounded to nearest even (F16C and fm_float_to_half give the same bits). */
static void to_halves(const float *src, uint16_t *dst, int n) {
    int i = 0;
#ifdef FM_AVX2
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = fm_float_to_half(src[i]);
}

/* dst = src (n halves) as floats. */
static void from_halves(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
#ifdef FM_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = fm_half_to_float(src[i]);
}

/* Appends group g's key k and value v at position p of the cache. */
static void append_group(const fm_model *m, const float *k, const float *v, int g, int p, void *kc, void *vc) {
    const int d = m->head_dim;
    const size_t base = tile_at(p / ATT_BLOCK, g, m->n_kv, d), s = (size_t)(p % ATT_BLOCK);
    const size_t tile = base + s, at = base + s * d;  /* the key's column of its tile, the value's row */
    if (m->kv_half) {
        uint16_t *kt = kv_at(kc, tile, 1), kh[d];
        to_halves(k, kh, d);
        for (int i = 0; i < d; i++) kt[(size_t)i * ATT_BLOCK] = kh[i];
        to_halves(v, kv_at(vc, at, 1), d);
    } else {
        float *kt = kv_at(kc, tile, 0);
        for (int i = 0; i < d; i++) kt[(size_t)i * ATT_BLOCK] = k[i];
        memcpy(kv_at(vc, at, 0), v, sizeof(float) * d);
    }
}

/* Rotates a row's q and k (qkv (width)) in place for position p and appends its k and v to the cache. */
static void rope_and_append(const fm_model *m, float *row, int p, void *kc, void *vc) {
    const int H = m->n_heads, KV = m->n_kv, d = m->head_dim, half = d / 2;
    const float *c = m->cos + (size_t)p * half, *s = m->sin + (size_t)p * half;
    for (int h = 0; h < H + KV; h++) rotate(row + h * d, c, s, half);
    for (int g = 0; g < KV; g++) append_group(m, row + (H + g) * d, row + (H + KV + g) * d, g, p, kc, vc);
}

/* sc[s] = q . k[s] * scale for the ATT_BLOCK keys of one tile (kt: d rows of ATT_BLOCK floats), every
 * lane computed (a block's lanes past its last position hold whatever the cache has and are not used). */
static void block_scores(const float *q, const float *kt, int d, float scale, float *sc) {
#ifdef FM_AVX2
    __m256 acc[ATT_BLOCK / 8];
    for (int j = 0; j < ATT_BLOCK / 8; j++) acc[j] = _mm256_setzero_ps();
    for (int i = 0; i < d; i++) {
        const __m256 qi = _mm256_set1_ps(q[i]);
        for (int j = 0; j < ATT_BLOCK / 8; j++)
            acc[j] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(kt + (size_t)i * ATT_BLOCK + 8 * j), acc[j]);
    }
    for (int j = 0; j < ATT_BLOCK / 8; j++) _mm256_storeu_ps(sc + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(scale)));
#else
    float acc[ATT_BLOCK] = {0};
    for (int i = 0; i < d; i++)
        for (int s = 0; s < ATT_BLOCK; s++) acc[s] += q[i] * kt[(size_t)i * ATT_BLOCK + s];
    for (int s = 0; s < ATT_BLOCK; s++) sc[s] = acc[s] * scale;
#endif
}

/* o = sum_s p[s] * v[s] for the n cached values v (n, d); 64 of o's d values at a time in registers. */
static void weighted_values(const float *p, const float *v, int n, int d, float *o) {
    int i = 0;
#ifdef FM_AVX512
    /* 64 of o's values in 4 vectors, two positions at a time on two sets of accumulators: the chain
     * of dependent FMAs is half as long (one position at a time, the loop waited on FMA latency) */
    for (; i + 64 <= d; i += 64) {
        __m512 a[4], b[4];
        for (int j = 0; j < 4; j++) a[j] = b[j] = _mm512_setzero_ps();
        int s = 0;
        for (; s + 2 <= n; s += 2) {
            const __m512 ps = _mm512_set1_ps(p[s]), qs = _mm512_set1_ps(p[s + 1]);
            const float *vs = v + (size_t)s * d + i, *ws = vs + d;
            for (int j = 0; j < 4; j++) {
                a[j] = _mm512_fmadd_ps(ps, _mm512_loadu_ps(vs + 16 * j), a[j]);
                b[j] = _mm512_fmadd_ps(qs, _mm512_loadu_ps(ws + 16 * j), b[j]);
            }
        }
        if (s < n) {
            const __m512 ps = _mm512_set1_ps(p[s]);
            for (int j = 0; j < 4; j++) a[j] = _mm512_fmadd_ps(ps, _mm512_loadu_ps(v + (size_t)s * d + i + 16 * j), a[j]);
        }
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(o + i + 16 * j, _mm512_add_ps(a[j], b[j]));
    }
#endif
#ifdef FM_AVX2
    for (; i + 64 <= d; i += 64) {  /* 8 accumulators: 8 independent chains of FMAs keep both FMA units busy */
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int s = 0; s < n; s++) {
            const __m256 ps = _mm256_broadcast_ss(p + s);
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + (size_t)s * d + i + 8 * j), a[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(o + i + 8 * j, a[j]);
    }
    for (; i + 32 <= d; i += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int s = 0; s < n; s++) {
            const __m256 ps = _mm256_broadcast_ss(p + s);
            const float *vs = v + (size_t)s * d + i;
            a0 = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vs), a0);
            a1 = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vs + 8), a1);
            a2 = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vs + 16), a2);
            a3 = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vs + 24), a3);
        }
        _mm256_storeu_ps(o + i, a0), _mm256_storeu_ps(o + i + 8, a1);
        _mm256_storeu_ps(o + i + 16, a2), _mm256_storeu_ps(o + i + 24, a3);
    }
#endif
    if (i < d) {
        memset(o + i, 0, sizeof(float) * (d - i));
        for (int s = 0; s < n; s++) fm_axpy(p[s], v + (size_t)s * d + i, o + i, d - i);
    }
}

#ifdef FM_AVX512
/* The 16 cache elements from element i of p, as floats (half: p holds fp16 halves). */
static inline __attribute__((always_inline)) __m512 load16(const void *p, size_t i, const int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)))
                : _mm512_loadu_ps((const float *)p + i);
}

/* block_scores for the G heads q (G * d) at once, the tile's first 16 * V lanes: sc[h * ATT_BLOCK + s]. Each
 * key row is loaded once for the G heads, and each head's lanes are summed in block_scores's order. */
static inline __attribute__((always_inline)) void scores_heads(const float *q, const int G, const int V, const int half,
                                                               const void *kt, int d, float scale, float *sc) {
    __m512 acc[FUSED_HEADS][ATT_BLOCK / 16];
    for (int h = 0; h < G; h++)
        for (int j = 0; j < V; j++) acc[h][j] = _mm512_setzero_ps();
    for (int i = 0; i < d; i++) {
        __m512 k[ATT_BLOCK / 16];
        for (int j = 0; j < V; j++) k[j] = load16(kt, (size_t)i * ATT_BLOCK + 16 * j, half);
        for (int h = 0; h < G; h++) {
            const __m512 qi = _mm512_set1_ps(q[(size_t)h * d + i]);
            for (int j = 0; j < V; j++) acc[h][j] = _mm512_fmadd_ps(qi, k[j], acc[h][j]);
        }
    }
    for (int h = 0; h < G; h++)
        for (int j = 0; j < V; j++) _mm512_storeu_ps(sc + (size_t)h * ATT_BLOCK + 16 * j, _mm512_mul_ps(acc[h][j], _mm512_set1_ps(scale)));
}

/* A partial's whole line v at p: stored past the caches (streamed) when another core will read it. */
static inline __attribute__((always_inline)) void store_line(float *p, __m512 v, int streamed) {
    if (streamed) _mm512_stream_ps(p, v);
    else _mm512_store_ps(p, v);
}

/* For each of the G heads' first n scores (sc[h * ATT_BLOCK + s]): their top, exp(score - top) in place
 * and its sum, into the line after head h's partial sums (part + h * stride + d: partial_floats); streamed: a bit
 * per head whose partial another thread merges. */
static inline void softmax_heads(const int G, int n, int d, float *sc, float *part, size_t stride, unsigned streamed) {
    enum { L = ATT_BLOCK / 16 };
    __mmask16 live[L];
    for (int j = 0; j < L; j++) {
        const int left = n - 16 * j;
        live[j] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    }
    for (int h = 0; h < G; h++) {
        float *row = sc + (size_t)h * ATT_BLOCK;
        __m512 x[L], top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int j = 0; j < L; j++) {
            x[j] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live[j], row + 16 * j);
            top = _mm512_max_ps(top, x[j]);
        }
        const float t = _mm512_reduce_max_ps(top);
        for (int j = 0; j < L; j++) {
            const __m512 e = _mm512_maskz_mov_ps(live[j], fm_exp16(_mm512_sub_ps(x[j], _mm512_set1_ps(t))));
            _mm512_storeu_ps(row + 16 * j, e);
            sum = _mm512_add_ps(sum, e);
        }
        store_line(part + h * stride + d, _mm512_zextps128_ps512(_mm_setr_ps(t, _mm512_reduce_add_ps(sum), 0.f, 0.f)),
                   streamed >> h & 1);
    }
}

/* weighted_values for G heads at once (d a multiple of 64): o_h = part + h * stride (streamed: softmax_heads). Each
 * value vector is loaded once for the G heads; each head sums in weighted_values's order. */
static inline __attribute__((always_inline)) void weighted_values_heads(const float *p, const int G, const int half,
                                                                        const void *v, int n, int d, float *part,
                                                                        size_t stride, unsigned streamed) {
    for (int i = 0; i < d; i += 64) {
        __m512 a[FUSED_HEADS][4], b[FUSED_HEADS][4];
        for (int h = 0; h < G; h++)
            for (int j = 0; j < 4; j++) a[h][j] = b[h][j] = _mm512_setzero_ps();
        int s = 0;
        for (; s + 2 <= n; s += 2) {
            __m512 vs[4];
            for (int j = 0; j < 4; j++) vs[j] = load16(v, (size_t)s * d + i + 16 * j, half);
            for (int h = 0; h < G; h++) {
                const __m512 ps = _mm512_set1_ps(p[(size_t)h * ATT_BLOCK + s]);
                for (int j = 0; j < 4; j++) a[h][j] = _mm512_fmadd_ps(ps, vs[j], a[h][j]);
            }
            for (int j = 0; j < 4; j++) vs[j] = load16(v, (size_t)(s + 1) * d + i + 16 * j, half);
            for (int h = 0; h < G; h++) {
                const __m512 qs = _mm512_set1_ps(p[(size_t)h * ATT_BLOCK + s + 1]);
                for (int j = 0; j < 4; j++) b[h][j] = _mm512_fmadd_ps(qs, vs[j], b[h][j]);
            }
        }
        if (s < n)
            for (int h = 0; h < G; h++) {
                const __m512 ps = _mm512_set1_ps(p[(size_t)h * ATT_BLOCK + s]);
                for (int j = 0; j < 4; j++) a[h][j] = _mm512_fmadd_ps(ps, load16(v, (size_t)s * d + i + 16 * j, half), a[h][j]);
            }
        for (int h = 0; h < G; h++)
            for (int j = 0; j < 4; j++)
                store_line(part + h * stride + i + 16 * j, _mm512_add_ps(a[h][j], b[h][j]), streamed >> h & 1);
    }
}

#endif

/* A block is attended in two stages: the scores of a group's G query heads (q, G * d) over the block's
 * key tile kt (sc: G * ATT_BLOCK floats), then their softmax pieces and values. A thread runs the first stage over
 * many blocks before the second, so it reads its keys, then its values, as long forward streams. An fp16 cache (half)
 * is converted as it is read: in registers by the AVX-512 copy, a tile at a time by the others. */
static void group_scores(const float *q, int G, const void *kt, int half, int n, int d, float scale, float *sc) {
#ifdef FM_AVX512
    if (d % 64 == 0 && G <= FUSED_HEADS) {
        /* constant head and vector counts each, so the accumulators stay in registers; only the vectors of
         * 16 positions that hold some of the n (a short sequence's one block, a cache's last) */
#define SCORES_HEADS(g, h) switch ((n + 15) / 16) { \
            case 1: scores_heads(q, g, 1, h, kt, d, scale, sc); return; \
            case 2: scores_heads(q, g, 2, h, kt, d, scale, sc); return; \
            case 3: scores_heads(q, g, 3, h, kt, d, scale, sc); return; \
            default: scores_heads(q, g, 4, h, kt, d, scale, sc); return; }
        switch (G * 2 + (half != 0)) {
            case 6: SCORES_HEADS(3, 0)
            case 7: SCORES_HEADS(3, 1)
            case 4: SCORES_HEADS(2, 0)
            case 5: SCORES_HEADS(2, 1)
            case 2: SCORES_HEADS(1, 0)
            case 3: SCORES_HEADS(1, 1)
        }
#undef SCORES_HEADS
    }
#endif
    (void)n;  /* the other copies score the whole tile */
    float tile[half ? (size_t)d * ATT_BLOCK : 1];
    if (half) from_halves(kt, tile, (size_t)d * ATT_BLOCK);
    for (int j = 0; j < G; j++) block_scores(q + (size_t)j * d, half ? tile : kt, d, scale, sc + (size_t)j * ATT_BLOCK);
}

/* From the scores sc of the n positions of one block, whose values are v (n, d): head j's partial (partial_floats)
 * at part + j * stride: the sum of exp(score - m) * v (d floats), the top score m, the sum of exp(score - m).
 * The values (16 KiB for d = 64) are read once for all G heads. streamed: a bit per head whose partial another
 * thread merges, stored past the caches (the AVX-512 copy; the others store every partial alike). */
static void group_values(int G, const void *v, int half, int n, int d, float *sc, float *part, size_t stride,
                         unsigned streamed) {
#ifdef FM_AVX512
    if (d % 64 == 0 && G <= FUSED_HEADS) {
        softmax_heads(G, n, d, sc, part, stride, streamed);
        switch (G * 2 + (half != 0)) {
            case 6: weighted_values_heads(sc, 3, 0, v, n, d, part, stride, streamed); return;
            case 7: weighted_values_heads(sc, 3, 1, v, n, d, part, stride, streamed); return;
            case 4: weighted_values_heads(sc, 2, 0, v, n, d, part, stride, streamed); return;
            case 5: weighted_values_heads(sc, 2, 1, v, n, d, part, stride, streamed); return;
            case 2: weighted_values_heads(sc, 1, 0, v, n, d, part, stride, streamed); return;
            case 3: weighted_values_heads(sc, 1, 1, v, n, d, part, stride, streamed); return;
        }
    }
#endif
    (void)streamed;
    float values[half ? (size_t)n * d : 1];
    if (half) from_halves(v, values, (size_t)n * d);
    for (int j = 0; j < G; j++, part += stride) {
        float *row = sc + (size_t)j * ATT_BLOCK, top = -INFINITY;
        int s = 0;
#ifdef FM_AVX2
        __m256 m = _mm256_set1_ps(-INFINITY);
        for (; s + 8 <= n; s += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + s));
        const __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        const __m128 q = _mm_max_ps(h, _mm_movehl_ps(h, h));
        top = _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
#endif
        for (; s < n; s++) top = row[s] > top ? row[s] : top;
        part[d] = top, part[d + 1] = fm_exp_shifted(row, n, top);
        weighted_values(row, half ? values : v, n, d, part);
    }
}

/* Blocks that hold n cached positions, and the positions in block b of them. */
static inline int blocks_of(int n) { return (n + ATT_BLOCK - 1) / ATT_BLOCK; }
static inline int block_len(int b, int n) { return n - b * ATT_BLOCK < ATT_BLOCK ? n - b * ATT_BLOCK : ATT_BLOCK; }

/* Items i0..i1 of a sequence's n cached positions, item = block * KV + group (their tiles, in this order, are one
 * forward stream of keys and one of values): the scores of up to STAGED_BLOCKS items, then their values. q: the
 * sequence's H = KV * G rotated query heads; kc, vc: its layer's caches; part: its partials, head h's block b at
 * h * per_head + b * partial_floats(d); sc: the thread's scores (thread_scores); streamed: NULL, or for each group a
 * bit per head (of its G) whose partials another thread merges (group_values), fenced before return. */
static void attend_items(const float *q, int KV, int G, void *kc, void *vc, int half, int i0, int i1, int n, int d,
                         float scale, float *sc, float *part, size_t per_head, const unsigned *streamed) {
    const size_t group = (size_t)G * ATT_BLOCK;
    for (int first = i0; first < i1; first += STAGED_BLOCKS) {
        const int last = first + STAGED_BLOCKS < i1 ? first + STAGED_BLOCKS : i1;
        for (int it = first; it < last; it++)
            group_scores(q + (size_t)(it % KV) * G * d, G, kv_at(kc, tile_at(it / KV, it % KV, KV, d), half), half,
                         block_len(it / KV, n), d, scale, sc + (it - first) * group);
        for (int it = first; it < last; it++)
            group_values(G, kv_at(vc, tile_at(it / KV, it % KV, KV, d), half), half, block_len(it / KV, n), d,
                         sc + (it - first) * group,
                         part + (size_t)(it % KV) * G * per_head + (it / KV) * partial_floats(d), per_head,
                         streamed ? streamed[it % KV] : 0);
    }
#ifdef FM_AVX512
    if (streamed) _mm_sfence();  /* the streamed lines reach memory before the threads' barrier */
#endif
}

/* One head's output (d) from its blocks' partials (part + b * partial_floats(d), b < blocks), in block order. */
static void merge_blocks(const float *part, int blocks, int d, float *out) {
    const size_t stride = partial_floats(d);
    float top = -INFINITY, total = 0.f;
    for (int b = 0; b < blocks; b++) top = part[b * stride + d] > top ? part[b * stride + d] : top;
    memset(out, 0, sizeof(float) * d);
    for (int b = 0; b < blocks; b++) {
        const float *pb = part + b * stride, w = expf(pb[d] - top);
        total += w * pb[d + 1];
        fm_axpy(w, pb, out, d);
    }
    for (int i = 0; i < d; i++) out[i] /= total;
}

/* Floats of scores a thread's attention needs: STAGED_BLOCKS items' G heads. */
static size_t thread_scores(const fm_model *m) { return (size_t)STAGED_BLOCKS * (m->n_heads / m->n_kv) * ATT_BLOCK; }

/* Where each sequence of a batched step has its attention work, the same for every layer: sequence b's
 * (block, group) items are item[b] .. item[b + 1] - 1 (attend_items' order), its partials start part[b] floats in. */
typedef struct { const size_t *item, *part; } batch_layout;

/* The sequence of item `it` of a batched step (searched from `from`). */
static int batch_sequence(const batch_layout *lay, size_t it, int from) {
    int s = from;
    while (it >= lay->item[s + 1]) s++;
    return s;
}

/* Attention of one new position per sequence (qkv (B, width)) over each sequence's cache: the threads
 * share the (sequence, block, group) items, a few runs of them each (a claim's items of one sequence are one
 * stream of keys and one of values: attend_items), then the sequences' heads' merges (each head merges
 * its blocks in order), so a sequence's result does not depend on the others. part: the
 * partials (lay); sc: thread_scores(m) floats per thread. Called by every thread of a team: its loops share the
 * work, each ending with the team's barrier. */
static void attention_items(const fm_model *m, const float *qkv, int B, const int32_t *past, void *const *kc,
                            void *const *vc, int layer, const batch_layout *lay, float *out, float *part, float *sc) {
    const int H = m->n_heads, KV = m->n_kv, G = H / KV, d = m->head_dim, width = (H + 2 * KV) * d, half = m->kv_half;
    const float scale = 1.f / sqrtf((float)d);
    const size_t items = lay->item[B];
    const size_t per_thread = items / (4 * (size_t)omp_get_num_threads());  /* a few claims each, at least */
    const size_t chunk = per_thread < 1 ? 1 : per_thread;
    const size_t claims = (items + chunk - 1) / chunk;
    float *mine = sc + (size_t)omp_get_thread_num() * thread_scores(m);
    int seq = 0;  /* the sequence of this thread's last item: its claims come in increasing order (monotonic) */
#pragma omp for schedule(monotonic: dynamic, 1) /* a preempted thread does not hold the step up */
    for (size_t c = 0; c < claims; c++) {
        const size_t end = (c + 1) * chunk < items ? (c + 1) * chunk : items;
        for (size_t it = c * chunk; it < end;) {  /* the claim's runs of one sequence */
            const int b = seq = batch_sequence(lay, it, seq), n = past[b] + 1;
            const size_t stop = end < lay->item[b + 1] ? end : lay->item[b + 1];
            attend_items(qkv + (size_t)b * width, KV, G, kc[(size_t)b * m->n_layers + layer],
                         vc[(size_t)b * m->n_layers + layer], half, (int)(it - lay->item[b]), (int)(stop - lay->item[b]),
                         n, d, scale, mine, part + lay->part[b], blocks_of(n) * partial_floats(d), NULL);
            it = stop;
        }
    }
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int blocks = blocks_of(past[b] + 1);
            merge_blocks(part + lay->part[b] + h * blocks * partial_floats(d), blocks, d, out + ((size_t)b * H + h) * d);
        }
}

/* Attention of a decoding step of one sequence, called by every thread of the step's team (layers_one_row) after qkv:
 * the (block, group) items in equal runs, one per thread (one stream of keys and one of values each), so that no
 * thread claims work from a shared counter; the thread whose run holds a group's item of the last block rotates that
 * group's key and appends it and its value itself, and every thread rotates its groups' query heads into its own copy.
 * So no thread waits for the cache append, and the new key's lines are written and read by one core. Each thread then
 * merges an equal run of the heads; where the cores share no cache (fm_partials_streamed), a thread stores the
 * partials of the heads another thread merges past its caches, so that the next layer's partials do not wait, line by
 * line, for the other core's copies to be dropped. The same operations on the same values as rope_and_append and
 * attention_items: the same bits. */
static void attention_one_row(const fm_model *m, float *qkv, int past, void *kc, void *vc, float *out, float *part,
                              float *sc) {
    const int H = m->n_heads, KV = m->n_kv, G = H / KV, d = m->head_dim, half = m->kv_half, n = past + 1;
    const int blocks = blocks_of(n), items = KV * blocks, threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int from = (int)((int64_t)items * id / threads), to = (int)((int64_t)items * (id + 1) / threads);
    const float scale = 1.f / sqrtf((float)d), *c = m->cos + (size_t)past * (d / 2), *s = m->sin + (size_t)past * (d / 2);
    float q[H * d];  /* the query heads of the groups of its items, rotated */
    for (int g = 0; g < KV; g++) {
        if (to - from < KV && (g - from % KV + KV) % KV >= to - from) continue;  /* no item of group g */
        memcpy(q + (size_t)g * G * d, qkv + (size_t)g * G * d, sizeof(float) * G * d);
        for (int j = 0; j < G; j++) rotate(q + ((size_t)g * G + j) * d, c, s, d / 2);
        if ((blocks - 1) * KV + g >= from && (blocks - 1) * KV + g < to) {  /* its item of the last block */
            float *k = qkv + (size_t)(H + g) * d;
            rotate(k, c, s, d / 2);
            append_group(m, k, qkv + (size_t)(H + KV + g) * d, g, past, kc, vc);
        }
    }
    const size_t per_head = blocks * partial_floats(d);
    const int h0 = H * id / threads, h1 = H * (id + 1) / threads;  /* the heads it merges */
    const int streaming = fm_partials_streamed && threads > 1;
    unsigned others[KV];  /* for each group, the heads another thread merges */
    for (int g = 0; streaming && g < KV; g++) {
        others[g] = 0;
        for (int j = 0; j < G; j++) others[g] |= (unsigned)(g * G + j < h0 || g * G + j >= h1) << j;
    }
    attend_items(q, KV, G, kc, vc, half, from, to, n, d, scale, sc + (size_t)id * thread_scores(m), part, per_head,
                 streaming ? others : NULL);
#pragma omp barrier
    for (int h = h0; h < h1; h++) merge_blocks(part + (size_t)h * per_head, blocks, d, out + (size_t)h * d);
#pragma omp barrier
}

/* out (I) = silu(gate) * up = gate / (1 + exp(-gate)) * up for one row's gate | up (2 I): ~1 us with vector exp. */
static void silu_row(const float *gate_up, int I, float *out) {
    const float *g = gate_up, *u = g + I;
    for (int i = 0; i < I; i++) out[i] = -g[i];
    fm_exp_shifted(out, I, 0.f);
    for (int i = 0; i < I; i++) out[i] = g[i] / (1.f + out[i]) * u[i];
}

/* x[i] += the sum of the parts' part[p * stride + i] in part order (the MLP's parts, fm_layer): one expression on every
 * path, so a row's bits do not depend on how its parts were computed. */
static void add_parts(float *x, const float *part, int n, int parts, size_t stride) {
    for (int i = 0; i < n; i++) {
        float sum = part[i];
        for (int p = 1; p < parts; p++) sum += part[p * stride + i];
        x[i] += sum;
    }
}

/* The retrieval head for the final-normed rows h (B, hidden): ret (B, retrieval_dim), L2-normalised. */
static int retrieval(const fm_model *m, const float *h, int B, float *ret) {
    const int R = m->retrieval_dim;
    const fm_linear wt = {FM_F32, m->hidden, R, 0, m->wt, NULL};
    if (fm_linear_rows(&wt, h, B, ret, (size_t)R, 0)) return -2;
    for (int b = 0; b < B; b++) {
        float *r = ret + (size_t)b * R, norm = 0.f;
        for (int i = 0; i < R; i++) r[i] += m->wt_bias[i], norm += r[i] * r[i];
        norm = sqrtf(norm) > 1e-12f ? sqrtf(norm) : 1e-12f;
        for (int i = 0; i < R; i++) r[i] /= norm;
    }
    return 0;
}

/* The model's MLP parts (fm_layer) are ones the decoder computes. */
static int mlp_parts_ok(const fm_model *m) {
    return m->mlp_parts >= 1 && m->mlp_parts <= FM_MLP_PARTS && m->inter % m->mlp_parts == 0;
}

/* buf[i] = the next sizes[i] floats of the decoder's scratch, each 64-byte aligned; -2 when out of memory. */
static int carve_scratch(const size_t *sizes, int n, float **buf) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += (sizes[i] + 15) / 16 * 16;
    float *ws = fm_scratch(1, total);
    if (!ws) return -2;
    for (int i = 0; i < n; i++) buf[i] = ws, ws += (sizes[i] + 15) / 16 * 16;
    return 0;
}

/* The logits of the final-normed rows h (n, hidden), (n, head.N + head_extra.N): the rows that want only their
 * top[i] largest (consecutive ones together) through the 8-bit copy of the head when the model has one. */
static int head_rows(const fm_model *m, const float *h, int n, const int32_t *top, float *logits) {
    const size_t V = (size_t)m->head.N + m->head_extra.N;
    const int usable = top && m->head.kind == FM_F32 && m->head_q8.kind == FM_NBITS && m->head_q8.bits == 8 &&
                       m->head_q8.K == m->head.K && m->head_q8.N == m->head.N && m->head_q8_bound;
    /* k > 1 only for a row alone: rows of a batched step are compute-bound, where the many panels a top-k row
     * computes exactly, each row for itself, cost more than its share of the whole head */
#define FEW(i) (usable && (top[i] == 1 || (top[i] > 1 && top[i] <= FM_MAX_TOP && n == 1)))
    int rc = 0;
    for (int i = 0, j; i < n; i = j) {
        const int few = FEW(i);
        for (j = i + 1; j < n && FEW(j) == few; j++) {}
        const float *x = h + (size_t)i * m->hidden;
        float *y = logits + (size_t)i * V;
        rc |= few ? fm_head_top(m, x, j - i, top + i, y, V) : fm_linear_rows(&m->head, x, j - i, y, V, 0);
    }
#undef FEW
    if (m->head_extra.N > 0) rc |= fm_linear_rows(&m->head_extra, h, n, logits + m->head.N, V, 0);
    return rc;
}

/* The largest of y[0..n) that is a number (NaN never counts), or -INFINITY. */
static float range_top(const float *y, size_t n) {
    size_t i = 0;
    float top = -INFINITY;
#ifdef FM_AVX2
    __m256 a = _mm256_set1_ps(-INFINITY), b = a;
    for (; i + 16 <= n; i += 16)  /* max_ps(x, a): a where x is NaN */
        a = _mm256_max_ps(_mm256_loadu_ps(y + i), a), b = _mm256_max_ps(_mm256_loadu_ps(y + i + 8), b);
    a = _mm256_max_ps(a, b);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; i < n; i++) top = y[i] > top ? y[i] : top;
    return top;
}

/* The first i < n with y[i] == v (there is one). */
static size_t first_equal(const float *y, size_t n, float v) {
    size_t i = 0;
#ifdef FM_AVX2
    for (const __m256 t = _mm256_set1_ps(v); i + 8 <= n; i += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(y + i), t, _CMP_EQ_OQ));
        if (hit) return i + (size_t)__builtin_ctz((unsigned)hit);
    }
#endif
    while (i < n && y[i] != v) i++;
    return i;
}

/* For each output row i with top[i] == 1 (a greedy row): best[i] = the column of its largest logit, the first of
 * equal ones, among all but the model's exact columns (head_q8_exact: the caller rescales them before it chooses);
 * -1 where no such logit is a number above -INFINITY, and for the other rows. The threads scan a part of each row
 * each (logits (n, V): the exact columns are set to -INFINITY meanwhile). */
static void best_columns(const fm_model *m, float *logits, size_t V, int n, const int32_t *top, int32_t *best) {
    const int threads = omp_get_max_threads(), n_exact = m->head_q8_n_exact;
    float kept[n_exact > 0 ? n_exact : 1], part_top[threads];
    size_t part_at[threads];
    for (int i = 0; i < n; i++) {
        best[i] = -1;
        if (!top || top[i] != 1) continue;
        float *y = logits + (size_t)i * V;
        for (int e = 0; e < n_exact; e++)
            if (m->head_q8_exact[e] >= 0 && (size_t)m->head_q8_exact[e] < V)
                kept[e] = y[m->head_q8_exact[e]], y[m->head_q8_exact[e]] = -INFINITY;
        for (int t = 0; t < threads; t++) part_top[t] = -INFINITY;
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            const size_t from = V * t / nt, to = V * (t + 1) / nt;
            part_top[t] = range_top(y + from, to - from);
            part_at[t] = part_top[t] > -INFINITY ? from + first_equal(y + from, to - from, part_top[t]) : 0;
        }
        for (int t = 0; t < threads; t++)  /* in column order: the first of equal ones */
            if (part_top[t] > -INFINITY && (best[i] < 0 || part_top[t] > y[best[i]])) best[i] = (int32_t)part_at[t];
        for (int e = n_exact - 1; e >= 0; e--)  /* in reverse: a column listed twice gets its own value back */
            if (m->head_q8_exact[e] >= 0 && (size_t)m->head_q8_exact[e] < V) y[m->head_q8_exact[e]] = kept[e];
    }
}

/* Floats of a decoding step's thread's own copies (layers_one_row): the residual, its norm, SiLU's output and a
 * part's gate | up. */
static size_t own_floats(const fm_model *m) { return (size_t)2 * m->hidden + 3 * (size_t)m->inter; }

enum { LAYER_CLAIMS = 2 + 2 * FM_MLP_PARTS };  /* a counter per matrix of a layer */

/* The layers of a decoding step of one sequence (forward_rows' B = 1) in one OpenMP team, not a team per matrix
 * and attention. Each thread keeps its own copy of the residual and normalises it itself, so that the ends of qkv,
 * o, attention's two stages and the MLP are the only places the threads wait for each other (the cache append is
 * attention_one_row's; the profile counts it in attention). Where the threads can share the MLP's parts out whole
 * (mlp_parts a multiple of the threads), each computes its parts alone, gate to down, into part[s] (E floats each):
 * no wait and no line from the other core between a part's gate and its down; else each of a part's matrices is
 * the team's. The same operations on the same values as the batched loop: the same bits. x: the residual, in
 * place; o_out: E floats; gu: 2 * inter floats; own: own_floats per thread. */
static int layers_one_row(const fm_model *m, float *x, int32_t past, void *const *k_cache,
                          void *const *v_cache, float *qkv, float *attn, float *o_out, float *gu, float *part_out,
                          float *own, float *part, float *sc, double *clock) {
    const int E = m->hidden, I = m->inter, n = m->n_layers, S = m->mlp_parts, Is = I / S;
    int rc = 0, *claims = calloc((size_t)LAYER_CLAIMS * n, sizeof(int));  /* each matrix's next chunk */
    if (!claims) return -2;
#pragma omp parallel
    {
        const int id = omp_get_thread_num(), nt = omp_get_num_threads(), alone = S % nt == 0;
        float *xo = own + (size_t)id * own_floats(m), *h = xo + E, *act = h + E, *gu_own = act + I;
        int mine = 0;
        double t = id == 0 ? *clock : -1.;  /* the calling thread's (fm_profile), waits included */
        memcpy(xo, x, sizeof(float) * E);
        for (int i = 0; i < n; i++) {
            const fm_layer *L = m->layers + i;
            int *next = claims + LAYER_CLAIMS * i;
            TIMED(FM_OP_NORM, rms_norm_row(xo, L->attn_norm, h, E, m->eps));
            TIMED(FM_OP_QKV, mine |= fm_linear_team(&L->qkv, h, qkv, 0, next));
            TIMED(FM_OP_ATTENTION, attention_one_row(m, qkv, past, k_cache[i], v_cache[i], attn, part, sc));
            TIMED(FM_OP_O, mine |= fm_linear_team(&L->o, attn, o_out, 0, next + 1); add_parts(xo, o_out, E, 1, 0));
            TIMED(FM_OP_NORM, rms_norm_row(xo, L->mlp_norm, h, E, m->eps));
            if (alone) {
                for (int s = id * S / nt; s < (id + 1) * S / nt; s++) {
                    TIMED(FM_OP_GATE_UP, mine |= fm_linear_alone(&L->gate_up[s], h, gu_own, 0));
                    TIMED(FM_OP_SILU, silu_row(gu_own, Is, act));
                    TIMED(FM_OP_DOWN, mine |= fm_linear_alone(&L->down[s], act, part_out + (size_t)s * E, 0));
                }
#pragma omp barrier
            } else {
                for (int s = 0; s < S; s++)
                    TIMED(FM_OP_GATE_UP, mine |= fm_linear_team(&L->gate_up[s], h, gu + (size_t)s * 2 * Is, 0, next + 2 + s));
                TIMED(FM_OP_SILU, for (int s = 0; s < S; s++) silu_row(gu + (size_t)s * 2 * Is, Is, act + (size_t)s * Is));
                for (int s = 0; s < S; s++)
                    TIMED(FM_OP_DOWN, mine |= fm_linear_team(&L->down[s], act + (size_t)s * Is, part_out + (size_t)s * E, 0,
                                                             next + 2 + FM_MLP_PARTS + s));
            }
            TIMED(FM_OP_DOWN, add_parts(xo, part_out, E, S, (size_t)E));
        }
        if (mine) __atomic_fetch_or(&rc, mine, __ATOMIC_RELAXED);
        if (id == 0) memcpy(x, xo, sizeof(float) * E), *clock = t;
    }
    free(claims);
    return rc ? -2 : 0;
}

/* The layers of a batched step or a prompt (forward_rows' B > 1) in one OpenMP team, not a team per matrix and
 * stage: the threads share each stage's rows or items and meet at its end (on two L3s a team's start costs several
 * times a barrier). The same operations on the same values as layers_one_row: the same bits. */
static int layers_rows(const fm_model *m, float *x, int B, const int32_t *past, void *const *k_cache,
                       void *const *v_cache, const batch_layout *lay, float *h, float *qkv, float *attn, float *gu,
                       float *act, float *parts, float *part, float *sc, double *clock) {
    const int E = m->hidden, H = m->n_heads, KV = m->n_kv, d = m->head_dim, S = m->mlp_parts, Is = m->inter / S;
    const size_t width = (size_t)(H + 2 * KV) * d, ld_x = (size_t)E;
    const float *in_h = h, *in_attn = attn, *in_gu[FM_MLP_PARTS], *in_down[FM_MLP_PARTS];
    float *out_gu[FM_MLP_PARTS], *out_down[FM_MLP_PARTS];  /* the parts' rows together: gu (S, B, 2 Is), act (S, B, Is) */
    size_t ld_gu[FM_MLP_PARTS], ld_down[FM_MLP_PARTS];
    for (int s = 0; s < S; s++) {
        in_gu[s] = h, out_gu[s] = gu + (size_t)s * B * 2 * Is, ld_gu[s] = (size_t)2 * Is;
        in_down[s] = act + (size_t)s * B * Is, out_down[s] = parts + (size_t)s * B * E, ld_down[s] = ld_x;
    }
    fm_rows_team st;
    int rc = 0;
#pragma omp parallel
    {
        double t = omp_get_thread_num() == 0 ? *clock : -1.;  /* the calling thread's (fm_profile), waits included */
        int failed = 0;  /* the same in every thread: the matrices' st.rc */
        for (int i = 0; i < m->n_layers && !failed; i++) {
            const fm_layer *L = m->layers + i;
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) rms_norm_row(x + (size_t)b * E, L->attn_norm, h + (size_t)b * E, E, m->eps);
            t = fm_op_done(FM_OP_NORM, t);
            TIMED(FM_OP_QKV, failed |= fm_linear_rows_team(&L->qkv, 1, &in_h, B, &qkv, &width, 0, &st));
            /* each row writes its own position (a prompt's rows share a cache, at different positions); the keys'
             * 64 lines per group are misses, which two threads wait on side by side */
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++)
                rope_and_append(m, qkv + b * width, past[b], k_cache[(size_t)b * m->n_layers + i],
                                v_cache[(size_t)b * m->n_layers + i]);
            t = fm_op_done(FM_OP_ROPE, t);
            TIMED(FM_OP_ATTENTION, attention_items(m, qkv, B, past, k_cache, v_cache, i, lay, attn, part, sc));
            TIMED(FM_OP_O, failed |= fm_linear_rows_team(&L->o, 1, &in_attn, B, &x, &ld_x, 1, &st));
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) rms_norm_row(x + (size_t)b * E, L->mlp_norm, h + (size_t)b * E, E, m->eps);
            t = fm_op_done(FM_OP_NORM, t);
            TIMED(FM_OP_GATE_UP, failed |= fm_linear_rows_team(L->gate_up, S, in_gu, B, out_gu, ld_gu, 0, &st));
#pragma omp for collapse(2) schedule(static)
            for (int s = 0; s < S; s++)
                for (int b = 0; b < B; b++)
                    silu_row(gu + ((size_t)s * B + b) * 2 * Is, Is, act + ((size_t)s * B + b) * Is);
            t = fm_op_done(FM_OP_SILU, t);
            failed |= fm_linear_rows_team(L->down, S, in_down, B, out_down, ld_down, 0, &st);
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) add_parts(x + (size_t)b * E, parts + (size_t)b * E, E, S, (size_t)B * E);
            t = fm_op_done(FM_OP_DOWN, t);
        }
        if (omp_get_thread_num() == 0) rc = failed, *clock = t;
    }
    return rc ? -2 : 0;
}

/* The layers and the head of a batched step (fm_forward_rows, its arguments checked). */
static int forward_rows(const fm_model *m, const float *embeds, int B, const int32_t *past, void *const *k_cache,
                        void *const *v_cache, int n_out, const int32_t *out_rows,
                        const int32_t *top, float *logits, float *ret, int32_t *best, const batch_layout *lay,
                        double *clock) {
    const int E = m->hidden, H = m->n_heads, KV = m->n_kv, d = m->head_dim, I = m->inter;
    const size_t width = (size_t)(H + 2 * KV) * d;
    const size_t sizes[] = {(size_t)B * E, (size_t)B * E, B * width, (size_t)B * H * d, (size_t)B * 2 * I,
                            (size_t)B * I, lay->part[B], (size_t)omp_get_max_threads() * thread_scores(m),
                            B == 1 ? (size_t)omp_get_max_threads() * own_floats(m) : 0, (size_t)m->mlp_parts * B * E};
    enum { N_BUFFERS = sizeof sizes / sizeof sizes[0] };
    float *buf[N_BUFFERS];
    if (carve_scratch(sizes, N_BUFFERS, buf)) return -2;
    float *x = buf[0], *h = buf[1], *qkv = buf[2], *attn = buf[3], *gu = buf[4], *act = buf[5], *part = buf[6], *sc = buf[7];
    float *parts = buf[9];
    int rc = 0;

    memcpy(x, embeds, sizeof(float) * B * E);
    double t = *clock;
    if (B == 1)
        rc = layers_one_row(m, x, past[0], k_cache, v_cache, qkv, attn, h, gu, parts, buf[8], part, sc, &t);
    else
        rc = layers_rows(m, x, B, past, k_cache, v_cache, lay, h, qkv, attn, gu, act, parts, part, sc, &t);
    if (rc) return -2;

    /* the head only for the rows that want outputs: a prompt's inner positions need none */
    for (int i = 0; i < n_out; i++)
        rms_norm_row(x + (size_t)(out_rows ? out_rows[i] : i) * E, m->final_norm, h + (size_t)i * E, E, m->eps);
    rc = n_out == 0 ? 0 : head_rows(m, h, n_out, top, logits) ? -2 : retrieval(m, h, n_out, ret);
    if (!rc && best) best_columns(m, logits, (size_t)m->head.N + m->head_extra.N, n_out, top, best);
    *clock = fm_op_done(FM_OP_HEAD, t);
    return rc;
}

/* Where each row's attention work and partials go (batch_layout), in layout (2 (B + 1) entries). */
static batch_layout layout_rows(const fm_model *m, int B, const int32_t *past, size_t *layout) {
    size_t *item = layout, *part = layout + B + 1;
    item[0] = part[0] = 0;
    for (int b = 0; b < B; b++) {
        const int blocks = blocks_of(past[b] + 1);
        item[b + 1] = item[b] + (size_t)m->n_kv * blocks;
        part[b + 1] = part[b] + (size_t)m->n_heads * blocks * partial_floats(m->head_dim);
    }
    return (batch_layout){item, part};
}

int fm_forward_rows(const fm_model *m, const float *embeds, int32_t B, const int32_t *past, const int32_t *capacity,
                    void *const *k_cache, void *const *v_cache, int32_t n_out, const int32_t *out_rows,
                    const int32_t *out_top, float *logits, float *ret, int32_t *out_best) {
    if (B < 1 || !mlp_parts_ok(m)) return -1;
    if (!out_rows) n_out = B;
    for (int i = 0; out_rows && i < n_out; i++)
        if (out_rows[i] < 0 || out_rows[i] >= B || (i > 0 && out_rows[i] <= out_rows[i - 1])) return -1;
    for (int b = 0; b < B; b++)
        if (past[b] < 0 || past[b] + 1 > capacity[b] || capacity[b] % ATT_BLOCK || past[b] + 1 > m->rope_positions)
            return -1;
    size_t *layout = malloc(sizeof(size_t) * 2 * ((size_t)B + 1));
    if (!layout) return -2;
    if (m->threads > 0) omp_set_num_threads(m->threads);  /* this calling thread's setting only */
    const batch_layout lay = layout_rows(m, B, past, layout);
    double t = fm_op_start();
    const int rc = forward_rows(m, embeds, B, past, k_cache, v_cache, n_out, out_rows, out_top, logits, ret,
                                out_best, &lay, &t);
    free(layout);
    return rc;
}

/* The most bytes of attention partials a prompt's rows take at once (a row's: n_heads blocks partials): a long
 * prompt runs in pieces of rows, each reading the weights once. */
enum { PROMPT_PARTIAL_BYTES = 8 << 20 };

/* A prompt is a batched step whose rows share one cache at consecutive positions (forward_rows): its T positions in
 * pieces of rows, the head for the last only. */
int fm_forward(const fm_model *m, const float *embeds, int32_t T, int32_t past, int32_t capacity,
               void *const *k_cache, void *const *v_cache, float *logits, float *ret) {
    if (T < 1 || past < 0 || past + T > capacity || capacity % ATT_BLOCK || past + T > m->rope_positions) return -1;
    if (!mlp_parts_ok(m)) return -1;
    const int n_layers = m->n_layers;
    const size_t row_bytes = sizeof(float) * m->n_heads * blocks_of(past + T) * partial_floats(m->head_dim);
    const size_t most = m->prompt_rows > 0 ? (size_t)m->prompt_rows : PROMPT_PARTIAL_BYTES / row_bytes;
    const int rows = most < 1 ? 1 : most < (size_t)T ? (int)most : T;
    int32_t *pasts = malloc(sizeof(int32_t) * rows);
    size_t *layout = malloc(sizeof(size_t) * 2 * ((size_t)rows + 1));
    void **k_rows = malloc(sizeof(void *) * 2 * (size_t)rows * n_layers);
    void **v_rows = k_rows ? k_rows + (size_t)rows * n_layers : NULL;
    int rc = pasts && layout && k_rows ? 0 : -2;
    for (int b = 0; !rc && b < rows; b++) {  /* every row on the one cache */
        memcpy(k_rows + (size_t)b * n_layers, k_cache, sizeof(void *) * n_layers);
        memcpy(v_rows + (size_t)b * n_layers, v_cache, sizeof(void *) * n_layers);
    }
    if (m->threads > 0) omp_set_num_threads(m->threads);  /* this calling thread's setting only */
    double t = fm_op_start();
    for (int first = 0; !rc && first < T; first += rows) {
        const int B = T - first < rows ? T - first : rows, last = B - 1, ends = first + B == T;
        for (int b = 0; b < B; b++) pasts[b] = past + first + b;
        const batch_layout lay = layout_rows(m, B, pasts, layout);
        rc = forward_rows(m, embeds + (size_t)first * m->hidden, B, pasts, k_rows, v_rows, ends,
                          ends ? &last : NULL, NULL, logits, ret, NULL, &lay, &t);
    }
    free(pasts), free(layout), free(k_rows);
    return rc;
}
