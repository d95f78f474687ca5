/* output: the run record's place on disk before HDF5 touches it. Its
 * directory is made when missing; an existing record is never replaced
 * unless asked; and an advisory lock keeps a second run off a record that
 * another run is writing. Only the rank that writes the record (rank 0)
 * calls these; no MPI and no HDF5 here.
 *
 * The lock is flock(2) on PATH.lock, not on the record itself: HDF5 1.10
 * flocks the record on its own while it is open (unless
 * HDF5_USE_FILE_LOCKING=FALSE), and it opens the file with O_TRUNC before
 * trying that lock, which is how two runs on one --out used to destroy the
 * first run's record. A separate file is locked before any open of the
 * record, whatever HDF5's locking setting, and the kernel drops the lock
 * when its holder dies (even by SIGKILL), so a stale lock file never blocks
 * a later run. */
#ifndef MOESIM_OUTPUT_H
#define MOESIM_OUTPUT_H

#include <stddef.h>

#include "moesim/config.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct OutputLock {
    int fd; /* -1 when not held */
    char path[MOESIM_PATH_MAX + 8];
} OutputLock;

/* mkdir -p of dir, which came from the flag --key value (named in a
 * message). Returns 0, or -1 with a message naming the directory that could
 * not be made. */
int output_make_dirs(const char *dir, const char *key, const char *value, char *err,
                     size_t errlen);

/* mkdir -p of the directory holding path (--out). Returns 0, or -1 with a message
 * naming the directory that could not be made. */
int output_make_parent_dirs(const char *path, char *err, size_t errlen);

/* Makes path's directory, takes the lock on path.lock (failing at once, not
 * waiting, when another process holds it) and then refuses a non-empty file
 * already at path unless overwrite. On success the lock is held until
 * output_release. Returns 0, or -1 with a message (lock not held). */
int output_claim(OutputLock *lock, const char *path, int overwrite, char *err, size_t errlen);

/* Removes the lock file and drops the lock; a no-op when not held. */
void output_release(OutputLock *lock);

/* 1 when a live process holds the lock of the record at path, 0 when none
 * does (or there is no lock file), without taking it for long. */
int output_is_locked(const char *path);

#ifdef __cplusplus
}
#endif
#endif
