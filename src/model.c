#include "moesim/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/attention.h"
#include "moesim/ffn.h"
#include "moesim/ops.h"
#include "moesim/rng.h"
#include "moesim/vecmath.h"

#define DEFAULT_INIT_STD 0.02 /* GPT-2's and Megatron's --init-method-std */
#define ZEROS (-1.0) /* add_tensor's init_std for tensors that start at zero */

void model_shape_from_config(ModelShape *s, const Config *cfg, int vocab_size, int ep_size,
                             int ep_rank) {
    memset(s, 0, sizeof *s);
    s->ep_size = ep_size;
    s->ep_rank = ep_rank;
    s->hierarchical_dispatch = strcmp(cfg->moe_token_dispatcher_type, "hierarchical") == 0;
    s->overlap_chunks = cfg->moe_overlap_chunks;
    s->overlap_grad_reduce = cfg->overlap_grad_reduce;
    s->expert_shadowing = cfg->moe_expert_shadowing;
    s->shadow_min_rows = cfg->moe_shadow_min_rows;
    s->V = vocab_size;
    s->T = cfg->seq_length;
    s->C = cfg->hidden_size;
    s->NH = cfg->num_attention_heads;
    s->L = cfg->num_layers;
    s->F = cfg->ffn_hidden_size;
    s->E = cfg->num_experts;
    s->K = cfg->moe_router_topk;
    s->Fe = cfg->moe_ffn_hidden_size;
    s->B = cfg->micro_batch_size;
    s->G = cfg->moe_group_size > 0 ? cfg->moe_group_size : cfg->micro_batch_size * cfg->seq_length;
    s->moe_layer_freq = cfg->moe_layer_freq;
    s->tied = !cfg->untie_embeddings_and_output_weights;
    s->norm_topk_prob = cfg->moe_router_norm_topk_prob;
    s->capacity_factor = cfg->moe_expert_capacity_factor;
    s->aux_loss_coeff = cfg->moe_aux_loss_coeff;
    s->z_loss_coeff = cfg->moe_z_loss_coeff;
    s->eval_capacity_factor = cfg->moe_eval_capacity_factor < 0 ? cfg->moe_expert_capacity_factor
                                                                : cfg->moe_eval_capacity_factor;
    s->router_type = router_type_from_name(cfg->moe_router_type);
    s->sigmoid_scores = strcmp(cfg->moe_router_score_function, "sigmoid") == 0;
    s->softmax_over_selected = !cfg->moe_router_pre_softmax;
    s->drop_by_prob = strcmp(cfg->moe_token_drop_policy, "probs") == 0;
    s->min_capacity = cfg->moe_min_capacity;
    s->balancing = balancing_type_from_name(cfg->moe_router_load_balancing_type);
    s->importance_loss_coeff = cfg->moe_importance_loss_coeff;
    s->load_loss_coeff = cfg->moe_load_loss_coeff;
    s->jitter_eps = cfg->moe_input_jitter_eps;
    s->expert_bias = cfg->moe_router_enable_expert_bias;
    s->expert_activation =
        strcmp(cfg->moe_expert_activation, "swiglu") == 0 ? FFN_SWIGLU : FFN_GELU;
    s->shared_F = cfg->moe_shared_expert_intermediate_size;
    s->router_groups = cfg->moe_router_num_groups;
    s->router_group_topk = cfg->moe_router_group_topk;
    s->hier_groups = cfg->moe_hierarchical_groups;
    s->hier_group_topk = cfg->moe_hierarchical_groups > 0 ? cfg->moe_hierarchical_group_topk : 0;
    s->init_std = cfg->init_method_std;
    s->expert_dropout = cfg->moe_expert_dropout;
    s->precision = strcmp(cfg->precision, "bf16") == 0 ? MATMUL_BF16 : MATMUL_FP32;
    s->router_precision =
        strcmp(cfg->moe_router_precision, "bf16") == 0 ? MATMUL_BF16 : MATMUL_FP32;
    s->bf16_gemm = bf16_gemm_choice_from_name(cfg->bf16_gemm);
    s->grain = config_grain_tokens(cfg);
    s->world = 1;
}

/* A shape built by hand (tests) leaves grain and world at 0: one grain,
 * one micro-batch. */
int model_grains(const ModelShape *s) {
    return s->grain > 0 ? s->B * s->T / s->grain : 1;
}

/* Rows a shadow must save (moe.h), 0 when off: by default the rows whose
 * compute, 6 FLOPs per expert weight each, matches moving the weights out
 * and every grain's gradient back, 4 bytes per weight each, at 48 FLOPs a
 * byte: (1 + grains) * 4 * 48 / 6 = 32 (1 + grains). */
int model_shadow_min_gain(const ModelShape *s) {
    if (!s->expert_shadowing) return 0;
    return s->shadow_min_rows > 0 ? s->shadow_min_rows : 32 * (1 + model_grains(s));
}

static long global_tokens(const ModelShape *s) {
    return (long)s->B * s->T * (s->world > 1 ? s->world : 1);
}

int model_is_moe_layer(const ModelShape *s, int layer) {
    return config_layer_freq_is_moe(layer, s->moe_layer_freq);
}

Placement model_placement(const ModelShape *s) {
    return (Placement){.num_experts = s->E, .ep_size = s->ep_size, .ep_rank = s->ep_rank};
}

int model_local_experts(const ModelShape *s) {
    Placement place = model_placement(s);
    return placement_experts_per_rank(&place);
}

/* ---- parameter layout ---------------------------------------------------- */

enum ParamField {
    FIELD_NOISE,
    FIELD_ROUTER_GROUP,
    FIELD_ROUTER_GROUP_NOISE,
    FIELD_SHARED_FC1,
    FIELD_SHARED_FC2,
    FIELD_WTE,
    FIELD_WPE,
    FIELD_LNF,
    FIELD_LM_HEAD,
    FIELD_LN1,
    FIELD_QKV,
    FIELD_PROJ,
    FIELD_LN2,
    FIELD_FC1,
    FIELD_FC2,
    FIELD_ROUTER,
    FIELD_EXPERT_FC1,
    FIELD_EXPERT_FC2
};

typedef struct LayoutEntry {
    enum ParamField field;
    int layer;
} LayoutEntry;

typedef struct Layout {
    ParamTensor *tensors;
    LayoutEntry *entries;
    int count;
    size_t offset;
} Layout;

static ParamRole field_role(enum ParamField field) {
    switch (field) {
        case FIELD_WTE:
        case FIELD_WPE:
            return PARAM_ROLE_EMBEDDING;
        case FIELD_LN1:
        case FIELD_QKV:
        case FIELD_PROJ:
            return PARAM_ROLE_ATTENTION;
        case FIELD_LN2:
        case FIELD_LNF:
            return PARAM_ROLE_NORM;
        case FIELD_FC1:
        case FIELD_FC2:
            return PARAM_ROLE_DENSE_FFN;
        case FIELD_LM_HEAD:
            return PARAM_ROLE_HEAD;
        case FIELD_ROUTER:
        case FIELD_NOISE:
        case FIELD_ROUTER_GROUP:
        case FIELD_ROUTER_GROUP_NOISE:
            return PARAM_ROLE_ROUTER;
        case FIELD_SHARED_FC1:
        case FIELD_SHARED_FC2:
            return PARAM_ROLE_SHARED_EXPERT;
        case FIELD_EXPERT_FC1:
        case FIELD_EXPERT_FC2:
            return PARAM_ROLE_EXPERT;
    }
    return PARAM_ROLE_EMBEDDING;
}

unsigned model_role_freeze_group(ParamRole role) {
    switch (role) {
        case PARAM_ROLE_ATTENTION:
            return FREEZE_ATTENTION;
        case PARAM_ROLE_ROUTER:
            return FREEZE_ROUTER;
        /* A shared expert is an expert FFN of the MoE layer (DeepSeek's
         * shared_experts sit in Megatron's MoELayer), only not routed. */
        case PARAM_ROLE_SHARED_EXPERT:
        case PARAM_ROLE_EXPERT:
            return FREEZE_EXPERTS;
        case PARAM_ROLE_EMBEDDING:
        case PARAM_ROLE_NORM:
        case PARAM_ROLE_DENSE_FFN:
        case PARAM_ROLE_HEAD:
            return FREEZE_NON_MOE_REST;
    }
    return FREEZE_NON_MOE_REST;
}

void model_freeze(Model *m, unsigned groups) {
    m->frozen_groups = groups;
    for (int i = 0; i < m->num_tensors; i++)
        m->tensors[i].frozen = (model_role_freeze_group(m->tensors[i].role) & groups) != 0;
}

static void add_tensor(Layout *lay, enum ParamField field, int layer, const char *name, int ndim,
                       int d0, int d1, int d2, int is_expert, double init_std) {
    ParamInit init = init_std > 0   ? PARAM_INIT_NORMAL
                     : init_std < 0 ? PARAM_INIT_ZEROS
                                    : PARAM_INIT_ONES;
    ParamTensor *t = &lay->tensors[lay->count];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->shape[2] = d2;
    t->numel = (size_t)d0 * (ndim > 1 ? d1 : 1) * (ndim > 2 ? d2 : 1);
    t->offset = lay->offset;
    t->is_expert = is_expert;
    t->decay = ndim > 1;
    t->role = field_role(field);
    t->init = init;
    t->init_std = init_std > 0 ? init_std : 0.0;
    lay->entries[lay->count] = (LayoutEntry){field, layer};
    lay->offset += t->numel;
    lay->count++;
}

/* Dense tensors first, expert tensors last: the expert gradients then form
 * one contiguous tail that a single all-reduce over the expert group covers. */
static void describe_layout(Layout *lay, const ModelShape *s) {
    int C = s->C;
    const double init_std = s->init_std > 0 ? s->init_std : DEFAULT_INIT_STD;
    double proj_std = init_std / sqrt(2.0 * s->L); /* GPT-2: residual projections scaled */
    char name[48];
    add_tensor(lay, FIELD_WTE, -1, "wte", 2, s->V, C, 0, 0, init_std);
    add_tensor(lay, FIELD_WPE, -1, "wpe", 2, s->T, C, 0, 0, init_std);
    for (int l = 0; l < s->L; l++) {
#define LAYER_NAME(suffix) (snprintf(name, sizeof name, "layers.%d.%s", l, suffix), name)
        add_tensor(lay, FIELD_LN1, l, LAYER_NAME("ln1_w"), 1, C, 0, 0, 0, 0.0);
        add_tensor(lay, FIELD_QKV, l, LAYER_NAME("qkv_w"), 2, 3 * C, C, 0, 0, init_std);
        add_tensor(lay, FIELD_PROJ, l, LAYER_NAME("proj_w"), 2, C, C, 0, 0, proj_std);
        add_tensor(lay, FIELD_LN2, l, LAYER_NAME("ln2_w"), 1, C, 0, 0, 0, 0.0);
        if (model_is_moe_layer(s, l)) {
            add_tensor(lay, FIELD_ROUTER, l, LAYER_NAME("router_w"), 2, s->E, C, 0, 0, init_std);
            /* Hierarchical MoE: the primary router, one row per group; the
             * secondary router of group i is rows [i*E/G, (i+1)*E/G) of router_w. */
            if (s->hier_groups > 0)
                add_tensor(lay, FIELD_ROUTER_GROUP, l, LAYER_NAME("router_group_w"), 2,
                           s->hier_groups, C, 0, 0, init_std);
            /* Shazeer 2017 starts the noise weights at zero: softplus(0) noise. */
            if (s->router_type == ROUTER_NOISY_TOPK)
                add_tensor(lay, FIELD_NOISE, l, LAYER_NAME("noise_w"), 2, s->E, C, 0, 0, ZEROS);
            /* ... at both levels of a hierarchical one (appendix B) */
            if (s->router_type == ROUTER_NOISY_TOPK && s->hier_groups > 0)
                add_tensor(lay, FIELD_ROUTER_GROUP_NOISE, l, LAYER_NAME("router_group_noise_w"),
                           2, s->hier_groups, C, 0, 0, ZEROS);
            if (s->shared_F > 0) {
                add_tensor(lay, FIELD_SHARED_FC1, l, LAYER_NAME("shared_fc1_w"), 2,
                           s->shared_F * ffn_w1_rows_per_unit(s->expert_activation), C, 0, 0,
                           init_std);
                add_tensor(lay, FIELD_SHARED_FC2, l, LAYER_NAME("shared_fc2_w"), 2, C, s->shared_F,
                           0, 0, proj_std);
            }
        } else {
            add_tensor(lay, FIELD_FC1, l, LAYER_NAME("fc1_w"), 2, s->F, C, 0, 0, init_std);
            add_tensor(lay, FIELD_FC2, l, LAYER_NAME("fc2_w"), 2, C, s->F, 0, 0, proj_std);
        }
    }
    add_tensor(lay, FIELD_LNF, -1, "lnf_w", 1, C, 0, 0, 0, 0.0);
    if (!s->tied) add_tensor(lay, FIELD_LM_HEAD, -1, "lm_head_w", 2, s->V, C, 0, 0, init_std);
    for (int l = 0; l < s->L; l++) {
        if (!model_is_moe_layer(s, l)) continue;
        int E_local = model_local_experts(s);
        add_tensor(lay, FIELD_EXPERT_FC1, l, LAYER_NAME("experts.fc1_w"), 3, E_local,
                   s->Fe * ffn_w1_rows_per_unit(s->expert_activation), C, 1, init_std);
        add_tensor(lay, FIELD_EXPERT_FC2, l, LAYER_NAME("experts.fc2_w"), 3, E_local, C, s->Fe, 1,
                   proj_std);
#undef LAYER_NAME
    }
}

static void bind_views(Weights *w, float *base, const Layout *lay, int tied) {
    for (int i = 0; i < lay->count; i++) {
        float *p = base + lay->tensors[i].offset;
        LayerWeights *lw = lay->entries[i].layer >= 0 ? &w->layers[lay->entries[i].layer] : NULL;
        switch (lay->entries[i].field) {
            case FIELD_WTE:
                w->wte = p;
                break;
            case FIELD_WPE:
                w->wpe = p;
                break;
            case FIELD_LNF:
                w->lnf_w = p;
                break;
            case FIELD_LM_HEAD:
                w->lm_head_w = p;
                break;
            case FIELD_LN1:
                lw->ln1_w = p;
                break;
            case FIELD_QKV:
                lw->qkv_w = p;
                break;
            case FIELD_PROJ:
                lw->proj_w = p;
                break;
            case FIELD_LN2:
                lw->ln2_w = p;
                break;
            case FIELD_FC1:
                lw->fc1_w = p;
                break;
            case FIELD_FC2:
                lw->fc2_w = p;
                break;
            case FIELD_NOISE:
                lw->noise_w = p;
                break;
            case FIELD_ROUTER_GROUP:
                lw->router_group_w = p;
                break;
            case FIELD_ROUTER_GROUP_NOISE:
                lw->router_group_noise_w = p;
                break;
            case FIELD_SHARED_FC1:
                lw->shared_fc1_w = p;
                break;
            case FIELD_SHARED_FC2:
                lw->shared_fc2_w = p;
                break;
            case FIELD_ROUTER:
                lw->router_w = p;
                break;
            case FIELD_EXPERT_FC1:
                lw->expert_fc1_w = p;
                break;
            case FIELD_EXPERT_FC2:
                lw->expert_fc2_w = p;
                break;
        }
    }
    if (tied) w->lm_head_w = w->wte;
}

/* Each tensor (and each expert's slice) draws from its own stream keyed by
 * name and global expert index, so a rank holding experts r*E/EP.. gets the
 * same weights as the 1-rank model. */
static void init_weights(Model *m, long seed) {
    Placement place = model_placement(&m->shape);
    int first_expert = placement_first_local_expert(&place);
    for (int i = 0; i < m->num_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        float *p = m->params + t->offset;
        int slices = t->is_expert ? t->shape[0] : 1;
        size_t slice_numel = t->numel / slices;
        for (int sl = 0; sl < slices; sl++) {
            uint64_t stream = t->is_expert ? (uint64_t)(first_expert + sl) : 0;
            Rng rng = {rng_hash3(rng_hash_string((uint64_t)seed, t->name), stream, 0)};
            for (size_t j = 0; j < slice_numel; j++)
                p[sl * slice_numel + j] = t->init == PARAM_INIT_NORMAL
                                              ? (float)(t->init_std * rng_normal(&rng))
                                          : t->init == PARAM_INIT_ONES ? 1.0f
                                                                       : 0.0f;
        }
    }
}

/* ---- allocation ---------------------------------------------------------- */

static float *alloc_floats(size_t n, int *failed) {
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p) *failed = 1;
    return p;
}

static size_t shared_w1_rows(const ModelShape *s) {
    return (size_t)s->shared_F * ffn_w1_rows_per_unit(s->expert_activation);
}

static void alloc_layer_acts(LayerActs *a, const ModelShape *s, int is_moe, int *failed) {
    size_t N = (size_t)s->B * s->T, C = s->C;
    a->resid_in = alloc_floats(N * C, failed);
    a->ln1 = alloc_floats(N * C, failed);
    a->ln1_rstd = alloc_floats(N, failed);
    a->qkv = alloc_floats(N * 3 * C, failed);
    a->att = alloc_floats((size_t)s->B * s->NH * s->T * s->T, failed);
    a->att_out = alloc_floats(N * C, failed);
    a->resid_mid = alloc_floats(N * C, failed);
    a->ln2 = alloc_floats(N * C, failed);
    a->ln2_rstd = alloc_floats(N, failed);
    if (!is_moe) {
        a->h_pre = alloc_floats(N * s->F, failed);
        a->h_act = alloc_floats(N * s->F, failed);
    } else if (s->shared_F > 0) {
        a->shared_h_pre = alloc_floats(N * shared_w1_rows(s), failed);
        a->shared_h_act = alloc_floats(N * s->shared_F, failed);
    }
}

static void free_layer_acts(LayerActs *a) {
    free(a->resid_in);
    free(a->ln1);
    free(a->ln1_rstd);
    free(a->qkv);
    free(a->att);
    free(a->att_out);
    free(a->resid_mid);
    free(a->ln2);
    free(a->ln2_rstd);
    free(a->h_pre);
    free(a->h_act);
    free(a->shared_h_pre);
    free(a->shared_h_act);
}

static int max_tensors(const ModelShape *s) {
    return 4 + 12 * s->L;
}

static size_t max_size(size_t a, size_t b) {
    return a > b ? a : b;
}

/* The bf16 rounding scratch holds one operand (rows x cols) of any matmul
 * the model runs: the largest of them, or nothing when every matmul is
 * float32. One rule for model_init and model_memory_bytes. */
static size_t matmul_operand_floats(const ModelShape *s, const MoeShape *ms) {
    if (s->precision == MATMUL_FP32 && s->router_precision == MATMUL_FP32) return 0;
    size_t N = (size_t)s->B * s->T, C = (size_t)s->C, T = (size_t)s->T, hs = C / s->NH;
    size_t floats = max_size(N * 3 * C, 3 * C * C);     /* qkv, the largest of q, k, v, proj */
    floats = max_size(floats, max_size(T * T, T * hs)); /* one head's scores and values */
    floats = max_size(floats, max_size(N, C) * s->V);   /* LM head */
    int any_dense = 0, any_moe = 0;
    for (int l = 0; l < s->L; l++) {
        any_moe |= model_is_moe_layer(s, l);
        any_dense |= !model_is_moe_layer(s, l);
    }
    if (any_dense) floats = max_size(floats, max_size(N, C) * s->F);
    if (any_moe) {
        size_t rows = (size_t)moe_max_recv_rows(ms); /* bounds any one expert's block */
        size_t FW = (size_t)s->Fe * ffn_w1_rows_per_unit(s->expert_activation);
        floats = max_size(floats, max_size(N, C) * s->E);  /* router */
        floats = max_size(floats, max_size(rows, C) * FW); /* experts */
        floats = max_size(floats, rows * C);
        floats = max_size(floats, max_size(N, C) * shared_w1_rows(s)); /* shared expert */
    }
    return floats;
}

static int expert_splits(const ModelShape *s) {
    return s->ep_size * model_grains(s);
}

/* Elements the exact reduction converts at a time: it walks big gradient
 * buffers in chunks rather than doubling them. */
static size_t exact_sum_chunk(const Model *m) {
    return max_size(1, m->num_params < ((size_t)1 << 20) ? m->num_params : (size_t)1 << 20);
}

/* One gradient buffer per grain beyond the first, which is grads itself. */
static void alloc_partials(Model *m, int *failed) {
    const ModelShape *s = &m->shape;
    int grains = model_grains(s), splits = expert_splits(s);
    size_t expert_n = m->num_params - m->num_dense_params;
    m->dense_partials = calloc((size_t)grains, sizeof(float *));
    m->expert_partials = calloc((size_t)splits, sizeof(float *));
    m->grain_ce = calloc((size_t)grains, sizeof(double));
    if (exact_sum_init(&m->exact, exact_sum_chunk(m)) != 0) *failed = 1;
    if (!m->dense_partials || !m->expert_partials || !m->grain_ce || !m->grads) {
        *failed = 1;
        return;
    }
    m->dense_partials[0] = m->grads;
    m->expert_partials[0] = m->grads + m->num_dense_params;
    for (int g = 1; g < grains; g++)
        m->dense_partials[g] = alloc_floats(m->num_dense_params, failed);
    for (int c = 1; c < splits; c++) m->expert_partials[c] = alloc_floats(expert_n, failed);
    m->dense_split = (RowSplit){
        .count = grains, .rows = s->grain, .grads = m->grads, .partials = m->dense_partials};
}

/* The backward step that finishes a tensor's gradient: its layer, the final
 * norm and LM head (ready point L, the first), or the embeddings (-1, the
 * last: wte also takes the tied LM head's gradient). */
static int ready_point(const ModelShape *s, const LayoutEntry *e) {
    if (e->layer >= 0) return e->layer;
    return e->field == FIELD_WTE || e->field == FIELD_WPE ? -1 : s->L;
}

/* --overlap-grad-reduce: a bucket per contiguous run of tensors finished at
 * the same point. The layout makes each layer's dense tensors one run and
 * its expert tensors another; the order of parameters stays as it is. */
static void plan_grad_buckets(Model *m, const Layout *lay, int *failed) {
    const ModelShape *s = &m->shape;
    if (!s->overlap_grad_reduce || *failed) return;
    GradSources src = {.comm = m->comm,
                       .grads = m->grads,
                       .num_dense = m->num_dense_params,
                       .dense_partials = m->dense_partials,
                       .expert_partials = m->expert_partials,
                       .dense_count = model_grains(s),
                       .expert_count = expert_splits(s),
                       .total_partials = (long)model_grains(s) * m->comm->world_size};
    if (grad_overlap_init(&m->grad_overlap, &src, m->num_params) != 0) {
        *failed = 1;
        return;
    }
    for (int i = 0; i < lay->count; i++) {
        const ParamTensor *t = &lay->tensors[i];
        if (grad_overlap_add(&m->grad_overlap, ready_point(s, &lay->entries[i]), t->is_expert,
                             t->offset, t->numel) != 0)
            *failed = 1;
    }
}

static void free_partials(Model *m) {
    if (m->dense_partials)
        for (int g = 1; g < model_grains(&m->shape); g++) free(m->dense_partials[g]);
    if (m->expert_partials)
        for (int c = 1; c < expert_splits(&m->shape); c++) free(m->expert_partials[c]);
    free(m->dense_partials);
    free(m->expert_partials);
    free(m->grain_ce);
    exact_sum_free(&m->exact);
    grad_overlap_free(&m->grad_overlap);
}

/* What the model will be, before any big allocation: its tensor layout,
 * parameter counts and MoE shape, from m->shape. */
static void plan_model(Model *m, Layout *lay) {
    const ModelShape *s = &m->shape;
    describe_layout(lay, s);
    m->tensors = lay->tensors;
    m->num_tensors = lay->count;
    m->num_params = lay->offset;
    m->num_dense_params = m->num_params;
    for (int i = 0; i < lay->count; i++)
        if (lay->tensors[i].is_expert && lay->tensors[i].offset < m->num_dense_params)
            m->num_dense_params = lay->tensors[i].offset;
    size_t N = (size_t)s->B * s->T;
    /* Exchange buffers fit the larger of the training and evaluation
     * capacities, or every slot when either is dropless. */
    double cf = s->capacity_factor, eval_cf = s->eval_capacity_factor;
    double sizing_cf = cf <= 0 || eval_cf <= 0 ? 0.0 : cf > eval_cf ? cf : eval_cf;
    m->moe_shape = (MoeShape){.router = {.N = (int)N,
                                         .C = s->C,
                                         .E = s->E,
                                         .K = s->K,
                                         .G = s->G,
                                         .norm_topk_prob = s->norm_topk_prob,
                                         .capacity_factor = sizing_cf,
                                         .aux_loss_coeff = s->aux_loss_coeff,
                                         .z_loss_coeff = s->z_loss_coeff,
                                         .type = s->router_type,
                                         .sigmoid_scores = s->sigmoid_scores,
                                         .softmax_over_selected = s->softmax_over_selected,
                                         .drop_by_prob = s->drop_by_prob,
                                         .min_capacity = s->min_capacity,
                                         .balancing = s->balancing,
                                         .T = s->T,
                                         .importance_loss_coeff = s->importance_loss_coeff,
                                         .load_loss_coeff = s->load_loss_coeff,
                                         .jitter_eps = s->jitter_eps,
                                         .num_groups = s->router_groups,
                                         .group_topk = s->router_group_topk,
                                         .hier_groups = s->hier_groups,
                                         .hier_group_topk = s->hier_group_topk,
                                         .world = s->world,
                                         .grain = s->grain},
                              .F = s->Fe,
                              .ep_size = s->ep_size,
                              .E_local = model_local_experts(s),
                              .hierarchical = s->hierarchical_dispatch,
                              .overlap_chunks = s->overlap_chunks,
                              .activation = s->expert_activation,
                              .expert_dropout = s->expert_dropout,
                              .shadow_min_gain = model_shadow_min_gain(s)};
}

int model_init(Model *m, const ModelShape *s, long seed, const Comm *comm) {
    memset(m, 0, sizeof *m);
    m->grad_reduce_start_s = -1.0;
    m->shape = *s;
    m->comm = comm;
    int failed = 0;
    Layout lay = {0};
    lay.tensors = calloc((size_t)max_tensors(s), sizeof(ParamTensor));
    lay.entries = calloc((size_t)max_tensors(s), sizeof(LayoutEntry));
    m->w.layers = calloc((size_t)s->L, sizeof(LayerWeights));
    m->dw.layers = calloc((size_t)s->L, sizeof(LayerWeights));
    m->acts = calloc((size_t)s->L, sizeof(LayerActs));
    m->moe = calloc((size_t)s->L, sizeof(MoeLayer));
    if (!lay.tensors || !lay.entries || !m->w.layers || !m->dw.layers || !m->acts || !m->moe) {
        free(lay.tensors);
        free(lay.entries);
        model_free(m);
        return -1;
    }
    plan_model(m, &lay);
    m->params = alloc_floats(m->num_params, &failed);
    m->grads = alloc_floats(m->num_params, &failed);
    alloc_partials(m, &failed);
    m->adam_m = alloc_floats(m->num_params, &failed);
    m->adam_v = alloc_floats(m->num_params, &failed);
    if (!failed) {
        bind_views(&m->w, m->params, &lay, s->tied);
        bind_views(&m->dw, m->grads, &lay, s->tied);
        init_weights(m, seed);
    }
    plan_grad_buckets(m, &lay, &failed);
    free(lay.entries);

    size_t N = (size_t)s->B * s->T, C = s->C;
    m->expert_bias = calloc((size_t)s->L, sizeof(float *));
    if (!m->expert_bias) failed = 1;
    int any_moe = 0;
    for (int l = 0; l < s->L; l++) {
        int is_moe = model_is_moe_layer(s, l);
        any_moe |= is_moe;
        alloc_layer_acts(&m->acts[l], s, is_moe, &failed);
        if (is_moe && moe_layer_init(&m->moe[l], &m->moe_shape) != 0) failed = 1;
        if (is_moe && s->expert_bias && m->expert_bias)
            m->expert_bias[l] = alloc_floats((size_t)s->E, &failed);
    }
    if (any_moe && moe_scratch_init(&m->moe_scratch, &m->moe_shape) != 0) failed = 1;
    if (matmul_init(&m->matmul, s->precision, matmul_operand_floats(s, &m->moe_shape),
                    s->bf16_gemm) != 0)
        failed = 1;
    if (!failed) m->matmul.split = &m->dense_split;
    m->router_matmul = matmul_view(&m->matmul, s->router_precision);
    m->resid_out = alloc_floats(N * C, &failed);
    m->lnf = alloc_floats(N * C, &failed);
    m->lnf_rstd = alloc_floats(N, &failed);
    m->probs = alloc_floats(N * s->V, &failed);
    m->tmp = alloc_floats(N * C, &failed);
    m->dresid = alloc_floats(N * C, &failed);
    m->dln = alloc_floats(N * C, &failed);
    m->dtmp = alloc_floats(N * C, &failed);
    m->dqkv = alloc_floats(N * 3 * C, &failed);
    m->datt = alloc_floats((size_t)s->T * s->T, &failed);
    m->dh = alloc_floats(N * (size_t)s->F, &failed);
    if (s->shared_F > 0) m->shared_dh = alloc_floats(N * shared_w1_rows(s), &failed);
    m->inputs = calloc(N, sizeof(int));
    m->targets = calloc(N, sizeof(int));
    if (!m->inputs || !m->targets) failed = 1;
    if (failed) {
        model_free(m);
        return -1;
    }
    return 0;
}

void model_free(Model *m) {
    if (m->acts)
        for (int l = 0; l < m->shape.L; l++) free_layer_acts(&m->acts[l]);
    if (m->moe)
        for (int l = 0; l < m->shape.L; l++)
            if (model_is_moe_layer(&m->shape, l)) moe_layer_free(&m->moe[l]);
    moe_scratch_free(&m->moe_scratch);
    if (m->expert_bias)
        for (int l = 0; l < m->shape.L; l++) free(m->expert_bias[l]);
    free(m->expert_bias);
    free(m->shared_dh);
    free(m->acts);
    free(m->moe);
    free_partials(m);
    free(m->tensors);
    free(m->params);
    free(m->grads);
    free(m->adam_m);
    free(m->adam_v);
    free(m->w.layers);
    free(m->dw.layers);
    free(m->resid_out);
    free(m->lnf);
    free(m->lnf_rstd);
    free(m->probs);
    free(m->tmp);
    free(m->dresid);
    free(m->dln);
    free(m->dtmp);
    free(m->dqkv);
    free(m->datt);
    free(m->dh);
    free(m->inputs);
    free(m->targets);
    matmul_free(&m->matmul);
    memset(m, 0, sizeof *m);
}

void model_zero_grad(Model *m) {
    m->grad_reduce_start_s = -1.0;
    memset(m->grads, 0, sizeof(float) * m->num_params);
    size_t expert_n = m->num_params - m->num_dense_params;
    for (int g = 1; g < model_grains(&m->shape); g++)
        memset(m->dense_partials[g], 0, sizeof(float) * m->num_dense_params);
    for (int c = 1; c < expert_splits(&m->shape); c++)
        memset(m->expert_partials[c], 0, sizeof(float) * expert_n);
}

void model_reduce_gradients(Model *m) {
    const ModelShape *s = &m->shape;
    if (s->overlap_grad_reduce) {
        grad_overlap_finish(&m->grad_overlap);
        return;
    }
    int grains = model_grains(s);
    long total = (long)grains * m->comm->world_size;
    exact_sum_floats(&m->exact, m->comm, COMM_SCOPE_WORLD, m->dense_partials, grains, total,
                     m->num_dense_params, m->grads);
    exact_sum_floats(&m->exact, m->comm, COMM_SCOPE_EDP, m->expert_partials, expert_splits(s),
                     total, m->num_params - m->num_dense_params, m->grads + m->num_dense_params);
}

/* ---- forward / backward -------------------------------------------------- */

/* -O2 leaves loops of unknown length scalar; the sums are the same. */
static void add_into(float *out, const float *a, const float *b, long n) {
    long i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES)
        vec_store(out + i, vec_load(a + i) + vec_load(b + i));
    for (; i < n; i++) out[i] = a[i] + b[i];
}

static void embed_forward(float *out, const int *inputs, const float *wte, const float *wpe, int B,
                          int T, int C) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *o = out + ((long)b * T + t) * C;
            const float *tok = wte + (long)inputs[b * T + t] * C, *pos = wpe + (long)t * C;
            add_into(o, tok, pos, C);
        }
}

/* Gradients of wte and wpe, each grain's into its own partial. */
static void embed_backward(const Model *m, float *dwte, float *dwpe, const float *dout,
                           const int *inputs) {
    const ModelShape *s = &m->shape;
    int N = s->B * s->T, C = s->C;
    const RowSplit *split = m->matmul.split;
    for (int i = 0; i < row_split_count(split, N); i++) {
        float *tok_grad = row_split_grad(split, dwte, i),
              *pos_grad = row_split_grad(split, dwpe, i);
        for (int n = row_split_begin(split, i, N); n < row_split_begin(split, i + 1, N); n++) {
            const float *d = dout + (long)n * C;
            float *dtok = tok_grad + (long)inputs[n] * C, *dpos = pos_grad + (long)(n % s->T) * C;
            add_into(dtok, dtok, d, C);
            add_into(dpos, dpos, d, C);
        }
    }
}

/* rmsnorm_backward over the token rows, each grain's weight gradient into
 * its own partial. */
static void rmsnorm_backward_split(const Model *m, float *dinp, float *dw, const float *dout,
                                   const float *inp, const float *w, const float *rstd) {
    int N = m->shape.B * m->shape.T, C = m->shape.C;
    const RowSplit *split = m->matmul.split;
    for (int i = 0; i < row_split_count(split, N); i++) {
        long first = row_split_begin(split, i, N);
        int rows = row_split_begin(split, i + 1, N) - (int)first;
        rmsnorm_backward(dinp + first * C, row_split_grad(split, dw, i), dout + first * C,
                         inp + first * C, w, rstd + first, rows, C);
    }
}

static MoeWeights moe_weights(const LayerWeights *w) {
    return (MoeWeights){
        {w->router_w, w->noise_w, w->router_group_w, w->router_group_noise_w}, w->expert_fc1_w, w->expert_fc2_w};
}

/* The routing context of layer l: the trainer's, plus this layer's bias
 * and the capacity factor of training or evaluation. */
static RouterContext layer_router_context(const Model *m, int l) {
    RouterContext ctx = m->router_ctx;
    ctx.layer = l;
    ctx.expert_bias = m->expert_bias ? m->expert_bias[l] : NULL;
    ctx.capacity_factor = ctx.training ? m->shape.capacity_factor : m->shape.eval_capacity_factor;
    ctx.matmul = &m->router_matmul;
    return ctx;
}

static void layer_forward(Model *m, int l, float *resid_next) {
    const ModelShape *s = &m->shape;
    const LayerWeights *w = &m->w.layers[l];
    LayerActs *a = &m->acts[l];
    int N = s->B * s->T, C = s->C;
    double mark = timer_now_s();
    rmsnorm_forward(a->ln1, a->ln1_rstd, a->resid_in, w->ln1_w, N, C);
    matmul_forward(a->qkv, a->ln1, w->qkv_w, N, C, 3 * C, &m->matmul);
    attention_forward(a->att_out, a->att, a->qkv, s->B, s->T, C, s->NH, &m->matmul);
    matmul_forward(m->tmp, a->att_out, w->proj_w, N, C, C, &m->matmul);
    add_into(a->resid_mid, a->resid_in, m->tmp, (long)N * C);
    rmsnorm_forward(a->ln2, a->ln2_rstd, a->resid_mid, w->ln2_w, N, C);
    timer_charge(m->phase_s, PHASE_ATTENTION, &mark);
    if (model_is_moe_layer(s, l)) {
        MoeWeights mw = moe_weights(w);
        RouterContext ctx = layer_router_context(m, l);
        moe_forward(m->tmp, &m->moe[l], a->ln2, &mw, &m->moe_shape, &ctx, m->comm, m->phase_s,
                    &m->matmul);
        mark = timer_now_s();
        if (s->shared_F > 0) {
            /* the shared expert sees every token; its output adds to the routed one */
            ffn_forward(m->dtmp, a->shared_h_pre, a->shared_h_act, a->ln2, w->shared_fc1_w,
                        w->shared_fc2_w, N, C, s->shared_F, s->expert_activation, &m->matmul, NULL);
            add_into(m->tmp, m->tmp, m->dtmp, (long)N * C);
            timer_charge(m->phase_s, PHASE_EXPERTS, &mark);
        }
    } else {
        ffn_forward(m->tmp, a->h_pre, a->h_act, a->ln2, w->fc1_w, w->fc2_w, N, C, s->F, FFN_GELU,
                    &m->matmul, NULL);
        timer_charge(m->phase_s, PHASE_EXPERTS, &mark);
    }
    add_into(resid_next, a->resid_mid, m->tmp, (long)N * C);
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
}

double model_forward(Model *m, const int *inputs, const int *targets) {
    const ModelShape *s = &m->shape;
    int N = s->B * s->T, C = s->C;
    double mark = timer_now_s();
    memcpy(m->inputs, inputs, sizeof(int) * N);
    memcpy(m->targets, targets, sizeof(int) * N);
    embed_forward(m->acts[0].resid_in, inputs, m->w.wte, m->w.wpe, s->B, s->T, C);
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
    m->aux_loss = m->z_loss = m->importance_loss = m->load_loss = 0.0;
    for (int l = 0; l < s->L; l++) {
        float *resid_next = l + 1 < s->L ? m->acts[l + 1].resid_in : m->resid_out;
        layer_forward(m, l, resid_next);
        if (model_is_moe_layer(s, l)) {
            const Routing *r = &m->moe[l].routing;
            m->aux_loss += r->aux_loss;
            m->z_loss += r->z_loss;
            m->importance_loss += r->importance_loss;
            m->load_loss += r->load_loss;
        }
    }
    mark = timer_now_s();
    rmsnorm_forward(m->lnf, m->lnf_rstd, m->resid_out, m->w.lnf_w, N, C);
    matmul_forward(m->probs, m->lnf, m->w.lm_head_w, N, C, s->V, &m->matmul);
    /* per grain, so the global mean sums the same numbers in every layout */
    int grains = model_grains(s);
    m->ce_loss = 0.0;
    for (int g = 0; g < grains; g++) {
        int rows = N / grains;
        long first = (long)g * rows;
        m->grain_ce[g] =
            softmax_cross_entropy_forward(m->probs + first * s->V, targets + first, rows, s->V);
        m->ce_loss += m->grain_ce[g] / grains;
    }
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
    return m->ce_loss + m->aux_loss + m->z_loss + m->importance_loss + m->load_loss;
}

/* --overlap-grad-reduce: the gradients of (layer, is_expert) are final, so
 * their buckets go out now; the time it takes here is exposed reduction. */
static void grads_ready(Model *m, int layer, int is_expert) {
    if (!m->shape.overlap_grad_reduce) return;
    double mark = timer_now_s();
    if (m->grad_reduce_start_s < 0) m->grad_reduce_start_s = mark;
    grad_overlap_ready(&m->grad_overlap, layer, is_expert);
    timer_charge(m->phase_s, PHASE_GRAD_ALLREDUCE, &mark);
}

/* The buckets in flight are tested between the backward pass's sgemms. */
static void test_buckets_between_sgemms(Model *m, int on) {
    if (!m->shape.overlap_grad_reduce) return;
    m->matmul.progress = m->router_matmul.progress = on ? grad_overlap_progress : NULL;
    m->matmul.progress_arg = m->router_matmul.progress_arg = on ? &m->grad_overlap : NULL;
}

/* On entry m->dresid holds dLoss/d(resid_next); on exit dLoss/d(resid_in). */
static void layer_backward(Model *m, int l) {
    const ModelShape *s = &m->shape;
    const LayerWeights *w = &m->w.layers[l];
    LayerWeights *dw = &m->dw.layers[l];
    LayerActs *a = &m->acts[l];
    int N = s->B * s->T, C = s->C;
    double mark = timer_now_s();
    if (model_is_moe_layer(s, l)) {
        MoeWeights mw = moe_weights(w);
        MoeGrads mg = {{dw->router_w, dw->noise_w, dw->router_group_w, dw->router_group_noise_w},
                       dw->expert_fc1_w,
                       dw->expert_fc2_w,
                       m->grads + m->num_dense_params,
                       m->expert_partials};
        moe_backward(m->dln, &mg, m->dresid, a->ln2, &mw, &m->moe[l], &m->moe_scratch,
                     &m->moe_shape, m->comm, m->phase_s, &m->matmul);
        grads_ready(m, l, 1);
        mark = timer_now_s();
        if (s->shared_F > 0) {
            ffn_backward(m->dtmp, dw->shared_fc1_w, dw->shared_fc2_w, m->shared_dh, m->dresid,
                         a->ln2, a->shared_h_pre, a->shared_h_act, w->shared_fc1_w, w->shared_fc2_w,
                         N, C, s->shared_F, s->expert_activation, &m->matmul, NULL);
            add_into(m->dln, m->dln, m->dtmp, (long)N * C);
            timer_charge(m->phase_s, PHASE_EXPERTS, &mark);
        }
    } else {
        ffn_backward(m->dln, dw->fc1_w, dw->fc2_w, m->dh, m->dresid, a->ln2, a->h_pre, a->h_act,
                     w->fc1_w, w->fc2_w, N, C, s->F, FFN_GELU, &m->matmul, NULL);
        timer_charge(m->phase_s, PHASE_EXPERTS, &mark);
    }
    rmsnorm_backward_split(m, m->dresid, dw->ln2_w, m->dln, a->resid_mid, w->ln2_w, a->ln2_rstd);
    matmul_backward(m->dtmp, dw->proj_w, m->dresid, a->att_out, w->proj_w, N, C, C, &m->matmul);
    attention_backward(m->dqkv, m->datt, m->dtmp, a->qkv, a->att, s->B, s->T, C, s->NH, &m->matmul);
    matmul_backward(m->dln, dw->qkv_w, m->dqkv, a->ln1, w->qkv_w, N, C, 3 * C, &m->matmul);
    rmsnorm_backward_split(m, m->dresid, dw->ln1_w, m->dln, a->resid_in, w->ln1_w, a->ln1_rstd);
    timer_charge(m->phase_s, PHASE_ATTENTION, &mark);
    grads_ready(m, l, 0);
}

void model_backward(Model *m) {
    const ModelShape *s = &m->shape;
    int N = s->B * s->T, C = s->C;
    double mark = timer_now_s();
    test_buckets_between_sgemms(m, 1);
    softmax_cross_entropy_backward(m->probs, m->targets, N, s->V, global_tokens(s));
    matmul_backward(m->dln, m->dw.lm_head_w, m->probs, m->lnf, m->w.lm_head_w, N, C, s->V,
                    &m->matmul);
    memset(m->dresid, 0, sizeof(float) * (size_t)N * C);
    rmsnorm_backward_split(m, m->dresid, m->dw.lnf_w, m->dln, m->resid_out, m->w.lnf_w,
                           m->lnf_rstd);
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
    grads_ready(m, s->L, 0);
    for (int l = s->L - 1; l >= 0; l--) layer_backward(m, l);
    mark = timer_now_s();
    embed_backward(m, m->dw.wte, m->dw.wpe, m->dresid, m->inputs);
    timer_charge(m->phase_s, PHASE_OTHER, &mark);
    test_buckets_between_sgemms(m, 0);
    grads_ready(m, -1, 0);
}

double model_step_flops(const Model *m) {
    const ModelShape *s = &m->shape;
    double N = (double)s->B * s->T, C = s->C, T = s->T;
    double macs = N * C * s->V; /* LM head */
    for (int l = 0; l < s->L; l++) {
        macs += N * (3 * C * C + C * C); /* qkv and output projection */
        macs += 2.0 * N * T * C;         /* scores and weighted values */
        if (model_is_moe_layer(s, l)) {
            double expert_macs = (1.0 + ffn_w1_rows_per_unit(s->expert_activation)) * C;
            macs += N * C * s->E + moe_computed_rows(&m->moe[l]) * expert_macs * s->Fe;
            macs += N * expert_macs * s->shared_F;
        } else
            macs += 2.0 * N * C * s->F;
    }
    return 6.0 * macs; /* 2 FLOPs per MAC, forward + 2x backward */
}

size_t model_param_bytes(const Model *m) {
    return m->num_params * sizeof(float);
}

static size_t layer_activation_bytes(const ModelShape *s, int is_moe) {
    size_t N = (size_t)s->B * s->T, C = (size_t)s->C;
    size_t floats = 8 * N * C + 2 * N + (size_t)s->B * s->NH * s->T * s->T;
    if (!is_moe)
        floats += 2 * N * s->F;
    else
        floats += N * (shared_w1_rows(s) + s->shared_F);
    return sizeof(float) * floats;
}

size_t model_memory_bytes(const Model *m) {
    const ModelShape *s = &m->shape;
    size_t N = (size_t)s->B * s->T, C = (size_t)s->C;
    size_t bytes = 4 * model_param_bytes(m) + exact_sum_bytes(exact_sum_chunk(m));
    if (s->overlap_grad_reduce) bytes += grad_overlap_bytes(m->num_params);
    int grains = model_grains(s), splits = expert_splits(s);
    bytes += sizeof(float) * ((size_t)(grains - 1) * m->num_dense_params +
                              (size_t)(splits - 1) * (m->num_params - m->num_dense_params));
    int any_moe = 0;
    for (int l = 0; l < s->L; l++) {
        int is_moe = model_is_moe_layer(s, l);
        any_moe |= is_moe;
        bytes += layer_activation_bytes(s, is_moe);
        if (is_moe) bytes += moe_layer_bytes(&m->moe_shape);
    }
    if (any_moe) bytes += moe_scratch_bytes(&m->moe_shape);
    bytes += matmul_bytes(matmul_operand_floats(s, &m->moe_shape));
    if (s->expert_bias) bytes += sizeof(float) * (size_t)s->E * s->L / s->moe_layer_freq;
    bytes += sizeof(float) * N * shared_w1_rows(s) + sizeof(float *) * s->L;
    bytes +=
        sizeof(float) * (6 * N * C + N + N * s->V + 3 * N * C + (size_t)s->T * s->T + N * s->F);
    return bytes + 2 * sizeof(int) * N;
}

size_t model_planned_bytes(const ModelShape *s) {
    Model m = {.shape = *s};
    Layout lay = {.tensors = calloc((size_t)max_tensors(s), sizeof(ParamTensor)),
                  .entries = calloc((size_t)max_tensors(s), sizeof(LayoutEntry))};
    size_t bytes = 0;
    if (lay.tensors && lay.entries) {
        plan_model(&m, &lay);
        bytes = model_memory_bytes(&m);
    }
    free(lay.tensors);
    free(lay.entries);
    return bytes;
}
