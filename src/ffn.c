#include "moesim/ffn.h"

#include <math.h>

#include "moesim/ops.h"

int ffn_w1_rows_per_unit(FfnActivation act) { return act == FFN_SWIGLU ? 2 : 1; }

/* h_pre rows are [gate | up]; h_act = silu(gate) * up. */
static void swiglu_forward(float *h_act, const float *h_pre, int n, int F) {
    for (int i = 0; i < n; i++) {
        const float *gate = h_pre + (long)i * 2 * F, *up = gate + F;
        float *out = h_act + (long)i * F;
        for (int j = 0; j < F; j++) out[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
    }
}

/* dh[n,2F] from dact[n,F]. dact may be the upper half of dh's own storage
 * (dh + n*F): row i of dh never reaches past row i of dact, and each value
 * of dact is read before the write that may share its place. */
static void swiglu_backward(float *dh, const float *h_pre, const float *dact, int n, int F) {
    for (int i = 0; i < n; i++) {
        const float *gate = h_pre + (long)i * 2 * F, *up = gate + F;
        const float *d = dact + (long)i * F;
        float *dgate = dh + (long)i * 2 * F, *dup = dgate + F;
        for (int j = 0; j < F; j++) {
            float dj = d[j], sig = 1.0f / (1.0f + expf(-gate[j]));
            dgate[j] = dj * up[j] * sig * (1.0f + gate[j] * (1.0f - sig));
            dup[j] = dj * gate[j] * sig;
        }
    }
}

void ffn_forward(float *out, float *h_pre, float *h_act, const float *x, const float *w1,
                 const float *w2, int n, int C, int F, FfnActivation act, const Matmul *mm) {
    if (n == 0) return;
    int rows = ffn_w1_rows_per_unit(act);
    matmul_forward(h_pre, x, w1, n, C, rows * F, mm);
    if (act == FFN_SWIGLU) swiglu_forward(h_act, h_pre, n, F);
    else gelu_forward(h_act, h_pre, (long)n * F);
    matmul_forward(out, h_act, w2, n, F, C, mm);
}

void ffn_backward(float *dx, float *dw1, float *dw2, float *dh, const float *dout,
                  const float *x, const float *h_pre, const float *h_act, const float *w1,
                  const float *w2, int n, int C, int F, FfnActivation act,
                  const Matmul *mm) {
    if (n == 0) return;
    int rows = ffn_w1_rows_per_unit(act);
    if (act == FFN_SWIGLU) {
        float *dact = dh + (long)n * F; /* the upper half of the [n, 2F] scratch */
        matmul_backward(dact, dw2, dout, h_act, w2, n, F, C, mm);
        swiglu_backward(dh, h_pre, dact, n, F);
    } else {
        matmul_backward(dh, dw2, dout, h_act, w2, n, F, C, mm);
        gelu_backward(dh, h_pre, dh, (long)n * F);
    }
    matmul_backward(dx, dw1, dh, x, w1, n, C, rows * F, mm);
}
