/* `moesim bench`: throughput, model-FLOP utilisation, the cost of the token
 * exchange, weak scaling and memory, each as a ratio to a reference measured
 * in the same run (these machines are noisy). */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "moesim/ffn.h"
#include "moesim/placement.h"
#include "moesim/reduce.h"
#include "moesim/train.h"

#define BENCH_MATMUL_SIZE 2048
#define SGEMM_WARMUP_S 0.5
#define SGEMM_REPS 5
#define PROBE_REPS 2
#define EXCHANGE_REPS 50
#define REDUCE_REPS 5

/* One square product c = a · b, n x n: a and b as floats for the sgemm, as
 * bf16 bit patterns for the native bf16 GEMM (gemm set). */
typedef struct SquareProduct {
    int n;
    float *a, *b, *c;
    uint16_t *a_bits, *b_bits;
    Bf16Gemm *gemm;
} SquareProduct;

static void run_square_product(const SquareProduct *p) {
    int n = p->n;
    if (p->gemm)
        bf16_gemm_run(p->gemm, 0, 0, n, n, n, 1.0f, p->a_bits, n, p->b_bits, n, 0.0f, p->c, n);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, p->a, n, p->b, n,
                    0.0f, p->c, n);
}

/* The bf16 bit patterns only with a native bf16 GEMM. -1 when memory runs
 * out; square_product_free frees what came either way. */
static int square_product_alloc(SquareProduct *p, Bf16Gemm *gemm) {
    const long n = BENCH_MATMUL_SIZE, count = n * n;
    *p = (SquareProduct){.n = (int)n, .gemm = gemm};
    p->a = malloc(sizeof(float) * count);
    p->b = malloc(sizeof(float) * count);
    p->c = malloc(sizeof(float) * count);
    if (gemm) {
        p->a_bits = malloc(sizeof(uint16_t) * count);
        p->b_bits = malloc(sizeof(uint16_t) * count);
    }
    if (!p->a || !p->b || !p->c || (gemm && (!p->a_bits || !p->b_bits))) return -1;
    for (long i = 0; i < count; i++) {
        p->a[i] = p->b[i] = (float)(i % 7) * 0.1f;
        uint32_t bits;
        memcpy(&bits, &p->a[i], sizeof bits);
        if (gemm) /* speed only: truncation will do */
            p->a_bits[i] = p->b_bits[i] = (uint16_t)(bits >> 16);
    }
    return 0;
}

static void square_product_free(SquareProduct *p) {
    free(p->a);
    free(p->b);
    free(p->c);
    free(p->a_bits);
    free(p->b_bits);
    *p = (SquareProduct){0};
}

/* Best of `reps` runs of the product, in GFLOP/s. */
static double best_square_gflops(const SquareProduct *p, int reps) {
    double best = 0.0, n = p->n;
    for (int rep = 0; rep < reps; rep++) {
        double start = comm_wtime();
        run_square_product(p);
        double gflops = 2.0 * n * n * n / (comm_wtime() - start) / 1e9;
        if (gflops > best) best = gflops;
    }
    return best;
}

/* Untimed for SGEMM_WARMUP_S: the core's clock and the caches settle, or
 * the first reps read low and the MFU high. */
static void warm_square_product(const SquareProduct *p) {
    double warm_until = comm_wtime() + SGEMM_WARMUP_S;
    while (comm_wtime() < warm_until) run_square_product(p);
}

/* Best of a few runs of the product after a warm-up: the attainable peak,
 * measured on this machine now. 0 when memory runs out. */
static double measure_square_gflops(Bf16Gemm *gemm) {
    SquareProduct p;
    double best = 0.0;
    if (square_product_alloc(&p, gemm) == 0) {
        warm_square_product(&p);
        best = best_square_gflops(&p, SGEMM_REPS);
    }
    square_product_free(&p);
    return best;
}

/* ---- the roofline of the model's own matmul shapes ------------------------ */

/* One sgemm shape of a step, C[m,n] = op(A)[m,k] op(B)[k,n], done `count`
 * times per step. */
typedef struct GemmShape {
    CBLAS_TRANSPOSE ta, tb;
    int m, n, k;
    double count;
} GemmShape;

#define MAX_GEMM_SHAPES 64

typedef struct GemmShapes {
    GemmShape shape[MAX_GEMM_SHAPES];
    int n;
} GemmShapes;

static void add_gemm(GemmShapes *g, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k,
                     double count) {
    if (g->n < MAX_GEMM_SHAPES && m > 0 && n > 0 && k > 0 && count > 0)
        g->shape[g->n++] = (GemmShape){ta, tb, m, n, k, count};
}

/* A linear layer out[rows,out] = inp[rows,in] w[out,in]^T: forward, the
 * input gradient and the weight gradient, as ops.c issues them. */
static void add_linear(GemmShapes *g, int rows, int in, int out, double count) {
    add_gemm(g, CblasNoTrans, CblasTrans, rows, out, in, count);
    add_gemm(g, CblasNoTrans, CblasNoTrans, rows, in, out, count);
    add_gemm(g, CblasTrans, CblasNoTrans, out, in, rows, count);
}

/* Every matmul of one training step on one rank, mirroring
 * model_step_flops; experts get the rows they processed in the last step. */
static void model_gemm_shapes(const Model *m, GemmShapes *g) {
    const ModelShape *s = &m->shape;
    int N = s->B * s->T, C = s->C, T = s->T, hs = s->C / s->NH, El = model_local_experts(s);
    int w1_rows = ffn_w1_rows_per_unit(s->expert_activation);
    memset(g, 0, sizeof *g);
    add_linear(g, N, C, s->V, 1);
    double heads = (double)s->B * s->NH;
    for (int l = 0; l < s->L; l++) {
        add_linear(g, N, C, 3 * C, 1);
        add_linear(g, N, C, C, 1);
        /* attention per (sequence, head): scores and values forward, their
         * four gradient products backward */
        add_gemm(g, CblasNoTrans, CblasTrans, T, T, hs, 2 * heads);
        add_gemm(g, CblasNoTrans, CblasNoTrans, T, hs, T, 2 * heads);
        add_gemm(g, CblasTrans, CblasNoTrans, T, hs, T, 2 * heads);
        if (model_is_moe_layer(s, l)) {
            add_linear(g, N, C, s->E, 1);
            int rows = El ? (int)(moe_computed_rows(&m->moe[l]) / El) : 0;
            add_linear(g, rows, C, w1_rows * s->Fe, El);
            add_linear(g, rows, s->Fe, C, El);
            add_linear(g, N, C, w1_rows * s->shared_F, 1);
            add_linear(g, N, s->shared_F, C, 1);
        } else {
            add_linear(g, N, C, s->F, 1);
            add_linear(g, N, s->F, C, 1);
        }
    }
}

/* FLOP rate of the step's sgemm shapes alone (best of 3 per shape, weighted
 * by each shape's count): the most the model could reach with this kernel. */
static double measure_shapes_gflops(const GemmShapes *g) {
    size_t most = 0;
    for (int i = 0; i < g->n; i++) {
        const GemmShape *s = &g->shape[i];
        size_t biggest = (size_t)s->m * s->k;
        if ((size_t)s->k * s->n > biggest) biggest = (size_t)s->k * s->n;
        if ((size_t)s->m * s->n > biggest) biggest = (size_t)s->m * s->n;
        if (biggest > most) most = biggest;
    }
    float *a = malloc(sizeof(float) * most), *b = malloc(sizeof(float) * most),
          *c = malloc(sizeof(float) * most);
    double flops = 0.0, seconds = 0.0;
    if (a && b && c) {
        for (size_t i = 0; i < most; i++) a[i] = b[i] = c[i] = (float)(i % 5) * 0.1f;
        for (int i = 0; i < g->n; i++) {
            const GemmShape *s = &g->shape[i];
            int lda = s->ta == CblasNoTrans ? s->k : s->m,
                ldb = s->tb == CblasNoTrans ? s->n : s->k;
            double best = INFINITY;
            for (int rep = 0; rep < 4; rep++) {
                double start = comm_wtime();
                cblas_sgemm(CblasRowMajor, s->ta, s->tb, s->m, s->n, s->k, 1.0f, a, lda, b, ldb,
                            0.0f, c, s->n);
                double took = comm_wtime() - start;
                if (rep > 0 && took < best) best = took;
            }
            flops += 2.0 * s->m * s->n * s->k * s->count;
            seconds += best * s->count;
        }
    }
    free(a);
    free(b);
    free(c);
    return seconds > 0 ? flops / seconds / 1e9 : 0.0;
}

static double current_rss_bytes(void) {
    long pages_total = 0, pages_resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld", &pages_total, &pages_resident) != 2) pages_resident = 0;
        fclose(f);
    }
    return (double)pages_resident * sysconf(_SC_PAGESIZE);
}

static double peak_rss_bytes(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_maxrss * 1024.0;
}

typedef struct LayoutResult {
    double tokens_per_s, model_gflops_per_rank, step_s;
    double shapes_gflops;               /* the step's own sgemm shapes, all ranks at once, mean */
    double exchange_s, raw_alltoallv_s; /* per dispatch + combine, mean over ranks */
    double reduce_s, float_allreduce_s; /* exact gradient sums vs a float all-reduce, mean */
    double memory_ratio_min, memory_ratio_max; /* peak RSS growth / analytic bytes, over ranks */
    double analytic_mb;                        /* rank 0 */
    double exposed_exchange_s; /* dispatch + combine no compute covered, per step, mean */
    double exposed_dispatch_s, exposed_combine_s; /* its two parts */
    double load_imbalance;     /* busiest EP rank's expert rows / the mean, over layers and steps */
    double computed_imbalance; /* the same of the rows each rank computed, shadows included */
    double shadowed_fraction;  /* of the expert rows, those computed by their source rank */
    double dropped_fraction;   /* of the routed assignments, those dropped at capacity */
    char bf16_gemm[160];       /* matmul_bf16_gemm: "none", "emulated" or "onednn (...)" */
    double bf16_gflops;        /* the native bf16 GEMM's square product, all ranks at once, mean */
    double probe_gflops;       /* the 2048^2 sgemm after each measured step, all ranks at once:
                                  mean over ranks and probes */
    double probe_min, probe_max; /* the slowest and the fastest probe of any rank */
} LayoutResult;

/* placement_load_imbalance of the last step's kept rows (global counts). */
static double rank_load_imbalance(const Trainer *t) {
    int L = t->moe_layers, E = t->cfg->num_experts;
    long *kept = malloc(sizeof(long) * (size_t)(L > 0 ? L * E : 1));
    if (!kept) return NAN;
    for (long i = 0; i < (long)L * E; i++)
        kept[i] = t->routing.tokens_per_expert[i] - t->routing.dropped_per_expert[i];
    double imbalance = placement_load_imbalance(kept, L, E, t->comm->ep_size);
    free(kept);
    return imbalance;
}

/* The same of the rows each EP rank computed in the last step, after expert
 * shadowing moved some (dispatch.h: every rank of the group has the plan). */
static double computed_load_imbalance(const Trainer *t) {
    const Model *m = &t->model;
    double sum = 0.0;
    int layers = 0;
    for (int l = 0; l < m->shape.L; l++) {
        if (!model_is_moe_layer(&m->shape, l)) continue;
        const Dispatch *d = &m->moe[l].dispatch;
        double busiest = 0.0, total = 0.0;
        for (int q = 0; q < d->ep_size; q++) {
            busiest = d->load[q] > busiest ? d->load[q] : busiest;
            total += d->load[q];
        }
        sum += total > 0.0 ? busiest * d->ep_size / total : 1.0;
        layers++;
    }
    return layers ? sum / layers : 1.0;
}

/* values[n] <- their mean over the ranks (n <= 2). */
static void mean_over_ranks(const Comm *comm, double *values, int n) {
    double sums[2], *gathered = malloc(sizeof(double) * comm->world_size * n);
    if (!gathered) return; /* a rank's own value stands in for the mean */
    ordered_sum_doubles(comm, COMM_SCOPE_WORLD, values, 1, n, gathered, sums);
    for (int i = 0; i < n; i++) values[i] = sums[i] / comm->world_size;
    free(gathered);
}

/* Times dispatch + combine of the first MoE layer's last plan (including the
 * count exchange and the shadow plan) against two plain MPI_Alltoallv calls
 * moving the same bytes between the same ranks. */
static void measure_exchange(Trainer *t, LayoutResult *r) {
    Model *m = &t->model;
    const Comm *comm = t->comm;
    MoeLayer *layer = NULL;
    for (int l = 0; l < m->shape.L && !layer; l++)
        if (model_is_moe_layer(&m->shape, l)) layer = &m->moe[l];
    if (!layer || comm->ep_size == 1) return;
    Dispatch *d = &layer->dispatch;
    int C = m->shape.C, P = comm->ep_size, El = d->E_local;
    int *sc = calloc((size_t)P, sizeof(int)), *sd = calloc((size_t)P, sizeof(int));
    int *rc = calloc((size_t)P, sizeof(int)), *rd = calloc((size_t)P, sizeof(int));
    if (!sc || !sd || !rc || !rd) goto done;
    for (int s = 0; s < P; s++) {
        /* as many rows as go to s, from its first */
        sc[s] = dispatch_rows_to(d, s) * C;
        sd[s] = d->send_row_begin[s * El] * C;
        for (int j = 0; j < El; j++) rc[s] += d->recv_counts[s * El + j] * C;
        rd[s] = s ? rd[s - 1] + rc[s - 1] : 0;
    }
    comm_barrier(comm);
    double start = comm_wtime();
    for (int rep = 0; rep < EXCHANGE_REPS; rep++) {
        dispatch_plan(d, layer->rows_per_expert, comm);
        dispatch_rows(d, layer->send_x, layer->expert_in, C, comm);
        combine_rows(d, layer->expert_out, layer->send_y, C, comm);
    }
    double ours = (comm_wtime() - start) / EXCHANGE_REPS;
    comm_barrier(comm);
    start = comm_wtime();
    for (int rep = 0; rep < EXCHANGE_REPS; rep++) {
        comm_ep_alltoallv_floats(comm, layer->send_x, sc, sd, layer->expert_in, rc, rd);
        comm_ep_alltoallv_floats(comm, layer->expert_out, rc, rd, layer->send_y, sc, sd);
    }
    double raw = (comm_wtime() - start) / EXCHANGE_REPS;
    double times[2] = {ours, raw};
    mean_over_ranks(comm, times, 2);
    r->exchange_s = times[0];
    r->raw_alltoallv_s = times[1];
done:
    free(sc);
    free(sd);
    free(rc);
    free(rd);
}

/* The exact gradient reduction (model_reduce_gradients) against the float
 * MPI_Allreduce of the same gradients that moesim ran before its sums were
 * exact: dense ones over the world, expert ones over their
 * expert-data-parallel group. The gradients are garbage afterwards. */
static void measure_reduction(Trainer *t, LayoutResult *r) {
    Model *m = &t->model;
    const Comm *comm = t->comm;
    size_t expert_n = m->num_params - m->num_dense_params;
    comm_barrier(comm);
    double start = comm_wtime();
    for (int rep = 0; rep < REDUCE_REPS; rep++) model_reduce_gradients(m);
    double exact = (comm_wtime() - start) / REDUCE_REPS;
    comm_barrier(comm);
    start = comm_wtime();
    for (int rep = 0; rep < REDUCE_REPS; rep++) {
        comm_float_allreduce_baseline(comm, COMM_SCOPE_WORLD, m->grads, m->num_dense_params);
        comm_float_allreduce_baseline(comm, COMM_SCOPE_EDP, m->grads + m->num_dense_params,
                                      expert_n);
    }
    double plain = (comm_wtime() - start) / REDUCE_REPS;
    double times[2] = {exact, plain};
    mean_over_ranks(comm, times, 2);
    r->reduce_s = times[0];
    r->float_allreduce_s = times[1];
}

/* One layout's training under measurement. Right after each measured step,
 * every rank of the layout runs the 2048^2 sgemm at the same moment: the
 * machine's speed while the steps ran. A shared host's speed drifts within
 * a minute (the same sgemm read 96 and 184 GFLOP/s three minutes apart), so
 * a reference taken before or after the steps can miss it either way. */
typedef struct LayoutRun {
    Trainer t;
    const Comm *comm;
    const SquareProduct *probe;
    double rss_before;
    int steps; /* measured so far */
    double seconds, flops, tokens, exposed[2], imbalance, computed, rows, shadowed, dropped,
        assignments;
    double probe_sum, probe_min, probe_max; /* this rank's probes */
} LayoutRun;

static int layout_start(LayoutRun *run, const Config *cfg, const Dataset *ds, const Comm *comm,
                        const SquareProduct *probe, char *err, size_t errlen) {
    memset(run, 0, sizeof *run);
    run->comm = comm;
    run->probe = probe;
    run->probe_min = INFINITY;
    run->rss_before = current_rss_bytes();
    return comm_all_ok(comm, trainer_init(&run->t, cfg, ds, comm, err, errlen) == 0) ? 0 : -1;
}

static void layout_step(LayoutRun *run, int step, int measured) {
    StepStats stats;
    trainer_step(&run->t, step, &stats);
    if (!measured) return;
    run->seconds += stats.seconds;
    run->flops += stats.flops;
    run->tokens += stats.tokens;
    run->exposed[0] += stats.comm_times.exposed_s[COMM_KIND_DISPATCH];
    run->exposed[1] += stats.comm_times.exposed_s[COMM_KIND_COMBINE];
    double kept = rank_load_imbalance(&run->t);
    run->imbalance += kept;
    run->computed += stats.shadowed_rows > 0 ? computed_load_imbalance(&run->t) : kept;
    run->rows += stats.expert_rows;
    run->shadowed += stats.shadowed_rows;
    run->dropped += stats.dropped;
    run->assignments += stats.assignments;
    run->steps++;
    comm_barrier(run->comm);
    double gflops = best_square_gflops(run->probe, PROBE_REPS);
    run->probe_sum += gflops;
    run->probe_min = gflops < run->probe_min ? gflops : run->probe_min;
    run->probe_max = gflops > run->probe_max ? gflops : run->probe_max;
}

/* low <- the lowest of every rank's low, high <- the highest of every
 * rank's high, on rank 0 (the others keep their own). */
static void extremes_over_ranks(const Comm *comm, double *low, double *high) {
    double mine[2] = {*low, *high};
    double *all = calloc((size_t)comm->world_size * 2, sizeof(double));
    if (all) comm_gather_doubles(comm, mine, all, 2);
    for (int i = 0; all && comm->rank == 0 && i < comm->world_size; i++) {
        *low = all[2 * i] < *low ? all[2 * i] : *low;
        *high = all[2 * i + 1] > *high ? all[2 * i + 1] : *high;
    }
    free(all);
}

/* Peak RSS growth over the analytic bytes, min and max over the ranks. Taken
 * after the first step, which touches every buffer, and before the 1-rank
 * reference shares rank 0's process. */
static void layout_memory(const LayoutRun *run, LayoutResult *r) {
    double analytic = (double)model_memory_bytes(&run->t.model);
    r->memory_ratio_min = r->memory_ratio_max = (peak_rss_bytes() - run->rss_before) / analytic;
    extremes_over_ranks(run->comm, &r->memory_ratio_min, &r->memory_ratio_max);
    r->analytic_mb = analytic / 1e6;
}

/* The probes' mean over ranks, and the extremes on rank 0. */
static void layout_probes(const LayoutRun *run, LayoutResult *r) {
    const Comm *comm = run->comm;
    r->probe_gflops = run->steps ? run->probe_sum / run->steps : 0.0;
    mean_over_ranks(comm, &r->probe_gflops, 1);
    r->probe_min = run->probe_min;
    r->probe_max = run->probe_max;
    extremes_over_ranks(comm, &r->probe_min, &r->probe_max);
}

/* The window's figures; with `details`, also the exchange, the reduction,
 * the step's own sgemm shapes and the bf16 GEMM. Frees the trainer. */
static void layout_finish(LayoutRun *run, LayoutResult *r, int details) {
    Trainer *t = &run->t;
    const Comm *comm = run->comm;
    int steps = run->steps;
    double exposed[2] = {run->exposed[0] / steps, run->exposed[1] / steps};
    mean_over_ranks(comm, exposed, 2);
    r->exposed_dispatch_s = exposed[0];
    r->exposed_combine_s = exposed[1];
    r->exposed_exchange_s = exposed[0] + exposed[1];
    r->load_imbalance = run->imbalance / steps;
    r->computed_imbalance = run->computed / steps;
    r->shadowed_fraction = run->rows > 0 ? run->shadowed / run->rows : 0.0;
    r->dropped_fraction = run->assignments > 0 ? run->dropped / run->assignments : 0.0;
    layout_probes(run, r);
    if (details) {
        measure_exchange(t, r);
        measure_reduction(t, r);
        GemmShapes shapes;
        model_gemm_shapes(&t->model, &shapes);
        comm_barrier(comm);
        r->shapes_gflops = measure_shapes_gflops(&shapes);
        mean_over_ranks(comm, &r->shapes_gflops, 1);
        snprintf(r->bf16_gemm, sizeof r->bf16_gemm, "%s", matmul_bf16_gemm(&t->model.matmul));
        if (t->model.matmul.gemm) { /* the same on every rank (train.c agrees on it) */
            comm_barrier(comm);
            r->bf16_gflops = measure_square_gflops(t->model.matmul.gemm);
            mean_over_ranks(comm, &r->bf16_gflops, 1);
        }
    }
    r->tokens_per_s = run->tokens / run->seconds;
    r->step_s = run->seconds / steps;
    r->model_gflops_per_rank = run->flops / run->seconds / 1e9 / comm->world_size;
    trainer_free(t);
}

/* Trains the layout of `comm` over bench's window and, on several ranks,
 * the weak-scaling reference beside it: rank 0 alone with the experts one
 * rank holds, its step i run right after the layout's step i, so that both
 * see the machine at the same moment. */
static int measure_layouts(const Config *cfg, const Dataset *ds, const Comm *comm,
                           const SquareProduct *probe, LayoutResult *all, LayoutResult *single,
                           char *err, size_t errlen) {
    int is_root = comm->rank == 0, P = comm->world_size;
    int warmup = cfg->bench_warmup_iters, steps = warmup + cfg->bench_iters;
    memset(all, 0, sizeof *all);
    memset(single, 0, sizeof *single);
    LayoutRun run, alone;
    if (layout_start(&run, cfg, ds, comm, probe, err, errlen) != 0) return -1;
    Config one = *cfg;
    one.num_experts = cfg->num_experts / comm->ep_size;
    Comm self;
    comm_attach_self(&self);
    for (int i = 0; i < steps; i++) {
        layout_step(&run, i, i >= warmup);
        if (i == 0) {
            layout_memory(&run, all);
            int ok = P == 1 || !is_root ||
                     layout_start(&alone, &one, ds, &self, probe, err, errlen) == 0;
            if (!comm_all_ok(comm, ok)) { /* only rank 0 starts one */
                trainer_free(&run.t);
                return -1;
            }
        }
        if (P > 1) {
            if (is_root) layout_step(&alone, i, i >= warmup);
            comm_barrier(comm);
        }
    }
    if (P > 1 && is_root) layout_finish(&alone, single, 0);
    layout_finish(&run, all, 1);
    return 0;
}

int bench_run(const Config *cfg, const Dataset *ds, const Comm *comm, const Platform *platform,
              char *err, size_t errlen) {
    int is_root = comm->rank == 0, P = comm->world_size;
    /* OpenBLAS allocates its work buffers at the first call: do that, and
     * the probe's matrices, before any memory baseline is taken. */
    SquareProduct probe;
    int ok = square_product_alloc(&probe, NULL) == 0;
    if (!comm_all_ok(comm, ok)) {
        square_product_free(&probe);
        snprintf(err, errlen, "out of memory for bench's %dx%d sgemm", BENCH_MATMUL_SIZE,
                 BENCH_MATMUL_SIZE);
        return -1;
    }
    warm_square_product(&probe);
    if (is_root) {
        char line[512];
        platform_describe(platform, line, sizeof line);
        printf("bench: platform: %s\n", line);
        if (platform_faster_kernel_exists(platform))
            printf(
                "bench: WARNING: OpenBLAS runs its %s kernel but this CPU supports %s, which is "
                "faster; every MFU below is against the slower %s sgemm. Unset "
                "OPENBLAS_CORETYPE so moesim can choose.\n",
                platform->blas_kernel, platform->blas_best, platform->blas_kernel);
        printf(
            "bench: %d layers, hidden %d, expert ffn %d, %d experts top-%d, seq %d, "
            "micro-batch %d per rank, %d rank(s), expert-parallel size %d, precision %s "
            "(router %s); measures steps %d-%d, after %d warm-up step(s)\n",
            cfg->num_layers, cfg->hidden_size, cfg->moe_ffn_hidden_size, cfg->num_experts,
            cfg->moe_router_topk, cfg->seq_length, cfg->micro_batch_size, P, comm->ep_size,
            cfg->precision, cfg->moe_router_precision, cfg->bench_warmup_iters + 1,
            cfg->bench_warmup_iters + cfg->bench_iters, cfg->bench_warmup_iters);
    }

    LayoutResult all, single;
    ok = measure_layouts(cfg, ds, comm, &probe, &all, &single, err, errlen) == 0;
    square_product_free(&probe);
    if (!ok) return -1;
    double sgemm = all.probe_gflops;
    if (is_root) {
        printf(
            "bench: step %.3f s | %.0f tokens/s | model %.1f GFLOP/s per rank | sgemm %dx%d "
            "%.1f GFLOP/s (%s) | MFU %.3f | %.1f%% of the routed rows dropped\n",
            all.step_s, all.tokens_per_s, all.model_gflops_per_rank, BENCH_MATMUL_SIZE,
            BENCH_MATMUL_SIZE, sgemm, platform->blas_kernel, all.model_gflops_per_rank / sgemm,
            100.0 * all.dropped_fraction);
        printf(
            "bench: sgemm %dx%d run right after each measured step%s: %.1f GFLOP/s per rank on "
            "average (the MFU above is against it), %.1f to %.1f over the %s\n",
            BENCH_MATMUL_SIZE, BENCH_MATMUL_SIZE, P > 1 ? " on every rank at once" : "", sgemm,
            all.probe_min, all.probe_max, P > 1 ? "ranks' probes" : "probes");
        if (P > 1)
            printf(
                "bench: the 1-rank reference of the weak scaling below ran its steps between "
                "these, on rank 0 alone: sgemm %.1f GFLOP/s after them (%.1f to %.1f), MFU "
                "%.3f; the %d-rank MFU against it: %.3f\n",
                single.probe_gflops, single.probe_min, single.probe_max,
                single.model_gflops_per_rank / single.probe_gflops, P,
                all.model_gflops_per_rank / single.probe_gflops);
        printf(
            "bench: the step's own sgemm shapes run at %.1f GFLOP/s per rank (%.3f of the "
            "%dx%d rate): MFU against them %.3f\n",
            all.shapes_gflops, all.shapes_gflops / sgemm, BENCH_MATMUL_SIZE, BENCH_MATMUL_SIZE,
            all.model_gflops_per_rank / all.shapes_gflops);
        if (strcmp(cfg->precision, "bf16") != 0 && strcmp(all.bf16_gemm, "none") != 0)
            printf(
                "bench: bf16 GEMM %s, for the router's products only: the MFU above is against "
                "the sgemm that runs the rest\n",
                all.bf16_gemm);
        else if (all.bf16_gflops > 0.0)
            printf(
                "bench: bf16 GEMM %s: %dx%d %.1f GFLOP/s%s (%.2fx the sgemm): MFU against it "
                "%.3f\n",
                all.bf16_gemm, BENCH_MATMUL_SIZE, BENCH_MATMUL_SIZE, all.bf16_gflops,
                P > 1 ? " per rank with all ranks at once" : "", all.bf16_gflops / sgemm,
                all.model_gflops_per_rank / all.bf16_gflops);
        else if (strcmp(all.bf16_gemm, "none") != 0)
            printf(
                "bench: bf16 GEMM %s: inputs rounded to bf16, then the sgemm, so the MFU above is "
                "against the GEMM it runs on\n",
                all.bf16_gemm);
        printf(
            "bench: memory per rank: peak RSS growth / analytic bytes (%.1f MB: parameters, "
            "gradients, Adam, activations, exchange buffers) = %.3f .. %.3f over ranks\n",
            all.analytic_mb, all.memory_ratio_min, all.memory_ratio_max);
        printf(
            "bench: gradient reduction: exact (layout-independent) %.1f ms vs float "
            "MPI_Allreduce of the same gradients %.1f ms; the difference is %.1f%% of a step\n",
            all.reduce_s * 1e3, all.float_allreduce_s * 1e3,
            100.0 * (all.reduce_s - all.float_allreduce_s) / all.step_s);
        if (P > 1) {
            printf(
                "bench: exchange: dispatch + combine %.1f us vs raw MPI_Alltoallv of the same "
                "counts %.1f us = %.3fx\n",
                all.exchange_s * 1e6, all.raw_alltoallv_s * 1e6,
                all.exchange_s / all.raw_alltoallv_s);
            /* forward and backward each dispatch and combine once per MoE layer */
            int pairs = 2 * config_num_moe_layers(cfg);
            double moving = pairs * all.exchange_s;
            double waiting = all.exposed_exchange_s > moving ? all.exposed_exchange_s - moving : 0;
            printf(
                "bench: load imbalance: the busiest rank's expert rows are %.2fx the mean (per "
                "MoE layer, mean over the steps); with %.1f%% of the rows shadowed (computed by "
                "their source rank) it computes %.2fx; dispatch + combine exposed %.1f ms per "
                "step: moving rows ~%.1f ms (%d exchanges at the cost above), waiting for the "
                "busiest rank ~%.1f ms (%.1f%% of a step)\n",
                all.load_imbalance, 100.0 * all.shadowed_fraction, all.computed_imbalance,
                all.exposed_exchange_s * 1e3, moving * 1e3, pairs, waiting * 1e3,
                100.0 * waiting / all.step_s);
            /* A rank that reaches a dispatch late was slower at what
             * every rank does alike (attention, router, the step's start);
             * one late at a combine had more expert rows or a slower core. */
            printf(
                "bench: the exposed %.1f ms are %.1f ms at the dispatches (the ranks arrive "
                "apart: attention, router, the step's start) and %.1f ms at the combines (the "
                "busiest or slowest rank's experts)\n",
                all.exposed_exchange_s * 1e3, all.exposed_dispatch_s * 1e3,
                all.exposed_combine_s * 1e3);
            printf(
                "bench: weak scaling 1 -> %d ranks (%d experts per rank): %.0f -> %.0f "
                "tokens/s per rank, efficiency %.3f; in model FLOP/s per rank %.1f -> %.1f "
                "GFLOP/s, efficiency %.3f (the two runs' steps alternate; routing drops make a "
                "token's expert rows differ between them)\n",
                P, cfg->num_experts / comm->ep_size, single.tokens_per_s, all.tokens_per_s / P,
                all.tokens_per_s / P / single.tokens_per_s, single.model_gflops_per_rank,
                all.model_gflops_per_rank,
                all.model_gflops_per_rank / single.model_gflops_per_rank);
        }
        fflush(stdout);
    }
    return 0;
}
