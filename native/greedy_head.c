/* The head for rows that want only their greedy choice (the largest logit), included by kernels_<isa>.c
 * after kernels.c.
 *
 * An fp32 head is the largest matrix a token reads (the default model: 113 of its 539 MB). A greedy row
 * reads its 8-bit copy instead (fm_quantize8, 32 MB), which gives every logit within a bound of what
 * the fp32 head gives, then computes exactly, with the fp32 head, only the panels of 16 columns that
 * hold a logit the bound leaves in reach of the largest (a few: 5 on average over the default model's
 * positions). The largest exact logit is then the fp32 head's largest, the same bits; the others are
 * written as -INFINITY.
 *
 * The bound, for column c of row x: the approximate logit is computed from w' = d q + m (the 8-bit
 * weights, |w - w'| <= e_c) and from x' (x rounded to int16 per block of 32, |x - x'| <= sx_b / 2,
 * sx_b = max |x_b| / 32767), so it differs from x . w by at most
 *     e_c |x|_1  +  sum_b 32 * 255 d * sx_b / 2  +  float rounding
 *  <= e_c |x|_1  +  t_c (16 SX + 2e-4 |x|_1)              (t_c = max_b 255 d + |m| >= |w'|, SX = sum_b sx_b)
 * where 2e-4 |x|_1 t_c covers the float rounding of both heads (a K-term fp32 sum is within K 2^-24 of
 * its sum of |terms|: 3.4e-5 for K = 576), with room to spare. bound = (e_c, t_c) per column. */

int fm_head_greedy(const fm_model *m, const float *x, int B, float *y, size_t ldy) {
    const fm_linear *head = &m->head;
    const float *bound = m->head_q8_bound;
    const int K = head->K, N = head->N, panels = (N + PANEL - 1) / PANEL;
    if (fm_linear_rows(&m->head_q8, x, B, y, ldy, 0)) return -2;  /* approximate logits, in place */
#pragma omp parallel for schedule(dynamic, 1) if (B > 1)
    for (int r = 0; r < B; r++) {
        const float *xr = x + (size_t)r * K;
        float *yr = y + (size_t)r * ldy, x1 = 0.f, sx = 0.f;
        for (int b = 0; b < K / FM_BLOCK; b++) {
            float top = 0.f;
            for (int k = 0; k < FM_BLOCK; k++) {
                const float a = fabsf(xr[b * FM_BLOCK + k]);
                x1 += a, top = a > top ? a : top;
            }
            sx += top / 32767.f;
        }
        const float c1 = x1 * 1.001f, c2 = (16.f * sx + 2e-4f * x1) * 1.001f;  /* 1.001: this float arithmetic */
        for (int e = 0; e < m->head_q8_n_exact; e++)  /* exact anyway, and out of the floor: the caller may */
            if (m->head_q8_exact[e] >= 0 && m->head_q8_exact[e] < N) yr[m->head_q8_exact[e]] = -INFINITY;  /* rescale them, so the others' largest must be exact alone */
        float lows[PANEL];
        for (int i = 0; i < PANEL; i++) lows[i] = -INFINITY;
        int c = 0;
        for (; c + PANEL <= N; c += PANEL)
            for (int i = 0; i < PANEL; i++) {
                const float low = yr[c + i] - (bound[c + i] * c1 + bound[N + c + i] * c2);
                lows[i] = low > lows[i] ? low : lows[i];
            }
        float floor = -INFINITY;
        for (; c < N; c++) floor = fmaxf(floor, yr[c] - (bound[c] * c1 + bound[N + c] * c2));
        for (int i = 0; i < PANEL; i++) floor = fmaxf(floor, lows[i]);
        const int all = !isfinite(x1) || !isfinite(floor);  /* NaN or infinity about: every panel exactly */
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
