/* The head for rows that want only their greedy choice (the largest logit), or their top-k sampling's k
 * largest, included by kernels_<isa>.c after kernels.c.
 *
 * An fp32 head is the largest matrix a token reads (the default model: 113 of its 539 MB). A greedy row
 * reads its 8-bit copy instead (fm_quantize8, 32 MB), which gives every logit within a bound of what
 * the fp32 head gives, then computes exactly, with the fp32 head, only the panels of 16 columns that
 * hold a logit the bound leaves in reach of the largest (a few: 4.3 of 3,073 on average over the default
 * model's greedy tokens), or of the k-th largest. Those exact logits are then the fp32 head's k largest and
 * every logit tied with them, the same bits; the others are written as -INFINITY.
 *
 * The bound, for column c of row x: the approximate logit is computed from w' = d q + m (the 8-bit
 * weights, |w - w'| <= e_c) and from x' (x rounded to int16 per block of 32, |x - x'| <= sx_b / 2,
 * sx_b = max |x_b| / 32767), so it differs from x . w by at most
 *     e_c |x|_1  +  sum_b 32 * 255 d * sx_b / 2  +  float rounding
 *  <= e_c |x|_1  +  t_c (16 SX + (2e-4 + 2 K 2^-24) |x|_1)   (t_c = max_b 255 d + |m| >= |w'|, SX = sum_b sx_b)
 * where the last term covers the float rounding of both heads (a K-term fp32 sum is within K 2^-24 of its
 * sum of |terms|, at most t_c |x|_1 here; the 8-bit head's few block operations far less), with room to
 * spare. bound = (e_c, t_c) per column. */

/* floor: at most the k-th largest of row y's lower bounds y[c] - (bound[c] c1 + bound[N + c] c2) (k <= FM_MAX_TOP):
 * the k-th largest of the union of each of 16 lanes' ceil(k/16) largest (lane i: the columns c = i mod 16),
 * a subset of them, found by a min/max network in vector registers; -INFINITY where fewer than k are finite.
 * NaN never counts (max_ps and min_ps return their second operand when one is NaN). */
static float floor_of(const float *y, const float *bound, int N, float c1, float c2, int k) {
    enum { DEPTH = FM_MAX_TOP / PANEL };
    const int depth = (k + PANEL - 1) / PANEL;
    float t[DEPTH][PANEL], all[FM_MAX_TOP];
    int c = 0;
#ifdef FM_AVX2
    __m256 v[DEPTH][2];
    for (int d = 0; d < DEPTH; d++) v[d][0] = v[d][1] = _mm256_set1_ps(-INFINITY);
    const __m256 a = _mm256_set1_ps(c1), b = _mm256_set1_ps(c2);
    for (; c + PANEL <= N; c += PANEL)
        for (int h = 0; h < 2; h++) {
            const int at = c + 8 * h;
            __m256 x = _mm256_sub_ps(_mm256_loadu_ps(y + at), _mm256_fmadd_ps(_mm256_loadu_ps(bound + at), a,
                                                                             _mm256_mul_ps(_mm256_loadu_ps(bound + N + at), b)));
            for (int d = 0; d < depth; d++) {  /* keeps each lane's largest in v[0], next in v[1], ... */
                const __m256 hi = _mm256_max_ps(x, v[d][h]);
                x = _mm256_min_ps(v[d][h], x), v[d][h] = hi;
            }
        }
    for (int d = 0; d < DEPTH; d++) _mm256_storeu_ps(t[d], v[d][0]), _mm256_storeu_ps(t[d] + 8, v[d][1]);
#else
    for (int d = 0; d < DEPTH; d++)
        for (int i = 0; i < PANEL; i++) t[d][i] = -INFINITY;
#endif
    for (; c < N; c += PANEL) {  /* the portable copy's panels, and the tail's */
        float x[PANEL];
        for (int i = 0; i < PANEL; i++)  /* the tail's missing lanes: -inf, which never counts (nor does NaN) */
            x[i] = c + i < N ? y[c + i] - (bound[c + i] * c1 + bound[N + c + i] * c2) : -INFINITY;
        for (int d = 0; d < depth; d++)
            for (int i = 0; i < PANEL; i++) {  /* x NaN: the comparison is false, t keeps its value */
                const float hi = x[i] > t[d][i] ? x[i] : t[d][i];
                x[i] = x[i] > t[d][i] ? t[d][i] : x[i], t[d][i] = hi;
            }
    }
    int n = 0;
    for (int d = 0; d < depth; d++)
        for (int i = 0; i < PANEL; i++) {  /* insertion, largest first */
            int j = n++;
            for (; j > 0 && all[j - 1] < t[d][i]; j--) all[j] = all[j - 1];
            all[j] = t[d][i];
        }
    return all[k - 1];
}

/* Whether a column of the panel at n0..n1 has an upper bound y[c] + (bound[c] c1 + bound[N + c] c2) >= floor. */
static int in_reach(const float *y, const float *bound, int N, int n0, int n1, float c1, float c2, float floor) {
#ifdef FM_AVX2
    if (n1 - n0 == PANEL) {
        const __m256 a = _mm256_set1_ps(c1), b = _mm256_set1_ps(c2), f = _mm256_set1_ps(floor);
        int reach = 0;
        for (int h = 0; h < 2; h++) {
            const int at = n0 + 8 * h;
            const __m256 up = _mm256_add_ps(_mm256_loadu_ps(y + at), _mm256_fmadd_ps(_mm256_loadu_ps(bound + at), a,
                                                                     _mm256_mul_ps(_mm256_loadu_ps(bound + N + at), b)));
            reach |= _mm256_movemask_ps(_mm256_cmp_ps(up, f, _CMP_GE_OQ));  /* NaN: false */
        }
        return reach != 0;
    }
#endif
    int reach = 0;
    for (int i = n0; i < n1; i++) reach |= y[i] + (bound[i] * c1 + bound[N + i] * c2) >= floor;
    return reach;
}

int fm_head_top(const fm_model *m, const float *x, int B, const int32_t *top, float *y, size_t ldy) {
    const fm_linear *head = &m->head;
    const float *bound = m->head_q8_bound;
    const int K = head->K, N = head->N, panels = (N + PANEL - 1) / PANEL;
    if (fm_linear_rows(&m->head_q8, x, B, y, ldy, 0)) return -2;  /* approximate logits, in place */
#pragma omp parallel for schedule(dynamic, 1) if (B > 1)
    for (int r = 0; r < B; r++) {
        const float *xr = x + (size_t)r * K;
        float *yr = y + (size_t)r * ldy, x1 = 0.f, sx = 0.f;
        for (int b = 0; b < K / FM_BLOCK; b++) {
            float most = 0.f;
            for (int k = 0; k < FM_BLOCK; k++) {
                const float a = fabsf(xr[b * FM_BLOCK + k]);
                x1 += a, most = a > most ? a : most;
            }
            sx += most / 32767.f;
        }
        const float c1 = x1 * 1.001f, c2 = (16.f * sx + (2e-4f + 2.f * K * 0x1p-24f) * x1) * 1.001f;  /* 1.001: this arithmetic */
        /* the caller may rescale the exact columns, so the others' largest must be exact alone: out of the floor
         * (-inf), then in reach of it (+inf), so that their panels are computed as well */
        const int32_t *exact = m->head_q8_exact;
        for (int e = 0; e < m->head_q8_n_exact; e++)
            if (exact[e] >= 0 && exact[e] < N) yr[exact[e]] = -INFINITY;
        /* a column whose upper bound is below the floor has k columns above it */
        const float floor = floor_of(yr, bound, N, c1, c2, top[r]);
        const int all = !isfinite(x1) || !isfinite(floor);  /* NaN or infinity about, or too few: every panel exactly */
        for (int e = 0; e < m->head_q8_n_exact; e++)
            if (exact[e] >= 0 && exact[e] < N) yr[exact[e]] = INFINITY;
        for (int p = 0; p < panels; p++) {
            const int n0 = p * PANEL, n1 = n0 + PANEL < N ? n0 + PANEL : N;
            if (all || in_reach(yr, bound, N, n0, n1, c1, c2, floor))
                f32_tile(head->w, K, N, p, 0, 1, xr, 1, 1, yr, ldy, 0);
            else
                for (int i = n0; i < n1; i++) yr[i] = -INFINITY;
        }
    }
    return 0;
}
