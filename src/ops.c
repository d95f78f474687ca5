#include "moesim/ops.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int matmul_init(Matmul *mm, MatmulPrecision precision, size_t max_operand_floats) {
    memset(mm, 0, sizeof *mm);
    mm->precision = precision;
    if (max_operand_floats == 0) return 0;
    mm->owns_scratch = 1;
    mm->capacity = max_operand_floats;
    for (int i = 0; i < 2; i++)
        if (!(mm->rounded[i] = malloc(sizeof(float) * max_operand_floats))) {
            matmul_free(mm);
            return -1;
        }
    return 0;
}

void matmul_free(Matmul *mm) {
    if (mm->owns_scratch) {
        free(mm->rounded[0]);
        free(mm->rounded[1]);
    }
    memset(mm, 0, sizeof *mm);
}

size_t matmul_bytes(size_t max_operand_floats) {
    return 2 * sizeof(float) * max_operand_floats;
}

Matmul matmul_view(const Matmul *mm, MatmulPrecision precision) {
    Matmul view = *mm;
    view.precision = precision;
    view.owns_scratch = 0;
    return view;
}

/* Round to nearest even on the bit pattern: adding 0x7fff plus the lowest
 * kept bit carries into the kept bits exactly when the dropped half is above
 * the halfway point, or at it with an odd kept part. Branch-free, so the
 * rounding loop vectorises. A NaN would carry into the exponent, so it keeps
 * its upper half with the quiet bit set (a NaN whose payload sits only in
 * the low bits would otherwise truncate to infinity). */
static inline uint32_t bf16_round_bits(uint32_t u) {
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    uint32_t quiet_nan = (u | 0x00400000u) & 0xffff0000u;
    return (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
}

float bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = bf16_round_bits(u);
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The operand src[rows, cols] (leading dimension ld) as mm wants it: itself
 * for float32, else its bf16-rounded copy in scratch slot `slot`, packed
 * (leading dimension cols, returned in *ld_out). */
static const float *operand(const Matmul *mm, int slot, const float *src, int rows, int cols,
                            int ld, int *ld_out) {
    *ld_out = ld;
    if (!mm || mm->precision == MATMUL_FP32 || rows == 0 || cols == 0) return src;
    size_t need = (size_t)rows * cols;
    if (need > mm->capacity) {
        fprintf(stderr,
                "moesim: internal error: a bf16 matmul operand of %d x %d floats exceeds the "
                "rounding scratch of %zu floats (sized by model_matmul_operand_floats)\n",
                rows, cols, mm->capacity);
        abort();
    }
    float *dst = mm->rounded[slot];
    for (int r = 0; r < rows; r++) {
        const float *row = src + (long)r * ld;
        float *out = dst + (long)r * cols;
        for (int c = 0; c < cols; c++) {
            uint32_t u;
            memcpy(&u, &row[c], sizeof u);
            u = bf16_round_bits(u);
            memcpy(&out[c], &u, sizeof u);
        }
    }
    *ld_out = cols;
    return mm->rounded[slot];
}

void matmul_forward(float *out, const float *inp, const float *w, int N, int in_dim, int out_dim,
                    const Matmul *mm) {
    int ld_inp, ld_w;
    inp = operand(mm, 0, inp, N, in_dim, in_dim, &ld_inp);
    w = operand(mm, 1, w, out_dim, in_dim, in_dim, &ld_w);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, out_dim, in_dim, 1.0f, inp, ld_inp, w,
                ld_w, 0.0f, out, out_dim);
}

void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                     int N, int in_dim, int out_dim, const Matmul *mm) {
    if (N == 0) return;
    int ld_dout, ld_w, ld_inp;
    dout = operand(mm, 0, dout, N, out_dim, out_dim, &ld_dout); /* shared by both products */
    if (dinp) {
        w = operand(mm, 1, w, out_dim, in_dim, in_dim, &ld_w);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in_dim, out_dim, 1.0f, dout,
                    ld_dout, w, ld_w, 0.0f, dinp, in_dim);
    }
    inp = operand(mm, 1, inp, N, in_dim, in_dim, &ld_inp);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out_dim, in_dim, N, 1.0f, dout, ld_dout,
                inp, ld_inp, 1.0f, dw, in_dim);
}

void matmul_gemm(int transpose_a, int transpose_b, int M, int N, int K, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc,
                 const Matmul *mm) {
    a = operand(mm, 0, a, transpose_a ? K : M, transpose_a ? M : K, lda, &lda);
    b = operand(mm, 1, b, transpose_b ? N : K, transpose_b ? K : N, ldb, &ldb);
    cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                transpose_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, a, lda, b, ldb, beta, c,
                ldc);
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
