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

/* Communication that can overlap compute, by kind. A phase above says where
 * a rank's time went; these say, within it, how long an exchange of each
 * kind was outstanding and how much of that the rank spent waiting. */
enum CommKind {
    COMM_KIND_DISPATCH,    /* MoE rows to the expert owners, and the count exchange */
    COMM_KIND_COMBINE,     /* MoE rows back */
    COMM_KIND_GRAD_REDUCE, /* the gradient reduction */
    COMM_KIND_COUNT
};
extern const char *const comm_kind_names[COMM_KIND_COUNT];

/* The hierarchical exchange's steps (dispatch.h): gather on the node's
 * leader, the leaders' exchange (with the leader's repacking), scatter. */
enum HierStage { HIER_GATHER, HIER_LEADERS, HIER_SCATTER, HIER_STAGE_COUNT };
extern const char *const hier_stage_names[HIER_STAGE_COUNT];

/* One rank's communication times of a step, in seconds.
 * exposed_s: wall time spent in communication calls that block (a blocking
 * exchange, the start of a non-blocking one, waiting for it to complete).
 * in_flight_s: wall time during which at least one exchange of the kind was
 * outstanding (a blocking one: its call); completion of a non-blocking one
 * is noticed only when it is tested (between sgemms) or waited for, so it
 * is an upper bound. hidden = in_flight_s - exposed_s >= 0.
 * hierarchical_s: the hierarchical exchange's steps, [dispatch, combine]. */
typedef struct CommTimes {
    double exposed_s[COMM_KIND_COUNT];
    double in_flight_s[COMM_KIND_COUNT];
    double hierarchical_s[2][HIER_STAGE_COUNT];
} CommTimes;

/* The CommTimes as one flat row of COMM_TIMES_COUNT values, in the order of
 * comm_times_names (the record's /timing/comm/<name> datasets). */
#define COMM_TIMES_COUNT (2 * COMM_KIND_COUNT + 2 * HIER_STAGE_COUNT)
extern const char *const comm_times_names[COMM_TIMES_COUNT];
void comm_times_flatten(const CommTimes *t, double *row);
void comm_times_add(CommTimes *sum, const CommTimes *t);

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
