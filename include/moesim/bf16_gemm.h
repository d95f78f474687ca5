/* bf16_gemm: a real bfloat16 GEMM (bf16 inputs, float32 accumulation and
 * output) through oneDNN's matmul primitive, on CPUs with AVX512-BF16 or
 * AMX-BF16; and the choice between it and ops.c's exact emulation
 * (--bf16-gemm). A build without oneDNN (MOESIM_HAVE_ONEDNN unset) keeps the
 * emulation only. */
#ifndef MOESIM_BF16_GEMM_H
#define MOESIM_BF16_GEMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* --bf16-gemm: auto takes oneDNN where it runs natively, else emulates. */
typedef enum Bf16GemmChoice { BF16_GEMM_AUTO, BF16_GEMM_ONEDNN, BF16_GEMM_EMULATED } Bf16GemmChoice;

/* "auto" | "onednn" | "emulated" (the config's spelling) to the choice. */
Bf16GemmChoice bf16_gemm_choice_from_name(const char *name);

/* oneDNN's engine, stream and one matmul primitive per transpose pattern and
 * beta (0 or 1), created once; dimensions are given at each call. */
typedef struct Bf16Gemm Bf16Gemm;

/* The native GEMM, or NULL with why not in problem (names the missing CPU
 * feature, oneDNN implementation or build option, and the fix). */
Bf16Gemm *bf16_gemm_create(char *problem, size_t problem_len);
void bf16_gemm_free(Bf16Gemm *g);
/* "onednn (gemm:jit, avx512_bf16), emulated under 524288 multiply-adds": the
 * library, its implementation, the CPU feature that runs it, and which
 * products stay emulated (bf16_gemm_min_macs). */
const char *bf16_gemm_describe(const Bf16Gemm *g);

/* oneDNN's bf16 matmul costs a few microseconds more per call than sgemm, so
 * small products run faster emulated: on Zen 5 the two are at par near
 * 64 x 64 x 64 and oneDNN is 1.5-2x faster from 2^19 multiply-adds up. */
#define BF16_GEMM_MIN_MACS (1L << 19)
/* Products of fewer multiply-adds are emulated (BF16_GEMM_MIN_MACS unless set). */
long bf16_gemm_min_macs(const Bf16Gemm *g);
/* Tests: 0 runs every product on oneDNN. */
void bf16_gemm_set_min_macs(Bf16Gemm *g, long macs);

/* For `choice`: *gemm becomes the native GEMM (auto where available, onednn)
 * or NULL (emulated, or auto where it is not). Returns 0, or -1 with err set
 * when onednn was asked for and cannot run here. */
int bf16_gemm_choose(Bf16GemmChoice choice, Bf16Gemm **gemm, char *err, size_t errlen);

/* cblas_sgemm's row-major c[M,N] = alpha * op(a) · op(b) + beta * c for
 * beta 0 or 1 (c added in float32), with a and b bf16 bit patterns: op(a)[M,K]
 * is a, or a^T (transpose_a), with leading dimension lda; op(b)[K,N] likewise.
 * Aborts with a message if oneDNN fails. */
void bf16_gemm_run(Bf16Gemm *g, int transpose_a, int transpose_b, int M, int N, int K, float alpha,
                   const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta, float *c,
                   int ldc);

#ifdef __cplusplus
}
#endif
#endif
