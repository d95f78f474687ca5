#include "moesim/record.h"

#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SERIES_CHUNK 256
#define ROUTING_CHUNK 16

static int write_string_attr(hid_t loc, const char *name, const char *value) {
    /* Variable-length UTF-8, so h5py hands Python users a str, not bytes. */
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(loc, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = attr < 0 ? -1 : H5Awrite(attr, type, &value);
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    H5Tclose(type);
    return st < 0 ? -1 : 0;
}

static int write_long_array_attr(hid_t loc, const char *name, const long *values, int n) {
    hsize_t dims[1] = {(hsize_t)n};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t attr = H5Acreate2(loc, name, H5T_NATIVE_LONG, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = attr < 0 ? -1 : H5Awrite(attr, H5T_NATIVE_LONG, values);
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

static int write_long_attr(hid_t loc, const char *name, long value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(loc, name, H5T_NATIVE_LONG, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = attr < 0 ? -1 : H5Awrite(attr, H5T_NATIVE_LONG, &value);
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

/* An extendible dataset of rows shaped [unlimited, tail...]. */
static hid_t create_series(hid_t file, const char *path, hid_t type, int tail_ndim,
                           const hsize_t *tail, hsize_t chunk_rows, const char *units) {
    hsize_t dims[3] = {0}, maxdims[3] = {H5S_UNLIMITED}, chunk[3] = {chunk_rows};
    for (int i = 0; i < tail_ndim; i++) dims[i + 1] = maxdims[i + 1] = chunk[i + 1] = tail[i];
    hid_t space = H5Screate_simple(1 + tail_ndim, dims, maxdims);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1 + tail_ndim, chunk);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t dset = H5Dcreate2(file, path, type, space, lcpl, dcpl, H5P_DEFAULT);
    if (dset >= 0 && units) write_string_attr(dset, "units", units);
    H5Pclose(lcpl);
    H5Pclose(dcpl);
    H5Sclose(space);
    return dset;
}

static int append_rows(hid_t dset, hid_t type, long row, const void *data) {
    hid_t space = H5Dget_space(dset);
    int ndim = H5Sget_simple_extent_ndims(space);
    hsize_t dims[3], start[3] = {0}, count[3];
    H5Sget_simple_extent_dims(space, dims, NULL);
    H5Sclose(space);
    dims[0] = (hsize_t)row + 1;
    if (H5Dset_extent(dset, dims) < 0) return -1;
    space = H5Dget_space(dset);
    start[0] = (hsize_t)row;
    for (int i = 0; i < ndim; i++) count[i] = i == 0 ? 1 : dims[i];
    H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t mem = H5Screate_simple(ndim, count, NULL);
    herr_t st = H5Dwrite(dset, type, mem, space, H5P_DEFAULT, data);
    H5Sclose(mem);
    H5Sclose(space);
    return st < 0 ? -1 : 0;
}

static void iso8601_now(char *buf, size_t len) {
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static int write_root_attributes(hid_t file, const Config *cfg, const RecordLayout *layout) {
    char *ini = config_to_ini(cfg);
    char started[32];
    iso8601_now(started, sizeof started);
    int st = 0;
    st |= write_string_attr(file, "moesim_version", MOESIM_VERSION);
    st |= write_long_attr(file, "schema_version", MOESIM_SCHEMA_VERSION);
    st |= write_string_attr(file, "config", ini ? ini : "");
    st |= write_long_attr(file, "world_size", layout->world_size);
    st |= write_long_attr(file, "ep_size", layout->ep_size);
    st |= write_long_attr(file, "total_params", layout->total_params);
    st |= write_long_array_attr(file, "param_bytes_per_rank", layout->param_bytes_per_rank,
                                layout->world_size);
    st |= write_long_attr(file, "seed", cfg->seed);
    st |= write_string_attr(file, "start_time", started);
    st |= write_string_attr(file, "status", "running");
    free(ini);
    return st;
}

void record_library_open(void) {
    H5dont_atexit();
    H5open();
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void record_library_close(void) {
    if (H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) == 0) H5close();
}

int record_open(Record *r, const char *path, const Config *cfg, const RecordLayout *layout,
                char *err, size_t errlen) {
    memset(r, 0, sizeof *r);
    r->world_size = layout->world_size;
    r->timing_row = malloc(sizeof(double) * layout->world_size);
    if (!r->timing_row) {
        snprintf(err, errlen, "out of memory opening the run record %s", path);
        return -1;
    }
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (file < 0) {
        snprintf(err, errlen,
                 "cannot create the run record --out %s; check that its directory "
                 "exists and is writable",
                 path);
        free(r->timing_row);
        r->timing_row = NULL;
        return -1;
    }
    r->file = file;
    hsize_t routing_tail[2] = {(hsize_t)layout->moe_layers, (hsize_t)layout->experts};
    hsize_t ranks[2] = {(hsize_t)layout->world_size, (hsize_t)layout->world_size};
    hid_t d = H5T_NATIVE_DOUBLE, i64 = H5T_NATIVE_LONG;
    r->train_step = create_series(file, "/train/step", i64, 0, NULL, SERIES_CHUNK, "step");
    r->train_loss = create_series(file, "/train/loss", d, 0, NULL, SERIES_CHUNK, "nats/token");
    r->train_aux = create_series(file, "/train/aux_loss", d, 0, NULL, SERIES_CHUNK, "loss");
    r->train_z = create_series(file, "/train/z_loss", d, 0, NULL, SERIES_CHUNK, "loss");
    r->train_lr = create_series(file, "/train/lr", d, 0, NULL, SERIES_CHUNK, "1");
    r->train_grad_norm = create_series(file, "/train/grad_norm", d, 0, NULL, SERIES_CHUNK, "1");
    r->train_tps = create_series(file, "/train/tokens_per_s", d, 0, NULL, SERIES_CHUNK, "tokens/s");
    r->eval_step = create_series(file, "/eval/step", i64, 0, NULL, SERIES_CHUNK, "step");
    r->eval_loss = create_series(file, "/eval/loss", d, 0, NULL, SERIES_CHUNK, "nats/token");
    r->tokens_per_expert = create_series(file, "/routing/tokens_per_expert", i64, 2, routing_tail,
                                         ROUTING_CHUNK, "assignments");
    r->dropped_per_expert = create_series(file, "/routing/dropped_per_expert", i64, 2, routing_tail,
                                          ROUTING_CHUNK, "assignments");
    char name[64];
    int failed = 0;
    for (int p = 0; p < PHASE_COUNT; p++) {
        snprintf(name, sizeof name, "/timing/%s", phase_names[p]);
        r->timing[p] = create_series(file, name, d, 1, ranks, SERIES_CHUNK, "s");
        failed |= r->timing[p] < 0;
    }
    r->dispatch_bytes =
        create_series(file, "/traffic/dispatch_bytes", i64, 2, ranks, ROUTING_CHUNK, "bytes");
    long ids[] = {r->train_step, r->train_loss,        r->train_aux,          r->train_z,
                  r->train_lr,   r->train_grad_norm,   r->train_tps,          r->eval_step,
                  r->eval_loss,  r->tokens_per_expert, r->dropped_per_expert, r->dispatch_bytes};
    failed |= write_root_attributes(file, cfg, layout) != 0;
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) failed |= ids[i] < 0;
    if (failed || H5Fflush(file, H5F_SCOPE_GLOBAL) < 0) {
        snprintf(err, errlen,
                 "cannot write the run record %s (HDF5 error); check free disk "
                 "space and permissions",
                 path);
        record_close(r, 0);
        return -1;
    }
    return 0;
}

int record_append_train(Record *r, const TrainRow *row, const StepDetail *detail) {
    long n = r->train_rows;
    hid_t d = H5T_NATIVE_DOUBLE;
    int st = append_rows(r->train_step, H5T_NATIVE_LONG, n, &row->step);
    st |= append_rows(r->train_loss, d, n, &row->loss);
    st |= append_rows(r->train_aux, d, n, &row->aux_loss);
    st |= append_rows(r->train_z, d, n, &row->z_loss);
    st |= append_rows(r->train_lr, d, n, &row->lr);
    st |= append_rows(r->train_grad_norm, d, n, &row->grad_norm);
    st |= append_rows(r->train_tps, d, n, &row->tokens_per_s);
    st |= append_rows(r->tokens_per_expert, H5T_NATIVE_LONG, n, detail->tokens_per_expert);
    st |= append_rows(r->dropped_per_expert, H5T_NATIVE_LONG, n, detail->dropped_per_expert);
    for (int p = 0; p < PHASE_COUNT; p++) {
        for (int rank = 0; rank < r->world_size; rank++)
            r->timing_row[rank] = detail->phase_s[rank * PHASE_COUNT + p];
        st |= append_rows(r->timing[p], d, n, r->timing_row);
    }
    st |= append_rows(r->dispatch_bytes, H5T_NATIVE_LONG, n, detail->dispatch_bytes);
    r->train_rows++;
    return st ? -1 : 0;
}

int record_append_eval(Record *r, long step, double loss) {
    int st = append_rows(r->eval_step, H5T_NATIVE_LONG, r->eval_rows, &step);
    st |= append_rows(r->eval_loss, H5T_NATIVE_DOUBLE, r->eval_rows, &loss);
    r->eval_rows++;
    return st ? -1 : 0;
}

int record_flush(Record *r) {
    return H5Fflush(r->file, H5F_SCOPE_GLOBAL) < 0 ? -1 : 0;
}

int record_close(Record *r, int complete) {
    if (r->file <= 0) return 0;
    int st = 0;
    if (H5Aexists(r->file, "status") > 0) H5Adelete(r->file, "status");
    st |= write_string_attr(r->file, "status", complete ? "complete" : "failed");
    long ids[] = {r->train_step, r->train_loss,        r->train_aux,          r->train_z,
                  r->train_lr,   r->train_grad_norm,   r->train_tps,          r->eval_step,
                  r->eval_loss,  r->tokens_per_expert, r->dropped_per_expert, r->dispatch_bytes};
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++)
        if (ids[i] > 0) H5Dclose(ids[i]);
    for (int p = 0; p < PHASE_COUNT; p++)
        if (r->timing[p] > 0) H5Dclose(r->timing[p]);
    free(r->timing_row);
    if (H5Fclose(r->file) < 0) st = -1;
    r->file = 0;
    return st ? -1 : 0;
}

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

int tensor_file_write_scalar(long file, const char *name, double value) {
    return write_array(file, name, H5T_NATIVE_DOUBLE, &value, 0, NULL);
}

int tensor_file_close(long file) {
    return H5Fclose(file) < 0 ? -1 : 0;
}
