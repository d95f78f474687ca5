/* platform: start-up facts of the machine that decide speed without changing
 * the model — which OpenBLAS kernel runs (re-executing the process with the
 * right OPENBLAS_CORETYPE when OpenBLAS fell back to an older kernel than the
 * CPU supports), how many BLAS threads each rank uses, and whether float32
 * denormals are flushed to zero — plus a one-line description of them for the
 * start-up header and the run record. */
#ifndef MOESIM_PLATFORM_H
#define MOESIM_PLATFORM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Instruction-set features that decide which OpenBLAS kernel can run: set
 * only when the CPU has them and the OS saves the registers they use. */
typedef struct CpuFeatures {
    int avx, avx2, fma;
    int avx512f, avx512bw, avx512dq, avx512vl;
    int avx512_bf16, amx_bf16;
} CpuFeatures;

void cpu_features_detect(CpuFeatures *cpu);
/* "avx2 fma avx512f ..." of the features present; "none" when empty. */
void cpu_features_describe(const CpuFeatures *cpu, char *buf, size_t len);

/* Instruction level an OpenBLAS kernel needs: 3 AVX-512, 2 AVX2+FMA, 1 AVX,
 * 0 SSE-era kernels, -1 a name this table does not know (case-insensitive). */
int blas_kernel_level(const char *kernel);
/* The fastest kernel of Debian's OpenBLAS 0.3.21 for these features
 * (SkylakeX for AVX-512F/BW/DQ/VL, Haswell for AVX2+FMA, Sandybridge for
 * AVX), or NULL when the SSE kernels are all the CPU can run. */
const char *blas_best_kernel(const CpuFeatures *cpu);
/* The kernel-choice rule: the kernel to re-execute with when the one
 * OpenBLAS reports is older than the CPU supports, or NULL to keep it. An
 * unknown reported name is kept: it is newer than this table. */
const char *blas_kernel_upgrade(const CpuFeatures *cpu, const char *reported);

/* Largest error of cblas_sgemm in use against a double-precision reference
 * over the four transpose cases, relative to sum |a||b| per element. */
double blas_sgemm_self_check_error(void);
/* Relative errors above this mean a wrong kernel (rounding alone stays
 * far below it for the self-check's K). */
#define BLAS_SELF_CHECK_TOLERANCE 1e-5

typedef enum {
    BLAS_KERNEL_BY_OPENBLAS, /* OpenBLAS's own detection, kept */
    BLAS_KERNEL_BY_MOESIM,   /* moesim re-executed with OPENBLAS_CORETYPE */
    BLAS_KERNEL_BY_USER      /* OPENBLAS_CORETYPE set by the user */
} BlasKernelSource;

#define PLATFORM_NAME_MAX 48
#define PLATFORM_ERR_MAX 512

typedef struct Platform {
    CpuFeatures cpu;
    char blas_library[PLATFORM_NAME_MAX];  /* "OpenBLAS 0.3.21" */
    char blas_kernel[PLATFORM_NAME_MAX];   /* the kernel in use */
    char blas_detected[PLATFORM_NAME_MAX]; /* OpenBLAS's own pick */
    char blas_best[PLATFORM_NAME_MAX];     /* best for the CPU; "" when none known */
    char blas_rejected[PLATFORM_NAME_MAX]; /* moesim's pick that failed the self-check */
    BlasKernelSource kernel_source;
    int blas_threads;
    int blas_threads_from_env; /* 0: moesim's default of one per rank */
    int flush_denormals;       /* FTZ and DAZ set on this rank */
    /* A user-set kernel that cannot be used; every rank reports it
     * collectively once MPI runs, so it is kept rather than printed here. */
    char error[PLATFORM_ERR_MAX];
} Platform;

/* Call first in main, before MPI_Init and before any BLAS call: reads which
 * kernel OpenBLAS loaded, re-executes the process (execv of /proc/self/exe
 * with argv) when the kernel-choice rule asks for a better one, self-checks
 * the kernel in a child process (so an illegal instruction cannot kill the
 * run), and sets one BLAS thread unless the environment sets a count. May
 * not return. */
void platform_start(Platform *p, char **argv);

/* Sets or clears flush-to-zero and denormals-are-zero for this thread (and
 * the BLAS kernels it runs); records the mode now in effect. */
void platform_set_flush_denormals(Platform *p, int flush);
/* 1 when this thread's float unit flushes denormals (FTZ and DAZ). */
int platform_denormals_flushed(void);

const char *blas_kernel_source_name(BlasKernelSource source); /* openblas | moesim | user */
/* 1 when the CPU could run a faster kernel than the one in use. */
int platform_faster_kernel_exists(const Platform *p);
/* "OpenBLAS 0.3.21 | kernel Zen (OpenBLAS's choice) | 1 BLAS thread per rank
 * | denormals flushed (FTZ+DAZ)" */
void platform_describe(const Platform *p, char *buf, size_t len);

/* Bytes a process may still allocate: MemAvailable of the meminfo file
 * (/proc/meminfo), lowered to limit - usage when the cgroup files name a
 * memory limit (SLURM and containers confine jobs so; cgroup v2 memory.max
 * and memory.current, v1 memory.limit_in_bytes and memory.usage_in_bytes).
 * The cgroup paths may be NULL. 0 when the meminfo file cannot be read. */
long long platform_available_memory_from(const char *meminfo_path, const char *limit_path,
                                         const char *usage_path);
/* The same for this process: /proc/meminfo and its own memory cgroup. */
long long platform_available_memory(void);

#ifdef __cplusplus
}
#endif
#endif
