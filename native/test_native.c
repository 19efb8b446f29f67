/* Self-check of the native decoder on a tiny random model (ctest): a prefill gives the same bits as the same positions
 * fed one at a time (also with attention's partials streamed past the caches or kept), 4-bit blocks of weights on a
 * Q4_1 grid (and an 8-bit lm_head on a Q8_0 one) give the logits of their fp32 copy, and a batched step gives each
 * sequence exactly what its own step gives, and rows that want only their largest logits get them exactly from an
 * 8-bit copy of the head; with an fp16 KV cache the same, its logits within fp16's rounding of the fp32 cache's; and
 * calls from several threads at once get what each gets alone. Run by `ctest` after `cmake --build`; exit code 0 =
 * pass. */
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fromage_native.h"

/* I: 2 MLP parts of 5 blocks (I1: one part of 9); T: 3 attention blocks; D = 64 with 3 heads per KV group: the AVX-512 copy's fused
 * heads */
enum { LAYERS = 2, E = 64, H = 6, KV = 2, D = 64, I = 320, PARTS = 2, I1 = 288, V = 50, POS = 192, R = 8, T = 150 };

static unsigned rng = 12345;
static float frand(void) { rng = rng * 1664525u + 1013904223u; return (float)(rng >> 8) / (1 << 24) - 0.5f; }

static uint16_t to_half(float f) { /* exact for the values used here: small multiples of 2^-10 */
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = (v.u >> 16) & 0x8000, e = (v.u >> 23) & 255, m = v.u & 0x7FFFFF;
    if (f == 0.f) return (uint16_t)sign;
    return (uint16_t)(sign | ((e - 112) << 10) | (m >> 13));
}

/* w (K, N), an ONNX MatMul initializer, laid out as fm_linear.w. */
static float *packed(const float *w, int K, int N) {
    float *p = malloc(sizeof(float) * K * ((N + FM_PANEL - 1) / FM_PANEL * FM_PANEL));
    fm_pack(w, K, N, p);
    return p;
}

/* A (K, N) linear on a Q4_1 grid (bits 4) or a Q8_0 one (bits 8, the default LM's lm_head): fp32 copy in
 * *f32, the blocks in *q (fm_pack_nbits). */
static void make_linear(int K, int N, fm_linear *f32, fm_linear *qb, int bits) {
    float *w = malloc(sizeof(float) * K * N);
    const int nb = K / 32, block = 32 * bits / 8;
    uint8_t *q = calloc((size_t)N * nb, block);   /* MatMulNBits' (N, nb, block) */
    uint16_t *dm = calloc((size_t)N * 2 * nb, 2); /* per column [d | m] */
    for (int n = 0; n < N; n++)
        for (int b = 0; b < nb; b++) {
            const float d = (1 + (int)((frand() + 0.5f) * 8)) / 1024.f,
                        m = bits == 8 ? -128 * d : -8 * d + (int)(frand() * 4) / 1024.f;
            uint8_t *blk = q + ((size_t)n * nb + b) * block;
            for (int i = 0; i < 32; i++) {
                const int v = (int)((frand() + 0.5f) * (1 << bits)) & ((1 << bits) - 1);
                if (bits == 8) blk[i] = (uint8_t)v;
                else blk[i / 2] |= (uint8_t)(i & 1 ? v << 4 : v);
                w[(size_t)(b * 32 + i) * N + n] = d * v + m;
            }
            dm[(size_t)n * 2 * nb + b] = to_half(d), dm[(size_t)n * 2 * nb + nb + b] = to_half(m);
        }
    *f32 = (fm_linear){FM_F32, K, N, 0, packed(w, K, N), NULL};
    uint8_t *panels = aligned_alloc(64, (size_t)(N + FM_PANEL - 1) / FM_PANEL * nb * (64 + 16 * block));
    if (fm_pack_nbits(q, dm, K, N, bits, panels) || !fm_pack_nbits(q, dm, K, N, 3, panels) ||
        !fm_pack_nbits(q, dm, K + 1, N, bits, panels)) exit(3);
    free(w), free(q), free(dm);
    *qb = (fm_linear){FM_NBITS, K, N, bits, NULL, panels};
}

static float *randv(int n, float scale, float offset) {
    float *v = malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) v[i] = offset + scale * frand();
    return v;
}

static float max_diff(const float *a, const float *b, int n) {
    float d = 0.f;
    for (int i = 0; i < n; i++) d = fabsf(a[i] - b[i]) > d ? fabsf(a[i] - b[i]) : d;
    return d;
}

static void run(const fm_model *m, const float *emb, int steps, float *logits, float *ret) {
    void *k[LAYERS], *v[LAYERS];
    for (int i = 0; i < LAYERS; i++) k[i] = calloc(KV * POS * D, 4), v[i] = calloc(KV * POS * D, 4);
    if (steps == 1) {
        if (fm_forward(m, emb, T, 0, POS, k, v, logits, ret)) exit(2);
    } else {
        for (int t = 0; t < T; t++)
            if (fm_forward(m, emb + t * E, 1, t, POS, k, v, logits, ret)) exit(2);
    }
    for (int i = 0; i < LAYERS; i++) free(k[i]), free(v[i]);
}

/* Prefills from several threads at once, which the library's decode thread takes in turns (decode_thread.c):
 * 1 when each gets the bits the calling thread got alone. */
typedef struct {
    const fm_model *m;
    const float *emb;
    float logits[V], ret[R];
} prefill_call;

static void *prefill_in_thread(void *a) {
    prefill_call *c = a;
    run(c->m, c->emb, 1, c->logits, c->ret);
    return NULL;
}

static int threads_take_turns(const fm_model *m, const float *emb) {
    enum { CALLERS = 3 };
    prefill_call alone = {m, emb, {0}, {0}}, at_once[CALLERS];
    pthread_t callers[CALLERS];
    prefill_in_thread(&alone);
    for (int i = 0; i < CALLERS; i++) {
        at_once[i] = (prefill_call){m, emb, {0}, {0}};
        pthread_create(callers + i, NULL, prefill_in_thread, at_once + i);
    }
    int same = 1;
    for (int i = 0; i < CALLERS; i++) {
        pthread_join(callers[i], NULL);
        same &= !memcmp(at_once[i].logits, alone.logits, sizeof alone.logits) &&
                !memcmp(at_once[i].ret, alone.ret, sizeof alone.ret);
    }
    if (!same) printf("[%s] prefills from %d threads at once: not the bits of one alone\n", fm_kernels(), CALLERS);
    return same;
}

/* Sequences of different lengths and capacities, prefilled, then STEPS steps three ways: fm_forward_batch
 * for all (outputs for every row, or on odd steps for some rows only), fm_forward (T = 1) for each alone
 * on a copy of its cache, and fm_forward_batch of each alone (the one-sequence step) with 1 to 3 threads on
 * another copy. 1 when logits, ret and caches are bit-identical, and a batch with one sequence at its capacity,
 * or with output rows out of order, is refused. */
enum { NB = 8, STEPS = 3 };  /* 8: a full group of the widest row kernel (6) and a remainder */

static int batch_matches(const fm_model *m) {
    const int past0[NB] = {0, 5, 63, 64, 130, 1, 100, 20}, cap[NB] = {64, 64, 128, 128, POS, 64, 128, 64};
    void *k[NB * LAYERS], *v[NB * LAYERS], *ks[NB * LAYERS], *vs[NB * LAYERS], *k1[NB * LAYERS], *v1[NB * LAYERS];
    int32_t past[NB], capacity[NB];
    for (int b = 0; b < NB; b++) {
        past[b] = past0[b], capacity[b] = cap[b];
        const size_t n = (size_t)KV * cap[b] * D;
        for (int i = 0; i < LAYERS; i++) {
            const int j = b * LAYERS + i;
            k[j] = calloc(n, 4), v[j] = calloc(n, 4), ks[j] = malloc(4 * n), vs[j] = malloc(4 * n);
            k1[j] = malloc(4 * n), v1[j] = malloc(4 * n);
        }
        float lg[V], rt[R], *emb = randv(past0[b] > 0 ? past0[b] * E : E, 1.f, 0.f);
        if (past0[b] > 0 && fm_forward(m, emb, past0[b], 0, cap[b], k + b * LAYERS, v + b * LAYERS, lg, rt)) exit(2);
        free(emb);
        for (int i = 0; i < LAYERS; i++) {
            const int j = b * LAYERS + i;
            memcpy(ks[j], k[j], 4 * n), memcpy(vs[j], v[j], 4 * n), memcpy(k1[j], k[j], 4 * n), memcpy(v1[j], v[j], 4 * n);
        }
    }
    int same = 1;
    for (int step = 0; step < STEPS; step++) {
        float *emb = randv(NB * E, 1.f, 0.f), lb[NB][V], rb[NB][R], ls[V], rs[R];
        const int32_t some[] = {1, 3, 6}, n_some = step % 2 ? 3 : 0;
        if (fm_forward_batch(m, emb, NB, past, capacity, k, v, n_some, n_some ? some : NULL, lb[0], rb[0])) exit(2);
        for (int b = 0, out = 0; b < NB; b++) {
            if (fm_forward(m, emb + b * E, 1, past[b], capacity[b], ks + b * LAYERS, vs + b * LAYERS, ls, rs)) exit(2);
            fm_model alone = *m;
            alone.threads = 1 + (b + step) % 3;
            float l1[V], r1[R];
            if (fm_forward_batch(&alone, emb + b * E, 1, past + b, capacity + b, k1 + b * LAYERS, v1 + b * LAYERS, 1, NULL,
                                 l1, r1)) exit(2);
            same &= !memcmp(ls, l1, sizeof ls) && !memcmp(rs, r1, sizeof rs);
            if (!n_some || (out < n_some && some[out] == b)) {
                same &= !memcmp(ls, lb[out], sizeof ls) && !memcmp(rs, rb[out], sizeof rs);
                out++;
            }
            for (int i = 0; i < LAYERS; i++) {
                const size_t n = 4 * (size_t)KV * cap[b] * D;
                const int j = b * LAYERS + i;
                same &= !memcmp(k[j], ks[j], n) && !memcmp(v[j], vs[j], n) && !memcmp(k1[j], ks[j], n) && !memcmp(v1[j], vs[j], n);
            }
            past[b]++;
        }
        free(emb);
    }
    float emb[NB * E], lb[NB][V], rb[NB][R];
    memset(emb, 0, sizeof emb);
    const int32_t unordered[] = {3, 1};
    int refused = fm_forward_batch(m, emb, NB, past, capacity, k, v, 2, unordered, lb[0], rb[0]) == -1;
    past[1] = capacity[1];  /* full */
    refused &= fm_forward_batch(m, emb, NB, past, capacity, k, v, 0, NULL, lb[0], rb[0]) == -1;
    for (int j = 0; j < NB * LAYERS; j++) free(k[j]), free(v[j]), free(ks[j]), free(vs[j]), free(k1[j]), free(v1[j]);
    return same && refused;
}

/* Rows that want only their k largest logits (fm_forward_rows' out_top: 1 greedy, 2..FM_MAX_TOP top-k)
 * against full ones, over a head of VG columns with an 8-bit copy: every logit not -INFINITY is the same bits,
 * every logit at least the k-th largest is there, and most are -INFINITY (the head's panels skipped); with
 * ties and near-ties among the columns, and an exact column besides (which a caller rescales). Greedy rows in
 * runs and alone in a batch of NB; top-k rows alone (in a batch they get all their logits). */
enum { VG = 4000 };

static int descending(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* The column of row f's largest logit besides the exact column, the first of equal ones (fm_forward_rows' out_best). */
static int32_t best_of(const float *f, int exact) {
    int32_t best = -1;
    for (int n = 0; n < VG; n++)
        if (n != exact && f[n] > -INFINITY && (best < 0 || f[n] > f[best])) best = n;
    return best;
}

/* Row g of a call asking for its top (1..FM_MAX_TOP; 0: all) largest against row f of a full one: every logit
 * of g not -INFINITY is f's bits, and every logit at least f's top-th largest besides the exact column is
 * there; *computed counts g's logits not -INFINITY in rows that asked for fewer than all. */
static int top_row_matches(const float *f, const float *g, int top, int exact, int *computed) {
    float kth = -INFINITY, *sorted = malloc(sizeof(float) * VG);
    if (top >= 1) {
        for (int n = 0; n < VG; n++) sorted[n] = n == exact ? -INFINITY : f[n];
        qsort(sorted, VG, sizeof(float), descending);
        kth = sorted[top - 1];
    }
    free(sorted);
    int same = 1;
    for (int n = 0; n < VG; n++) {
        if (g[n] != -INFINITY) same &= !memcmp(f + n, g + n, sizeof(float)), *computed += top >= 1;
        else same &= n != exact && f[n] < kth;
    }
    return same;
}

static int top_matches(const fm_model *mf) {
    fm_model m = *mf;
    float *w = malloc(sizeof(float) * E * VG), *bound = malloc(sizeof(float) * 2 * VG);
    for (int n = 0; n < VG; n++) {
        const float range = n % 7 == 0 ? 2.f : 0.3f;  /* columns of different ranges: different bounds */
        for (int k = 0; k < E; k++) w[(size_t)k * VG + n] = range * frand();
    }
    for (int n = 0; n < VG / 4; n++)  /* every column tied or nearly with three in other panels */
        for (int k = 0; k < E; k++) {
            float *row = w + (size_t)k * VG, a = row[n];
            row[n + VG / 4] = a, row[n + VG / 2] = a + 2e-3f * frand(), row[n + 3 * VG / 4] = a + 1e-6f * frand();
        }
    for (int k = 0; k < E; k++) w[(size_t)k * VG + VG - 5] *= 30.f;  /* the exact column: mostly the largest */
    uint8_t *q = malloc((size_t)VG * E), *panels = aligned_alloc(64, (size_t)(VG + FM_PANEL - 1) / FM_PANEL * (E / 32) * 576);
    uint16_t *dm = malloc(sizeof(uint16_t) * VG * 2 * (E / 32));
    if (fm_quantize8(w, E, VG, q, dm, bound) || fm_pack_nbits(q, dm, E, VG, 8, panels) || !fm_quantize8(w, E + 1, VG, q, dm, bound))
        exit(3);
    m.head = (fm_linear){FM_F32, E, VG, 0, packed(w, E, VG), NULL};
    const int32_t exact[] = {VG - 5};  /* always exact: a logit the caller would rescale */
    m.head_q8 = (fm_linear){FM_NBITS, E, VG, 8, NULL, panels}, m.head_q8_bound = bound;
    m.head_q8_exact = exact, m.head_q8_n_exact = 1;
    void *k[NB * LAYERS], *v[NB * LAYERS];
    float *full = malloc(sizeof(float) * NB * VG), *part = malloc(sizeof(float) * NB * VG);
    int32_t past[NB], capacity[NB];
    for (int j = 0; j < NB * LAYERS; j++) k[j] = calloc((size_t)KV * 64 * D, 4), v[j] = calloc((size_t)KV * 64 * D, 4);
    int same = 1, computed = 0, asked = 0;
    const int32_t tops[2][NB] = {{1, 1, 1, 1, 1, 1, 1, 1}, {1, 0, 0, 1, 3, FM_MAX_TOP, 1, 0}};  /* k > 1: all, batched */
    const int32_t alone[NB] = {2, 3, 5, 8, 16, 40, FM_MAX_TOP, FM_MAX_TOP + 1};                 /* one row a call */
    for (int step = 0; step < 6; step++) {
        float *emb = randv(NB * E, step < 3 ? 1.f : 8.f, 0.f), rt[NB * R];  /* larger rows: larger bounds */
        for (int b = 0; b < NB; b++) past[b] = 0, capacity[b] = 64;
        int32_t best[NB], one;
        fm_model whole = m;  /* no 8-bit copy: every greedy row's logits computed, as a 4-bit head's */
        whole.head_q8.N = 0;
        if (fm_forward_rows(&m, emb, NB, past, capacity, k, v, NB, NULL, NULL, full, rt, NULL) ||
            fm_forward_rows(&m, emb, NB, past, capacity, k, v, NB, NULL, tops[step % 2], part, rt, best)) exit(2);
        for (int b = 0; b < NB; b++) {
            const int32_t top = tops[step % 2][b];
            same &= top_row_matches(full + (size_t)b * VG, part + (size_t)b * VG, top > 1 ? 0 : top, exact[0], &computed);
            same &= best[b] == (top == 1 ? best_of(full + (size_t)b * VG, exact[0]) : -1);
            asked += top == 1;
        }
        if (fm_forward_rows(&whole, emb, NB, past, capacity, k, v, NB, NULL, tops[0], part, rt, best)) exit(2);
        for (int b = 0; b < NB; b++) same &= best[b] == best_of(full + (size_t)b * VG, exact[0]);
        for (int b = 0; b < NB; b++) {
            if (fm_forward_rows(&m, emb + (size_t)b * E, 1, past + b, capacity + b, k + b * LAYERS, v + b * LAYERS, 1,
                                NULL, alone + b, part, rt, &one)) exit(2);
            same &= top_row_matches(full + (size_t)b * VG, part, alone[b] <= FM_MAX_TOP ? alone[b] : 0, exact[0], &computed);
            same &= one == -1;
            asked += alone[b] <= FM_MAX_TOP;
            if (fm_forward_rows(&whole, emb + (size_t)b * E, 1, past + b, capacity + b, k + b * LAYERS, v + b * LAYERS,
                                1, NULL, tops[0], part, rt, &one)) exit(2);
            same &= one == best_of(full + (size_t)b * VG, exact[0]);
        }
        free(emb);
    }
    for (int j = 0; j < NB * LAYERS; j++) free(k[j]), free(v[j]);
    free(w), free(q), free(dm), free(full), free(part), free(bound), free(panels), free((void *)m.head.w);
    const double share = (double)computed / ((double)asked * VG);
    printf("[%s] greedy and top-k rows: their largest logits exact and greedy rows' best columns right %s, %.1f %% of "
           "those rows' logits computed\n",
           fm_kernels(), same ? "yes" : "NO", 100. * share);
    return same && share < 0.25;
}

/* fm_profile: on, each pass on this thread is counted and its operations timed, with the same outputs
 * (`logits`: the same positions one at a time, profiling off); off, nothing is counted. */
static int profile_counts(const fm_model *m, const float *emb, const float *logits) {
    double s[FM_OPS], total = 0.;
    float l[V], r[R];
    fm_profile_read(s);
    fm_profile(1);
    run(m, emb, T, l, r);
    const int64_t on = fm_profile_read(s);
    int ok = on == T && !memcmp(l, logits, sizeof l);
    for (int i = 0; i < FM_OPS; i++) ok &= s[i] >= 0., total += s[i];
    fm_profile(0);
    run(m, emb, T, l, r);
    return ok && total > 0. && fm_profile_read(s) == 0;
}

/* An fp16 KV cache (kv_half): its prefill gives the same bits as its positions one at a time, its batched steps
 * those of single ones, and its logits (out, V) those of the fp32 cache (ref) within fp16's rounding. */
static int half_cache_matches(const fm_model *mf, const float *emb, const float *ref, float *out) {
    fm_model mh = *mf;
    mh.kv_half = 1;
    float a[V], ra[R], rb[R], scale = 0.f;
    run(&mh, emb, 1, out, ra);
    run(&mh, emb, T, a, rb);
    for (int i = 0; i < V; i++) scale = fabsf(ref[i]) > scale ? fabsf(ref[i]) : scale;
    const float vs_f32 = max_diff(ref, out, V) / scale;
    const int same = !memcmp(a, out, sizeof a) && !memcmp(ra, rb, sizeof ra), batch = batch_matches(&mh);
    printf("[%s] fp16 KV cache: prefill vs one at a time %s, batched steps bit-identical %s, logits vs fp32 cache %.2e\n",
           fm_kernels(), same ? "same" : "DIFFER", batch ? "yes" : "NO", vs_f32);
    return same && batch && vs_f32 > 0.f && vs_f32 < 1e-2f;  /* > 0: the halves were used */
}

/* All checks on the kernels in use; fills the prefill's fp32, 4-bit and fp16-cache logits (V each) for comparing
 * copies. */
static int check(const fm_model *mf, const fm_model *mq, const float *emb, float *out_f, float *out_q, float *out_h) {
    float a[V], b[V], c[V], d[V], ra[R], rb[R], rc[R], rd[R];
    fm_model pieces = *mf;
    pieces.prompt_rows = 7;  /* the prompt in 22 passes of at most 7 positions */
    float e[V], re[R];
    run(&pieces, emb, 1, e, re);
    run(mf, emb, 1, a, ra);
    run(mf, emb, T, b, rb);
    run(mq, emb, T, c, rc);
    run(mq, emb, 1, d, rd);
    float scale = 0.f;
    for (int i = 0; i < V; i++) scale = fabsf(a[i]) > scale ? fabsf(a[i]) : scale;
    const float prefill = max_diff(a, b, V) / scale + max_diff(ra, rb, R) + max_diff(c, d, V) + max_diff(rc, rd, R)
                          + max_diff(a, e, V) + max_diff(ra, re, R),
                blocks = max_diff(b, c, V) / scale;
    printf("[%s] prefill (whole and in passes of 7) vs one at a time (fp32 and 4/8-bit, logits and retrieval): %.2e; "
           "4/8-bit blocks vs fp32: %.2e\n",
           fm_kernels(), prefill, blocks);
    void *kk[LAYERS] = {0}, *vv[LAYERS] = {0};
    const int refused = fm_forward(mf, emb, 1, POS, POS, kk, vv, a, ra) == -1 && /* past the capacity */
                        fm_forward(mf, emb, 1, 0, POS + 1, kk, vv, a, ra) == -1;  /* not whole key blocks */
    float s1[V], s0[V], rs1[R], rs0[R];  /* the partials streamed past the caches, and kept in them: the same bits */
    fm_set_streamed_partials(1);
    run(mf, emb, T, s1, rs1);
    fm_set_streamed_partials(0);
    run(mf, emb, T, s0, rs0);
    fm_set_streamed_partials(-1);
    const float streamed = max_diff(s1, b, V) + max_diff(s0, b, V) + max_diff(rs1, rb, R) + max_diff(rs0, rb, R);
    printf("[%s] attention's partials streamed or cached vs as placed: %.2e\n", fm_kernels(), streamed);
    const int batch_f32 = batch_matches(mf), batch_q4 = batch_matches(mq), greedy = top_matches(mf),
              profiled = profile_counts(mf, emb, b), half = half_cache_matches(mf, emb, a, out_h);
    printf("[%s] batched steps bit-identical to single ones: fp32 %s, 4/8-bit %s\n", fm_kernels(), batch_f32 ? "yes" : "NO",
           batch_q4 ? "yes" : "NO");
    memcpy(out_f, b, sizeof b);
    memcpy(out_q, c, sizeof c);
    if (!profiled) printf("[%s] fm_profile: wrong counts or changed outputs\n", fm_kernels());
    /* the FMA probe: 12 chains x the copy's vector lanes x 2 flops per iteration and thread */
    const int lanes = !strcmp(fm_kernels(), "avx512") ? 16 : !strcmp(fm_kernels(), "avx2") ? 8 : 1;
    const int fma = fm_fma_loop(1000) == 2. * 12 * lanes * 1000 * omp_get_max_threads();
    if (!fma) printf("[%s] fm_fma_loop: wrong flop count\n", fm_kernels());
    const double trip = fm_core_round_trip(1000);  /* the cores' round trip: 0 with one thread */
    const int tripped = omp_get_max_threads() < 2 ? trip == 0. : trip > 0.;
    if (!tripped) printf("[%s] fm_core_round_trip: %.0f ns\n", fm_kernels(), trip);
    return prefill == 0.f && streamed == 0.f && blocks < 1e-3f && refused && batch_f32 && batch_q4 && greedy &&
           profiled && half && fma && tripped && threads_take_turns(mq, emb);
}

int main(void) {
    /* FROMAGE_KERNELS=<copy>: that copy alone (77, ctest's "skipped", where this CPU cannot run it);
     * else every copy this CPU runs. Each is compared with the portable copy as well. */
    const char *forced = getenv("FROMAGE_KERNELS"), *all[] = {"avx512", "avx2", "portable"}, *paths[3];
    int n_paths = 0;
    if (forced && *forced) {
        if (!fm_cpu_ok()) { printf("skipped: this CPU cannot run the %s kernels\n", forced); return 77; }
        paths[n_paths++] = fm_kernels();
    } else {
        for (int i = 0; i < 3; i++)
            if (fm_set_kernels(all[i]) == 0) paths[n_paths++] = all[i];
    }
    fm_layer lf[LAYERS], lq[LAYERS];
    for (int i = 0; i < LAYERS; i++) {
        lf[i].attn_norm = lq[i].attn_norm = randv(E, 0.2f, 1.f);
        lf[i].mlp_norm = lq[i].mlp_norm = randv(E, 0.2f, 1.f);
        make_linear(E, (H + 2 * KV) * D, &lf[i].qkv, &lq[i].qkv, 4);
        make_linear(H * D, E, &lf[i].o, &lq[i].o, 4);
        for (int s = 0; s < PARTS; s++) {
            make_linear(E, 2 * I / PARTS, &lf[i].gate_up[s], &lq[i].gate_up[s], 4);
            make_linear(I / PARTS, E, &lf[i].down[s], &lq[i].down[s], 4);
        }
    }
    float *cosv = malloc(sizeof(float) * POS * D / 2), *sinv = malloc(sizeof(float) * POS * D / 2);
    for (int p = 0; p < POS; p++)
        for (int j = 0; j < D / 2; j++) {
            const float a = p * powf(10000.f, -2.f * j / D);
            cosv[p * D / 2 + j] = cosf(a), sinv[p * D / 2 + j] = sinf(a);
        }
    fm_linear head_f, head_q, none = {0};
    make_linear(E, V, &head_f, &head_q, 8);
    fm_model mf = {LAYERS, E, H, KV, D, I, POS, R, 0, 1e-5f, cosv, sinv, lf, randv(E, 0.2f, 1.f), head_f, none,
                   packed(randv(E * R, 0.5f, 0.f), E, R), randv(R, 0.1f, 0.f)};
    mf.mlp_parts = PARTS;
    fm_model mq = mf;
    mq.layers = lq, mq.head = head_q;
    /* the same but for an MLP of one part (fm_model.mlp_parts 1: an inner dimension of an odd number of blocks) */
    fm_layer lf1[LAYERS], lq1[LAYERS];
    for (int i = 0; i < LAYERS; i++) {
        lf1[i] = lf[i], lq1[i] = lq[i];
        make_linear(E, 2 * I1, &lf1[i].gate_up[0], &lq1[i].gate_up[0], 4);
        make_linear(I1, E, &lf1[i].down[0], &lq1[i].down[0], 4);
        lf1[i].gate_up[1] = lf1[i].down[1] = lq1[i].gate_up[1] = lq1[i].down[1] = none;
    }
    fm_model mf1 = mf, mq1 = mq;
    mf1.inter = mq1.inter = I1, mf1.mlp_parts = mq1.mlp_parts = 1, mf1.layers = lf1, mq1.layers = lq1;
    float *emb = randv(T * E, 1.f, 0.f), ref_f[V], ref_q[V], ref_h[V], got_f[V], got_q[V], got_h[V];
    int ok = 1;
    if (fm_set_kernels("portable") != 0) return 2;
    ok &= check(&mf, &mq, emb, ref_f, ref_q, ref_h);
    for (int i = 0; i < n_paths; i++) {
        if (!strcmp(paths[i], "portable")) continue;
        if (fm_set_kernels(paths[i]) != 0) return 2;
        ok &= check(&mf, &mq, emb, got_f, got_q, got_h);
        float scale = 0.f;
        for (int j = 0; j < V; j++) scale = fabsf(ref_f[j]) > scale ? fabsf(ref_f[j]) : scale;
        const float df = max_diff(ref_f, got_f, V) / scale, dq = max_diff(ref_q, got_q, V) / scale,
                    dh = max_diff(ref_h, got_h, V) / scale;
        printf("[%s] logits vs the portable copy: fp32 %.2e, 4/8-bit %.2e, fp16 KV cache %.2e\n", paths[i], df, dq, dh);
        ok &= df < 1e-5f && dq < 1e-4f && dh < 1e-5f;
    }
    for (int i = 0; i < n_paths; i++) {
        if (fm_set_kernels(paths[i]) != 0) return 2;
        printf("[%s] an MLP of one part:\n", paths[i]);
        ok &= check(&mf1, &mq1, emb, got_f, got_q, got_h);
    }
    if (!ok) {
        printf("FAILED\n");
        return 1;
    }
    printf("ok\n");
    return 0;
}
