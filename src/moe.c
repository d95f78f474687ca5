#include "moesim/moe.h"

#include <stdlib.h>
#include <string.h>

#include "moesim/ffn.h"

int moe_layer_init(MoeLayer *m, const MoeShape *s) {
    memset(m, 0, sizeof *m);
    const RouterShape *r = &s->router;
    long NK = (long)r->N * r->K;
    if (routing_init(&m->routing, r) != 0) return -1;
    m->expert_row_begin = malloc(sizeof(int) * (r->E + 1));
    m->expert_cursor = malloc(sizeof(int) * r->E);
    m->row_token = malloc(sizeof(int) * NK);
    m->row_choice = malloc(sizeof(int) * NK);
    m->choice_row = malloc(sizeof(int) * NK);
    m->x_rows = malloc(sizeof(float) * NK * r->C);
    m->h_pre = malloc(sizeof(float) * NK * s->F);
    m->h_act = malloc(sizeof(float) * NK * s->F);
    m->y_rows = malloc(sizeof(float) * NK * r->C);
    if (!m->expert_row_begin || !m->expert_cursor || !m->row_token || !m->row_choice || !m->choice_row ||
        !m->x_rows || !m->h_pre || !m->h_act || !m->y_rows) {
        moe_layer_free(m);
        return -1;
    }
    return 0;
}

void moe_layer_free(MoeLayer *m) {
    routing_free(&m->routing);
    free(m->expert_row_begin);
    free(m->expert_cursor);
    free(m->row_token);
    free(m->row_choice);
    free(m->choice_row);
    free(m->x_rows);
    free(m->h_pre);
    free(m->h_act);
    free(m->y_rows);
    memset(m, 0, sizeof *m);
}

int moe_scratch_init(MoeScratch *sc, const MoeShape *s) {
    long NK = (long)s->router.N * s->router.K;
    sc->dy_rows = malloc(sizeof(float) * NK * s->router.C);
    sc->dh = malloc(sizeof(float) * NK * s->F);
    sc->dx_rows = malloc(sizeof(float) * NK * s->router.C);
    sc->dgate = malloc(sizeof(float) * NK);
    if (!sc->dy_rows || !sc->dh || !sc->dx_rows || !sc->dgate) {
        moe_scratch_free(sc);
        return -1;
    }
    return 0;
}

void moe_scratch_free(MoeScratch *sc) {
    free(sc->dy_rows);
    free(sc->dh);
    free(sc->dx_rows);
    free(sc->dgate);
    memset(sc, 0, sizeof *sc);
}

/* Counting sort of the kept assignments by (expert, source token): each
 * expert's rows form one block, and the order depends only on the routing. */
static void build_dispatch_order(MoeLayer *m, const RouterShape *s) {
    const Routing *r = &m->routing;
    int N = s->N, K = s->K, E = s->E;
    memset(m->expert_row_begin, 0, sizeof(int) * (E + 1));
    for (int a = 0; a < N * K; a++)
        if (r->choice_kept[a]) m->expert_row_begin[r->choice_expert[a] + 1]++;
    for (int e = 0; e < E; e++) m->expert_row_begin[e + 1] += m->expert_row_begin[e];
    m->num_rows = m->expert_row_begin[E];
    int *cursor = m->expert_cursor;
    memcpy(cursor, m->expert_row_begin, sizeof(int) * E);
    for (int a = 0; a < N * K; a++) {
        if (!r->choice_kept[a]) {
            m->choice_row[a] = -1;
            continue;
        }
        int row = cursor[r->choice_expert[a]]++;
        m->choice_row[a] = row;
        m->row_choice[row] = a;
        m->row_token[row] = a / K;
    }
}

void moe_forward(float *out, MoeLayer *m, const float *x, const float *router_w, const float *w1,
                 const float *w2, const MoeShape *s) {
    const RouterShape *rs = &s->router;
    int C = rs->C, F = s->F, K = rs->K;
    router_forward(&m->routing, x, router_w, rs);
    build_dispatch_order(m, rs);
    for (int row = 0; row < m->num_rows; row++)
        memcpy(m->x_rows + (long)row * C, x + (long)m->row_token[row] * C, sizeof(float) * C);
    for (int e = 0; e < rs->E; e++) {
        int begin = m->expert_row_begin[e], n = m->expert_row_begin[e + 1] - begin;
        ffn_forward(m->y_rows + (long)begin * C, m->h_pre + (long)begin * F,
                    m->h_act + (long)begin * F, m->x_rows + (long)begin * C,
                    w1 + (long)e * F * C, w2 + (long)e * C * F, n, C, F);
    }
    memset(out, 0, sizeof(float) * (size_t)rs->N * C);
    for (int a = 0; a < rs->N * K; a++) {
        int row = m->choice_row[a];
        if (row < 0) continue;
        float gate = m->routing.choice_gate[a];
        float *o = out + (long)(a / K) * C;
        const float *y = m->y_rows + (long)row * C;
        for (int c = 0; c < C; c++) o[c] += gate * y[c];
    }
}

void moe_backward(float *dx, float *drouter_w, float *dw1, float *dw2, const float *dout,
                  const float *x, const float *router_w, const float *w1, const float *w2,
                  MoeLayer *m, MoeScratch *sc, const MoeShape *s) {
    const RouterShape *rs = &s->router;
    int C = rs->C, F = s->F, K = rs->K;
    memset(sc->dgate, 0, sizeof(float) * (size_t)rs->N * K);
    for (int row = 0; row < m->num_rows; row++) {
        int a = m->row_choice[row];
        const float *dy = dout + (long)(a / K) * C;
        const float *y = m->y_rows + (long)row * C;
        float *dy_row = sc->dy_rows + (long)row * C;
        float gate = m->routing.choice_gate[a];
        float dgate = 0.0f;
        for (int c = 0; c < C; c++) {
            dgate += dy[c] * y[c];
            dy_row[c] = gate * dy[c];
        }
        sc->dgate[a] = dgate;
    }
    for (int e = 0; e < rs->E; e++) {
        int begin = m->expert_row_begin[e], n = m->expert_row_begin[e + 1] - begin;
        ffn_backward(sc->dx_rows + (long)begin * C, dw1 + (long)e * F * C, dw2 + (long)e * C * F,
                     sc->dh + (long)begin * F, sc->dy_rows + (long)begin * C,
                     m->x_rows + (long)begin * C, m->h_pre + (long)begin * F,
                     m->h_act + (long)begin * F, w1 + (long)e * F * C, w2 + (long)e * C * F, n, C,
                     F);
    }
    memset(dx, 0, sizeof(float) * (size_t)rs->N * C);
    router_backward(dx, drouter_w, sc->dgate, x, router_w, &m->routing, rs);
    for (int row = 0; row < m->num_rows; row++) {
        float *d = dx + (long)m->row_token[row] * C;
        const float *dr = sc->dx_rows + (long)row * C;
        for (int c = 0; c < C; c++) d[c] += dr[c];
    }
}
