#include "moesim/router.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/ops.h"

int router_capacity(double capacity_factor, int G, int K, int E) {
    /* The tolerance keeps exact products (1.1 * 100 * 1 / 10 = 11) from
     * rounding up to the next integer through binary representation error. */
    double exact = capacity_factor * G * K / E;
    int capacity = (int)ceil(exact - 1e-9 * exact);
    return capacity < 1 ? 1 : capacity;
}

int routing_init(Routing *r, const RouterShape *s) {
    memset(r, 0, sizeof *r);
    long NE = (long)s->N * s->E, NK = (long)s->N * s->K;
    r->logits = malloc(sizeof(float) * NE);
    r->probs = malloc(sizeof(float) * NE);
    r->dprobs = malloc(sizeof(float) * NE);
    r->lse = malloc(sizeof(float) * s->N);
    r->choice_expert = malloc(sizeof(int) * NK);
    r->choice_gate = malloc(sizeof(float) * NK);
    r->choice_kept = malloc(NK);
    r->group_fraction = malloc(sizeof(float) * (s->N / s->G) * s->E);
    r->tokens_per_expert = malloc(sizeof(long) * s->E);
    r->dropped_per_expert = malloc(sizeof(long) * s->E);
    r->group_load = malloc(sizeof(int) * s->E);
    r->gate_sum = malloc(sizeof(double) * s->E);
    r->prob_sum = malloc(sizeof(double) * s->E);
    if (!r->logits || !r->probs || !r->dprobs || !r->lse || !r->choice_expert || !r->choice_gate ||
        !r->choice_kept || !r->group_fraction || !r->tokens_per_expert || !r->dropped_per_expert ||
        !r->group_load || !r->gate_sum || !r->prob_sum) {
        routing_free(r);
        return -1;
    }
    return 0;
}

size_t routing_bytes(const RouterShape *s) {
    size_t NE = (size_t)s->N * s->E, NK = (size_t)s->N * s->K;
    return sizeof(float) * (3 * NE + s->N + NK + (size_t)(s->N / s->G) * s->E) +
           sizeof(int) * (NK + s->E) + NK + 2 * sizeof(long) * s->E + 2 * sizeof(double) * s->E;
}

void routing_free(Routing *r) {
    free(r->logits);
    free(r->probs);
    free(r->dprobs);
    free(r->lse);
    free(r->choice_expert);
    free(r->choice_gate);
    free(r->choice_kept);
    free(r->group_fraction);
    free(r->tokens_per_expert);
    free(r->dropped_per_expert);
    free(r->group_load);
    free(r->gate_sum);
    free(r->prob_sum);
    memset(r, 0, sizeof *r);
}

/* The K largest of probs[E], best first; ties go to the lower expert index so
 * routing never depends on anything but the scores. */
static void select_top_k(int *chosen, const float *probs, int E, int K) {
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= chosen[j] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        chosen[k] = best;
    }
}

static void compute_gates(float *gate, const int *chosen, const float *probs, int K,
                          int norm_topk_prob) {
    float sum = 0.0f;
    for (int k = 0; k < K; k++) sum += probs[chosen[k]];
    for (int k = 0; k < K; k++)
        gate[k] = norm_topk_prob ? probs[chosen[k]] / sum : probs[chosen[k]];
}

/* First come, first served: within a group each expert keeps the earliest
 * tokens that chose it, up to its capacity. */
static void apply_capacity(Routing *r, const RouterShape *s) {
    int E = s->E, K = s->K, G = s->G;
    int *load = r->group_load;
    for (int g = 0; g < s->N / G; g++) {
        memset(load, 0, sizeof(int) * E);
        float *fraction = r->group_fraction + (long)g * E;
        memset(fraction, 0, sizeof(float) * E);
        for (int t = g * G; t < (g + 1) * G; t++) {
            for (int k = 0; k < K; k++) {
                int e = r->choice_expert[t * K + k];
                int kept = load[e] < r->capacity;
                load[e] += kept;
                r->choice_kept[t * K + k] = (unsigned char)kept;
                r->tokens_per_expert[e]++;
                r->dropped_per_expert[e] += !kept;
                fraction[e] += 1.0f;
            }
        }
        for (int e = 0; e < E; e++) fraction[e] /= (float)G * K;
    }
}

/* Switch: coeff * E * sum_e f_e * P_e per group, averaged over groups, where
 * f_e is the share of assignments and P_e the mean router probability. */
static double load_balancing_loss(const Routing *r, const RouterShape *s) {
    int E = s->E, G = s->G, groups = s->N / s->G;
    double total = 0.0;
    for (int g = 0; g < groups; g++) {
        for (int e = 0; e < E; e++) {
            double mean_prob = 0.0;
            for (int t = g * G; t < (g + 1) * G; t++) mean_prob += r->probs[(long)t * E + e];
            total += r->group_fraction[(long)g * E + e] * mean_prob / G;
        }
    }
    return s->aux_loss_coeff * E * total / groups;
}

static double z_loss(const Routing *r, const RouterShape *s) {
    double sum_sq = 0.0;
    for (int t = 0; t < s->N; t++) sum_sq += (double)r->lse[t] * r->lse[t];
    return s->z_loss_coeff * sum_sq / s->N;
}

static void accumulate_statistics(Routing *r, const RouterShape *s) {
    int E = s->E, K = s->K;
    memset(r->gate_sum, 0, sizeof(double) * E);
    memset(r->prob_sum, 0, sizeof(double) * E);
    r->entropy_sum = 0.0;
    for (int t = 0; t < s->N; t++) {
        const float *p = r->probs + (long)t * E;
        for (int e = 0; e < E; e++) {
            r->prob_sum[e] += p[e];
            if (p[e] > 0.0f) r->entropy_sum -= (double)p[e] * log((double)p[e]);
        }
        for (int k = 0; k < K; k++)
            r->gate_sum[r->choice_expert[(long)t * K + k]] += r->choice_gate[(long)t * K + k];
    }
}

void router_forward(Routing *r, const float *x, const float *w, const RouterShape *s) {
    int N = s->N, E = s->E, K = s->K;
    matmul_forward(r->logits, x, w, N, s->C, E);
    memcpy(r->probs, r->logits, sizeof(float) * (size_t)N * E);
    for (int t = 0; t < N; t++) {
        float *p = r->probs + (long)t * E;
        r->lse[t] = softmax_row(p, E);
        select_top_k(r->choice_expert + (long)t * K, p, E, K);
        compute_gates(r->choice_gate + (long)t * K, r->choice_expert + (long)t * K, p, K,
                      s->norm_topk_prob);
    }
    r->capacity = router_capacity(s->capacity_factor, s->G, K, E);
    memset(r->tokens_per_expert, 0, sizeof(long) * E);
    memset(r->dropped_per_expert, 0, sizeof(long) * E);
    apply_capacity(r, s);
    r->aux_loss = load_balancing_loss(r, s);
    r->z_loss = z_loss(r, s);
    accumulate_statistics(r, s);
}

/* dprobs[t] from the combine weights of token t. */
static void gate_backward(float *dprobs, const float *dgate, const int *chosen, const float *gate,
                          const float *probs, int K, int norm_topk_prob) {
    if (!norm_topk_prob) {
        for (int k = 0; k < K; k++) dprobs[chosen[k]] += dgate[k];
        return;
    }
    float sum = 0.0f, weighted = 0.0f;
    for (int k = 0; k < K; k++) {
        sum += probs[chosen[k]];
        weighted += dgate[k] * gate[k];
    }
    for (int k = 0; k < K; k++) dprobs[chosen[k]] += (dgate[k] - weighted) / sum;
}

void router_backward(float *dx, float *dw, const float *dgate, const float *x, const float *w,
                     Routing *r, const RouterShape *s) {
    int N = s->N, E = s->E, K = s->K, G = s->G, groups = N / G;
    float *d = r->dprobs; /* dprobs, then in place dlogits */
    float aux_scale = (float)(s->aux_loss_coeff * E / ((double)groups * G));
    float z_scale = (float)(2.0 * s->z_loss_coeff / N);
    for (int t = 0; t < N; t++) {
        float *dp = d + (long)t * E;
        const float *p = r->probs + (long)t * E;
        const float *fraction = r->group_fraction + (long)(t / G) * E;
        for (int e = 0; e < E; e++) dp[e] = aux_scale * fraction[e];
        gate_backward(dp, dgate + (long)t * K, r->choice_expert + (long)t * K,
                      r->choice_gate + (long)t * K, p, K, s->norm_topk_prob);
        double dot = 0.0;
        for (int e = 0; e < E; e++) dot += (double)p[e] * dp[e];
        for (int e = 0; e < E; e++)
            dp[e] = p[e] * (dp[e] - (float)dot) + z_scale * r->lse[t] * p[e];
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, E, s->C, N, 1.0f, d, E, x, s->C, 1.0f, dw,
                s->C);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, s->C, E, 1.0f, d, E, w, s->C, 1.0f,
                dx, s->C);
}
