/* ffn: the GELU feed-forward block, out = gelu(x · w1^T) · w2^T, used by the
 * dense layers and by every expert over its block of rows. */
#ifndef MOESIM_FFN_H
#define MOESIM_FFN_H

#ifdef __cplusplus
extern "C" {
#endif

/* x[n,C], w1[F,C], w2[C,F] -> h_pre[n,F], h_act[n,F] (kept for backward), out[n,C] */
void ffn_forward(float *out, float *h_pre, float *h_act, const float *x, const float *w1,
                 const float *w2, int n, int C, int F);

/* dx[n,C] overwritten; dw1, dw2 accumulated; dh[n,F] is scratch. */
void ffn_backward(float *dx, float *dw1, float *dw2, float *dh, const float *dout, const float *x,
                  const float *h_pre, const float *h_act, const float *w1, const float *w2, int n,
                  int C, int F);

#ifdef __cplusplus
}
#endif
#endif
