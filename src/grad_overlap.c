#include "moesim/grad_overlap.h"

#include <stdlib.h>
#include <string.h>


int grad_overlap_init(GradOverlap *g, const GradSources *src, size_t num_params) {
    memset(g, 0, sizeof *g);
    g->src = *src;
    size_t n = num_params ? num_params : 1;
    g->exponent = malloc(n);
    g->fixed = malloc(sizeof(int64_t) * n);
    int world = comm_scope_size(src->comm, COMM_SCOPE_WORLD);
    int edp = comm_scope_size(src->comm, COMM_SCOPE_EDP);
    g->dense_held = malloc(sizeof(int) * (size_t)world);
    g->expert_held = malloc(sizeof(int) * (size_t)edp);
    if (!g->exponent || !g->fixed || !g->dense_held || !g->expert_held) {
        grad_overlap_free(g);
        return -1;
    }
    for (int r = 0; r < world; r++) g->dense_held[r] = src->dense_count;
    for (int r = 0; r < edp; r++) g->expert_held[r] = src->expert_count;
    return 0;
}

void grad_overlap_free(GradOverlap *g) {
    free(g->buckets);
    free(g->exponent);
    free(g->fixed);
    free(g->dense_held);
    free(g->expert_held);
    memset(g, 0, sizeof *g);
}

size_t grad_overlap_bytes(size_t num_params) {
    return num_params * (1 + sizeof(int64_t));
}

static int extends_last(const GradOverlap *g, int layer, int is_expert, size_t offset) {
    if (g->count == 0) return 0;
    const GradBucket *last = &g->buckets[g->count - 1];
    return last->layer == layer && last->is_expert == is_expert &&
           last->offset + last->n == offset && last->n < GRAD_BUCKET_MAX_ELEMENTS;
}

int grad_overlap_add(GradOverlap *g, int layer, int is_expert, size_t offset, size_t n) {
    while (n > 0) {
        if (extends_last(g, layer, is_expert, offset)) {
            GradBucket *last = &g->buckets[g->count - 1];
            size_t room = GRAD_BUCKET_MAX_ELEMENTS - last->n, take = n < room ? n : room;
            last->n += take;
            offset += take;
            n -= take;
            continue;
        }
        GradBucket *grown = realloc(g->buckets, sizeof(GradBucket) * (size_t)(g->count + 1));
        if (!grown) return -1;
        g->buckets = grown;
        g->buckets[g->count++] = (GradBucket){
            .layer = layer, .is_expert = is_expert, .offset = offset, .started_at = -1};
    }
    return 0;
}

/* Ready for the next backward pass. */
static void reset(GradOverlap *g) {
    g->point = 0;
    for (int b = 0; b < g->count; b++) {
        g->buckets[b].started_at = -1;
        g->buckets[b].arrived = 0;
    }
}

static void start_bucket(GradOverlap *g, GradBucket *b) {
    const GradSources *s = &g->src;
    b->started_at = g->point;
    b->arrived = 0;
    if (b->is_expert)
        exact_sum_start(&b->sum, s->comm, COMM_SCOPE_EDP, s->expert_partials, s->expert_count,
                        s->total_partials, b->offset - s->num_dense, b->n, s->grads + b->offset,
                        g->exponent + b->offset, g->fixed + b->offset, g->expert_held);
    else
        exact_sum_start(&b->sum, s->comm, COMM_SCOPE_WORLD, s->dense_partials, s->dense_count,
                        s->total_partials, b->offset, b->n, s->grads + b->offset,
                        g->exponent + b->offset, g->fixed + b->offset, g->dense_held);
    if (b->sum.stage == EXACT_SUM_DONE) b->arrived = 1; /* a one-rank scope: summed at once */
}

/* Marks a bucket whose SUM is seen complete. */
static void note_arrival(GradBucket *b) {
    if (b->arrived || b->started_at < 0 || !exact_sum_last_stage(&b->sum)) return;
    if (!exact_sum_test(&b->sum)) return;
    b->arrived = 1;
}

void grad_overlap_progress(void *arg) {
    GradOverlap *g = arg;
    for (int i = 0; i < g->count; i++) {
        GradBucket *b = &g->buckets[i];
        if (b->started_at < 0 || b->sum.stage == EXACT_SUM_DONE) continue;
        if (!exact_sum_last_stage(&b->sum))
            exact_sum_test(&b->sum);
        else
            note_arrival(b);
    }
}

/* A bucket whose SUM has arrived becomes floats now, not at the end. */
static void convert_arrived(GradOverlap *g) {
    for (int i = 0; i < g->count; i++) {
        GradBucket *b = &g->buckets[i];
        note_arrival(b);
        if (b->arrived && exact_sum_last_stage(&b->sum)) exact_sum_complete(&b->sum);
    }
}

void grad_overlap_ready(GradOverlap *g, int layer, int is_expert) {
    for (int i = 0; i < g->count; i++)
        if (g->buckets[i].started_at >= 0 && g->buckets[i].started_at < g->point)
            exact_sum_continue(&g->buckets[i].sum);
    for (int i = 0; i < g->count; i++) {
        GradBucket *b = &g->buckets[i];
        if (b->started_at < 0 && b->layer == layer && b->is_expert == is_expert)
            start_bucket(g, b);
    }
    convert_arrived(g);
    g->point++;
}

void grad_overlap_finish(GradOverlap *g) {
    for (int i = 0; i < g->count; i++)
        if (g->buckets[i].started_at < 0) start_bucket(g, &g->buckets[i]);
    for (int i = 0; i < g->count; i++) exact_sum_continue(&g->buckets[i].sum);
    for (int i = 0; i < g->count; i++) {
        GradBucket *b = &g->buckets[i];
        exact_sum_complete(&b->sum);
        b->arrived = 1;
    }
    reset(g);
}
