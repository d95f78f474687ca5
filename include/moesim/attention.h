/* attention: causal multi-head self-attention over a packed qkv tensor
 * (q, k, v side by side in each row, heads as column blocks), one sgemm pair
 * per (sequence, head, block of ATTENTION_QUERY_BLOCK query rows); a block
 * multiplies only the keys its rows can see. */
#ifndef MOESIM_ATTENTION_H
#define MOESIM_ATTENTION_H

#include "moesim/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Query rows per block of the causal products. */
#define ATTENTION_QUERY_BLOCK 32

/* out[B*T, C] from qkv[B*T, 3C]; att[B, NH, T, T] keeps the softmax
 * probabilities (zero above the diagonal) for the backward pass. The four
 * products per head run at mm's precision (NULL: float32). */
void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH,
                       const Matmul *mm);

/* dqkv[B*T, 3C] (overwritten) from dout[B*T, C]; scratch is [T, T]. */
void attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH, const Matmul *mm);

#ifdef __cplusplus
}
#endif
#endif
