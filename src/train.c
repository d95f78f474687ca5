#include "moesim/train.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/checkpoint.h"
#include "moesim/platform.h"
#include "moesim/preempt.h"
#include "moesim/record.h"

/* Per-layer sums of RoutingStats reduced in one block: entropy, aux, z,
 * importance and load losses, |logit| and logsumexp^2. */
enum { ROUTING_LAYER_SUMS = 7 };

static int routing_stats_init(RoutingStats *r, int layers, int experts, int categories) {
    size_t L = (size_t)(layers ? layers : 1), LE = L * experts;
    memset(r, 0, sizeof *r);
    r->num_counts = (long)(2 * LE + L + 1);
    r->counts = calloc((size_t)r->num_counts, sizeof(long));
    r->sums = calloc(2 * LE + ROUTING_LAYER_SUMS * L, sizeof(double));
    r->expert_bias = calloc(LE, sizeof(double));
    r->specialization = calloc(LE * categories, sizeof(long));
    if (!r->counts || !r->sums || !r->expert_bias || !r->specialization) return -1;
    r->tokens_per_expert = r->counts;
    r->dropped_per_expert = r->tokens_per_expert + LE;
    r->shadowed_rows = r->dropped_per_expert + LE;
    r->expert_rows = r->shadowed_rows + L;
    r->importance = r->sums;
    r->mean_prob = r->importance + LE;
    r->entropy = r->mean_prob + LE;
    r->aux_loss = r->entropy + L;
    r->z_loss = r->aux_loss + L;
    r->importance_loss = r->z_loss + L;
    r->load_loss = r->importance_loss + L;
    r->mean_abs_logit = r->load_loss + L;
    r->logsumexp_sq = r->mean_abs_logit + L;
    return 0;
}

static void routing_stats_free(RoutingStats *r) {
    free(r->counts);
    free(r->sums);
    free(r->expert_bias);
    free(r->specialization);
    memset(r, 0, sizeof *r);
}

/* Before any big allocation, the ranks on each node must fit in the memory
 * it has, or the kernel kills the run minutes later without a word. Every
 * rank checks its node and all learn the first refusal before any of them
 * allocates, so no rank sees another's allocation as used memory. Collective. */
static int check_memory_fits(const ModelShape *shape, const Comm *comm, char *err, size_t errlen) {
    int ranks_on_node = 1, node_rank = 0;
    comm_node_ranks(comm, &ranks_on_node, &node_rank);
    double per_rank = (double)model_planned_bytes(shape);
    double available = (double)platform_available_memory();
    double needed = per_rank * ranks_on_node;
    int fits = available <= 0 || needed <= available; /* unknown: let it try */
    if (!fits)
        snprintf(err, errlen,
                 "this run needs %.2f GB per rank (parameters, gradients, Adam state, "
                 "activations and exchange buffers) x %d rank(s) on this node = %.2f GB, but the "
                 "node has %.2f GB available; lower --micro-batch-size, spread the experts over "
                 "more ranks (--expert-model-parallel-size), run fewer ranks per node, or make "
                 "the model smaller",
                 per_rank / 1e9, ranks_on_node, needed / 1e9, available / 1e9);
    int failed_rank = comm_first_failed_rank(comm, fits);
    if (failed_rank < 0) return 0;
    comm_share_error(comm, failed_rank, err, errlen);
    return -1;
}

/* --bf16-gemm onednn where oneDNN cannot run natively fails here, on every
 * rank with the first failing rank's message, before anything is built.
 * auto takes oneDNN only when every rank can: ranks on different CPUs would
 * otherwise sum the same products in different orders, and the layout would
 * change the result. */
static int check_bf16_gemm(const Config *cfg, ModelShape *shape, const Comm *comm, char *err,
                           size_t errlen) {
    if (!config_uses_bf16(cfg)) return 0;
    Bf16Gemm *gemm = NULL;
    int ok = bf16_gemm_choose(shape->bf16_gemm, &gemm, err, errlen) == 0, native = gemm != NULL;
    bf16_gemm_free(gemm);
    int failed_rank = comm_first_failed_rank(comm, ok);
    if (failed_rank >= 0) {
        comm_share_error(comm, failed_rank, err, errlen);
        return -1;
    }
    if (!comm_all_ok(comm, native)) shape->bf16_gemm = BF16_GEMM_EMULATED;
    return 0;
}

int trainer_init(Trainer *t, const Config *cfg, const Dataset *ds, const Comm *comm, char *err,
                 size_t errlen) {
    memset(t, 0, sizeof *t);
    t->cfg = cfg;
    t->ds = ds;
    t->comm = comm;
    ModelShape shape;
    model_shape_from_config(&shape, cfg, ds->vocab_size, comm->ep_size, comm->ep_rank);
    shape.world = comm->world_size;
    size_t N = (size_t)shape.B * shape.T;
    long global_grains = (long)model_grains(&shape) * comm->world_size;
    if (global_grains > EXACT_SUM_MAX_PARTIALS) {
        snprintf(err, errlen,
                 "the global batch holds %ld grains of %d tokens (whole routing groups and "
                 "sequences), more than the %ld the exact gradient reduction can combine; "
                 "raise --moe-group-size or lower --micro-batch-size or the rank count",
                 global_grains, shape.grain, EXACT_SUM_MAX_PARTIALS);
        return -1;
    }
    if (check_memory_fits(&shape, comm, err, errlen) != 0) return -1;
    if (check_bf16_gemm(cfg, &shape, comm, err, errlen) != 0) return -1;
    t->moe_layers = config_num_moe_layers(cfg);
    t->inputs = malloc(sizeof(int) * N);
    t->targets = malloc(sizeof(int) * N);
    t->categories = malloc(sizeof(int) * N);
    t->dispatch_bytes = calloc((size_t)comm->world_size, sizeof(long));
    t->exchange_bytes = calloc((size_t)comm->world_size, sizeof(long));
    t->local_groups = (int)(N / (size_t)shape.G);
    t->group_counts = calloc(2 * (size_t)(t->moe_layers ? t->moe_layers : 1) * t->local_groups *
                                 shape.E,
                             sizeof(long));
    int stats_ok = routing_stats_init(&t->routing, t->moe_layers, shape.E, ds->num_categories) == 0;
    int grains = model_grains(&shape);
    t->grain_width = 1 + t->moe_layers * routing_grain_width(shape.E);
    t->grain_rows = calloc((size_t)grains * t->grain_width, sizeof(double));
    t->grain_totals = calloc((size_t)t->grain_width, sizeof(double));
    t->gathered = calloc((size_t)comm->world_size * grains * t->grain_width, sizeof(double));
    int reduce_ok = t->grain_rows && t->grain_totals && t->gathered;
    int model_ok = model_init(&t->model, &shape, cfg->seed, comm) == 0;
    t->nonfinite_flags = model_ok ? calloc((size_t)t->model.num_tensors, 1) : NULL;
    if (!t->inputs || !t->targets || !t->categories || !t->dispatch_bytes || !t->exchange_bytes ||
        !t->group_counts || !stats_ok || !reduce_ok || !model_ok || !t->nonfinite_flags) {
        snprintf(err, errlen,
                 "out of memory building the model (%d layers, hidden %d, %d "
                 "experts, micro-batch %d x %d); make the model or the micro-batch smaller",
                 shape.L, shape.C, shape.E, shape.B, shape.T);
        trainer_free(t);
        return -1;
    }
    /* Frozen tensors still get gradients: backward has to pass through them
     * to reach the layers below (a frozen expert's dx feeds the attention
     * under it), and leaving out only their weight gradients would take a
     * second backward path through every op. AdamW and the clipping norm
     * skip them instead. */
    model_freeze(&t->model, config_freeze_groups(cfg));
    t->opt = (AdamW){.beta1 = cfg->adam_beta1,
                     .beta2 = cfg->adam_beta2,
                     .eps = cfg->adam_eps,
                     .weight_decay = cfg->weight_decay};
    return 0;
}

void trainer_free(Trainer *t) {
    model_free(&t->model);
    free(t->inputs);
    free(t->targets);
    free(t->categories);
    routing_stats_free(&t->routing);
    free(t->dispatch_bytes);
    free(t->exchange_bytes);
    free(t->group_counts);
    free(t->grain_rows);
    free(t->grain_totals);
    free(t->gathered);
    free(t->nonfinite_flags);
    memset(t, 0, sizeof *t);
}

/* The global sums of every grain's statistics row: cross-entropy, then each
 * MoE layer's routing sums, added in global grain order (reduce.h). */
static void sum_grain_statistics(Trainer *t) {
    const Model *m = &t->model;
    int grains = model_grains(&m->shape), E = m->shape.E, width = routing_grain_width(E);
    for (int g = 0; g < grains; g++) {
        double *row = t->grain_rows + (long)g * t->grain_width;
        row[0] = m->grain_ce[g];
        for (int l = 0, i = 0; l < m->shape.L; l++) {
            if (!model_is_moe_layer(&m->shape, l)) continue;
            memcpy(row + 1 + (long)i * width, m->moe[l].routing.grain_stats + (long)g * width,
                   sizeof(double) * width);
            i++;
        }
    }
    ordered_sum_doubles(t->comm, COMM_SCOPE_WORLD, t->grain_rows, grains, t->grain_width,
                        t->gathered, t->grain_totals);
}

/* Kept and dropped assignments per (routing group, expert) of MoE layer i:
 * groups are G consecutive tokens, so a token's group is its index / G. */
static void count_group_assignments(Trainer *t, const Routing *r, int i) {
    int E = t->model.shape.E, N = t->model.shape.B * t->model.shape.T;
    int G = N / t->local_groups;
    long cells = (long)t->local_groups * E;
    long *counts = t->group_counts + i * cells;
    long *drops = t->group_counts + (long)t->moe_layers * cells + i * cells;
    memset(counts, 0, sizeof(long) * cells);
    memset(drops, 0, sizeof(long) * cells);
    for (long a = 0; a < (long)N * r->slots; a++) {
        if (!r->choice_routed[a]) continue;
        long cell = (a / r->slots / G) * E + r->choice_expert[a];
        if (r->choice_kept[a])
            counts[cell]++;
        else
            drops[cell]++;
    }
}

/* Routing statistics and losses of the global batch, and the bytes of token
 * rows this rank dispatched to each rank. */
static void gather_routing_stats(Trainer *t, StepStats *stats) {
    const Model *m = &t->model;
    const Comm *comm = t->comm;
    RoutingStats *rs = &t->routing;
    int E = m->shape.E, L = t->moe_layers, width = routing_grain_width(E), i = 0;
    long *to_my_ep_group =
        t->dispatch_bytes + (long)placement_ep_group(comm->ep_size, comm->rank) * comm->ep_size;
    memset(t->dispatch_bytes, 0, sizeof(long) * comm->world_size);
    sum_grain_statistics(t);
    double tokens = (double)m->shape.B * m->shape.T * comm->world_size;
    stats->ce_loss = t->grain_totals[0] / ((double)model_grains(&m->shape) * comm->world_size);
    stats->aux_loss = stats->z_loss = stats->importance_loss = stats->load_loss = 0.0;
    *rs->expert_rows = 0; /* here, until the sum below */
    for (int l = 0; l < m->shape.L; l++) {
        if (!model_is_moe_layer(&m->shape, l)) continue;
        const Routing *r = &m->moe[l].routing;
        *rs->expert_rows += moe_computed_rows(&m->moe[l]);
        rs->shadowed_rows[i] = m->moe[l].dispatch.num_shadow_rows;
        const double *sums = t->grain_totals + 1 + (long)i * width, *scalars = sums + 2 * E;
        memcpy(rs->tokens_per_expert + (long)i * E, r->tokens_per_expert, sizeof(long) * E);
        memcpy(rs->dropped_per_expert + (long)i * E, r->dropped_per_expert, sizeof(long) * E);
        for (int e = 0; e < E; e++) {
            rs->importance[(long)i * E + e] = sums[e];
            rs->mean_prob[(long)i * E + e] = sums[E + e] / tokens;
            rs->expert_bias[(long)i * E + e] = m->expert_bias[l] ? m->expert_bias[l][e] : 0.0;
        }
        rs->entropy[i] = scalars[GRAIN_ENTROPY] / tokens;
        rs->mean_abs_logit[i] = scalars[GRAIN_ABS_LOGIT] / (tokens * E);
        rs->logsumexp_sq[i] = scalars[GRAIN_LSE_SQ] / tokens;
        double losses[4];
        routing_global_losses(&m->moe_shape.router, sums, losses);
        rs->aux_loss[i] = losses[0];
        rs->z_loss[i] = losses[1];
        rs->importance_loss[i] = losses[2];
        rs->load_loss[i] = losses[3];
        stats->aux_loss += losses[0];
        stats->z_loss += losses[1];
        stats->importance_loss += losses[2];
        stats->load_loss += losses[3];
        dispatch_add_bytes_to_ranks(&m->moe[l].dispatch, m->shape.C, to_my_ep_group);
        count_group_assignments(t, r, i);
        i++;
    }
    stats->loss = stats->ce_loss + stats->aux_loss + stats->z_loss + stats->importance_loss +
                  stats->load_loss;
    comm_sum_longs(comm, rs->counts, (int)rs->num_counts);
    stats->expert_rows = *rs->expert_rows;
    stats->shadowed_rows = 0;
    for (int l = 0; l < L; l++) stats->shadowed_rows += rs->shadowed_rows[l];
    stats->assignments = stats->dropped = 0;
    for (int j = 0; j < L * E; j++) {
        stats->assignments += rs->tokens_per_expert[j];
        stats->dropped += rs->dropped_per_expert[j];
    }
}

/* The global norm of the gradients that train (--freeze leaves the frozen
 * ones out). Dense gradients are identical on every rank; each expert's
 * squares are summed per (expert, layer) and added in global expert order,
 * the order of a 1-rank run. */
static double global_grad_norm(Trainer *t) {
    const Model *m = &t->model;
    const ModelShape *s = &m->shape;
    int E_local = model_local_experts(s), L = t->moe_layers;
    int FW = s->Fe * ffn_w1_rows_per_unit(s->expert_activation);
    double dense = trainable_dense_grad_sum_squares(m);
    /* Frozen experts add nothing (a setting, so every rank returns here). */
    if (m->frozen_groups & FREEZE_EXPERTS) return sqrt(dense);
    double *rows = t->grain_rows, *layer_sums = t->grain_totals; /* free between steps' uses */
    for (int j = 0; j < E_local; j++)
        for (int l = 0, i = 0; l < s->L; l++) {
            if (!model_is_moe_layer(s, l)) continue;
            const LayerWeights *dw = &m->dw.layers[l];
            rows[(long)j * L + i] =
                grad_sum_squares(dw->expert_fc1_w + (long)j * FW * s->C, (size_t)FW * s->C) +
                grad_sum_squares(dw->expert_fc2_w + (long)j * s->C * s->Fe, (size_t)s->C * s->Fe);
            i++;
        }
    double expert = 0.0;
    if (L > 0) {
        ordered_sum_doubles(t->comm, COMM_SCOPE_EP, rows, E_local, L, t->gathered, layer_sums);
        for (int i = 0; i < L; i++) expert += layer_sums[i];
    }
    return sqrt(dense + expert);
}

/* DeepSeek-V3: nudge each selection bias toward balance, by the global
 * batch's demand, identically on every rank. The bias is the router's alone,
 * so --freeze router holds it too. */
static void update_expert_bias(Trainer *t) {
    const Model *m = &t->model;
    if (!m->shape.expert_bias || (m->frozen_groups & FREEZE_ROUTER)) return;
    int E = m->shape.E, i = 0;
    for (int l = 0; l < m->shape.L; l++) {
        if (!model_is_moe_layer(&m->shape, l)) continue;
        router_update_expert_bias(m->expert_bias[l], t->routing.tokens_per_expert + (long)i * E, E,
                                  t->cfg->moe_router_bias_update_rate);
        i++;
    }
}

int trainer_find_nonfinite_gradients(Trainer *t, int *count) {
    const Model *m = &t->model;
    for (int i = 0; i < m->num_tensors; i++) {
        const float *g = m->grads + m->tensors[i].offset;
        size_t n = m->tensors[i].numel, j = 0;
        while (j < n && isfinite(g[j])) j++;
        t->nonfinite_flags[i] = j < n;
    }
    /* Dense gradients agree on every rank already; expert shards do not. */
    comm_max_bytes(t->comm, COMM_SCOPE_WORLD, t->nonfinite_flags, (size_t)m->num_tensors);
    int first = -1;
    *count = 0;
    for (int i = 0; i < m->num_tensors; i++) {
        if (!t->nonfinite_flags[i]) continue;
        if (first < 0) first = i;
        ++*count;
    }
    return first;
}

/* Every rank's verdict on the step: a NaN/Inf cross-entropy on any rank or a
 * non-finite global gradient norm makes it non-finite, so no rank updates
 * while another stops. Collective; the tensor search only runs on a bad step. */
static void check_finite(Trainer *t, double grad_norm, StepStats *stats) {
    const Model *m = &t->model;
    int finite = isfinite(grad_norm);
    for (int g = 0; g < model_grains(&m->shape); g++) finite = finite && isfinite(m->grain_ce[g]);
    stats->nonfinite = !comm_all_ok(t->comm, finite);
    stats->nonfinite_tensor = -1;
    stats->nonfinite_tensors = 0;
    if (stats->nonfinite)
        stats->nonfinite_tensor = trainer_find_nonfinite_gradients(t, &stats->nonfinite_tensors);
}

/* Zeroes what the step's exchanges measure. */
static void reset_comm_measures(Model *m) {
    memset(&m->comm_times, 0, sizeof m->comm_times);
    for (int l = 0; l < m->shape.L; l++)
        if (model_is_moe_layer(&m->shape, l)) dispatch_reset_measures(&m->moe[l].dispatch);
}

/* The MoE exchanges' times into the step's, and their bytes per world rank
 * (the EP group's ranks; zero elsewhere). Before any evaluation, whose
 * forward passes exchange too. */
static void collect_comm_measures(Trainer *t) {
    Model *m = &t->model;
    const Comm *comm = t->comm;
    long *to_my_ep_group =
        t->exchange_bytes + (long)placement_ep_group(comm->ep_size, comm->rank) * comm->ep_size;
    memset(t->exchange_bytes, 0, sizeof(long) * comm->world_size);
    for (int l = 0; l < m->shape.L; l++) {
        if (!model_is_moe_layer(&m->shape, l)) continue;
        const Dispatch *d = &m->moe[l].dispatch;
        comm_times_add(&m->comm_times, &d->times);
        for (int q = 0; q < comm->ep_size; q++) to_my_ep_group[q] += d->sent_bytes[q];
    }
}

void trainer_step(Trainer *t, long step, StepStats *stats) {
    const Config *cfg = t->cfg;
    Model *m = &t->model;
    int B = m->shape.B, T = m->shape.T;
    memset(m->phase_s, 0, sizeof m->phase_s);
    reset_comm_measures(m);
    double start = timer_now_s(), mark = start;
    dataset_train_batch(t->ds, cfg->seed, step, t->comm->rank, B, T, t->inputs, t->targets,
                        t->categories);
    model_zero_grad(m);
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
    m->router_ctx = (RouterContext){.training = 1,
                                    .seed = (uint64_t)cfg->seed,
                                    .step = step,
                                    .first_token = (long)t->comm->rank * B * T};
    model_forward(m, t->inputs, t->targets);
    model_backward(m);
    mark = timer_now_s();
    double reduce_start = m->grad_reduce_start_s >= 0 ? m->grad_reduce_start_s : mark;
    model_reduce_gradients(m);
    timer_charge(m->phase_s, PHASE_GRAD_ALLREDUCE, &mark);
    /* Exposed: all the rank spent on the reduction outside compute (with
     * --overlap-grad-reduce also the work at each ready point), fixed-point
     * conversions included. In flight: from the first bucket's start until
     * the reduction ended; without overlap that is the same stretch. */
    m->comm_times.exposed_s[COMM_KIND_GRAD_REDUCE] = m->phase_s[PHASE_GRAD_ALLREDUCE];
    m->comm_times.in_flight_s[COMM_KIND_GRAD_REDUCE] = mark - reduce_start;
    collect_comm_measures(t);
    double grad_norm = global_grad_norm(t);
    check_finite(t, grad_norm, stats);
    double lr = lr_at_step(step, cfg->train_iters, cfg->lr_warmup_iters, cfg->lr, cfg->min_lr);
    if (!stats->nonfinite) {
        adamw_step(&t->opt, m, lr, grad_clip_scale(grad_norm, cfg->clip_grad));
    }
    timer_charge(m->phase_s, PHASE_OPTIMIZER, &mark);
    gather_routing_stats(t, stats);
    if (!stats->nonfinite) update_expert_bias(t);
    /* FLOPs are whole numbers well below 2^53: any order sums them exactly */
    long flops = (long)model_step_flops(m);
    comm_sum_longs(t->comm, &flops, 1);
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
    int P = t->comm->world_size;
    stats->flops = (double)flops;
    stats->lr = lr;
    stats->grad_norm = grad_norm;
    stats->tokens = (long)B * T * P;
    stats->seconds = mark - start;
    memcpy(stats->phase_s, m->phase_s, sizeof m->phase_s);
    stats->comm_times = m->comm_times;
}

void routing_count_by_category(const Routing *r, int N, const int *categories, int num_categories,
                               long *counts) {
    /* Stride by slots, not K: expert_choice and soft give every token E
     * slots, of which expert_choice routes only the experts that chose it. */
    int S = r->slots;
    for (int n = 0; n < N; n++)
        for (int s = 0; s < S; s++) {
            long a = (long)n * S + s;
            if (r->choice_routed[a])
                counts[(long)r->choice_expert[a] * num_categories + categories[n]]++;
        }
}

/* Router assignments (routed, before capacity) of this batch's tokens, by
 * MoE layer, expert and the tokens' category. */
static void count_specialization(Trainer *t) {
    const Model *m = &t->model;
    int E = m->shape.E, N = m->shape.B * m->shape.T, i = 0;
    int categories = t->ds->num_categories;
    for (int l = 0; l < m->shape.L; l++) {
        if (!model_is_moe_layer(&m->shape, l)) continue;
        long *counts = t->routing.specialization + (long)i * E * categories;
        routing_count_by_category(&m->moe[l].routing, N, t->categories, categories, counts);
        i++;
    }
}

double trainer_evaluate(Trainer *t) {
    Model *m = &t->model;
    int B = m->shape.B, T = m->shape.T;
    int spec_len = t->moe_layers * m->shape.E * t->ds->num_categories;
    memset(t->routing.specialization, 0, sizeof(long) * spec_len);
    int grains = model_grains(&m->shape);
    double sum = 0.0, batch_sum;
    for (int i = 0; i < t->cfg->eval_iters; i++) {
        dataset_val_batch(t->ds, t->cfg->seed, i, t->comm->rank, B, T, t->inputs, t->targets,
                          t->categories);
        m->router_ctx = (RouterContext){.training = 0,
                                        .seed = (uint64_t)t->cfg->seed,
                                        .first_token = (long)t->comm->rank * B * T};
        model_forward(m, t->inputs, t->targets);
        count_specialization(t);
        ordered_sum_doubles(t->comm, COMM_SCOPE_WORLD, m->grain_ce, grains, 1, t->gathered,
                            &batch_sum);
        sum += batch_sum;
    }
    comm_sum_longs(t->comm, t->routing.specialization, spec_len);
    return sum / ((double)t->cfg->eval_iters * grains * t->comm->world_size);
}

/* ---- the run --------------------------------------------------------------- */

static void format_seconds(char *buf, size_t len, double s) {
    if (s < 60)
        snprintf(buf, len, "%.1fs", s);
    else if (s < 3600)
        snprintf(buf, len, "%dm%02ds", (int)s / 60, (int)s % 60);
    else
        snprintf(buf, len, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

/* done/todo: steps of this process (a resumed run counts from its start),
 * for the ETA; step: the run's step. */
static void print_progress(long done, long todo, long step, const StepStats *s, double val_loss,
                           double tokens_per_s, double elapsed) {
    char el[32], eta[32];
    long total = step - done + todo;
    format_seconds(el, sizeof el, elapsed);
    format_seconds(eta, sizeof eta, elapsed / done * (todo - done));
    double drop = s->assignments ? 100.0 * s->dropped / s->assignments : 0.0;
    printf(
        "step %5ld/%ld | loss %.4f | val %.4f | %8.0f tok/s | drop %5.2f%% | elapsed %s | "
        "ETA %s\n",
        step, total, s->ce_loss, val_loss, tokens_per_s, drop, el, eta);
    fflush(stdout);
}

/* Parameters of the whole model (every expert, not only this rank's) that
 * --freeze holds. */
static long frozen_params_total(const Model *m) {
    long total = 0;
    for (int i = 0; i < m->num_tensors; i++)
        if (m->tensors[i].frozen)
            total += (long)m->tensors[i].numel * (m->tensors[i].is_expert ? m->shape.ep_size : 1);
    return total;
}

/* "dense (no MoE layers)" rather than an expert count no layer uses. */
static void describe_layers(char *buf, size_t len, const Config *cfg, int moe_layers) {
    if (moe_layers == 0)
        snprintf(buf, len, "dense (no MoE layers), FFN %d", cfg->ffn_hidden_size);
    else
        snprintf(buf, len, "%d MoE, %d experts, top-%d", moe_layers, cfg->num_experts,
                 cfg->moe_router_topk);
}

static void print_header(const Trainer *t, const RecordLayout *layout) {
    const Config *cfg = t->cfg;
    char platform[512];
    platform_describe(layout->platform, platform, sizeof platform);
    const Model *m = &t->model;
    size_t expert_bytes = (m->num_params - m->num_dense_params) * sizeof(float);
    char layers[96];
    describe_layers(layers, sizeof layers, cfg, t->moe_layers);
    printf("moesim %s | %d rank(s), expert-parallel size %d | %ld parameters | %d layers (%s) | "
           "%d tokens/step | record %s\n",
           MOESIM_VERSION, layout->world_size, layout->ep_size, layout->params_total,
           cfg->num_layers, layers, cfg->micro_batch_size * cfg->seq_length * layout->world_size,
           cfg->out);
    if (t->moe_layers == 0)
        printf("parameters per rank: %.2f MB; with gradients and Adam state %.2f MB\n",
               model_param_bytes(m) / 1e6, 4.0 * model_param_bytes(m) / 1e6);
    else
        printf("parameters per rank: %.2f MB (dense replica %.2f MB + %d of %d experts per MoE "
               "layer %.2f MB); with gradients and Adam state %.2f MB\n",
               model_param_bytes(m) / 1e6, m->num_dense_params * sizeof(float) / 1e6,
               model_local_experts(&m->shape), cfg->num_experts, expert_bytes / 1e6,
               4.0 * model_param_bytes(m) / 1e6);
    printf("platform: %s\n", platform);
    printf("exchange: %s dispatcher, %d node(s)%s", cfg->moe_token_dispatcher_type,
           t->comm->num_nodes, cfg->ranks_per_node ? " (emulated by --ranks-per-node)" : "");
    if (cfg->moe_overlap_chunks > 1)
        printf(", expert work overlapping it in %d chunks", cfg->moe_overlap_chunks);
    printf("\n");
    printf(
        "precision: matmul inputs %s, router %s; accumulation and master weights fp32; "
        "bf16 GEMM: %s\n",
        cfg->precision, cfg->moe_router_precision, layout->bf16_gemm ? layout->bf16_gemm : "none");
    if (cfg->freeze[0]) {
        long frozen = frozen_params_total(m);
        printf("frozen: %s, %ld of %ld parameters (no update, Adam moments kept); %ld train\n",
               cfg->freeze, frozen, layout->params_total, layout->params_total - frozen);
    }
    fflush(stdout);
}

/* Everyone agrees on whether every rank succeeded; the first failing rank's
 * message becomes everyone's. */
static int all_ok_or_share(const Comm *comm, int ok, char *err, size_t errlen) {
    int failed = comm_first_failed_rank(comm, ok);
    if (failed < 0) return 1;
    comm_share_error(comm, failed, err, errlen);
    return 0;
}

typedef struct RunState {
    Record *rec; /* rank 0 */
    RecordLayout layout;
    long *param_bytes;  /* [world] */
    char *hostnames;    /* [world][MOESIM_HOSTNAME_MAX] */
    double *phase_all;  /* [world * PHASE_COUNT], rank 0 */
    long *bytes_all;    /* [world * world], rank 0 */
    long *node_of_rank; /* [world] each rank's node (Comm.node), rank 0 */
    long *exchange_all; /* [world * world] every rank's exchange_bytes, rank 0 */
    long *internode;    /* [nodes * nodes] exchange_all summed over node blocks, rank 0 */
    double *comm_all;   /* [world * COMM_TIMES_COUNT], rank 0 */
    /* kept, then dropped: [world][2][moe_layers][local_groups][E] as gathered
     * and [2][moe_layers][world * local_groups][E] in global group order,
     * rank 0 */
    long *groups_all, *groups_row;
} RunState;

static long params_active_per_token(const Trainer *t) {
    const ModelShape *s = &t->model.shape;
    long per_expert = 2L * s->C * s->Fe;
    return (long)t->model.num_dense_params + (long)t->moe_layers * s->K * per_expert;
}

/* The record of a resumed run, continued from the record image in the
 * checkpoint it loaded (none in an older moesim's checkpoint). */
static Record *resume_record(const Config *cfg, const RecordLayout *layout, long iteration,
                             const char *checkpoint, char *err, size_t errlen) {
    char *image = NULL;
    long len = 0;
    if (checkpoint_record_image(checkpoint, &image, &len) < 0) {
        snprintf(err, errlen,
                 "the run record saved in checkpoint %s cannot be read; resume from an earlier "
                 "checkpoint, or start a new record from its parameters (--finetune 1 --out "
                 "NEW.h5)",
                 checkpoint);
        return NULL;
    }
    Record *r = record_resume(cfg->out, layout, iteration, image, len, err, errlen);
    free(image);
    return r;
}

/* resume_from: the step of the checkpoint the run resumed from, or -1;
 * checkpoint: that checkpoint's file. */
static int run_state_init(RunState *rs, const Trainer *t, const Platform *platform,
                          long resume_from, const char *checkpoint, char *err, size_t errlen) {
    const Comm *comm = t->comm;
    const Model *m = &t->model;
    int P = comm->world_size;
    memset(rs, 0, sizeof *rs);
    rs->param_bytes = calloc((size_t)P, sizeof(long));
    rs->hostnames = calloc((size_t)P * MOESIM_HOSTNAME_MAX, 1);
    rs->phase_all = calloc((size_t)P * PHASE_COUNT, sizeof(double));
    rs->bytes_all = calloc((size_t)P * P, sizeof(long));
    rs->node_of_rank = calloc((size_t)P, sizeof(long));
    rs->exchange_all = calloc((size_t)P * P, sizeof(long));
    rs->internode = calloc((size_t)comm->num_nodes * comm->num_nodes, sizeof(long));
    rs->comm_all = calloc((size_t)P * COMM_TIMES_COUNT, sizeof(double));
    size_t group_cells = 2 * (size_t)P * t->local_groups * t->model.shape.E *
                         (t->moe_layers ? t->moe_layers : 1);
    rs->groups_all = calloc(group_cells, sizeof(long));
    rs->groups_row = calloc(group_cells, sizeof(long));
    int ok = rs->param_bytes && rs->hostnames && rs->phase_all && rs->bytes_all &&
             rs->node_of_rank && rs->exchange_all && rs->internode && rs->comm_all &&
             rs->groups_all && rs->groups_row;
    if (!ok) snprintf(err, errlen, "out of memory for the run statistics");
    long mine = (long)model_param_bytes(m), my_node = comm->node;
    if (comm_all_ok(comm, ok)) {
        comm_gather_longs(comm, &mine, rs->param_bytes, 1);
        comm_gather_longs(comm, &my_node, rs->node_of_rank, 1);
        comm_gather_hostnames(comm, rs->hostnames);
    }
    size_t expert_params = m->num_params - m->num_dense_params;
    rs->layout =
        (RecordLayout){.world_size = P,
                       .ep_size = comm->ep_size,
                       .moe_layers = t->moe_layers,
                       .experts = t->cfg->num_experts,
                       .top_k = t->cfg->moe_router_topk,
                       .routing_groups = P * t->local_groups,
                       .vocab_size = t->ds->vocab_size,
                       .num_categories = t->ds->num_categories,
                       .category_names = t->ds->category_names,
                       .hostnames = rs->hostnames,
                       .hostname_len = MOESIM_HOSTNAME_MAX,
                       .param_bytes_per_rank = rs->param_bytes,
                       .num_nodes = comm->num_nodes,
                       .node_of_rank = rs->node_of_rank,
                       .params_total = (long)(m->num_dense_params + expert_params * comm->ep_size),
                       .params_active_per_token = params_active_per_token(t),
                       .platform = platform,
                       .bf16_gemm = matmul_bf16_gemm(&m->matmul)};
    if (ok && comm->rank == 0) {
        rs->rec = resume_from >= 0
                      ? resume_record(t->cfg, &rs->layout, resume_from, checkpoint, err, errlen)
                      : record_open(t->cfg->out, t->cfg, &rs->layout, err, errlen);
        ok = rs->rec != NULL;
    }
    return all_ok_or_share(comm, ok, err, errlen) ? 0 : -1;
}

static void run_state_free(RunState *rs) {
    free(rs->param_bytes);
    free(rs->hostnames);
    free(rs->phase_all);
    free(rs->bytes_all);
    free(rs->node_of_rank);
    free(rs->exchange_all);
    free(rs->internode);
    free(rs->comm_all);
    free(rs->groups_all);
    free(rs->groups_row);
}

/* Bytes from node to node: the rank-to-rank bytes summed over node blocks. */
static void sum_node_blocks(const long *rank_bytes, const long *node_of_rank, int world, int nodes,
                            long *node_bytes) {
    memset(node_bytes, 0, sizeof(long) * (size_t)nodes * nodes);
    for (int i = 0; i < world; i++)
        for (int j = 0; j < world; j++)
            node_bytes[node_of_rank[i] * nodes + node_of_rank[j]] +=
                rank_bytes[(long)i * world + j];
}

/* Gathers the per-rank details of a logged step and buffers it (rank 0). */
static int record_step(RunState *rs, const Trainer *t, long done, const StepStats *stats) {
    const Comm *comm = t->comm;
    comm_gather_doubles(comm, stats->phase_s, rs->phase_all, PHASE_COUNT);
    comm_gather_longs(comm, t->dispatch_bytes, rs->bytes_all, comm->world_size);
    comm_gather_longs(comm, t->exchange_bytes, rs->exchange_all, comm->world_size);
    double comm_row[COMM_TIMES_COUNT];
    comm_times_flatten(&stats->comm_times, comm_row);
    comm_gather_doubles(comm, comm_row, rs->comm_all, COMM_TIMES_COUNT);
    if (comm->rank != 0) return 1;
    sum_node_blocks(rs->exchange_all, rs->node_of_rank, comm->world_size, comm->num_nodes,
                    rs->internode);
    const RoutingStats *r = &t->routing;
    TrainRow row = {.step = done,
                    .loss = stats->ce_loss,
                    .aux_loss = stats->aux_loss,
                    .z_loss = stats->z_loss,
                    .importance_loss = stats->importance_loss,
                    .load_loss = stats->load_loss,
                    .lr = stats->lr,
                    .grad_norm = stats->grad_norm,
                    .tokens_per_s = stats->tokens / stats->seconds,
                    .step_time_s = stats->seconds};
    StepDetail detail = {.tokens_per_expert = r->tokens_per_expert,
                         .dropped_per_expert = r->dropped_per_expert,
                         .importance = r->importance,
                         .mean_prob = r->mean_prob,
                         .entropy = r->entropy,
                         .aux_loss = r->aux_loss,
                         .z_loss = r->z_loss,
                         .importance_loss = r->importance_loss,
                         .load_loss = r->load_loss,
                         .mean_abs_logit = r->mean_abs_logit,
                         .logsumexp_sq = r->logsumexp_sq,
                         .expert_bias = r->expert_bias,
                         .phase_s = rs->phase_all,
                         .dispatch_bytes = rs->bytes_all,
                         .comm_times = rs->comm_all,
                         .internode_bytes = rs->internode,
                         .shadowed_rows = r->shadowed_rows};
    return record_append_train(rs->rec, &row, &detail) == 0;
}

/* Gathers every rank's group counts (kept, then dropped) and buffers them in
 * global group order (rank r holds groups r*local_groups ..), the same rows
 * on any layout. */
static int record_group_counts(RunState *rs, const Trainer *t, long done) {
    const Comm *comm = t->comm;
    int L = t->moe_layers, E = t->model.shape.E, lg = t->local_groups, P = comm->world_size;
    long per_kind = (long)L * lg * E, per_rank = 2 * per_kind, row = (long)P * per_kind;
    comm_gather_longs(comm, t->group_counts, rs->groups_all, (int)per_rank);
    if (comm->rank != 0) return 1;
    for (int kind = 0; kind < 2; kind++)
        for (int r = 0; r < P; r++)
            for (int i = 0; i < L; i++)
                memcpy(rs->groups_row + kind * row + ((long)i * P * lg + (long)r * lg) * E,
                       rs->groups_all + r * per_rank + kind * per_kind + (long)i * lg * E,
                       sizeof(long) * lg * E);
    return record_append_group_counts(rs->rec, done, rs->groups_row, rs->groups_row + row) == 0;
}

static int record_eval(RunState *rs, const Trainer *t, long done, double val_loss) {
    if (t->comm->rank != 0) return 1;
    EvalRow row = {done, val_loss, t->routing.specialization};
    return record_append_eval(rs->rec, &row) == 0;
}

static void report_interruption(int sig, long step, const Config *cfg) {
    printf("moesim: stopped by %s after step %ld of %d", strsignal(sig), step, cfg->train_iters);
    if (cfg->save[0])
        printf("; checkpoint %s/iter_%07ld.h5 saved: resume with --load %s (any layout)\n",
               cfg->save, step, cfg->save);
    else
        printf("; no checkpoint (no --save): this run cannot be resumed\n");
    fflush(stdout);
}

/* printf shows a NaN with its sign bit set as "-nan", which reads like a
 * meaningful sign; the sign of a NaN means nothing. */
static double plain_nan(double x) {
    return isnan(x) ? fabs(x) : x;
}

/* "layers.1.qkv_w (3 of 20 tensors)", or what was not finite instead. */
static void describe_nonfinite(const Trainer *t, const StepStats *stats, char *buf, size_t len) {
    if (stats->nonfinite_tensor < 0) {
        snprintf(buf, len, "every gradient is finite, the loss is not");
        return;
    }
    snprintf(buf, len, "the first tensor with a non-finite gradient is %s (%d of %d tensors)",
             t->model.tensors[stats->nonfinite_tensor].name, stats->nonfinite_tensors,
             t->model.num_tensors);
}

/* A step whose loss or gradient was not finite made no update (trainer_step).
 * Up to --skip-nonfinite-steps of them are skipped with a warning; the next
 * one stops the run as diverged, err naming the step and the first tensor
 * whose gradient is not finite. Every rank decides alike: stats agree.
 * Returns 1 to stop. */
static int stop_on_nonfinite(const Trainer *t, long *skipped, long done, const StepStats *stats,
                             char *err, size_t errlen) {
    const Config *cfg = t->cfg;
    char where[160];
    describe_nonfinite(t, stats, where, sizeof where);
    if (*skipped < cfg->skip_nonfinite_steps) {
        ++*skipped;
        if (t->comm->rank == 0)
            fprintf(stderr,
                    "moesim: warning: step %ld: loss %g, gradient norm %g; %s. Skipped without "
                    "an update (%ld of %d allowed by --skip-nonfinite-steps)\n",
                    done, plain_nan(stats->ce_loss), plain_nan(stats->grad_norm), where, *skipped,
                    cfg->skip_nonfinite_steps);
        return 0;
    }
    char after[96] = "";
    if (*skipped > 0)
        snprintf(after, sizeof after, " after %ld skipped step(s) (--skip-nonfinite-steps %d)",
                 *skipped, cfg->skip_nonfinite_steps);
    snprintf(err, errlen,
             "training diverged at step %ld%s: loss %g, gradient norm %g; %s. The step made "
             "no update and the record %s is marked diverged. Lower --lr, keep --clip-grad above "
             "0, or let --skip-nonfinite-steps N skip up to N such steps",
             done, after, plain_nan(stats->ce_loss), plain_nan(stats->grad_norm), where, cfg->out);
    return 1;
}

/* A checkpoint after `done` steps, carrying the record as it stands then:
 * the record is flushed through that step first, so a resume continues it
 * from there. Collective. */
static int save_checkpoint(const Trainer *t, RunState *rs, long done, char *err, size_t errlen) {
    char *image = NULL;
    long len = 0;
    int ok = 1;
    if (t->comm->rank == 0) {
        ok = record_flush(rs->rec, done, err, errlen) == 0;
        if (ok && record_image(rs->rec, &image, &len) != 0) {
            snprintf(err, errlen,
                     "cannot read back the run record %s to save it with checkpoint %ld (%s)",
                     t->cfg->out, done, strerror(errno));
            ok = 0;
        }
    }
    int st = all_ok_or_share(t->comm, ok, err, errlen)
                 ? checkpoint_save(t, done, image, len, err, errlen)
                 : -1;
    free(image);
    return st;
}

int train_run(const Config *cfg, const Dataset *ds, const Comm *comm, const Platform *platform,
              char *err, size_t errlen) {
    Trainer t;
    int ok = trainer_init(&t, cfg, ds, comm, err, errlen) == 0;
    if (!all_ok_or_share(comm, ok, err, errlen)) {
        if (ok) trainer_free(&t);
        return -1;
    }
    long start = 0;
    int load_optimizer = !cfg->finetune && !cfg->no_load_optim;
    char loaded[MOESIM_PATH_MAX + 64] = "";
    if (cfg->load[0] && checkpoint_load(&t, cfg->load, load_optimizer, &start, loaded,
                                        sizeof loaded, err, errlen) != 0) {
        trainer_free(&t);
        return -1;
    }
    if (cfg->finetune) start = 0; /* a new run from the loaded parameters */
    int resumes = config_continues_record(cfg);
    /* A finished run loaded again (a requeue after the last step, or a
     * forgotten --train-iters): nothing to train, and the record stays as
     * it is. */
    if (resumes && start >= cfg->train_iters) {
        if (comm->rank == 0)
            printf("moesim: %s's latest checkpoint is at step %ld, already --train-iters %d: "
                   "nothing to train; the record %s is left as it is. Raise --train-iters to "
                   "continue the run\n",
                   cfg->load, start, cfg->train_iters, cfg->out);
        trainer_free(&t);
        return 0;
    }
    RunState rs;
    if (run_state_init(&rs, &t, platform, resumes ? start : -1, loaded, err, errlen) != 0) {
        run_state_free(&rs);
        trainer_free(&t);
        return -1;
    }
    int is_root = comm->rank == 0;
    if (is_root) print_header(&t, &rs.layout);
    /* A warm-up the user gave that long is refused (config.c); the default
     * one only meets a short run, which may be meant (a smoke test). */
    if (is_root && cfg->lr_warmup_iters >= cfg->train_iters && cfg->lr_warmup_iters > 0)
        fprintf(stderr,
                "moesim: warning: the default learning-rate warm-up of %d steps is not shorter "
                "than --train-iters %d, so the learning rate never reaches --lr %g; give "
                "--lr-warmup-iters below %d\n",
                cfg->lr_warmup_iters, cfg->train_iters, cfg->lr, cfg->train_iters);
    if (is_root && resumes)
        printf("resumed from %s at step %ld on %d rank(s), expert-parallel size %d%s\n", cfg->load,
               start, comm->world_size, comm->ep_size,
               load_optimizer ? "" : " (Adam moments from zero: --no-load-optim)");
    if (is_root && cfg->finetune)
        printf("fine-tuning from the parameters of %s's latest checkpoint: step 0, new optimizer\n",
               cfg->load);
    double val_loss = NAN;
    if (start == 0) {
        val_loss = trainer_evaluate(&t);
        ok = record_eval(&rs, &t, 0, val_loss);
    }
    double run_start = comm_wtime(), tokens_total = 0.0;
    long expert_rows = 0, shadowed_rows = 0;
    StepStats stats = {0};
    long step = start, skipped = 0;
    long steps_done = start; /* steps whose rows the record holds or buffers */
    int interrupted = 0, diverged = 0;
    preempt_install();
    for (; step < cfg->train_iters; step++) {
        trainer_step(&t, step, &stats);
        tokens_total += stats.tokens;
        expert_rows += stats.expert_rows;
        shadowed_rows += stats.shadowed_rows;
        long done = step + 1;
        steps_done = done;
        diverged = stats.nonfinite && stop_on_nonfinite(&t, &skipped, done, &stats, err, errlen);
        int last = done == cfg->train_iters;
        if (!diverged && (done % cfg->eval_interval == 0 || last)) {
            val_loss = trainer_evaluate(&t);
            ok = record_eval(&rs, &t, done, val_loss) && ok;
        }
        /* A skipped or diverging step is always recorded, whatever the log interval. */
        if (done % cfg->log_interval == 0 || last || stats.nonfinite)
            ok = record_step(&rs, &t, done, &stats) && ok;
        if (cfg->record_group_counts_interval > 0 && done % cfg->record_group_counts_interval == 0)
            ok = record_group_counts(&rs, &t, done) && ok;
        /* a diverging step keeps the last good checkpoint */
        int save_now = !diverged && cfg->save[0] &&
                       (last || (cfg->save_interval > 0 && done % cfg->save_interval == 0));
        if (!ok)
            snprintf(err, errlen, "out of memory buffering step %ld for the run record %s", done,
                     cfg->out);
        else if (is_root && !save_now && done % cfg->record_flush_interval == 0)
            ok = record_flush(rs.rec, done, err, errlen) == 0;
        if (!all_ok_or_share(comm, ok, err, errlen) || diverged) break;
        if (save_now && save_checkpoint(&t, &rs, done, err, errlen) != 0) break;
        /* a signal during the last step: the run is done anyway */
        if (!last && (interrupted = comm_max_int(comm, preempt_signal())) != 0) {
            step++;
            if (cfg->save[0] && !save_now && save_checkpoint(&t, &rs, done, err, errlen) != 0)
                interrupted = 0; /* the failed save is the error to report */
            break;
        }
        double elapsed = comm_wtime() - run_start;
        if (is_root && (done % cfg->progress_interval == 0 || last))
            print_progress(done - start, cfg->train_iters - start, done, &stats, val_loss,
                           tokens_total / elapsed, elapsed);
    }
    preempt_uninstall();
    ok = step == cfg->train_iters;
    if (interrupted) {
        if (is_root) report_interruption(interrupted, step, cfg);
        char close_err[MOESIM_ERR_MAX];
        if (is_root && record_close(rs.rec, RECORD_INTERRUPTED, steps_done, NULL, close_err,
                                    sizeof close_err) != 0)
            fprintf(stderr, "moesim: warning: %s\n", close_err);
        run_state_free(&rs);
        trainer_free(&t);
        return MOESIM_EXIT_INTERRUPTED;
    }
    double elapsed = comm_wtime() - run_start;
    if (is_root) {
        RecordStatus status = diverged ? RECORD_DIVERGED : ok ? RECORD_COMPLETE : RECORD_FAILED;
        char close_err[MOESIM_ERR_MAX];
        int closed = record_close(rs.rec, status, steps_done, ok ? NULL : err, close_err,
                                  sizeof close_err) == 0;
        if (ok && !closed) snprintf(err, errlen, "%s", close_err);
        ok = ok && closed;
        if (ok) {
            printf(
                "done: %ld steps in %.1fs | final train loss %.4f | val loss %.4f | "
                "%.0f tok/s | record %s\n",
                step, elapsed, stats.ce_loss, val_loss, tokens_total / elapsed, cfg->out);
            if (shadowed_rows > 0)
                printf(
                    "shadowing: %.1f%% of the expert rows were computed by their source "
                    "ranks (%ld of %ld)\n",
                    100.0 * shadowed_rows / expert_rows, shadowed_rows, expert_rows);
        }
    }
    ok = all_ok_or_share(comm, ok, err, errlen);
    run_state_free(&rs);
    trainer_free(&t);
    return ok ? 0 : -1;
}
