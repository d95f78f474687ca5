/* ops: the dense building blocks as forward/backward pairs — matmul (every
 * product goes through cblas_sgemm), RMSNorm, GELU, softmax cross-entropy.
 * Shapes are row-major; weights are stored [out, in] like nn.Linear, so a
 * linear layer computes out = inp · w^T. Backward functions accumulate into
 * weight gradients (+=) so gradients of shared weights add up. */
#ifndef MOESIM_OPS_H
#define MOESIM_OPS_H

#ifdef __cplusplus
extern "C" {
#endif

#define MOESIM_RMSNORM_EPS 1e-5f

/* out[N,out_dim] = inp[N,in_dim] · w[out_dim,in_dim]^T */
void matmul_forward(float *out, const float *inp, const float *w, int N, int in_dim, int out_dim);
/* dinp[N,in_dim] = dout·w (overwritten, skipped when dinp is NULL);
 * dw[out_dim,in_dim] += dout^T·inp */
void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                     int N, int in_dim, int out_dim);

/* out[N,C] = inp * rstd * w with rstd[N] = 1/sqrt(mean(inp^2) + eps) */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int C);
/* dinp[N,C] += ...; dw[C] += ... */
void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                      const float *rstd, int N, int C);

/* GPT-2's tanh approximation of GELU, elementwise over n values. */
void gelu_forward(float *out, const float *inp, long n);
/* dinp = gelu'(inp) * dout (overwritten; dinp may alias dout) */
void gelu_backward(float *dinp, const float *inp, const float *dout, long n);

/* In place: logits[N,V] become probabilities; returns the mean over N of
 * -log p[target]. */
double softmax_cross_entropy_forward(float *logits_to_probs, const int *targets, int N, int V);
/* In place: probs[N,V] become dlogits = (p - onehot(target)) / N. */
void softmax_cross_entropy_backward(float *probs_to_dlogits, const int *targets, int N, int V);

/* Numerically stable softmax of one row of n values, in place; returns the
 * row's log-sum-exp. */
float softmax_row(float *row, int n);

#ifdef __cplusplus
}
#endif
#endif
