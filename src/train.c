#include "moesim/train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/record.h"

/* A run killed between flushes loses at most this many steps of record. */
#define RECORD_FLUSH_STEPS 50

int trainer_init(Trainer *t, const Config *cfg, const Dataset *ds, const Comm *comm, char *err,
                 size_t errlen) {
    memset(t, 0, sizeof *t);
    t->cfg = cfg;
    t->ds = ds;
    t->comm = comm;
    ModelShape shape;
    model_shape_from_config(&shape, cfg, ds->vocab_size);
    size_t N = (size_t)shape.B * shape.T;
    t->moe_layers = config_num_moe_layers(cfg);
    size_t stats = (size_t)(t->moe_layers ? t->moe_layers : 1) * shape.E;
    t->inputs = malloc(sizeof(int) * N);
    t->targets = malloc(sizeof(int) * N);
    t->categories = malloc(sizeof(int) * N);
    t->tokens_per_expert = calloc(stats, sizeof(long));
    t->dropped_per_expert = calloc(stats, sizeof(long));
    if (!t->inputs || !t->targets || !t->categories || !t->tokens_per_expert ||
        !t->dropped_per_expert || model_init(&t->model, &shape, cfg->seed) != 0) {
        snprintf(err, errlen, "out of memory building the model (%d layers, hidden %d, %d "
                 "experts, micro-batch %d x %d); make the model or the micro-batch smaller",
                 shape.L, shape.C, shape.E, shape.B, shape.T);
        trainer_free(t);
        return -1;
    }
    t->opt = (AdamW){.beta1 = cfg->adam_beta1, .beta2 = cfg->adam_beta2, .eps = cfg->adam_eps,
                     .weight_decay = cfg->weight_decay};
    return 0;
}

void trainer_free(Trainer *t) {
    model_free(&t->model);
    free(t->inputs);
    free(t->targets);
    free(t->categories);
    free(t->tokens_per_expert);
    free(t->dropped_per_expert);
    memset(t, 0, sizeof *t);
}

/* Per-expert routing counts of every MoE layer, summed over ranks. */
static void gather_routing_counts(Trainer *t, StepStats *stats) {
    const Model *m = &t->model;
    int E = m->shape.E, i = 0;
    for (int l = 0; l < m->shape.L; l++) {
        if (!model_is_moe_layer(&m->shape, l)) continue;
        const Routing *r = &m->moe[l].routing;
        memcpy(t->tokens_per_expert + (long)i * E, r->tokens_per_expert, sizeof(long) * E);
        memcpy(t->dropped_per_expert + (long)i * E, r->dropped_per_expert, sizeof(long) * E);
        i++;
    }
    int n = t->moe_layers * E;
    comm_sum_longs(t->comm, t->tokens_per_expert, n);
    comm_sum_longs(t->comm, t->dropped_per_expert, n);
    stats->assignments = stats->dropped = 0;
    for (int j = 0; j < n; j++) {
        stats->assignments += t->tokens_per_expert[j];
        stats->dropped += t->dropped_per_expert[j];
    }
}

void trainer_step(Trainer *t, long step, StepStats *stats) {
    const Config *cfg = t->cfg;
    Model *m = &t->model;
    int B = m->shape.B, T = m->shape.T;
    double start = comm_wtime();
    dataset_train_batch(t->ds, cfg->seed, step, t->comm->rank, B, T, t->inputs, t->targets,
                        t->categories);
    model_zero_grad(m);
    model_forward(m, t->inputs, t->targets);
    model_backward(m);
    comm_average_floats(t->comm, m->grads, m->num_params);
    double grad_norm = sqrt(grad_sum_squares(m->grads, m->num_params));
    clip_gradients(m->grads, m->num_params, grad_norm, cfg->clip_grad);
    double lr = lr_at_step(step, cfg->train_iters, cfg->lr_warmup_iters, cfg->lr, cfg->min_lr);
    adamw_step(&t->opt, m, lr);
    double losses[4] = {m->ce_loss + m->aux_loss + m->z_loss, m->ce_loss, m->aux_loss,
                        m->z_loss};
    comm_sum_doubles(t->comm, losses, 4);
    double flops = model_step_flops(m);
    comm_sum_doubles(t->comm, &flops, 1);
    gather_routing_counts(t, stats);
    int P = t->comm->world_size;
    stats->loss = losses[0] / P;
    stats->ce_loss = losses[1] / P;
    stats->aux_loss = losses[2] / P;
    stats->z_loss = losses[3] / P;
    stats->lr = lr;
    stats->grad_norm = grad_norm;
    stats->flops = flops;
    stats->tokens = (long)B * T * P;
    stats->seconds = comm_wtime() - start;
}

double trainer_evaluate(Trainer *t) {
    Model *m = &t->model;
    int B = m->shape.B, T = m->shape.T;
    double sum = 0.0;
    for (int i = 0; i < t->cfg->eval_iters; i++) {
        dataset_val_batch(t->ds, t->cfg->seed, i, t->comm->rank, B, T, t->inputs, t->targets,
                          t->categories);
        model_forward(m, t->inputs, t->targets);
        sum += m->ce_loss;
    }
    comm_sum_doubles(t->comm, &sum, 1);
    return sum / ((double)t->cfg->eval_iters * t->comm->world_size);
}

static void format_seconds(char *buf, size_t len, double s) {
    if (s < 60) snprintf(buf, len, "%.1fs", s);
    else if (s < 3600) snprintf(buf, len, "%dm%02ds", (int)s / 60, (int)s % 60);
    else snprintf(buf, len, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

static void print_progress(long step, long total, const StepStats *s, double val_loss,
                           double tokens_per_s, double elapsed) {
    char el[32], eta[32];
    format_seconds(el, sizeof el, elapsed);
    format_seconds(eta, sizeof eta, elapsed / step * (total - step));
    double drop = s->assignments ? 100.0 * s->dropped / s->assignments : 0.0;
    printf("step %5ld/%ld | loss %.4f | val %.4f | %8.0f tok/s | drop %5.2f%% | elapsed %s | "
           "ETA %s\n", step, total, s->ce_loss, val_loss, tokens_per_s, drop, el, eta);
    fflush(stdout);
}

/* Rank 0 owns the record; the other ranks learn of a failed write through
 * the agreement that follows every record operation. */
static int record_ok(const Comm *comm, int ok, const char *what, const char *path, char *err,
                     size_t errlen) {
    if (comm_all_ok(comm, ok)) return 1;
    snprintf(err, errlen, "writing %s to the run record %s failed; check free disk space and "
             "that nothing else removed or locked the file", what, path);
    return 0;
}

int train_run(const Config *cfg, const Dataset *ds, const Comm *comm, char *err, size_t errlen) {
    Trainer t;
    int ok = trainer_init(&t, cfg, ds, comm, err, errlen) == 0;
    if (!comm_all_ok(comm, ok)) {
        if (ok) trainer_free(&t);
        return -1;
    }
    int is_root = comm->rank == 0;
    Record rec = {0};
    ok = !is_root || record_open(&rec, cfg->out, cfg, comm->world_size, t.moe_layers,
                                 cfg->num_experts, err, errlen) == 0;
    if (!comm_all_ok(comm, ok)) {
        comm_share_error(comm, 0, err, errlen);
        trainer_free(&t);
        return -1;
    }
    if (is_root) {
        printf("moesim %s | %d rank(s) | %zu parameters | %d layers (%d MoE, %d experts, top-%d) "
               "| %d tokens/step | record %s\n", MOESIM_VERSION, comm->world_size,
               t.model.num_params, cfg->num_layers, t.moe_layers, cfg->num_experts,
               cfg->moe_router_topk, cfg->micro_batch_size * cfg->seq_length * comm->world_size,
               cfg->out);
        fflush(stdout);
    }
    double val_loss = trainer_evaluate(&t);
    ok = !is_root || record_append_eval(&rec, 0, val_loss) == 0;
    double run_start = comm_wtime(), tokens_total = 0.0;
    StepStats stats = {0};
    long step = 0;
    for (; step < cfg->train_iters && ok; step++) {
        trainer_step(&t, step, &stats);
        tokens_total += stats.tokens;
        long done = step + 1;
        if (done % cfg->eval_interval == 0 || done == cfg->train_iters) {
            val_loss = trainer_evaluate(&t);
            ok = !is_root || record_append_eval(&rec, done, val_loss) == 0;
        }
        if (is_root && (done % cfg->log_interval == 0 || done == cfg->train_iters)) {
            TrainRow row = {done, stats.ce_loss, stats.aux_loss, stats.z_loss, stats.lr,
                            stats.grad_norm, stats.tokens / stats.seconds};
            ok = ok && record_append_train(&rec, &row, t.tokens_per_expert,
                                           t.dropped_per_expert) == 0;
            ok = ok && (done % RECORD_FLUSH_STEPS != 0 || record_flush(&rec) == 0);
        }
        if (!record_ok(comm, ok, "step statistics", cfg->out, err, errlen)) break;
        double elapsed = comm_wtime() - run_start;
        if (is_root && (done % cfg->progress_interval == 0 || done == cfg->train_iters))
            print_progress(done, cfg->train_iters, &stats, val_loss, tokens_total / elapsed,
                           elapsed);
    }
    double elapsed = comm_wtime() - run_start;
    if (is_root) {
        int closed = record_close(&rec, ok) == 0;
        if (ok && !closed) snprintf(err, errlen, "closing the run record %s failed", cfg->out);
        ok = ok && closed;
        if (ok)
            printf("done: %ld steps in %.1fs | final train loss %.4f | val loss %.4f | "
                   "%.0f tok/s | record %s\n", step, elapsed, stats.ce_loss, val_loss,
                   tokens_total / elapsed, cfg->out);
    }
    ok = comm_all_ok(comm, ok);
    if (!ok) comm_share_error(comm, 0, err, errlen);
    trainer_free(&t);
    return ok ? 0 : -1;
}
