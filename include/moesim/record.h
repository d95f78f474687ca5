/* record: the HDF5 run record (schema in docs/run-record.md). Rank 0 writes
 * alone: statistics are reduced to it first, so no collective HDF5 call can
 * hang a run. Rows are buffered in memory and appended to extendible chunked
 * datasets at each flush, so between flushes the file is not touched and a
 * killed run keeps everything up to its last flush. Also `moesim info` and a
 * small tensor-file API for exporting weights. All HDF5 lives in this module. */
#ifndef MOESIM_RECORD_H
#define MOESIM_RECORD_H

#include <stddef.h>

#include "moesim/comm.h"
#include "moesim/config.h"
#include "moesim/platform.h"
#include "moesim/project.h"
#include "moesim/timing.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOESIM_VERSION "0.1.0"
#define MOESIM_SCHEMA_VERSION 10
/* Disk space set aside beside the record (PATH.reserve) for its final
 * status when the disk fills up. */
#define RECORD_RESERVE_BYTES (256L * 1024)

/* What the record needs to know about the run's shape. */
typedef struct RecordLayout {
    int world_size, ep_size, moe_layers, experts, top_k;
    int routing_groups; /* in the global batch: rows of /routing/group_expert_counts */
    int vocab_size;
    int num_categories;
    char *const *category_names; /* [num_categories] */
    const char *hostnames;       /* [world_size][hostname_len], NUL-padded */
    int hostname_len;
    const long *param_bytes_per_rank; /* [world_size] */
    int num_nodes;                    /* nodes of the run (Comm.num_nodes) */
    const long *node_of_rank;         /* [world_size] node of each rank, 0 .. num_nodes-1 */
    long params_total;                /* every expert counted once */
    long params_active_per_token;     /* dense + top_k experts per MoE layer */
    const Platform *platform;         /* rank 0's BLAS, threads, denormals; NULL = unknown */
    const char *bf16_gemm;            /* rank 0's matmul_bf16_gemm; NULL = "none" */
} RecordLayout;

typedef struct TrainRow {
    long step;
    double loss, aux_loss, z_loss, importance_loss, load_loss, lr, grad_norm, tokens_per_s;
    double step_time_s;
} TrainRow;

/* Statistics of one logged step beyond the scalars, all summed or gathered
 * on rank 0. L = MoE layers, E = experts, P = ranks. */
typedef struct StepDetail {
    const long *tokens_per_expert;  /* [L*E] router demand */
    const long *dropped_per_expert; /* [L*E] */
    const double *importance;       /* [L*E] sum of combine gates */
    const double *mean_prob;        /* [L*E] mean router probability */
    const double *entropy;          /* [L] mean router entropy, nats */
    const double *aux_loss;         /* [L] */
    const double *z_loss;           /* [L] */
    const double *importance_loss;  /* [L] */
    const double *load_loss;        /* [L] */
    const double *mean_abs_logit;   /* [L] mean |router logit| */
    const double *logsumexp_sq;     /* [L] mean logsumexp^2 of the router scores */
    const double *expert_bias;      /* [L*E] DeepSeek-V3 selection bias, zero without it */
    const double *phase_s;          /* [P*PHASE_COUNT], rank-major */
    const long *dispatch_bytes;     /* [P*P], sender-major */
    const double *comm_times;       /* [P*COMM_TIMES_COUNT], rank-major (timing.h) */
    const long *internode_bytes;    /* [nodes*nodes], sender-major */
    const long *shadowed_rows;      /* [L] rows computed by their source rank */
} StepDetail;

typedef struct EvalRow {
    long step;
    double loss;
    const long *specialization; /* [L*E*categories] assignments by expert and category */
} EvalRow;

typedef struct Record Record; /* opaque: its HDF5 handles stay in record.c */

/* Starts the HDF5 library before MPI_Init, with no shutdown hooks: HDF5 1.10
 * otherwise closes leftover files inside MPI_Finalize, and a file whose
 * close already failed (disk full) crashes it there. */
void record_library_open(void);
/* Shuts HDF5 down unless a file is still open because its close failed. */
void record_library_close(void);

/* Creates the file (truncating), writes the root attributes and creates every
 * dataset, status "running", and sets aside the disk reserve (PATH.reserve,
 * RECORD_RESERVE_BYTES) that lets a run stopped by a full disk still write
 * its final status. Returns NULL with a message naming the path. */
Record *record_open(const char *path, const Config *cfg, const RecordLayout *layout, char *err,
                    size_t errlen);
/* Reopens the record of a run resumed after `iteration` steps: rows of
 * later steps are dropped (they will be recomputed), a /resumes row notes
 * the restart and its layout, and appending continues. With the record
 * image of the checkpoint it resumes from (record_image), that image first
 * replaces whatever the stopped run left at path (a SIGKILL mid-flush can
 * leave it damaged); a file there that HDF5 cannot open is kept as
 * PATH.damaged. Without an image (a checkpoint of an older moesim) the file
 * at path is continued in place. NULL with err when path holds another run's
 * record or a schema this moesim does not write; nothing is touched then.
 * Rank 0 only. */
Record *record_resume(const char *path, const RecordLayout *layout, long iteration,
                      const char *image, long image_len, char *err, size_t errlen);
/* The record file's bytes as they are on disk (right after record_flush,
 * a whole readable HDF5 file), into a new buffer. 0, or -1. */
int record_image(const Record *r, char **bytes, long *len);
/* Buffer one row (no I/O). Return 0, or -1 when memory runs out. */
int record_append_train(Record *r, const TrainRow *row, const StepDetail *detail);
int record_append_eval(Record *r, const EvalRow *row);
/* One row of /routing/group_expert_counts and /routing/group_expert_drops
 * after `step` steps: kept and dropped assignments [L][routing_groups][E],
 * groups in global order. */
int record_append_group_counts(Record *r, long step, const long *counts, const long *drops);
/* Appends every buffered row, flushes, and only then sets steps_done and
 * the heartbeat (last_write_time). Nothing is written when the disk lacks
 * room for the rows (a failed HDF5 write can leave rows that read back as
 * zeros, so it must not be tried). Returns 0, or -1 with a message naming
 * the record and the fix; after a failure the record takes no more rows and
 * record_close marks it failed. */
int record_flush(Record *r, long steps_done, char *err, size_t errlen);
/* How a run ended, as the record's status attribute says it. */
typedef enum RecordStatus {
    RECORD_COMPLETE, /* "complete": every step ran */
    RECORD_FAILED,   /* "failed": an error stopped it */
    RECORD_DIVERGED, /* "diverged": a non-finite loss or gradient stopped it */
    RECORD_INTERRUPTED, /* "interrupted": a signal stopped it at a step boundary */
} RecordStatus;
const char *record_status_name(RecordStatus status);

/* Flushes (unless a flush already failed), removes the disk reserve, sets
 * status (a record whose flush failed becomes "failed"), the failure
 * attribute of a failed or diverged run (reason, may be err; else the
 * flush's own message), end_time, and closes; frees r. Returns 0, or -1
 * with a message in err if any of it failed. */
int record_close(Record *r, RecordStatus status, long steps_done, const char *reason, char *err,
                 size_t errlen);

/* 1 when the HDF5 this binary was compiled against has parallel (MPI-IO)
 * support (H5_HAVE_PARALLEL). */
int record_hdf5_is_parallel(void);
/* 0 for a parallel HDF5; otherwise -1 with a message naming the HDF5 and the
 * fix in err. */
int record_require_parallel_hdf5(int is_parallel, char *err, size_t errlen);

/* `moesim info`: a human summary of a run record or of a checkpoint file
 * (told apart by their attributes) on stdout, printed only after every
 * dataset and attribute has been read back. A running record is said to be
 * live or to have stopped without finishing (its lock, its heartbeat).
 * Returns 0, or -1 with a message (missing file, not HDF5, not a moesim
 * file, newer schema, corrupt: something in it cannot be read). */
int record_print_info(const char *path, char *err, size_t errlen);

/* Tensor files: flat float32/float64/int32 datasets by name, for reference exports. */
long tensor_file_create(const char *path);
int tensor_file_write_f32(long file, const char *name, const float *data, int ndim,
                          const long *dims);
int tensor_file_write_i32(long file, const char *name, const int *data, int ndim, const long *dims);
int tensor_file_write_f64(long file, const char *name, const double *data, int ndim,
                          const long *dims);
int tensor_file_write_scalar(long file, const char *name, double value);
int tensor_file_close(long file);

/* Checkpoint files (checkpoint.c decides what goes in them). Written with
 * parallel HDF5: create, every write call and close are collective over the
 * world, and each rank writes only its rows [first_row, first_row + rows) of
 * a tensor's first dimension when `writes`. Read by every rank on its own. */
#define MOESIM_CHECKPOINT_SCHEMA 1
long checkpoint_file_create(const char *path, const Comm *comm);
int checkpoint_write_f32(long file, const char *name, int ndim, const long *dims, const float *data,
                         long first_row, long rows, int writes);
/* The run's configuration, versions, iteration and optimizer step, and the
 * layout it was saved on (world and expert-parallel sizes). */
int checkpoint_write_attributes(long file, const Config *cfg, long iteration, long optimizer_steps,
                                int world_size, int ep_size);
/* A 1-D byte dataset of len bytes (every rank the same len), written by the
 * ranks with `writes`. */
int checkpoint_write_bytes(long file, const char *name, const char *data, long len, int writes);
/* The byte dataset `name` of the checkpoint at path into a new buffer:
 * 1, 0 when it has none, -1 when it cannot be read. No MPI. */
int checkpoint_read_bytes(const char *path, const char *name, char **data, long *len);
int checkpoint_file_close(long file);
long checkpoint_file_open(const char *path);
int checkpoint_read_long(long file, const char *name, long *value);
/* Rows [first_row, first_row + rows) of tensor `name`, whose shape must be
 * dims; else -1 with err saying what differs ("its tensor X has shape ..."). */
int checkpoint_read_f32(long file, const char *name, int ndim, const long *dims, float *data,
                        long first_row, long rows, char *err, size_t errlen);
int checkpoint_file_close_read(long file);

/* `moesim project`: what the replay needs from a run record (schema 8 or
 * later, with /routing/group_expert_counts), and its output file. -1 with a
 * message naming the file and the fix. */
int record_read_projection(const char *path, ProjectRecord *in, char *err, size_t errlen);
int record_write_projection(const char *path, const ProjectOutput *out, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
