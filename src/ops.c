#include "moesim/ops.h"

#include <cblas.h>
#include <math.h>

#include "moesim/vecmath.h"

void matmul_forward(float *out, const float *inp, const float *w, int N, int in_dim, int out_dim) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, out_dim, in_dim, 1.0f, inp, in_dim, w,
                in_dim, 0.0f, out, out_dim);
}

void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                     int N, int in_dim, int out_dim) {
    if (N == 0) return;
    if (dinp)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in_dim, out_dim, 1.0f, dout,
                    out_dim, w, in_dim, 0.0f, dinp, in_dim);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out_dim, in_dim, N, 1.0f, dout, out_dim,
                inp, in_dim, 1.0f, dw, in_dim);
}

/* Per row, sums run in double, one accumulator per lane, then across lanes
 * and over the tail: the order depends only on C. The elementwise parts do
 * the same IEEE operations in vector lanes and in the scalar tail. */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (long)n * C;
        float *y = out + (long)n * C;
        vec_d lanes = {0};
        int c = 0;
        for (; c + VEC_LANES <= C; c += VEC_LANES) {
            vec_d xd = vec_to_double(vec_load(x + c));
            lanes += xd * xd;
        }
        double sum_sq = vec_d_sum(&lanes);
        for (int t = c; t < C; t++) sum_sq += (double)x[t] * x[t];
        float r = (float)(1.0 / sqrt(sum_sq / C + MOESIM_RMSNORM_EPS));
        for (c = 0; c + VEC_LANES <= C; c += VEC_LANES)
            vec_store(y + c, vec_load(x + c) * r * vec_load(w + c));
        for (; c < C; c++) y[c] = x[c] * r * w[c];
        rstd[n] = r;
    }
}

void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                      const float *rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (long)n * C;
        const float *dy = dout + (long)n * C;
        float *dx = dinp + (long)n * C;
        float r = rstd[n];
        vec_d lanes = {0}; /* sum_j w_j dy_j x_j */
        int c = 0;
        for (; c + VEC_LANES <= C; c += VEC_LANES)
            lanes += vec_to_double(vec_load(w + c)) * vec_to_double(vec_load(dy + c)) *
                     vec_to_double(vec_load(x + c));
        double dot = vec_d_sum(&lanes);
        for (int t = c; t < C; t++) dot += (double)w[t] * dy[t] * x[t];
        float coef = (float)(dot * r * r * r / C);
        for (c = 0; c + VEC_LANES <= C; c += VEC_LANES) {
            vec_f wc = vec_load(w + c), dyc = vec_load(dy + c), xc = vec_load(x + c);
            vec_store(dx + c, vec_load(dx + c) + (r * wc * dyc - coef * xc));
            vec_store(dw + c, vec_load(dw + c) + dyc * xc * r);
        }
        for (; c < C; c++) {
            dx[c] += r * w[c] * dy[c] - coef * x[c];
            dw[c] += dy[c] * x[c] * r;
        }
    }
}

#define GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_CUBIC 0.044715f

static inline vec_f gelu_vec(vec_f x) {
    vec_f t = vec_tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x));
    return 0.5f * x * (1.0f + t);
}

static inline vec_f gelu_grad_vec(vec_f x, vec_f dout) {
    vec_f t = vec_tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x));
    vec_f dt = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x) * (1.0f - t * t);
    return dout * (0.5f * (1.0f + t) + 0.5f * x * dt);
}

/* Loop tails go through the same vector code on a padded copy, so every
 * value gets the same arithmetic wherever it sits. */
void gelu_forward(float *out, const float *inp, long n) {
    long i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES) vec_store(out + i, gelu_vec(vec_load(inp + i)));
    int tail = (int)(n - i);
    if (tail) vec_store_partial(out + i, gelu_vec(vec_load_partial(inp + i, tail, 0.0f)), tail);
}

void gelu_backward(float *dinp, const float *inp, const float *dout, long n) {
    long i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES)
        vec_store(dinp + i, gelu_grad_vec(vec_load(inp + i), vec_load(dout + i)));
    int tail = (int)(n - i);
    if (tail)
        vec_store_partial(dinp + i,
                          gelu_grad_vec(vec_load_partial(inp + i, tail, 0.0f),
                                        vec_load_partial(dout + i, tail, 0.0f)),
                          tail);
}

/* The row's values are summed in double, lane by lane, then across lanes:
 * the order depends only on n, never on other rows. */
float softmax_row(float *row, int n) {
    vec_f vmax = vec_splat(row[0]);
    int i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES) vmax = vec_max(vmax, vec_load(row + i));
    if (i < n) vmax = vec_max(vmax, vec_load_partial(row + i, n - i, row[0]));
    float max = vec_hmax(vmax);
    vec_d vsum = {0};
    for (i = 0; i + VEC_LANES <= n; i += VEC_LANES) {
        vec_f e = vec_exp(vec_load(row + i) - max);
        vec_store(row + i, e);
        vsum += vec_to_double(e);
    }
    if (i < n) {
        /* -inf pads the tail so its lanes add exp(-inf) = 0 */
        vec_f e = vec_exp(vec_load_partial(row + i, n - i, -__builtin_inff()) - max);
        vec_store_partial(row + i, e, n - i);
        vsum += vec_to_double(e);
    }
    double sum = vec_d_sum(&vsum);
    vec_f inv = vec_splat((float)(1.0 / sum));
    for (i = 0; i + VEC_LANES <= n; i += VEC_LANES) vec_store(row + i, vec_load(row + i) * inv);
    for (; i < n; i++) row[i] *= inv[0];
    return max + (float)log(sum);
}

double softmax_cross_entropy_forward(float *logits_to_probs, const int *targets, int N, int V) {
    double loss = 0.0;
    for (int n = 0; n < N; n++) {
        float *row = logits_to_probs + (long)n * V;
        float target_logit = row[targets[n]];
        float lse = softmax_row(row, V);
        loss += (double)lse - target_logit;
    }
    return loss / N;
}

void softmax_cross_entropy_backward(float *probs_to_dlogits, const int *targets, int N, int V) {
    float inv_n = 1.0f / N;
    for (int n = 0; n < N; n++) {
        float *row = probs_to_dlogits + (long)n * V;
        row[targets[n]] -= 1.0f;
        for (int v = 0; v < V; v++) row[v] *= inv_n;
    }
}
