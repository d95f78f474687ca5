/* checkpoint: saving and resuming a run.
 *
 * DIR/iter_NNNNNNN.h5 holds every parameter and both Adam moments under
 * params/, adam_m/, adam_v/ (expert tensors with the global expert index as
 * their first dimension, so any expert-parallel layout reads its share), the
 * DeepSeek expert biases, the optimizer step, the resolved config and the
 * layout it was saved on (world and expert-parallel sizes). Each
 * rank of expert-parallel group 0 writes its own experts and rank 0 the dense
 * replica, through parallel HDF5; nothing is gathered onto one rank.
 *
 * A save is atomic: the file is written under a temporary name, synced and
 * renamed, and only then does DIR/latest_checkpointed_iteration.txt name it,
 * so a crash during a save leaves the previous checkpoint as the latest.
 *
 * Each checkpoint also carries the run record's bytes as they stood at its
 * step (run_record, written by rank 0): a resume restores them over --out,
 * because a run killed mid-flush can leave the record itself damaged
 * (record_resume). */
#ifndef MOESIM_CHECKPOINT_H
#define MOESIM_CHECKPOINT_H

#include <stddef.h>

#include "moesim/train.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Saves the trainer's state after `iteration` steps into cfg->save, with
 * rank 0's record image (record_image; its record_len counts, other ranks'
 * are ignored), and keeps the newest cfg->save_keep. Collective; 0, or -1
 * with err on every rank. */
int checkpoint_save(const Trainer *t, long iteration, const char *record, long record_len,
                    char *err, size_t errlen);

/* Restores parameters, the expert biases and (with load_optimizer) the Adam
 * moments and step from the latest checkpoint in dir; *iteration is its
 * step and `loaded` the file it came from (an earlier one when the latest is
 * damaged). Collective; 0, or -1 with err (the same on every rank). */
int checkpoint_load(Trainer *t, const char *dir, int load_optimizer, long *iteration, char *loaded,
                    size_t loaded_len, char *err, size_t errlen);

/* The record image in the checkpoint at path, into a new buffer: 1, 0 when
 * it has none (an older moesim's), -1 when it cannot be read. No MPI. */
int checkpoint_record_image(const char *path, char **bytes, long *len);

/* The path of iteration's checkpoint in dir. */
void checkpoint_path(char *buf, size_t len, const char *dir, long iteration);

/* The path of the checkpoint dir's latest_checkpointed_iteration.txt names;
 * 0, or -1 when it names none. No MPI. */
int checkpoint_latest_file(const char *dir, char *path, size_t len);

#ifdef __cplusplus
}
#endif
#endif
