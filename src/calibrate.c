/* calibrate: measures this machine for `moesim project` and writes a
 * CLUSTER.ini (project.h): sgemm at the model's shapes against a large
 * square sgemm (the peak and the efficiency reached at these shapes), memory
 * bandwidth (memcpy), and MPI_Alltoallv / MPI_Allreduce alpha-beta over the
 * transport the ranks use. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moesim/ffn.h"
#include "moesim/timing.h"
#include "moesim/train.h"

#define MEASURE_S 0.3

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
        double begin = timer_now_s();
        for (int rep = 0; rep < 3 || timer_now_s() - begin < MEASURE_S; rep++) {
            double start = cpu_now_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, 0.0f,
                        c, n);
            double t = cpu_now_s() - start;
            best = t < best ? t : best;
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
        "dedicated)\npeak_flops_fp32 = %.4g\n"
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
        comm->world_size, comm->world_size, c->peak, c->peak, c->memory_bw, cfg->micro_batch_size,
        cfg->seq_length, cfg->hidden_size, c->shape_rate[0], c->shape_rate[1], c->shape_rate[2],
        c->shape_rate[3], c->shape_rate[4], c->shape_rate[5], c->efficiency, c->ranks_on_node,
        c->a2a_bandwidth, c->a2a_latency, c->allreduce_bandwidth, c->allreduce_small_s,
        c->a2a_bandwidth, c->a2a_latency);
    return fclose(f) == 0 ? 0 : -1;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
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
    if (measure_network(comm, &cal) != 0) {
        snprintf(err, errlen, "out of memory for the 4 MB-per-peer exchange buffers");
        return -1;
    }
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
