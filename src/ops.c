#include "moesim/ops.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/bf16_gemm.h"
#include "moesim/vecmath.h"

int matmul_init(Matmul *mm, MatmulPrecision precision, size_t max_operand_floats,
                Bf16GemmChoice gemm) {
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
    char err[512];
    if (bf16_gemm_choose(gemm, &mm->gemm, err, sizeof err) != 0) {
        matmul_free(mm);
        return -1;
    }
    return 0;
}

void matmul_free(Matmul *mm) {
    if (mm->owns_scratch) {
        free(mm->rounded[0]);
        free(mm->rounded[1]);
        bf16_gemm_free(mm->gemm);
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

const char *matmul_bf16_gemm(const Matmul *mm) {
    if (mm->capacity == 0) return "none";
    return mm->gemm ? bf16_gemm_describe(mm->gemm) : "emulated";
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

/* bf16_round_bits in vector lanes: the same integer operations per value. */
typedef uint32_t vec_u __attribute__((vector_size(VEC_LANES * sizeof(uint32_t))));
static inline vec_f bf16_round_vec(vec_f x) {
    vec_u u = (vec_u)x;
    vec_u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    vec_u quiet_nan = (u | 0x00400000u) & 0xffff0000u;
    vec_u is_nan = (vec_u)((u & 0x7fffffffu) > 0x7f800000u);
    return (vec_f)((is_nan & quiet_nan) | (~is_nan & rounded));
}

float bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = bf16_round_bits(u);
    memcpy(&x, &u, sizeof x);
    return x;
}

/* One input of a product as the GEMM in use reads it: float32 values (the
 * input itself, or its bf16-rounded copy for the emulation) or, for the
 * native bf16 GEMM, packed bf16 bit patterns. */
typedef struct Operand {
    const float *values;  /* NULL when bits is set */
    const uint16_t *bits; /* bf16, for bf16_gemm_run */
    int ld;
} Operand;

/* The operand from row `first` on (a split's rows). */
static Operand from_row(Operand o, int first) {
    long offset = (long)first * o.ld;
    return (Operand){o.values ? o.values + offset : NULL, o.bits ? o.bits + offset : NULL, o.ld};
}

static void check_capacity(const Matmul *mm, int rows, int cols) {
    if ((size_t)rows * cols <= mm->capacity) return;
    fprintf(stderr,
            "moesim: internal error: a bf16 matmul operand of %d x %d floats exceeds the "
            "rounding scratch of %zu floats (sized by model_matmul_operand_floats)\n",
            rows, cols, mm->capacity);
    abort();
}

/* src[rows, cols] (leading dimension ld) rounded to bf16 into dst, packed. */
static void round_rows(float *dst, const float *src, int rows, int cols, int ld) {
    for (int r = 0; r < rows; r++) {
        const float *row = src + (long)r * ld;
        float *out = dst + (long)r * cols;
        int c = 0;
        for (; c + VEC_LANES <= cols; c += VEC_LANES)
            vec_store(out + c, bf16_round_vec(vec_load(row + c)));
        for (; c < cols; c++) {
            uint32_t u;
            memcpy(&u, &row[c], sizeof u);
            u = bf16_round_bits(u);
            memcpy(&out[c], &u, sizeof u);
        }
    }
}

/* src[rows, cols] (leading dimension ld) as bf16 bit patterns into dst,
 * packed: the upper halves of round_rows's floats. */
typedef uint16_t vec_h __attribute__((vector_size(VEC_LANES * sizeof(uint16_t))));
static void bf16_rows(uint16_t *dst, const float *src, int rows, int cols, int ld) {
    for (int r = 0; r < rows; r++) {
        const float *row = src + (long)r * ld;
        uint16_t *out = dst + (long)r * cols;
        int c = 0;
        for (; c + VEC_LANES <= cols; c += VEC_LANES) {
            vec_h bits =
                __builtin_convertvector((vec_u)bf16_round_vec(vec_load(row + c)) >> 16, vec_h);
            memcpy(out + c, &bits, sizeof bits);
        }
        for (; c < cols; c++) {
            uint32_t u;
            memcpy(&u, &row[c], sizeof u);
            out[c] = (uint16_t)(bf16_round_bits(u) >> 16);
        }
    }
}

/* A linear layer's products are split over token rows (RowSplit), and their
 * operands are converted once for all splits, so whether they run natively
 * is decided from the weight's dimensions at a nominal split of this many
 * rows (attention's query block): never from the rows a rank holds, so a
 * call is native on every layout or on none. */
#define NATIVE_NOMINAL_ROWS 32

/* Whether a bf16 product of `macs` multiply-adds runs on the native GEMM. */
static int runs_native(const Matmul *mm, long macs) {
    return mm && mm->precision == MATMUL_BF16 && mm->gemm && macs >= bf16_gemm_min_macs(mm->gemm);
}

static int linear_runs_native(const Matmul *mm, int in_dim, int out_dim) {
    return runs_native(mm, (long)NATIVE_NOMINAL_ROWS * in_dim * out_dim);
}

/* The operand src[rows, cols] (leading dimension ld) as mm wants it: itself
 * for float32; else converted into scratch slot `slot`, packed (leading
 * dimension cols): bf16 bit patterns for the native GEMM (native), bf16-
 * rounded floats for the emulation. The bit patterns take half the slot. */
static Operand operand(const Matmul *mm, int native, int slot, const float *src, int rows, int cols,
                       int ld) {
    if (!mm || mm->precision == MATMUL_FP32) return (Operand){src, NULL, ld};
    check_capacity(mm, rows, cols);
    if (native) { /* an empty operand's product is empty: bf16_gemm_run returns early */
        uint16_t *bits = (uint16_t *)mm->rounded[slot];
        bf16_rows(bits, src, rows, cols, ld);
        return (Operand){NULL, bits, cols};
    }
    if (rows == 0 || cols == 0) return (Operand){src, NULL, ld}; /* sgemm wants ld >= 1 */
    round_rows(mm->rounded[slot], src, rows, cols, ld);
    return (Operand){mm->rounded[slot], NULL, cols};
}

/* c[M,N] = alpha * op(a) · op(b) + beta * c on the operands' GEMM: oneDNN's
 * bf16 matmul for bit patterns, else cblas_sgemm. */
static void product(int transpose_a, int transpose_b, int M, int N, int K, float alpha, Operand a,
                    Operand b, float beta, float *c, int ldc, const Matmul *mm) {
    if (a.bits)
        bf16_gemm_run(mm->gemm, transpose_a, transpose_b, M, N, K, alpha, a.bits, a.ld, b.bits,
                      b.ld, beta, c, ldc);
    else
        cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                    transpose_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, a.values, a.ld,
                    b.values, b.ld, beta, c, ldc);
}

int row_split_count(const RowSplit *split, int N) {
    if (!split) return 1;
    return split->begin ? split->count : (split->rows > 0 ? N / split->rows : 1);
}

int row_split_begin(const RowSplit *split, int i, int N) {
    if (!split) return i == 0 ? 0 : N;
    if (split->begin) return split->begin[i];
    return split->rows > 0 ? i * split->rows : (i == 0 ? 0 : N);
}

float *row_split_grad(const RowSplit *split, float *dw, int i) {
    if (!split || !split->partials) return dw;
    return split->partials[i] + (dw - split->grads);
}

static void keep_progress(const Matmul *mm) {
    if (mm && mm->progress) mm->progress(mm->progress_arg);
}

void matmul_forward(float *out, const float *inp, const float *w, int N, int in_dim, int out_dim,
                    const Matmul *mm) {
    int native = linear_runs_native(mm, in_dim, out_dim);
    Operand x = operand(mm, native, 0, inp, N, in_dim, in_dim);
    Operand weights = operand(mm, native, 1, w, out_dim, in_dim, in_dim);
    const RowSplit *split = mm ? mm->split : NULL;
    for (int i = 0, count = row_split_count(split, N); i < count; i++) {
        int first = row_split_begin(split, i, N), rows = row_split_begin(split, i + 1, N) - first;
        if (rows == 0) continue;
        product(0, 1, rows, out_dim, in_dim, 1.0f, from_row(x, first), weights, 0.0f,
                out + (long)first * out_dim, out_dim, mm);
        keep_progress(mm);
    }
}

void matmul_backward_into(float *dinp, float dinp_beta, float *dw, const float *dout,
                          const float *inp, const float *w, int N, int in_dim, int out_dim,
                          const Matmul *mm) {
    if (N == 0) return;
    int native = linear_runs_native(mm, in_dim, out_dim);
    Operand grad = operand(mm, native, 0, dout, N, out_dim, out_dim); /* shared by both products */
    const RowSplit *split = mm ? mm->split : NULL;
    int count = row_split_count(split, N);
    if (dinp) {
        Operand weights = operand(mm, native, 1, w, out_dim, in_dim, in_dim);
        for (int i = 0; i < count; i++) {
            int first = row_split_begin(split, i, N);
            int rows = row_split_begin(split, i + 1, N) - first;
            if (rows == 0) continue;
            product(0, 0, rows, in_dim, out_dim, 1.0f, from_row(grad, first), weights, dinp_beta,
                    dinp + (long)first * in_dim, in_dim, mm);
            keep_progress(mm);
        }
    }
    Operand x = operand(mm, native, 1, inp, N, in_dim, in_dim);
    for (int i = 0; i < count; i++) {
        int first = row_split_begin(split, i, N), rows = row_split_begin(split, i + 1, N) - first;
        if (rows == 0) continue;
        product(1, 0, out_dim, in_dim, rows, 1.0f, from_row(grad, first), from_row(x, first), 1.0f,
                row_split_grad(split, dw, i), in_dim, mm);
        keep_progress(mm);
    }
}

void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                     int N, int in_dim, int out_dim, const Matmul *mm) {
    matmul_backward_into(dinp, 0.0f, dw, dout, inp, w, N, in_dim, out_dim, mm);
}

void matmul_gemm(int transpose_a, int transpose_b, int M, int N, int K, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc,
                 const Matmul *mm) {
    int native = runs_native(mm, (long)M * N * K);
    Operand op_a = operand(mm, native, 0, a, transpose_a ? K : M, transpose_a ? M : K, lda);
    Operand op_b = operand(mm, native, 1, b, transpose_b ? N : K, transpose_b ? K : N, ldb);
    product(transpose_a, transpose_b, M, N, K, alpha, op_a, op_b, beta, c, ldc, mm);
    keep_progress(mm);
}

/* Per row, sums run in double, one accumulator per lane, then across lanes
 * and over the tail: the order depends only on C. The elementwise parts do
 * the same IEEE operations in vector lanes and in the scalar tail. */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (long)n * C;
        float *y = out + (long)n * C;
        double sum_sq = dot_double(x, x, (size_t)C);
        float r = (float)(1.0 / sqrt(sum_sq / C + MOESIM_RMSNORM_EPS));
        int c = 0;
        for (; c + VEC_LANES <= C; c += VEC_LANES)
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
        vec_d lanes = {{0}, {0}}; /* sum_j w_j dy_j x_j */
        int c = 0;
        for (; c + VEC_LANES <= C; c += VEC_LANES)
            vec_d_add_product3(&lanes, vec_load(w + c), vec_load(dy + c), vec_load(x + c));
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

/* In place: the row becomes exp(row - max), returned with its sum through
 * *sum and the max. The values are summed in double, lane by lane, then
 * across lanes: the order depends only on n, never on other rows. */
static float exp_row_minus_max(float *row, int n, double *sum) {
    vec_f vmax = vec_splat(row[0]);
    int i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES) vmax = vec_max(vmax, vec_load(row + i));
    if (i < n) vmax = vec_max(vmax, vec_load_partial(row + i, n - i, row[0]));
    float max = vec_hmax(vmax);
    vec_d vsum = {{0}, {0}};
    for (i = 0; i + VEC_LANES <= n; i += VEC_LANES) {
        vec_f e = vec_exp(vec_load(row + i) - max);
        vec_store(row + i, e);
        vec_d_add(&vsum, e);
    }
    if (i < n) {
        /* -inf pads the tail so its lanes add exp(-inf) = 0 */
        vec_f e = vec_exp(vec_load_partial(row + i, n - i, -__builtin_inff()) - max);
        vec_store_partial(row + i, e, n - i);
        vec_d_add(&vsum, e);
    }
    *sum = vec_d_sum(&vsum);
    return max;
}

static void scale_row(float *row, int n, float factor) {
    vec_f f = vec_splat(factor);
    int i = 0;
    for (; i + VEC_LANES <= n; i += VEC_LANES) vec_store(row + i, vec_load(row + i) * f);
    for (; i < n; i++) row[i] *= factor;
}

float softmax_row(float *row, int n) {
    double sum;
    float max = exp_row_minus_max(row, n, &sum);
    scale_row(row, n, (float)(1.0 / sum));
    return max + (float)log(sum);
}

void softmax_row_probs(float *row, int n) {
    double sum;
    exp_row_minus_max(row, n, &sum);
    scale_row(row, n, (float)(1.0 / sum));
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

void softmax_cross_entropy_backward(float *probs_to_dlogits, const int *targets, int N, int V,
                                    long mean_over) {
    float inv_n = (float)(1.0 / (double)mean_over);
    for (int n = 0; n < N; n++) {
        float *row = probs_to_dlogits + (long)n * V;
        row[targets[n]] -= 1.0f;
        for (int v = 0; v < V; v++) row[v] *= inv_n;
    }
}
