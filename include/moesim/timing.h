/* timing: wall-clock phases of a training step, accumulated per rank and
 * recorded as /timing/<phase>. */
#ifndef MOESIM_TIMING_H
#define MOESIM_TIMING_H

#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

enum Phase {
    PHASE_ATTENTION,      /* norms, qkv, attention, output projection */
    PHASE_ROUTER,         /* router scores, selection, capacity, aux losses */
    PHASE_DISPATCH,       /* count exchange and rows to the expert owners */
    PHASE_EXPERTS,        /* expert FFNs (and dense FFN layers) */
    PHASE_COMBINE,        /* rows back to their tokens, gate-weighted sum */
    PHASE_GRAD_ALLREDUCE, /* gradient all-reduces */
    PHASE_OPTIMIZER,      /* clipping and AdamW */
    PHASE_OTHER,          /* embeddings, LM head, loss, data, statistics */
    PHASE_COUNT
};

extern const char *const phase_names[PHASE_COUNT];

static inline double timer_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Adds the time since *mark to phase_s[phase] and moves the mark to now. */
static inline void timer_charge(double *phase_s, enum Phase phase, double *mark) {
    double now = timer_now_s();
    if (phase_s) phase_s[phase] += now - *mark;
    *mark = now;
}

#ifdef __cplusplus
}
#endif
#endif
