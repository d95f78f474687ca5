#include "moesim/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "moesim/record.h"

#define LATEST_FILE "latest_checkpointed_iteration.txt"
/* The run record image (record_resume says why a checkpoint carries it). */
#define RECORD_IMAGE "run_record"
#define PATH_LEN (MOESIM_PATH_MAX + 64)

void checkpoint_path(char *buf, size_t len, const char *dir, long iteration) {
    snprintf(buf, len, "%s/iter_%07ld.h5", dir, iteration);
}

/* The three buffers a tensor has in a checkpoint. */
static const char *const GROUPS[3] = {"params", "adam_m", "adam_v"};

static float *group_buffer(const Model *m, int g) {
    return g == 0 ? m->params : g == 1 ? m->adam_m : m->adam_v;
}

/* One array of a checkpoint: its name, global shape, this rank's rows of the
 * first dimension and where they live, and whether this rank writes them
 * (the ranks of EP group 0 their experts, rank 0 everything else). */
typedef struct Entry {
    char name[96];
    int ndim, writes;
    long dims[3], first, rows;
    float *data;
} Entry;

/* Entry i of the checkpoint's list, which the parameters, then the Adam
 * moments, then the expert biases make: 0 when there is one, -1 past the
 * end. The one description saving and loading both walk. */
static int checkpoint_entry(const Model *m, const Comm *c, int i, Entry *e) {
    memset(e, 0, sizeof *e);
    if (i < 3 * m->num_tensors) {
        const ParamTensor *pt = &m->tensors[i % m->num_tensors];
        int group = i / m->num_tensors;
        snprintf(e->name, sizeof e->name, "%s/%s", GROUPS[group], pt->name);
        e->ndim = pt->ndim;
        for (int d = 0; d < pt->ndim; d++) e->dims[d] = pt->shape[d];
        e->rows = pt->shape[0];
        e->data = group_buffer(m, group) + pt->offset;
        e->writes = c->rank == 0;
        if (pt->is_expert) {
            /* experts by global index: the first EP group writes its shards */
            Placement place = model_placement(&m->shape);
            e->dims[0] = place.num_experts;
            e->first = placement_first_local_expert(&place);
            e->writes = placement_ep_group(place.ep_size, c->rank) == 0;
        }
        return 0;
    }
    for (int l = 0, k = 3 * m->num_tensors; l < m->shape.L; l++) {
        if (!m->expert_bias || !m->expert_bias[l] || k++ != i) continue;
        snprintf(e->name, sizeof e->name, "expert_bias/layers.%d", l);
        e->ndim = 1;
        e->dims[0] = e->rows = m->shape.E;
        e->data = m->expert_bias[l];
        e->writes = c->rank == 0;
        return 0;
    }
    return -1;
}

static int is_adam_moment(const Model *m, int i) {
    return i >= m->num_tensors && i < 3 * m->num_tensors;
}

static int sync_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    int st = fsync(fd);
    close(fd);
    return st;
}

static int write_latest(const char *dir, long iteration) {
    char tmp[PATH_LEN], latest[PATH_LEN];
    snprintf(tmp, sizeof tmp, "%s/." LATEST_FILE ".tmp", dir);
    snprintf(latest, sizeof latest, "%s/" LATEST_FILE, dir);
    FILE *f = fopen(tmp, "w");
    if (!f) return -1;
    int ok = fprintf(f, "%ld\n", iteration) > 0;
    ok = fflush(f) == 0 && fsync(fileno(f)) == 0 && ok;
    ok = fclose(f) == 0 && ok;
    if (ok && rename(tmp, latest) == 0) return sync_path(dir) == 0 ? 0 : -1;
    unlink(tmp);
    return -1;
}

/* The iterations of dir's checkpoint files, newest first; their count. */
static int list_iterations(const char *dir, long *out, int max) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < max) {
        long it;
        char tail[8];
        if (sscanf(e->d_name, "iter_%ld.%7s", &it, tail) == 2 && strcmp(tail, "h5") == 0)
            out[n++] = it;
    }
    closedir(d);
    for (int i = 1; i < n; i++) /* insertion sort, descending */
        for (int j = i; j > 0 && out[j] > out[j - 1]; j--) {
            long tmp = out[j];
            out[j] = out[j - 1];
            out[j - 1] = tmp;
        }
    return n;
}

#define MAX_CHECKPOINTS 4096

static void prune(const char *dir, int keep) {
    if (keep <= 0) return;
    long iterations[MAX_CHECKPOINTS];
    int n = list_iterations(dir, iterations, MAX_CHECKPOINTS);
    for (int i = keep; i < n; i++) {
        char path[PATH_LEN];
        checkpoint_path(path, sizeof path, dir, iterations[i]);
        unlink(path);
    }
}

static int write_state(const Trainer *t, long file) {
    int ok = 1;
    Entry e;
    for (int i = 0; checkpoint_entry(&t->model, t->comm, i, &e) == 0; i++)
        ok = checkpoint_write_f32(file, e.name, e.ndim, e.dims, e.data, e.first, e.rows,
                                  e.writes) == 0 &&
             ok;
    return ok;
}

static long read_latest(const char *dir) {
    char path[PATH_LEN];
    snprintf(path, sizeof path, "%s/" LATEST_FILE, dir);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long it = -1;
    if (fscanf(f, "%ld", &it) != 1) it = -1;
    fclose(f);
    return it;
}

int checkpoint_record_image(const char *path, char **bytes, long *len) {
    return checkpoint_read_bytes(path, RECORD_IMAGE, bytes, len);
}

int checkpoint_latest_file(const char *dir, char *path, size_t len) {
    long latest = read_latest(dir);
    if (latest < 0) return -1;
    checkpoint_path(path, len, dir, latest);
    return 0;
}

/* Bytes a checkpoint file takes at most: its tensors and, per tensor, a
 * generous share of HDF5 metadata. */
static long checkpoint_bytes_bound(const Trainer *t) {
    long bytes = 64L * 1024;
    Entry e;
    for (int i = 0; checkpoint_entry(&t->model, t->comm, i, &e) == 0; i++) {
        long n = 1;
        for (int d = 0; d < e.ndim; d++) n *= e.dims[d];
        bytes += n * (long)sizeof(float) + 4096;
    }
    return bytes;
}

/* Rank 0: whether --save's disk has room for the whole checkpoint. A save
 * that runs out of space fails anyway (its temporary file is removed and
 * the previous checkpoint stays the latest), but only after every rank has
 * written into it and MPI-IO has printed a line per failed write; asked
 * first, the answer is one clear message. */
static int room_for_checkpoint(const Trainer *t, const char *dir, const char *final,
                               long record_len, char *err, size_t errlen) {
    struct statvfs fs;
    if (statvfs(dir, &fs) != 0) return 1;
    long free_bytes = (long)(fs.f_bavail * fs.f_frsize),
         need = checkpoint_bytes_bound(t) + record_len;
    if (free_bytes >= need) return 1;
    long latest = read_latest(dir);
    char kept[64] = "there is no earlier checkpoint";
    if (latest >= 0) snprintf(kept, sizeof kept, "checkpoint %ld stays the latest", latest);
    snprintf(err, errlen,
             "the disk of --save %s is full: %ld kB free where checkpoint %s needs up to %ld kB; "
             "nothing was written and %s. Free space on that disk or choose another --save",
             dir, free_bytes / 1024, final, need / 1024, kept);
    return 0;
}

int checkpoint_save(const Trainer *t, long iteration, const char *record, long record_len,
                    char *err, size_t errlen) {
    const Comm *c = t->comm;
    const char *dir = t->cfg->save;
    char tmp[PATH_LEN], final[PATH_LEN];
    snprintf(tmp, sizeof tmp, "%s/.iter_%07ld.h5.tmp", dir, iteration);
    checkpoint_path(final, sizeof final, dir, iteration);
    comm_broadcast_longs(c, &record_len, 1);
    int room = c->rank != 0 || room_for_checkpoint(t, dir, final, record_len, err, errlen);
    if (comm_first_failed_rank(c, room) >= 0) {
        comm_share_error(c, 0, err, errlen);
        return -1;
    }
    long file = checkpoint_file_create(tmp, c);
    int ok = comm_all_ok(c, file >= 0);
    if (ok) {
        ok = write_state(t, file);
        ok =
            checkpoint_write_bytes(file, RECORD_IMAGE, record, record_len, c->rank == 0) == 0 && ok;
        ok = checkpoint_write_attributes(file, t->cfg, iteration, t->opt.t, c->world_size,
                                         c->ep_size) == 0 &&
             ok;
        ok = checkpoint_file_close(file) == 0 && ok;
    }
    ok = comm_all_ok(c, ok);
    if (c->rank == 0) {
        int renamed = 0;
        if (ok)
            ok = sync_path(tmp) == 0 && (renamed = rename(tmp, final) == 0) && sync_path(dir) == 0;
        if (ok) ok = write_latest(dir, iteration) == 0;
        if (ok) prune(dir, t->cfg->save_keep);
        /* a checkpoint that latest does not name must not look like one */
        if (!ok) unlink(renamed ? final : tmp);
    }
    if (comm_all_ok(c, ok)) return 0;
    /* errno says little here: the failure may have been another rank's, in MPI-IO */
    snprintf(err, errlen,
             "writing checkpoint %s failed, and no file of it was kept; check free disk space "
             "and that --save %s is writable",
             final, dir);
    return -1;
}

static int read_state(Trainer *t, long file, int load_optimizer, char *err, size_t errlen) {
    Entry e;
    for (int i = 0; checkpoint_entry(&t->model, t->comm, i, &e) == 0; i++) {
        if (!load_optimizer && is_adam_moment(&t->model, i)) continue;
        if (checkpoint_read_f32(file, e.name, e.ndim, e.dims, e.data, e.first, e.rows, err,
                                errlen) != 0)
            return -1;
    }
    return 0;
}

/* Every rank loads one checkpoint file; 0 when every rank succeeded. */
static int load_file(Trainer *t, const char *path, int load_optimizer, long *iteration, char *err,
                     size_t errlen) {
    long file = checkpoint_file_open(path);
    int ok = file >= 0;
    long steps = 0;
    if (!ok) snprintf(err, errlen, "it is not a readable HDF5 file (truncated or overwritten?)");
    if (ok && (checkpoint_read_long(file, "iteration", iteration) != 0 ||
               checkpoint_read_long(file, "optimizer_steps", &steps) != 0)) {
        snprintf(err, errlen, "it has no iteration attribute (not a moesim checkpoint?)");
        ok = 0;
    }
    if (ok) ok = read_state(t, file, load_optimizer, err, errlen) == 0;
    if (file >= 0) checkpoint_file_close_read(file);
    if (ok && load_optimizer) t->opt.t = steps;
    int failed = comm_first_failed_rank(t->comm, ok);
    if (failed >= 0) comm_share_error(t->comm, failed, err, errlen);
    return failed < 0 ? 0 : -1;
}

int checkpoint_load(Trainer *t, const char *dir, int load_optimizer, long *iteration, char *loaded,
                    size_t loaded_len, char *err, size_t errlen) {
    long latest = read_latest(dir), candidates[MAX_CHECKPOINTS];
    int n = list_iterations(dir, candidates, MAX_CHECKPOINTS);
    /* every rank must try the same files: rank 0's view decides */
    long view[2] = {latest, n};
    comm_broadcast_longs(t->comm, view, 2);
    latest = view[0];
    n = (int)view[1];
    comm_broadcast_longs(t->comm, candidates, n);
    if (latest < 0) {
        snprintf(err, errlen,
                 "--load %s: no %s there; point --load at a --save directory of an earlier run",
                 dir, LATEST_FILE);
        return -1;
    }
    char first_err[512] = "";
    for (int i = 0; i < n; i++) {
        if (candidates[i] > latest) continue; /* a save that never completed */
        char path[PATH_LEN];
        checkpoint_path(path, sizeof path, dir, candidates[i]);
        if (load_file(t, path, load_optimizer, iteration, err, errlen) == 0) {
            snprintf(loaded, loaded_len, "%s", path);
            if (t->comm->rank == 0 && candidates[i] != latest)
                printf(
                    "moesim: warning: checkpoint %ld in %s cannot be used (%s); resumed from "
                    "checkpoint %ld instead\n",
                    latest, dir, first_err, candidates[i]);
            return 0;
        }
        if (!first_err[0]) snprintf(first_err, sizeof first_err, "%s", err);
        /* a model-shape mismatch is the same in every file: stop at the first */
        if (strstr(err, "shape") || strstr(err, "no tensor")) break;
    }
    snprintf(err, errlen, "--load %s: cannot resume from checkpoint %ld: %s", dir, latest,
             first_err[0] ? first_err : "its file is missing");
    return -1;
}
