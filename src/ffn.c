#include "moesim/ffn.h"

#include "moesim/ops.h"

void ffn_forward(float *out, float *h_pre, float *h_act, const float *x, const float *w1,
                 const float *w2, int n, int C, int F) {
    if (n == 0) return;
    matmul_forward(h_pre, x, w1, n, C, F);
    gelu_forward(h_act, h_pre, (long)n * F);
    matmul_forward(out, h_act, w2, n, F, C);
}

void ffn_backward(float *dx, float *dw1, float *dw2, float *dh, const float *dout, const float *x,
                  const float *h_pre, const float *h_act, const float *w1, const float *w2, int n,
                  int C, int F) {
    if (n == 0) return;
    matmul_backward(dh, dw2, dout, h_act, w2, n, F, C);
    gelu_backward(dh, h_pre, dh, (long)n * F);
    matmul_backward(dx, dw1, dh, x, w1, n, C, F);
}
