/* ffn: the feed-forward block used by the dense layers, every expert and the
 * shared expert: out = act(x · w1^T) · w2^T. GELU (tanh approximation) with
 * w1 [F,C], or SwiGLU (Mixtral) with w1 [2F,C] holding the gate rows then the
 * up rows: act = silu(x·gate^T) * (x·up^T). */
#ifndef MOESIM_FFN_H
#define MOESIM_FFN_H

#include "moesim/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum FfnActivation { FFN_GELU, FFN_SWIGLU } FfnActivation;

/* Rows of w1 (and columns of h_pre) per hidden unit: 1, or 2 for SwiGLU. */
int ffn_w1_rows_per_unit(FfnActivation act);

/* Dropout on the hidden activation (Switch's expert dropout): apply(arg,
 * v, n, F) multiplies v[n,F] by the keep mask / (1 - rate). Forward applies
 * it to the activation, backward to the activation's gradient, so the mask
 * must be a pure function of what arg names. */
typedef struct FfnDropout {
    void (*apply)(void *arg, float *v, int n, int F);
    void *arg;
} FfnDropout;

/* x[n,C], w1[F*rows,C], w2[C,F] -> h_pre[n,F*rows], h_act[n,F] (both kept
 * for backward; h_act after dropout), out[n,C]; both products at mm's
 * precision (NULL: float32); dropout NULL: none. */
void ffn_forward(float *out, float *h_pre, float *h_act, const float *x, const float *w1,
                 const float *w2, int n, int C, int F, FfnActivation act, const Matmul *mm,
                 const FfnDropout *dropout);

/* dx[n,C] overwritten; dw1, dw2 accumulated; dh[n,F*rows] is scratch;
 * dropout as in the forward. */
void ffn_backward(float *dx, float *dw1, float *dw2, float *dh, const float *dout,
                  const float *x, const float *h_pre, const float *h_act, const float *w1,
                  const float *w2, int n, int C, int F, FfnActivation act,
                  const Matmul *mm, const FfnDropout *dropout);

#ifdef __cplusplus
}
#endif
#endif
