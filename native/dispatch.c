/* Run-time choice of the kernels: the decoder is compiled once per instruction set (kernels_<isa>.c:
 * kernels.h), and the public entry points call the copy chosen when the library loads. Plain C,
 * compiled for the baseline CPU: nothing here may use the vector units the copies need. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "decode_thread.h"
#include "fromage_native.h"

#define DECLARE(isa)                                                                                          \
    int fm_forward_##isa(const fm_model *, const float *, int32_t, int32_t, int32_t, void *const *,         \
                         void *const *, float *, float *);                                                   \
    int fm_forward_rows_##isa(const fm_model *, const float *, int32_t, const int32_t *, const int32_t *,     \
                              void *const *, void *const *, int32_t, const int32_t *, const int32_t *,      \
                              float *, float *, int32_t *);                                                   \
    float fm_stream_read_##isa(const float *, size_t, int, size_t);                                          \
    double fm_fma_loop_##isa(int64_t);

typedef struct {
    const char *name;
    int (*forward)(const fm_model *, const float *, int32_t, int32_t, int32_t, void *const *, void *const *,
                   float *, float *);
    int (*forward_rows)(const fm_model *, const float *, int32_t, const int32_t *, const int32_t *,
                        void *const *, void *const *, int32_t, const int32_t *, const int32_t *, float *, float *,
                        int32_t *);
    float (*stream_read)(const float *, size_t, int, size_t);
    double (*fma_loop)(int64_t);
} kernels;

#define ENTRY(isa) {#isa, fm_forward_##isa, fm_forward_rows_##isa, fm_stream_read_##isa, fm_fma_loop_##isa}

DECLARE(portable)
#if defined(__x86_64__)
DECLARE(avx512)
DECLARE(avx2)
static const kernels copies[] = {ENTRY(avx512), ENTRY(avx2), ENTRY(portable)}; /* best first */
#else
static const kernels copies[] = {ENTRY(portable)};
#endif
enum { COPIES = sizeof copies / sizeof copies[0] };

static int runs_here(const kernels *k) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (!strcmp(k->name, "avx512"))
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni");
    if (!strcmp(k->name, "avx2")) return avx2;
#endif
    return !strcmp(k->name, "portable");
}

static const kernels *active = NULL;
static int forced_ok = 1;

int fm_set_kernels(const char *name) {
    for (int i = 0; i < COPIES; i++)
        if ((!name || !*name || !strcmp(name, "auto") || !strcmp(name, copies[i].name)) && runs_here(copies + i)) {
            __atomic_store_n(&active, copies + i, __ATOMIC_RELEASE);
            return 0;
        }
    return -1;
}

static const kernels *chosen(void) {
    const kernels *k = __atomic_load_n(&active, __ATOMIC_ACQUIRE);
    if (k) return k;
    const char *forced = getenv("FROMAGE_KERNELS");
    if (fm_set_kernels(forced) != 0) forced_ok = 0, fm_set_kernels(NULL);  /* the best there is, and say so */
    return __atomic_load_n(&active, __ATOMIC_ACQUIRE);
}

__attribute__((constructor)) static void choose_at_load(void) { chosen(); }

int fm_cpu_ok(void) { return chosen() && forced_ok; }
const char *fm_kernels(void) { return chosen()->name; }

double fm_core_round_trip_here(int rounds);  /* bandwidth.c, in the portable copy */

int fm_partials_streamed;  /* kernels.h */
static int streamed_mode = -1;  /* fm_set_streamed_partials's, read by the decode thread */
static double placement_seen = -1e300;  /* the decode thread's: when it last measured (none since a forced mode) */
enum { PLACEMENT_TRIPS = 48 };
#define PLACEMENT_EVERY_S 0.1
#define APART_NS 150.

void fm_set_streamed_partials(int mode) { __atomic_store_n(&streamed_mode, mode < 0 ? -1 : mode > 0, __ATOMIC_RELAXED); }

/* On the decode thread, before a step's team starts: fm_partials_streamed by fm_set_streamed_partials's mode. Two
 * measurements, the faster counted: cores woken from idle pass their first lines slowly. */
static void place_partials(void) {
    const int mode = __atomic_load_n(&streamed_mode, __ATOMIC_RELAXED);
    if (mode >= 0) {
        fm_partials_streamed = mode, placement_seen = -1e300;
        return;
    }
    if (omp_get_wtime() - placement_seen < PLACEMENT_EVERY_S) return;
    const double a = fm_core_round_trip_here(PLACEMENT_TRIPS), b = fm_core_round_trip_here(PLACEMENT_TRIPS);
    fm_partials_streamed = (a < b ? a : b) > APART_NS;
    placement_seen = omp_get_wtime();
}

/* The entry points that start OpenMP teams run them on the library's decode thread (decode_thread.c): each
 * packs its arguments for it. */
typedef struct {
    const fm_model *m;
    const float *embeds;
    int32_t T, past, capacity;
    void *const *k_cache, *const *v_cache;
    float *logits, *ret;
    int rc;
} forward_call;

static void forward_job(void *a) {
    forward_call *c = a;
    place_partials();
    c->rc = chosen()->forward(c->m, c->embeds, c->T, c->past, c->capacity, c->k_cache, c->v_cache, c->logits, c->ret);
}

int fm_forward(const fm_model *m, const float *embeds, int32_t T, int32_t past, int32_t capacity,
               void *const *k_cache, void *const *v_cache, float *logits, float *ret) {
    forward_call c = {m, embeds, T, past, capacity, k_cache, v_cache, logits, ret, 0};
    fm_on_decode_thread(forward_job, &c);
    return c.rc;
}

typedef struct {
    const fm_model *m;
    const float *embeds;
    int32_t B;
    const int32_t *past, *capacity;
    void *const *k_cache, *const *v_cache;
    int32_t n_out;
    const int32_t *out_rows, *out_top;
    float *logits, *ret;
    int32_t *out_best;
    int rc;
} rows_call;

static void rows_job(void *a) {
    rows_call *c = a;
    place_partials();
    c->rc = chosen()->forward_rows(c->m, c->embeds, c->B, c->past, c->capacity, c->k_cache, c->v_cache, c->n_out,
                                   c->out_rows, c->out_top, c->logits, c->ret, c->out_best);
}

int fm_forward_rows(const fm_model *m, const float *embeds, int32_t B, const int32_t *past, const int32_t *capacity,
                    void *const *k_cache, void *const *v_cache, int32_t n_out, const int32_t *out_rows,
                    const int32_t *out_top, float *logits, float *ret, int32_t *out_best) {
    rows_call c = {m, embeds, B, past, capacity, k_cache, v_cache, n_out, out_rows, out_top, logits, ret, out_best, 0};
    fm_on_decode_thread(rows_job, &c);
    return c.rc;
}

int fm_forward_batch(const fm_model *m, const float *embeds, int32_t B, const int32_t *past, const int32_t *capacity,
                     void *const *k_cache, void *const *v_cache, int32_t n_out, const int32_t *out_rows,
                     float *logits, float *ret) {
    return fm_forward_rows(m, embeds, B, past, capacity, k_cache, v_cache, n_out, out_rows, NULL, logits, ret, NULL);
}

typedef struct {
    const float *a;
    size_t n, piece;
    int streams;
    float sum;
} stream_call;

static void stream_job(void *a) {
    stream_call *c = a;
    c->sum = chosen()->stream_read(c->a, c->n, c->streams, c->piece);
}

float fm_stream_read(const float *a, size_t n, int streams, size_t piece) {
    stream_call c = {a, n, piece, streams, 0.f};
    fm_on_decode_thread(stream_job, &c);
    return c.sum;
}

typedef struct {
    int64_t count;  /* iterations or rounds */
    double result;
} probe_call;

static void fma_job(void *a) {
    probe_call *c = a;
    c->result = chosen()->fma_loop(c->count);
}

double fm_fma_loop(int64_t iterations) {
    probe_call c = {iterations, 0.};
    fm_on_decode_thread(fma_job, &c);
    return c.result;
}

static void round_trip_job(void *a) {
    probe_call *c = a;
    c->result = fm_core_round_trip_here((int)c->count);
}

double fm_core_round_trip(int rounds) {
    probe_call c = {rounds, 0.};
    fm_on_decode_thread(round_trip_job, &c);
    return c.result;
}

/* fm_profile's counters, the calling thread's (kernels.h: fm_op_done). */
_Thread_local int fm_profiling;
_Thread_local double fm_op_seconds[FM_OPS];
_Thread_local int64_t fm_op_calls;

void fm_profile(int on) { fm_profiling = on != 0; }

int64_t fm_profile_read(double *seconds) {
    const int64_t calls = fm_op_calls;
    for (int i = 0; i < FM_OPS; i++) seconds[i] = fm_op_seconds[i], fm_op_seconds[i] = 0.;
    fm_op_calls = 0;
    return calls;
}

/* Thread-local grow-only scratch shared by the copies: slot 0 belongs to the kernels, slot 1 to the
 * decoder; kept for the thread's lifetime. */
static _Thread_local float *scratch_buf[2];
static _Thread_local size_t scratch_cap[2];

float *fm_scratch(int slot, size_t floats) {
    if (floats > scratch_cap[slot]) {
        free(scratch_buf[slot]);
        size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
        scratch_buf[slot] = aligned_alloc(64, bytes);
        scratch_cap[slot] = scratch_buf[slot] ? floats : 0;
    }
    return scratch_buf[slot];
}
