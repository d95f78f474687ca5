#include "moesim/ffn.h"

#include "moesim/ops.h"
#include "moesim/vecmath.h"

int ffn_w1_rows_per_unit(FfnActivation act) { return act == FFN_SWIGLU ? 2 : 1; }

static inline vec_f swiglu_vec(vec_f gate, vec_f up) {
    return gate * vec_sigmoid(gate) * up;
}

/* h_pre rows are [gate | up]; h_act = silu(gate) * up. Row tails go
 * through the same vector code on a padded copy. */
static void swiglu_forward(float *h_act, const float *h_pre, int n, int F) {
    for (int i = 0; i < n; i++) {
        const float *gate = h_pre + (long)i * 2 * F, *up = gate + F;
        float *out = h_act + (long)i * F;
        int j = 0;
        for (; j + VEC_LANES <= F; j += VEC_LANES)
            vec_store(out + j, swiglu_vec(vec_load(gate + j), vec_load(up + j)));
        if (j < F)
            vec_store_partial(out + j,
                              swiglu_vec(vec_load_partial(gate + j, F - j, 0.0f),
                                         vec_load_partial(up + j, F - j, 0.0f)),
                              F - j);
    }
}

/* The gradients of gate and up for one vector of values. */
static inline void swiglu_grad_vec(vec_f d, vec_f gate, vec_f up, vec_f *dgate, vec_f *dup) {
    vec_f sig = vec_sigmoid(gate);
    *dgate = d * up * sig * (1.0f + gate * (1.0f - sig));
    *dup = d * gate * sig;
}

/* dh[n,2F] from dact[n,F]. dact may be the upper half of dh's own storage
 * (dh + n*F): row i of dh never reaches past row i of dact, and each value
 * of dact is read before the write that may share its place. */
static void swiglu_backward(float *dh, const float *h_pre, const float *dact, int n, int F) {
    for (int i = 0; i < n; i++) {
        const float *gate = h_pre + (long)i * 2 * F, *up = gate + F;
        const float *d = dact + (long)i * F;
        float *dgate = dh + (long)i * 2 * F, *dup = dgate + F;
        vec_f vg, vu;
        int j = 0;
        for (; j + VEC_LANES <= F; j += VEC_LANES) {
            swiglu_grad_vec(vec_load(d + j), vec_load(gate + j), vec_load(up + j), &vg, &vu);
            vec_store(dgate + j, vg);
            vec_store(dup + j, vu);
        }
        if (j < F) {
            int tail = F - j;
            swiglu_grad_vec(vec_load_partial(d + j, tail, 0.0f),
                            vec_load_partial(gate + j, tail, 0.0f),
                            vec_load_partial(up + j, tail, 0.0f), &vg, &vu);
            vec_store_partial(dgate + j, vg, tail);
            vec_store_partial(dup + j, vu, tail);
        }
    }
}

void ffn_forward(float *out, float *h_pre, float *h_act, const float *x, const float *w1,
                 const float *w2, int n, int C, int F, FfnActivation act, const Matmul *mm,
                 const FfnDropout *dropout) {
    if (n == 0) return;
    int rows = ffn_w1_rows_per_unit(act);
    matmul_forward(h_pre, x, w1, n, C, rows * F, mm);
    if (act == FFN_SWIGLU) swiglu_forward(h_act, h_pre, n, F);
    else gelu_forward(h_act, h_pre, (long)n * F);
    if (dropout) dropout->apply(dropout->arg, h_act, n, F);
    matmul_forward(out, h_act, w2, n, F, C, mm);
}

void ffn_backward(float *dx, float *dw1, float *dw2, float *dh, const float *dout,
                  const float *x, const float *h_pre, const float *h_act, const float *w1,
                  const float *w2, int n, int C, int F, FfnActivation act,
                  const Matmul *mm, const FfnDropout *dropout) {
    if (n == 0) return;
    int rows = ffn_w1_rows_per_unit(act);
    if (act == FFN_SWIGLU) {
        float *dact = dh + (long)n * F; /* the upper half of the [n, 2F] scratch */
        matmul_backward(dact, dw2, dout, h_act, w2, n, F, C, mm);
        if (dropout) dropout->apply(dropout->arg, dact, n, F);
        swiglu_backward(dh, h_pre, dact, n, F);
    } else {
        matmul_backward(dh, dw2, dout, h_act, w2, n, F, C, mm);
        if (dropout) dropout->apply(dropout->arg, dh, n, F);
        gelu_backward(dh, h_pre, dh, (long)n * F);
    }
    matmul_backward(dx, dw1, dh, x, w1, n, C, rows * F, mm);
}
