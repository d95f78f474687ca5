#include "moesim/attention.h"

#include <math.h>
#include <string.h>

#include "moesim/ops.h"
#include "moesim/vecmath.h"

/* Row t of a causal score matrix attends to columns 0..t only. */
static void causal_softmax_rows(float *att, int T) {
    for (int t = 0; t < T; t++) {
        float *row = att + (long)t * T;
        softmax_row(row, t + 1);
        memset(row + t + 1, 0, sizeof(float) * (size_t)(T - t - 1));
    }
}

void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH,
                       const Matmul *mm) {
    int hs = C / NH;
    int ld_qkv = 3 * C;
    float scale = 1.0f / sqrtf((float)hs);
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float *q = qkv + (long)b * T * ld_qkv + h * hs;
            const float *k = q + C;
            const float *v = q + 2 * C;
            float *a = att + ((long)b * NH + h) * T * T;
            float *o = out + (long)b * T * C + h * hs;
            matmul_gemm(0, 1, T, T, hs, scale, q, ld_qkv, k, ld_qkv, 0.0f, a, T, mm);
            causal_softmax_rows(a, T);
            matmul_gemm(0, 0, T, hs, T, 1.0f, a, T, v, ld_qkv, 0.0f, o, C, mm);
        }
    }
}

/* In place: datt becomes the gradient of the pre-softmax scores (causal).
 * Each row's dot product runs in double lanes, in an order set by t alone;
 * the elementwise update is the same IEEE arithmetic in lanes and tail. */
static void causal_softmax_backward_rows(float *datt, const float *att, int T) {
    for (int t = 0; t < T; t++) {
        const float *p = att + (long)t * T;
        float *d = datt + (long)t * T;
        int n = t + 1, j = 0;
        float fdot = (float)dot_double(p, d, (size_t)n);
        for (; j + VEC_LANES <= n; j += VEC_LANES)
            vec_store(d + j, vec_load(p + j) * (vec_load(d + j) - fdot));
        for (; j < n; j++) d[j] = p[j] * (d[j] - fdot);
        memset(d + n, 0, sizeof(float) * (size_t)(T - n));
    }
}

void attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH, const Matmul *mm) {
    int hs = C / NH;
    int ld_qkv = 3 * C;
    float scale = 1.0f / sqrtf((float)hs);
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            long base = (long)b * T * ld_qkv + h * hs;
            const float *q = qkv + base, *k = q + C, *v = q + 2 * C;
            float *dq = dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
            const float *a = att + ((long)b * NH + h) * T * T;
            const float *dO = dout + (long)b * T * C + h * hs;
            float *datt = scratch;
            matmul_gemm(0, 1, T, T, hs, 1.0f, dO, C, v, ld_qkv, 0.0f, datt, T, mm);
            matmul_gemm(1, 0, T, hs, T, 1.0f, a, T, dO, C, 0.0f, dv, ld_qkv, mm);
            causal_softmax_backward_rows(datt, a, T);
            matmul_gemm(0, 0, T, hs, T, scale, datt, T, k, ld_qkv, 0.0f, dq, ld_qkv, mm);
            matmul_gemm(1, 0, T, hs, T, scale, datt, T, q, ld_qkv, 0.0f, dk, ld_qkv, mm);
        }
    }
}
