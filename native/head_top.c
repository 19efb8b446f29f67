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
 *  <= e_c |x|_1  +  t_c (16 SX + 2e-4 |x|_1)              (t_c = max_b 255 d + |m| >= |w'|, SX = sum_b sx_b)
 * where 2e-4 |x|_1 t_c covers the float rounding of both heads (a K-term fp32 sum is within K 2^-24 of
 * its sum of |terms|: 3.4e-5 for K = 576), with room to spare. bound = (e_c, t_c) per column. */

/* The k-th largest of the n values v (k <= FM_MAX_TOP; -INFINITY where fewer than k are finite), one pass. */
static float kth_largest(const float *v, int n, int k) {
    float best[FM_MAX_TOP];  /* the k largest so far, largest first */
    int have = 0;
    for (int c = 0; c < n; c++) {
        const float x = v[c];
        if (!(x > -INFINITY) || (have == k && x <= best[k - 1])) continue;  /* NaN and -inf never count */
        int i = have < k ? have++ : k - 1;
        for (; i > 0 && best[i - 1] < x; i--) best[i] = best[i - 1];
        best[i] = x;
    }
    return have == k ? best[k - 1] : -INFINITY;
}

int fm_head_top(const fm_model *m, const float *x, int B, const int32_t *top, float *y, size_t ldy) {
    const fm_linear *head = &m->head;
    const float *bound = m->head_q8_bound;
    const int K = head->K, N = head->N, panels = (N + PANEL - 1) / PANEL;
    if (fm_linear_rows(&m->head_q8, x, B, y, ldy, 0)) return -2;  /* approximate logits, in place */
    float *lows_all = NULL;
    for (int r = 0; r < B && !lows_all; r++)
        if (top[r] > 1 && !(lows_all = fm_scratch(0, (size_t)B * N))) return -2;  /* the rows' lower bounds */
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
        const float c1 = x1 * 1.001f, c2 = (16.f * sx + 2e-4f * x1) * 1.001f;  /* 1.001: this float arithmetic */
        for (int e = 0; e < m->head_q8_n_exact; e++)  /* exact anyway, and out of the floor: the caller may */
            if (m->head_q8_exact[e] >= 0 && m->head_q8_exact[e] < N) yr[m->head_q8_exact[e]] = -INFINITY;  /* rescale them, so the others' largest must be exact alone */
        /* floor: the k-th largest lower bound; a column whose upper bound is below it has k columns above it */
        float floor = -INFINITY;
        if (top[r] == 1) {
            float lows[PANEL];
            for (int i = 0; i < PANEL; i++) lows[i] = -INFINITY;
            int c = 0;
            for (; c + PANEL <= N; c += PANEL)
                for (int i = 0; i < PANEL; i++) {
                    const float low = yr[c + i] - (bound[c + i] * c1 + bound[N + c + i] * c2);
                    lows[i] = low > lows[i] ? low : lows[i];
                }
            for (; c < N; c++) floor = fmaxf(floor, yr[c] - (bound[c] * c1 + bound[N + c] * c2));
            for (int i = 0; i < PANEL; i++) floor = fmaxf(floor, lows[i]);
        } else {
            float *lows = lows_all + (size_t)r * N;
            for (int c = 0; c < N; c++) lows[c] = yr[c] - (bound[c] * c1 + bound[N + c] * c2);
            floor = kth_largest(lows, N, top[r]);
        }
        const int all = !isfinite(x1) || !isfinite(floor);  /* NaN or infinity about, or too few: every panel exactly */
        for (int p = 0; p < panels; p++) {
            const int n0 = p * PANEL, n1 = n0 + PANEL < N ? n0 + PANEL : N;
            int reach = all;
            for (int i = n0; i < n1; i++) reach |= yr[i] + (bound[i] * c1 + bound[N + i] * c2) >= floor;
            for (int e = 0; e < m->head_q8_n_exact; e++) reach |= m->head_q8_exact[e] / PANEL == p;
            if (reach)
                f32_tile(head->w, K, N, p, 0, 1, xr, 1, 1, yr, ldy, 0);
            else
                for (int i = n0; i < n1; i++) yr[i] = -INFINITY;
        }
    }
    return 0;
}
