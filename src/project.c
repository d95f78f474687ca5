#include "moesim/project.h"

#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/output.h"
#include "moesim/placement.h"
#include "moesim/record.h"
#include "moesim/router.h"

void project_record_free(ProjectRecord *in) {
    free(in->steps);
    free(in->group_counts);
    free(in->group_drops);
    free(in->dropped);
    memset(in, 0, sizeof *in);
}

/* ---- CLUSTER.ini ------------------------------------------------------------- */

typedef struct ClusterKey {
    const char *section, *name;
    size_t offset;
    int is_int;
} ClusterKey;

#define CLUSTER_DOUBLE(section, field) \
    { section, #field, offsetof(ClusterSpec, field), 0 }
#define CLUSTER_INT(section, field) \
    { section, #field, offsetof(ClusterSpec, field), 1 }

static const ClusterKey CLUSTER_KEYS[] = {
    CLUSTER_DOUBLE("device", peak_flops_fp32),   CLUSTER_DOUBLE("device", peak_flops_bf16),
    CLUSTER_DOUBLE("device", memory_bandwidth),  CLUSTER_DOUBLE("device", matmul_efficiency),
    CLUSTER_INT("node", devices_per_node),       CLUSTER_DOUBLE("node", intra_bandwidth),
    CLUSTER_DOUBLE("node", intra_latency),       CLUSTER_DOUBLE("network", inter_bandwidth),
    CLUSTER_DOUBLE("network", inter_latency),    CLUSTER_INT("network", nics_per_node),
    CLUSTER_DOUBLE("network", oversubscription),
};
enum { CLUSTER_KEY_COUNT = sizeof CLUSTER_KEYS / sizeof CLUSTER_KEYS[0] };

typedef struct ClusterParse {
    ClusterSpec *c;
    int seen[CLUSTER_KEY_COUNT];
    int allreduce_seen;
    char problem[256];
} ClusterParse;

static int parse_positive(const char *value, double *out) {
    char *end = NULL;
    double v = strtod(value, &end);
    while (end && (*end == ' ' || *end == '\t')) end++;
    if (!end || end == value || *end || !(v > 0) || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

/* [vector] <phase> = rate: optional, one per phase name. */
static int vector_rate_key(ClusterParse *p, const char *name, const char *value) {
    for (int ph = 0; ph < PHASE_COUNT; ph++) {
        if (strcmp(name, phase_names[ph]) != 0) continue;
        if (parse_positive(value, &p->c->vector_rate[ph]) != 0)
            snprintf(p->problem, sizeof p->problem, "[vector] %s = %s is not a positive number",
                     name, value);
        return 1;
    }
    snprintf(p->problem, sizeof p->problem,
             "unknown key [vector] %s (the keys are the phases: attention, router, dispatch, "
             "experts, combine, grad_allreduce, optimizer, other)",
             name);
    return 1;
}

static int cluster_handle_key(void *user, const char *section, const char *name,
                              const char *value) {
    ClusterParse *p = user;
    if (p->problem[0]) return 1;
    if (strcmp(section, "cluster") == 0 && strcmp(name, "name") == 0) {
        snprintf(p->c->name, sizeof p->c->name, "%s", value);
        return 1;
    }
    if (strcmp(section, "network") == 0 && strcmp(name, "allreduce") == 0) {
        p->allreduce_seen = 1;
        if (strcmp(value, "ring") != 0 && strcmp(value, "tree") != 0)
            snprintf(p->problem, sizeof p->problem,
                     "[network] allreduce = %s is neither ring nor tree", value);
        p->c->allreduce_tree = strcmp(value, "tree") == 0;
        return 1;
    }
    if (strcmp(section, "vector") == 0) return vector_rate_key(p, name, value);
    for (int i = 0; i < CLUSTER_KEY_COUNT; i++) {
        const ClusterKey *k = &CLUSTER_KEYS[i];
        if (strcmp(section, k->section) != 0 || strcmp(name, k->name) != 0) continue;
        double v = 0.0;
        if (parse_positive(value, &v) != 0 || (k->is_int && v != floor(v))) {
            snprintf(p->problem, sizeof p->problem, "[%s] %s = %s is not a positive %s", section,
                     name, value, k->is_int ? "whole number" : "number");
            return 1;
        }
        if (k->is_int)
            *(int *)((char *)p->c + k->offset) = (int)v;
        else
            *(double *)((char *)p->c + k->offset) = v;
        p->seen[i] = 1;
        return 1;
    }
    snprintf(p->problem, sizeof p->problem, "unknown key [%s] %s", section, name);
    return 1;
}

int project_read_cluster(const char *path, ClusterSpec *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    ClusterParse p = {.c = c};
    int line = ini_parse(path, cluster_handle_key, &p);
    if (line < 0) {
        snprintf(err, errlen,
                 "cannot read the cluster file --cluster %s; give an existing "
                 "CLUSTER.ini (presets in experiments/clusters/)",
                 path);
        return -1;
    }
    if (line > 0) snprintf(p.problem, sizeof p.problem, "line %d is not INI syntax", line);
    for (int i = 0; !p.problem[0] && i < CLUSTER_KEY_COUNT; i++)
        if (!p.seen[i])
            snprintf(p.problem, sizeof p.problem, "[%s] %s is missing", CLUSTER_KEYS[i].section,
                     CLUSTER_KEYS[i].name);
    if (!p.problem[0] && c->matmul_efficiency > 1)
        snprintf(p.problem, sizeof p.problem, "[device] matmul_efficiency = %g is above 1",
                 c->matmul_efficiency);
    if (!p.problem[0] && c->oversubscription < 1)
        snprintf(p.problem, sizeof p.problem, "[network] oversubscription = %g is below 1",
                 c->oversubscription);
    if (p.problem[0]) {
        snprintf(err, errlen,
                 "cluster file %s: %s; every value must be given and positive (see "
                 "experiments/clusters/README.md for each key and its unit)",
                 path, p.problem);
        return -1;
    }
    if (!c->name[0]) snprintf(c->name, sizeof c->name, "%s", path);
    return 0;
}

/* ---- layout -------------------------------------------------------------------- */

static long global_tokens(const ProjectRecord *in) {
    return (long)in->recorded_world * in->micro_batch * in->seq_length;
}

int project_resolve_layout(const ProjectRecord *in, const ClusterSpec *c, ProjectLayout *lay,
                           char *err, size_t errlen) {
    int P = lay->world;
    long sequences = (long)in->recorded_world * in->micro_batch, tokens = global_tokens(in);
    long group = tokens / in->routing_groups;
    if (P < 1) {
        snprintf(err, errlen, "--world-size %d: give a positive number of virtual ranks", P);
        return -1;
    }
    if (sequences % P != 0 || (tokens / P) % group != 0) {
        int fit = 1;
        for (int q = 2; q <= in->routing_groups && q <= sequences; q++)
            if (sequences % q == 0 && (tokens / q) % group == 0 && abs(q - P) < abs(fit - P))
                fit = q;
        snprintf(err, errlen,
                 "--world-size %d splits %s: the recorded global batch is %ld sequences of %d "
                 "tokens in %d routing groups of %ld tokens, and each virtual rank must hold "
                 "whole sequences and whole groups; use a world size dividing both, e.g. %d "
                 "(or record with a smaller --moe-group-size)",
                 P, sequences % P != 0 ? "a sequence" : "a routing group", sequences,
                 in->seq_length, in->routing_groups, group, fit);
        return -1;
    }
    if (lay->ep == 0) lay->ep = P;
    if (lay->ep < 1 || P % lay->ep != 0 || in->experts % lay->ep != 0) {
        snprintf(err, errlen,
                 "--expert-model-parallel-size %d must divide both --world-size %d and the %d "
                 "experts; e.g. --expert-model-parallel-size 1",
                 lay->ep, P, in->experts);
        return -1;
    }
    if (lay->ranks_per_node == 0)
        lay->ranks_per_node = c->devices_per_node < P ? c->devices_per_node : P;
    if (lay->ranks_per_node < 1 || lay->ranks_per_node > c->devices_per_node) {
        snprintf(err, errlen,
                 "--ranks-per-node %d: the cluster has %d devices per node; give 1 to %d",
                 lay->ranks_per_node, c->devices_per_node, c->devices_per_node);
        return -1;
    }
    if (lay->overlap_chunks < 0 || (lay->overlap_chunks > 1 && lay->hierarchical)) {
        snprintf(err, errlen,
                 "--moe-overlap-chunks %d: overlap needs the alltoall dispatcher and at least 0 "
                 "chunks (0 or 1 = no overlap)",
                 lay->overlap_chunks);
        return -1;
    }
    if (lay->shadowing && (lay->hierarchical || lay->overlap_chunks > 1)) {
        snprintf(err, errlen,
                 "--moe-expert-shadowing 1 shadows with the alltoall dispatcher without overlap "
                 "only, as in training; use --moe-token-dispatcher-type alltoall and "
                 "--moe-overlap-chunks 1, or --moe-expert-shadowing 0");
        return -1;
    }
    return 0;
}

/* ---- capacity ------------------------------------------------------------------ */

int project_apply_capacity(ProjectRecord *in, double capacity_factor, char *err, size_t errlen) {
    if (in->capacity_factor != 0.0 || in->capacity_by_expert) {
        snprintf(err, errlen,
                 "--moe-expert-capacity-factor needs a dropless record of a top-k style router "
                 "(its kept counts are then the router's demand); this one was recorded with "
                 "capacity factor %g%s: record with --moe-expert-capacity-factor 0, or leave the "
                 "flag out to replay the recorded capacity",
                 in->capacity_factor,
                 in->capacity_by_expert ? " and expert_choice/soft routing" : "");
        return -1;
    }
    if (capacity_factor <= 0) return 0; /* dropless again: nothing changes */
    int E = in->experts, groups = in->routing_groups;
    size_t cells = (size_t)in->rows * in->moe_layers * groups * E;
    /* a dropless record dropped nothing: every drop is this capacity's */
    free(in->group_drops);
    in->group_drops = calloc(cells ? cells : 1, sizeof(int));
    if (!in->group_drops) {
        snprintf(err, errlen, "out of memory re-applying the capacity factor");
        return -1;
    }
    int G = (int)(global_tokens(in) / groups);
    int capacity = router_capacity(capacity_factor, G, in->top_k, E);
    if (capacity < in->min_capacity) capacity = in->min_capacity;
    for (int r = 0; r < in->rows; r++)
        for (int l = 0; l < in->moe_layers; l++) {
            long *dropped = in->dropped + ((long)r * in->moe_layers + l) * E;
            long cell = ((long)r * in->moe_layers + l) * groups * E;
            int *counts = in->group_counts + cell, *drops = in->group_drops + cell;
            for (long i = 0; i < (long)groups * E; i++)
                if (counts[i] > capacity) {
                    dropped[i % E] += counts[i] - capacity;
                    drops[i] = counts[i] - capacity;
                    counts[i] = capacity;
                }
        }
    in->capacity_factor = capacity_factor;
    return 0;
}

/* ---- traffic ------------------------------------------------------------------- */

void project_layer_rows(const ProjectRecord *in, const ProjectLayout *lay, int row, int layer,
                        long *rows) {
    int P = lay->world, E = in->experts, per_rank = in->routing_groups / P;
    Placement place = {.num_experts = E, .ep_size = lay->ep};
    const int *counts =
        in->group_counts + ((size_t)row * in->moe_layers + layer) * in->routing_groups * E;
    memset(rows, 0, sizeof(long) * P * P);
    for (int s = 0; s < P; s++) {
        int first_in_group = placement_ep_group(lay->ep, s) * lay->ep;
        for (int g = s * per_rank; g < (s + 1) * per_rank; g++)
            for (int e = 0; e < E; e++)
                rows[(long)s * P + first_in_group + placement_owner(&place, e)] +=
                    counts[(long)g * E + e];
    }
}

void project_layer_drops(const ProjectRecord *in, const ProjectLayout *lay, int row, int layer,
                         long *dropped) {
    int P = lay->world, E = in->experts, per_rank = in->routing_groups / P;
    Placement place = {.num_experts = E, .ep_size = lay->ep};
    memset(dropped, 0, sizeof(long) * P);
    if (!in->group_drops) return;
    const int *drops =
        in->group_drops + ((size_t)row * in->moe_layers + layer) * in->routing_groups * E;
    for (int s = 0; s < P; s++) {
        int first_in_group = placement_ep_group(lay->ep, s) * lay->ep;
        for (int g = s * per_rank; g < (s + 1) * per_rank; g++)
            for (int e = 0; e < E; e++)
                dropped[first_in_group + placement_owner(&place, e)] += drops[(long)g * E + e];
    }
}

static double expert_params(const ProjectRecord *in);

/* The run's default: a shadow must save the rows whose compute matches moving
 * the weights out and a gradient per grain back (model_shadow_min_gain). */
static int shadow_min_gain(const ProjectRecord *in, const ProjectLayout *lay) {
    if (lay->shadow_min_rows > 0) return lay->shadow_min_rows;
    return 32 * (1 + in->routing_groups / lay->world);
}

/* EP group `first`..: rows[q * E + e] its position q's groups keep for expert e. */
static void group_source_rows(const ProjectRecord *in, const ProjectLayout *lay, int row, int layer,
                              int first, int *rows) {
    int E = in->experts, per_rank = in->routing_groups / lay->world;
    const int *counts =
        in->group_counts + ((size_t)row * in->moe_layers + layer) * in->routing_groups * E;
    for (int q = 0; q < lay->ep; q++)
        for (int e = 0; e < E; e++) {
            long sum = 0;
            for (int g = (first + q) * per_rank; g < (first + q + 1) * per_rank; g++)
                sum += counts[(long)g * E + e];
            rows[(long)q * E + e] = (int)sum;
        }
}

long project_plan_shadows(const ProjectRecord *in, const ProjectLayout *lay, int row, int layer,
                          long *rows, long *own, double *weights) {
    int P = lay->world, E = in->experts, EP = lay->ep;
    Placement place = {.num_experts = E, .ep_size = EP};
    int *source = malloc(sizeof(int) * ((size_t)EP * E + EP));
    unsigned char *shadow = malloc((size_t)EP * E);
    if (!source || !shadow) {
        free(source);
        free(shadow);
        return -1;
    }
    int *load = source + (long)EP * E;
    double expert_bytes = expert_params(in) * sizeof(float); /* master weights travel */
    long shadowed = 0;
    memset(own, 0, sizeof(long) * P);
    memset(weights, 0, sizeof(double) * P * P);
    for (int first = 0; first < P; first += EP) {
        group_source_rows(in, lay, row, layer, first, source);
        /* The run caps a rank's rows at its receive buffer; a shadow never
         * raises a rank above the busiest one, which fits its buffer, so the
         * cap never binds and INT_MAX plans the same. */
        placement_plan_shadows(E, EP, source, shadow_min_gain(in, lay), INT_MAX, E / EP, load,
                               shadow);
        for (int q = 0; q < EP; q++)
            for (int e = 0; e < E; e++) {
                if (!shadow[(long)q * E + e]) continue;
                int s = first + q, owner = first + placement_owner(&place, e);
                long n = source[(long)q * E + e];
                rows[(long)s * P + owner] -= n;
                own[s] += n;
                weights[(long)owner * P + s] += expert_bytes;
                shadowed += n;
            }
    }
    free(source);
    free(shadow);
    return shadowed;
}

/* ---- time ---------------------------------------------------------------------- */

typedef struct Machine {
    const ClusterSpec *c;
    double peak, element_bytes;
} Machine;

static Machine machine_of(const ProjectRecord *in, const ClusterSpec *c) {
    return (Machine){.c = c,
                     .peak = in->bf16 ? c->peak_flops_bf16 : c->peak_flops_fp32,
                     .element_bytes = in->bf16 ? 2.0 : 4.0};
}

/* One [m,k]x[k,n] product: bound by FLOPs or by moving its three matrices. */
static double roofline_s(const Machine *mc, double m, double n, double k) {
    if (m <= 0 || n <= 0 || k <= 0) return 0.0;
    double compute = 2.0 * m * n * k / (mc->peak * mc->c->matmul_efficiency);
    double memory = mc->element_bytes * (m * k + k * n + m * n) / mc->c->memory_bandwidth;
    return compute > memory ? compute : memory;
}

/* Forward, input gradient and weight gradient of one product. */
static double train_matmul_s(const Machine *mc, double m, double n, double k) {
    return roofline_s(mc, m, n, k) + roofline_s(mc, m, k, n) + roofline_s(mc, k, n, m);
}

static double memory_s(const Machine *mc, double bytes) {
    return bytes / mc->c->memory_bandwidth;
}

static int node_of(const ProjectLayout *lay, int rank) {
    return rank / lay->ranks_per_node;
}

/* Per-rank bandwidth between nodes when every rank of a node sends at once:
 * the node's NICs shared, divided by the fat-tree's oversubscription. */
static double inter_rank_bandwidth(const ClusterSpec *c, const ProjectLayout *lay) {
    return c->nics_per_node * c->inter_bandwidth / (lay->ranks_per_node * c->oversubscription);
}

/* Seconds rank r spends in a flat all-to-all of bytes[P*P] (sender-major),
 * intra-node and inter-node traffic on separate links, each direction
 * bounded by the busier of sending and receiving. */
static double flat_exchange_s(const ClusterSpec *c, const ProjectLayout *lay, const double *bytes,
                              int r) {
    int P = lay->world, group = placement_ep_group(lay->ep, r) * lay->ep;
    double out[2] = {0}, in[2] = {0}, latency[2] = {0}, local = 0.0;
    for (int d = group; d < group + lay->ep; d++) {
        int inter = node_of(lay, d) != node_of(lay, r);
        if (d == r) {
            local = bytes[(long)r * P + r];
            continue;
        }
        out[inter] += bytes[(long)r * P + d];
        in[inter] += bytes[(long)d * P + r];
        latency[inter] += inter ? c->inter_latency : c->intra_latency;
    }
    double intra = (out[0] > in[0] ? out[0] : in[0]) / c->intra_bandwidth + latency[0];
    double inter = (out[1] > in[1] ? out[1] : in[1]) / inter_rank_bandwidth(c, lay) + latency[1];
    return (intra > inter ? intra : inter) + 2.0 * local / c->memory_bandwidth;
}

/* Seconds rank r spends moving expert shadowing's weights (owner-major
 * weights[P*P]) out, or, transposed, their gradients back, `scale` times:
 * one message per pair that has any, each link class and direction bounded
 * by the busier side, as flat_exchange_s. */
static double shadow_transfer_s(const ClusterSpec *c, const ProjectLayout *lay,
                                const double *weights, int transposed, double scale, int r) {
    int P = lay->world, group = placement_ep_group(lay->ep, r) * lay->ep;
    double out[2] = {0}, in[2] = {0}, latency[2] = {0};
    for (int d = group; d < group + lay->ep; d++) {
        if (d == r) continue;
        int inter = node_of(lay, d) != node_of(lay, r);
        double sent = weights[transposed ? (long)d * P + r : (long)r * P + d] * scale;
        double got = weights[transposed ? (long)r * P + d : (long)d * P + r] * scale;
        out[inter] += sent;
        in[inter] += got;
        if (sent > 0 || got > 0) latency[inter] += inter ? c->inter_latency : c->intra_latency;
    }
    double intra = (out[0] > in[0] ? out[0] : in[0]) / c->intra_bandwidth + latency[0];
    double inter = (out[1] > in[1] ? out[1] : in[1]) / inter_rank_bandwidth(c, lay) + latency[1];
    return intra > inter ? intra : inter;
}

/* The hierarchical exchange of rank r's EP group: each node's leader gathers
 * its ranks' send buffers, the leaders swap one message per node pair over
 * the node's NICs, and scatter. Every rank of the group waits for the
 * slowest leader. */
static double hierarchical_exchange_s(const ClusterSpec *c, const ProjectLayout *lay,
                                      const double *bytes, int r) {
    int P = lay->world, group = placement_ep_group(lay->ep, r) * lay->ep;
    double slowest = 0.0;
    for (int leader = group; leader < group + lay->ep; leader++) {
        if (leader != group && node_of(lay, leader) == node_of(lay, leader - 1)) continue;
        double gathered = 0.0, scattered = 0.0, out = 0.0, in = 0.0, peers = 0.0;
        int node = node_of(lay, leader);
        for (int s = leader; s < group + lay->ep && node_of(lay, s) == node; s++)
            for (int d = group; d < group + lay->ep; d++) {
                int same = node_of(lay, d) == node;
                if (s != leader)
                    gathered += bytes[(long)s * P + d], scattered += bytes[(long)d * P + s];
                if (!same) out += bytes[(long)s * P + d], in += bytes[(long)d * P + s];
            }
        for (int d = group; d < group + lay->ep; d++)
            peers +=
                node_of(lay, d) != node && (d == group || node_of(lay, d) != node_of(lay, d - 1));
        double nic = c->nics_per_node * c->inter_bandwidth / c->oversubscription;
        double t = gathered / c->intra_bandwidth + scattered / c->intra_bandwidth +
                   (out > in ? out : in) / nic + peers * c->inter_latency + 2.0 * c->intra_latency;
        if (t > slowest) slowest = t;
    }
    return slowest;
}

/* Ring or tree all-reduce of `bytes` over n ranks spread over nodes or not.
 * A ring in rank order leaves each node by one hop and enters it by one, so
 * the slowest hop has a node's NICs to itself, not a rank's share of them. */
static double allreduce_s(const ClusterSpec *c, double bytes, int n, int spans_nodes) {
    if (n <= 1 || bytes <= 0) return 0.0;
    double node_nics = c->nics_per_node * c->inter_bandwidth / c->oversubscription;
    double bw = spans_nodes ? (node_nics < c->intra_bandwidth ? node_nics : c->intra_bandwidth)
                            : c->intra_bandwidth;
    double lat = spans_nodes ? c->inter_latency : c->intra_latency;
    if (c->allreduce_tree) {
        double depth = ceil(log2((double)n));
        return 2.0 * depth * (lat + bytes / bw);
    }
    return 2.0 * (n - 1) * (bytes / n / bw + lat);
}

static double expert_params(const ProjectRecord *in) {
    return (double)(in->swiglu ? 3 : 2) * in->hidden * in->moe_ffn_hidden;
}

double project_step_flops(const ProjectRecord *in, double expert_rows_total) {
    double N = (double)global_tokens(in), C = in->hidden, T = in->seq_length;
    double dense_layers = in->num_layers - in->moe_layers;
    double macs = N * C * in->vocab + in->num_layers * (N * 4 * C * C + 2.0 * N * T * C);
    macs +=
        in->moe_layers * N * C * (in->experts + (in->swiglu ? 3.0 : 2.0) * in->shared_ffn_hidden);
    macs += expert_rows_total * expert_params(in) + dense_layers * 2.0 * N * C * in->ffn_hidden;
    return 6.0 * macs;
}

/* Compute of every phase but the experts, identical on every rank. */
static void fixed_compute_s(const ProjectRecord *in, const ProjectLayout *lay, const Machine *mc,
                            double *phase) {
    double N = (double)global_tokens(in) / lay->world, C = in->hidden, T = in->seq_length;
    double B = N / T, H = in->heads, E = in->experts;
    double attention = train_matmul_s(mc, N, 3 * C, C) + train_matmul_s(mc, N, C, C) +
                       B * H * (train_matmul_s(mc, T, T, C / H) + train_matmul_s(mc, T, C / H, T)) +
                       memory_s(mc, 3.0 * 4 * B * H * T * T);
    double router = train_matmul_s(mc, N, E, C) + memory_s(mc, 4.0 * 4 * N * E);
    double dense_ffn =
        train_matmul_s(mc, N, in->ffn_hidden, C) + train_matmul_s(mc, N, C, in->ffn_hidden);
    double w1 = in->swiglu ? 2.0 : 1.0;
    double shared = in->shared_ffn_hidden > 0
                        ? train_matmul_s(mc, N, w1 * in->shared_ffn_hidden, C) +
                              train_matmul_s(mc, N, C, in->shared_ffn_hidden)
                        : 0.0;
    phase[PHASE_ATTENTION] = in->num_layers * attention;
    phase[PHASE_ROUTER] = in->moe_layers * router;
    phase[PHASE_EXPERTS] = (in->num_layers - in->moe_layers) * dense_ffn + in->moe_layers * shared;
    phase[PHASE_OTHER] =
        train_matmul_s(mc, N, in->vocab, C) + memory_s(mc, 3.0 * 4 * N * in->vocab);
}

/* Gradient all-reduce and AdamW: dense gradients over every rank, expert
 * gradients over the ranks holding the same experts; each element travels
 * as moesim's exact sum does (an int64 and a 1-byte exponent). */
static void update_s(const ProjectRecord *in, const ProjectLayout *lay, const Machine *mc,
                     double *phase) {
    int P = lay->world, EP = lay->ep;
    double experts_all = in->moe_layers * (double)in->experts * expert_params(in);
    double dense = (double)in->params_total - experts_all;
    double local_experts = experts_all / EP;
    int dense_spans = node_of(lay, 0) != node_of(lay, P - 1);
    int expert_spans = node_of(lay, 0) != node_of(lay, (P / EP - 1) * EP);
    phase[PHASE_GRAD_ALLREDUCE] =
        allreduce_s(mc->c, 9.0 * dense, P, dense_spans) +
        allreduce_s(mc->c, 9.0 * local_experts, P / EP, expert_spans);
    if (P > 1) phase[PHASE_GRAD_ALLREDUCE] += memory_s(mc, 12.0 * (dense + local_experts));
    phase[PHASE_OPTIMIZER] = memory_s(mc, 28.0 * (dense + local_experts));
}

void project_vector_units(const ProjectRecord *in, const ProjectLayout *lay, const double *rows,
                          int r, double units[PHASE_COUNT]) {
    int P = lay->world, L = in->moe_layers;
    double N = (double)global_tokens(in) / P, C = in->hidden, T = in->seq_length;
    double E = in->experts, K = in->top_k, w1 = in->swiglu ? 2.0 : 1.0;
    double sent = 0.0, received = 0.0;
    for (int l = 0; l < L; l++)
        for (int q = 0; q < P; q++) {
            sent += rows[(long)l * P * P + (long)r * P + q];
            received += rows[(long)l * P * P + (long)q * P + r];
        }
    double experts_all = L * E * expert_params(in);
    double local = (double)in->params_total - experts_all + experts_all / lay->ep;
    memset(units, 0, sizeof(double) * PHASE_COUNT);
    /* norms and residuals over C, the attention softmax over T per head */
    units[PHASE_ATTENTION] = in->num_layers * N * (C + in->heads * T);
    /* scores, selection among E for each of K choices, capacity, statistics */
    units[PHASE_ROUTER] = L * N * E * (1.0 + K);
    units[PHASE_DISPATCH] = sent * C;
    units[PHASE_COMBINE] = received * C + sent * C;
    units[PHASE_EXPERTS] = received * w1 * in->moe_ffn_hidden +
                           (in->num_layers - L) * N * in->ffn_hidden +
                           L * N * w1 * in->shared_ffn_hidden;
    units[PHASE_GRAD_ALLREDUCE] = P > 1 ? local : 0.0;
    units[PHASE_OPTIMIZER] = local;
    /* embedding, the LM head's softmax and loss, the step's bookkeeping */
    units[PHASE_OTHER] = N * (in->vocab + C);
}

/* The [vector] rates' share: each phase's units at its calibrated rate. */
static void add_vector_s(const ProjectRecord *in, const ProjectLayout *lay, const ClusterSpec *c,
                         const double *rows, double *phase_s) {
    double units[PHASE_COUNT];
    for (int r = 0; r < lay->world; r++) {
        project_vector_units(in, lay, rows, r, units);
        for (int ph = 0; ph < PHASE_COUNT; ph++)
            if (c->vector_rate[ph] > 0)
                phase_s[(long)r * PHASE_COUNT + ph] += units[ph] / c->vector_rate[ph];
    }
}

double project_step_time(const ProjectRecord *in, const ProjectLayout *lay, const ClusterSpec *c,
                         const double *rows, const double *shadow_weights, double *phase_s) {
    int P = lay->world, L = in->moe_layers;
    long P2 = (long)P * P;
    Machine mc = machine_of(in, c);
    double fixed[PHASE_COUNT] = {0};
    fixed_compute_s(in, lay, &mc, fixed);
    update_s(in, lay, &mc, fixed);
    double *bytes = malloc(sizeof(double) * (P2 + 2 * (size_t)P));
    if (!bytes) return NAN;
    double *expert = bytes + P2, *wait = expert + P;
    for (int r = 0; r < P; r++) memcpy(phase_s + (long)r * PHASE_COUNT, fixed, sizeof fixed);
    double w1 = in->swiglu ? 2.0 : 1.0;
    for (int l = 0; l < L; l++) {
        const double *m = rows + (long)l * P2;
        for (long i = 0; i < P2; i++) bytes[i] = m[i] * in->hidden * sizeof(float);
        for (int r = 0; r < P; r++) {
            double received = 0.0;
            for (int s = 0; s < P; s++) received += m[(long)s * P + r];
            expert[r] = train_matmul_s(&mc, received, w1 * in->moe_ffn_hidden, in->hidden) +
                        train_matmul_s(&mc, received, in->hidden, in->moe_ffn_hidden);
        }
        /* the combine cannot finish before the slowest expert of the EP group */
        for (int r = 0; r < P; r++) {
            int group = placement_ep_group(lay->ep, r) * lay->ep;
            double slowest = 0.0;
            for (int q = group; q < group + lay->ep; q++)
                slowest = expert[q] > slowest ? expert[q] : slowest;
            wait[r] = slowest - expert[r];
        }
        for (int r = 0; r < P; r++) {
            /* forward rows out and their gradients back in the backward: twice each way */
            double exchange = lay->hierarchical ? hierarchical_exchange_s(c, lay, bytes, r)
                                                : flat_exchange_s(c, lay, bytes, r);
            double counts = lay->ep > 1 ? (lay->ep - 1) * c->intra_latency : 0.0;
            double exposed = exchange;
            if (lay->overlap_chunks > 1) {
                double k = lay->overlap_chunks, hidden = expert[r] * (k - 1) / k;
                exposed = exchange / k > exchange - hidden ? exchange / k : exchange - hidden;
            }
            double *ph = phase_s + (long)r * PHASE_COUNT;
            ph[PHASE_DISPATCH] += 2.0 * exposed + counts;
            ph[PHASE_COMBINE] += 2.0 * exposed + wait[r];
            ph[PHASE_EXPERTS] += expert[r];
            if (shadow_weights) {
                const double *w = shadow_weights + (long)l * P2;
                double grains = (double)in->routing_groups / P;
                ph[PHASE_DISPATCH] += shadow_transfer_s(c, lay, w, 0, 1.0, r);
                ph[PHASE_COMBINE] += shadow_transfer_s(c, lay, w, 1, grains, r);
            }
        }
    }
    free(bytes);
    add_vector_s(in, lay, c, rows, phase_s);
    double step = 0.0;
    for (int r = 0; r < P; r++) {
        double total = 0.0;
        for (int p = 0; p < PHASE_COUNT; p++) total += phase_s[(long)r * PHASE_COUNT + p];
        if (total > step) step = total;
    }
    return step;
}

/* ---- the command ----------------------------------------------------------------- */

typedef struct ProjectArgs {
    const char *record, *cluster, *out;
    ProjectLayout lay;
} ProjectArgs;

static int parse_int(const char *flag, const char *value, int *out, char *err, size_t errlen) {
    char *end = NULL;
    long v = value ? strtol(value, &end, 10) : 0;
    if (!value || !end || end == value || *end || v < 0 || v > 1 << 24) {
        snprintf(err, errlen, "%s needs a whole number >= 0, got %s", flag,
                 value ? value : "nothing");
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_project_args(int argc, char **argv, ProjectArgs *a, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    a->lay.capacity_factor = -1.0;
    for (int i = 0; i < argc; i++) {
        const char *flag = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        int st = 0;
        if (flag[0] != '-') {
            if (a->record) {
                snprintf(err, errlen, "moesim project takes one run record, got %s and %s",
                         a->record, flag);
                return -1;
            }
            a->record = flag;
            continue;
        }
        if (strcmp(flag, "--cluster") == 0)
            a->cluster = value;
        else if (strcmp(flag, "--out") == 0)
            a->out = value;
        else if (strcmp(flag, "--world-size") == 0)
            st = parse_int(flag, value, &a->lay.world, err, errlen);
        else if (strcmp(flag, "--expert-model-parallel-size") == 0)
            st = parse_int(flag, value, &a->lay.ep, err, errlen);
        else if (strcmp(flag, "--ranks-per-node") == 0)
            st = parse_int(flag, value, &a->lay.ranks_per_node, err, errlen);
        else if (strcmp(flag, "--moe-overlap-chunks") == 0)
            st = parse_int(flag, value, &a->lay.overlap_chunks, err, errlen);
        else if (strcmp(flag, "--moe-expert-shadowing") == 0) {
            st = parse_int(flag, value, &a->lay.shadowing, err, errlen);
            if (st == 0 && a->lay.shadowing > 1) {
                snprintf(err, errlen, "--moe-expert-shadowing is 0 or 1, got %s", value);
                return -1;
            }
        } else if (strcmp(flag, "--moe-shadow-min-rows") == 0)
            st = parse_int(flag, value, &a->lay.shadow_min_rows, err, errlen);
        else if (strcmp(flag, "--moe-expert-capacity-factor") == 0) {
            char *end = NULL;
            a->lay.capacity_factor = value ? strtod(value, &end) : -1.0;
            if (!value || !end || *end || !(a->lay.capacity_factor >= 0)) {
                snprintf(err, errlen,
                         "--moe-expert-capacity-factor needs a number >= 0 (0 = "
                         "dropless), got %s",
                         value ? value : "nothing");
                return -1;
            }
        } else if (strcmp(flag, "--moe-token-dispatcher-type") == 0) {
            if (!value || (strcmp(value, "alltoall") != 0 && strcmp(value, "hierarchical") != 0)) {
                snprintf(err, errlen,
                         "--moe-token-dispatcher-type is alltoall or hierarchical, "
                         "got %s",
                         value ? value : "nothing");
                return -1;
            }
            a->lay.hierarchical = strcmp(value, "hierarchical") == 0;
        } else {
            snprintf(err, errlen,
                     "unknown option %s; usage: moesim project RUN.h5 --cluster CLUSTER.ini "
                     "--world-size P [--expert-model-parallel-size EP] [--ranks-per-node N] "
                     "[--moe-token-dispatcher-type alltoall|hierarchical] [--moe-overlap-chunks "
                     "K] [--moe-expert-shadowing 0|1] [--moe-shadow-min-rows N] "
                     "[--moe-expert-capacity-factor CF] [--out PRED.h5]",
                     flag);
            return -1;
        }
        if (st) return -1;
        if (!value) {
            snprintf(err, errlen, "%s needs a value", flag);
            return -1;
        }
        i++;
    }
    if (!a->record || !a->cluster || a->lay.world == 0) {
        snprintf(err, errlen,
                 "moesim project needs a run record, --cluster CLUSTER.ini and --world-size P "
                 "(e.g. moesim project run.h5 --cluster experiments/clusters/h100.ini "
                 "--world-size 16)");
        return -1;
    }
    return 0;
}

/* Everything one projection computes, per record row. */
typedef struct Projection {
    int rows, P, L, nodes;
    long *dispatch_bytes, *node_bytes, *expert_rows, *dropped_per_rank, *scratch;
    double *layer_rows, *phase_s, *balanced_phase_s, *step_s, *balanced_s, *mfu;
    /* with --moe-expert-shadowing: [rows][L] rows shadowed, [P] a layer's
     * shadowed rows per rank, [L][P*P] weight bytes owner to source */
    long *shadowed_rows, *own;
    double *shadow_weights;
} Projection;

static void projection_free(Projection *p) {
    free(p->dispatch_bytes);
    free(p->node_bytes);
    free(p->expert_rows);
    free(p->dropped_per_rank);
    free(p->scratch);
    free(p->layer_rows);
    free(p->phase_s);
    free(p->balanced_phase_s);
    free(p->step_s);
    free(p->balanced_s);
    free(p->mfu);
    free(p->shadowed_rows);
    free(p->own);
    free(p->shadow_weights);
}

static int projection_init(Projection *p, const ProjectRecord *in, const ProjectLayout *lay) {
    memset(p, 0, sizeof *p);
    p->rows = in->rows, p->P = lay->world, p->L = in->moe_layers;
    p->nodes = (lay->world + lay->ranks_per_node - 1) / lay->ranks_per_node;
    size_t R = (size_t)p->rows, P2 = (size_t)p->P * p->P, L = (size_t)(p->L ? p->L : 1);
    if (p->P <= PROJECT_RANK_MATRIX_MAX) p->dispatch_bytes = calloc(R * P2, sizeof(long));
    p->node_bytes = calloc(R * p->nodes * p->nodes, sizeof(long));
    p->expert_rows = calloc(R * L * p->P, sizeof(long));
    p->dropped_per_rank = calloc(R * L * p->P, sizeof(long));
    p->scratch = calloc(2 * P2, sizeof(long));
    p->layer_rows = calloc(L * P2, sizeof(double));
    p->phase_s = calloc(R * p->P * PHASE_COUNT, sizeof(double));
    p->balanced_phase_s = calloc(R * p->P * PHASE_COUNT, sizeof(double));
    p->step_s = calloc(R, sizeof(double));
    p->balanced_s = calloc(R, sizeof(double));
    p->mfu = calloc(R, sizeof(double));
    if (lay->shadowing) {
        p->shadowed_rows = calloc(R * L, sizeof(long));
        p->own = calloc((size_t)p->P, sizeof(long));
        p->shadow_weights = calloc(L * P2, sizeof(double));
        if (!p->shadowed_rows || !p->own || !p->shadow_weights) return -1;
    }
    return (p->dispatch_bytes || p->P > PROJECT_RANK_MATRIX_MAX) && p->node_bytes &&
                   p->expert_rows && p->dropped_per_rank && p->scratch && p->layer_rows && p->phase_s &&
                   p->balanced_phase_s && p->step_s && p->balanced_s && p->mfu
               ? 0
               : -1;
}

/* Every expert equally loaded: each rank's kept rows spread evenly over all
 * E experts, so each EP peer receives E_local/E of them. */
static void balance_rows(const ProjectLayout *lay, double *rows) {
    int P = lay->world;
    for (int s = 0; s < P; s++) {
        int group = placement_ep_group(lay->ep, s) * lay->ep;
        double sent = 0.0;
        for (int d = group; d < group + lay->ep; d++) sent += rows[(long)s * P + d];
        for (int d = group; d < group + lay->ep; d++) rows[(long)s * P + d] = sent / lay->ep;
    }
}

/* A shadowed block's rows stay with their source: sent nowhere, computed
 * there (on the diagonal of the layer's row matrix). */
static int shadow_layer(Projection *p, const ProjectRecord *in, const ProjectLayout *lay, int row,
                        int l, long *layer) {
    long P = p->P, P2 = P * P;
    long n = project_plan_shadows(in, lay, row, l, layer, p->own, p->shadow_weights + l * P2);
    if (n < 0) return -1;
    p->shadowed_rows[(long)row * p->L + l] = n;
    return 0;
}

static int project_row(Projection *p, const ProjectRecord *in, const ProjectLayout *lay,
                       const ClusterSpec *c, int row) {
    long P = p->P, P2 = P * P;
    long *bytes = p->scratch + P2, *layer = p->scratch;
    double total_rows = 0.0;
    memset(bytes, 0, sizeof(long) * P2);
    for (int l = 0; l < p->L; l++) {
        project_layer_rows(in, lay, row, l, layer);
        if (lay->shadowing && shadow_layer(p, in, lay, row, l, layer) != 0) return -1;
        for (long i = 0; i < P2; i++) {
            /* a row is hidden-size floats, whatever the matmul precision */
            bytes[i] += layer[i] * in->hidden * (long)sizeof(float);
            int own = lay->shadowing && i / P == i % P;
            double computed = (double)layer[i] + (own ? (double)p->own[i / P] : 0.0);
            p->layer_rows[l * P2 + i] = computed;
            total_rows += computed;
            p->expert_rows[((long)row * p->L + l) * P + i % P] += (long)computed;
        }
        project_layer_drops(in, lay, row, l, p->dropped_per_rank + ((long)row * p->L + l) * P);
    }
    if (p->dispatch_bytes) memcpy(p->dispatch_bytes + row * P2, bytes, sizeof(long) * P2);
    long *nodes = p->node_bytes + (long)row * p->nodes * p->nodes;
    for (long i = 0; i < P2; i++)
        nodes[node_of(lay, (int)(i / P)) * p->nodes + node_of(lay, (int)(i % P))] += bytes[i];
    p->step_s[row] = project_step_time(in, lay, c, p->layer_rows, p->shadow_weights,
                                       p->phase_s + row * P * PHASE_COUNT);
    Machine mc = machine_of(in, c);
    p->mfu[row] = project_step_flops(in, total_rows) / (p->step_s[row] * P * mc.peak);
    for (int l = 0; l < p->L; l++) balance_rows(lay, p->layer_rows + l * P2);
    p->balanced_s[row] = project_step_time(in, lay, c, p->layer_rows, NULL,
                                           p->balanced_phase_s + row * P * PHASE_COUNT);
    return 0;
}

static double mean_of(const double *v, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += v[i];
    return n ? s / n : 0.0;
}

static void print_summary(const Projection *p, const ProjectRecord *in, const ProjectLayout *lay,
                          const ClusterSpec *c) {
    int R = p->rows, P = p->P;
    double step = mean_of(p->step_s, R), balanced = mean_of(p->balanced_s, R);
    double phase[PHASE_COUNT] = {0}, exposed = 0.0;
    int slowest_rank = 0;
    double slowest = -1.0;
    for (int r = 0; r < P; r++) {
        double total = 0.0;
        for (int row = 0; row < R; row++)
            for (int ph = 0; ph < PHASE_COUNT; ph++)
                total += p->phase_s[((long)row * P + r) * PHASE_COUNT + ph];
        if (total > slowest) slowest = total, slowest_rank = r;
    }
    for (int row = 0; row < R; row++)
        for (int ph = 0; ph < PHASE_COUNT; ph++)
            phase[ph] += p->phase_s[((long)row * P + slowest_rank) * PHASE_COUNT + ph] / R;
    exposed = phase[PHASE_DISPATCH] + phase[PHASE_COMBINE] + phase[PHASE_GRAD_ALLREDUCE];
    long busiest = 0;
    int from = 0, to = 0;
    for (int row = 0; row < R; row++)
        for (int a = 0; a < p->nodes; a++)
            for (int b = 0; b < p->nodes; b++) {
                long v = p->node_bytes[((long)row * p->nodes + a) * p->nodes + b];
                if (a != b && v > busiest) busiest = v, from = a, to = b;
            }
    printf(
        "moesim project: %d recorded step(s) of %d routing groups on %s: %d rank(s), EP %d, "
        "%d rank(s) per node (%d node(s)), %s dispatcher%s\n",
        R, in->routing_groups, c->name, P, lay->ep, lay->ranks_per_node, p->nodes,
        lay->hierarchical ? "hierarchical" : "alltoall",
        lay->overlap_chunks > 1 ? ", overlapped" : "");
    if (p->shadowed_rows) {
        double shadowed = 0.0, computed = 0.0;
        for (long i = 0; i < (long)R * p->L; i++) shadowed += (double)p->shadowed_rows[i];
        for (long i = 0; i < (long)R * p->L * P; i++) computed += (double)p->expert_rows[i];
        printf(
            "shadowing: %.1f%% of the expert rows computed by their source ranks (%.0f of %.0f)\n",
            computed > 0 ? 100.0 * shadowed / computed : 0.0, shadowed, computed);
    }
    printf("step time %.6g s (balanced routing %.6g s: imbalance costs %.1f%%) | MFU %.1f%%\n",
           step, balanced, balanced > 0 ? 100.0 * (step - balanced) / balanced : 0.0,
           100.0 * mean_of(p->mfu, R));
    printf("bottleneck rank %d:", slowest_rank);
    for (int ph = 0; ph < PHASE_COUNT; ph++) printf(" %s %.3g s", phase_names[ph], phase[ph]);
    printf("\nexposed communication %.3g s (%.1f%% of the step)", exposed,
           step > 0 ? 100.0 * exposed / step : 0.0);
    if (busiest > 0 && p->nodes > 1) {
        double crossing = 0.0, pairs = 0.0;
        for (int row = 0; row < R; row++)
            for (int a = 0; a < p->nodes; a++)
                for (int b = 0; b < p->nodes; b++) {
                    long v = p->node_bytes[((long)row * p->nodes + a) * p->nodes + b];
                    if (a != b && v > 0) crossing += (double)v, pairs++;
                }
        printf(
            " | busiest node link %d -> %d: %.3g MB in one step, %.2fx the mean of the %.0f "
            "node pairs that exchange",
            from, to, busiest / 1e6, busiest / (crossing / pairs), pairs / R);
    }
    printf("\n");
}

static int run_projection(const ProjectArgs *a, char *err, size_t errlen) {
    ProjectRecord in;
    ClusterSpec cluster;
    if (project_read_cluster(a->cluster, &cluster, err, errlen) != 0) return -1;
    if (record_read_projection(a->record, &in, err, errlen) != 0) return -1;
    ProjectLayout lay = a->lay;
    Projection p;
    int st = project_resolve_layout(&in, &cluster, &lay, err, errlen);
    if (st == 0 && lay.capacity_factor >= 0)
        st = project_apply_capacity(&in, lay.capacity_factor, err, errlen);
    if (st == 0 && projection_init(&p, &in, &lay) != 0) {
        snprintf(err, errlen, "out of memory projecting %d ranks; project fewer ranks", lay.world);
        projection_free(&p);
        st = -1;
    }
    if (st != 0) {
        project_record_free(&in);
        return -1;
    }
    for (int row = 0; row < in.rows && st == 0; row++)
        st = project_row(&p, &in, &lay, &cluster, row);
    if (st != 0) {
        snprintf(err, errlen, "out of memory planning expert shadows; project fewer ranks");
        projection_free(&p);
        project_record_free(&in);
        return -1;
    }
    print_summary(&p, &in, &lay, &cluster);
    if (a->out) {
        ProjectOutput out = {.in = &in,
                             .lay = &lay,
                             .cluster = &cluster,
                             .cluster_path = a->cluster,
                             .nodes = p.nodes,
                             .dispatch_bytes = p.dispatch_bytes,
                             .node_bytes = p.node_bytes,
                             .expert_rows = p.expert_rows,
                             .dropped_per_rank = in.group_drops ? p.dropped_per_rank : NULL,
                             .shadowed_rows = p.shadowed_rows,
                             .phase_s = p.phase_s,
                             .balanced_phase_s = p.balanced_phase_s,
                             .step_time_s = p.step_s,
                             .balanced_step_time_s = p.balanced_s,
                             .mfu = p.mfu};
        st = record_write_projection(a->out, &out, err, errlen);
        if (st == 0) printf("projection %s\n", a->out);
    }
    projection_free(&p);
    project_record_free(&in);
    return st;
}

int project_main(int argc, char **argv) {
    char err[MOESIM_ERR_MAX] = "";
    ProjectArgs args;
    int st = parse_project_args(argc, argv, &args, err, sizeof err);
    if (st == 0) st = run_projection(&args, err, sizeof err);
    if (st != 0) fprintf(stderr, "moesim: error: %s\n", err);
    fflush(stdout);
    return st == 0 ? 0 : 1;
}
