#include "moesim/timing.h"

const char *const phase_names[PHASE_COUNT] = {
    "attention", "router", "dispatch", "experts", "combine", "grad_allreduce", "optimizer", "other",
};
