#include "moesim/router.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/ops.h"
#include "moesim/rng.h"

/* Independent random streams, so noise, jitter and routing draws never
 * share values. */
#define DOMAIN_NOISE 0x6e6f697365ull
#define DOMAIN_JITTER 0x6a6974746572ull
#define DOMAIN_SECOND_EXPERT 0x67736861726dull
#define DOMAIN_GROUP_NOISE 0x67726f75706eull
#define SINKHORN_TOLERANCE 1e-4
#define SINKHORN_MAX_ITERATIONS 200

RouterType router_type_from_name(const char *name) {
    static const char *const names[] = {"topk",          "switch",   "noisy_topk", "gshard_top2",
                                        "expert_choice", "sinkhorn", "soft"};
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++)
        if (strcmp(name, names[i]) == 0) return (RouterType)i;
    return ROUTER_TOPK;
}

BalancingType balancing_type_from_name(const char *name) {
    static const char *const names[] = {"aux_loss", "seq_aux_loss", "global_aux_loss", "none"};
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++)
        if (strcmp(name, names[i]) == 0) return (BalancingType)i;
    return BALANCE_AUX_LOSS;
}

int router_slots(const RouterShape *s) {
    return s->type == ROUTER_EXPERT_CHOICE || s->type == ROUTER_SOFT ? s->E : s->K;
}

int router_capacity(double capacity_factor, int G, int K, int E) {
    /* The tolerance keeps exact products (1.1 * 100 * 1 / 10 = 11) from
     * rounding up to the next integer through binary representation error. */
    double exact = capacity_factor * G * K / E;
    int capacity = (int)ceil(exact - 1e-9 * exact);
    return capacity < 1 ? 1 : capacity;
}

static int balancing_units(const RouterShape *s) {
    switch (s->balancing) {
        case BALANCE_SEQ_AUX_LOSS:
            return s->N / s->T;
        case BALANCE_GLOBAL_AUX_LOSS:
            return 1;
        default:
            return s->N / s->G;
    }
}

int routing_grain_tokens(const RouterShape *s) {
    return s->grain > 0 ? s->grain : s->N;
}

int routing_grains(const RouterShape *s) {
    return s->N / routing_grain_tokens(s);
}

int routing_grain_width(int E) {
    return 2 * E + GRAIN_SCALARS;
}

/* The loss is a mean over the global batch: world micro-batches. */
static double world_of(const RouterShape *s) {
    return s->world > 1 ? s->world : 1;
}

int routing_init(Routing *r, const RouterShape *s) {
    memset(r, 0, sizeof *r);
    r->slots = router_slots(s);
    size_t N = (size_t)s->N, E = (size_t)s->E, C = (size_t)s->C, NE = N * E;
    size_t NS = N * r->slots, groups = (size_t)(s->N / s->G), units = (size_t)balancing_units(s);
    int noisy = s->type == ROUTER_NOISY_TOPK, jitter = s->jitter_eps > 0;
    int failed = 0;
#define ALLOC(ptr, count) failed |= !((ptr) = calloc((count) + 1, sizeof *(ptr)))
    if (jitter) {
        ALLOC(r->x_in, N * C);
        ALLOC(r->jitter, N * C);
        ALLOC(r->dx_in, N * C);
    }
    ALLOC(r->logits, NE);
    if (noisy) {
        ALLOC(r->noise_pre, NE);
        ALLOC(r->noise_std, NE);
        ALLOC(r->noise, NE);
        ALLOC(r->dnoise, NE);
        ALLOC(r->load, groups * E);
        ALLOC(r->load_z, NE);
        ALLOC(r->load_threshold, NE);
    }
    if (s->type == ROUTER_GSHARD_TOP2) ALLOC(r->second_draw, N);
    if (s->hier_groups > 0) {
        size_t NG = N * (size_t)s->hier_groups, groups_hg = groups * (size_t)s->hier_groups;
        ALLOC(r->group_logits, NG);
        ALLOC(r->group_h, NG);
        ALLOC(r->group_probs, NG);
        ALLOC(r->dgroup, NG);
        if (noisy) {
            ALLOC(r->group_noise_pre, NG);
            ALLOC(r->group_noise_std, NG);
            ALLOC(r->group_noise, NG);
            ALLOC(r->dgroup_noise, NG);
            ALLOC(r->group_load_z, NG);
            ALLOC(r->group_load_threshold, NG);
            ALLOC(r->load_primary, groups_hg);
            ALLOC(r->dload_primary, groups_hg);
            ALLOC(r->group_tokens, groups_hg);
            ALLOC(r->load_within, groups * E);
            ALLOC(r->dload_within, groups * E);
        }
    }
    ALLOC(r->h, NE);
    ALLOC(r->probs, NE);
    ALLOC(r->lse, N);
    ALLOC(r->select_scores, NE);
    ALLOC(r->choice_expert, NS);
    ALLOC(r->choice_gate, NS);
    ALLOC(r->choice_routed, NS);
    ALLOC(r->choice_kept, NS);
    ALLOC(r->unit_fraction, units * E);
    ALLOC(r->unit_prob, units * E);
    ALLOC(r->importance, groups * E);
    ALLOC(r->tokens_per_expert, E);
    ALLOC(r->balanced_demand, E);
    ALLOC(r->dropped_per_expert, E);
    ALLOC(r->dprobs, NE);
    ALLOC(r->dh, NE);
    ALLOC(r->group_load, E);
    ALLOC(r->order, NS > E ? NS : E);
    ALLOC(r->slot_scratch, (size_t)r->slots);
    ALLOC(r->sinkhorn_d, (size_t)s->G + E);
    ALLOC(r->group_score, E);
    ALLOC(r->group_rank, 2 * E); /* hierarchical: ranks, then the best groups */
    ALLOC(r->gate_sum, E);
    ALLOC(r->prob_sum, E);
    ALLOC(r->grain_stats, (size_t)routing_grains(s) * routing_grain_width(s->E));
#undef ALLOC
    if (failed) {
        routing_free(r);
        return -1;
    }
    return 0;
}

size_t routing_bytes(const RouterShape *s) {
    size_t N = (size_t)s->N, E = (size_t)s->E, C = (size_t)s->C, NE = N * E;
    size_t NS = N * router_slots(s), groups = (size_t)(s->N / s->G);
    size_t units = (size_t)balancing_units(s);
    size_t order = NS > E ? NS : E;
    size_t bytes = sizeof(float) * (6 * NE + N + NS) + sizeof(int) * (NS + E + order) + 2 * NS + sizeof(long) * E +
                   sizeof(float) * (size_t)router_slots(s) + sizeof(float) * units * E +
                   sizeof(double) * (units * E + groups * E) + 2 * sizeof(long) * E +
                   sizeof(double) * ((size_t)s->G + E + 2 * E) + (sizeof(float) + sizeof(int)) * E +
                   sizeof(double) * (size_t)routing_grains(s) * routing_grain_width(s->E);
    if (s->jitter_eps > 0) bytes += 3 * sizeof(float) * N * C;
    if (s->type == ROUTER_NOISY_TOPK)
        bytes += sizeof(float) * 5 * NE + sizeof(double) * groups * E + sizeof(int) * NE;
    if (s->type == ROUTER_GSHARD_TOP2) bytes += sizeof(double) * N;
    bytes += sizeof(float) * 4 * N * (size_t)s->hier_groups + sizeof(int) * E;
    if (s->hier_groups > 0 && s->type == ROUTER_NOISY_TOPK)
        bytes += (sizeof(float) * 5 + sizeof(int)) * N * (size_t)s->hier_groups +
                 sizeof(double) * (3 * groups * (size_t)s->hier_groups + 2 * groups * E);
    return bytes;
}

void routing_free(Routing *r) {
    void *owned[] = {r->x_in,
                     r->jitter,
                     r->logits,
                     r->noise_pre,
                     r->noise_std,
                     r->noise,
                     r->h,
                     r->probs,
                     r->lse,
                     r->select_scores,
                     r->choice_expert,
                     r->choice_gate,
                     r->choice_routed,
                     r->choice_kept,
                     r->unit_fraction,
                     r->unit_prob,
                     r->importance,
                     r->load,
                     r->load_z,
                     r->load_threshold,
                     r->tokens_per_expert,
                     r->balanced_demand,
                     r->dropped_per_expert,
                     r->dprobs,
                     r->dh,
                     r->dnoise,
                     r->dx_in,
                     r->group_load,
                     r->order,
                     r->slot_scratch,
                     r->sinkhorn_d,
                     r->gate_sum,
                     r->prob_sum,
                     r->grain_stats,
                     r->second_draw,
                     r->group_score,
                     r->group_rank,
                     r->group_logits,
                     r->group_probs,
                     r->dgroup,
                     r->group_h,
                     r->group_noise_pre,
                     r->group_noise_std,
                     r->group_noise,
                     r->dgroup_noise,
                     r->group_load_z,
                     r->group_load_threshold,
                     r->load_primary,
                     r->dload_primary,
                     r->group_tokens,
                     r->load_within,
                     r->dload_within};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
    memset(r, 0, sizeof *r);
}

/* ---- randomness keyed by what is being drawn, not by the order of draws ---- */

static uint64_t draw_key(uint64_t domain, const RouterContext *ctx, uint64_t index) {
    return rng_hash3(rng_hash3(domain, ctx->seed, (uint64_t)ctx->step), (uint64_t)ctx->layer,
                     index);
}

static double uniform_at(uint64_t domain, const RouterContext *ctx, uint64_t index) {
    return (double)(rng_mix64(draw_key(domain, ctx, index)) >> 11) * (1.0 / 9007199254740992.0);
}

static double normal_at(uint64_t domain, const RouterContext *ctx, uint64_t index) {
    Rng rng = {draw_key(domain, ctx, index)};
    return rng_normal(&rng);
}

/* ---- scores -------------------------------------------------------------- */

static const float *jitter_input(Routing *r, const float *x, const RouterShape *s,
                                 const RouterContext *ctx) {
    long n = (long)s->N * s->C;
    for (long i = 0; i < n; i++) {
        uint64_t index = (uint64_t)(ctx->first_token * s->C + i);
        float u = (float)(1.0 - s->jitter_eps +
                          2.0 * s->jitter_eps * uniform_at(DOMAIN_JITTER, ctx, index));
        r->jitter[i] = u;
        r->x_in[i] = x[i] * u;
    }
    return r->x_in;
}

static float softplus(float v) {
    return v > 20.0f ? v : log1pf(expf(v));
}
static float sigmoid(float v) {
    return 1.0f / (1.0f + expf(-v));
}

/* Noisy gating over `width` logits per token: h += noise * softplus(x·Wnoise^T),
 * noise only in training, each draw keyed by global token and column. */
typedef struct NoisyGate {
    float *h, *pre, *std, *noise;
    const float *noise_w;
    int width;
    uint64_t domain;
} NoisyGate;

static void add_noise(const NoisyGate *g, const float *x_in, const RouterShape *s,
                      const RouterContext *ctx) {
    matmul_forward(g->pre, x_in, g->noise_w, s->N, s->C, g->width, ctx->matmul);
    for (long i = 0; i < (long)s->N * g->width; i++) {
        g->std[i] = softplus(g->pre[i]);
        uint64_t index = (uint64_t)(ctx->first_token * g->width + i);
        g->noise[i] = ctx->training ? (float)normal_at(g->domain, ctx, index) : 0.0f;
        g->h[i] += g->noise[i] * g->std[i];
    }
}

static void add_gating_noise(Routing *r, const float *x_in, const RouterWeights *w,
                             const RouterShape *s, const RouterContext *ctx) {
    NoisyGate g = {r->h, r->noise_pre, r->noise_std, r->noise, w->noise_w, s->E, DOMAIN_NOISE};
    add_noise(&g, x_in, s, ctx);
}

/* The primary router's noise (Shazeer 2017 gates noisily at both levels):
 * its own draws, keyed by global token and group. */
static void add_primary_noise(Routing *r, const float *x_in, const RouterWeights *w,
                              const RouterShape *s, const RouterContext *ctx) {
    NoisyGate g = {r->group_h,     r->group_noise_pre, r->group_noise_std, r->group_noise,
                   w->group_noise_w, s->hier_groups,   DOMAIN_GROUP_NOISE};
    add_noise(&g, x_in, s, ctx);
}

/* Hierarchical: the score of expert j of group i is P_i * q_j, P the
 * softmax of the (noisy) primary logits, q the softmax of group i's. */
static void hierarchical_scores(Routing *r, const float *x_in, const RouterWeights *w,
                                const RouterShape *s, const RouterContext *ctx) {
    int E = s->E, groups = s->hier_groups, per_group = E / groups;
    matmul_forward(r->group_logits, x_in, w->group_w, s->N, s->C, groups, ctx->matmul);
    memcpy(r->group_h, r->group_logits, sizeof(float) * (size_t)s->N * groups);
    if (s->type == ROUTER_NOISY_TOPK) add_primary_noise(r, x_in, w, s, ctx);
    for (int t = 0; t < s->N; t++) {
        float *P = r->group_probs + (long)t * groups, *p = r->probs + (long)t * E;
        memcpy(P, r->group_h + (long)t * groups, sizeof(float) * groups);
        softmax_row(P, groups);
        memcpy(p, r->h + (long)t * E, sizeof(float) * E);
        for (int i = 0; i < groups; i++) {
            softmax_row(p + i * per_group, per_group);
            for (int j = 0; j < per_group; j++) p[i * per_group + j] *= P[i];
        }
    }
}

static void compute_scores(Routing *r, const float *x_in, const RouterWeights *w,
                           const RouterShape *s, const RouterContext *ctx) {
    int E = s->E;
    for (int t = 0; t < s->N; t++) {
        const float *h = r->h + (long)t * E;
        float *p = r->probs + (long)t * E;
        memcpy(p, h, sizeof(float) * E);
        r->lse[t] = softmax_row(p, E);
        if (s->sigmoid_scores)
            for (int e = 0; e < E; e++) p[e] = sigmoid(h[e]);
    }
    if (s->hier_groups > 0) hierarchical_scores(r, x_in, w, s, ctx);
}

/* ---- selection ------------------------------------------------------------ */

/* The K largest of scores[E], best first; ties go to the lower expert index so
 * routing never depends on anything but the scores. */
static void select_top_k(int *chosen, const float *scores, int E, int K) {
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= chosen[j] == e;
            if (!taken && (best < 0 || scores[e] > scores[best])) best = e;
        }
        chosen[k] = best;
    }
}

/* Megatron's Sinkhorn: rescale exp(h) of one routing group until every
 * token's row and every expert's column carry equal mass. */
static void sinkhorn_group(float *out, const float *h, int G, int E, double *d) {
    double *d0 = d, *d1 = d + G;
    float max = h[0];
    for (long i = 0; i < (long)G * E; i++) max = h[i] > max ? h[i] : max;
    for (long i = 0; i < (long)G * E; i++) out[i] = expf(h[i] - max);
    for (int e = 0; e < E; e++) d1[e] = 1.0;
    for (int it = 0; it < SINKHORN_MAX_ITERATIONS; it++) {
        for (int t = 0; t < G; t++) {
            double sum = 0.0;
            for (int e = 0; e < E; e++) sum += d1[e] * out[(long)t * E + e];
            d0[t] = 1.0 / G / (sum + 1e-8);
        }
        double error = 0.0;
        for (int e = 0; e < E; e++) {
            double sum = 0.0;
            for (int t = 0; t < G; t++) sum += d0[t] * out[(long)t * E + e];
            double next = 1.0 / E / (sum + 1e-8);
            error += fabs(next - d1[e]);
            d1[e] = next;
        }
        if (error / E < SINKHORN_TOLERANCE) break;
    }
    for (int t = 0; t < G; t++)
        for (int e = 0; e < E; e++) out[(long)t * E + e] *= (float)(d0[t] * d1[e]);
}

static void fill_selection_scores(Routing *r, const RouterShape *s, const RouterContext *ctx) {
    int N = s->N, E = s->E;
    if (s->type == ROUTER_SINKHORN && ctx->training) {
        for (int g = 0; g < N / s->G; g++)
            sinkhorn_group(r->select_scores + (long)g * s->G * E, r->h + (long)g * s->G * E, s->G,
                           E, r->sinkhorn_d);
        return;
    }
    memcpy(r->select_scores, r->probs, sizeof(float) * (size_t)N * E);
    if (ctx->expert_bias)
        for (int t = 0; t < N; t++)
            for (int e = 0; e < E; e++) r->select_scores[(long)t * E + e] += ctx->expert_bias[e];
}

/* Group-limited routing (DeepSeek-V3, Megatron-Core's group_limited_topk):
 * a group's score is the sum of its top (k / group_topk) selection scores;
 * the experts outside the token's group_topk best groups become
 * unselectable. Ties go to the lower group, as for experts. */
static void limit_to_best_groups(Routing *r, const RouterShape *s) {
    int E = s->E, groups = s->num_groups, per_group = E / groups, M = s->group_topk;
    int summed = s->K / M < 1 ? 1 : s->K / M > per_group ? per_group : s->K / M;
    for (int t = 0; t < s->N; t++) {
        float *scores = r->select_scores + (long)t * E;
        for (int g = 0; g < groups; g++) {
            select_top_k(r->group_rank, scores + g * per_group, per_group, summed);
            float sum = 0.0f;
            for (int i = 0; i < summed; i++) sum += scores[g * per_group + r->group_rank[i]];
            r->group_score[g] = sum;
        }
        select_top_k(r->group_rank, r->group_score, groups, M);
        for (int g = 0; g < groups; g++) {
            int allowed = 0;
            for (int i = 0; i < M; i++) allowed |= r->group_rank[i] == g;
            if (!allowed)
                for (int e = g * per_group; e < (g + 1) * per_group; e++) scores[e] = -INFINITY;
        }
    }
}

/* A softmax over the k selected logits equals the selected probabilities
 * renormalised, gradients included. */
static int renormalises(const RouterShape *s) {
    return s->norm_topk_prob || s->softmax_over_selected || s->type == ROUTER_NOISY_TOPK ||
           s->type == ROUTER_GSHARD_TOP2;
}

/* Hierarchical: the hier_group_topk best groups by (noisy) primary logit, best
 * first, then within each the K / hier_group_topk best experts by score.
 * Ties go to the lower index at both levels. */
static void select_hierarchical(int *chosen, Routing *r, const RouterShape *s, int t) {
    int groups = s->hier_groups, per_group = s->E / groups, M = s->hier_group_topk;
    int within = s->K / M;
    select_top_k(r->group_rank, r->group_h + (long)t * groups, groups, M);
    int *best_groups = r->group_rank + groups; /* group_rank holds E >= 2 * groups ints */
    memcpy(best_groups, r->group_rank, sizeof(int) * M);
    for (int m = 0; m < M; m++) {
        int first = best_groups[m] * per_group;
        select_top_k(chosen + m * within, r->select_scores + (long)t * s->E + first, per_group,
                     within);
        for (int k = 0; k < within; k++) chosen[m * within + k] += first;
    }
}

/* Hierarchical noisy_topk gates as in Shazeer 2017, appendix B:
 * G_primary(x)_i * G_i(x)_j, each a softmax over its level's kept noisy
 * logits, i.e. P_i over the kept groups' P times p_(i,j) over group i's kept
 * p. With k_1 = 1 the first factor is 1 and these are the products
 * renormalised over the token's k experts, as for the other routers. */
static int two_level_gates(const RouterShape *s) {
    return s->hier_groups > 0 && s->type == ROUTER_NOISY_TOPK;
}

static void two_level_gates_forward(float *gate, const int *chosen, const Routing *r,
                                    const RouterShape *s, int t) {
    int per_group = s->E / s->hier_groups, within = s->K / s->hier_group_topk;
    const float *P = r->group_probs + (long)t * s->hier_groups, *p = r->probs + (long)t * s->E;
    float kept_primary = 0.0f;
    for (int m = 0; m < s->hier_group_topk; m++) kept_primary += P[chosen[m * within] / per_group];
    for (int m = 0; m < s->hier_group_topk; m++) {
        const int *e = chosen + m * within;
        float kept = 0.0f;
        for (int k = 0; k < within; k++) kept += p[e[k]];
        float primary = P[e[0] / per_group] / kept_primary;
        for (int k = 0; k < within; k++) gate[m * within + k] = primary * (p[e[k]] / kept);
    }
}

/* Top-k family: k slots per token, gates from the scores of the selected. */
static void select_top_k_slots(Routing *r, const RouterShape *s, const RouterContext *ctx) {
    int E = s->E, K = s->K;
    for (int t = 0; t < s->N; t++) {
        int *chosen = r->choice_expert + (long)t * K;
        float *gate = r->choice_gate + (long)t * K;
        const float *p = r->probs + (long)t * E;
        if (s->hier_groups > 0)
            select_hierarchical(chosen, r, s, t);
        else
            select_top_k(chosen, r->select_scores + (long)t * E, E, K);
        float sum = 0.0f;
        for (int k = 0; k < K; k++) sum += p[chosen[k]];
        for (int k = 0; k < K; k++) {
            gate[k] = renormalises(s) ? p[chosen[k]] / sum : p[chosen[k]];
            r->choice_routed[(long)t * K + k] = 1;
        }
        if (two_level_gates(s)) two_level_gates_forward(gate, chosen, r, s, t);
        /* GShard: the second expert gets the token with probability 2*g2. */
        if (s->type == ROUTER_GSHARD_TOP2 && ctx->training && K == 2) {
            double u = uniform_at(DOMAIN_SECOND_EXPERT, ctx, (uint64_t)(ctx->first_token + t));
            r->second_draw[t] = u;
            r->choice_routed[(long)t * K + 1] = u < 2.0 * gate[1];
        }
    }
}

typedef struct SortContext {
    const int *expert;
    const float *gate;
} SortContext;

/* Within a group: by expert, then highest gate, then earliest slot. */
static int by_expert_then_gate(const void *a, const void *b, void *arg) {
    const SortContext *c = arg;
    int i = *(const int *)a, j = *(const int *)b;
    if (c->expert[i] != c->expert[j]) return c->expert[i] < c->expert[j] ? -1 : 1;
    if (c->gate[i] != c->gate[j]) return c->gate[i] > c->gate[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}

/* Expert choice: in each group, every expert takes its top-C tokens. */
static void select_expert_choice(Routing *r, const RouterShape *s, int capacity) {
    int E = s->E, G = s->G;
    for (long a = 0; a < (long)s->N * E; a++) {
        r->choice_expert[a] = (int)(a % E);
        r->choice_gate[a] = r->probs[a];
        r->choice_routed[a] = 0;
    }
    for (int g = 0; g < s->N / G; g++) {
        for (int e = 0; e < E; e++) {
            /* selection sort of the top-C tokens: C and G are small */
            for (int c = 0; c < capacity && c < G; c++) {
                int best = -1;
                for (int t = g * G; t < (g + 1) * G; t++) {
                    long a = (long)t * E + e;
                    if (r->choice_routed[a]) continue;
                    if (best < 0 || r->probs[a] > r->probs[(long)best * E + e]) best = t;
                }
                r->choice_routed[(long)best * E + e] = 1;
            }
        }
    }
    memcpy(r->choice_kept, r->choice_routed, (size_t)s->N * E);
}

static void select_soft(Routing *r, const RouterShape *s) {
    for (long a = 0; a < (long)s->N * s->E; a++) {
        r->choice_expert[a] = (int)(a % s->E);
        r->choice_gate[a] = r->probs[a];
        r->choice_routed[a] = r->choice_kept[a] = 1;
    }
}

/* ---- capacity -------------------------------------------------------------- */

/* First come, first served: within a group each expert keeps the earliest
 * routed slots, up to its capacity. GShard fills every token's first choice
 * before any second choice; the others go token by token (Megatron). */
static void keep_by_position(Routing *r, const RouterShape *s, int g, int capacity) {
    int S = r->slots, choices_first = s->type == ROUTER_GSHARD_TOP2;
    long first = (long)g * s->G * S;
    memset(r->group_load, 0, sizeof(int) * s->E);
    for (long i = 0; i < (long)s->G * S; i++) {
        long a = choices_first ? first + (i % s->G) * S + i / s->G : first + i;
        if (!r->choice_routed[a]) continue;
        int e = r->choice_expert[a];
        r->choice_kept[a] = r->group_load[e] < capacity;
        r->group_load[e] += r->choice_kept[a];
    }
}

/* On overflow the highest gates stay, ties to the earlier slot. */
static void keep_by_probability(Routing *r, const RouterShape *s, int g, int capacity) {
    int S = r->slots, n = 0;
    for (long a = (long)g * s->G * S; a < (long)(g + 1) * s->G * S; a++)
        if (r->choice_routed[a]) r->order[n++] = (int)a;
    SortContext sc = {r->choice_expert, r->choice_gate};
    qsort_r(r->order, (size_t)n, sizeof(int), by_expert_then_gate, &sc);
    for (int i = 0, rank = 0; i < n; i++) {
        rank = i > 0 && r->choice_expert[r->order[i]] == r->choice_expert[r->order[i - 1]]
                   ? rank + 1
                   : 0;
        r->choice_kept[r->order[i]] = rank < capacity;
    }
}

static void apply_capacity(Routing *r, const RouterShape *s, const RouterContext *ctx) {
    long NS = (long)s->N * r->slots;
    memset(r->choice_kept, 0, (size_t)NS);
    if (ctx->capacity_factor <= 0) {
        r->capacity = 0;
        memcpy(r->choice_kept, r->choice_routed, (size_t)NS);
        return;
    }
    int capacity = router_capacity(ctx->capacity_factor, s->G, s->K, s->E);
    r->capacity = capacity > s->min_capacity ? capacity : s->min_capacity;
    for (int g = 0; g < s->N / s->G; g++) {
        if (s->drop_by_prob)
            keep_by_probability(r, s, g, r->capacity);
        else
            keep_by_position(r, s, g, r->capacity);
    }
}

/* GShard's balancing loss counts each token's first choice only (c_e of
 * its Algorithm 1); the others count every routed assignment. */
static int balanced_slots(const RouterShape *s) {
    return s->type == ROUTER_GSHARD_TOP2 ? 1 : s->K;
}

static int counts_for_balance(const RouterShape *s, int slot) {
    return s->type != ROUTER_GSHARD_TOP2 || slot == 0;
}

/* The record's statistics, per grain and (for callers on one rank) in
 * total. Each grain's sums run over its own tokens in order, so they are the
 * same numbers in every layout. */
static void count_assignments(Routing *r, const RouterShape *s) {
    int E = s->E, width = routing_grain_width(E), grain_tokens = routing_grain_tokens(s);
    memset(r->tokens_per_expert, 0, sizeof(long) * E);
    memset(r->balanced_demand, 0, sizeof(long) * E);
    memset(r->dropped_per_expert, 0, sizeof(long) * E);
    memset(r->grain_stats, 0, sizeof(double) * routing_grains(s) * width);
    for (long a = 0; a < (long)s->N * r->slots; a++) {
        if (!r->choice_routed[a]) continue;
        int e = r->choice_expert[a];
        r->tokens_per_expert[e]++;
        r->balanced_demand[e] += counts_for_balance(s, (int)(a % r->slots));
        r->dropped_per_expert[e] += !r->choice_kept[a];
        r->grain_stats[(a / r->slots / grain_tokens) * width + e] += r->choice_gate[a];
    }
    for (int t = 0; t < s->N; t++) {
        double *g = r->grain_stats + (long)(t / grain_tokens) * width, *scalars = g + 2 * E;
        const float *p = r->probs + (long)t * E, *h = r->h + (long)t * E;
        for (int e = 0; e < E; e++) {
            g[E + e] += p[e];
            double q = exp((double)h[e] - r->lse[t]); /* the softmax, whatever the scores */
            if (q > 0) scalars[GRAIN_ENTROPY] -= q * log(q);
            scalars[GRAIN_ABS_LOGIT] += fabs((double)r->logits[(long)t * E + e]);
        }
        scalars[GRAIN_LSE_SQ] += (double)r->lse[t] * r->lse[t];
    }
    memset(r->gate_sum, 0, sizeof(double) * E);
    memset(r->prob_sum, 0, sizeof(double) * E);
    r->entropy_sum = r->abs_logit_sum = r->lse_sq_sum = 0.0;
    for (int gi = 0; gi < routing_grains(s); gi++) {
        const double *g = r->grain_stats + (long)gi * width, *scalars = g + 2 * E;
        for (int e = 0; e < E; e++) {
            r->gate_sum[e] += g[e];
            r->prob_sum[e] += g[E + e];
        }
        r->entropy_sum += scalars[GRAIN_ENTROPY];
        r->abs_logit_sum += scalars[GRAIN_ABS_LOGIT];
        r->lse_sq_sum += scalars[GRAIN_LSE_SQ];
    }
}

void router_route(Routing *r, const float *x, const RouterWeights *w, const RouterShape *s,
                  const RouterContext *ctx) {
    int N = s->N, E = s->E;
    const float *x_in = ctx->training && s->jitter_eps > 0 ? jitter_input(r, x, s, ctx) : x;
    matmul_forward(r->logits, x_in, w->router_w, N, s->C, E, ctx->matmul);
    memcpy(r->h, r->logits, sizeof(float) * (size_t)N * E);
    if (s->type == ROUTER_NOISY_TOPK) add_gating_noise(r, x_in, w, s, ctx);
    compute_scores(r, x_in, w, s, ctx);
    if (s->type == ROUTER_EXPERT_CHOICE) {
        r->capacity = router_capacity(ctx->capacity_factor, s->G, s->K, E);
        select_expert_choice(r, s, r->capacity);
    } else if (s->type == ROUTER_SOFT) {
        r->capacity = 0;
        select_soft(r, s);
    } else {
        fill_selection_scores(r, s, ctx);
        if (s->num_groups > 0) limit_to_best_groups(r, s);
        select_top_k_slots(r, s, ctx);
        apply_capacity(r, s, ctx);
    }
    count_assignments(r, s);
}

/* ---- losses ------------------------------------------------------------------ */

/* Squared coefficient of variation of v[E] (population variance). */
static double cv_squared(const double *v, int E) {
    double mean = 0.0, var = 0.0;
    for (int e = 0; e < E; e++) mean += v[e] / E;
    for (int e = 0; e < E; e++) var += (v[e] - mean) * (v[e] - mean) / E;
    return mean > 0 ? var / (mean * mean) : 0.0;
}

/* d CV^2 / d v_e */
static double cv_squared_grad(const double *v, int E, int e) {
    double mean = 0.0, var = 0.0;
    for (int f = 0; f < E; f++) mean += v[f] / E;
    for (int f = 0; f < E; f++) var += (v[f] - mean) * (v[f] - mean) / E;
    if (mean <= 0) return 0.0;
    return 2.0 / (E * mean * mean) * (v[e] - mean - var / mean);
}

/* What the balancing loss averages into P_e for token t: the probability,
 * or with sigmoid scores the scores normalised to sum to 1 (DeepSeek-V3's
 * s'_{i,t} = s_{i,t} / sum_j s_{j,t}; Megatron-Core does the same). Returns
 * the factor that turns the token's scores into those. */
static double balance_normaliser(const Routing *r, const RouterShape *s, int t) {
    if (!s->sigmoid_scores) return 1.0;
    double sum = 0.0;
    for (int e = 0; e < s->E; e++) sum += r->probs[(long)t * s->E + e];
    return 1.0 / sum;
}

/* Switch: coeff * E * sum_e f_e * P_e per balancing unit (group or sequence),
 * averaged over units; or with f from the global batch's counts. */
static double load_balancing_loss(Routing *r, const RouterShape *s,
                                  const long *global_tokens_per_expert, long global_tokens) {
    int E = s->E, K = balanced_slots(s), units = balancing_units(s), width = routing_grain_width(E);
    int unit_tokens = s->N / units, grain_tokens = routing_grain_tokens(s);
    memset(r->unit_fraction, 0, sizeof(float) * units * E);
    memset(r->unit_prob, 0, sizeof(double) * units * E);
    for (int t = 0; t < s->N; t++) {
        int u = t / unit_tokens;
        double norm = balance_normaliser(r, s, t);
        for (int e = 0; e < E; e++)
            r->unit_prob[(long)u * E + e] += norm * r->probs[(long)t * E + e];
        for (int k = 0; k < r->slots; k++) {
            long a = (long)t * r->slots + k;
            if (r->choice_routed[a] && counts_for_balance(s, k))
                r->unit_fraction[(long)u * E + r->choice_expert[a]] += 1.0f;
        }
    }
    if (s->balancing == BALANCE_GLOBAL_AUX_LOSS)
        for (int e = 0; e < E; e++) r->unit_fraction[e] = (float)global_tokens_per_expert[e];
    double denominator = s->balancing == BALANCE_GLOBAL_AUX_LOSS ? (double)global_tokens * K
                                                                 : (double)unit_tokens * K;
    for (long i = 0; i < (long)units * E; i++) r->unit_fraction[i] /= (float)denominator;
    /* Per grain, f times the grain's own score sums: a unit never spans two
     * grains, and global_aux_loss's one unit contributes token by token. */
    for (int t = 0; t < s->N; t++) {
        const float *f = r->unit_fraction + (long)(t / unit_tokens) * E;
        double term = 0.0, norm = balance_normaliser(r, s, t);
        for (int e = 0; e < E; e++) term += f[e] * norm * (double)r->probs[(long)t * E + e];
        r->grain_stats[(long)(t / grain_tokens) * width + 2 * E + GRAIN_AUX] += term;
    }
    double total = 0.0;
    for (long i = 0; i < (long)units * E; i++) {
        r->unit_prob[i] /= unit_tokens;
        total += r->unit_fraction[i] * r->unit_prob[i];
    }
    return s->aux_loss_coeff * E * total / units;
}

/* The scalars of the grain holding routing group g. */
static double *grain_scalars(Routing *r, const RouterShape *s, int g) {
    long grain = (long)g * s->G / routing_grain_tokens(s);
    return r->grain_stats + grain * routing_grain_width(s->E) + 2 * s->E;
}

static double importance_loss(Routing *r, const RouterShape *s) {
    int E = s->E, G = s->G, groups = s->N / G;
    memset(r->importance, 0, sizeof(double) * groups * E);
    for (long a = 0; a < (long)s->N * r->slots; a++)
        if (r->choice_routed[a])
            r->importance[(a / r->slots / G) * E + r->choice_expert[a]] += r->choice_gate[a];
    double total = 0.0;
    for (int g = 0; g < groups; g++) {
        double cv2 = cv_squared(r->importance + (long)g * E, E);
        grain_scalars(r, s, g)[GRAIN_IMPORTANCE] += cv2;
        total += cv2;
    }
    return s->importance_loss_coeff * total / groups;
}

/* Shazeer's smooth load of one token over n experts (logits clean, noisy h,
 * noise std), k of them chosen (chosen[] - first are their indices among
 * the n): P(picks e) = Phi((logit - threshold) / std), the threshold being
 * the k-th largest noisy logit among the other experts; added to load[n].
 * Keeps z and the threshold's index for the backward. order: k+1 ints. */
static void smooth_load_row(double *load, float *load_z, int *load_threshold, const float *logits,
                            const float *h, const float *std, int n, const int *chosen, int k,
                            int first, int *order) {
    select_top_k(order, h, n, k + 1);
    for (int e = 0; e < n; e++) {
        int selected = 0;
        for (int c = 0; c < k; c++) selected |= chosen[c] - first == e;
        int threshold = selected ? order[k] : order[k - 1];
        float z = (logits[e] - h[threshold]) / std[e];
        load_z[e] = z;
        load_threshold[e] = threshold;
        load[e] += 0.5 * erfc(-z / sqrt(2.0));
    }
}

/* Shazeer's smooth load: P(token t picks e) = Phi((logit - threshold) / std),
 * the threshold being the k-th largest noisy logit among the other experts. */
static double load_loss(Routing *r, const RouterShape *s) {
    int E = s->E, K = s->K, G = s->G, groups = s->N / G;
    memset(r->load, 0, sizeof(double) * groups * E);
    if (K >= E) return 0.0;
    for (int t = 0; t < s->N; t++) {
        long row = (long)t * E;
        smooth_load_row(r->load + (long)(t / G) * E, r->load_z + row, r->load_threshold + row,
                        r->logits + row, r->h + row, r->noise_std + row, E,
                        r->choice_expert + (long)t * K, K, 0, r->order);
    }
    double total = 0.0;
    for (int g = 0; g < groups; g++) {
        double cv2 = cv_squared(r->load + (long)g * E, E);
        grain_scalars(r, s, g)[GRAIN_LOAD] += cv2;
        total += cv2;
    }
    return s->load_loss_coeff * total / groups;
}

/* The smooth load of one token over n experts of which it takes all n:
 * each for sure, with no gradient (threshold -1). */
static void certain_load_row(double *load, int *load_threshold, int n) {
    for (int e = 0; e < n; e++) {
        load[e] += 1.0;
        load_threshold[e] = -1;
    }
}

/* Shazeer 2017, appendix B: Load_H(X)_(i,j) = Load_primary(X)_i *
 * Load_i(X^(i))_j / |X^(i)|, X^(i) the group's tokens that picked group i,
 * both loads the smooth estimator of each level's noisy top-k, and 0 where
 * no token picked group i. CV^2 over all E per routing group. */
static double hierarchical_load_loss(Routing *r, const RouterShape *s) {
    int E = s->E, K = s->K, G = s->G, groups = s->N / G, hg = s->hier_groups;
    int per_group = E / hg, M = s->hier_group_topk, within = K / M;
    memset(r->load_primary, 0, sizeof(double) * groups * hg);
    memset(r->group_tokens, 0, sizeof(double) * groups * hg);
    memset(r->load_within, 0, sizeof(double) * groups * E);
    int *picked = r->group_rank + hg; /* group_rank holds 2E >= 2 hg ints */
    for (int t = 0; t < s->N; t++) {
        long g = t / G, row = (long)t * E, grow = (long)t * hg;
        const int *chosen = r->choice_expert + (long)t * K;
        for (int m = 0; m < M; m++) picked[m] = chosen[m * within] / per_group;
        if (M < hg)
            smooth_load_row(r->load_primary + g * hg, r->group_load_z + grow,
                            r->group_load_threshold + grow, r->group_logits + grow,
                            r->group_h + grow, r->group_noise_std + grow, hg, picked, M, 0,
                            r->order);
        else
            certain_load_row(r->load_primary + g * hg, r->group_load_threshold + grow, hg);
        for (int e = 0; e < E; e++) r->load_threshold[row + e] = -1;
        for (int m = 0; m < M; m++) {
            int first = picked[m] * per_group;
            long at = row + first;
            r->group_tokens[g * hg + picked[m]] += 1.0;
            if (within < per_group) {
                smooth_load_row(r->load_within + g * E + first, r->load_z + at,
                                r->load_threshold + at, r->logits + at, r->h + at,
                                r->noise_std + at, per_group, chosen + m * within, within, first,
                                r->order);
                for (int j = 0; j < per_group; j++) r->load_threshold[at + j] += first;
            } else {
                certain_load_row(r->load_within + g * E + first, r->load_threshold + at,
                                 per_group);
            }
        }
    }
    double total = 0.0;
    for (int g = 0; g < groups; g++) {
        for (int e = 0; e < E; e++) {
            long i = (long)g * hg + e / per_group;
            r->load[(long)g * E + e] = r->group_tokens[i] > 0 ? r->load_primary[i] *
                                                                     r->load_within[(long)g * E + e] /
                                                                     r->group_tokens[i]
                                                               : 0.0;
        }
        double cv2 = cv_squared(r->load + (long)g * E, E);
        grain_scalars(r, s, g)[GRAIN_LOAD] += cv2;
        total += cv2;
    }
    return s->load_loss_coeff * total / groups;
}

static double z_loss(const Routing *r, const RouterShape *s) {
    double sum_sq = 0.0;
    for (int t = 0; t < s->N; t++) sum_sq += (double)r->lse[t] * r->lse[t];
    return s->z_loss_coeff * sum_sq / s->N;
}

void router_losses(Routing *r, const RouterShape *s, const RouterContext *ctx,
                   const long *global_tokens_per_expert, long global_tokens) {
    int width = routing_grain_width(s->E);
    for (int g = 0; g < routing_grains(s); g++) {
        double *scalars = r->grain_stats + (long)g * width + 2 * s->E;
        scalars[GRAIN_AUX] = scalars[GRAIN_IMPORTANCE] = scalars[GRAIN_LOAD] = 0.0;
    }
    r->aux_loss = s->balancing == BALANCE_NONE
                      ? 0.0
                      : load_balancing_loss(r, s, global_tokens_per_expert, global_tokens);
    r->z_loss = z_loss(r, s);
    r->importance_loss = s->importance_loss_coeff > 0 ? importance_loss(r, s) : 0.0;
    int load_on = s->load_loss_coeff > 0 && s->type == ROUTER_NOISY_TOPK && ctx->training;
    r->load_loss = !load_on              ? 0.0
                   : s->hier_groups > 0 ? hierarchical_load_loss(r, s)
                                        : load_loss(r, s);
}

void routing_global_losses(const RouterShape *s, const double *summed, double losses[4]) {
    const double *scalars = summed + 2 * s->E;
    double tokens = (double)s->N * world_of(s), groups = (double)(s->N / s->G) * world_of(s);
    losses[0] =
        s->balancing == BALANCE_NONE ? 0.0 : s->aux_loss_coeff * s->E * scalars[GRAIN_AUX] / tokens;
    losses[1] = s->z_loss_coeff * scalars[GRAIN_LSE_SQ] / tokens;
    losses[2] = s->importance_loss_coeff * scalars[GRAIN_IMPORTANCE] / groups;
    losses[3] = s->load_loss_coeff * scalars[GRAIN_LOAD] / groups;
}

void router_forward(Routing *r, const float *x, const RouterWeights *w, const RouterShape *s,
                    const RouterContext *ctx) {
    router_route(r, x, w, s, ctx);
    router_losses(r, s, ctx, r->balanced_demand, s->N);
}

/* ---- backward ------------------------------------------------------------------ */

/* d score[e] from the combine gates of token t (slots [S]) and the
 * importance loss. */
static void gate_backward(Routing *r, const RouterShape *s, const float *dgate_row, int t,
                          float *dscore) {
    int S = r->slots, E = s->E, G = s->G, groups = s->N / G;
    const int *expert = r->choice_expert + (long)t * S;
    const float *gate = r->choice_gate + (long)t * S;
    const unsigned char *routed = r->choice_routed + (long)t * S;
    const float *p = r->probs + (long)t * E;
    float *dgate = r->slot_scratch;
    for (int k = 0; k < S; k++) {
        dgate[k] = dgate_row[k];
        if (s->importance_loss_coeff > 0 && routed[k])
            dgate[k] += (float)(s->importance_loss_coeff / (groups * world_of(s)) *
                                cv_squared_grad(r->importance + (long)(t / G) * E, E, expert[k]));
    }
    if (two_level_gates(s)) return; /* two_level_gates_backward, from slot_scratch */
    int normalised = s->type != ROUTER_EXPERT_CHOICE && s->type != ROUTER_SOFT && renormalises(s);
    if (!normalised) {
        for (int k = 0; k < S; k++) dscore[expert[k]] += dgate[k];
        return;
    }
    float sum = 0.0f, weighted = 0.0f;
    for (int k = 0; k < S; k++) {
        sum += p[expert[k]];
        weighted += dgate[k] * gate[k];
    }
    for (int k = 0; k < S; k++) dscore[expert[k]] += (dgate[k] - weighted) / sum;
}

/* Gradient of the Switch loss w.r.t. the scores of token t. */
static void balancing_backward(const Routing *r, const RouterShape *s, int t, float *dscore) {
    if (s->balancing == BALANCE_NONE || s->aux_loss_coeff == 0) return;
    int E = s->E, units = balancing_units(s), unit_tokens = s->N / units;
    const float *fraction = r->unit_fraction + (long)(t / unit_tokens) * E;
    float scale = (float)(s->aux_loss_coeff * E / ((double)units * unit_tokens * world_of(s)));
    if (!s->sigmoid_scores) {
        for (int e = 0; e < E; e++) dscore[e] += scale * fraction[e];
        return;
    }
    /* through the normalisation q = p / sum(p): d/dp_e = (f_e - f·q) / sum(p) */
    double norm = balance_normaliser(r, s, t), f_dot_q = 0.0;
    for (int e = 0; e < E; e++) f_dot_q += fraction[e] * norm * r->probs[(long)t * E + e];
    for (int e = 0; e < E; e++) dscore[e] += (float)(scale * norm * (fraction[e] - f_dot_q));
}

/* One smooth-load probability Phi(z) of entry i, z = (logit_i -
 * h_threshold) / std_i: its gradient dload into the clean logits, the noise
 * stds (dstd) and the threshold's noisy logit, of one token's row. */
static void smooth_load_backward(double dload, long i, long threshold, const float *load_z,
                                 const float *std, const float *noise, float *dlogits,
                                 float *dstd) {
    float z = load_z[i];
    float dz = (float)(dload * exp(-0.5 * z * z) / sqrt(2.0 * M_PI));
    dlogits[i] += dz / std[i];
    dstd[i] -= dz * z / std[i];
    /* the threshold is a noisy logit: logit + noise * std */
    dlogits[threshold] -= dz / std[i];
    dstd[threshold] -= dz / std[i] * noise[threshold];
}

/* Load loss: gradients into clean logits, noise std and the threshold's
 * noisy logit, for every (token, expert). */
static void load_backward(Routing *r, const RouterShape *s, float *dlogits) {
    int E = s->E, G = s->G, groups = s->N / G;
    for (int t = 0; t < s->N; t++) {
        for (int e = 0; e < E; e++) {
            long i = (long)t * E + e;
            double dload = s->load_loss_coeff / (groups * world_of(s)) *
                           cv_squared_grad(r->load + (long)(t / G) * E, E, e);
            smooth_load_backward(dload, i, (long)t * E + r->load_threshold[i], r->load_z,
                                 r->noise_std, r->noise, dlogits, r->dnoise);
        }
    }
}

/* Through Load_H = load_primary * load_within / group_tokens: the loss's
 * gradient with respect to each factor, per routing group. */
static void hierarchical_load_factor_grads(Routing *r, const RouterShape *s) {
    int E = s->E, groups = s->N / s->G, hg = s->hier_groups, per_group = E / hg;
    double scale = s->load_loss_coeff / (groups * world_of(s));
    memset(r->dload_primary, 0, sizeof(double) * groups * hg);
    for (int g = 0; g < groups; g++) {
        for (int e = 0; e < E; e++) {
            long i = (long)g * hg + e / per_group, ge = (long)g * E + e;
            double n = r->group_tokens[i];
            double dLH = n > 0 ? scale * cv_squared_grad(r->load + (long)g * E, E, e) / n : 0.0;
            r->dload_primary[i] += dLH * r->load_within[ge];
            r->dload_within[ge] = dLH * r->load_primary[i];
        }
    }
}

/* Hierarchical load loss: into both levels' clean logits, noise stds and
 * thresholds, through each level's smooth load. dgroup: d clean primary
 * logits. */
static void hierarchical_load_backward(Routing *r, const RouterShape *s, float *dlogits) {
    int E = s->E, G = s->G, hg = s->hier_groups;
    hierarchical_load_factor_grads(r, s);
    for (int t = 0; t < s->N; t++) {
        long g = t / G, row = (long)t * E, grow = (long)t * hg;
        for (int i = 0; i < hg; i++)
            if (r->group_load_threshold[grow + i] >= 0)
                smooth_load_backward(r->dload_primary[g * hg + i], grow + i,
                                     grow + r->group_load_threshold[grow + i], r->group_load_z,
                                     r->group_noise_std, r->group_noise, r->dgroup,
                                     r->dgroup_noise);
        for (int e = 0; e < E; e++)
            if (r->load_threshold[row + e] >= 0)
                smooth_load_backward(r->dload_within[g * E + e], row + e,
                                     row + r->load_threshold[row + e], r->load_z, r->noise_std,
                                     r->noise, dlogits, r->dnoise);
    }
}

/* d G_primary(x)_i of the kept group of token t's m-th kept group, from the
 * gates' gradients dgate [K]: sum over its experts of dgate * G_i(x)_j. */
static double primary_gate_grad(const Routing *r, const RouterShape *s, int t, const float *dgate,
                                int m) {
    int within = s->K / s->hier_group_topk;
    const int *e = r->choice_expert + (long)t * s->K + m * within;
    const float *p = r->probs + (long)t * s->E;
    float kept = 0.0f;
    for (int k = 0; k < within; k++) kept += p[e[k]];
    double dG = 0.0;
    for (int k = 0; k < within; k++) dG += (double)dgate[m * within + k] * (p[e[k]] / kept);
    return dG;
}

/* The two-level gates' gradients (dgate [K], gate_backward's, importance
 * loss included): each softmax over kept logits back onto those logits,
 * added to token t's d noisy logits dh [E] and d noisy primary logits. */
static void two_level_gates_backward(Routing *r, const RouterShape *s, int t, const float *dgate,
                                     float *dh) {
    int M = s->hier_group_topk, per_group = s->E / s->hier_groups, within = s->K / M;
    const int *chosen = r->choice_expert + (long)t * s->K;
    const float *P = r->group_probs + (long)t * s->hier_groups, *p = r->probs + (long)t * s->E;
    float *dgroup = r->dgroup + (long)t * s->hier_groups;
    float kept_primary = 0.0f;
    for (int m = 0; m < M; m++) kept_primary += P[chosen[m * within] / per_group];
    double primary_dot = 0.0;
    for (int m = 0; m < M; m++) {
        const int *e = chosen + m * within;
        double primary = P[e[0] / per_group] / kept_primary;
        primary_dot += primary * primary_gate_grad(r, s, t, dgate, m);
        float kept = 0.0f;
        for (int k = 0; k < within; k++) kept += p[e[k]];
        double within_dot = 0.0;
        for (int k = 0; k < within; k++)
            within_dot += (double)(p[e[k]] / kept) * dgate[m * within + k] * primary;
        for (int k = 0; k < within; k++)
            dh[e[k]] += (float)((p[e[k]] / kept) * (dgate[m * within + k] * primary - within_dot));
    }
    for (int m = 0; m < M; m++) {
        int i = chosen[m * within] / per_group;
        double primary = P[i] / kept_primary;
        dgroup[i] += (float)(primary * (primary_gate_grad(r, s, t, dgate, m) - primary_dot));
    }
}

/* Through p_(i,j) = P_i * q_j: dq_j = dp_j * P_i and dP_i = sum_j dp_j * q_j,
 * then each through its softmax. Fills the token's d logits [E] and
 * d primary logits [hier_groups]. */
static void hierarchical_backward(Routing *r, const RouterShape *s, int t, const float *dp,
                                  float *dh) {
    int groups = s->hier_groups, per_group = s->E / groups;
    const float *P = r->group_probs + (long)t * groups, *p = r->probs + (long)t * s->E;
    float *dgroup = r->dgroup + (long)t * groups;
    double dP_dot = 0.0;
    for (int i = 0; i < groups; i++) {
        const float *pi = p + i * per_group, *dpi = dp + i * per_group;
        double dP = 0.0, dq_dot = 0.0;
        /* q_j = p_j / P_i; dq_j = dp_j * P_i, so q_j * dq_j = p_j * dp_j */
        for (int j = 0; j < per_group; j++) dq_dot += (double)pi[j] * dpi[j];
        dP = P[i] > 0 ? dq_dot / P[i] : 0.0;
        for (int j = 0; j < per_group; j++)
            dh[i * per_group + j] = (float)((double)pi[j] * (dpi[j] - dP));
        dgroup[i] = (float)dP;
        dP_dot += (double)P[i] * dP;
    }
    for (int i = 0; i < groups; i++) dgroup[i] = (float)(P[i] * (dgroup[i] - dP_dot));
}

void router_backward(float *dx, const RouterGrads *g, const float *dgate, const float *x,
                     const RouterWeights *w, Routing *r, const RouterShape *s,
                     const RouterContext *ctx) {
    int N = s->N, E = s->E, C = s->C;
    float z_scale = (float)(2.0 * s->z_loss_coeff / (N * world_of(s)));
    float *dscore = r->dprobs, *dh = r->dh;
    memset(dscore, 0, sizeof(float) * (size_t)N * E);
    for (int t = 0; t < N; t++) {
        float *ds = dscore + (long)t * E, *dht = dh + (long)t * E;
        const float *p = r->probs + (long)t * E, *h = r->h + (long)t * E;
        gate_backward(r, s, dgate + (long)t * r->slots, t, ds);
        balancing_backward(r, s, t, ds);
        if (s->hier_groups > 0) {
            hierarchical_backward(r, s, t, ds, dht);
            if (two_level_gates(s)) two_level_gates_backward(r, s, t, r->slot_scratch, dht);
        } else if (s->sigmoid_scores) {
            for (int e = 0; e < E; e++) dht[e] = ds[e] * p[e] * (1.0f - p[e]);
        } else {
            double dot = 0.0;
            for (int e = 0; e < E; e++) dot += (double)p[e] * ds[e];
            for (int e = 0; e < E; e++) dht[e] = p[e] * (ds[e] - (float)dot);
        }
        for (int e = 0; e < E; e++) dht[e] += z_scale * r->lse[t] * expf(h[e] - r->lse[t]);
    }
    /* h = logits (+ noise * std): dh flows to the clean logits unchanged. */
    float *dlogits = dh;
    int noisy = s->type == ROUTER_NOISY_TOPK;
    int noisy_groups = noisy && s->hier_groups > 0;
    long NG = (long)N * s->hier_groups;
    if (noisy) {
        for (long i = 0; i < (long)N * E; i++) r->dnoise[i] = dh[i] * r->noise[i];
        if (noisy_groups)
            for (long i = 0; i < NG; i++) r->dgroup_noise[i] = r->dgroup[i] * r->group_noise[i];
        if (s->load_loss_coeff > 0 && ctx->training) {
            if (noisy_groups)
                hierarchical_load_backward(r, s, dlogits);
            else
                load_backward(r, s, dlogits);
        }
        for (long i = 0; i < (long)N * E; i++) r->dnoise[i] *= sigmoid(r->noise_pre[i]);
        if (noisy_groups)
            for (long i = 0; i < NG; i++) r->dgroup_noise[i] *= sigmoid(r->group_noise_pre[i]);
    }
    const float *x_in = ctx->training && s->jitter_eps > 0 ? r->x_in : x;
    float *dx_in = ctx->training && s->jitter_eps > 0 ? r->dx_in : dx;
    float beta = dx_in == dx ? 1.0f : 0.0f;
    const Matmul *mm = ctx->matmul;
    matmul_backward_into(dx_in, beta, g->router_w, dlogits, x_in, w->router_w, N, C, E, mm);
    if (noisy)
        matmul_backward_into(dx_in, 1.0f, g->noise_w, r->dnoise, x_in, w->noise_w, N, C, E, mm);
    if (s->hier_groups > 0)
        matmul_backward_into(dx_in, 1.0f, g->group_w, r->dgroup, x_in, w->group_w, N, C,
                             s->hier_groups, mm);
    if (noisy_groups)
        matmul_backward_into(dx_in, 1.0f, g->group_noise_w, r->dgroup_noise, x_in,
                             w->group_noise_w, N, C, s->hier_groups, mm);
    if (dx_in != dx)
        for (long i = 0; i < (long)N * C; i++) dx[i] += dx_in[i] * r->jitter[i];
}

void router_update_expert_bias(float *bias, const long *tokens_per_expert, int E, double rate) {
    double mean = 0.0;
    for (int e = 0; e < E; e++) mean += (double)tokens_per_expert[e] / E;
    for (int e = 0; e < E; e++) {
        double error = mean - (double)tokens_per_expert[e];
        bias[e] += (float)(rate * (error > 0 ? 1.0 : error < 0 ? -1.0 : 0.0));
    }
}
