/* record: the HDF5 run record. Rank 0 writes alone (statistics are reduced to
 * it first), so no collective HDF5 call can hang a run. Time series are
 * extendible chunked datasets appended per logged step and flushed, so a run
 * that dies keeps everything up to its last flush. The root attribute
 * `status` reads "running" until the run completes ("complete") or fails
 * ("failed"). Also: a small tensor-file API for exporting weights. */
#ifndef MOESIM_RECORD_H
#define MOESIM_RECORD_H

#include <stddef.h>

#include "moesim/config.h"
#include "moesim/timing.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOESIM_VERSION "0.1.0"
#define MOESIM_SCHEMA_VERSION 1

typedef struct TrainRow {
    long step;
    double loss, aux_loss, z_loss, lr, grad_norm, tokens_per_s;
} TrainRow;

/* What the record needs to know about the run's shape. */
typedef struct RecordLayout {
    int world_size, ep_size, moe_layers, experts;
    const long *param_bytes_per_rank; /* [world_size] */
    long total_params;                /* every expert counted once */
} RecordLayout;

/* Statistics of one logged step beyond the scalars, all gathered on rank 0. */
typedef struct StepDetail {
    const long *tokens_per_expert;  /* [moe_layers * experts] */
    const long *dropped_per_expert; /* [moe_layers * experts] */
    const double *phase_s;          /* [world_size * PHASE_COUNT], rank-major */
    const long *dispatch_bytes;     /* [world_size * world_size], sender-major */
} StepDetail;

typedef struct Record {
    long file; /* hid_t, kept opaque so users of this header need no HDF5 */
    long train_step, train_loss, train_aux, train_z, train_lr, train_grad_norm, train_tps;
    long eval_step, eval_loss;
    long tokens_per_expert, dropped_per_expert;
    long timing[PHASE_COUNT];
    long dispatch_bytes;
    long train_rows, eval_rows;
    int world_size;
    double *timing_row; /* [world_size] scratch */
} Record;

/* Starts the HDF5 library before MPI_Init, with no shutdown hooks: HDF5 1.10
 * otherwise closes leftover files inside MPI_Finalize, and a file whose
 * close already failed (disk full) crashes it there. */
void record_library_open(void);
/* Shuts HDF5 down unless a file is still open because its close failed. */
void record_library_close(void);

/* Creates the file (truncating), writes the root attributes and creates every
 * dataset. Returns 0, or -1 with a message naming the path. */
int record_open(Record *r, const char *path, const Config *cfg, const RecordLayout *layout,
                char *err, size_t errlen);
int record_append_train(Record *r, const TrainRow *row, const StepDetail *detail);
int record_append_eval(Record *r, long step, double loss);
int record_flush(Record *r);
/* Sets status to "complete" (complete=1) or "failed" and closes. */
int record_close(Record *r, int complete);

/* Tensor files: flat float32/int32 datasets by name, for reference exports. */
long tensor_file_create(const char *path);
int tensor_file_write_f32(long file, const char *name, const float *data, int ndim,
                          const long *dims);
int tensor_file_write_i32(long file, const char *name, const int *data, int ndim, const long *dims);
int tensor_file_write_scalar(long file, const char *name, double value);
int tensor_file_close(long file);

#ifdef __cplusplus
}
#endif
#endif
