/* calibrate: measures this machine for `moesim project` and writes a
 * CLUSTER.ini (project.h): sgemm at the model's shapes against a large
 * square sgemm (the peak and the efficiency reached at these shapes), memory
 * bandwidth (memcpy), MPI_Alltoallv / MPI_Allreduce alpha-beta over the
 * transport the ranks use, and the [vector] rates: a few training steps of
 * the config, each phase's seconds beyond what those values model. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "moesim/comm.h"
#include "moesim/config.h"
#include "moesim/ffn.h"
#include "moesim/project.h"
#include "moesim/timing.h"
#include "moesim/train.h"

#define MEASURE_S 0.3
/* Training steps timed for the [vector] rates, the first ones left out:
 * they warm caches, page tables and the allocator. */
#define CALIBRATION_STEPS 10
#define CALIBRATION_WARMUP 3

/* CPU seconds of this thread: a device of the modelled cluster is dedicated
 * to its rank, so compute is timed by the time it ran, not by the wall time
 * other processes on shared cores take from it. */
static double cpu_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* FLOP/s of C[m,n] = A[m,k] B[k,n]: the fastest of the calls made in about
 * MEASURE_S, since other work on shared cores only ever slows a call down. */
static double sgemm_rate(int m, int n, int k) {
    float *a = calloc((size_t)m * k, sizeof(float)), *b = calloc((size_t)k * n, sizeof(float));
    float *c = calloc((size_t)m * n, sizeof(float));
    double best = 1e30;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)m * k; i++) a[i] = (float)(i % 7) * 0.1f;
        for (size_t i = 0; i < (size_t)k * n; i++) b[i] = (float)(i % 5) * 0.1f;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, 0.0f, c,
                    n);
        /* a small product is timed over enough calls to span many clock ticks */
        double flops = 2.0 * m * n * k;
        int calls = flops < 1e8 ? (int)(1e8 / flops) : 1;
        double begin = timer_now_s();
        for (int rep = 0; rep < 3 || timer_now_s() - begin < MEASURE_S; rep++) {
            double start = cpu_now_s();
            for (int call = 0; call < calls; call++)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n,
                            0.0f, c, n);
            double t = (cpu_now_s() - start) / calls;
            if (t > 0) best = t < best ? t : best;
        }
    }
    free(a);
    free(b);
    free(c);
    return best < 1e30 ? 2.0 * m * n * k / best : 0.0;
}

/* Bytes/s moved by memcpy of a buffer far larger than the caches (read +
 * write), the best of several copies: other work on shared cores only
 * slows a copy down. */
static double memory_bandwidth(void) {
    size_t n = 32u << 20;
    char *src = malloc(n), *dst = malloc(n);
    double best = 0.0;
    volatile char sink = 0; /* reads of dst keep every copy from being optimised away */
    if (src && dst) {
        memset(src, 1, n);
        memset(dst, 0, n);
        for (int rep = 0; rep < 20; rep++) {
            double start = cpu_now_s();
            memcpy(dst, src, n);
            sink = (char)(sink + dst[(size_t)rep * 4099 % n]);
            double rate = 2.0 * (double)n / (cpu_now_s() - start);
            src[(size_t)rep * 4099 % n]++;
            best = rate > best ? rate : best;
        }
    }
    free(src);
    free(dst);
    return best;
}

/* Seconds of one MPI_Alltoallv sending `floats` to every other rank of the
 * world (EP = world), the best of several. */
static double alltoallv_s(const Comm *comm, int floats, float *send, float *recv, int *args) {
    int P = comm->ep_size;
    for (int i = 0; i < P; i++) {
        args[i] = args[2 * P + i] = floats;
        args[P + i] = args[3 * P + i] = i * floats;
    }
    double best = 1e30;
    for (int rep = 0; rep < 10; rep++) {
        comm_barrier(comm);
        double start = comm_wtime();
        comm_ep_alltoallv_floats(comm, send, args, args + P, recv, args + 2 * P, args + 3 * P);
        double t = comm_wtime() - start;
        t = (double)comm_max_int(comm, (int)(t * 1e9)) * 1e-9; /* every rank agrees */
        best = t < best ? t : best;
    }
    return best;
}

static double allreduce_s(const Comm *comm, float *values, size_t n) {
    double best = 1e30;
    for (int rep = 0; rep < 10; rep++) {
        comm_barrier(comm);
        double start = comm_wtime();
        comm_float_allreduce_baseline(comm, COMM_SCOPE_WORLD, values, n);
        double t = (double)comm_max_int(comm, (int)((comm_wtime() - start) * 1e9)) * 1e-9;
        best = t < best ? t : best;
    }
    return best;
}

typedef struct Calibration {
    double peak, efficiency, memory_bw, shape_rate[6];
    double a2a_latency, a2a_bandwidth, allreduce_bandwidth, allreduce_small_s;
    int ranks_on_node;
    double core_share; /* of a core each rank gets: 1, or cores / ranks when oversubscribed */
    /* the config's own training steps: measured and modelled seconds per
     * phase (mean over ranks) and the [vector] rates fitted from them */
    double step_s[PHASE_COUNT], modelled_s[PHASE_COUNT], vector_rate[PHASE_COUNT];
} Calibration;

static int measure_network(const Comm *comm, Calibration *cal) {
    int P = comm->ep_size, big = 1 << 20; /* 4 MB to each peer */
    float *send = calloc((size_t)P * big, sizeof(float)),
          *recv = calloc((size_t)P * big, sizeof(float));
    int *args = calloc(4 * (size_t)P, sizeof(int));
    int ok = comm_all_ok(comm, send && recv && args);
    if (ok) {
        double small = alltoallv_s(comm, 1, send, recv, args);
        double large = alltoallv_s(comm, big, send, recv, args);
        /* the model: (P-1) latencies, then the busier direction at the bandwidth */
        cal->a2a_latency = small / (P - 1);
        cal->a2a_bandwidth = (double)(P - 1) * big * sizeof(float) / (large - small);
        double ar_small = allreduce_s(comm, send, 1);
        double ar_large = allreduce_s(comm, send, (size_t)big);
        cal->allreduce_small_s = ar_small;
        /* a ring moves 2 (P-1)/P of the vector through each rank */
        cal->allreduce_bandwidth = 2.0 * (P - 1) / P * big * sizeof(float) / (ar_large - ar_small);
    }
    free(send);
    free(recv);
    free(args);
    return ok ? 0 : -1;
}

/* The rates above are CPU time: a dedicated core. When more ranks share
 * this machine than it has cores (an emulated cluster oversubscribes it),
 * each rank's device is its share of the cores and of their memory. */
static void share_cores(Calibration *cal) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    cal->core_share =
        cores > 0 && cal->ranks_on_node > cores ? (double)cores / cal->ranks_on_node : 1.0;
    cal->peak *= cal->core_share;
    cal->memory_bw *= cal->core_share;
}

/* The calibrated values as the cluster file will give them, [vector] rates
 * left out: the model's share without them. */
static ClusterSpec cluster_of(const Calibration *cal) {
    ClusterSpec c = {.peak_flops_fp32 = cal->peak,
                     .peak_flops_bf16 = cal->peak,
                     .memory_bandwidth = cal->memory_bw,
                     .matmul_efficiency = cal->efficiency,
                     .devices_per_node = cal->ranks_on_node,
                     .intra_bandwidth = cal->a2a_bandwidth,
                     .intra_latency = cal->a2a_latency,
                     .inter_bandwidth = cal->a2a_bandwidth,
                     .inter_latency = cal->a2a_latency,
                     .nics_per_node = 1,
                     .oversubscription = 1.0};
    snprintf(c.name, sizeof c.name, "calibration");
    return c;
}

/* The config as `moesim project` reads it from a record. */
static ProjectRecord shape_of(const Trainer *t) {
    const Config *cfg = t->cfg;
    const Model *m = &t->model;
    double expert_params = (double)(strcmp(cfg->moe_expert_activation, "swiglu") == 0 ? 3 : 2) *
                           cfg->hidden_size * cfg->moe_ffn_hidden_size;
    return (ProjectRecord){
        .moe_layers = t->moe_layers,
        .experts = cfg->num_experts,
        .top_k = cfg->moe_router_topk,
        .recorded_world = t->comm->world_size,
        .micro_batch = cfg->micro_batch_size,
        .seq_length = cfg->seq_length,
        .hidden = cfg->hidden_size,
        .heads = cfg->num_attention_heads,
        .ffn_hidden = cfg->ffn_hidden_size,
        .moe_ffn_hidden = cfg->moe_ffn_hidden_size,
        .shared_ffn_hidden = cfg->moe_shared_expert_intermediate_size,
        .num_layers = cfg->num_layers,
        .vocab = t->ds->vocab_size,
        .swiglu = strcmp(cfg->moe_expert_activation, "swiglu") == 0,
        .bf16 = config_uses_bf16(cfg),
        .params_total = (long)((double)m->num_dense_params +
                               t->moe_layers * expert_params * cfg->num_experts)};
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The exchanges' and the all-reduce's seconds here hold waits for the other
 * ranks (their skew and imbalance), which are not work of this layout's
 * size: those phases keep the network model alone. */
static int is_compute_phase(int ph) {
    return ph != PHASE_DISPATCH && ph != PHASE_COMBINE && ph != PHASE_GRAD_ALLREDUCE;
}

/* Trains CALIBRATION_STEPS steps of the config and fits, per phase, the rate
 * at which the [vector] units of project_vector_units go by: the measured
 * seconds beyond what the model gives with the calibrated peak, memory and
 * network. A phase the model already accounts for gets no rate. */
static int fit_vector_rates(const Config *cfg, const Dataset *ds, const Comm *comm,
                            Calibration *cal, char *err, size_t errlen) {
    /* project.h models every row on its expert's owner: no shadows here. */
    Config owners_only = *cfg;
    owners_only.moe_expert_shadowing = 0;
    Trainer t;
    if (!comm_all_ok(comm, trainer_init(&t, &owners_only, ds, comm, err, errlen) == 0)) return -1;
    int P = comm->world_size, timed = CALIBRATION_STEPS - CALIBRATION_WARMUP;
    double samples[PHASE_COUNT][CALIBRATION_STEPS];
    double *mine = calloc((size_t)PHASE_COUNT + P, sizeof(double));
    double *all = calloc((size_t)P * (PHASE_COUNT + P), sizeof(double));
    int L = t.moe_layers > 0 ? t.moe_layers : 1;
    double *rows = calloc((size_t)L * P * P, sizeof(double));
    double *phase_s = calloc((size_t)P * PHASE_COUNT, sizeof(double));
    int ok = comm_all_ok(comm, mine && all && rows && phase_s);
    StepStats stats;
    for (int step = 0; ok && step < CALIBRATION_STEPS; step++) {
        trainer_step(&t, step, &stats);
        if (step < CALIBRATION_WARMUP) continue;
        for (int ph = 0; ph < PHASE_COUNT; ph++)
            samples[ph][step - CALIBRATION_WARMUP] = t.model.phase_s[ph];
        /* forward dispatch rows to each rank, summed over layers */
        for (int q = 0; q < P; q++)
            mine[PHASE_COUNT + q] +=
                (double)t.dispatch_bytes[q] / (sizeof(float) * cfg->hidden_size) / timed;
    }
    if (ok) {
        for (int ph = 0; ph < PHASE_COUNT; ph++) {
            qsort(samples[ph], (size_t)timed, sizeof(double), compare_doubles);
            mine[ph] = samples[ph][timed / 2];
        }
        comm_allgather_doubles(comm, COMM_SCOPE_WORLD, mine, all, PHASE_COUNT + P);
        ProjectRecord in = shape_of(&t);
        ProjectLayout lay = {.world = P, .ep = comm->ep_size, .ranks_per_node = P};
        ClusterSpec c = cluster_of(cal);
        for (int l = 0; l < L; l++)
            for (int s = 0; s < P; s++)
                for (int d = 0; d < P; d++)
                    rows[((long)l * P + s) * P + d] =
                        t.moe_layers > 0 ? all[(long)s * (PHASE_COUNT + P) + PHASE_COUNT + d] / L
                                         : 0.0;
        project_step_time(&in, &lay, &c, rows, NULL, phase_s);
        double units[PHASE_COUNT], mean_units[PHASE_COUNT] = {0};
        for (int r = 0; r < P; r++) {
            project_vector_units(&in, &lay, rows, r, units);
            for (int ph = 0; ph < PHASE_COUNT; ph++) {
                mean_units[ph] += units[ph] / P;
                cal->step_s[ph] += all[(long)r * (PHASE_COUNT + P) + ph] / P;
                cal->modelled_s[ph] += phase_s[(long)r * PHASE_COUNT + ph] / P;
            }
        }
        for (int ph = 0; ph < PHASE_COUNT; ph++) {
            double beyond = cal->step_s[ph] - cal->modelled_s[ph];
            cal->vector_rate[ph] = is_compute_phase(ph) && beyond > 0 && mean_units[ph] > 0
                                       ? mean_units[ph] / beyond
                                       : 0;
        }
    }
    free(mine);
    free(all);
    free(rows);
    free(phase_s);
    trainer_free(&t);
    if (!ok) snprintf(err, errlen, "out of memory for the calibration steps");
    return ok ? 0 : -1;
}

/* The fitted rates, each with the seconds it was fitted from. */
static void write_vector_section(FILE *f, const Calibration *c, const Config *cfg) {
    fprintf(f,
            "\n[vector]\n"
            "; work units per second of each phase's kernels besides matmuls and messages\n"
            "; (norms, softmaxes, selection, activations, row copies, exact sums, AdamW; units in\n"
            "; experiments/clusters/README.md), fitted from %d training steps here of the\n"
            "; --config (%d layers, hidden %d, %d experts top-%d, micro-batch %d x %d tokens):\n"
            "; the median step's seconds beyond what the values above give. A phase the\n"
            "; values above already account for has no key, nor have the exchanges and the\n"
            "; all-reduce: their seconds here include waits for the other ranks.\n",
            CALIBRATION_STEPS - CALIBRATION_WARMUP, cfg->num_layers, cfg->hidden_size,
            cfg->num_experts, cfg->moe_router_topk, cfg->micro_batch_size, cfg->seq_length);
    for (int ph = 0; ph < PHASE_COUNT; ph++) {
        fprintf(f, "; %s: measured %.4g s, modelled without this key %.4g s\n", phase_names[ph],
                c->step_s[ph], c->modelled_s[ph]);
        if (c->vector_rate[ph] > 0) fprintf(f, "%s = %.4g\n", phase_names[ph], c->vector_rate[ph]);
    }
}

static int write_cluster_ini(const char *path, const Calibration *c, const Comm *comm,
                             const Config *cfg) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(
        f,
        "; written by `moesim calibrate` on this machine with %d rank(s): every value below is\n"
        "; measured here (single BLAS thread per rank as OPENBLAS_NUM_THREADS says).\n"
        "[cluster]\nname = this machine (calibrated, %d ranks)\n\n[device]\n"
        "; best sgemm rate, 1024x1024x1024, by the CPU time of the call (a device is "
        "dedicated),\n; times each rank's share of the cores, %.3g (below 1 when more ranks "
        "than cores\n; share this machine; memory_bandwidth too)\npeak_flops_fp32 = %.4g\n"
        "; bf16 is emulated on CPUs: rounded inputs, then the same sgemm\n"
        "peak_flops_bf16 = %.4g\n"
        "; memcpy of 64 MB, read + write bytes per second\nmemory_bandwidth = %.4g\n"
        "; median sgemm rate at the model's shapes (micro-batch %d x %d tokens, hidden %d) /\n"
        "; peak: qkv %.3g, projection %.3g, expert fc1 %.3g, expert fc2 %.3g, LM head %.3g,\n"
        "; dense ffn %.3g FLOP/s\nmatmul_efficiency = %.4g\n\n[node]\n"
        "; ranks sharing this node's memory in the calibration run\ndevices_per_node = %d\n"
        "; MPI_Alltoallv over shared memory: (P-1) x 4 MB per rank\nintra_bandwidth = %.4g\n"
        "; MPI_Alltoallv of one float per peer / (P-1)\nintra_latency = %.4g\n"
        "; MPI_Allreduce (ring-equivalent bandwidth %.4g B/s, 1 float in %.3g s)\n\n"
        "[network]\n"
        "; one node: no inter-node link exists here, so the node's own transport stands in\n"
        "inter_bandwidth = %.4g\ninter_latency = %.4g\nnics_per_node = 1\n"
        "oversubscription = 1\nallreduce = ring\n",
        comm->world_size, comm->world_size, c->core_share, c->peak, c->peak, c->memory_bw, cfg->micro_batch_size,
        cfg->seq_length, cfg->hidden_size, c->shape_rate[0], c->shape_rate[1], c->shape_rate[2],
        c->shape_rate[3], c->shape_rate[4], c->shape_rate[5], c->efficiency, c->ranks_on_node,
        c->a2a_bandwidth, c->a2a_latency, c->allreduce_bandwidth, c->allreduce_small_s,
        c->a2a_bandwidth, c->a2a_latency);
    write_vector_section(f, c, cfg);
    return fclose(f) == 0 ? 0 : -1;
}

int calibrate_run(const Config *cfg, const Dataset *ds, const Comm *comm, char *err,
                  size_t errlen) {
    if (comm->world_size < 2) {
        snprintf(err, errlen,
                 "moesim calibrate measures MPI between ranks: run it under mpirun with the ranks "
                 "per node you will train with (e.g. mpirun -n 2 build/moesim calibrate --out "
                 "experiments/clusters/this_machine.ini)");
        return -1;
    }
    Calibration cal = {0};
    int node_rank = 0;
    comm_node_ranks(comm, &cal.ranks_on_node, &node_rank);
    int N = cfg->micro_batch_size * cfg->seq_length, C = cfg->hidden_size;
    int Fe = cfg->moe_ffn_hidden_size, V = ds->vocab_size, F = cfg->ffn_hidden_size;
    int w1 = strcmp(cfg->moe_expert_activation, "swiglu") == 0 ? 2 : 1;
    /* every rank measures at once, as ranks train at once on shared cores */
    cal.peak = sgemm_rate(1024, 1024, 1024);
    int shapes[6][3] = {{N, 3 * C, C}, {N, C, C}, {N, w1 * Fe, C},
                        {N, C, Fe},    {N, V, C}, {N, F, C}};
    double sorted[6];
    for (int i = 0; i < 6; i++) {
        cal.shape_rate[i] = sgemm_rate(shapes[i][0], shapes[i][1], shapes[i][2]);
        if (cal.shape_rate[i] > cal.peak) cal.peak = cal.shape_rate[i];
        sorted[i] = cal.shape_rate[i];
    }
    qsort(sorted, 6, sizeof(double), compare_doubles);
    cal.efficiency = (sorted[2] + sorted[3]) / 2 / cal.peak;
    cal.memory_bw = memory_bandwidth();
    share_cores(&cal);
    if (measure_network(comm, &cal) != 0) {
        snprintf(err, errlen, "out of memory for the 4 MB-per-peer exchange buffers");
        return -1;
    }
    if (fit_vector_rates(cfg, ds, comm, &cal, err, errlen) != 0) return -1;
    int ok = comm->rank != 0 || write_cluster_ini(cfg->out, &cal, comm, cfg) == 0;
    if (!comm_all_ok(comm, ok)) {
        snprintf(err, errlen, "cannot write --out %s; check that its directory exists", cfg->out);
        return -1;
    }
    if (comm->rank == 0)
        printf(
            "calibrated: peak %.3g FLOP/s, efficiency at the model's shapes %.2f, memory "
            "%.3g B/s, alltoallv %.3g B/s + %.3g s per peer, allreduce %.3g B/s -> %s\n",
            cal.peak, cal.efficiency, cal.memory_bw, cal.a2a_bandwidth, cal.a2a_latency,
            cal.allreduce_bandwidth, cfg->out);
    return 0;
}
