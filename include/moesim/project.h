/* project: replays a recorded run on a cluster you do not have.
 *
 * A run record's /routing/group_expert_counts holds the kept assignments per
 * (routing group, global expert) of each recorded step. Routing groups are
 * the finest unit any layout keeps on one rank, and every layout with the
 * same global batch and group size routes exactly alike (README, "The layout
 * never changes a result"), so the exact dispatch traffic of any world size P
 * and EP size follows: virtual rank r holds global groups r*Gr/P ..
 * (r+1)*Gr/P-1 (sequence b of rank r is global sequence r*B+b), and sends
 * each kept row to the owner of its expert in its EP group (placement.h).
 *
 * Time comes from a model of the cluster (ClusterSpec, CLUSTER.ini): a
 * roofline per matmul shape for compute, alpha-beta links for the all-to-all
 * (flat or hierarchical, with overlap), ring or tree all-reduce, a
 * memory-bound optimizer, and optional per-phase rates for the work besides
 * matmuls and messages ([vector], fitted by `moesim calibrate`). */
#ifndef MOESIM_PROJECT_H
#define MOESIM_PROJECT_H

#include <stddef.h>

#include "moesim/timing.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Above this many virtual ranks only the node-pair matrix is written. */
#define PROJECT_RANK_MATRIX_MAX 256

/* What the replay reads from a run record (record_read_projection). */
typedef struct ProjectRecord {
    int moe_layers, experts, top_k, routing_groups, rows;
    int recorded_world, micro_batch, seq_length, hidden, heads, ffn_hidden, moe_ffn_hidden;
    int shared_ffn_hidden, num_layers, vocab, swiglu, bf16;
    double capacity_factor;               /* the recorded run's; 0 = dropless */
    int min_capacity, capacity_by_expert; /* capacity_by_expert: expert_choice or soft routing */
    long params_total, params_active_per_token;
    long *steps;       /* [rows] steps done at each row */
    int *group_counts; /* [rows][L][groups][E] kept assignments */
    int *group_drops;  /* [rows][L][groups][E] dropped ones; NULL in a schema-8 record */
    long *dropped;     /* [rows][L][E] dropped by capacity (0 where the step was not logged) */
} ProjectRecord;

void project_record_free(ProjectRecord *in);

/* The layout to replay on. */
typedef struct ProjectLayout {
    int world, ep, ranks_per_node, hierarchical, overlap_chunks;
    /* --moe-expert-shadowing, planned per row and layer as a real run plans
     * it; shadow_min_rows 0 = the run's default, 32 x (1 + grains per rank) */
    int shadowing, shadow_min_rows;
    double capacity_factor; /* < 0: as recorded; else re-applied to a dropless record */
} ProjectLayout;

/* CLUSTER.ini: every value positive (project_read_cluster). */
typedef struct ClusterSpec {
    char name[128];
    double peak_flops_fp32, peak_flops_bf16; /* FLOP/s per device */
    double memory_bandwidth;                 /* bytes/s per device */
    double matmul_efficiency;                /* reached fraction of the roofline, 0 < e <= 1 */
    int devices_per_node;
    double intra_bandwidth, intra_latency; /* bytes/s and s, one device to another on a node */
    double inter_bandwidth, inter_latency; /* bytes/s and s, per NIC, between nodes */
    int nics_per_node;
    double oversubscription; /* fat-tree: >= 1, inter-node bandwidth divided by it */
    int allreduce_tree;      /* 0: ring, 1: tree */
    /* [vector] <phase>: work units per second of the phase's kernels besides
     * matmuls and messages (project_vector_units); 0 = not given, the phase
     * is then matmuls, messages and memory traffic only. */
    double vector_rate[PHASE_COUNT];
} ClusterSpec;

/* What `moesim project --out` writes (record_write_projection). */
typedef struct ProjectOutput {
    const ProjectRecord *in;
    const ProjectLayout *lay;
    const ClusterSpec *cluster;
    const char *cluster_path;
    int nodes;
    const long *dispatch_bytes;         /* [rows][P][P]; NULL above PROJECT_RANK_MATRIX_MAX */
    const long *node_bytes;             /* [rows][nodes][nodes] */
    const long *expert_rows;            /* [rows][L][P] rows each rank's experts compute */
    const long *dropped_per_rank;       /* [rows][L][P] dropped at each rank's experts */
    const long *shadowed_rows;          /* [rows][L] computed by their source; NULL = none */
    const double *phase_s;              /* [rows][P][PHASE_COUNT] */
    const double *balanced_phase_s;     /* [rows][P][PHASE_COUNT] */
    const double *step_time_s;          /* [rows] */
    const double *balanced_step_time_s; /* [rows] */
    const double *mfu;                  /* [rows] */
} ProjectOutput;

/* Parses a CLUSTER.ini; -1 with a message naming the file, key and fix. */
int project_read_cluster(const char *path, ClusterSpec *c, char *err, size_t errlen);

/* Fills the defaults (EP 0 = P, ranks per node 0 = the cluster's devices per
 * node, capped at P) and refuses a layout a real run would refuse: -1 with a
 * message naming the problem and a value that works. */
int project_resolve_layout(const ProjectRecord *in, const ClusterSpec *c, ProjectLayout *lay,
                           char *err, size_t errlen);

/* Re-applies capacity to a dropless record's counts (its kept assignments
 * are the router's demand): per routing group and expert, min(demand,
 * capacity), the count a top-k router keeps at that capacity factor; the rest
 * become drops. -1 with a message when the record was not dropless or its
 * router picks tokens per expert. */
int project_apply_capacity(ProjectRecord *in, double capacity_factor, char *err, size_t errlen);

/* Rows (kept assignments) rank s sends to rank d in MoE layer `layer` of
 * record row `row`: rows[P*P], sender-major; zero across EP groups. */
void project_layer_rows(const ProjectRecord *in, const ProjectLayout *lay, int row, int layer,
                        long *rows);

/* Assignments dropped at each virtual rank's experts in MoE layer `layer`
 * of record row `row`: dropped[P], each routing group's drops charged to
 * the rank holding the expert for that group's EP group. 0 without
 * group_drops. */
void project_layer_drops(const ProjectRecord *in, const ProjectLayout *lay, int row, int layer,
                         long *dropped);

/* Expert shadowing of MoE layer `layer` of record row `row`, planned in each
 * EP group from its sources' rows per expert as a real run plans it
 * (placement_plan_shadows, at most E/EP shadows per rank): each shadowed
 * block's rows leave rows[P*P] (from project_layer_rows, which then holds
 * what a real run's /traffic/dispatch_bytes counts) for own[P], the rows
 * each rank computes as shadows, and weights[P*P] gets the bytes of expert
 * weights each owner sends each source (owner-major). Returns the rows
 * shadowed, or -1 when memory runs out. */
long project_plan_shadows(const ProjectRecord *in, const ProjectLayout *lay, int row, int layer,
                          long *rows, long *own, double *weights);

/* Modelled seconds of one step per rank and phase (phase_s[P][PHASE_COUNT])
 * from per-layer row matrices rows[L][P*P] (doubles, so the balanced baseline
 * can spread rows evenly; a rank's shadowed rows on its diagonal) and, with
 * shadowing, the weight bytes of project_plan_shadows per layer
 * (shadow_weights[L][P*P]; NULL = none): the weights go out in the forward
 * dispatch and a gradient per routing group of the source comes back in the
 * backward combine. Returns the step time (the slowest rank). */
double project_step_time(const ProjectRecord *in, const ProjectLayout *lay, const ClusterSpec *c,
                         const double *rows, const double *shadow_weights, double *phase_s);

/* Rank r's work besides matmuls and messages, per phase, in the units of
 * the [vector] rates: elements its norms, softmaxes, selections,
 * activations, row copies, exact sums and optimizer touch in one step.
 * rows[L][P*P] as for project_step_time. */
void project_vector_units(const ProjectRecord *in, const ProjectLayout *lay, const double *rows,
                          int r, double units[PHASE_COUNT]);

/* Model FLOPs of one step over all ranks for the given total expert rows. */
double project_step_flops(const ProjectRecord *in, double expert_rows_total);

/* `moesim project RUN.h5 --cluster CLUSTER.ini --world-size P ...`: returns
 * the exit status (0, 1 on bad input or I/O failure, with a message). */
int project_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif
#endif
