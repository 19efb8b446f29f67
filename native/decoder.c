/* The decoder's forward pass: for each layer RMSNorm, QKV, rotary + KV cache append, causal
 * grouped-query attention, O projection, RMSNorm, gate/up, SiLU * up, down projection; then the
 * last position's logits and retrieval embedding. The same computation as export/llama_graph.py. */
#include <math.h>
#include <string.h>
#include <omp.h>

#include "fromage_native.h"

int fm_cpu_ok(void) {
#if defined(__x86_64__) && !defined(FM_PORTABLE)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 1;
#endif
}

#include "kernels.h" /* below here: code for CPUs that pass fm_cpu_ok */

static void rms_norm(const float *x, const float *w, float *out, int T, int E, float eps) {
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * E;
        float r = 1.f / sqrtf(fm_dot(xt, xt, E) / E + eps);
        for (int i = 0; i < E; i++) out[(size_t)t * E + i] = xt[i] * r * w[i];
    }
}

/* rotate_half rotary on one head vector at one position (cos/sin rows of head_dim/2). */
static void rotate(float *v, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
    }
}

/* Rotates q in place and appends the rotated k and the v of each new position to the cache. */
static void rope_and_append(const fm_model *m, float *qkv, int T, int past, int capacity, float *kc, float *vc) {
    const int H = m->n_heads, KV = m->n_kv, d = m->head_dim, half = d / 2, width = (H + 2 * KV) * d;
    for (int t = 0; t < T; t++) {
        const int p = past + t;
        const float *c = m->cos + (size_t)p * half, *s = m->sin + (size_t)p * half;
        float *row = qkv + (size_t)t * width;
        for (int h = 0; h < H; h++) rotate(row + h * d, c, s, half);
        for (int g = 0; g < KV; g++) {
            float *k = kc + ((size_t)g * capacity + p) * d;
            memcpy(k, row + (H + g) * d, sizeof(float) * d);
            rotate(k, c, s, half);
            memcpy(vc + ((size_t)g * capacity + p) * d, row + (H + KV + g) * d, sizeof(float) * d);
        }
    }
}

/* Causal attention of the T new positions over the cache; out (T, H*d). */
static void attention(const fm_model *m, const float *qkv, int T, int past, int capacity,
                      const float *kc, const float *vc, float *out, float *scores) {
    const int H = m->n_heads, KV = m->n_kv, d = m->head_dim, width = (H + 2 * KV) * d, total = past + T;
    const float scale = 1.f / sqrtf((float)d);
#pragma omp parallel for collapse(2) schedule(static)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            const int n = past + t + 1, g = h / (H / KV);
            const float *q = qkv + (size_t)t * width + h * d;
            const float *k = kc + (size_t)g * capacity * d, *v = vc + (size_t)g * capacity * d;
            float *sc = scores + (size_t)omp_get_thread_num() * total, top = -INFINITY;
            for (int s = 0; s < n; s++) {
                sc[s] = fm_dot(q, k + (size_t)s * d, d) * scale;
                top = sc[s] > top ? sc[s] : top;
            }
            float *o = out + (size_t)t * H * d + h * d;
            memset(o, 0, sizeof(float) * d);
            const float inv_sum = 1.f / fm_exp_shifted(sc, n, top);
            for (int s = 0; s < n; s++) fm_axpy(sc[s], v + (size_t)s * d, o, d);
            for (int i = 0; i < d; i++) o[i] *= inv_sum;
        }
}

/* out = silu(gate) * up = gate / (1 + exp(-gate)) * up. Serial: ~1 us per token with vector exp. */
static void silu_mul(const float *gate_up, int T, int I, float *out) {
    for (int t = 0; t < T; t++) {
        const float *g = gate_up + (size_t)t * 2 * I, *u = g + I;
        float *o = out + (size_t)t * I;
        for (int i = 0; i < I; i++) o[i] = -g[i];
        fm_exp_shifted(o, I, 0.f);
        for (int i = 0; i < I; i++) o[i] = g[i] / (1.f + o[i]) * u[i];
    }
}

int fm_forward(const fm_model *m, const float *embeds, int32_t T, int32_t past, int32_t capacity,
               float *const *k_cache, float *const *v_cache, float *logits, float *ret) {
    if (T < 1 || past < 0 || past + T > capacity || past + T > m->rope_positions) return -1;
    if (m->threads > 0) omp_set_num_threads(m->threads);  /* this calling thread's setting only */
    const int E = m->hidden, H = m->n_heads, KV = m->n_kv, d = m->head_dim, I = m->inter;
    const size_t width = (size_t)(H + 2 * KV) * d;
    const size_t sizes[] = {(size_t)T * E, (size_t)T * E, T * width, (size_t)T * H * d, (size_t)T * 2 * I,
                            (size_t)T * I, (size_t)omp_get_max_threads() * (past + T)};
    enum { N_BUFFERS = sizeof sizes / sizeof sizes[0] };
    size_t total = 0;
    for (int i = 0; i < N_BUFFERS; i++) total += (sizes[i] + 15) / 16 * 16;  /* 64-byte aligned each */
    float *buf[N_BUFFERS], *ws = fm_scratch(1, total);
    if (!ws) return -2;
    for (int i = 0; i < N_BUFFERS; i++) buf[i] = ws, ws += (sizes[i] + 15) / 16 * 16;
    float *x = buf[0], *h = buf[1], *qkv = buf[2], *attn = buf[3], *gu = buf[4], *act = buf[5], *scores = buf[6];
    int rc = 0;

    memcpy(x, embeds, sizeof(float) * T * E);
    for (int i = 0; i < m->n_layers && !rc; i++) {
        const fm_layer *L = m->layers + i;
        rms_norm(x, L->attn_norm, h, T, E, m->eps);
        rc |= fm_linear_forward(&L->qkv, h, T, qkv, 0);
        rope_and_append(m, qkv, T, past, capacity, k_cache[i], v_cache[i]);
        attention(m, qkv, T, past, capacity, k_cache[i], v_cache[i], attn, scores);
        rc |= fm_linear_forward(&L->o, attn, T, x, 1);
        rms_norm(x, L->mlp_norm, h, T, E, m->eps);
        rc |= fm_linear_forward(&L->gate_up, h, T, gu, 0);
        silu_mul(gu, T, I, act);
        rc |= fm_linear_forward(&L->down, act, T, x, 1);
    }
    if (rc) return -2;

    rms_norm(x + (size_t)(T - 1) * E, m->final_norm, h, 1, E, m->eps);
    rc |= fm_linear_forward(&m->head, h, 1, logits, 0);
    if (m->head_extra.N > 0) rc |= fm_linear_forward(&m->head_extra, h, 1, logits + m->head.N, 0);
    const fm_linear wt = {FM_F32, E, m->retrieval_dim, 0, m->wt, NULL};
    rc |= fm_linear_forward(&wt, h, 1, ret, 0);
    if (rc) return -2;
    float norm = 0.f;
    for (int i = 0; i < m->retrieval_dim; i++) ret[i] += m->wt_bias[i], norm += ret[i] * ret[i];
    norm = sqrtf(norm) > 1e-12f ? sqrtf(norm) : 1e-12f;
    for (int i = 0; i < m->retrieval_dim; i++) ret[i] /= norm;
    return 0;
}
