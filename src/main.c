/* moesim: command-line entry. `moesim train` trains and records a run;
 * `moesim bench` measures throughput; `moesim info` summarises a record;
 * --help and --version. */
#include <stdio.h>
#include <string.h>

#include "moesim/comm.h"
#include "moesim/config.h"
#include "moesim/data.h"
#include "moesim/record.h"
#include "moesim/train.h"

#define EXIT_USAGE 2

static void print_usage(void) {
    printf(
        "usage: moesim train [--config FILE.ini] [--key value ...]\n"
        "       moesim bench [--config FILE.ini] [--key value ...]\n"
        "       moesim info RUN.h5\n"
        "       moesim --help | --version\n\n"
        "Trains a decoder-only Mixture-of-Experts transformer and writes an HDF5 run record.\n"
        "Every key below is both a --flag and an INI key (INI files may use '_' or '-').\n"
        "Flags override the config file. Run under mpirun or srun for several ranks.\n\n");
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
    int ok = dataset_load(ds, cfg, err, errlen) == 0;
    int failed_rank = comm_first_failed_rank(comm, ok);
    if (failed_rank >= 0) {
        comm_share_error(comm, failed_rank, err, errlen);
        if (ok) dataset_free(ds);
        return -1;
    }
    return 0;
}

static int run_subcommand(const char *name, int argc, char **argv, Comm *comm) {
    Config cfg;
    Dataset ds = {0};
    char err[MOESIM_ERR_MAX] = "";
    int status = 0;
    if (load_run_inputs(&cfg, &ds, comm, argc, argv, err, sizeof err) != 0) {
        status = EXIT_USAGE;
    } else {
        int rc = strcmp(name, "train") == 0 ? train_run(&cfg, &ds, comm, err, sizeof err)
                                            : bench_run(&cfg, &ds, comm, err, sizeof err);
        status = rc == 0 ? 0 : 1;
        dataset_free(&ds);
    }
    if (status != 0 && comm->rank == 0) fprintf(stderr, "moesim: error: %s\n", err);
    return status;
}

/* `moesim info RUN.h5`: only rank 0 reads and prints. */
static int print_info(int argc, char **argv, const Comm *comm) {
    char err[MOESIM_ERR_MAX] = "";
    int status = 0;
    if (argc != 1) {
        snprintf(err, sizeof err, "moesim info takes one run record: moesim info RUN.h5");
        status = EXIT_USAGE;
    } else if (comm->rank == 0 && record_print_info(argv[0], err, sizeof err) != 0) {
        status = 1;
    }
    if (status != 0 && comm->rank == 0) fprintf(stderr, "moesim: error: %s\n", err);
    return status;
}

int main(int argc, char **argv) {
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
    } else if (strcmp(cmd, "train") == 0 || strcmp(cmd, "bench") == 0) {
        status = run_subcommand(cmd, argc - 1, argv + 1, &comm);
    } else {
        if (comm.rank == 0)
            fprintf(stderr,
                    "moesim: error: unknown command \"%s\"; use \"moesim train\", "
                    "\"moesim bench\", \"moesim info\" or \"moesim --help\"\n",
                    cmd);
        status = EXIT_USAGE;
    }
    comm_finalize(&comm);
    record_library_close();
    return status;
}
