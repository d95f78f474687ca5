#include "moesim/timing.h"

const char *const phase_names[PHASE_COUNT] = {
    "attention", "router", "dispatch", "experts", "combine", "grad_allreduce", "optimizer", "other",
};

const char *const comm_kind_names[COMM_KIND_COUNT] = {"dispatch", "combine", "grad_reduce"};

const char *const hier_stage_names[HIER_STAGE_COUNT] = {"gather", "leaders", "scatter"};

const char *const comm_times_names[COMM_TIMES_COUNT] = {
    "exposed/dispatch",
    "exposed/combine",
    "exposed/grad_reduce",
    "in_flight/dispatch",
    "in_flight/combine",
    "in_flight/grad_reduce",
    "hierarchical/dispatch_gather",
    "hierarchical/dispatch_leaders",
    "hierarchical/dispatch_scatter",
    "hierarchical/combine_gather",
    "hierarchical/combine_leaders",
    "hierarchical/combine_scatter",
};

void comm_times_flatten(const CommTimes *t, double *row) {
    int i = 0;
    for (int k = 0; k < COMM_KIND_COUNT; k++) row[i++] = t->exposed_s[k];
    for (int k = 0; k < COMM_KIND_COUNT; k++) row[i++] = t->in_flight_s[k];
    for (int d = 0; d < 2; d++)
        for (int s = 0; s < HIER_STAGE_COUNT; s++) row[i++] = t->hierarchical_s[d][s];
}

void comm_times_add(CommTimes *sum, const CommTimes *t) {
    for (int k = 0; k < COMM_KIND_COUNT; k++) {
        sum->exposed_s[k] += t->exposed_s[k];
        sum->in_flight_s[k] += t->in_flight_s[k];
    }
    for (int d = 0; d < 2; d++)
        for (int s = 0; s < HIER_STAGE_COUNT; s++)
            sum->hierarchical_s[d][s] += t->hierarchical_s[d][s];
}
