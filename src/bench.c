#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>

#include "moesim/train.h"

#define BENCH_MATMUL_SIZE 2048
#define BENCH_WARMUP_STEPS 2
#define BENCH_STEPS 5

/* Best of a few runs of one large square sgemm: the attainable peak that the
 * model's FLOP rate is compared against, measured on this machine now. */
static double measure_sgemm_gflops(void) {
    const int n = BENCH_MATMUL_SIZE;
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n),
          *c = malloc(sizeof(float) * n * n);
    if (!a || !b || !c) {
        free(a), free(b), free(c);
        return 0.0;
    }
    for (long i = 0; i < (long)n * n; i++) a[i] = b[i] = (float)(i % 7) * 0.1f;
    double best = 0.0;
    for (int rep = 0; rep < 4; rep++) {
        double start = comm_wtime();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f,
                    c, n);
        double gflops = 2.0 * n * n * n / (comm_wtime() - start) / 1e9;
        if (rep > 0 && gflops > best) best = gflops;
    }
    free(a), free(b), free(c);
    return best;
}

int bench_run(const Config *cfg, const Dataset *ds, const Comm *comm, char *err, size_t errlen) {
    Trainer t;
    if (!comm_all_ok(comm, trainer_init(&t, cfg, ds, comm, err, errlen) == 0)) return -1;
    double sgemm_gflops = measure_sgemm_gflops();
    StepStats stats;
    for (int i = 0; i < BENCH_WARMUP_STEPS; i++) trainer_step(&t, i, &stats);
    double seconds = 0.0, flops = 0.0, tokens = 0.0;
    for (int i = 0; i < BENCH_STEPS; i++) {
        trainer_step(&t, BENCH_WARMUP_STEPS + i, &stats);
        seconds += stats.seconds;
        flops += stats.flops;
        tokens += stats.tokens;
    }
    double model_gflops = flops / seconds / 1e9 / comm->world_size;
    if (comm->rank == 0) {
        printf("bench: %d layers, hidden %d, ffn %d, %d experts top-%d, seq %d, micro-batch %d, "
               "%d rank(s)\n", cfg->num_layers, cfg->hidden_size, cfg->moe_ffn_hidden_size,
               cfg->num_experts, cfg->moe_router_topk, cfg->seq_length, cfg->micro_batch_size,
               comm->world_size);
        printf("bench: step %.3f s | %.0f tokens/s | model %.1f GFLOP/s per rank | sgemm %dx%d "
               "%.1f GFLOP/s | MFU %.3f\n", seconds / BENCH_STEPS, tokens / seconds,
               model_gflops, BENCH_MATMUL_SIZE, BENCH_MATMUL_SIZE, sgemm_gflops,
               model_gflops / sgemm_gflops);
    }
    trainer_free(&t);
    return 0;
}
