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
    model_shape_from_config(&shape, cfg, ds->vocab_size, comm->ep_size, comm->ep_rank);
    size_t N = (size_t)shape.B * shape.T;
    t->moe_layers = config_num_moe_layers(cfg);
    size_t stats = (size_t)(t->moe_layers ? t->moe_layers : 1) * shape.E;
    t->inputs = malloc(sizeof(int) * N);
    t->targets = malloc(sizeof(int) * N);
    t->categories = malloc(sizeof(int) * N);
    t->tokens_per_expert = calloc(stats, sizeof(long));
    t->dropped_per_expert = calloc(stats, sizeof(long));
    t->dispatch_bytes = calloc((size_t)comm->world_size, sizeof(long));
    if (!t->inputs || !t->targets || !t->categories || !t->tokens_per_expert ||
        !t->dropped_per_expert || !t->dispatch_bytes ||
        model_init(&t->model, &shape, cfg->seed, comm) != 0) {
        snprintf(err, errlen,
                 "out of memory building the model (%d layers, hidden %d, %d "
                 "experts, micro-batch %d x %d); make the model or the micro-batch smaller",
                 shape.L, shape.C, shape.E, shape.B, shape.T);
        trainer_free(t);
        return -1;
    }
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
    free(t->tokens_per_expert);
    free(t->dropped_per_expert);
    free(t->dispatch_bytes);
    memset(t, 0, sizeof *t);
}

/* Per-expert routing counts of every MoE layer summed over ranks, and the
 * bytes of token rows this rank dispatched to each rank. */
static void gather_routing_counts(Trainer *t, StepStats *stats) {
    const Model *m = &t->model;
    const Comm *comm = t->comm;
    int E = m->shape.E, i = 0;
    long *to_my_ep_group = t->dispatch_bytes + (comm->rank - comm->ep_rank);
    memset(t->dispatch_bytes, 0, sizeof(long) * comm->world_size);
    for (int l = 0; l < m->shape.L; l++) {
        if (!model_is_moe_layer(&m->shape, l)) continue;
        const MoeLayer *layer = &m->moe[l];
        memcpy(t->tokens_per_expert + (long)i * E, layer->routing.tokens_per_expert,
               sizeof(long) * E);
        memcpy(t->dropped_per_expert + (long)i * E, layer->routing.dropped_per_expert,
               sizeof(long) * E);
        dispatch_add_bytes_to_ranks(&layer->dispatch, m->shape.C, to_my_ep_group);
        i++;
    }
    int n = t->moe_layers * E;
    comm_sum_longs(comm, t->tokens_per_expert, n);
    comm_sum_longs(comm, t->dropped_per_expert, n);
    stats->assignments = stats->dropped = 0;
    for (int j = 0; j < n; j++) {
        stats->assignments += t->tokens_per_expert[j];
        stats->dropped += t->dropped_per_expert[j];
    }
}

/* The global gradient norm: dense gradients are identical on every rank
 * after the all-reduce; each expert's lives on one rank of every EP group. */
static double global_grad_norm(const Model *m, const Comm *comm) {
    double dense = grad_sum_squares(m->grads, m->num_dense_params);
    double expert =
        grad_sum_squares(m->grads + m->num_dense_params, m->num_params - m->num_dense_params);
    comm_ep_sum_doubles(comm, &expert, 1);
    return sqrt(dense + expert);
}

void trainer_step(Trainer *t, long step, StepStats *stats) {
    const Config *cfg = t->cfg;
    Model *m = &t->model;
    int B = m->shape.B, T = m->shape.T;
    memset(m->phase_s, 0, sizeof m->phase_s);
    double start = timer_now_s(), mark = start;
    dataset_train_batch(t->ds, cfg->seed, step, t->comm->rank, B, T, t->inputs, t->targets,
                        t->categories);
    model_zero_grad(m);
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
    model_forward(m, t->inputs, t->targets);
    model_backward(m);
    mark = timer_now_s();
    comm_reduce_gradients(t->comm, m->grads, m->num_dense_params, m->grads + m->num_dense_params,
                          m->num_params - m->num_dense_params);
    timer_charge(m->phase_s, PHASE_GRAD_ALLREDUCE, &mark);
    double grad_norm = global_grad_norm(m, t->comm);
    clip_gradients(m->grads, m->num_params, grad_norm, cfg->clip_grad);
    double lr = lr_at_step(step, cfg->train_iters, cfg->lr_warmup_iters, cfg->lr, cfg->min_lr);
    adamw_step(&t->opt, m, lr);
    timer_charge(m->phase_s, PHASE_OPTIMIZER, &mark);
    double sums[5] = {m->ce_loss + m->aux_loss + m->z_loss, m->ce_loss, m->aux_loss, m->z_loss,
                      model_step_flops(m)};
    comm_sum_doubles(t->comm, sums, 5);
    gather_routing_counts(t, stats);
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
    int P = t->comm->world_size;
    stats->loss = sums[0] / P;
    stats->ce_loss = sums[1] / P;
    stats->aux_loss = sums[2] / P;
    stats->z_loss = sums[3] / P;
    stats->flops = sums[4];
    stats->lr = lr;
    stats->grad_norm = grad_norm;
    stats->tokens = (long)B * T * P;
    stats->seconds = mark - start;
    memcpy(stats->phase_s, m->phase_s, sizeof m->phase_s);
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

/* ---- the run --------------------------------------------------------------- */

static void format_seconds(char *buf, size_t len, double s) {
    if (s < 60)
        snprintf(buf, len, "%.1fs", s);
    else if (s < 3600)
        snprintf(buf, len, "%dm%02ds", (int)s / 60, (int)s % 60);
    else
        snprintf(buf, len, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

static void print_progress(long step, long total, const StepStats *s, double val_loss,
                           double tokens_per_s, double elapsed) {
    char el[32], eta[32];
    format_seconds(el, sizeof el, elapsed);
    format_seconds(eta, sizeof eta, elapsed / step * (total - step));
    double drop = s->assignments ? 100.0 * s->dropped / s->assignments : 0.0;
    printf(
        "step %5ld/%ld | loss %.4f | val %.4f | %8.0f tok/s | drop %5.2f%% | elapsed %s | "
        "ETA %s\n",
        step, total, s->ce_loss, val_loss, tokens_per_s, drop, el, eta);
    fflush(stdout);
}

static void print_header(const Trainer *t, const RecordLayout *layout) {
    const Config *cfg = t->cfg;
    const Model *m = &t->model;
    size_t expert_bytes = (m->num_params - m->num_dense_params) * sizeof(float);
    printf(
        "moesim %s | %d rank(s), expert-parallel size %d | %ld parameters | %d layers (%d MoE, "
        "%d experts, top-%d) | %d tokens/step | record %s\n",
        MOESIM_VERSION, layout->world_size, layout->ep_size, layout->total_params, cfg->num_layers,
        t->moe_layers, cfg->num_experts, cfg->moe_router_topk,
        cfg->micro_batch_size * cfg->seq_length * layout->world_size, cfg->out);
    printf(
        "parameters per rank: %.2f MB (dense replica %.2f MB + %d of %d experts per MoE layer "
        "%.2f MB); with gradients and Adam state %.2f MB\n",
        model_param_bytes(m) / 1e6, m->num_dense_params * sizeof(float) / 1e6,
        model_local_experts(&m->shape), cfg->num_experts, expert_bytes / 1e6,
        4.0 * model_param_bytes(m) / 1e6);
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

/* Writes every parameter with experts in global order (the 1-rank layout):
 * rank 0 writes its dense replica and gathers the expert shards of EP group 0. */
static int save_parameters(const Trainer *t, const char *path, char *err, size_t errlen) {
    const Model *m = &t->model;
    const Comm *comm = t->comm;
    int is_root = comm->rank == 0, ok = 1;
    long file = is_root ? tensor_file_create(path) : 0;
    if (is_root && file < 0) ok = 0;
    size_t max_expert = 0;
    for (int i = 0; i < m->num_tensors; i++)
        if (m->tensors[i].is_expert && m->tensors[i].numel > max_expert)
            max_expert = m->tensors[i].numel;
    float *gathered = is_root ? malloc(sizeof(float) * (max_expert * comm->ep_size + 1)) : NULL;
    if (is_root && !gathered) ok = 0;
    for (int i = 0; i < m->num_tensors; i++) {
        const ParamTensor *pt = &m->tensors[i];
        long dims[3] = {pt->shape[0], pt->shape[1], pt->shape[2]};
        char name[64];
        snprintf(name, sizeof name, "params/%s", pt->name);
        const float *data = m->params + pt->offset;
        if (pt->is_expert) {
            comm_gather_expert_shards(comm, data, gathered, pt->numel);
            dims[0] *= comm->ep_size;
            data = gathered;
        }
        if (is_root && ok) ok = tensor_file_write_f32(file, name, data, pt->ndim, dims) == 0;
    }
    if (is_root && file > 0) ok = tensor_file_close(file) == 0 && ok;
    free(gathered);
    if (!ok)
        snprintf(err, errlen,
                 "writing the parameters to --save %s failed; check free disk "
                 "space and that the directory is writable",
                 path);
    return all_ok_or_share(comm, ok, err, errlen) ? 0 : -1;
}

typedef struct RunState {
    Record rec;
    RecordLayout layout;
    long *param_bytes; /* [world] */
    double *phase_all; /* [world * PHASE_COUNT], rank 0 */
    long *bytes_all;   /* [world * world], rank 0 */
} RunState;

static int run_state_init(RunState *rs, const Trainer *t, char *err, size_t errlen) {
    const Comm *comm = t->comm;
    const Model *m = &t->model;
    int P = comm->world_size;
    memset(rs, 0, sizeof *rs);
    rs->param_bytes = calloc((size_t)P, sizeof(long));
    rs->phase_all = calloc((size_t)P * PHASE_COUNT, sizeof(double));
    rs->bytes_all = calloc((size_t)P * P, sizeof(long));
    int ok = rs->param_bytes && rs->phase_all && rs->bytes_all;
    if (!ok) snprintf(err, errlen, "out of memory for the run statistics");
    long mine = (long)model_param_bytes(m);
    if (ok) comm_gather_longs(comm, &mine, rs->param_bytes, 1);
    size_t expert_params = m->num_params - m->num_dense_params;
    rs->layout =
        (RecordLayout){.world_size = P,
                       .ep_size = comm->ep_size,
                       .moe_layers = t->moe_layers,
                       .experts = t->cfg->num_experts,
                       .param_bytes_per_rank = rs->param_bytes,
                       .total_params = (long)(m->num_dense_params + expert_params * comm->ep_size)};
    if (ok && comm->rank == 0)
        ok = record_open(&rs->rec, t->cfg->out, t->cfg, &rs->layout, err, errlen) == 0;
    return all_ok_or_share(comm, ok, err, errlen) ? 0 : -1;
}

static void run_state_free(RunState *rs) {
    free(rs->param_bytes);
    free(rs->phase_all);
    free(rs->bytes_all);
}

/* Gathers the per-rank details of a logged step and appends it (rank 0). */
static int record_step(RunState *rs, const Trainer *t, long done, const StepStats *stats) {
    const Comm *comm = t->comm;
    comm_gather_doubles(comm, stats->phase_s, rs->phase_all, PHASE_COUNT);
    comm_gather_longs(comm, t->dispatch_bytes, rs->bytes_all, comm->world_size);
    if (comm->rank != 0) return 1;
    TrainRow row = {done,
                    stats->ce_loss,
                    stats->aux_loss,
                    stats->z_loss,
                    stats->lr,
                    stats->grad_norm,
                    stats->tokens / stats->seconds};
    StepDetail detail = {t->tokens_per_expert, t->dropped_per_expert, rs->phase_all, rs->bytes_all};
    int ok = record_append_train(&rs->rec, &row, &detail) == 0;
    return ok && (done % RECORD_FLUSH_STEPS != 0 || record_flush(&rs->rec) == 0);
}

int train_run(const Config *cfg, const Dataset *ds, const Comm *comm, char *err, size_t errlen) {
    Trainer t;
    int ok = trainer_init(&t, cfg, ds, comm, err, errlen) == 0;
    if (!all_ok_or_share(comm, ok, err, errlen)) {
        if (ok) trainer_free(&t);
        return -1;
    }
    RunState rs;
    if (run_state_init(&rs, &t, err, errlen) != 0) {
        run_state_free(&rs);
        trainer_free(&t);
        return -1;
    }
    int is_root = comm->rank == 0;
    if (is_root) print_header(&t, &rs.layout);
    double val_loss = trainer_evaluate(&t);
    ok = !is_root || record_append_eval(&rs.rec, 0, val_loss) == 0;
    double run_start = comm_wtime(), tokens_total = 0.0;
    StepStats stats = {0};
    long step = 0;
    for (; step < cfg->train_iters; step++) {
        trainer_step(&t, step, &stats);
        tokens_total += stats.tokens;
        long done = step + 1;
        int last = done == cfg->train_iters;
        if (done % cfg->eval_interval == 0 || last) {
            val_loss = trainer_evaluate(&t);
            ok = ok && (!is_root || record_append_eval(&rs.rec, done, val_loss) == 0);
        }
        if (done % cfg->log_interval == 0 || last) ok = record_step(&rs, &t, done, &stats) && ok;
        if (!ok)
            snprintf(err, errlen,
                     "writing step %ld to the run record %s failed; check free "
                     "disk space and that nothing removed the file",
                     done, cfg->out);
        if (!all_ok_or_share(comm, ok, err, errlen)) break;
        double elapsed = comm_wtime() - run_start;
        if (is_root && (done % cfg->progress_interval == 0 || last))
            print_progress(done, cfg->train_iters, &stats, val_loss, tokens_total / elapsed,
                           elapsed);
    }
    ok = step == cfg->train_iters;
    if (ok && cfg->save[0]) ok = save_parameters(&t, cfg->save, err, errlen) == 0;
    double elapsed = comm_wtime() - run_start;
    if (is_root) {
        int closed = record_close(&rs.rec, ok) == 0;
        if (ok && !closed) snprintf(err, errlen, "closing the run record %s failed", cfg->out);
        ok = ok && closed;
        if (ok)
            printf(
                "done: %ld steps in %.1fs | final train loss %.4f | val loss %.4f | "
                "%.0f tok/s | record %s\n",
                step, elapsed, stats.ce_loss, val_loss, tokens_total / elapsed, cfg->out);
    }
    ok = all_ok_or_share(comm, ok, err, errlen);
    run_state_free(&rs);
    trainer_free(&t);
    return ok ? 0 : -1;
}
