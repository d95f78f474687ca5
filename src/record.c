#include "moesim/record.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "moesim/output.h"

#ifndef MOESIM_GIT_REVISION
#define MOESIM_GIT_REVISION "unknown"
#endif

#define CHUNK_BYTES (64 * 1024)
/* A failure message: a path and its explanation. */
#define FAILURE_MAX (MOESIM_PATH_MAX + MOESIM_ERR_MAX)
/* `moesim info` reads nothing schemas 4 and 5 added, so older records summarise too. */
#define OLDEST_READABLE_SCHEMA 3
/* Ends every "is corrupt" message of `moesim info`. */
#define CORRUPT_ADVICE                                                                    \
    "(cut short by a crash or a full disk, or written by two runs at once?); nothing in " \
    "it can be trusted, so re-run it"

/* ---- attributes ------------------------------------------------------------ */

/* Variable-length UTF-8, so h5py hands Python users a str, not bytes. */
static hid_t utf8_string_type(void) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    return type;
}

static int write_attr(hid_t loc, const char *name, hid_t type, hid_t space, const void *data) {
    if (H5Aexists(loc, name) > 0 && H5Adelete(loc, name) < 0) return -1;
    hid_t attr = H5Acreate2(loc, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = attr < 0 ? -1 : H5Awrite(attr, type, data);
    if (attr >= 0) H5Aclose(attr);
    return st < 0 ? -1 : 0;
}

static int set_string_attr(hid_t loc, const char *name, const char *value) {
    hid_t type = utf8_string_type(), space = H5Screate(H5S_SCALAR);
    int st = write_attr(loc, name, type, space, &value);
    H5Sclose(space);
    H5Tclose(type);
    return st;
}

static int set_string_array_attr(hid_t loc, const char *name, const char *const *values, int n) {
    hsize_t dims[1] = {(hsize_t)n};
    hid_t type = utf8_string_type(), space = H5Screate_simple(1, dims, NULL);
    int st = write_attr(loc, name, type, space, values);
    H5Sclose(space);
    H5Tclose(type);
    return st;
}

static int set_long_attr(hid_t loc, const char *name, long value) {
    hid_t space = H5Screate(H5S_SCALAR);
    int st = write_attr(loc, name, H5T_NATIVE_LONG, space, &value);
    H5Sclose(space);
    return st;
}

static int set_double_attr(hid_t loc, const char *name, double value) {
    hid_t space = H5Screate(H5S_SCALAR);
    int st = write_attr(loc, name, H5T_NATIVE_DOUBLE, space, &value);
    H5Sclose(space);
    return st;
}

static int set_long_array_attr(hid_t loc, const char *name, const long *values, int n) {
    hsize_t dims[1] = {(hsize_t)n};
    hid_t space = H5Screate_simple(1, dims, NULL);
    int st = write_attr(loc, name, H5T_NATIVE_LONG, space, values);
    H5Sclose(space);
    return st;
}

static void iso8601_now(char *buf, size_t len) {
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static double unix_time_s(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

/* ---- buffered time series --------------------------------------------------- */

/* One extendible dataset [rows, tail...] with rows buffered until a flush. */
typedef struct Series {
    hid_t dset;
    hid_t mem_type;
    int tail_ndim;
    hsize_t tail[3]; /* this run's row shape; a resumed record's may be larger */
    size_t row_bytes;
    char *buffer;
    long buffered, capacity, written;
    long chunk_rows;       /* rows of one chunk */
    long chunks_per_block; /* chunks side by side across a row's shape */
    size_t chunk_bytes;    /* of one chunk on disk */
} Series;

enum SeriesId {
    TRAIN_STEP,
    TRAIN_LOSS,
    TRAIN_AUX,
    TRAIN_Z,
    TRAIN_IMPORTANCE,
    TRAIN_LOAD,
    TRAIN_LR,
    TRAIN_GRAD_NORM,
    TRAIN_TOKENS_PER_S,
    TRAIN_STEP_TIME,
    ROUTING_TOKENS,
    ROUTING_PROCESSED,
    ROUTING_DROPPED,
    ROUTING_IMPORTANCE,
    ROUTING_MEAN_PROB,
    ROUTING_EXPERT_BIAS,
    ROUTING_ENTROPY,
    ROUTING_LOAD_CV,
    ROUTING_MAX_OVER_MEAN,
    ROUTING_UNUSED,
    ROUTING_AUX,
    ROUTING_Z,
    ROUTING_IMPORTANCE_LOSS,
    ROUTING_LOAD_LOSS,
    ROUTING_MEAN_ABS_LOGIT,
    ROUTING_LOGSUMEXP_SQ,
    TRAFFIC_DISPATCH,
    TRAFFIC_INTERNODE,
    TRAFFIC_SHADOWED_ROWS,
    EVAL_STEP,
    EVAL_LOSS,
    SPEC_STEP,
    SPEC_COUNTS,
    SPEC_MUTUAL_INFORMATION,
    GROUP_COUNTS_STEP,
    GROUP_COUNTS,
    GROUP_DROPS,
    TIMING_FIRST,
    COMM_TIMING_FIRST = TIMING_FIRST + PHASE_COUNT,
    SERIES_COUNT = COMM_TIMING_FIRST + COMM_TIMES_COUNT
};

/* The shape that follows the row dimension. */
enum Tail {
    TAIL_NONE,
    TAIL_LAYER,
    TAIL_LAYER_EXPERT,
    TAIL_RANK,
    TAIL_RANK_RANK,
    TAIL_NODE_NODE,
    TAIL_SPEC,
    TAIL_LAYER_GROUP_EXPERT /* int32 and gzip in the file: the largest rows by far */
};

/* Dimensions set by the layout, which a resume may change (series_create). */
static int tail_grows(enum Tail tail) {
    return tail == TAIL_RANK || tail == TAIL_RANK_RANK || tail == TAIL_NODE_NODE;
}

typedef struct SeriesSpec {
    enum SeriesId id;
    const char *path;
    int is_long; /* int64, else float64 */
    enum Tail tail;
    const char *units;
} SeriesSpec;

static const SeriesSpec SERIES[] = {
    {TRAIN_STEP, "/train/step", 1, TAIL_NONE, "step"},
    {TRAIN_LOSS, "/train/loss", 0, TAIL_NONE, "nats/token"},
    {TRAIN_AUX, "/train/aux_loss", 0, TAIL_NONE, "loss"},
    {TRAIN_Z, "/train/z_loss", 0, TAIL_NONE, "loss"},
    {TRAIN_IMPORTANCE, "/train/importance_loss", 0, TAIL_NONE, "loss"},
    {TRAIN_LOAD, "/train/load_loss", 0, TAIL_NONE, "loss"},
    {TRAIN_LR, "/train/lr", 0, TAIL_NONE, "1"},
    {TRAIN_GRAD_NORM, "/train/grad_norm", 0, TAIL_NONE, "1"},
    {TRAIN_TOKENS_PER_S, "/train/tokens_per_s", 0, TAIL_NONE, "tokens/s"},
    {TRAIN_STEP_TIME, "/train/step_time_s", 0, TAIL_NONE, "s"},
    {ROUTING_TOKENS, "/routing/tokens_per_expert", 1, TAIL_LAYER_EXPERT, "assignments"},
    {ROUTING_PROCESSED, "/routing/processed_per_expert", 1, TAIL_LAYER_EXPERT, "assignments"},
    {ROUTING_DROPPED, "/routing/dropped_per_expert", 1, TAIL_LAYER_EXPERT, "assignments"},
    {ROUTING_IMPORTANCE, "/routing/importance", 0, TAIL_LAYER_EXPERT, "1"},
    {ROUTING_MEAN_PROB, "/routing/mean_prob", 0, TAIL_LAYER_EXPERT, "1"},
    {ROUTING_EXPERT_BIAS, "/routing/expert_bias", 0, TAIL_LAYER_EXPERT, "1"},
    {ROUTING_ENTROPY, "/routing/entropy", 0, TAIL_LAYER, "nats"},
    {ROUTING_LOAD_CV, "/routing/load_cv", 0, TAIL_LAYER, "1"},
    {ROUTING_MAX_OVER_MEAN, "/routing/max_over_mean_load", 0, TAIL_LAYER, "1"},
    {ROUTING_UNUSED, "/routing/unused_experts", 1, TAIL_LAYER, "experts"},
    {ROUTING_AUX, "/routing/aux_loss", 0, TAIL_LAYER, "loss"},
    {ROUTING_Z, "/routing/z_loss", 0, TAIL_LAYER, "loss"},
    {ROUTING_IMPORTANCE_LOSS, "/routing/importance_loss", 0, TAIL_LAYER, "loss"},
    {ROUTING_LOAD_LOSS, "/routing/load_loss", 0, TAIL_LAYER, "loss"},
    {ROUTING_MEAN_ABS_LOGIT, "/routing/mean_abs_logit", 0, TAIL_LAYER, "1"},
    {ROUTING_LOGSUMEXP_SQ, "/routing/logsumexp_sq", 0, TAIL_LAYER, "1"},
    {TRAFFIC_DISPATCH, "/traffic/dispatch_bytes", 1, TAIL_RANK_RANK, "bytes"},
    {TRAFFIC_INTERNODE, "/traffic/internode_bytes", 1, TAIL_NODE_NODE, "bytes"},
    {TRAFFIC_SHADOWED_ROWS, "/traffic/shadowed_rows", 1, TAIL_LAYER, "rows"},
    {EVAL_STEP, "/eval/step", 1, TAIL_NONE, "step"},
    {EVAL_LOSS, "/eval/loss", 0, TAIL_NONE, "nats/token"},
    {SPEC_STEP, "/specialization/step", 1, TAIL_NONE, "step"},
    {SPEC_COUNTS, "/specialization/counts", 1, TAIL_SPEC, "assignments"},
    {SPEC_MUTUAL_INFORMATION, "/specialization/mutual_information", 0, TAIL_LAYER, "bits"},
    {GROUP_COUNTS_STEP, "/routing/group_counts_step", 1, TAIL_NONE, "step"},
    {GROUP_COUNTS, "/routing/group_expert_counts", 1, TAIL_LAYER_GROUP_EXPERT, "assignments"},
    {GROUP_DROPS, "/routing/group_expert_drops", 1, TAIL_LAYER_GROUP_EXPERT, "assignments"},
};

struct Record {
    hid_t file;
    Series series[SERIES_COUNT];
    RecordLayout layout;
    char path[MOESIM_PATH_MAX];
    char reserve_path[MOESIM_PATH_MAX + 16]; /* empty when none is held */
    long steps_on_disk;                      /* steps_done of the last good flush */
    double last_write_s;                     /* unix time of the last good flush */
    int failed;                              /* a flush failed: nothing more is appended */
    char failure[FAILURE_MAX];
    /* derived-statistics scratch */
    long *processed;      /* [L*E] */
    double *per_layer;    /* [2*L] */
    long *per_layer_long; /* [L] */
    double *timing_row;   /* [P] */
};

/* The per-rank float series of /timing: the phases, then the communication
 * times (/timing/comm/...). */
static int timing_series_count(void) {
    return PHASE_COUNT + COMM_TIMES_COUNT;
}

static void timing_series_path(int i, char *path, size_t len) {
    if (i < PHASE_COUNT)
        snprintf(path, len, "/timing/%s", phase_names[i]);
    else
        snprintf(path, len, "/timing/comm/%s", comm_times_names[i - PHASE_COUNT]);
}

static int tail_dims(const RecordLayout *lay, enum Tail tail, hsize_t *dims) {
    switch (tail) {
        case TAIL_NONE:
            return 0;
        case TAIL_LAYER:
            dims[0] = (hsize_t)lay->moe_layers;
            return 1;
        case TAIL_LAYER_EXPERT:
            dims[0] = (hsize_t)lay->moe_layers;
            dims[1] = (hsize_t)lay->experts;
            return 2;
        case TAIL_RANK:
            dims[0] = (hsize_t)lay->world_size;
            return 1;
        case TAIL_RANK_RANK:
            dims[0] = dims[1] = (hsize_t)lay->world_size;
            return 2;
        case TAIL_NODE_NODE:
            dims[0] = dims[1] = (hsize_t)lay->num_nodes;
            return 2;
        case TAIL_SPEC:
            dims[0] = (hsize_t)lay->moe_layers;
            dims[1] = (hsize_t)lay->experts;
            dims[2] = (hsize_t)lay->num_categories;
            return 3;
        case TAIL_LAYER_GROUP_EXPERT:
            dims[0] = (hsize_t)lay->moe_layers;
            dims[1] = (hsize_t)lay->routing_groups;
            dims[2] = (hsize_t)lay->experts;
            return 3;
    }
    return 0;
}

/* The chunk shape of s->dset, for the bound on what a flush allocates. */
static int series_chunk_geometry(Series *s) {
    hid_t dcpl = H5Dget_create_plist(s->dset), space = H5Dget_space(s->dset);
    hsize_t chunk[4] = {0}, dims[4] = {0};
    int ndim = dcpl >= 0 ? H5Pget_chunk(dcpl, 4, chunk) : -1;
    int dims_ndim = space >= 0 ? H5Sget_simple_extent_dims(space, dims, NULL) : -1;
    if (dcpl >= 0) H5Pclose(dcpl);
    if (space >= 0) H5Sclose(space);
    if (ndim < 1 || ndim != dims_ndim) return -1;
    s->chunk_rows = (long)chunk[0];
    s->chunks_per_block = 1;
    s->chunk_bytes = 8 * chunk[0];
    for (int i = 1; i < ndim; i++) {
        hsize_t extent =
            i - 1 < s->tail_ndim && s->tail[i - 1] > dims[i] ? s->tail[i - 1] : dims[i];
        s->chunks_per_block *= (long)((extent + chunk[i] - 1) / chunk[i]);
        s->chunk_bytes *= chunk[i];
    }
    return 0;
}

/* Rows of a per-rank series (timing, traffic) have the world size (or the
 * node count) in their shape, which a resume on another layout changes:
 * those dimensions grow
 * without limit, and the cells a smaller layout leaves empty read NaN (0 for
 * integers). */
static int series_create_as(Series *s, hid_t file, const char *path, int is_long,
                            hid_t file_type, int gzip, int tail_ndim, const hsize_t *tail,
                            const char *units, int per_rank) {
    memset(s, 0, sizeof *s);
    s->mem_type = is_long ? H5T_NATIVE_LONG : H5T_NATIVE_DOUBLE;
    s->tail_ndim = tail_ndim;
    hsize_t dims[4] = {0}, maxdims[4] = {H5S_UNLIMITED}, chunk[4];
    size_t row_elems = 1;
    /* A dense model has no MoE layer: its routing rows hold zero values, and
     * a zero-size dimension needs an unlimited maximum to take a chunk. */
    for (int i = 0; i < tail_ndim; i++) {
        s->tail[i] = tail[i];
        dims[i + 1] = tail[i];
        maxdims[i + 1] = tail[i] && !per_rank ? tail[i] : H5S_UNLIMITED;
        chunk[i + 1] = tail[i] ? tail[i] : 1;
        row_elems *= tail[i];
    }
    s->row_bytes = row_elems * 8;
    size_t rows = s->row_bytes ? CHUNK_BYTES / s->row_bytes : 1024;
    chunk[0] = rows < 1 ? 1 : rows > 1024 ? 1024 : rows;
    hid_t space = H5Screate_simple(1 + tail_ndim, dims, maxdims);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1 + tail_ndim, chunk);
    if (gzip) H5Pset_deflate(dcpl, 4);
    double nan = NAN;
    if (per_rank && !is_long) H5Pset_fill_value(dcpl, H5T_NATIVE_DOUBLE, &nan);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    s->dset = H5Dcreate2(file, path, file_type, space, lcpl, dcpl, H5P_DEFAULT);
    int st = s->dset < 0 ? -1 : set_string_attr(s->dset, "units", units);
    if (st == 0) st = series_chunk_geometry(s);
    H5Pclose(lcpl);
    H5Pclose(dcpl);
    H5Sclose(space);
    return st;
}

static int series_create(Series *s, hid_t file, const char *path, int is_long, int tail_ndim,
                         const hsize_t *tail, const char *units, int per_rank) {
    hid_t file_type = is_long ? H5T_STD_I64LE : H5T_IEEE_F64LE;
    return series_create_as(s, file, path, is_long, file_type, 0, tail_ndim, tail, units,
                            per_rank);
}

/* A spec's series; counts per routing group are int32 (a group holds far
 * fewer than 2^31 tokens) and compressed: mostly small repeated numbers. */
static int series_create_spec(Series *s, hid_t file, const SeriesSpec *spec, int tail_ndim,
                              const hsize_t *tail) {
    if (spec->tail == TAIL_LAYER_GROUP_EXPERT)
        return series_create_as(s, file, spec->path, 1, H5T_STD_I32LE, 1, tail_ndim, tail,
                                spec->units, 0);
    return series_create(s, file, spec->path, spec->is_long, tail_ndim, tail, spec->units,
                         tail_grows(spec->tail));
}

/* An existing series of a resumed record: its first keep_rows rows stay,
 * the rest will be written again; rows of this run's shape must fit. */
static int series_reopen(Series *s, hid_t file, const char *path, int is_long, int tail_ndim,
                         const hsize_t *tail, long keep_rows) {
    memset(s, 0, sizeof *s);
    s->mem_type = is_long ? H5T_NATIVE_LONG : H5T_NATIVE_DOUBLE;
    s->tail_ndim = tail_ndim;
    size_t row_elems = 1;
    for (int i = 0; i < tail_ndim; i++) {
        s->tail[i] = tail[i];
        row_elems *= tail[i];
    }
    s->row_bytes = row_elems * 8;
    s->dset = H5Dopen2(file, path, H5P_DEFAULT);
    if (s->dset < 0) return -1;
    hid_t space = H5Dget_space(s->dset);
    hsize_t dims[4], maxdims[4];
    int ndim = H5Sget_simple_extent_dims(space, dims, maxdims);
    H5Sclose(space);
    if (ndim != 1 + tail_ndim || (hsize_t)keep_rows > dims[0]) return -1;
    for (int i = 0; i < tail_ndim; i++) {
        if (tail[i] > maxdims[i + 1]) return -1;
        if (tail[i] > dims[i + 1]) dims[i + 1] = tail[i];
    }
    dims[0] = (hsize_t)keep_rows;
    s->written = keep_rows;
    return H5Dset_extent(s->dset, dims) < 0 ? -1 : series_chunk_geometry(s);
}

static int series_push(Series *s, const void *row) {
    if (s->row_bytes == 0) {
        s->buffered++;
        return 0;
    }
    if (s->buffered == s->capacity) {
        long capacity = s->capacity ? 2 * s->capacity : 16;
        char *grown = realloc(s->buffer, (size_t)capacity * s->row_bytes);
        if (!grown) return -1;
        s->buffer = grown;
        s->capacity = capacity;
    }
    memcpy(s->buffer + (size_t)s->buffered * s->row_bytes, row, s->row_bytes);
    s->buffered++;
    return 0;
}

static int series_flush(Series *s) {
    if (s->buffered == 0) return 0;
    hid_t space = H5Dget_space(s->dset);
    int ndim = H5Sget_simple_extent_ndims(space);
    hsize_t dims[4], start[4] = {0}, count[4];
    H5Sget_simple_extent_dims(space, dims, NULL);
    H5Sclose(space);
    dims[0] = (hsize_t)(s->written + s->buffered);
    for (int i = 0; i < s->tail_ndim; i++)
        if (s->tail[i] > dims[i + 1]) dims[i + 1] = s->tail[i];
    if (H5Dset_extent(s->dset, dims) < 0) return -1;
    if (s->row_bytes == 0) { /* rows without values: the extent is all there is */
        s->written += s->buffered;
        s->buffered = 0;
        return 0;
    }
    space = H5Dget_space(s->dset);
    start[0] = (hsize_t)s->written;
    for (int i = 0; i < ndim; i++) count[i] = i == 0 ? (hsize_t)s->buffered : s->tail[i - 1];
    H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t mem = H5Screate_simple(ndim, count, NULL);
    herr_t st = H5Dwrite(s->dset, s->mem_type, mem, space, H5P_DEFAULT, s->buffer);
    H5Sclose(mem);
    H5Sclose(space);
    if (st < 0) return -1;
    s->written += s->buffered;
    s->buffered = 0;
    return 0;
}

static void series_close(Series *s) {
    if (s->dset > 0) H5Dclose(s->dset);
    free(s->buffer);
    memset(s, 0, sizeof *s);
}

/* ---- opening ---------------------------------------------------------------- */

void record_library_open(void) {
    H5dont_atexit();
    H5open();
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void record_library_close(void) {
    if (H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) == 0) H5close();
}

/* "config.<key>" attributes, '-' written as '_', typed. */
static int write_config_attributes(hid_t file, const Config *cfg) {
    int st = 0;
    for (int i = 0; i < config_entry_count(); i++) {
        ConfigEntry e;
        config_entry(cfg, i, &e);
        char name[96];
        snprintf(name, sizeof name, "config.%s", e.key);
        for (char *c = name; *c; c++)
            if (*c == '-') *c = '_';
        if (e.type == CONFIG_VALUE_INT)
            st |= set_long_attr(file, name, e.int_value);
        else if (e.type == CONFIG_VALUE_DOUBLE)
            st |= set_double_attr(file, name, e.double_value);
        else
            st |= set_string_attr(file, name, e.string_value);
    }
    return st;
}

/* What decides speed without changing the model: the BLAS in use and how it
 * was chosen, its threads, and the denormal mode (rank 0's). */
static int write_platform_attributes(hid_t file, const Platform *p) {
    char line[512], features[256];
    platform_describe(p, line, sizeof line);
    cpu_features_describe(&p->cpu, features, sizeof features);
    int st = set_string_attr(file, "platform", line);
    st |= set_string_attr(file, "blas_library", p->blas_library);
    st |= set_string_attr(file, "blas_kernel", p->blas_kernel);
    st |= set_string_attr(file, "blas_kernel_chosen_by", blas_kernel_source_name(p->kernel_source));
    st |= set_string_attr(file, "blas_kernel_detected", p->blas_detected);
    st |= set_string_attr(file, "blas_kernel_best", p->blas_best);
    st |= set_string_attr(file, "blas_kernel_rejected", p->blas_rejected);
    st |= set_long_attr(file, "blas_threads", p->blas_threads);
    st |= set_string_attr(file, "denormals", p->flush_denormals ? "flushed" : "kept");
    st |= set_string_attr(file, "cpu_features", features);
    return st;
}

/* 64 random bits in hex: what tells this run's record from another's when a
 * resume restores its image over --out (record_resume). */
static void new_run_id(char *buf, size_t len) {
    unsigned long long bits = 0;
    if (getrandom(&bits, sizeof bits, 0) != (ssize_t)sizeof bits)
        bits = (unsigned long long)time(NULL) * 2654435761ULL ^ (unsigned long long)getpid();
    snprintf(buf, len, "%016llx", bits);
}

static int write_root_attributes(hid_t file, const Config *cfg, const RecordLayout *lay) {
    char *ini = config_to_ini(cfg);
    char started[32], run_id[20];
    iso8601_now(started, sizeof started);
    new_run_id(run_id, sizeof run_id);
    const char **hosts = malloc(sizeof(char *) * lay->world_size);
    int st = !ini || !hosts;
    for (int r = 0; hosts && r < lay->world_size; r++)
        hosts[r] = lay->hostnames + (size_t)r * lay->hostname_len;
    st |= set_long_attr(file, "schema_version", MOESIM_SCHEMA_VERSION);
    st |= set_string_attr(file, "moesim_version", MOESIM_VERSION);
    st |= set_string_attr(file, "git_revision", MOESIM_GIT_REVISION);
    st |= set_string_attr(file, "status", "running");
    st |= set_string_attr(file, "start_time", started);
    st |= set_string_attr(file, "run_id", run_id);
    st |= set_string_attr(file, "end_time", "");
    st |= set_string_attr(file, "failure", "");
    st |= set_long_attr(file, "steps_done", 0);
    st |= set_long_attr(file, "world_size", lay->world_size);
    st |= set_long_attr(file, "ep_size", lay->ep_size);
    st |= set_long_attr(file, "seed", cfg->seed);
    if (hosts) st |= set_string_array_attr(file, "hostnames", hosts, lay->world_size);
    st |= set_long_attr(file, "params_total", lay->params_total);
    st |= set_long_attr(file, "vocab_size", lay->vocab_size);
    st |= set_long_attr(file, "params_active_per_token", lay->params_active_per_token);
    st |= set_long_array_attr(file, "param_bytes_per_rank", lay->param_bytes_per_rank,
                              lay->world_size);
    st |= set_long_attr(file, "num_nodes", lay->num_nodes);
    st |= set_long_array_attr(file, "node_of_rank", lay->node_of_rank, lay->world_size);
    st |= set_long_attr(file, "record_flush_interval", cfg->record_flush_interval);
    st |= set_string_attr(file, "config", ini ? ini : "");
    st |= write_config_attributes(file, cfg);
    st |= set_string_array_attr(file, "category_names", (const char *const *)lay->category_names,
                                lay->num_categories);
    if (lay->platform) st |= write_platform_attributes(file, lay->platform);
    st |= set_string_attr(file, "bf16_gemm", lay->bf16_gemm ? lay->bf16_gemm : "none");
    free(hosts);
    free(ini);
    return st;
}

/* ---- the disk reserve ------------------------------------------------------------ *
 * A run stopped by a full disk must still write its final status and reason
 * into the record: that takes a few kilobytes of new metadata, which a full
 * disk does not have. The reserve is a file of RECORD_RESERVE_BYTES beside
 * the record, allocated when the record opens and deleted just before the
 * final attributes are written, so they always find room. posix_fallocate
 * allocates real blocks (tmpfs, ext4, xfs; glibc writes them where the file
 * system cannot). A killed run leaves it behind; the next run on that --out
 * takes it over. */

static int reserve_take(Record *r) {
    snprintf(r->reserve_path, sizeof r->reserve_path, "%s.reserve", r->path);
    int fd = open(r->reserve_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int st = fd < 0 ? errno : posix_fallocate(fd, 0, RECORD_RESERVE_BYTES);
    if (st == 0 && fsync(fd) != 0) st = errno;
    if (fd >= 0) close(fd);
    if (st != 0) {
        if (fd >= 0) unlink(r->reserve_path);
        r->reserve_path[0] = '\0';
        errno = st;
        return -1;
    }
    return 0;
}

static void reserve_release(Record *r) {
    if (r->reserve_path[0]) unlink(r->reserve_path);
    r->reserve_path[0] = '\0';
}

/* The heartbeat: when the record was last written and how long the gap
 * before that write was, so a reader can tell a live run from a dead one. */
static int write_heartbeat(Record *r) {
    double now = unix_time_s();
    int st = set_double_attr(r->file, "last_write_time", now);
    st |= set_double_attr(r->file, "flush_period_s",
                          r->last_write_s > 0 ? now - r->last_write_s : 0.0);
    r->last_write_s = now;
    return st;
}

static void record_free(Record *r) {
    reserve_release(r);
    for (int i = 0; i < SERIES_COUNT; i++) series_close(&r->series[i]);
    if (r->file > 0) H5Fclose(r->file);
    free(r->processed);
    free(r->per_layer);
    free(r->per_layer_long);
    free(r->timing_row);
    free(r);
}

static Record *record_alloc(const char *path, const RecordLayout *layout, char *err,
                            size_t errlen) {
    Record *r = calloc(1, sizeof *r);
    int L = layout->moe_layers > 0 ? layout->moe_layers : 1;
    if (r) {
        r->layout = *layout;
        snprintf(r->path, sizeof r->path, "%s", path);
        r->processed = calloc((size_t)L * layout->experts, sizeof(long));
        r->per_layer = calloc(2 * (size_t)L, sizeof(double));
        r->per_layer_long = calloc((size_t)L, sizeof(long));
        r->timing_row = calloc((size_t)layout->world_size, sizeof(double));
    }
    if (!r || !r->processed || !r->per_layer || !r->per_layer_long || !r->timing_row) {
        snprintf(err, errlen, "out of memory opening the run record %s", path);
        if (r) record_free(r);
        return NULL;
    }
    return r;
}

Record *record_open(const char *path, const Config *cfg, const RecordLayout *layout, char *err,
                    size_t errlen) {
    Record *r = record_alloc(path, layout, err, errlen);
    if (!r) return NULL;
    if (reserve_take(r) != 0) {
        snprintf(err, errlen,
                 "cannot set aside %ld kB beside the run record --out %s (%s): free space on "
                 "that disk or choose another --out",
                 RECORD_RESERVE_BYTES / 1024, path, strerror(errno));
        record_free(r);
        return NULL;
    }
    r->file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (r->file < 0) {
        snprintf(err, errlen,
                 "cannot create the run record --out %s; check that its directory "
                 "exists and is writable",
                 path);
        record_free(r);
        return NULL;
    }
    int st = write_root_attributes(r->file, cfg, layout);
    hsize_t tail[3];
    for (size_t i = 0; i < sizeof SERIES / sizeof SERIES[0]; i++) {
        const SeriesSpec *spec = &SERIES[i];
        int ndim = tail_dims(layout, spec->tail, tail);
        st |= series_create_spec(&r->series[spec->id], r->file, spec, ndim, tail);
    }
    st |=
        set_string_array_attr(r->series[SPEC_COUNTS].dset, "category_names",
                              (const char *const *)layout->category_names, layout->num_categories);
    for (int p = 0; p < timing_series_count(); p++) {
        char name[64];
        timing_series_path(p, name, sizeof name);
        int ndim = tail_dims(layout, TAIL_RANK, tail);
        st |= series_create(&r->series[TIMING_FIRST + p], r->file, name, 0, ndim, tail, "s", 1);
    }
    st |= write_heartbeat(r);
    if (st != 0 || H5Fflush(r->file, H5F_SCOPE_GLOBAL) < 0) {
        snprintf(err, errlen,
                 "cannot write the run record %s (HDF5 error); check free disk "
                 "space and permissions",
                 path);
        record_free(r);
        /* a record cut short before its first step holds nothing to keep */
        unlink(path);
        return NULL;
    }
    return r;
}

static double *read_dataset(hid_t file, const char *path, size_t *n, size_t *rows);

/* Rows of the step dataset at `path` whose step is at most `iteration`. */
static long rows_up_to(hid_t file, const char *path, long iteration) {
    size_t n = 0, rows = 0;
    double *steps = read_dataset(file, path, &n, &rows);
    long keep = 0;
    for (size_t i = 0; i < rows && steps; i++) keep += steps[i] <= (double)iteration;
    free(steps);
    return keep;
}

/* One row of /resumes: when, at which step, on which layout. */
static int append_resume(hid_t file, long iteration, const RecordLayout *layout) {
    const char *paths[4] = {"/resumes/step", "/resumes/world_size", "/resumes/ep_size",
                            "/resumes/unix_time"};
    double values[4] = {(double)iteration, layout->world_size, layout->ep_size, (double)time(NULL)};
    int st = 0;
    for (int i = 0; i < 4; i++) {
        Series s;
        if (H5Lexists(file, paths[i], H5P_DEFAULT) > 0) {
            hid_t d = H5Dopen2(file, paths[i], H5P_DEFAULT);
            hid_t space = H5Dget_space(d);
            hsize_t dims[1];
            H5Sget_simple_extent_dims(space, dims, NULL);
            H5Sclose(space);
            H5Dclose(d);
            st |= series_reopen(&s, file, paths[i], 0, 0, NULL, (long)dims[0]);
        } else {
            st |= series_create(&s, file, paths[i], 0, 0, NULL, i == 3 ? "s" : "1", 0);
        }
        if (s.dset > 0) st |= series_push(&s, &values[i]) | series_flush(&s);
        series_close(&s);
    }
    return st;
}

static long long_attr_or(hid_t loc, const char *name, long fallback);
static void string_attr(hid_t loc, const char *name, char *buf, size_t len);

/* ---- the record image a checkpoint carries ----------------------------------------- *
 * A SIGKILL can land inside an H5Fflush, and HDF5 1.10 writes metadata in no
 * crash-safe order: the record left behind may claim an end of file it never
 * reached (it does not open), or index chunks that were never written (it
 * opens, and a resume that appends to it fails at its first flush; seen once
 * in 36 killed runs under load). So each checkpoint carries the record's bytes
 * as they stood when its step was flushed, and a resume restores that image
 * over --out instead of trusting what the killed run left there. */

int record_image(const Record *r, char **bytes, long *len) {
    *bytes = NULL;
    *len = 0;
    FILE *f = fopen(r->path, "rb");
    if (!f) return -1;
    long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    char *buf = size > 0 ? malloc((size_t)size) : NULL;
    int ok = buf && fseek(f, 0, SEEK_SET) == 0 && fread(buf, 1, (size_t)size, f) == (size_t)size;
    fclose(f);
    if (!ok) {
        free(buf);
        return -1;
    }
    *bytes = buf;
    *len = size;
    return 0;
}

/* Which run a record belongs to: its run_id and start time. */
static void record_identity(hid_t file, char *buf, size_t len) {
    char id[32], started[32];
    string_attr(file, "run_id", id, sizeof id);
    string_attr(file, "start_time", started, sizeof started);
    snprintf(buf, len, "%s started %s", id, started);
}

static int schema_mismatch(const char *path, long schema, long iteration, char *err,
                           size_t errlen) {
    snprintf(err, errlen,
             "the run record --out %s has schema %ld and this moesim writes schema %d, so it "
             "cannot continue it from step %ld: resume with the moesim that started the run, "
             "or start a new record from the checkpoint's parameters with this one "
             "(--finetune 1 --out NEW.h5)",
             path, schema, MOESIM_SCHEMA_VERSION, iteration);
    return -1;
}

static int write_synced(const char *path, const char *bytes, long len) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    long done = 0;
    while (done < len) {
        ssize_t n = write(fd, bytes + done, (size_t)(len - done));
        if (n <= 0) break;
        done += n;
    }
    int ok = done == len && fsync(fd) == 0;
    ok = close(fd) == 0 && ok;
    return ok ? 0 : -1;
}

static void sync_parent_dir(const char *path) {
    char dir[MOESIM_PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    int fd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    fsync(fd);
    close(fd);
}

/* The schema and identity of the record at path; -1 when HDF5 cannot open it. */
static int read_identity(const char *path, long *schema, char *id, size_t len) {
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return -1;
    *schema = long_attr_or(file, "schema_version", 0);
    record_identity(file, id, len);
    H5Fclose(file);
    return 0;
}

/* Puts the checkpoint's record image at path, unless path holds another
 * run's record, or one this moesim cannot continue: then nothing is touched.
 * A file at path that HDF5 cannot open (a record the kill damaged) is kept as
 * PATH.damaged. */
static int restore_image(const char *path, const char *image, long len, long iteration, char *err,
                         size_t errlen) {
    char there[80] = "", ours[80], tmp[MOESIM_PATH_MAX + 16], kept[MOESIM_PATH_MAX + 16];
    long schema = MOESIM_SCHEMA_VERSION;
    int exists = access(path, F_OK) == 0;
    int damaged = exists && read_identity(path, &schema, there, sizeof there) != 0;
    if (schema != MOESIM_SCHEMA_VERSION)
        return schema_mismatch(path, schema, iteration, err, errlen);
    snprintf(tmp, sizeof tmp, "%s.restore.tmp", path);
    if (write_synced(tmp, image, len) != 0) {
        snprintf(err, errlen,
                 "cannot write the run record of checkpoint %ld beside --out %s (%s): check "
                 "free disk space and that its directory is writable",
                 iteration, path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    if (read_identity(tmp, &schema, ours, sizeof ours) != 0) {
        snprintf(err, errlen,
                 "the run record image in checkpoint %ld cannot be read (the checkpoint is "
                 "damaged); resume from an earlier checkpoint, or start a new record from its "
                 "parameters (--finetune 1 --out NEW.h5)",
                 iteration);
        unlink(tmp);
        return -1;
    }
    if (schema != MOESIM_SCHEMA_VERSION) {
        unlink(tmp);
        return schema_mismatch(path, schema, iteration, err, errlen);
    }
    if (exists && !damaged && strcmp(there, ours) != 0) {
        snprintf(err, errlen,
                 "the run record --out %s belongs to another run (%s) than the one that wrote "
                 "checkpoint %ld (%s): give the --out of that run, or a new path to restore its "
                 "record there",
                 path, there, iteration, ours);
        unlink(tmp);
        return -1;
    }
    snprintf(kept, sizeof kept, "%s.damaged", path);
    if (damaged && rename(path, kept) == 0)
        fprintf(stderr,
                "moesim: warning: the run record %s cannot be opened (the run was killed while "
                "writing it?); it is kept as %s, and the record continues from the copy saved "
                "with checkpoint %ld\n",
                path, kept, iteration);
    if (rename(tmp, path) != 0) {
        snprintf(err, errlen, "cannot replace the run record --out %s with checkpoint %ld's (%s)",
                 path, iteration, strerror(errno));
        unlink(tmp);
        return -1;
    }
    sync_parent_dir(path);
    return 0;
}

static Record *resume_mismatch(Record *r, const char *path, long iteration, char *err,
                               size_t errlen) {
    snprintf(err, errlen,
             "the run record --out %s cannot continue from step %ld: it is not the record of "
             "the run that wrote the checkpoint (another model, or rows missing)",
             path, iteration);
    record_free(r);
    return NULL;
}

Record *record_resume(const char *path, const RecordLayout *layout, long iteration,
                      const char *image, long image_len, char *err, size_t errlen) {
    if (image && restore_image(path, image, image_len, iteration, err, errlen) != 0) return NULL;
    Record *r = record_alloc(path, layout, err, errlen);
    if (!r) return NULL;
    if (reserve_take(r) != 0) {
        snprintf(err, errlen,
                 "cannot set aside %ld kB beside the run record --out %s to continue it (%s): "
                 "free space on that disk",
                 RECORD_RESERVE_BYTES / 1024, path, strerror(errno));
        record_free(r);
        return NULL;
    }
    r->file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (r->file < 0) {
        snprintf(err, errlen,
                 "cannot reopen the run record --out %s to continue it from step %ld; give the "
                 "--out of the run that wrote the checkpoint",
                 path, iteration);
        record_free(r);
        return NULL;
    }
    long schema = long_attr_or(r->file, "schema_version", 0);
    if (schema != MOESIM_SCHEMA_VERSION) {
        schema_mismatch(path, schema, iteration, err, errlen);
        record_free(r);
        return NULL;
    }
    long train_rows = rows_up_to(r->file, "/train/step", iteration);
    long eval_rows = rows_up_to(r->file, "/eval/step", iteration);
    long spec_rows = rows_up_to(r->file, "/specialization/step", iteration);
    long group_rows = rows_up_to(r->file, "/routing/group_counts_step", iteration);
    int st = 0;
    hsize_t tail[3];
    for (size_t i = 0; i < sizeof SERIES / sizeof SERIES[0]; i++) {
        const SeriesSpec *spec = &SERIES[i];
        int ndim = tail_dims(layout, spec->tail, tail);
        long keep = spec->id == EVAL_STEP || spec->id == EVAL_LOSS             ? eval_rows
                    : spec->id == GROUP_COUNTS_STEP || spec->id == GROUP_COUNTS ||
                            spec->id == GROUP_DROPS
                        ? group_rows
                    : spec->id >= SPEC_STEP                                      ? spec_rows
                                                                                 : train_rows;
        st |= series_reopen(&r->series[spec->id], r->file, spec->path, spec->is_long, ndim, tail,
                            keep);
    }
    for (int p = 0; p < timing_series_count(); p++) {
        char name[64];
        timing_series_path(p, name, sizeof name);
        int ndim = tail_dims(layout, TAIL_RANK, tail);
        st |= series_reopen(&r->series[TIMING_FIRST + p], r->file, name, 0, ndim, tail, train_rows);
    }
    if (st != 0) { /* the record stays as it was: no status of a live run on a mismatch */
        return resume_mismatch(r, path, iteration, err, errlen);
    }
    st |= set_string_attr(r->file, "status", "running");
    st |= set_string_attr(r->file, "failure", "");
    st |= set_long_attr(r->file, "steps_done", iteration);
    st |= write_heartbeat(r);
    r->steps_on_disk = iteration;
    st |= append_resume(r->file, iteration, layout);
    if (st != 0 || H5Fflush(r->file, H5F_SCOPE_GLOBAL) < 0) {
        return resume_mismatch(r, path, iteration, err, errlen);
    }
    return r;
}

/* ---- appending ---------------------------------------------------------------- */

/* Load statistics of one layer's router demand across experts. */
static void load_statistics(const long *tokens, int E, double *cv, double *max_over_mean) {
    double sum = 0.0, max = 0.0;
    for (int e = 0; e < E; e++) {
        sum += (double)tokens[e];
        if (tokens[e] > max) max = (double)tokens[e];
    }
    double mean = sum / E, var = 0.0;
    for (int e = 0; e < E; e++) var += ((double)tokens[e] - mean) * ((double)tokens[e] - mean);
    *cv = mean > 0 ? sqrt(var / E) / mean : 0.0;
    *max_over_mean = mean > 0 ? max / mean : 0.0;
}

static int push_layer_statistics(Record *r, const StepDetail *d) {
    int L = r->layout.moe_layers, E = r->layout.experts, st = 0;
    double *cv = r->per_layer, *max_over_mean = r->per_layer + L;
    for (int l = 0; l < L; l++) {
        load_statistics(d->tokens_per_expert + (long)l * E, E, &cv[l], &max_over_mean[l]);
        r->per_layer_long[l] = 0;
        for (int e = 0; e < E; e++) r->per_layer_long[l] += r->processed[(long)l * E + e] == 0;
    }
    st |= series_push(&r->series[ROUTING_LOAD_CV], cv);
    st |= series_push(&r->series[ROUTING_MAX_OVER_MEAN], max_over_mean);
    st |= series_push(&r->series[ROUTING_UNUSED], r->per_layer_long);
    return st;
}

int record_append_train(Record *r, const TrainRow *row, const StepDetail *d) {
    int L = r->layout.moe_layers, E = r->layout.experts, P = r->layout.world_size, st = 0;
    Series *s = r->series;
    st |= series_push(&s[TRAIN_STEP], &row->step);
    st |= series_push(&s[TRAIN_LOSS], &row->loss);
    st |= series_push(&s[TRAIN_AUX], &row->aux_loss);
    st |= series_push(&s[TRAIN_Z], &row->z_loss);
    st |= series_push(&s[TRAIN_IMPORTANCE], &row->importance_loss);
    st |= series_push(&s[TRAIN_LOAD], &row->load_loss);
    st |= series_push(&s[TRAIN_LR], &row->lr);
    st |= series_push(&s[TRAIN_GRAD_NORM], &row->grad_norm);
    st |= series_push(&s[TRAIN_TOKENS_PER_S], &row->tokens_per_s);
    st |= series_push(&s[TRAIN_STEP_TIME], &row->step_time_s);
    for (long i = 0; i < (long)L * E; i++)
        r->processed[i] = d->tokens_per_expert[i] - d->dropped_per_expert[i];
    st |= series_push(&s[ROUTING_TOKENS], d->tokens_per_expert);
    st |= series_push(&s[ROUTING_PROCESSED], r->processed);
    st |= series_push(&s[ROUTING_DROPPED], d->dropped_per_expert);
    st |= series_push(&s[ROUTING_IMPORTANCE], d->importance);
    st |= series_push(&s[ROUTING_MEAN_PROB], d->mean_prob);
    st |= series_push(&s[ROUTING_EXPERT_BIAS], d->expert_bias);
    st |= series_push(&s[ROUTING_ENTROPY], d->entropy);
    st |= series_push(&s[ROUTING_AUX], d->aux_loss);
    st |= series_push(&s[ROUTING_Z], d->z_loss);
    st |= series_push(&s[ROUTING_IMPORTANCE_LOSS], d->importance_loss);
    st |= series_push(&s[ROUTING_LOAD_LOSS], d->load_loss);
    st |= series_push(&s[ROUTING_MEAN_ABS_LOGIT], d->mean_abs_logit);
    st |= series_push(&s[ROUTING_LOGSUMEXP_SQ], d->logsumexp_sq);
    st |= push_layer_statistics(r, d);
    for (int p = 0; p < PHASE_COUNT; p++) {
        for (int rank = 0; rank < P; rank++)
            r->timing_row[rank] = d->phase_s[rank * PHASE_COUNT + p];
        st |= series_push(&s[TIMING_FIRST + p], r->timing_row);
    }
    for (int c = 0; c < COMM_TIMES_COUNT; c++) {
        for (int rank = 0; rank < P; rank++)
            r->timing_row[rank] = d->comm_times[rank * COMM_TIMES_COUNT + c];
        st |= series_push(&s[COMM_TIMING_FIRST + c], r->timing_row);
    }
    st |= series_push(&s[TRAFFIC_DISPATCH], d->dispatch_bytes);
    st |= series_push(&s[TRAFFIC_INTERNODE], d->internode_bytes);
    st |= series_push(&s[TRAFFIC_SHADOWED_ROWS], d->shadowed_rows);
    return st ? -1 : 0;
}

int record_append_group_counts(Record *r, long step, const long *counts, const long *drops) {
    int st = series_push(&r->series[GROUP_COUNTS_STEP], &step);
    st |= series_push(&r->series[GROUP_COUNTS], counts);
    st |= series_push(&r->series[GROUP_DROPS], drops);
    return st ? -1 : 0;
}

/* I(expert; category) in bits under the joint distribution counts / total. */
static double mutual_information_bits(const long *counts, int E, int categories) {
    double total = 0.0;
    for (long i = 0; i < (long)E * categories; i++) total += (double)counts[i];
    if (total <= 0) return 0.0;
    double mi = 0.0;
    for (int e = 0; e < E; e++) {
        double p_expert = 0.0;
        for (int c = 0; c < categories; c++) p_expert += counts[(long)e * categories + c] / total;
        for (int c = 0; c < categories; c++) {
            double p_joint = counts[(long)e * categories + c] / total;
            if (p_joint <= 0) continue;
            double p_category = 0.0;
            for (int f = 0; f < E; f++) p_category += counts[(long)f * categories + c] / total;
            mi += p_joint * log2(p_joint / (p_expert * p_category));
        }
    }
    return mi;
}

int record_append_eval(Record *r, const EvalRow *row) {
    int L = r->layout.moe_layers, E = r->layout.experts, Cat = r->layout.num_categories, st = 0;
    st |= series_push(&r->series[EVAL_STEP], &row->step);
    st |= series_push(&r->series[EVAL_LOSS], &row->loss);
    st |= series_push(&r->series[SPEC_STEP], &row->step);
    st |= series_push(&r->series[SPEC_COUNTS], row->specialization);
    for (int l = 0; l < L; l++)
        r->per_layer[l] = mutual_information_bits(row->specialization + (long)l * E * Cat, E, Cat);
    st |= series_push(&r->series[SPEC_MUTUAL_INFORMATION], r->per_layer);
    return st ? -1 : 0;
}

/* What one flush can add to the file at most: every chunk its rows start,
 * with a file-system block of rounding and a chunk-index (B-tree) node each,
 * and a margin for the metadata HDF5 rewrites (dataspaces, attributes,
 * heaps). Generous on purpose: too much stops a run on a nearly full disk a
 * flush early; too little lets HDF5 fail mid-write, which it does not
 * recover from (record_flush). */
#define FLUSH_METADATA_BYTES (128L * 1024)
#define CHUNK_INDEX_NODE_BYTES 4096L

static long flush_bytes_bound(const Record *r, long block_bytes) {
    long bytes = FLUSH_METADATA_BYTES;
    for (int i = 0; i < SERIES_COUNT; i++) {
        const Series *s = &r->series[i];
        if (s->buffered == 0 || s->row_bytes == 0 || s->chunk_rows <= 0) continue;
        long c = s->chunk_rows;
        long new_blocks = (s->written + s->buffered + c - 1) / c - (s->written + c - 1) / c;
        if (new_blocks == 0) continue;
        bytes += new_blocks * s->chunks_per_block *
                     ((long)s->chunk_bytes + block_bytes + CHUNK_INDEX_NODE_BYTES) +
                 2 * CHUNK_INDEX_NODE_BYTES; /* a new index root, or a split up to it */
    }
    return bytes;
}

/* After a failed flush the record takes nothing more: its message is kept
 * for record_close and handed to the caller. */
static int flush_failed(Record *r, char *err, size_t errlen) {
    r->failed = 1;
    snprintf(err, errlen, "%s", r->failure);
    return -1;
}

/* Measured on HDF5 1.10.8 filling a tmpfs: a flush whose writes fail
 * midway leaves object headers pointing at chunks and index nodes that were
 * never written (the file cannot be read, or reads zeros where rows were);
 * flushing again after space is freed makes the file readable again, but
 * the chunk whose write failed stays missing, even if its rows are written
 * anew, and shrinking the datasets back damaged rows of earlier flushes. A
 * failed write cannot be undone, so none is attempted: the rows go to disk
 * only when the file system has room for all that the flush can allocate,
 * and steps_done (with the heartbeat) is written in a second flush, after
 * the rows it counts are on disk. */
int record_flush(Record *r, long steps_done, char *err, size_t errlen) {
    if (r->failed) return flush_failed(r, err, errlen);
    long first = r->steps_on_disk + 1;
    struct statvfs fs;
    if (statvfs(r->path, &fs) == 0) {
        long block = (long)fs.f_frsize, free_bytes = (long)(fs.f_bavail * fs.f_frsize);
        long need = flush_bytes_bound(r, block);
        if (free_bytes < need) {
            snprintf(r->failure, sizeof r->failure,
                     "the disk of the run record %s is full: %ld kB free where writing steps "
                     "%ld-%ld needs up to %ld kB. The record is marked failed and reads back "
                     "whole, holding %s %ld (its last flush); free space on that disk or choose "
                     "another --out",
                     r->path, free_bytes / 1024, first, steps_done, need / 1024,
                     r->steps_on_disk ? "the steps up to" : "no step: steps_done",
                     r->steps_on_disk);
            return flush_failed(r, err, errlen);
        }
    }
    errno = 0;
    int st = 0;
    for (int i = 0; i < SERIES_COUNT; i++) st |= series_flush(&r->series[i]);
    if (st == 0 && H5Fflush(r->file, H5F_SCOPE_GLOBAL) < 0) st = -1;
    if (st == 0) {
        st |= set_long_attr(r->file, "steps_done", steps_done);
        st |= write_heartbeat(r);
        if (H5Fflush(r->file, H5F_SCOPE_GLOBAL) < 0) st = -1;
    }
    if (st == 0) {
        r->steps_on_disk = steps_done;
        return 0;
    }
    snprintf(r->failure, sizeof r->failure,
             "writing steps %ld-%ld to the run record %s failed (%s). The record is marked "
             "failed and its steps_done stays %ld, its last good flush; rows past that step, if "
             "any, may be missing or zero. Free space on that disk or choose another --out",
             first, steps_done, r->path, errno ? strerror(errno) : "HDF5 write error",
             r->steps_on_disk);
    return flush_failed(r, err, errlen);
}

const char *record_status_name(RecordStatus status) {
    switch (status) {
        case RECORD_COMPLETE:
            return "complete";
        case RECORD_DIVERGED:
            return "diverged";
        case RECORD_INTERRUPTED:
            return "interrupted";
        case RECORD_FAILED:
            break;
    }
    return "failed";
}

int record_close(Record *r, RecordStatus status, long steps_done, const char *reason, char *err,
                 size_t errlen) {
    char why[FAILURE_MAX], ended[32];
    snprintf(why, sizeof why, "%s", reason ? reason : ""); /* reason may be err */
    iso8601_now(ended, sizeof ended);
    int st = record_flush(r, steps_done, err, errlen);
    if (st != 0) status = RECORD_FAILED; /* rows it would claim are not on disk */
    if (st != 0) snprintf(why, sizeof why, "%s", r->failure);
    /* the last attributes take the reserve's room, which a full disk lacks */
    reserve_release(r);
    int closing = set_string_attr(r->file, "status", record_status_name(status));
    closing |= set_string_attr(r->file, "failure",
                               status == RECORD_FAILED || status == RECORD_DIVERGED ? why : "");
    closing |= set_string_attr(r->file, "end_time", ended);
    for (int i = 0; i < SERIES_COUNT; i++) series_close(&r->series[i]);
    if (H5Fclose(r->file) < 0) closing = -1;
    r->file = 0;
    if (closing != 0 && st == 0)
        snprintf(err, errlen,
                 "closing the run record %s failed; its status may still say running. Check "
                 "free disk space",
                 r->path);
    record_free(r);
    return st || closing ? -1 : 0;
}

/* ---- moesim info ------------------------------------------------------------- */

static int read_long_attr(hid_t loc, const char *name, long *value) {
    if (H5Aexists(loc, name) <= 0) return -1;
    hid_t attr = H5Aopen(loc, name, H5P_DEFAULT);
    herr_t st = attr < 0 ? -1 : H5Aread(attr, H5T_NATIVE_LONG, value);
    if (attr >= 0) H5Aclose(attr);
    return st < 0 ? -1 : 0;
}

static double double_attr_or(hid_t loc, const char *name, double fallback) {
    double value = fallback;
    if (H5Aexists(loc, name) <= 0) return fallback;
    hid_t attr = H5Aopen(loc, name, H5P_DEFAULT);
    if (attr < 0 || H5Aread(attr, H5T_NATIVE_DOUBLE, &value) < 0) value = fallback;
    if (attr >= 0) H5Aclose(attr);
    return value;
}

static long long_attr_or(hid_t loc, const char *name, long fallback) {
    long value;
    return read_long_attr(loc, name, &value) == 0 ? value : fallback;
}

/* A scalar variable-length string attribute into buf ("?" when absent). */
static void string_attr(hid_t loc, const char *name, char *buf, size_t len) {
    snprintf(buf, len, "?");
    if (H5Aexists(loc, name) <= 0) return;
    hid_t attr = H5Aopen(loc, name, H5P_DEFAULT);
    hid_t type = utf8_string_type();
    char *value = NULL;
    if (attr >= 0 && H5Aread(attr, type, &value) >= 0 && value) {
        snprintf(buf, len, "%s", value);
        H5free_memory(value);
    }
    H5Tclose(type);
    if (attr >= 0) H5Aclose(attr);
}

/* A whole dataset as doubles; *n gets its element count, *rows its first
 * dimension. NULL when absent or empty. */
static double *read_dataset(hid_t file, const char *path, size_t *n, size_t *rows) {
    *n = *rows = 0;
    if (H5Lexists(file, path, H5P_DEFAULT) <= 0) return NULL;
    hid_t dset = H5Dopen2(file, path, H5P_DEFAULT);
    if (dset < 0) return NULL;
    hid_t space = H5Dget_space(dset);
    hsize_t dims[4] = {0};
    int ndim = H5Sget_simple_extent_dims(space, dims, NULL);
    size_t count = ndim > 0 ? 1 : 0;
    for (int i = 0; i < ndim; i++) count *= dims[i];
    double *data = count ? malloc(sizeof(double) * count) : NULL;
    if (data && H5Dread(dset, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
        free(data);
        data = NULL;
    }
    if (data) {
        *n = count;
        *rows = dims[0];
    }
    H5Sclose(space);
    H5Dclose(dset);
    return data;
}

static double last_value(hid_t file, const char *path) {
    size_t n, rows;
    double *v = read_dataset(file, path, &n, &rows);
    double last = v ? v[n - 1] : NAN;
    free(v);
    return last;
}

/* Why a file could not be read: for good, or corrupt (which a record read
 * in the middle of its live writer's flush also looks like). */
enum { OPEN_FAILED = -1, OPEN_CORRUPT = -2 };

/* A file moesim wrote (a run record or a checkpoint), opened read-only. */
static hid_t open_moesim_file(const char *path, char *err, size_t errlen) {
    FILE *probe = fopen(path, "rb");
    if (!probe) {
        snprintf(err, errlen,
                 "cannot open %s: no such file or not readable; give the path of a "
                 "run record written by moesim train --out, or of a checkpoint (--save)",
                 path);
        return -1;
    }
    fclose(probe);
    if (H5Fis_hdf5(path) <= 0) {
        snprintf(err, errlen,
                 "%s is not an HDF5 file, so not a moesim run record; give the "
                 "file written by moesim train --out",
                 path);
        return -1;
    }
    /* Without HDF5's own file lock: a live run holds it, and a live record
     * is readable, not corrupt. */
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_file_locking(fapl, 0, 1);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    H5Pclose(fapl);
    if (file < 0) {
        snprintf(err, errlen, "%s is corrupt: HDF5 cannot open it " CORRUPT_ADVICE, path);
        return OPEN_CORRUPT;
    }
    long schema;
    htri_t is_moesim = H5Aexists(file, "moesim_version");
    if (is_moesim < 0) {
        snprintf(err, errlen, "%s is corrupt: its root attributes cannot be read " CORRUPT_ADVICE,
                 path);
        H5Fclose(file);
        return OPEN_CORRUPT;
    }
    if (!is_moesim || read_long_attr(file, "schema_version", &schema) != 0) {
        snprintf(err, errlen,
                 "%s is an HDF5 file but not a moesim run record (it has no "
                 "moesim_version and schema_version attributes)",
                 path);
        H5Fclose(file);
        return -1;
    }
    return file;
}

/* What checkpoint_write_attributes writes and a record never has. */
static int is_checkpoint(hid_t file) {
    return H5Aexists(file, "iteration") > 0 && H5Aexists(file, "optimizer_steps") > 0 &&
           H5Aexists(file, "steps_done") <= 0;
}

static int check_record_schema(hid_t file, const char *path, char *err, size_t errlen) {
    long schema = long_attr_or(file, "schema_version", 0);
    if (schema < OLDEST_READABLE_SCHEMA || schema > MOESIM_SCHEMA_VERSION) {
        snprintf(
            err, errlen, "%s uses run-record schema %ld; this moesim reads schemas %d to %d: %s",
            path, schema, OLDEST_READABLE_SCHEMA, MOESIM_SCHEMA_VERSION,
            schema > MOESIM_SCHEMA_VERSION ? "use a newer moesim" : "re-run it with this moesim");
        return -1;
    }
    return 0;
}

static void print_load_cv(hid_t file) {
    size_t n, rows;
    double *cv = read_dataset(file, "/routing/load_cv", &n, &rows);
    if (!cv) return;
    size_t layers = n / rows, from = rows - (rows + 9) / 10;
    printf("  load CV per MoE layer (mean over the last 10%% of logged steps):");
    for (size_t l = 0; l < layers; l++) {
        double sum = 0.0;
        for (size_t s = from; s < rows; s++) sum += cv[s * layers + l];
        printf(" %.3f", sum / (double)(rows - from));
    }
    printf("\n");
    free(cv);
}

static void print_phase_breakdown(hid_t file) {
    double mean_ms[PHASE_COUNT], total = 0.0;
    for (int p = 0; p < PHASE_COUNT; p++) {
        char path[64];
        snprintf(path, sizeof path, "/timing/%s", phase_names[p]);
        size_t n, rows;
        double *t = read_dataset(file, path, &n, &rows);
        double sum = 0.0;
        for (size_t i = 0; i < n; i++) sum += t[i];
        mean_ms[p] = n ? 1e3 * sum / (double)n : 0.0;
        total += mean_ms[p];
        free(t);
    }
    if (total <= 0) return;
    printf("  time per step by phase (mean over logged steps and ranks), %.2f ms in all:\n", total);
    for (int p = 0; p < PHASE_COUNT; p++)
        printf("    %-15s %9.3f ms %6.1f%%\n", phase_names[p], mean_ms[p],
               100.0 * mean_ms[p] / total);
}

/* Mean over logged steps and ranks of the sum of the /timing/comm/<what>/<kind>
 * datasets, in ms (cells of ranks a smaller layout lacked, NaN, skipped). */
static double mean_comm_ms(hid_t file, const char *what) {
    double ms = 0.0;
    for (int k = 0; k < COMM_KIND_COUNT; k++) {
        char path[96];
        snprintf(path, sizeof path, "/timing/comm/%s/%s", what, comm_kind_names[k]);
        size_t n = 0, rows, cells = 0;
        double *t = read_dataset(file, path, &n, &rows), sum = 0.0;
        for (size_t i = 0; t && i < n; i++)
            if (!isnan(t[i])) {
                sum += t[i];
                cells++;
            }
        ms += cells ? 1e3 * sum / (double)cells : 0.0;
        free(t);
    }
    return ms;
}

/* Exposed and hidden communication, and the bytes between distinct nodes
 * (schema 7 on). */
static void print_comm_summary(hid_t file) {
    if (H5Lexists(file, "/timing/comm", H5P_DEFAULT) <= 0) return;
    double exposed = mean_comm_ms(file, "exposed"), in_flight = mean_comm_ms(file, "in_flight");
    printf(
        "  communication per step (mean over logged steps and ranks): %.3f ms exposed, "
        "%.3f ms in flight, %.3f ms hidden\n",
        exposed, in_flight, in_flight - exposed);
    size_t n = 0, rows = 0;
    double *bytes = read_dataset(file, "/traffic/internode_bytes", &n, &rows), between = 0.0;
    size_t nodes = (size_t)llround(sqrt(rows ? (double)n / (double)rows : 0.0));
    for (size_t i = 0; bytes && i < n; i++)
        if (nodes && (i % (nodes * nodes)) / nodes != i % nodes) between += bytes[i];
    if (rows && nodes > 1)
        printf("  MoE exchanges between nodes: %.3f MB per step (%zu nodes)\n",
               between / (double)rows / 1e6, nodes);
    free(bytes);
}

static double overall_drop_percent(hid_t file) {
    size_t n, rows, n2, rows2;
    double *tokens = read_dataset(file, "/routing/tokens_per_expert", &n, &rows);
    double *dropped = read_dataset(file, "/routing/dropped_per_expert", &n2, &rows2);
    double t = 0.0, d = 0.0;
    for (size_t i = 0; tokens && dropped && i < n && i < n2; i++) {
        t += tokens[i];
        d += dropped[i];
    }
    free(tokens);
    free(dropped);
    return t > 0 ? 100.0 * d / t : 0.0;
}

static double mean_of(hid_t file, const char *path) {
    size_t n, rows;
    double *v = read_dataset(file, path, &n, &rows), sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += v[i];
    free(v);
    return n ? sum / (double)n : NAN;
}

/* ---- reading everything back ---- */

/* Rows of a dataset read per call, so checking a long run's record never
 * holds more than this many bytes of it. */
#define READ_BACK_BYTES (16 << 20)

typedef struct ReadBack {
    const char *object; /* being read */
    char what[160];     /* the first thing that could not be read */
} ReadBack;

/* Reads n elements of `type` (already native) from attr or dset and frees
 * whatever variable-length memory HDF5 handed out. */
static int read_elements(hid_t attr, hid_t dset, hid_t type, hid_t mem, hid_t file_space,
                         size_t n) {
    size_t size = H5Tget_size(type);
    void *buf = malloc(n * size + 1);
    if (!buf) return -1;
    herr_t st = attr >= 0 ? H5Aread(attr, type, buf)
                          : H5Dread(dset, type, mem, file_space, H5P_DEFAULT, buf);
    int has_vlen = H5Tdetect_class(type, H5T_VLEN) > 0 || H5Tis_variable_str(type) > 0;
    if (st >= 0 && has_vlen) H5Dvlen_reclaim(type, mem, H5P_DEFAULT, buf);
    free(buf);
    return st < 0 ? -1 : 0;
}

static herr_t read_attribute_back(hid_t loc, const char *name, const H5A_info_t *info, void *data) {
    (void)info;
    ReadBack *rb = data;
    hid_t attr = H5Aopen(loc, name, H5P_DEFAULT);
    hid_t file_type = attr >= 0 ? H5Aget_type(attr) : -1;
    hid_t type = file_type >= 0 ? H5Tget_native_type(file_type, H5T_DIR_ASCEND) : -1;
    hid_t space = attr >= 0 ? H5Aget_space(attr) : -1;
    hssize_t n = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
    int st = type < 0 || n < 0 ? -1 : n == 0 ? 0 : read_elements(attr, -1, type, space, -1, n);
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    if (file_type >= 0) H5Tclose(file_type);
    if (attr >= 0) H5Aclose(attr);
    if (st != 0) snprintf(rb->what, sizeof rb->what, "attribute %s of %s", name, rb->object);
    return st < 0 ? -1 : 0;
}

/* Every row of a dataset, READ_BACK_BYTES at a time. */
static int read_dataset_back(hid_t dset) {
    hid_t file_type = H5Dget_type(dset);
    hid_t type = file_type >= 0 ? H5Tget_native_type(file_type, H5T_DIR_ASCEND) : -1;
    hid_t space = H5Dget_space(dset);
    hsize_t dims[H5S_MAX_RANK] = {0}, start[H5S_MAX_RANK] = {0}, count[H5S_MAX_RANK];
    int ndim = space >= 0 ? H5Sget_simple_extent_dims(space, dims, NULL) : -1;
    int st = type < 0 || ndim < 0 ? -1 : 0;
    size_t row = type >= 0 ? H5Tget_size(type) : 1;
    for (int i = 1; i < ndim; i++) row *= dims[i];
    hsize_t rows = ndim == 0 ? 1 : dims[0];
    hsize_t block = row ? READ_BACK_BYTES / row : rows;
    if (block < 1) block = 1;
    for (hsize_t first = 0; st == 0 && row > 0 && first < rows; first += block) {
        hsize_t take = rows - first < block ? rows - first : block;
        for (int i = 0; i < ndim; i++) count[i] = i == 0 ? take : dims[i];
        start[0] = first;
        hid_t mem = ndim == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(ndim, count, NULL);
        if (ndim > 0) H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL);
        size_t n = (size_t)(ndim == 0 ? 1 : H5Sget_simple_extent_npoints(mem));
        st = read_elements(-1, dset, type, mem, space, n);
        H5Sclose(mem);
    }
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    if (file_type >= 0) H5Tclose(file_type);
    return st;
}

/* One object's attributes and, for a dataset, its data. */
static int read_object_back(hid_t obj, ReadBack *rb) {
    H5O_info_t info;
    if (H5Oget_info2(obj, &info, H5O_INFO_BASIC) < 0) return -1;
    if (H5Aiterate2(obj, H5_INDEX_NAME, H5_ITER_NATIVE, NULL, read_attribute_back, rb) < 0)
        return -1;
    return info.type == H5O_TYPE_DATASET ? read_dataset_back(obj) : 0;
}

/* Links, not objects, are walked: visiting objects needs each object's
 * header first and stops at a broken one without saying which it was. */
static herr_t read_link_back(hid_t group, const char *name, const H5L_info_t *info, void *data) {
    ReadBack *rb = data;
    if (info->type != H5L_TYPE_HARD) return 0;
    char object[128];
    snprintf(object, sizeof object, "/%s", name);
    rb->object = object;
    hid_t obj = H5Oopen(group, name, H5P_DEFAULT);
    int st = obj < 0 ? -1 : read_object_back(obj, rb);
    if (obj >= 0) H5Oclose(obj);
    if (st != 0 && !rb->what[0]) snprintf(rb->what, sizeof rb->what, "%s", object);
    rb->object = NULL;
    return st < 0 ? -1 : 0;
}

/* Everything the file holds, read back before any of it is believed: a
 * record whose writer died mid-flush, or that two runs wrote at once, can
 * open fine and still fail on one dataset. */
static int check_readable(hid_t file, const char *path, char *err, size_t errlen) {
    ReadBack rb = {"/", ""};
    int st = read_object_back(file, &rb);
    if (st == 0) st = H5Lvisit(file, H5_INDEX_NAME, H5_ITER_NATIVE, read_link_back, &rb) < 0;
    if (st == 0) return 0;
    snprintf(err, errlen, "%s is corrupt: %s cannot be read " CORRUPT_ADVICE, path,
             rb.what[0] ? rb.what : "its structure");
    return -1;
}

/* "42s", "5m 03s", "3h 07m", "2d 04h". */
static void format_age(char *buf, size_t len, double seconds) {
    long s = seconds < 0 ? 0 : (long)(seconds + 0.5);
    if (s < 60)
        snprintf(buf, len, "%lds", s);
    else if (s < 3600)
        snprintf(buf, len, "%ldm %02lds", s / 60, s % 60);
    else if (s < 86400)
        snprintf(buf, len, "%ldh %02ldm", s / 3600, s % 3600 / 60);
    else
        snprintf(buf, len, "%ldd %02ldh", s / 86400, s % 86400 / 3600);
}

/* A heartbeat older than this many flush periods (and than
 * STALE_AFTER_MIN_S) means the writer stopped: a flush can come late by an
 * evaluation or a checkpoint save, rarely by three periods. */
#define STALE_AFTER_PERIODS 3.0
#define STALE_AFTER_MIN_S 60.0

/* Whether a "running" record's run is alive: the lock (a live process holds
 * it; the kernel drops it when the process dies) and the heartbeat (a
 * live but stuck process writes nothing). */
static void print_liveness(hid_t file, const char *path) {
    double last = double_attr_or(file, "last_write_time", NAN);
    double period = double_attr_or(file, "flush_period_s", 0.0);
    double stale_after = fmax(STALE_AFTER_PERIODS * period, STALE_AFTER_MIN_S);
    char age[32] = "?", limit[32];
    if (isfinite(last)) format_age(age, sizeof age, unix_time_s() - last);
    format_age(limit, sizeof limit, stale_after);
    int stale = isfinite(last) && unix_time_s() - last > stale_after;
    if (!output_is_locked(path))
        printf(
            "  stopped without finishing: no process holds %s.lock and the last write was %s "
            "ago (killed, or its node went down); the steps up to steps_done are readable\n",
            path, age);
    else if (stale)
        printf(
            "  stopped without finishing? a process still holds %s.lock, but the last write was "
            "%s ago, over %s (%.0f flush periods, at least %.0fs): hung, or far slower\n",
            path, age, limit, STALE_AFTER_PERIODS, STALE_AFTER_MIN_S);
    else
        printf("  live: a process holds %s.lock and wrote the record %s ago\n", path, age);
}

/* Datasets directly under group and their elements; 0 and 0 when absent. */
static void count_tensors(hid_t file, const char *group, long *tensors, long *elements) {
    *tensors = *elements = 0;
    if (H5Lexists(file, group, H5P_DEFAULT) <= 0) return;
    hid_t g = H5Gopen2(file, group, H5P_DEFAULT);
    H5G_info_t info;
    if (g < 0 || H5Gget_info(g, &info) < 0) info.nlinks = 0;
    for (hsize_t i = 0; i < info.nlinks; i++) {
        char name[256];
        if (H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name,
                               H5P_DEFAULT) < 0)
            continue;
        hid_t dset = H5Dopen2(g, name, H5P_DEFAULT);
        hid_t space = dset >= 0 ? H5Dget_space(dset) : -1;
        if (space >= 0) {
            ++*tensors;
            *elements += (long)H5Sget_simple_extent_npoints(space);
            H5Sclose(space);
        }
        if (dset >= 0) H5Dclose(dset);
    }
    if (g >= 0) H5Gclose(g);
}

/* `moesim info` on a checkpoint file (checkpoint.c writes them). */
/* A checkpoint's feed-forward layers: how many are MoE and their experts,
 * or "dense (no MoE layers)" as the trainer's banner says. */
static void describe_ffn_layers(hid_t file, long layers, long moe_freq, char *buf, size_t len) {
    long moe_layers = moe_freq > 0 ? layers / moe_freq : 0;
    if (moe_layers == 0)
        snprintf(buf, len, "dense (no MoE layers), FFN %ld",
                 long_attr_or(file, "config.ffn_hidden_size", 0));
    else
        snprintf(buf, len, "%ld MoE with %ld experts top-%ld, expert ffn %ld", moe_layers,
                 long_attr_or(file, "config.num_experts", 0),
                 long_attr_or(file, "config.moe_router_topk", 0),
                 long_attr_or(file, "config.moe_ffn_hidden_size", 0));
}

static int print_checkpoint_info(hid_t file, const char *path) {
    char version[64], revision[64], data[MOESIM_PATH_MAX];
    string_attr(file, "moesim_version", version, sizeof version);
    string_attr(file, "git_revision", revision, sizeof revision);
    string_attr(file, "config.data_path", data, sizeof data);
    long layers = long_attr_or(file, "config.num_layers", 0);
    long moe_freq = long_attr_or(file, "config.moe_layer_freq", 1);
    long tensors, params, m_tensors, m_values, v_tensors, v_values, biases, bias_values;
    count_tensors(file, "params", &tensors, &params);
    count_tensors(file, "adam_m", &m_tensors, &m_values);
    count_tensors(file, "adam_v", &v_tensors, &v_values);
    count_tensors(file, "expert_bias", &biases, &bias_values);
    struct stat st;
    double megabytes = stat(path, &st) == 0 ? (double)st.st_size / 1e6 : NAN;
    long world = long_attr_or(file, "world_size", 0), ep = long_attr_or(file, "ep_size", 0);
    printf("moesim checkpoint %s (%.2f MB)\n", path, megabytes);
    printf(
        "  written by moesim %s (git %s), checkpoint schema %ld | iteration %ld, optimizer "
        "step %ld of %ld training steps\n",
        version, revision, long_attr_or(file, "schema_version", 0),
        long_attr_or(file, "iteration", 0), long_attr_or(file, "optimizer_steps", 0),
        long_attr_or(file, "config.train_iters", 0));
    if (world > 0)
        printf("  saved on %ld ranks, expert-parallel size %ld (any layout can load it)\n", world,
               ep);
    else
        printf(
            "  saved on a layout it does not record (an older moesim); any layout can load it\n");
    char ffn[128];
    describe_ffn_layers(file, layers, moe_freq, ffn, sizeof ffn);
    printf("  model: %ld layers, %s, hidden %ld, %ld heads, seq %ld | %ld tensors, %ld parameters\n",
           layers, ffn, long_attr_or(file, "config.hidden_size", 0),
           long_attr_or(file, "config.num_attention_heads", 0),
           long_attr_or(file, "config.seq_length", 0), tensors, params);
    int adam = m_tensors == tensors && v_tensors == tensors && m_values == params &&
               v_values == params && tensors > 0;
    char bias_note[64] = "none";
    if (biases) snprintf(bias_note, sizeof bias_note, "%ld MoE layers", biases);
    printf("  optimizer: %s | expert selection biases: %s\n",
           adam ? "Adam moments present (adam_m, adam_v)"
                : "no complete Adam moments (a resume restarts them from zero)",
           bias_note);
    printf("  data %s | seed %ld\n", data,
           long_attr_or(file, "seed", long_attr_or(file, "config.seed", 0)));
    hid_t copy = H5Lexists(file, "run_record", H5P_DEFAULT) > 0
                     ? H5Dopen2(file, "run_record", H5P_DEFAULT)
                     : -1;
    if (copy >= 0) {
        printf("  run record: a copy as of this step (%.2f MB), put over --out by a resume\n",
               (double)H5Dget_storage_size(copy) / 1e6);
        H5Dclose(copy);
    } else {
        printf("  run record: no copy (an older moesim); a resume continues --out in place\n");
    }
    return 0;
}

/* The file opened, its schema known and every object read back; else
 * OPEN_FAILED or OPEN_CORRUPT, with err. */
static hid_t open_readable(const char *path, int *checkpoint, char *err, size_t errlen) {
    hid_t file = open_moesim_file(path, err, errlen);
    if (file < 0) return file;
    *checkpoint = is_checkpoint(file);
    long schema = long_attr_or(file, "schema_version", 0);
    if (*checkpoint && schema > MOESIM_CHECKPOINT_SCHEMA)
        snprintf(err, errlen,
                 "%s uses checkpoint schema %ld; this moesim reads schemas up to %d: use a newer "
                 "moesim",
                 path, schema, MOESIM_CHECKPOINT_SCHEMA);
    if ((*checkpoint && schema > MOESIM_CHECKPOINT_SCHEMA) ||
        (!*checkpoint && check_record_schema(file, path, err, errlen) != 0)) {
        H5Fclose(file);
        return OPEN_FAILED;
    }
    if (check_readable(file, path, err, errlen) != 0) {
        H5Fclose(file);
        return OPEN_CORRUPT;
    }
    return file;
}

/* A live run's flush takes milliseconds; reading the record in the middle
 * of one (info opens it without HDF5's lock) is no corruption, so a record
 * that reads as corrupt while its writer holds the lock is retried for this
 * long. */
#define LIVE_READ_RETRIES 20
#define LIVE_READ_RETRY_S 0.1

int record_print_info(const char *path, char *err, size_t errlen) {
    int checkpoint = 0;
    hid_t file = open_readable(path, &checkpoint, err, errlen);
    for (int retry = 0; file == OPEN_CORRUPT && retry < LIVE_READ_RETRIES && output_is_locked(path);
         retry++) {
        nanosleep(&(struct timespec){.tv_nsec = (long)(LIVE_READ_RETRY_S * 1e9)}, NULL);
        file = open_readable(path, &checkpoint, err, errlen);
    }
    if (file < 0) return -1;
    if (checkpoint) {
        int st = print_checkpoint_info(file, path);
        H5Fclose(file);
        return st;
    }
    char version[64], revision[64], status[32], started[32], ended[32], data[MOESIM_PATH_MAX];
    string_attr(file, "moesim_version", version, sizeof version);
    string_attr(file, "git_revision", revision, sizeof revision);
    string_attr(file, "status", status, sizeof status);
    string_attr(file, "start_time", started, sizeof started);
    string_attr(file, "end_time", ended, sizeof ended);
    string_attr(file, "config.data_path", data, sizeof data);
    long layers = long_attr_or(file, "config.num_layers", 0);
    long moe_freq = long_attr_or(file, "config.moe_layer_freq", 1);
    printf("moesim run record %s\n", path);
    printf("  written by moesim %s (git %s), schema %ld | status %s | started %s | ended %s\n",
           version, revision, long_attr_or(file, "schema_version", 0), status, started,
           ended[0] ? ended : "-");
    if (strcmp(status, "running") == 0) print_liveness(file, path);
    char failure[FAILURE_MAX];
    string_attr(file, "failure", failure, sizeof failure);
    if (strcmp(failure, "?") != 0 && failure[0]) printf("  failure: %s\n", failure);
    long moe_layers = moe_freq > 0 ? layers / moe_freq : 0;
    if (moe_layers == 0)
        printf("  model: %ld layers, dense (no MoE layers), FFN %ld, hidden %ld | %ld "
               "parameters, %ld active per token\n",
               layers, long_attr_or(file, "config.ffn_hidden_size", 0),
               long_attr_or(file, "config.hidden_size", 0), long_attr_or(file, "params_total", 0),
               long_attr_or(file, "params_active_per_token", 0));
    else
        printf("  model: %ld layers (%ld MoE), hidden %ld, %ld experts top-%ld, capacity factor "
               "%.3g, expert ffn %ld | %ld parameters, %ld active per token\n",
               layers, moe_layers, long_attr_or(file, "config.hidden_size", 0),
               long_attr_or(file, "config.num_experts", 0),
               long_attr_or(file, "config.moe_router_topk", 0),
               double_attr_or(file, "config.moe_expert_capacity_factor", NAN),
               long_attr_or(file, "config.moe_ffn_hidden_size", 0),
               long_attr_or(file, "params_total", 0),
               long_attr_or(file, "params_active_per_token", 0));
    printf(
        "  run: %ld ranks, expert-parallel size %ld | data %s | seq %ld x micro-batch %ld per "
        "rank | seed %ld\n",
        long_attr_or(file, "world_size", 0), long_attr_or(file, "ep_size", 0), data,
        long_attr_or(file, "config.seq_length", 0),
        long_attr_or(file, "config.micro_batch_size", 0), long_attr_or(file, "seed", 0));
    long steps_done = long_attr_or(file, "steps_done", 0);
    printf("  steps: %ld of %ld\n", steps_done, long_attr_or(file, "config.train_iters", 0));
    double last_row = last_value(file, "/train/step");
    /* a live run writes its rows a moment before steps_done */
    if (strcmp(status, "running") != 0 && last_row > (double)steps_done)
        printf(
            "  rows past steps_done (up to step %.0f) come from a flush that did not "
            "complete: do not trust them\n",
            last_row);
    printf("  loss: final train %.4f | final validation %.4f (step %.0f)\n",
           last_value(file, "/train/loss"), last_value(file, "/eval/loss"),
           last_value(file, "/eval/step"));
    printf("  throughput: %.0f tokens/s (mean over logged steps) | drop %.2f%% of assignments\n",
           mean_of(file, "/train/tokens_per_s"), overall_drop_percent(file));
    char platform[512];
    string_attr(file, "platform", platform, sizeof platform);
    if (strcmp(platform, "?") != 0) printf("  platform: %s\n", platform);
    char gemm[160];
    string_attr(file, "bf16_gemm", gemm, sizeof gemm);
    if (strcmp(gemm, "?") != 0 && strcmp(gemm, "none") != 0) printf("  bf16 GEMM: %s\n", gemm);
    print_load_cv(file);
    print_phase_breakdown(file);
    print_comm_summary(file);
    H5Fclose(file);
    return 0;
}

/* ---- tensor files -------------------------------------------------------------- */

long tensor_file_create(const char *path) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    return H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
}

static int write_array(hid_t file, const char *name, hid_t type, const void *data, int ndim,
                       const long *dims) {
    hsize_t hd[4];
    for (int i = 0; i < ndim; i++) hd[i] = (hsize_t)dims[i];
    hid_t space = ndim ? H5Screate_simple(ndim, hd, NULL) : H5Screate(H5S_SCALAR);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t dset = H5Dcreate2(file, name, type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = dset < 0 ? -1 : H5Dwrite(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (dset >= 0) H5Dclose(dset);
    H5Pclose(lcpl);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

int tensor_file_write_f32(long file, const char *name, const float *data, int ndim,
                          const long *dims) {
    return write_array(file, name, H5T_NATIVE_FLOAT, data, ndim, dims);
}

int tensor_file_write_i32(long file, const char *name, const int *data, int ndim,
                          const long *dims) {
    return write_array(file, name, H5T_NATIVE_INT, data, ndim, dims);
}

int tensor_file_write_f64(long file, const char *name, const double *data, int ndim,
                          const long *dims) {
    return write_array(file, name, H5T_NATIVE_DOUBLE, data, ndim, dims);
}

int tensor_file_write_scalar(long file, const char *name, double value) {
    return write_array(file, name, H5T_NATIVE_DOUBLE, &value, 0, NULL);
}

int tensor_file_close(long file) {
    return H5Fclose(file) < 0 ? -1 : 0;
}

/* ---- the HDF5 this binary was built with ------------------------------------------ */

int record_hdf5_is_parallel(void) {
#ifdef H5_HAVE_PARALLEL
    return 1;
#else
    return 0;
#endif
}

int record_require_parallel_hdf5(int is_parallel, char *err, size_t errlen) {
    if (is_parallel) return 0;
    unsigned major = 0, minor = 0, release = 0;
    H5get_libversion(&major, &minor, &release);
    snprintf(err, errlen,
             "this moesim was built with HDF5 %u.%u.%u without parallel (MPI-IO) support, and "
             "every rank writes its experts into one checkpoint through parallel HDF5; rebuild "
             "with a parallel HDF5: load its module (e.g. `module load hdf5/parallel` or "
             "`module load hdf5-mpi`), or point HDF5_DIR (or HDF5_CFLAGS and HDF5_LIBS) at it, "
             "then `make clean && make` (README, \"Building on a cluster\")",
             major, minor, release);
    return -1;
}

/* ---- checkpoints ----------------------------------------------------------------- */

long checkpoint_file_create(const char *path, const Comm *comm) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
#ifdef H5_HAVE_PARALLEL
    H5Pset_fapl_mpio(fapl, comm->world, MPI_INFO_NULL);
#else
    (void)comm; /* never reached: main refuses a serial HDF5 (record_require_parallel_hdf5) */
#endif
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    return file;
}

int checkpoint_write_f32(long file, const char *name, int ndim, const long *dims, const float *data,
                         long first_row, long rows, int writes) {
    hsize_t hd[4], start[4] = {0}, count[4];
    for (int i = 0; i < ndim; i++) hd[i] = count[i] = (hsize_t)dims[i];
    hid_t space = H5Screate_simple(ndim, hd, NULL);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    /* creation is collective: every rank, the same arguments */
    hid_t dset = H5Dcreate2(file, name, H5T_IEEE_F32LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = dset < 0 ? -1 : 0;
    if (dset >= 0 && writes && rows > 0) {
        start[0] = (hsize_t)first_row;
        count[0] = (hsize_t)rows;
        H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL);
        hid_t mem = H5Screate_simple(ndim, count, NULL);
        st = H5Dwrite(dset, H5T_NATIVE_FLOAT, mem, space, H5P_DEFAULT, data);
        H5Sclose(mem);
    }
    if (dset >= 0) H5Dclose(dset);
    H5Pclose(lcpl);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

int checkpoint_write_bytes(long file, const char *name, const char *data, long len, int writes) {
    hsize_t dims[1] = {(hsize_t)len};
    hid_t space = H5Screate_simple(1, dims, NULL);
    /* creation is collective: every rank, the same length */
    hid_t dset = H5Dcreate2(file, name, H5T_STD_U8LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = dset < 0 ? -1 : 0;
    if (dset >= 0 && writes && len > 0)
        st = H5Dwrite(dset, H5T_NATIVE_UCHAR, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (dset >= 0) H5Dclose(dset);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

int checkpoint_read_bytes(const char *path, const char *name, char **data, long *len) {
    *data = NULL;
    *len = 0;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return -1;
    int found = H5Lexists(file, name, H5P_DEFAULT) > 0, st = found ? -1 : 0;
    hid_t dset = found ? H5Dopen2(file, name, H5P_DEFAULT) : -1;
    if (dset >= 0) {
        hid_t space = H5Dget_space(dset);
        hssize_t n = H5Sget_simple_extent_npoints(space);
        char *buf = n > 0 ? malloc((size_t)n) : NULL;
        if (buf && H5Dread(dset, H5T_NATIVE_UCHAR, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) >= 0) {
            *data = buf;
            *len = (long)n;
            st = 1;
        } else {
            free(buf);
        }
        H5Sclose(space);
        H5Dclose(dset);
    }
    H5Fclose(file);
    return st;
}

int checkpoint_write_attributes(long file, const Config *cfg, long iteration, long optimizer_steps,
                                int world_size, int ep_size) {
    int st = write_config_attributes(file, cfg);
    st |= set_long_attr(file, "world_size", world_size);
    st |= set_long_attr(file, "ep_size", ep_size);
    st |= set_string_attr(file, "moesim_version", MOESIM_VERSION);
    st |= set_long_attr(file, "schema_version", MOESIM_CHECKPOINT_SCHEMA);
    st |= set_string_attr(file, "git_revision", MOESIM_GIT_REVISION);
    st |= set_long_attr(file, "iteration", iteration);
    st |= set_long_attr(file, "optimizer_steps", optimizer_steps);
    return st;
}

int checkpoint_file_close(long file) {
    return H5Fclose(file) < 0 ? -1 : 0;
}

long checkpoint_file_open(const char *path) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    return H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
}

int checkpoint_read_long(long file, const char *name, long *value) {
    return read_long_attr(file, name, value);
}

static void format_dims(char *buf, size_t len, int ndim, const hsize_t *dims) {
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < ndim && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%llu", i ? ", " : "",
                                 (unsigned long long)dims[i]);
    if (used < len) snprintf(buf + used, len - used, "]");
}

int checkpoint_read_f32(long file, const char *name, int ndim, const long *dims, float *data,
                        long first_row, long rows, char *err, size_t errlen) {
    hid_t dset = H5Dopen2(file, name, H5P_DEFAULT);
    if (dset < 0) {
        snprintf(err, errlen, "it has no tensor %s", name);
        return -1;
    }
    hid_t space = H5Dget_space(dset);
    hsize_t have[4] = {0}, want[4], start[4] = {0}, count[4];
    int have_ndim = H5Sget_simple_extent_ndims(space);
    if (have_ndim >= 0 && have_ndim <= 4) H5Sget_simple_extent_dims(space, have, NULL);
    int same = have_ndim == ndim;
    for (int i = 0; i < ndim; i++) {
        want[i] = count[i] = (hsize_t)dims[i];
        same = same && have[i] == want[i];
    }
    herr_t st = -1;
    if (!same) {
        char a[64], b[64];
        format_dims(a, sizeof a, have_ndim < 0 || have_ndim > 4 ? 0 : have_ndim, have);
        format_dims(b, sizeof b, ndim, want);
        snprintf(err, errlen, "its tensor %s has shape %s where this model's is %s", name, a, b);
    } else {
        start[0] = (hsize_t)first_row;
        count[0] = (hsize_t)rows;
        H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL);
        hid_t mem = H5Screate_simple(ndim, count, NULL);
        st = rows == 0 ? 0 : H5Dread(dset, H5T_NATIVE_FLOAT, mem, space, H5P_DEFAULT, data);
        H5Sclose(mem);
        if (st < 0) snprintf(err, errlen, "its tensor %s cannot be read (truncated?)", name);
    }
    H5Sclose(space);
    H5Dclose(dset);
    return st < 0 ? -1 : 0;
}

int checkpoint_file_close_read(long file) {
    return H5Fclose(file) < 0 ? -1 : 0;
}

/* ---- moesim project: reading a record, writing a projection --------------------- */

static int read_config_long(hid_t file, const char *key, long fallback, long *value) {
    char name[96];
    snprintf(name, sizeof name, "config.%s", key);
    *value = fallback;
    if (H5Aexists(file, name) <= 0) return fallback >= 0 ? 0 : -1;
    hid_t attr = H5Aopen(file, name, H5P_DEFAULT);
    herr_t st = attr < 0 ? -1 : H5Aread(attr, H5T_NATIVE_LONG, value);
    if (attr >= 0) H5Aclose(attr);
    return st < 0 ? -1 : 0;
}

/* A string config attribute equal to `want`. */
static int config_string_is(hid_t file, const char *key, const char *want) {
    char name[96], *value = NULL;
    snprintf(name, sizeof name, "config.%s", key);
    if (H5Aexists(file, name) <= 0) return 0;
    hid_t attr = H5Aopen(file, name, H5P_DEFAULT), type = utf8_string_type();
    int same = attr >= 0 && H5Aread(attr, type, &value) >= 0 && value && strcmp(value, want) == 0;
    if (value) H5free_memory(value);
    H5Tclose(type);
    if (attr >= 0) H5Aclose(attr);
    return same;
}

/* The whole dataset at path as `type` into a new buffer of elem bytes per
 * value; dims gets its shape. NULL when missing or unreadable. */
static void *read_whole(hid_t file, const char *path, hid_t type, size_t elem, int want_ndim,
                        hsize_t *dims) {
    /* negative (an error, not 0) when a parent group is missing */
    if (H5Lexists(file, path, H5P_DEFAULT) <= 0) return NULL;
    hid_t dset = H5Dopen2(file, path, H5P_DEFAULT);
    if (dset < 0) return NULL;
    hid_t space = H5Dget_space(dset);
    int ndim = H5Sget_simple_extent_dims(space, dims, NULL);
    size_t count = 1;
    for (int i = 0; i < ndim; i++) count *= dims[i];
    void *data = ndim == want_ndim ? malloc(elem * (count ? count : 1)) : NULL;
    if (data && count && H5Dread(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
        free(data);
        data = NULL;
    }
    H5Sclose(space);
    H5Dclose(dset);
    return data;
}

/* Each group-count row's drops from the logged step with the same step. */
static int read_projection_drops(hid_t file, ProjectRecord *in) {
    hsize_t sdims[4] = {0}, ddims[4] = {0};
    long *steps = read_whole(file, "/train/step", H5T_NATIVE_LONG, sizeof(long), 1, sdims);
    long *dropped =
        read_whole(file, "/routing/dropped_per_expert", H5T_NATIVE_LONG, sizeof(long), 3, ddims);
    size_t LE = (size_t)in->moe_layers * in->experts;
    in->dropped = calloc((size_t)in->rows * (LE ? LE : 1), sizeof(long));
    int ok = in->dropped != NULL;
    for (int r = 0; ok && steps && dropped && ddims[0] == sdims[0] && r < in->rows; r++)
        for (hsize_t i = 0; i < sdims[0]; i++)
            if (steps[i] == in->steps[r])
                memcpy(in->dropped + r * LE, dropped + i * LE, sizeof(long) * LE);
    free(steps);
    free(dropped);
    return ok ? 0 : -1;
}

/* /routing/group_expert_drops (schema 9), shaped as the kept counts; a
 * schema-8 record has none, and the projection then has no drops per rank. */
static int read_group_drops(hid_t file, ProjectRecord *in, const hsize_t *count_dims) {
    if (H5Lexists(file, "/routing/group_expert_drops", H5P_DEFAULT) <= 0) return 0;
    hsize_t dims[4] = {0};
    in->group_drops =
        read_whole(file, "/routing/group_expert_drops", H5T_NATIVE_INT, sizeof(int), 4, dims);
    return in->group_drops && memcmp(dims, count_dims, sizeof dims) == 0 ? 0 : -1;
}

int record_read_projection(const char *path, ProjectRecord *in, char *err, size_t errlen) {
    memset(in, 0, sizeof *in);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) {
        snprintf(err, errlen, "cannot open the run record %s; give the --out of a moesim train run",
                 path);
        return -1;
    }
    long schema = 0, v[14];
    int st = read_long_attr(file, "schema_version", &schema);
    if (st != 0 || schema < 8) {
        snprintf(err, errlen,
                 "%s has no /routing/group_expert_counts (run record schema %ld; moesim project "
                 "needs schema 8 or later with --record-group-counts-interval above 0): re-run "
                 "the training with this moesim",
                 path, schema);
        H5Fclose(file);
        return -1;
    }
    const char *keys[] = {"num_experts",       "moe_router_topk",    "micro_batch_size",
                          "seq_length",        "hidden_size",        "num_attention_heads",
                          "ffn_hidden_size",   "moe_ffn_hidden_size", "num_layers",
                          "moe_shared_expert_intermediate_size"};
    for (int i = 0; i < 10; i++) st |= read_config_long(file, keys[i], i == 9 ? 0 : -1, &v[i]);
    st |= read_long_attr(file, "world_size", &v[10]);
    st |= read_long_attr(file, "params_total", &in->params_total);
    st |= read_long_attr(file, "params_active_per_token", &in->params_active_per_token);
    if (read_long_attr(file, "vocab_size", &v[11]) != 0) v[11] = 256;
    hsize_t dims[4] = {0}, sdims[4] = {0};
    in->group_counts = st ? NULL
                          : read_whole(file, "/routing/group_expert_counts", H5T_NATIVE_INT,
                                       sizeof(int), 4, dims);
    in->steps = in->group_counts ? read_whole(file, "/routing/group_counts_step", H5T_NATIVE_LONG,
                                              sizeof(long), 1, sdims)
                                 : NULL;
    if (!in->group_counts || !in->steps || sdims[0] != dims[0] || dims[0] == 0) {
        snprintf(err, errlen,
                 "%s holds no /routing/group_expert_counts rows (trained with "
                 "--record-group-counts-interval 0, stopped before the first row, or corrupt); "
                 "re-run the training with --record-group-counts-interval 1",
                 path);
        H5Fclose(file);
        project_record_free(in);
        return -1;
    }
    in->rows = (int)dims[0];
    in->moe_layers = (int)dims[1];
    in->routing_groups = (int)dims[2];
    in->experts = (int)v[0];
    in->top_k = (int)v[1];
    in->micro_batch = (int)v[2];
    in->seq_length = (int)v[3];
    in->hidden = (int)v[4];
    in->heads = (int)v[5];
    in->ffn_hidden = (int)v[6];
    in->moe_ffn_hidden = (int)v[7];
    in->num_layers = (int)v[8];
    in->shared_ffn_hidden = (int)v[9];
    in->recorded_world = (int)v[10];
    in->vocab = (int)v[11];
    in->swiglu = config_string_is(file, "moe_expert_activation", "swiglu");
    double cf = 0.0;
    if (H5Aexists(file, "config.moe_expert_capacity_factor") > 0) {
        hid_t attr = H5Aopen(file, "config.moe_expert_capacity_factor", H5P_DEFAULT);
        if (attr < 0 || H5Aread(attr, H5T_NATIVE_DOUBLE, &cf) < 0) cf = -1.0;
        if (attr >= 0) H5Aclose(attr);
    }
    in->capacity_factor = cf;
    long min_capacity = 0;
    read_config_long(file, "moe_min_capacity", 0, &min_capacity);
    in->min_capacity = (int)min_capacity;
    in->capacity_by_expert = config_string_is(file, "moe_router_type", "expert_choice") ||
                             config_string_is(file, "moe_router_type", "soft");
    in->bf16 = config_string_is(file, "precision", "bf16");
    st = (int)dims[3] != in->experts || read_projection_drops(file, in) != 0 ||
         read_group_drops(file, in, dims) != 0;
    H5Fclose(file);
    if (st) {
        snprintf(err, errlen, "%s: /routing/group_expert_counts does not match the record's "
                 "config (corrupt?); re-run the training", path);
        project_record_free(in);
        return -1;
    }
    return 0;
}

static int write_projection_array(hid_t file, const char *path, hid_t mem_type, hid_t file_type, int ndim,
                       const hsize_t *dims, const void *data, const char *units) {
    hid_t space = H5Screate_simple(ndim, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    int empty = 0;
    for (int i = 0; i < ndim; i++) empty |= dims[i] == 0;
    if (!empty) {
        H5Pset_chunk(dcpl, ndim, dims);
        H5Pset_deflate(dcpl, 4);
    }
    hid_t dset = H5Dcreate2(file, path, file_type, space, lcpl, dcpl, H5P_DEFAULT);
    int st = dset < 0 || (!empty && H5Dwrite(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                                             data) < 0);
    if (dset >= 0) st |= set_string_attr(dset, "units", units) != 0;
    if (dset >= 0) H5Dclose(dset);
    H5Pclose(lcpl);
    H5Pclose(dcpl);
    H5Sclose(space);
    return st ? -1 : 0;
}

int record_write_projection(const char *path, const ProjectOutput *o, char *err, size_t errlen) {
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (file < 0) {
        snprintf(err, errlen,
                 "cannot create the projection --out %s; check that its directory exists and is "
                 "writable",
                 path);
        return -1;
    }
    const ProjectRecord *in = o->in;
    hsize_t R = (hsize_t)in->rows, P = (hsize_t)o->lay->world, N = (hsize_t)o->nodes;
    hsize_t L = (hsize_t)in->moe_layers;
    int st = set_long_attr(file, "schema_version", MOESIM_SCHEMA_VERSION);
    st |= set_string_attr(file, "moesim_version", MOESIM_VERSION);
    st |= set_string_attr(file, "cluster", o->cluster_path);
    st |= set_string_attr(file, "cluster_name", o->cluster->name);
    st |= set_long_attr(file, "world_size", o->lay->world);
    st |= set_long_attr(file, "ep_size", o->lay->ep);
    st |= set_long_attr(file, "ranks_per_node", o->lay->ranks_per_node);
    st |= set_long_attr(file, "nodes", o->nodes);
    st |= set_string_attr(file, "dispatcher", o->lay->hierarchical ? "hierarchical" : "alltoall");
    st |= set_long_attr(file, "overlap_chunks", o->lay->overlap_chunks);
    st |= set_long_attr(file, "moe_expert_shadowing", o->lay->shadowing);
    st |= set_string_array_attr(file, "phases", phase_names, PHASE_COUNT);
    hsize_t d1[1] = {R}, d3[3], d3p[3] = {R, P, PHASE_COUNT};
    st |= write_projection_array(file, "/projection/step", H5T_NATIVE_LONG, H5T_STD_I64LE, 1, d1, in->steps,
                      "step");
    if (o->dispatch_bytes) {
        d3[0] = R, d3[1] = P, d3[2] = P;
        st |= write_projection_array(file, "/projection/dispatch_bytes", H5T_NATIVE_LONG, H5T_STD_I64LE, 3,
                          d3, o->dispatch_bytes, "bytes");
    }
    d3[0] = R, d3[1] = N, d3[2] = N;
    st |= write_projection_array(file, "/projection/node_dispatch_bytes", H5T_NATIVE_LONG, H5T_STD_I64LE, 3,
                      d3, o->node_bytes, "bytes");
    d3[0] = R, d3[1] = L, d3[2] = P;
    st |= write_projection_array(file, "/projection/expert_rows", H5T_NATIVE_LONG, H5T_STD_I64LE, 3, d3,
                      o->expert_rows, "assignments");
    d3[1] = L, d3[2] = (hsize_t)in->experts;
    st |= write_projection_array(file, "/projection/dropped_per_expert", H5T_NATIVE_LONG, H5T_STD_I64LE, 3,
                      d3, in->dropped, "assignments");
    d3[2] = P;
    if (o->dropped_per_rank)
        st |= write_projection_array(file, "/projection/dropped_per_rank", H5T_NATIVE_LONG,
                                     H5T_STD_I64LE, 3, d3, o->dropped_per_rank, "assignments");
    if (o->shadowed_rows) {
        hsize_t d2[2] = {R, L};
        st |= write_projection_array(file, "/projection/shadowed_rows", H5T_NATIVE_LONG,
                                     H5T_STD_I64LE, 2, d2, o->shadowed_rows, "rows");
    }
    st |= write_projection_array(file, "/projection/phase_s", H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, 3, d3p,
                      o->phase_s, "s");
    st |= write_projection_array(file, "/projection/balanced_phase_s", H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, 3,
                      d3p, o->balanced_phase_s, "s");
    st |= write_projection_array(file, "/projection/step_time_s", H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, 1, d1,
                      o->step_time_s, "s");
    st |= write_projection_array(file, "/projection/balanced_step_time_s", H5T_NATIVE_DOUBLE,
                      H5T_IEEE_F64LE, 1, d1, o->balanced_step_time_s, "s");
    st |= write_projection_array(file, "/projection/mfu", H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, 1, d1, o->mfu,
                      "1");
    st |= H5Fclose(file) < 0;
    if (st) {
        snprintf(err, errlen, "cannot write the projection %s (HDF5 error); check free disk space",
                 path);
        return -1;
    }
    return 0;
}
