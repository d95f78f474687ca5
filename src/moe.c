#include "moesim/moe.h"

#include <stdlib.h>
#include <string.h>

#include "moesim/ffn.h"
#include "moesim/rng.h"
#include "moesim/timing.h"
#include "moesim/vecmath.h"

static long min_long(long a, long b) {
    return a < b ? a : b;
}

/* Kept rows per expert and group at most, or -1 when nothing bounds them. */
static long capacity_bound(const RouterShape *r) {
    if (r->type == ROUTER_SOFT || r->capacity_factor <= 0) return -1;
    long capacity = router_capacity(r->capacity_factor, r->G, r->K, r->E);
    if (r->type != ROUTER_EXPERT_CHOICE && capacity < r->min_capacity) capacity = r->min_capacity;
    return capacity;
}

long moe_max_send_rows(const MoeShape *s) {
    const RouterShape *r = &s->router;
    long slots = (long)r->N * router_slots(r), capacity = capacity_bound(r);
    return capacity < 0 ? slots : min_long(slots, (long)r->E * capacity * (r->N / r->G));
}

long moe_max_recv_rows(const MoeShape *s) {
    const RouterShape *r = &s->router;
    long slots = (long)r->N * router_slots(r), capacity = capacity_bound(r);
    long per_source =
        capacity < 0 ? slots : min_long(slots, (long)s->E_local * capacity * (r->N / r->G));
    return s->ep_size * per_source;
}

/* Floats of one expert's w1, and of its weights: w1 then w2. */
static long expert_w1_floats(const MoeShape *s) {
    return (long)s->F * ffn_w1_rows_per_unit(s->activation) * s->router.C;
}

static long expert_weight_floats(const MoeShape *s) {
    return expert_w1_floats(s) + (long)s->router.C * s->F;
}

static int shadows_possible(const MoeShape *s) {
    return s->shadow_min_gain > 0 && s->ep_size > 1 && !s->hierarchical && s->overlap_chunks <= 1;
}

/* Requests in flight at once: a rank's weights out and in, then its
 * gradients out and in, two messages (w1, w2) per grain each. */
static long shadow_request_count(const MoeShape *s) {
    return 2L * routing_grains(&s->router) * s->E_local * (s->ep_size + 1);
}

static int shadowing_init(MoeLayer *m, const MoeShape *s) {
    if (!shadows_possible(s)) return 0;
    m->shadow_w = malloc(sizeof(float) * (size_t)s->E_local * expert_weight_floats(s));
    m->shadow_split = malloc(sizeof(int) * (size_t)(routing_grains(&s->router) + 1));
    m->shadow_requests = malloc(sizeof(MPI_Request) * (size_t)shadow_request_count(s));
    if (!m->shadow_w || !m->shadow_split || !m->shadow_requests) return -1;
    return dispatch_enable_shadowing(&m->dispatch, s->shadow_min_gain, (int)moe_max_recv_rows(s));
}

int moe_layer_init(MoeLayer *m, const MoeShape *s) {
    memset(m, 0, sizeof *m);
    const RouterShape *r = &s->router;
    size_t S = (size_t)moe_max_send_rows(s), R = (size_t)moe_max_recv_rows(s);
    size_t NK = (size_t)r->N * router_slots(r), C = (size_t)r->C;
    size_t F = (size_t)s->F, FW = F * ffn_w1_rows_per_unit(s->activation);
    int grains = routing_grains(r);
    if (routing_init(&m->routing, r) != 0 ||
        dispatch_init(&m->dispatch, r->E, s->ep_size, grains, s->hierarchical,
                      s->overlap_chunks > 1) != 0) {
        moe_layer_free(m);
        return -1;
    }
    m->rows_per_expert = malloc(sizeof(int) * r->E * grains);
    m->expert_cursor = malloc(sizeof(int) * r->E);
    m->row_choice = malloc(sizeof(int) * (S ? S : 1));
    m->choice_row = malloc(sizeof(int) * NK);
    m->send_x = malloc(sizeof(float) * (S * C + 1));
    m->send_y = malloc(sizeof(float) * (S * C + 1));
    m->expert_in = malloc(sizeof(float) * (R * C + 1));
    m->global_demand = calloc((size_t)r->E, sizeof(long));
    m->h_pre = malloc(sizeof(float) * (R * FW + 1));
    m->h_act = malloc(sizeof(float) * (R * F + 1));
    m->expert_out = malloc(sizeof(float) * (R * C + 1));
    if (!m->rows_per_expert || !m->expert_cursor || !m->row_choice || !m->choice_row ||
        !m->send_x || !m->send_y || !m->expert_in || !m->h_pre || !m->h_act || !m->expert_out ||
        !m->global_demand || shadowing_init(m, s) != 0) {
        moe_layer_free(m);
        return -1;
    }
    return 0;
}

long moe_computed_rows(const MoeLayer *m) {
    return (long)m->dispatch.num_recv_rows + m->dispatch.num_shadow_rows;
}

size_t moe_layer_bytes(const MoeShape *s) {
    const RouterShape *r = &s->router;
    size_t S = (size_t)moe_max_send_rows(s), R = (size_t)moe_max_recv_rows(s);
    size_t NK = (size_t)r->N * router_slots(r), E = (size_t)r->E;
    size_t FW = (size_t)s->F * ffn_w1_rows_per_unit(s->activation);
    size_t grains = (size_t)routing_grains(r), splits = (size_t)s->ep_size * grains;
    size_t dispatch = sizeof(int) * (3 * E + s->E_local + 2 + 4 * (size_t)s->ep_size + E * grains +
                                     (size_t)s->E_local * (splits + 1));
    size_t shadowing = 0;
    if (shadows_possible(s))
        shadowing = sizeof(int) *
                        (grains + 1 + (size_t)s->ep_size * E * (grains + 1) + (size_t)s->ep_size) +
                    (size_t)s->ep_size * E + sizeof(MPI_Request) * (size_t)shadow_request_count(s) +
                    sizeof(float) * (size_t)s->E_local * expert_weight_floats(s);
    return routing_bytes(r) + dispatch + shadowing + sizeof(int) * (E * grains + E + S + NK) +
           sizeof(long) * E + sizeof(float) * (2 * S * r->C + 2 * R * r->C + R * FW + R * s->F);
}

size_t moe_scratch_bytes(const MoeShape *s) {
    size_t S = (size_t)moe_max_send_rows(s), R = (size_t)moe_max_recv_rows(s);
    size_t C = (size_t)s->router.C, FW = (size_t)s->F * ffn_w1_rows_per_unit(s->activation);
    size_t shadowing = 0, grains = (size_t)routing_grains(&s->router);
    if (shadows_possible(s))
        shadowing = sizeof(float) * (size_t)s->E_local * grains * expert_weight_floats(s) +
                    sizeof(float *) * grains;
    return shadowing + sizeof(float) * (2 * S * C + 2 * R * C + R * FW +
                                        (size_t)s->router.N * router_slots(&s->router));
}

void moe_layer_free(MoeLayer *m) {
    routing_free(&m->routing);
    dispatch_free(&m->dispatch);
    free(m->global_demand);
    free(m->rows_per_expert);
    free(m->expert_cursor);
    free(m->row_choice);
    free(m->choice_row);
    free(m->send_x);
    free(m->send_y);
    free(m->expert_in);
    free(m->h_pre);
    free(m->h_act);
    free(m->expert_out);
    free(m->shadow_w);
    free(m->shadow_split);
    free(m->shadow_requests);
    memset(m, 0, sizeof *m);
}

int moe_scratch_init(MoeScratch *sc, const MoeShape *s) {
    memset(sc, 0, sizeof *sc);
    size_t S = (size_t)moe_max_send_rows(s), R = (size_t)moe_max_recv_rows(s);
    size_t C = (size_t)s->router.C, FW = (size_t)s->F * ffn_w1_rows_per_unit(s->activation);
    sc->dy_send = malloc(sizeof(float) * (S * C + 1));
    sc->dy_expert = malloc(sizeof(float) * (R * C + 1));
    sc->dh = malloc(sizeof(float) * (R * FW + 1));
    sc->dx_expert = malloc(sizeof(float) * (R * C + 1));
    sc->dx_back = malloc(sizeof(float) * (S * C + 1));
    sc->dgate = malloc(sizeof(float) * (size_t)s->router.N * router_slots(&s->router));
    if (shadows_possible(s)) {
        size_t grains = (size_t)routing_grains(&s->router);
        sc->shadow_grads = malloc(sizeof(float) * s->E_local * grains * expert_weight_floats(s));
        sc->shadow_partials = malloc(sizeof(float *) * grains);
        if (!sc->shadow_grads || !sc->shadow_partials) {
            moe_scratch_free(sc);
            return -1;
        }
    }
    if (!sc->dy_send || !sc->dy_expert || !sc->dh || !sc->dx_expert || !sc->dx_back || !sc->dgate) {
        moe_scratch_free(sc);
        return -1;
    }
    return 0;
}

void moe_scratch_free(MoeScratch *sc) {
    free(sc->dy_send);
    free(sc->dy_expert);
    free(sc->dh);
    free(sc->dx_expert);
    free(sc->dx_back);
    free(sc->dgate);
    free(sc->shadow_grads);
    free(sc->shadow_partials);
    memset(sc, 0, sizeof *sc);
}

/* o[c] += a * y[c]. The same IEEE operations in vector lanes and tail, so
 * every value gets what the plain loop gave it. */
static void axpy_row(float *o, float a, const float *y, int C) {
    int c = 0;
    for (; c + VEC_LANES <= C; c += VEC_LANES)
        vec_store(o + c, vec_load(o + c) + a * vec_load(y + c));
    for (; c < C; c++) o[c] += a * y[c];
}

/* dy_gated = gate * dy; returns the gate's gradient dy . y, summed in float
 * lanes, then across lanes and over the tail: an order set by C alone. */
static float gate_grad_row(float *dy_gated, float gate, const float *dy, const float *y, int C) {
    vec_f lanes = vec_splat(0.0f);
    int c = 0;
    for (; c + VEC_LANES <= C; c += VEC_LANES) {
        vec_f d = vec_load(dy + c);
        lanes += d * vec_load(y + c);
        vec_store(dy_gated + c, gate * d);
    }
    float dgate = 0.0f;
    for (int l = 0; l < VEC_LANES; l++) dgate += lanes[l];
    for (; c < C; c++) {
        dgate += dy[c] * y[c];
        dy_gated[c] = gate * dy[c];
    }
    return dgate;
}

/* Counting sort of the kept slots by (global expert, source token): the
 * order depends only on the routing, never on timing or rank count. An
 * expert's rows are then grouped by grain, and counted per grain. */
static void build_send_order(MoeLayer *m, const RouterShape *s) {
    const Routing *r = &m->routing;
    long slots = (long)s->N * r->slots;
    int E = s->E, grains = routing_grains(s), grain_tokens = routing_grain_tokens(s);
    memset(m->rows_per_expert, 0, sizeof(int) * E * grains);
    for (long a = 0; a < slots; a++)
        if (r->choice_kept[a])
            m->rows_per_expert[r->choice_expert[a] * grains + a / r->slots / grain_tokens]++;
    m->expert_cursor[0] = 0;
    for (int e = 0; e < E; e++) {
        int rows = 0;
        for (int g = 0; g < grains; g++) rows += m->rows_per_expert[e * grains + g];
        if (e + 1 < E) m->expert_cursor[e + 1] = m->expert_cursor[e] + rows;
    }
    for (long a = 0; a < slots; a++) {
        if (!r->choice_kept[a]) {
            m->choice_row[a] = -1;
            continue;
        }
        int row = m->expert_cursor[r->choice_expert[a]]++;
        m->choice_row[a] = row;
        m->row_choice[row] = (int)a;
    }
}

/* mm for local expert j's block: one call per (source rank, grain), and
 * weight gradients into that split's partial; with overlap, outstanding
 * exchanges are tested between those calls. */
static Matmul expert_matmul(const Matmul *mm, Dispatch *d, int j, RowSplit *split,
                            const MoeGrads *g) {
    Matmul view = mm ? *mm : (Matmul){0};
    int count;
    const int *begin = dispatch_expert_splits(d, j, &count);
    *split = (RowSplit){.count = count,
                        .begin = begin,
                        .grads = g ? g->grads : NULL,
                        .partials = g ? g->partials : NULL};
    view.split = split;
    if (d->overlap) {
        d->outer_progress = view.progress;
        d->outer_progress_arg = view.progress_arg;
        view.progress = dispatch_progress;
        view.progress_arg = d;
    }
    return view;
}

/* Switch's expert dropout. A row of local expert j's block is the i-th row
 * of some (source rank, grain) split: the i-th kept assignment of that
 * global expert among the grain's tokens in token order, the same token in
 * every layout. The mask is a hash of (seed, step, layer, global expert,
 * global grain, i, hidden unit), so it never depends on which rank computes
 * the row. */
#define DOMAIN_EXPERT_DROPOUT 0x6564726f70ull
typedef struct ExpertDropout {
    const RouterContext *ctx;
    float rate;
    uint64_t expert;   /* global */
    const int *begin;  /* [count + 1] the rows of each (source rank, grain) split */
    int count, grains; /* splits, and grains per source rank */
    int first_source;  /* world rank of the first split's source */
} ExpertDropout;

static uint64_t dropout_row_key(const RouterContext *ctx, uint64_t expert, uint64_t grain,
                                uint64_t row) {
    uint64_t key = rng_hash3(DOMAIN_EXPERT_DROPOUT ^ ctx->seed, (uint64_t)ctx->step,
                             (uint64_t)ctx->layer);
    return rng_hash3(key, expert * 0x100000001ull + grain, row);
}

static float dropout_factor(uint64_t row_key, int f, float rate, float scale) {
    float u = (float)(rng_mix64(row_key ^ (uint64_t)f) >> 40) * 0x1p-24f;
    return u < rate ? 0.0f : scale;
}

void moe_expert_dropout_mask(float *mask, int F, double rate, const RouterContext *ctx,
                             long expert, long grain, long row) {
    float r = (float)rate, scale = 1.0f / (1.0f - r);
    uint64_t row_key = dropout_row_key(ctx, (uint64_t)expert, (uint64_t)grain, (uint64_t)row);
    for (int f = 0; f < F; f++) mask[f] = dropout_factor(row_key, f, r, scale);
}

static void apply_expert_dropout(void *arg, float *v, int n, int F) {
    const ExpertDropout *d = arg;
    float scale = 1.0f / (1.0f - d->rate);
    for (int i = 0; i < d->count; i++) {
        uint64_t grain =
            (uint64_t)(d->first_source + i / d->grains) * d->grains + (uint64_t)(i % d->grains);
        for (int row = d->begin[i]; row < d->begin[i + 1] && row < n; row++) {
            uint64_t row_key =
                dropout_row_key(d->ctx, d->expert, grain, (uint64_t)(row - d->begin[i]));
            float *r = v + (long)row * F;
            for (int f = 0; f < F; f++) {
                float factor = dropout_factor(row_key, f, d->rate, scale);
                r[f] = factor == 0.0f ? 0.0f : r[f] * factor;
            }
        }
    }
}

/* The dropout of global expert `expert` over rows split as begin[0..count],
 * the first split from world rank first_source, in training; else NULL. */
static const FfnDropout *expert_dropout(const MoeLayer *m, const MoeShape *s, int expert,
                                        const int *begin, int count, int first_source,
                                        ExpertDropout *d, FfnDropout *out) {
    if (!m->ctx.training || s->expert_dropout <= 0) return NULL;
    *d = (ExpertDropout){.ctx = &m->ctx,
                         .rate = (float)s->expert_dropout,
                         .expert = (uint64_t)expert,
                         .begin = begin,
                         .count = count,
                         .grains = routing_grains(&s->router),
                         .first_source = first_source};
    *out = (FfnDropout){apply_expert_dropout, d};
    return out;
}

/* Local expert j's dropout: its splits come from every rank of the group. */
static const FfnDropout *local_expert_dropout(const MoeLayer *m, const MoeShape *s, int j,
                                              ExpertDropout *d, FfnDropout *out) {
    int count;
    const int *begin = dispatch_expert_splits(&m->dispatch, j, &count);
    return expert_dropout(m, s, m->first_local_expert + j, begin, count, m->ep_group_first_rank, d,
                          out);
}

static void run_local_expert(MoeLayer *m, const MoeWeights *w, const MoeShape *s, const Matmul *mm,
                             int j) {
    int C = s->router.C, F = s->F, FW = F * ffn_w1_rows_per_unit(s->activation);
    const int *begin = m->dispatch.expert_row_begin;
    long b = begin[j];
    RowSplit split;
    Matmul em = expert_matmul(mm, &m->dispatch, j, &split, NULL);
    ExpertDropout d;
    FfnDropout dropout;
    ffn_forward(m->expert_out + b * C, m->h_pre + b * FW, m->h_act + b * F, m->expert_in + b * C,
                w->w1 + (long)j * FW * C, w->w2 + (long)j * C * F, begin[j + 1] - begin[j], C, F,
                s->activation, &em, local_expert_dropout(m, s, j, &d, &dropout));
}

static void expert_backward(MoeLayer *m, const MoeGrads *g, const MoeWeights *w, MoeScratch *sc,
                            const MoeShape *s, const Matmul *mm, int j) {
    int C = s->router.C, F = s->F, FW = F * ffn_w1_rows_per_unit(s->activation);
    const int *begin = m->dispatch.expert_row_begin;
    long b = begin[j];
    RowSplit split;
    Matmul em = expert_matmul(mm, &m->dispatch, j, &split, g->partials ? g : NULL);
    ExpertDropout d;
    FfnDropout dropout;
    ffn_backward(sc->dx_expert + b * C, g->w1 + (long)j * FW * C, g->w2 + (long)j * C * F,
                 sc->dh + b * FW, sc->dy_expert + b * C, m->expert_in + b * C, m->h_pre + b * FW,
                 m->h_act + b * F, w->w1 + (long)j * FW * C, w->w2 + (long)j * C * F,
                 begin[j + 1] - begin[j], C, F, s->activation, &em,
                 local_expert_dropout(m, s, j, &d, &dropout));
}

/* ---- shadowing: a source computes its own rows of a busy rank's expert --- */

enum { TAG_SHADOW_WEIGHTS = 0x5e01, TAG_SHADOW_GRADS = 0x5e02 };

/* This rank's k-th shadowed expert's weights: w1 then w2. */
static float *shadow_weights(const MoeLayer *m, const MoeShape *s, int k) {
    return m->shadow_w + (long)k * expert_weight_floats(s);
}

/* Splits global expert e's block of this rank's rows by grain. */
static const int *shadow_split_of(MoeLayer *m, const MoeShape *s, int e) {
    int grains = routing_grains(&s->router);
    m->shadow_split[0] = 0;
    for (int g = 0; g < grains; g++)
        m->shadow_split[g + 1] = m->shadow_split[g] + m->rows_per_expert[e * grains + g];
    return m->shadow_split;
}

/* The calls of shadowed block e: the owner's, one per grain of this rank's
 * rows, under the dropout the owner would apply. view points into split and
 * drop into dd, so a ShadowCall stays where it was filled. */
typedef struct ShadowCall {
    RowSplit split;
    Matmul view;
    ExpertDropout dd;
    FfnDropout dropout;
    const FfnDropout *drop;
} ShadowCall;

static void shadow_call(ShadowCall *call, MoeLayer *m, const MoeShape *s, const Matmul *mm, int e,
                        int me) {
    int grains = routing_grains(&s->router);
    call->split = (RowSplit){.count = grains, .begin = shadow_split_of(m, s, e)};
    call->view = mm ? *mm : (Matmul){0};
    call->view.split = &call->split;
    call->drop = expert_dropout(m, s, e, call->split.begin, grains, m->ep_group_first_rank + me,
                                &call->dd, &call->dropout);
}

/* Owners send the weights of every shadowed block of their experts; the
 * shadowing ranks receive them in expert order. Returns requests started. */
static int shadow_weights_start(MoeLayer *m, const MoeWeights *w, const MoeShape *s,
                                const Comm *comm) {
    const Dispatch *d = &m->dispatch;
    int me = comm->ep_rank, n = 0, k = 0;
    long w1n = expert_w1_floats(s), w2n = expert_weight_floats(s) - w1n;
    for (int e = 0; e < s->router.E; e++) {
        if (!dispatch_shadowed(d, me, e)) continue;
        float *slot = shadow_weights(m, s, k++);
        comm_ep_irecv_floats(comm, slot, (int)w1n, e / s->E_local, TAG_SHADOW_WEIGHTS,
                             &m->shadow_requests[n++]);
        comm_ep_irecv_floats(comm, slot + w1n, (int)w2n, e / s->E_local, TAG_SHADOW_WEIGHTS,
                             &m->shadow_requests[n++]);
    }
    for (int j = 0; j < s->E_local; j++)
        for (int q = 0; q < s->ep_size; q++) {
            if (q == me || !dispatch_shadowed(d, q, m->first_local_expert + j)) continue;
            comm_ep_isend_floats(comm, w->w1 + j * w1n, (int)w1n, q, TAG_SHADOW_WEIGHTS,
                                 &m->shadow_requests[n++]);
            comm_ep_isend_floats(comm, w->w2 + j * w2n, (int)w2n, q, TAG_SHADOW_WEIGHTS,
                                 &m->shadow_requests[n++]);
        }
    return n;
}

/* The shadowed blocks forward: outputs straight into send_y, where the
 * combine leaves their rows alone; hidden rows after the received ones. The
 * calls are the owner's (one per grain), so the bits are its bits. */
static void run_shadows(MoeLayer *m, const MoeShape *s, const Matmul *mm, int me) {
    const Dispatch *d = &m->dispatch;
    int C = s->router.C, F = s->F, FW = F * ffn_w1_rows_per_unit(s->activation);
    long h_row = d->num_recv_rows, w1n = expert_w1_floats(s);
    for (int e = 0, k = 0; e < s->router.E; e++) {
        if (!dispatch_shadowed(d, me, e)) continue;
        long b = d->send_row_begin[e];
        int rows = d->rows_per_expert[e];
        ShadowCall call;
        shadow_call(&call, m, s, mm, e, me);
        const float *wk = shadow_weights(m, s, k++);
        ffn_forward(m->send_y + b * C, m->h_pre + h_row * FW, m->h_act + h_row * F,
                    m->send_x + b * C, wk, wk + w1n, rows, C, F, s->activation, &call.view,
                    call.drop);
        h_row += rows;
    }
}

/* Owners post the receives of the shadowed blocks' weight gradients straight
 * into the partials of those (source, grain) splits, which their own
 * backward leaves untouched (no rows). Grains without rows send nothing. */
static int shadow_grads_receive(MoeLayer *m, const MoeGrads *g, const MoeShape *s, const Comm *comm,
                                int n) {
    const Dispatch *d = &m->dispatch;
    int grains = routing_grains(&s->router), me = comm->ep_rank;
    long w1n = expert_w1_floats(s), w2n = expert_weight_floats(s) - w1n;
    for (int j = 0; j < s->E_local; j++) {
        int e = m->first_local_expert + j;
        for (int q = 0; q < s->ep_size; q++) {
            if (q == me || !dispatch_shadowed(d, q, e)) continue;
            for (int gr = 0; gr < grains; gr++) {
                if (d->every_count[((long)q * s->router.E + e) * grains + gr] == 0) continue;
                float *partial = g->partials[q * grains + gr];
                comm_ep_irecv_floats(comm, partial + (g->w1 - g->grads) + j * w1n, (int)w1n, q,
                                     TAG_SHADOW_GRADS, &m->shadow_requests[n++]);
                comm_ep_irecv_floats(comm, partial + (g->w2 - g->grads) + j * w2n, (int)w2n, q,
                                     TAG_SHADOW_GRADS, &m->shadow_requests[n++]);
            }
        }
    }
    return n;
}

/* The shadowed blocks backward: input gradients straight into dx_back, weight
 * gradients per grain into scratch, sent to the owner. Returns requests. */
static int shadows_backward(MoeLayer *m, MoeScratch *sc, const MoeShape *s, const Matmul *mm,
                            const Comm *comm, int n) {
    const Dispatch *d = &m->dispatch;
    int C = s->router.C, F = s->F, FW = F * ffn_w1_rows_per_unit(s->activation);
    int grains = routing_grains(&s->router), me = comm->ep_rank;
    long h_row = d->num_recv_rows, w1n = expert_w1_floats(s), wn = expert_weight_floats(s);
    for (int e = 0, k = 0; e < s->router.E; e++) {
        if (!dispatch_shadowed(d, me, e)) continue;
        long b = d->send_row_begin[e];
        int rows = d->rows_per_expert[e];
        float *grads = sc->shadow_grads + (long)k * grains * wn;
        memset(grads, 0, sizeof(float) * (size_t)grains * wn);
        for (int gr = 0; gr < grains; gr++) sc->shadow_partials[gr] = grads + gr * wn;
        ShadowCall call;
        shadow_call(&call, m, s, mm, e, me);
        call.split.grads = grads;
        call.split.partials = sc->shadow_partials;
        const float *wk = shadow_weights(m, s, k++);
        ffn_backward(sc->dx_back + b * C, grads, grads + w1n, sc->dh + h_row * FW,
                     sc->dy_send + b * C, m->send_x + b * C, m->h_pre + h_row * FW,
                     m->h_act + h_row * F, wk, wk + w1n, rows, C, F, s->activation, &call.view,
                     call.drop);
        h_row += rows;
        for (int gr = 0; gr < grains; gr++) {
            if (m->rows_per_expert[e * grains + gr] == 0) continue;
            comm_ep_isend_floats(comm, grads + gr * wn, (int)w1n, e / s->E_local, TAG_SHADOW_GRADS,
                                 &m->shadow_requests[n++]);
            comm_ep_isend_floats(comm, grads + gr * wn + w1n, (int)(wn - w1n), e / s->E_local,
                                 TAG_SHADOW_GRADS, &m->shadow_requests[n++]);
        }
    }
    return n;
}

/* One direction of an MoE layer with its exchange overlapped: every local
 * expert's rows are requested at once; chunk by chunk of local experts, the
 * arrived rows are worked on (testing the other requests between sgemms)
 * and sent back at once. The rows, the calls and so the results are those
 * of the blocking path; only dispatch and combine time the waiting. */
typedef struct OverlapPass {
    const float *send;  /* sender layout, out */
    float *arrive;      /* owner layout, in */
    const float *reply; /* owner layout, back */
    float *back;        /* sender layout, back */
} OverlapPass;

static void overlap_pass(MoeLayer *m, const OverlapPass *pass, const MoeShape *s, const Comm *comm,
                         double *phase_s, double *mark, void (*work)(void *ctx, int j), void *ctx) {
    Dispatch *d = &m->dispatch;
    int El = s->E_local, C = s->router.C;
    int chunks = s->overlap_chunks < El ? s->overlap_chunks : El;
    for (int j = 0; j < El; j++) dispatch_expert_start(d, j, pass->send, pass->arrive, C, comm);
    timer_charge(phase_s, PHASE_DISPATCH, mark);
    for (int c = 0; c < chunks; c++) {
        int first = c * El / chunks, last = (c + 1) * El / chunks;
        for (int j = first; j < last; j++) dispatch_expert_wait(d, j);
        timer_charge(phase_s, PHASE_DISPATCH, mark);
        for (int j = first; j < last; j++) work(ctx, j);
        timer_charge(phase_s, PHASE_EXPERTS, mark);
        for (int j = first; j < last; j++)
            combine_expert_start(d, j, pass->reply, pass->back, C, comm);
    }
    combine_wait_all(d);
    timer_charge(phase_s, PHASE_COMBINE, mark);
}

typedef struct ForwardWork {
    MoeLayer *m;
    const MoeWeights *w;
    const MoeShape *s;
    const Matmul *mm;
} ForwardWork;

static void forward_work(void *ctx, int j) {
    ForwardWork *f = ctx;
    run_local_expert(f->m, f->w, f->s, f->mm, j);
}

typedef struct BackwardWork {
    MoeLayer *m;
    const MoeGrads *g;
    const MoeWeights *w;
    MoeScratch *sc;
    const MoeShape *s;
    const Matmul *mm;
} BackwardWork;

static void backward_work(void *ctx, int j) {
    BackwardWork *b = ctx;
    expert_backward(b->m, b->g, b->w, b->sc, b->s, b->mm, j);
}

/* Losses need the router demand of the whole global batch for
 * global_aux_loss: one small all-reduce. */
static void router_losses_with_counts(MoeLayer *m, const RouterShape *rs, const Comm *comm) {
    if (rs->balancing != BALANCE_GLOBAL_AUX_LOSS) {
        router_losses(&m->routing, rs, &m->ctx, NULL, 0);
        return;
    }
    memcpy(m->global_demand, m->routing.balanced_demand, sizeof(long) * rs->E);
    comm_sum_longs(comm, m->global_demand, rs->E);
    router_losses(&m->routing, rs, &m->ctx, m->global_demand, (long)rs->N * comm->world_size);
}

void moe_forward(float *out, MoeLayer *m, const float *x, const MoeWeights *w, const MoeShape *s,
                 const RouterContext *ctx, const Comm *comm, double *phase_s, const Matmul *mm) {
    const RouterShape *rs = &s->router;
    int C = rs->C, S = m->routing.slots;
    double mark = timer_now_s();
    m->ctx = *ctx;
    m->first_local_expert = comm->ep_rank * s->E_local;
    m->ep_group_first_rank = comm->rank - comm->ep_rank;
    router_route(&m->routing, x, &w->router, rs, ctx);
    router_losses_with_counts(m, rs, comm);
    build_send_order(m, rs);
    timer_charge(phase_s, PHASE_ROUTER, &mark);

    int send_rows = 0;
    for (int e = 0; e < rs->E * routing_grains(rs); e++) send_rows += m->rows_per_expert[e];
    for (int row = 0; row < send_rows; row++)
        memcpy(m->send_x + (long)row * C, x + (long)(m->row_choice[row] / S) * C,
               sizeof(float) * C);
    dispatch_plan(&m->dispatch, m->rows_per_expert, comm);
    if (m->dispatch.overlap) {
        OverlapPass pass = {m->send_x, m->expert_in, m->expert_out, m->send_y};
        ForwardWork work = {m, w, s, mm};
        overlap_pass(m, &pass, s, comm, phase_s, &mark, forward_work, &work);
    } else {
        /* The weights are waited for right after the rows, while both ranks
         * are inside MPI: Open MPI has no progress thread, so a transfer
         * left pending could wait for the busy owner's next MPI call, after
         * its own experts. The shadows run before the combine, while the
         * owner works. */
        int requests = m->dispatch.shadowing ? shadow_weights_start(m, w, s, comm) : 0;
        dispatch_rows(&m->dispatch, m->send_x, m->expert_in, C, comm);
        comm_wait_all(m->shadow_requests, requests);
        timer_charge(phase_s, PHASE_DISPATCH, &mark);
        for (int j = 0; j < s->E_local; j++) run_local_expert(m, w, s, mm, j);
        if (m->dispatch.num_shadows > 0) run_shadows(m, s, mm, comm->ep_rank);
        timer_charge(phase_s, PHASE_EXPERTS, &mark);
        combine_rows(&m->dispatch, m->expert_out, m->send_y, C, comm);
    }
    memset(out, 0, sizeof(float) * (size_t)rs->N * C);
    for (long a = 0; a < (long)rs->N * S; a++) {
        int row = m->choice_row[a];
        if (row < 0) continue;
        axpy_row(out + (a / S) * C, m->routing.choice_gate[a], m->send_y + (long)row * C, C);
    }
    timer_charge(phase_s, PHASE_COMBINE, &mark);
}

void moe_backward(float *dx, const MoeGrads *g, const float *dout, const float *x,
                  const MoeWeights *w, MoeLayer *m, MoeScratch *sc, const MoeShape *s,
                  const Comm *comm, double *phase_s, const Matmul *mm) {
    const RouterShape *rs = &s->router;
    int C = rs->C, S = m->routing.slots;
    double mark = timer_now_s();
    memset(sc->dgate, 0, sizeof(float) * (size_t)rs->N * S);
    for (int row = 0; row < m->dispatch.num_send_rows; row++) {
        int a = m->row_choice[row];
        const float *dy = dout + (long)(a / S) * C;
        const float *y = m->send_y + (long)row * C;
        float *dy_row = sc->dy_send + (long)row * C;
        sc->dgate[a] = gate_grad_row(dy_row, m->routing.choice_gate[a], dy, y, C);
    }
    if (m->dispatch.overlap) {
        OverlapPass pass = {sc->dy_send, sc->dy_expert, sc->dx_expert, sc->dx_back};
        BackwardWork work = {m, g, w, sc, s, mm};
        overlap_pass(m, &pass, s, comm, phase_s, &mark, backward_work, &work);
    } else {
        int shadowing = m->dispatch.shadowing;
        int requests = shadowing ? shadow_grads_receive(m, g, s, comm, 0) : 0;
        dispatch_rows(&m->dispatch, sc->dy_send, sc->dy_expert, C, comm);
        timer_charge(phase_s, PHASE_DISPATCH, &mark);
        for (int j = 0; j < s->E_local; j++) expert_backward(m, g, w, sc, s, mm, j);
        if (shadowing) requests = shadows_backward(m, sc, s, mm, comm, requests);
        timer_charge(phase_s, PHASE_EXPERTS, &mark);
        combine_rows(&m->dispatch, sc->dx_expert, sc->dx_back, C, comm);
        comm_wait_all(m->shadow_requests, requests);
        timer_charge(phase_s, PHASE_COMBINE, &mark);
    }

    memset(dx, 0, sizeof(float) * (size_t)rs->N * C);
    router_backward(dx, &g->router, sc->dgate, x, &w->router, &m->routing, rs, &m->ctx);
    timer_charge(phase_s, PHASE_ROUTER, &mark);
    for (int row = 0; row < m->dispatch.num_send_rows; row++)
        axpy_row(dx + (long)(m->row_choice[row] / S) * C, 1.0f, sc->dx_back + (long)row * C, C);
    timer_charge(phase_s, PHASE_COMBINE, &mark);
}
