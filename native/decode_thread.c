/* Every OpenMP team of the library starts on one thread of its own, the decode thread, whatever thread calls.
 * libgomp keeps a team for each thread that has started one, and once it has more threads than cores it spins
 * only briefly at a barrier, so a host that decoded from a second thread while the first still lived paid a
 * wake-up at every barrier of a step, and two threads decoding at once ran two teams on the same cores. Here a
 * call posts its job, wakes the decode thread and sleeps until the job is done (two futex wake-ups), and calls
 * from several threads take turns. Linux; elsewhere a call runs its job itself, as before. Plain C for the
 * baseline CPU. */
#define _GNU_SOURCE
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "decode_thread.h"
#include "fromage_native.h"

extern _Thread_local int fm_profiling;  /* dispatch.c: fm_profile's counters, per thread */
extern _Thread_local double fm_op_seconds[FM_OPS];
extern _Thread_local int64_t fm_op_calls;

typedef struct {
    void (*run)(void *);
    void *arg;
    int threads;           /* the caller's OpenMP team size, */
    int profiling;         /* the caller's fm_profile setting, */
    double *seconds;       /* and its counters, which the decode thread adds its clocks to */
    int64_t *calls;
} job;

/* run(arg) as the calling thread would run it. */
static job job_for(void (*run)(void *), void *arg) {
    return (job){run, arg, omp_get_max_threads(), fm_profiling, fm_op_seconds, &fm_op_calls};
}

static void run_job(const job *j) {
    const int was = fm_profiling;
    omp_set_num_threads(j->threads);
    fm_profiling = j->profiling;
    j->run(j->arg);
    fm_profiling = was;
    if (j->profiling && j->seconds != fm_op_seconds) {  /* the caller's counters, not this thread's */
        for (int i = 0; i < FM_OPS; i++) j->seconds[i] += fm_op_seconds[i], fm_op_seconds[i] = 0.;
        *j->calls += fm_op_calls, fm_op_calls = 0;
    }
}

#ifdef __linux__
static struct {
    pthread_mutex_t turn;    /* held by the calling thread whose job is posted: one at a time */
    const job *next;         /* the posted job */
    uint32_t posted, done;   /* jobs posted and done so far: the futex words the two sides sleep on */
    int started;
} dt = {.turn = PTHREAD_MUTEX_INITIALIZER};

/* Sleeps while *word holds value. */
static void wait_while(uint32_t *word, uint32_t value) {
    while (__atomic_load_n(word, __ATOMIC_ACQUIRE) == value)
        syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}

static void set_and_wake(uint32_t *word, uint32_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELEASE);
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static _Thread_local int is_decode_thread;

static void *decode_thread(void *posted_before) {
    is_decode_thread = 1;
    prctl(PR_SET_NAME, "fromage-decode");  /* as top -H and /proc name it (its team's threads inherit the name) */
    for (uint32_t seen = (uint32_t)(uintptr_t)posted_before;;) {
        wait_while(&dt.posted, seen);
        seen = __atomic_load_n(&dt.posted, __ATOMIC_ACQUIRE);
        run_job(dt.next);
        set_and_wake(&dt.done, seen);
    }
    return NULL;
}

/* Holding dt.turn, with the decode thread started: runs j there. */
static void post(const job *j) {
    const uint32_t n = dt.posted + 1;
    dt.next = j;
    set_and_wake(&dt.posted, n);
    wait_while(&dt.done, n - 1);
}

static void pause_team(void *unused) {
    (void)unused;
    omp_pause_resource_all(omp_pause_soft);
}

/* Around fork: no job in flight, and the decode thread's OpenMP team ended first (the next call starts another), or
 * libgomp in the child would still count its threads, spin only briefly and decode at half speed (measured). The
 * child has none of its parent's threads: it starts a decode thread of its own when first called. */
static void before_fork(void) {
    pthread_mutex_lock(&dt.turn);
    const job pause = job_for(pause_team, NULL);
    if (dt.started) post(&pause);
}

static void after_fork_in_parent(void) { pthread_mutex_unlock(&dt.turn); }

static void after_fork_in_child(void) {
    pthread_mutex_init(&dt.turn, NULL);
    dt.next = NULL, dt.posted = dt.done = 0, dt.started = 0;
}

/* Holding dt.turn: 1 when the decode thread runs (signals blocked: they are the host's threads' to take). */
static int start(void) {
    if (dt.started) return 1;
    static int registered;
    if (!registered) registered = pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) == 0;
    sigset_t all, was;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &was);
    pthread_t thread;
    dt.started = pthread_create(&thread, NULL, decode_thread, (void *)(uintptr_t)dt.posted) == 0;
    pthread_sigmask(SIG_SETMASK, &was, NULL);
    if (dt.started) pthread_detach(thread);
    return dt.started;
}

void fm_on_decode_thread(void (*run)(void *), void *arg) {
    const job j = job_for(run, arg);
    if (is_decode_thread) {  /* a job's own call */
        run(arg);
        return;
    }
    pthread_mutex_lock(&dt.turn);
    if (start()) post(&j);
    else run_job(&j);  /* no thread to be had: the calling thread's team, as OpenMP would */
    pthread_mutex_unlock(&dt.turn);
}
#else
void fm_on_decode_thread(void (*run)(void *), void *arg) {
    const job j = job_for(run, arg);
    run_job(&j);
}
#endif
