/* moesim: command-line entry. `moesim train` trains and records a run;
 * `moesim bench` measures throughput; `moesim info` summarises a record;
 * `moesim platform` shows the BLAS kernel, threads and denormal mode;
 * --help and --version. */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moesim/bf16_gemm.h"
#include "moesim/checkpoint.h"
#include "moesim/comm.h"
#include "moesim/config.h"
#include "moesim/data.h"
#include "moesim/output.h"
#include "moesim/platform.h"
#include "moesim/preempt.h"
#include "moesim/project.h"
#include "moesim/record.h"
#include "moesim/train.h"

#define EXIT_USAGE 2

static void print_usage(void) {
    printf(
        "usage: moesim train [--config FILE.ini] [--key value ...]\n"
        "       moesim bench [--config FILE.ini] [--key value ...]\n"
        "       moesim info RUN.h5 | CHECKPOINT.h5 | SAVE_DIR\n"
        "       moesim calibrate [--config FILE.ini] --out CLUSTER.ini   (under mpirun, 2+ ranks)\n"
        "       moesim platform\n"
        "       moesim project RUN.h5 --cluster CLUSTER.ini --world-size P [--expert-model-parallel-size EP]\n"
        "                      [--ranks-per-node N] [--moe-token-dispatcher-type alltoall|hierarchical]\n"
        "                      [--moe-overlap-chunks K] [--out PRED.h5]\n"
        "       moesim --help | --version\n\n"
        "Trains a decoder-only Mixture-of-Experts transformer and writes an HDF5 run record.\n"
        "Every key below is both a --flag and an INI key (INI files may use '_' or '-').\n"
        "Flags override the config file. A [0|1] switch given alone means 1, as in Megatron\n"
        "(--moe-router-enable-expert-bias). Run under mpirun or srun for several ranks.\n\n");
    config_print_help();
}

/* Every rank parses and validates the same arguments, so every rank reaches
 * the same verdict; rank 0 alone prints it. */
static int load_run_inputs(Config *cfg, Dataset *ds, Comm *comm, int argc, char **argv, char *err,
                           size_t errlen) {
    config_defaults(cfg);
    if (config_parse_args(cfg, argc, argv, err, errlen) != 0) return -1;
    if (config_validate(cfg, err, errlen) != 0) return -1;
    config_resolve(cfg);
    if (config_validate_layout(cfg, comm->world_size, err, errlen) != 0) return -1;
    comm_split_groups(comm, config_ep_size(cfg, comm->world_size));
    comm_split_nodes(comm, cfg->ranks_per_node);
    int ok = dataset_load(ds, cfg, err, errlen) == 0;
    int failed_rank = comm_first_failed_rank(comm, ok);
    if (failed_rank >= 0) {
        comm_share_error(comm, failed_rank, err, errlen);
        if (ok) dataset_free(ds);
        return -1;
    }
    return 0;
}

/* A kernel the user forced that cannot run is bad input like a wrong flag:
 * every rank stops with the first failing rank's reason. */
static int platform_usable(const Platform *platform, const Comm *comm, char *err, size_t errlen) {
    int failed_rank = comm_first_failed_rank(comm, platform->error[0] == '\0');
    if (failed_rank < 0) return 1;
    snprintf(err, errlen, "%s", platform->error);
    comm_share_error(comm, failed_rank, err, errlen);
    return 0;
}

/* More compute threads than cores make the ranks slow each other: say so
 * once per node. */
static void warn_if_cores_oversubscribed(const Platform *platform, const Comm *comm) {
    int ranks_on_node = 1, node_rank = 0;
    comm_node_ranks(comm, &ranks_on_node, &node_rank);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long threads = (long)ranks_on_node * platform->blas_threads;
    if (node_rank == 0 && cores > 0 && threads > cores)
        fprintf(stderr,
                "moesim: warning: %d rank(s) x %d BLAS thread(s) = %ld threads on this node "
                "exceed its %ld cores, so they slow each other; run fewer ranks per node or set "
                "OPENBLAS_NUM_THREADS lower\n",
                ranks_on_node, platform->blas_threads, threads, cores);
}

/* Rank 0, which writes the record, makes its directory, locks it against a
 * second run and refuses to replace an existing record unasked (a resume
 * continues its own record), before anything is written; every rank learns
 * the verdict. */
static int claim_record(const Config *cfg, const Comm *comm, OutputLock *lock, char *err,
                        size_t errlen) {
    int ok = comm->rank != 0 ||
             output_claim(lock, cfg->out, cfg->overwrite || config_continues_record(cfg), err,
                          errlen) == 0;
    int failed_rank = comm_first_failed_rank(comm, ok);
    if (failed_rank < 0) return 0;
    comm_share_error(comm, failed_rank, err, errlen);
    return -1;
}

static int run_subcommand(const char *name, int argc, char **argv, Comm *comm, Platform *platform) {
    Config cfg;
    Dataset ds = {0};
    OutputLock lock = {.fd = -1};
    char err[MOESIM_ERR_MAX] = "";
    int status = 0;
    int is_train = strcmp(name, "train") == 0;
    if (record_require_parallel_hdf5(record_hdf5_is_parallel(), err, sizeof err) != 0 ||
        !platform_usable(platform, comm, err, sizeof err) ||
        load_run_inputs(&cfg, &ds, comm, argc, argv, err, sizeof err) != 0) {
        status = EXIT_USAGE;
    } else if (is_train && claim_record(&cfg, comm, &lock, err, sizeof err) != 0) {
        status = EXIT_USAGE;
        dataset_free(&ds);
    } else {
        platform_set_flush_denormals(platform, cfg.flush_denormals);
        warn_if_cores_oversubscribed(platform, comm);
        int rc = is_train                          ? train_run(&cfg, &ds, comm, platform, err, sizeof err)
                 : strcmp(name, "calibrate") == 0 ? calibrate_run(&cfg, &ds, comm, err, sizeof err)
                                                  : bench_run(&cfg, &ds, comm, platform, err, sizeof err);
        status = rc == 0 ? 0 : rc > 0 ? rc : 1; /* rc > 0: an exit status of its own */
        dataset_free(&ds);
        output_release(&lock);
    }
    if (status != 0 && status != MOESIM_EXIT_INTERRUPTED && comm->rank == 0)
        fprintf(stderr, "moesim: error: %s\n", err);
    return status;
}

/* `moesim info RUN.h5 | CHECKPOINT.h5 | SAVE_DIR`: only rank 0 reads and
 * prints; a --save directory stands for its latest checkpoint. */
static int print_info(int argc, char **argv, const Comm *comm) {
    char err[MOESIM_ERR_MAX] = "", path[MOESIM_PATH_MAX + 64];
    int status = 0;
    struct stat st;
    if (argc != 1) {
        snprintf(err, sizeof err,
                 "moesim info takes one file: moesim info RUN.h5 | CHECKPOINT.h5 | SAVE_DIR");
        status = EXIT_USAGE;
    } else if (comm->rank != 0) {
        return 0;
    } else if (stat(argv[0], &st) == 0 && S_ISDIR(st.st_mode)) {
        if (checkpoint_latest_file(argv[0], path, sizeof path) != 0) {
            snprintf(err, sizeof err,
                     "%s is a directory without a latest_checkpointed_iteration.txt, so not a "
                     "--save directory; give a run record, a checkpoint file or a --save "
                     "directory",
                     argv[0]);
            status = 1;
        }
    } else {
        snprintf(path, sizeof path, "%s", argv[0]);
    }
    if (status == 0 && record_print_info(path, err, sizeof err) != 0) status = 1;
    if (status != 0 && comm->rank == 0) fprintf(stderr, "moesim: error: %s\n", err);
    return status;
}

/* What --bf16-gemm auto would run here, and why not oneDNN when not. */
static void print_bf16_gemm(void) {
    char problem[384];
    Bf16Gemm *gemm = bf16_gemm_create(problem, sizeof problem);
    if (gemm)
        printf("bf16 GEMM (--bf16-gemm auto): %s\n", bf16_gemm_describe(gemm));
    else
        printf("bf16 GEMM (--bf16-gemm auto): emulated (%s)\n", problem);
    bf16_gemm_free(gemm);
}

/* `moesim platform`: the start-up facts, and the kernel verdict as status. */
static int print_platform(Platform *platform, const Comm *comm) {
    /* Show the denormal mode train and bench run in by default. */
    platform_set_flush_denormals(platform, 1);
    if (comm->rank != 0) return platform->error[0] ? 1 : 0;
    char line[512], features[256];
    platform_describe(platform, line, sizeof line);
    cpu_features_describe(&platform->cpu, features, sizeof features);
    printf("platform: %s\n", line);
    printf("cpu features: %s\n", features);
    printf("best kernel for these features: %s\n",
           platform->blas_best[0] ? platform->blas_best : "(SSE kernels only)");
    print_bf16_gemm();
    if (platform->error[0]) fprintf(stderr, "moesim: error: %s\n", platform->error);
    return platform->error[0] ? 1 : 0;
}

int main(int argc, char **argv) {
    /* Before MPI and before any BLAS call: this may restart the process with
     * a better OpenBLAS kernel. */
    Platform platform;
    platform_start(&platform, argv);
    record_library_open();
    Comm comm;
    comm_init(&comm, &argc, &argv);
    int status;
    const char *cmd = argc > 1 ? argv[1] : "";
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        if (comm.rank == 0) print_usage();
        status = 0;
    } else if (strcmp(cmd, "--version") == 0) {
        if (comm.rank == 0)
            printf("moesim %s (run record schema %d)\n", MOESIM_VERSION, MOESIM_SCHEMA_VERSION);
        status = 0;
    } else if (strcmp(cmd, "info") == 0) {
        status = print_info(argc - 2, argv + 2, &comm);
    } else if (strcmp(cmd, "project") == 0) {
        /* a model of other ranks, computed by one process */
        status = comm.rank == 0 ? project_main(argc - 2, argv + 2) : 0;
    } else if (strcmp(cmd, "platform") == 0) {
        status = print_platform(&platform, &comm);
    } else if (strcmp(cmd, "train") == 0 || strcmp(cmd, "bench") == 0 ||
               strcmp(cmd, "calibrate") == 0) {
        status = run_subcommand(cmd, argc - 1, argv + 1, &comm, &platform);
    } else {
        if (comm.rank == 0)
            fprintf(stderr,
                    "moesim: error: unknown command \"%s\"; use \"moesim train\", "
                    "\"moesim bench\", \"moesim info\", \"moesim project\", \"moesim platform\" or "
                    "\"moesim --help\"\n",
                    cmd);
        status = EXIT_USAGE;
    }
    comm_finalize(&comm);
    record_library_close();
    return status;
}
