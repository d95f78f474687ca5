/* placement: which rank owns which expert, the one rule every module asks.
 *
 * Ranks g*EP .. g*EP+EP-1 form expert-parallel (EP) group g and together hold
 * every expert once: the rank at position p of its group owns the E/EP
 * consecutive global experts p*E/EP .. (p+1)*E/EP-1. Ranks at the same
 * position of every group form an expert-data-parallel group holding the same
 * experts. Consecutive experts per rank keep a sender's rows, sorted by global
 * expert, already in (destination rank, local expert) order. */
#ifndef MOESIM_PLACEMENT_H
#define MOESIM_PLACEMENT_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct Placement {
    int num_experts;
    int ep_size;
    int ep_rank; /* this rank's position in its EP group */
} Placement;

/* The placement of the rank world_rank when EP groups have ep_size ranks. */
Placement placement_of_rank(int num_experts, int ep_size, int world_rank);

/* Which EP group a world rank belongs to, and its position there. */
int placement_ep_group(int ep_size, int world_rank);
int placement_ep_position(int ep_size, int world_rank);

int placement_experts_per_rank(const Placement *p);
/* The EP position that owns global expert e. */
int placement_owner(const Placement *p, int expert);
/* Global index of local expert j of the rank at EP position ep_rank. */
int placement_global_expert(const Placement *p, int ep_rank, int j);
/* This rank's first global expert: it owns first .. first + experts_per_rank - 1. */
int placement_first_local_expert(const Placement *p);

/* The busiest EP position's rows over the mean rows of the positions, from
 * the kept rows of every expert of `layers` layers ([layers][E]), averaged
 * over the layers: how long every rank waits in the combine for the busiest
 * one, as a factor on the balanced expert time. 1 when ep_size is 1, for a
 * layer without rows, or with no layers. */
double placement_load_imbalance(const long *rows_per_expert, int layers, int num_experts,
                                int ep_size);

/* Shadowing (FasterMoE's "dynamic shadowing", planned per block): a source
 * rank may compute its own rows of another rank's expert with a copy of that
 * expert's weights, instead of sending the rows to the owner. Every rank of
 * the EP group plans from the same counts and so reaches the same plan.
 *
 * rows[q * E + e]: rows EP position q holds for global expert e. Greedy: take
 * the busiest position (most rows of its own experts, from every source);
 * among the blocks (q, e) of its experts held elsewhere, shadow the one that
 * lowers max(busiest, q) the most (ties: the lowest q, then the lowest e);
 * stop when no block lowers it by at least min_gain rows (at least 1). At
 * most ep_size * max_per_rank rounds of ep_size * (E + E/ep_size) steps. A position shadows at most max_per_rank
 * experts and never computes more than max_rows rows. load[ep_size] comes
 * out with each position's rows to compute, shadow[q * E + e] with 1 where q
 * computes its own rows of e. Returns the number of shadowed blocks. */
int placement_plan_shadows(int num_experts, int ep_size, const int *rows, int min_gain,
                           int max_rows, int max_per_rank, int *load, unsigned char *shadow);

#ifdef __cplusplus
}
#endif
#endif
