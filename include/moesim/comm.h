/* comm: the MPI context and every collective moesim makes. Nothing else
 * calls MPI, so the whole communication pattern of a run reads in one file. */
#ifndef MOESIM_COMM_H
#define MOESIM_COMM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct Comm {
    int rank;
    int world_size;
} Comm;

/* MPI_Init; aborts the process if MPI cannot start. */
void comm_init(Comm *c, int *argc, char ***argv);
void comm_finalize(Comm *c);

/* Collective agreement: returns 1 on every rank when every rank passes ok=1. */
int comm_all_ok(const Comm *c, int ok);
/* Rank `root` shares its error text, so every rank can report the same cause. */
void comm_share_error(const Comm *c, int root, char *err, size_t errlen);
/* The lowest rank whose ok is 0, or -1 when all are ok. */
int comm_first_failed_rank(const Comm *c, int ok);

void comm_sum_doubles(const Comm *c, double *values, int n);
void comm_sum_longs(const Comm *c, long *values, int n);
/* Mean over ranks of replicated gradients. */
void comm_average_floats(const Comm *c, float *values, size_t n);
void comm_barrier(const Comm *c);
double comm_wtime(void);

#ifdef __cplusplus
}
#endif
#endif
