#include "moesim/ops.h"

#include <cblas.h>
#include <math.h>

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

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (long)n * C;
        float *y = out + (long)n * C;
        double sum_sq = 0.0;
        for (int c = 0; c < C; c++) sum_sq += (double)x[c] * x[c];
        float r = (float)(1.0 / sqrt(sum_sq / C + MOESIM_RMSNORM_EPS));
        for (int c = 0; c < C; c++) y[c] = x[c] * r * w[c];
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
        double dot = 0.0; /* sum_j w_j dy_j x_j */
        for (int c = 0; c < C; c++) dot += (double)w[c] * dy[c] * x[c];
        float coef = (float)(dot * r * r * r / C);
        for (int c = 0; c < C; c++) {
            dx[c] += r * w[c] * dy[c] - coef * x[c];
            dw[c] += dy[c] * x[c] * r;
        }
    }
}

#define GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_CUBIC 0.044715f

/* tanh through one expf so the loop vectorises; exact to float rounding. */
static inline float tanh_via_exp(float u) {
    float e = expf(-2.0f * fabsf(u));
    float t = (1.0f - e) / (1.0f + e);
    return copysignf(t, u);
}

void gelu_forward(float *out, const float *inp, long n) {
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        float t = tanh_via_exp(GELU_SCALE * (x + GELU_CUBIC * x * x * x));
        out[i] = 0.5f * x * (1.0f + t);
    }
}

void gelu_backward(float *dinp, const float *inp, const float *dout, long n) {
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        float t = tanh_via_exp(GELU_SCALE * (x + GELU_CUBIC * x * x * x));
        float dt = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x) * (1.0f - t * t);
        dinp[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * x * dt);
    }
}

float softmax_row(float *row, int n) {
    float max = row[0];
    for (int i = 1; i < n; i++) max = row[i] > max ? row[i] : max;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        row[i] = expf(row[i] - max);
        sum += row[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) row[i] *= inv;
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
