/* ops: the dense building blocks as forward/backward pairs — matmul (every
 * product goes through cblas_sgemm, or oneDNN for native bf16 inputs), RMSNorm,
 * GELU, softmax cross-entropy. Shapes are row-major; weights are stored
 * [out, in] like nn.Linear, so a linear layer computes out = inp · w^T.
 * Backward functions accumulate into weight gradients (+=) so gradients of
 * shared weights add up. */
#ifndef MOESIM_OPS_H
#define MOESIM_OPS_H

#include <stddef.h>

#include "moesim/bf16_gemm.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOESIM_RMSNORM_EPS 1e-5f

/* The precision of a matmul's inputs (--precision, --moe-router-precision).
 * Accumulation, outputs, gradients and master weights are float32 either
 * way: bf16 is the mixed-precision recipe of Switch Transformer. */
typedef enum MatmulPrecision { MATMUL_FP32, MATMUL_BF16 } MatmulPrecision;

/* How one group of matmuls computes. bf16 inputs (activations, weights,
 * incoming gradients) are rounded to bfloat16 (round to nearest even) into a
 * scratch copy: as bf16 bit patterns for oneDNN's native bf16 GEMM
 * (bf16_gemm.h) where the CPU has one and the product is large enough to
 * gain, else as floats that cblas_sgemm multiplies (an exact emulation).
 * Both accumulate in float32 and give the same numbers up to accumulation
 * order. The two scratch buffers hold one operand each, so they are sized
 * for the largest operand of any call (matmul_init); a larger operand aborts
 * with a message. The scratch is written through a const Matmul *, like a
 * Comm's buffers: callers run one matmul at a time. Every function below
 * taking a Matmul * treats NULL as float32. */
/* Where a product over token rows splits, and where each split's weight
 * gradient goes. Every layout issues the same call for a split (one grain's
 * rows, or one grain's rows of an expert), so a row's result never depends on
 * how many rows a rank holds: OpenBLAS's Haswell and Zen kernels round a row
 * in a short tail panel differently from one in a full panel. Each split's
 * weight gradient is a separate partial, for the exact reduction (reduce.h). */
typedef struct RowSplit {
    int count;              /* splits */
    int rows;               /* rows per split, when begin is NULL */
    const int *begin;       /* [count+1] first row of each split within the call, or NULL */
    const float *grads;     /* the gradient buffer that a dw argument points into */
    float *const *partials; /* [count] split i's gradient buffer, laid out like grads */
} RowSplit;

/* The splits of an N-row product (1 without a split), the first row of split
 * i (i = count gives N), and where split i accumulates the gradient dw. */
int row_split_count(const RowSplit *split, int N);
int row_split_begin(const RowSplit *split, int i, int N);
float *row_split_grad(const RowSplit *split, float *dw, int i);

typedef struct Matmul {
    MatmulPrecision precision;
    float *rounded[2];     /* [capacity] each: rounded copies of operand A and B */
    size_t capacity;       /* floats per buffer; 0 for float32 */
    Bf16Gemm *gemm;        /* the native bf16 GEMM, shared by views; NULL: emulated */
    int owns_scratch;      /* matmul_free releases it and gemm (not matmul_view copies) */
    const RowSplit *split; /* of the token rows; NULL: one call, gradients into dw */
    /* Called after each sgemm (of a split, or of matmul_gemm): keeps
     * non-blocking exchanges moving, as Open MPI has no progress thread.
     * NULL: nothing. */
    void (*progress)(void *arg);
    void *progress_arg;
} Matmul;

/* Allocates the scratch when max_operand_floats > 0 (needed when this
 * Matmul or any view of it is bf16), and then the bf16 GEMM that `gemm`
 * chooses (bf16_gemm_choose). Returns 0, or -1 when memory runs out or
 * BF16_GEMM_ONEDNN cannot run here (bf16_gemm_choose says why). */
int matmul_init(Matmul *mm, MatmulPrecision precision, size_t max_operand_floats,
                Bf16GemmChoice gemm);
void matmul_free(Matmul *mm);
/* Bytes matmul_init allocates. */
size_t matmul_bytes(size_t max_operand_floats);
/* The same scratch at another precision: Switch's selective precision keeps
 * the router in float32 while everything else is bf16 (or the reverse, for
 * ablations). Never freed on its own. */
Matmul matmul_view(const Matmul *mm, MatmulPrecision precision);
/* How bf16 products run: bf16_gemm_describe's "onednn (...)", "emulated",
 * or "none" when mm has no bf16 scratch (every product float32). */
const char *matmul_bf16_gemm(const Matmul *mm);

/* x rounded to the nearest bfloat16 (ties to even), as a float: the upper
 * 16 bits of x's float32 pattern after rounding. Infinities stay, NaNs stay
 * NaN (quiet, sign kept), finite values beyond bf16's largest round to
 * infinity, float32 denormals round like any other value. */
float bf16_round(float x);

/* out[N,out_dim] = inp[N,in_dim] · w[out_dim,in_dim]^T */
void matmul_forward(float *out, const float *inp, const float *w, int N, int in_dim, int out_dim,
                    const Matmul *mm);
/* dinp[N,in_dim] = dout·w (overwritten, skipped when dinp is NULL);
 * dw[out_dim,in_dim] += dout^T·inp (per split, into the split's partial) */
void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                     int N, int in_dim, int out_dim, const Matmul *mm);
/* matmul_backward with dinp = dinp_beta * dinp + dout·w */
void matmul_backward_into(float *dinp, float dinp_beta, float *dw, const float *dout,
                          const float *inp, const float *w, int N, int in_dim, int out_dim,
                          const Matmul *mm);
/* cblas_sgemm, row-major, at mm's precision: c[M,N] = alpha * op(a) · op(b)
 * + beta * c, op(a)[M,K] = a or a^T (transpose_a), op(b)[K,N] likewise. For
 * the products that are not a linear layer (attention, the router's
 * backward). On the native bf16 GEMM beta is 0 or 1, like every beta of
 * matmul_backward_into. Whether a bf16 product runs natively depends on
 * M * N * K (bf16_gemm_min_macs; a linear layer's on in_dim * out_dim), so
 * like every shape here it must not depend on the layout. */
void matmul_gemm(int transpose_a, int transpose_b, int M, int N, int K, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc, const Matmul *mm);

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
void softmax_cross_entropy_backward(float *probs_to_dlogits, const int *targets, int N, int V,
                                    long mean_over);

/* Numerically stable softmax of one row of n values, in place; returns the
 * row's log-sum-exp. */
float softmax_row(float *row, int n);
/* softmax_row without the log-sum-exp (the same probabilities). */
void softmax_row_probs(float *row, int n);

#ifdef __cplusplus
}
#endif
#endif
