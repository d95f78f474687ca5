/* export_reference: writes everything tests/python/test_reference.py needs to
 * check the C model against an independent PyTorch implementation — the
 * initial weights, training batch 0, the logits, the losses, every routing
 * decision and every gradient of one forward + backward — into one HDF5
 * tensor file.
 *
 * usage: export_reference OUT.h5 [--weight-scale S] [--config FILE.ini] [--key value ...]
 * (the same flags as `moesim train`; --out is ignored: OUT.h5 is the output).
 * Runs on one rank. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/comm.h"
#include "moesim/config.h"
#include "moesim/data.h"
#include "moesim/model.h"
#include "moesim/moe.h"
#include "moesim/ops.h"
#include "moesim/platform.h"
#include "moesim/record.h"

typedef struct Export {
    long file;
    int failed;
    char first_failure[160];
} Export;

/* Write helpers remember the first failure, so the export code below reads
 * as a plain list of what goes into the file. */
static void note(Export *ex, int rc, const char *name) {
    if (rc == 0 || ex->failed) return;
    ex->failed = 1;
    snprintf(ex->first_failure, sizeof ex->first_failure, "%s", name);
}

static void put_f32(Export *ex, const char *name, const float *data, int ndim, const long *dims) {
    note(ex, tensor_file_write_f32(ex->file, name, data, ndim, dims), name);
}

static void put_i32(Export *ex, const char *name, const int *data, int ndim, const long *dims) {
    note(ex, tensor_file_write_i32(ex->file, name, data, ndim, dims), name);
}

static void put_scalar(Export *ex, const char *name, double value) {
    note(ex, tensor_file_write_scalar(ex->file, name, value), name);
}

static void put_config(Export *ex, const ModelShape *s) {
    put_scalar(ex, "config/V", s->V);
    put_scalar(ex, "config/T", s->T);
    put_scalar(ex, "config/C", s->C);
    put_scalar(ex, "config/NH", s->NH);
    put_scalar(ex, "config/L", s->L);
    put_scalar(ex, "config/F", s->F);
    put_scalar(ex, "config/E", s->E);
    put_scalar(ex, "config/K", s->K);
    put_scalar(ex, "config/Fe", s->Fe);
    put_scalar(ex, "config/G", s->G);
    put_scalar(ex, "config/B", s->B);
    put_scalar(ex, "config/moe_layer_freq", s->moe_layer_freq);
    put_scalar(ex, "config/tied", s->tied);
    put_scalar(ex, "config/norm_topk_prob", s->norm_topk_prob);
    put_scalar(ex, "config/capacity_factor", s->capacity_factor);
    put_scalar(ex, "config/min_capacity", s->min_capacity);
    put_scalar(ex, "config/aux_loss_coeff", s->aux_loss_coeff);
    put_scalar(ex, "config/z_loss_coeff", s->z_loss_coeff);
    put_scalar(ex, "config/router_type", s->router_type);
    put_scalar(ex, "config/sigmoid_scores", s->sigmoid_scores);
    put_scalar(ex, "config/softmax_over_selected", s->softmax_over_selected);
    put_scalar(ex, "config/drop_by_prob", s->drop_by_prob);
    put_scalar(ex, "config/balancing", s->balancing);
    put_scalar(ex, "config/importance_loss_coeff", s->importance_loss_coeff);
    put_scalar(ex, "config/load_loss_coeff", s->load_loss_coeff);
    put_scalar(ex, "config/jitter_eps", s->jitter_eps);
    put_scalar(ex, "config/expert_bias", s->expert_bias);
    put_scalar(ex, "config/swiglu", s->expert_activation == FFN_SWIGLU);
    put_scalar(ex, "config/shared_F", s->shared_F);
    put_scalar(ex, "config/num_groups", s->router_groups);
    put_scalar(ex, "config/group_topk", s->router_group_topk);
    put_scalar(ex, "config/hier_groups", s->hier_groups);
    put_scalar(ex, "config/hier_group_topk", s->hier_group_topk);
    put_scalar(ex, "config/expert_dropout", s->expert_dropout);
}

/* One group per tensor-table entry; when tied, lm_head_w is no entry of the
 * table, so its gradient is (correctly) part of grads/wte. */
static void put_tensors(Export *ex, const Model *m, const char *group, const float *base) {
    for (int i = 0; i < m->num_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        char name[96];
        long dims[3];
        for (int d = 0; d < t->ndim; d++) dims[d] = t->shape[d];
        snprintf(name, sizeof name, "%s/%s", group, t->name);
        put_f32(ex, name, base + t->offset, t->ndim, dims);
    }
}

/* Expert dropout's factors [N, slots, Fe] for every kept assignment (ones
 * elsewhere): the row-th kept assignment of an expert among a grain's tokens,
 * in token order, gets moe_expert_dropout_mask of (expert, grain, row), the
 * layer's layout-invariant definition; the reference multiplies the
 * assignment's hidden units by them. */
static int put_dropout_masks(Export *ex, const Model *m, int l) {
    const ModelShape *s = &m->shape;
    const Routing *r = &m->moe[l].routing;
    long N = (long)s->B * s->T, slots = r->slots;
    int grain_tokens = routing_grain_tokens(&m->moe_shape.router);
    float *mask = malloc(sizeof(float) * N * slots * s->Fe);
    int *rows = calloc((size_t)s->E, sizeof(int));
    if (!mask || !rows) {
        free(mask);
        free(rows);
        return -1;
    }
    for (long a = 0; a < N * slots; a++) {
        float *row_mask = mask + a * s->Fe;
        long t = a / slots;
        if (t % grain_tokens == 0 && a % slots == 0) memset(rows, 0, sizeof(int) * s->E);
        if (!r->choice_kept[a]) {
            for (int f = 0; f < s->Fe; f++) row_mask[f] = 1.0f;
            continue;
        }
        int e = r->choice_expert[a];
        moe_expert_dropout_mask(row_mask, s->Fe, s->expert_dropout, &m->moe[l].ctx, e,
                                t / grain_tokens, rows[e]++);
    }
    long dims[3] = {N, slots, s->Fe};
    char name[96];
    snprintf(name, sizeof name, "routing/%d/dropout_mask", l);
    put_f32(ex, name, mask, 3, dims);
    free(mask);
    free(rows);
    return 0;
}

/* Every routing decision, and every random draw behind one, so the reference
 * can recompute the rest: choice_kept and choice_routed are unsigned char in
 * the router; int32 is what h5py and the test compare most simply. */
static void put_routing(Export *ex, const Model *m, int *flag_scratch) {
    const ModelShape *s = &m->shape;
    long N = (long)s->B * s->T;
    for (int l = 0; l < s->L; l++) {
        if (!model_is_moe_layer(s, l)) continue;
        const Routing *r = &m->moe[l].routing;
        long dims[2] = {N, r->slots}, noise_dims[2] = {N, s->E}, jitter_dims[2] = {N, s->C};
        long token_dims[1] = {N}, expert_dims[1] = {s->E}, group_dims[2] = {N, s->hier_groups};
        char name[96];
#define NAME(what) (snprintf(name, sizeof name, "routing/%d/%s", l, what), name)
        put_i32(ex, NAME("choice_expert"), r->choice_expert, 2, dims);
        for (long a = 0; a < N * r->slots; a++) flag_scratch[a] = r->choice_kept[a];
        put_i32(ex, NAME("choice_kept"), flag_scratch, 2, dims);
        for (long a = 0; a < N * r->slots; a++) flag_scratch[a] = r->choice_routed[a];
        put_i32(ex, NAME("choice_routed"), flag_scratch, 2, dims);
        put_scalar(ex, NAME("capacity"), r->capacity);
        if (r->noise) put_f32(ex, NAME("noise"), r->noise, 2, noise_dims);
        if (r->group_noise) put_f32(ex, NAME("group_noise"), r->group_noise, 2, group_dims);
        if (r->jitter) put_f32(ex, NAME("jitter"), r->jitter, 2, jitter_dims);
        if (r->second_draw)
            note(ex, tensor_file_write_f64(ex->file, NAME("second_draw"), r->second_draw, 1,
                                           token_dims),
                 name);
        if (m->expert_bias && m->expert_bias[l])
            put_f32(ex, NAME("expert_bias"), m->expert_bias[l], 1, expert_dims);
        if (s->expert_dropout > 0 && put_dropout_masks(ex, m, l) != 0)
            note(ex, -1, NAME("dropout_mask (out of memory)"));
#undef NAME
    }
}

/* A fresh model's expert bias is zero, which would leave biased selection
 * untested: give each layer a distinct spread of a few hundredths, enough to
 * move selections between near-equal scores. */
static void spread_expert_bias(Model *m) {
    const ModelShape *s = &m->shape;
    for (int l = 0; l < s->L; l++)
        if (m->expert_bias && m->expert_bias[l])
            for (int e = 0; e < s->E; e++)
                m->expert_bias[l][e] = 0.02f * (float)((e * 5 + l) % s->E - (s->E - 1) / 2.0);
}

/* Scales every initialised-at-random tensor: at the default 0.02 init the FFN
 * pre-activations stay below ~0.5, where tanh-GELU and exact GELU (and other
 * near-linear mistakes) agree to 1e-5; scaled weights exercise the curvature. */
static void scale_weights(Model *m, double scale) {
    for (int i = 0; i < m->num_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->init_std <= 0) continue;
        for (size_t j = 0; j < t->numel; j++) m->params[t->offset + j] *= (float)scale;
    }
}

static int run(const char *out_path, double weight_scale, int argc, char **argv, char *err,
               size_t errlen) {
    Config cfg;
    config_defaults(&cfg);
    if (config_parse_args(&cfg, argc, argv, err, errlen) != 0) return -1;
    /* Validation checks cfg.out's directory; make that the file we write. */
    if (snprintf(cfg.out, sizeof cfg.out, "%s", out_path) >= (int)sizeof cfg.out) {
        snprintf(err, errlen, "output path %s is too long; use a shorter path", out_path);
        return -1;
    }
    if (config_validate(&cfg, err, errlen) != 0) return -1;
    config_resolve(&cfg);
    /* The forward and backward run in the float mode moesim trains in. */
    platform_set_flush_denormals(NULL, cfg.flush_denormals);
    Dataset ds;
    if (dataset_load(&ds, &cfg, err, errlen) != 0) return -1;

    ModelShape shape;
    model_shape_from_config(&shape, &cfg, ds.vocab_size, 1, 0);
    Model model;
    Comm self;
    comm_attach_self(&self);
    if (model_init(&model, &shape, cfg.seed, &self) != 0) {
        dataset_free(&ds);
        snprintf(err, errlen, "out of memory building the model; use a smaller config");
        return -1;
    }
    scale_weights(&model, weight_scale);
    spread_expert_bias(&model);
    model.router_ctx = (RouterContext){.training = 1, .seed = (uint64_t)cfg.seed};
    long N = (long)shape.B * shape.T;
    int *inputs = malloc(sizeof(int) * N);
    int *targets = malloc(sizeof(int) * N);
    int *categories = malloc(sizeof(int) * N);
    int *kept = malloc(sizeof(int) * N * (shape.K > shape.E ? shape.K : shape.E));
    float *logits = malloc(sizeof(float) * N * shape.V);
    int rc = -1;
    if (!inputs || !targets || !categories || !kept || !logits) {
        snprintf(err, errlen, "out of memory for the batch buffers; use a smaller config");
        goto done;
    }

    dataset_train_batch(&ds, cfg.seed, 0, 0, shape.B, shape.T, inputs, targets, categories);
    double loss = model_forward(&model, inputs, targets);
    /* model->probs already holds probabilities and backward overwrites it
     * with dlogits, so the logits are recomputed from the final norm. */
    matmul_forward(logits, model.lnf, model.w.lm_head_w, (int)N, shape.C, shape.V,
                   &model.matmul);
    model_zero_grad(&model);
    model_backward(&model);
    model_reduce_gradients(&model);

    Export ex = {.file = tensor_file_create(out_path)};
    if (ex.file < 0) {
        snprintf(err, errlen, "cannot create %s; check that its directory exists and is writable",
                 out_path);
        goto done;
    }
    long batch_dims[2] = {shape.B, shape.T}, logits_dims[2] = {N, shape.V};
    put_config(&ex, &shape);
    put_tensors(&ex, &model, "params", model.params);
    put_tensors(&ex, &model, "grads", model.grads);
    put_i32(&ex, "inputs", inputs, 2, batch_dims);
    put_i32(&ex, "targets", targets, 2, batch_dims);
    put_f32(&ex, "logits", logits, 2, logits_dims);
    put_scalar(&ex, "loss", loss);
    put_scalar(&ex, "ce_loss", model.ce_loss);
    put_scalar(&ex, "aux_loss", model.aux_loss);
    put_scalar(&ex, "z_loss", model.z_loss);
    put_scalar(&ex, "importance_loss", model.importance_loss);
    put_scalar(&ex, "load_loss", model.load_loss);
    put_routing(&ex, &model, kept);
    note(&ex, tensor_file_close(ex.file), "(closing the file)");
    if (ex.failed) {
        snprintf(err, errlen, "writing %s failed at %s; check free disk space and permissions",
                 out_path, ex.first_failure);
        goto done;
    }
    rc = 0;
done:
    free(inputs);
    free(targets);
    free(categories);
    free(kept);
    free(logits);
    model_free(&model);
    dataset_free(&ds);
    return rc;
}

int main(int argc, char **argv) {
    Platform platform;
    platform_start(&platform, argv);
    Comm comm;
    comm_init(&comm, &argc, &argv);
    int status = 2;
    char err[MOESIM_ERR_MAX] = "";
    if (argc < 2 || strncmp(argv[1], "--", 2) == 0) {
        fprintf(stderr,
                "usage: export_reference OUT.h5 [--weight-scale S] [--config FILE.ini] [--key "
                "value ...]\n");
    } else if (comm.world_size != 1) {
        fprintf(stderr, "export_reference: error: run it on one rank (no mpirun -n %d)\n",
                comm.world_size);
    } else {
        /* config_parse_args expects argv[0] to be the subcommand name; OUT.h5
         * (or the weight scale's value) takes that slot. */
        const char *out_path = argv[1];
        double weight_scale = 1.0;
        if (argc >= 4 && strcmp(argv[2], "--weight-scale") == 0) {
            weight_scale = atof(argv[3]);
            argc -= 2;
            argv += 2;
        }
        status = run(out_path, weight_scale, argc - 1, argv + 1, err, sizeof err) == 0 ? 0 : 1;
        if (status != 0) fprintf(stderr, "export_reference: error: %s\n", err);
    }
    comm_finalize(&comm);
    return status;
}
