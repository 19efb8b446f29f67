/* The library's decode thread (decode_thread.c): where the public entry points that start OpenMP teams run them. */
#ifndef FROMAGE_DECODE_THREAD_H
#define FROMAGE_DECODE_THREAD_H

/* Runs run(arg) on the decode thread and returns when it has finished; calls from several threads take turns.
 * With fm_profile on in the calling thread, the job's operation clocks are added to the calling thread's. */
void fm_on_decode_thread(void (*run)(void *), void *arg);

#endif
