#include "moesim/attention.h"

#include <math.h>
#include <string.h>

#include "moesim/ops.h"
#include "moesim/vecmath.h"

/* Query rows [first, end) of one (sequence, head) attend to keys [0, end)
 * only: the block's products skip the keys every row of it masks, which
 * would otherwise be half of each product. The blocks depend only on T, so
 * every layout issues the same calls for a sequence. */
static int block_end(int first, int T) {
    return first + ATTENTION_QUERY_BLOCK < T ? first + ATTENTION_QUERY_BLOCK : T;
}

/* Rows [first, end) of a causal score matrix: row t keeps columns 0..t as
 * probabilities, the rest of the row is zero. */
static void causal_softmax_rows(float *att, int first, int end, int T) {
    for (int t = first; t < end; t++) {
        float *row = att + (long)t * T;
        softmax_row_probs(row, t + 1);
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
            for (int first = 0; first < T; first += ATTENTION_QUERY_BLOCK) {
                int end = block_end(first, T), rows = end - first;
                float *a_rows = a + (long)first * T;
                matmul_gemm(0, 1, rows, end, hs, scale, q + (long)first * ld_qkv, ld_qkv, k,
                            ld_qkv, 0.0f, a_rows, T, mm);
                causal_softmax_rows(a, first, end, T);
                matmul_gemm(0, 0, rows, hs, end, 1.0f, a_rows, T, v, ld_qkv, 0.0f,
                            o + (long)first * C, C, mm);
            }
        }
    }
}

/* In place, rows [first, end): datt becomes the gradient of the pre-softmax
 * scores (causal) over columns [0, end). Each row's dot product runs in
 * double lanes, in an order set by t alone; the elementwise update is the
 * same IEEE arithmetic in lanes and tail. */
static void causal_softmax_backward_rows(float *datt, const float *att, int first, int end,
                                         int T) {
    for (int t = first; t < end; t++) {
        const float *p = att + (long)t * T;
        float *d = datt + (long)t * T;
        int n = t + 1, j = 0;
        float fdot = (float)dot_double(p, d, (size_t)n);
        for (; j + VEC_LANES <= n; j += VEC_LANES)
            vec_store(d + j, vec_load(p + j) * (vec_load(d + j) - fdot));
        for (; j < n; j++) d[j] = p[j] * (d[j] - fdot);
        memset(d + n, 0, sizeof(float) * (size_t)(end - n));
    }
}

/* One (sequence, head). Query blocks give datt's rows and dq; key blocks
 * [first, end) give dk and dv from the query rows [first, T) that see them. */
static void head_backward(float *dq, float *dk, float *dv, float *datt, const float *dO,
                          const float *q, const float *k, const float *v, const float *a, int T,
                          int C, int hs, float scale, const Matmul *mm) {
    int ld_qkv = 3 * C;
    for (int first = 0; first < T; first += ATTENTION_QUERY_BLOCK) {
        int end = block_end(first, T), rows = end - first;
        float *datt_rows = datt + (long)first * T;
        matmul_gemm(0, 1, rows, end, hs, 1.0f, dO + (long)first * C, C, v, ld_qkv, 0.0f,
                    datt_rows, T, mm);
        causal_softmax_backward_rows(datt, a, first, end, T);
        matmul_gemm(0, 0, rows, hs, end, scale, datt_rows, T, k, ld_qkv, 0.0f,
                    dq + (long)first * ld_qkv, ld_qkv, mm);
    }
    for (int first = 0; first < T; first += ATTENTION_QUERY_BLOCK) {
        int end = block_end(first, T), cols = end - first, seen_by = T - first;
        const float *a_block = a + (long)first * T + first;
        const float *datt_block = datt + (long)first * T + first;
        matmul_gemm(1, 0, cols, hs, seen_by, 1.0f, a_block, T, dO + (long)first * C, C, 0.0f,
                    dv + (long)first * ld_qkv, ld_qkv, mm);
        matmul_gemm(1, 0, cols, hs, seen_by, scale, datt_block, T, q + (long)first * ld_qkv,
                    ld_qkv, 0.0f, dk + (long)first * ld_qkv, ld_qkv, mm);
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
            const float *q = qkv + base;
            float *dq = dqkv + base;
            head_backward(dq, dq + C, dq + 2 * C, scratch, dout + (long)b * T * C + h * hs, q,
                          q + C, q + 2 * C, att + ((long)b * NH + h) * T * T, T, C, hs, scale,
                          mm);
        }
    }
}
