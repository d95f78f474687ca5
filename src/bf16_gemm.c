#include "moesim/bf16_gemm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/platform.h"

Bf16GemmChoice bf16_gemm_choice_from_name(const char *name) {
    if (strcmp(name, "onednn") == 0) return BF16_GEMM_ONEDNN;
    if (strcmp(name, "emulated") == 0) return BF16_GEMM_EMULATED;
    return BF16_GEMM_AUTO;
}

int bf16_gemm_choose(Bf16GemmChoice choice, Bf16Gemm **gemm, char *err, size_t errlen) {
    *gemm = NULL;
    if (choice == BF16_GEMM_EMULATED) return 0;
    char problem[384];
    *gemm = bf16_gemm_create(problem, sizeof problem);
    if (*gemm || choice == BF16_GEMM_AUTO) return 0;
    snprintf(err, errlen,
             "--bf16-gemm onednn: %s; use --bf16-gemm emulated (the same numbers up to "
             "accumulation order) or auto",
             problem);
    return -1;
}

#ifndef MOESIM_HAVE_ONEDNN

struct Bf16Gemm {
    int unused;
};

Bf16Gemm *bf16_gemm_create(char *problem, size_t problem_len) {
    snprintf(problem, problem_len,
             "this moesim was built without oneDNN; install libdnnl-dev (make deps) and "
             "rebuild (make finds it; ONEDNN=1 insists on it)");
    return NULL;
}

void bf16_gemm_free(Bf16Gemm *g) {
    free(g);
}

const char *bf16_gemm_describe(const Bf16Gemm *g) {
    (void)g;
    return "emulated";
}

long bf16_gemm_min_macs(const Bf16Gemm *g) {
    (void)g;
    return BF16_GEMM_MIN_MACS;
}

void bf16_gemm_set_min_macs(Bf16Gemm *g, long macs) {
    (void)g, (void)macs;
}

void bf16_gemm_run(Bf16Gemm *g, int transpose_a, int transpose_b, int M, int N, int K, float alpha,
                   const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta, float *c,
                   int ldc) {
    (void)g, (void)transpose_a, (void)transpose_b, (void)M, (void)N, (void)K, (void)alpha;
    (void)a, (void)lda, (void)b, (void)ldb, (void)beta, (void)c, (void)ldc;
    fprintf(stderr, "moesim: internal error: bf16_gemm_run in a build without oneDNN\n");
    abort();
}

#else

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>

/* One primitive per (transpose_a, transpose_b, beta): the dimensions are
 * runtime values, so every shape reuses it. */
#define PRIMITIVES 8

struct Bf16Gemm {
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    dnnl_primitive_t primitive[PRIMITIVES];
    float alpha;             /* the runtime output scale, read at execution */
    dnnl_memory_t alpha_mem; /* wraps alpha */
    long min_macs;           /* smaller products are emulated */
    char impl_name[64];      /* oneDNN's implementation, e.g. "gemm:jit" */
    const char *feature;     /* avx512_bf16 or amx_bf16 */
    char description[128];
};

static int primitive_index(int transpose_a, int transpose_b, int beta_one) {
    return (transpose_a ? 4 : 0) + (transpose_b ? 2 : 0) + (beta_one ? 1 : 0);
}

/* A 2-D descriptor, row-major or (transposed) column-major. */
static dnnl_status_t matrix_desc(dnnl_memory_desc_t *md, dnnl_dim_t rows, dnnl_dim_t cols,
                                 dnnl_data_type_t type, int transposed) {
    dnnl_dims_t dims = {rows, cols};
    return dnnl_memory_desc_init_by_tag(md, 2, dims, type, transposed ? dnnl_ba : dnnl_ab);
}

/* The matmul for one transpose pattern and beta, with every dimension given
 * at execution, alpha as a runtime output scale and beta = 1 as a sum
 * post-op (dst = alpha * a·b + dst, a float32 addition). Sets *impl to
 * oneDNN's implementation name. */
static dnnl_status_t create_primitive(Bf16Gemm *g, int transpose_a, int transpose_b, int beta_one,
                                      dnnl_primitive_t *primitive, char *impl, size_t impl_len) {
    const dnnl_dim_t any = DNNL_RUNTIME_DIM_VAL;
    dnnl_memory_desc_t a, b, c;
    dnnl_matmul_desc_t op;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t post_ops = NULL;
    dnnl_primitive_desc_t pd = NULL;
    const float runtime_scale = DNNL_RUNTIME_F32_VAL;
    const char *name = "none";
    dnnl_status_t st = matrix_desc(&a, any, any, dnnl_bf16, transpose_a);
    if (st == dnnl_success) st = matrix_desc(&b, any, any, dnnl_bf16, transpose_b);
    if (st == dnnl_success) st = matrix_desc(&c, any, any, dnnl_f32, 0);
    if (st == dnnl_success) st = dnnl_matmul_desc_init(&op, &a, &b, NULL, &c);
    if (st == dnnl_success) st = dnnl_primitive_attr_create(&attr);
    if (st == dnnl_success) st = dnnl_primitive_attr_set_output_scales(attr, 1, 0, &runtime_scale);
    if (st == dnnl_success && beta_one) st = dnnl_post_ops_create(&post_ops);
    if (st == dnnl_success && beta_one) st = dnnl_post_ops_append_sum(post_ops, 1.0f);
    if (st == dnnl_success && beta_one) st = dnnl_primitive_attr_set_post_ops(attr, post_ops);
    if (st == dnnl_success) st = dnnl_primitive_desc_create(&pd, &op, attr, g->engine, NULL);
    if (st == dnnl_success) st = dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name);
    snprintf(impl, impl_len, "%s", name);
    if (st == dnnl_success) st = dnnl_primitive_create(primitive, pd);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (post_ops) dnnl_post_ops_destroy(post_ops);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return st;
}

/* oneDNN's reference implementations are scalar loops, far slower than
 * sgemm: only a JIT kernel counts as a native bf16 GEMM. */
static int is_reference(const char *impl) {
    return strncmp(impl, "ref", 3) == 0;
}

static int create_primitives(Bf16Gemm *g, char *problem, size_t problem_len, char *impl,
                             size_t impl_len) {
    for (int i = 0; i < PRIMITIVES; i++) {
        dnnl_status_t st = create_primitive(g, (i >> 2) & 1, (i >> 1) & 1, i & 1, &g->primitive[i],
                                            impl, impl_len);
        if (st != dnnl_success) {
            snprintf(problem, problem_len,
                     "oneDNN has no bf16 matmul for this CPU's instruction set (%s)",
                     dnnl_status2str(st));
            return -1;
        }
        if (is_reference(impl)) {
            snprintf(problem, problem_len,
                     "oneDNN offers only its reference bf16 matmul (%s) here, no JIT kernel", impl);
            return -1;
        }
    }
    return 0;
}

/* The CPU feature that gives oneDNN native bf16 instructions, or NULL. */
static const char *native_bf16_feature(void) {
    CpuFeatures cpu;
    cpu_features_detect(&cpu);
    if (cpu.amx_bf16) return "amx_bf16";
    if (cpu.avx512_bf16) return "avx512_bf16";
    return NULL;
}

Bf16Gemm *bf16_gemm_create(char *problem, size_t problem_len) {
    const char *feature = native_bf16_feature();
    if (!feature) {
        snprintf(problem, problem_len,
                 "this CPU has neither avx512_bf16 nor amx_bf16, so oneDNN has no native bf16 "
                 "GEMM here");
        return NULL;
    }
    Bf16Gemm *g = calloc(1, sizeof *g);
    if (!g) {
        snprintf(problem, problem_len, "out of memory");
        return NULL;
    }
    /* moesim runs one rank per core; oneDNN's OpenMP team would otherwise
     * take every core for each rank. */
    omp_set_num_threads(1);
    dnnl_dims_t one = {1};
    dnnl_memory_desc_t alpha_md;
    char impl[64] = "";
    int ok = dnnl_engine_create(&g->engine, dnnl_cpu, 0) == dnnl_success &&
             dnnl_stream_create(&g->stream, g->engine, dnnl_stream_default_flags) == dnnl_success &&
             dnnl_memory_desc_init_by_tag(&alpha_md, 1, one, dnnl_f32, dnnl_a) == dnnl_success &&
             dnnl_memory_create(&g->alpha_mem, &alpha_md, g->engine, &g->alpha) == dnnl_success;
    if (!ok) {
        snprintf(problem, problem_len, "oneDNN could not create a CPU engine and stream");
        bf16_gemm_free(g);
        return NULL;
    }
    if (create_primitives(g, problem, problem_len, impl, sizeof impl) != 0) {
        bf16_gemm_free(g);
        return NULL;
    }
    snprintf(g->impl_name, sizeof g->impl_name, "%s", impl);
    g->feature = feature;
    bf16_gemm_set_min_macs(g, BF16_GEMM_MIN_MACS);
    return g;
}

void bf16_gemm_free(Bf16Gemm *g) {
    if (!g) return;
    for (int i = 0; i < PRIMITIVES; i++)
        if (g->primitive[i]) dnnl_primitive_destroy(g->primitive[i]);
    if (g->alpha_mem) dnnl_memory_destroy(g->alpha_mem);
    if (g->stream) dnnl_stream_destroy(g->stream);
    if (g->engine) dnnl_engine_destroy(g->engine);
    free(g);
}

const char *bf16_gemm_describe(const Bf16Gemm *g) {
    return g->description;
}

long bf16_gemm_min_macs(const Bf16Gemm *g) {
    return g->min_macs;
}

void bf16_gemm_set_min_macs(Bf16Gemm *g, long macs) {
    g->min_macs = macs;
    int n = snprintf(g->description, sizeof g->description, "onednn (%s, %s)", g->impl_name,
                     g->feature);
    if (macs > 0 && n > 0 && (size_t)n < sizeof g->description)
        snprintf(g->description + n, sizeof g->description - (size_t)n,
                 ", emulated under %ld multiply-adds", macs);
}

static void check(dnnl_status_t st, const char *what) {
    if (st == dnnl_success) return;
    fprintf(stderr, "moesim: internal error: oneDNN's bf16 matmul failed in %s: %s\n", what,
            dnnl_status2str(st));
    abort();
}

/* A memory object over data with the call's dimensions (oneDNN 2.x binds
 * dimensions to memory objects, so each call makes its own: a small handle,
 * no copy of the data). */
static dnnl_memory_t wrap(const Bf16Gemm *g, dnnl_dim_t rows, dnnl_dim_t cols, dnnl_dim_t ld,
                          dnnl_data_type_t type, int transposed, const void *data) {
    dnnl_memory_desc_t md;
    dnnl_dims_t dims = {rows, cols};
    dnnl_dims_t strides = {transposed ? 1 : ld, transposed ? ld : 1};
    check(dnnl_memory_desc_init_by_strides(&md, 2, dims, type, strides), "a memory descriptor");
    dnnl_memory_t mem;
    check(dnnl_memory_create(&mem, &md, g->engine, (void *)data), "a memory object");
    return mem;
}

static void zero_rows(float *c, int M, int N, int ldc) {
    for (int r = 0; r < M; r++) memset(c + (long)r * ldc, 0, sizeof(float) * (size_t)N);
}

void bf16_gemm_run(Bf16Gemm *g, int transpose_a, int transpose_b, int M, int N, int K, float alpha,
                   const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta, float *c,
                   int ldc) {
    if (M == 0 || N == 0) return;
    if (K == 0) { /* an empty sum: c keeps beta * c */
        if (beta == 0.0f) zero_rows(c, M, N, ldc);
        return;
    }
    if (beta != 0.0f && beta != 1.0f) {
        fprintf(stderr, "moesim: internal error: bf16_gemm_run takes beta 0 or 1, not %g\n",
                (double)beta);
        abort();
    }
    dnnl_memory_t a_mem = wrap(g, M, K, lda, dnnl_bf16, transpose_a, a);
    dnnl_memory_t b_mem = wrap(g, K, N, ldb, dnnl_bf16, transpose_b, b);
    dnnl_memory_t c_mem = wrap(g, M, N, ldc, dnnl_f32, 0, c);
    g->alpha = alpha;
    dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, a_mem},
                              {DNNL_ARG_WEIGHTS, b_mem},
                              {DNNL_ARG_DST, c_mem},
                              {DNNL_ARG_ATTR_OUTPUT_SCALES, g->alpha_mem}};
    dnnl_primitive_t p = g->primitive[primitive_index(transpose_a, transpose_b, beta == 1.0f)];
    check(dnnl_primitive_execute(p, g->stream, 4, args), "execution");
    dnnl_memory_destroy(a_mem);
    dnnl_memory_destroy(b_mem);
    dnnl_memory_destroy(c_mem);
}

#endif
