#include "moesim/platform.h"

#include <cblas.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <xmmintrin.h>
#define MOESIM_X86 1
#endif

/* Carries moesim's kernel decision across its own execv: "chosen:<what
 * OpenBLAS detected>" when moesim set OPENBLAS_CORETYPE, "rejected:<kernel>"
 * when that kernel failed the self-check and was taken away again. Without
 * it the re-executed process could not tell moesim's setting from a user's. */
#define KERNEL_STATE_ENV "MOESIM_BLAS_KERNEL_STATE"

/* ---- CPU features -------------------------------------------------------- */

#ifdef MOESIM_X86
static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

void cpu_features_detect(CpuFeatures *cpu) {
    memset(cpu, 0, sizeof *cpu);
#ifdef MOESIM_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    int osxsave = (c >> 27) & 1;
    uint64_t xcr0 = osxsave ? read_xcr0() : 0;
    /* The OS must save the wider registers, or using them faults. */
    int ymm_state = (xcr0 & 0x6) == 0x6;
    int zmm_state = ymm_state && (xcr0 & 0xe0) == 0xe0;
    int amx_state = (xcr0 & 0x60000) == 0x60000;
    cpu->avx = ymm_state && ((c >> 28) & 1);
    cpu->fma = ymm_state && ((c >> 12) & 1);
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    cpu->avx2 = ymm_state && ((b >> 5) & 1);
    cpu->avx512f = zmm_state && ((b >> 16) & 1);
    cpu->avx512dq = zmm_state && ((b >> 17) & 1);
    cpu->avx512bw = zmm_state && ((b >> 30) & 1);
    cpu->avx512vl = zmm_state && ((b >> 31) & 1);
    cpu->amx_bf16 = amx_state && ((d >> 22) & 1);
    unsigned max_subleaf = a;
    if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
        cpu->avx512_bf16 = zmm_state && ((a >> 5) & 1);
#endif
}

void cpu_features_describe(const CpuFeatures *cpu, char *buf, size_t len) {
    const struct {
        int present;
        const char *name;
    } features[] = {{cpu->avx, "avx"},           {cpu->avx2, "avx2"},
                    {cpu->fma, "fma"},           {cpu->avx512f, "avx512f"},
                    {cpu->avx512bw, "avx512bw"}, {cpu->avx512dq, "avx512dq"},
                    {cpu->avx512vl, "avx512vl"}, {cpu->avx512_bf16, "avx512_bf16"},
                    {cpu->amx_bf16, "amx_bf16"}};
    size_t used = 0;
    if (len) buf[0] = '\0';
    for (size_t i = 0; i < sizeof features / sizeof features[0]; i++) {
        if (!features[i].present || used >= len) continue;
        used += (size_t)snprintf(buf + used, len - used, "%s%s", used ? " " : "", features[i].name);
    }
    if (used == 0) snprintf(buf, len, "none");
}

/* ---- the kernel-choice rule ---------------------------------------------- */

/* Debian's OpenBLAS 0.3.21 x86-64 kernels by the instruction level they
 * need. Bulldozer-family kernels count as AVX: they are tuned for those old
 * AMD cores, never a better choice on a newer CPU. */
static const struct {
    const char *name;
    int level;
} KERNEL_LEVELS[] = {
    {"SkylakeX", 3},    {"Cooperlake", 3}, {"Haswell", 2},    {"Zen", 2},          {"Excavator", 2},
    {"Sandybridge", 1}, {"Bulldozer", 1},  {"Piledriver", 1}, {"Steamroller", 1},  {"Prescott", 0},
    {"Core2", 0},       {"Penryn", 0},     {"Dunnington", 0}, {"Nehalem", 0},      {"Atom", 0},
    {"Nano", 0},        {"Barcelona", 0},  {"Opteron", 0},    {"Opteron_SSE3", 0}, {"Bobcat", 0},
    {"Athlon", 0},      {"Katmai", 0},     {"Coppermine", 0}, {"Northwood", 0},    {"Banias", 0},
};

int blas_kernel_level(const char *kernel) {
    for (size_t i = 0; i < sizeof KERNEL_LEVELS / sizeof KERNEL_LEVELS[0]; i++)
        if (strcasecmp(kernel, KERNEL_LEVELS[i].name) == 0) return KERNEL_LEVELS[i].level;
    return -1;
}

const char *blas_best_kernel(const CpuFeatures *cpu) {
    if (cpu->avx512f && cpu->avx512bw && cpu->avx512dq && cpu->avx512vl) return "SkylakeX";
    if (cpu->avx2 && cpu->fma) return "Haswell";
    if (cpu->avx) return "Sandybridge";
    return NULL;
}

const char *blas_kernel_upgrade(const CpuFeatures *cpu, const char *reported) {
    int level = blas_kernel_level(reported);
    const char *best = blas_best_kernel(cpu);
    if (level < 0 || !best) return NULL;
    return blas_kernel_level(best) > level ? best : NULL;
}

/* ---- self-check ---------------------------------------------------------- */

/* Odd sizes reach the kernels' edge paths, 128 their main blocks. */
static const int CHECK_SHAPES[][3] = {{37, 29, 53}, {128, 128, 128}};

static double sgemm_case_error(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K,
                               float *a, float *b, float *c) {
    uint64_t state = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < M * K; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        a[i] = (float)((double)(state >> 40) / (double)(1 << 24) * 2.0 - 1.0);
    }
    for (int i = 0; i < K * N; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        b[i] = (float)((double)(state >> 40) / (double)(1 << 24) * 2.0 - 1.0);
    }
    int lda = ta == CblasNoTrans ? K : M, ldb = tb == CblasNoTrans ? N : K;
    cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, 1.0f, a, lda, b, ldb, 0.0f, c, N);
    double worst = 0.0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double exact = 0.0, scale = 0.0;
            for (int k = 0; k < K; k++) {
                double x = ta == CblasNoTrans ? a[i * K + k] : a[k * M + i];
                double y = tb == CblasNoTrans ? b[k * N + j] : b[j * K + k];
                exact += x * y;
                scale += fabs(x * y);
            }
            double e = fabs(c[i * N + j] - exact) / (scale > 0 ? scale : 1.0);
            if (!(e <= worst)) worst = e; /* a NaN result is the worst */
        }
    return worst;
}

double blas_sgemm_self_check_error(void) {
    float *a = malloc(sizeof(float) * 128 * 128), *b = malloc(sizeof(float) * 128 * 128),
          *c = malloc(sizeof(float) * 128 * 128);
    double worst = INFINITY;
    if (a && b && c) {
        worst = 0.0;
        const CBLAS_TRANSPOSE t[2] = {CblasNoTrans, CblasTrans};
        for (size_t s = 0; s < sizeof CHECK_SHAPES / sizeof CHECK_SHAPES[0]; s++)
            for (int i = 0; i < 4; i++) {
                double e = sgemm_case_error(t[i / 2], t[i % 2], CHECK_SHAPES[s][0],
                                            CHECK_SHAPES[s][1], CHECK_SHAPES[s][2], a, b, c);
                if (!(e <= worst)) worst = e;
            }
    }
    free(a);
    free(b);
    free(c);
    return worst;
}

/* Runs the self-check in a child process: a kernel built for instructions
 * this CPU lacks dies of SIGILL there instead of killing the run. Returns 0,
 * or -1 with the reason in why. */
static int self_check_in_child(char *why, size_t len) {
    int fds[2];
    if (pipe(fds) != 0) {
        snprintf(why, len, "could not start the self-check (pipe failed)");
        return -1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        snprintf(why, len, "could not start the self-check (fork failed)");
        return -1;
    }
    if (pid == 0) {
        close(fds[0]);
        double err = blas_sgemm_self_check_error();
        ssize_t wrote = write(fds[1], &err, sizeof err);
        _exit(wrote == (ssize_t)sizeof err ? 0 : 1);
    }
    close(fds[1]);
    double err = INFINITY;
    ssize_t got = read(fds[0], &err, sizeof err);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        snprintf(why, len, "its sgemm died of signal %d (%s)%s", sig, strsignal(sig),
                 sig == SIGILL ? ": the CPU lacks instructions this kernel needs" : "");
        return -1;
    }
    if (got != (ssize_t)sizeof err || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        snprintf(why, len, "its self-check process failed");
        return -1;
    }
    if (!(err <= BLAS_SELF_CHECK_TOLERANCE)) {
        snprintf(why, len,
                 "its sgemm is wrong: error %.3g against a double-precision reference "
                 "(allowed %.0e)",
                 err, BLAS_SELF_CHECK_TOLERANCE);
        return -1;
    }
    return 0;
}

/* ---- start-up ------------------------------------------------------------ */

static void copy_name(char *dst, const char *src) {
    snprintf(dst, PLATFORM_NAME_MAX, "%s", src ? src : "");
}

/* "OpenBLAS 0.3.21" from openblas_get_config()'s leading words. */
static void read_blas_library(char *dst) {
    const char *config = openblas_get_config();
    int n = 0, spaces = 0;
    while (config[n] && !(config[n] == ' ' && ++spaces == 2)) n++;
    snprintf(dst, PLATFORM_NAME_MAX, "%.*s", n, config);
}

static void reexec_with_kernel(char **argv, const char *kernel, const char *state) {
    if (kernel)
        setenv("OPENBLAS_CORETYPE", kernel, 1);
    else
        unsetenv("OPENBLAS_CORETYPE");
    setenv(KERNEL_STATE_ENV, state, 1);
    fflush(NULL);
    execv("/proc/self/exe", argv);
    /* Only reached when execv failed: carry on with the kernel already loaded. */
    fprintf(stderr, "moesim: warning: could not restart with OPENBLAS_CORETYPE=%s; continuing\n",
            kernel ? kernel : "(unset)");
    unsetenv(KERNEL_STATE_ENV);
}

static int thread_count_set_by_env(void) {
    return getenv("OPENBLAS_NUM_THREADS") || getenv("GOTO_NUM_THREADS") ||
           getenv("OMP_NUM_THREADS");
}

void platform_start(Platform *p, char **argv) {
    memset(p, 0, sizeof *p);
    cpu_features_detect(&p->cpu);
    read_blas_library(p->blas_library);
    const char *in_use = openblas_get_corename();
    copy_name(p->blas_kernel, in_use);
    copy_name(p->blas_detected, in_use);
    copy_name(p->blas_best, blas_best_kernel(&p->cpu));
    const char *requested = getenv("OPENBLAS_CORETYPE");
    const char *state = getenv(KERNEL_STATE_ENV);
    char why[256] = "";
    if (state && strncmp(state, "chosen:", 7) == 0 && requested) {
        /* This process is moesim's restart with its own choice. */
        p->kernel_source = BLAS_KERNEL_BY_MOESIM;
        copy_name(p->blas_detected, state + 7);
        if (strcasecmp(in_use, requested) != 0 || self_check_in_child(why, sizeof why) != 0) {
            char rejected[PLATFORM_NAME_MAX + 16];
            snprintf(rejected, sizeof rejected, "rejected:%s", requested);
            fprintf(stderr,
                    "moesim: warning: OpenBLAS kernel %s failed moesim's self-check (%s); "
                    "restarting with OpenBLAS's own choice\n",
                    requested, why[0] ? why : "OpenBLAS did not load it");
            reexec_with_kernel(argv, NULL, rejected);
            snprintf(p->error, sizeof p->error,
                     "OpenBLAS kernel %s failed moesim's self-check and moesim could not restart "
                     "without it; unset OPENBLAS_CORETYPE and %s",
                     requested, KERNEL_STATE_ENV);
        }
    } else if (requested && !(state && strncmp(state, "rejected:", 9) == 0)) {
        p->kernel_source = BLAS_KERNEL_BY_USER;
        if (strcasecmp(in_use, requested) != 0)
            snprintf(p->error, sizeof p->error,
                     "OPENBLAS_CORETYPE=%s is not a kernel %s can load on "
                     "this CPU (it loaded %s instead); unset OPENBLAS_CORETYPE to let moesim "
                     "choose, or set one of its kernels such as %s",
                     requested, p->blas_library, in_use,
                     p->blas_best[0] ? p->blas_best : "Prescott");
        else if (self_check_in_child(why, sizeof why) != 0)
            snprintf(p->error, sizeof p->error,
                     "OPENBLAS_CORETYPE=%s fails moesim's sgemm self-check: %s; unset "
                     "OPENBLAS_CORETYPE to let moesim choose a kernel for this CPU",
                     requested, why);
    } else {
        int retried = state && strncmp(state, "rejected:", 9) == 0;
        if (retried) copy_name(p->blas_rejected, state + 9);
        const char *better = retried ? NULL : blas_kernel_upgrade(&p->cpu, in_use);
        if (better) {
            char chosen[PLATFORM_NAME_MAX + 16];
            snprintf(chosen, sizeof chosen, "chosen:%s", in_use);
            reexec_with_kernel(argv, better, chosen);
        }
        if (self_check_in_child(why, sizeof why) != 0)
            snprintf(p->error, sizeof p->error,
                     "OpenBLAS's own kernel %s fails moesim's sgemm self-check: %s; set "
                     "OPENBLAS_CORETYPE to another kernel (for example Haswell or Prescott)",
                     in_use, why);
    }
    p->blas_threads_from_env = thread_count_set_by_env();
    if (!p->blas_threads_from_env) openblas_set_num_threads(1);
    p->blas_threads = openblas_get_num_threads();
    p->flush_denormals = platform_denormals_flushed();
}

/* ---- denormals ----------------------------------------------------------- */

#define MXCSR_FTZ 0x8000u /* results below the normal range become zero */
#define MXCSR_DAZ 0x0040u /* denormal inputs count as zero */

void platform_set_flush_denormals(Platform *p, int flush) {
#ifdef MOESIM_X86
    unsigned csr = _mm_getcsr();
    _mm_setcsr(flush ? csr | MXCSR_FTZ | MXCSR_DAZ : csr & ~(MXCSR_FTZ | MXCSR_DAZ));
#else
    (void)flush;
#endif
    if (p) p->flush_denormals = platform_denormals_flushed();
}

int platform_denormals_flushed(void) {
#ifdef MOESIM_X86
    unsigned both = MXCSR_FTZ | MXCSR_DAZ;
    return (_mm_getcsr() & both) == both;
#else
    return 0;
#endif
}

/* ---- description --------------------------------------------------------- */

const char *blas_kernel_source_name(BlasKernelSource source) {
    switch (source) {
        case BLAS_KERNEL_BY_MOESIM:
            return "moesim";
        case BLAS_KERNEL_BY_USER:
            return "user";
        default:
            return "openblas";
    }
}

int platform_faster_kernel_exists(const Platform *p) {
    int level = blas_kernel_level(p->blas_kernel);
    return p->blas_best[0] && level >= 0 && blas_kernel_level(p->blas_best) > level;
}

void platform_describe(const Platform *p, char *buf, size_t len) {
    char origin[160];
    switch (p->kernel_source) {
        case BLAS_KERNEL_BY_MOESIM:
            snprintf(origin, sizeof origin, "chosen by moesim; OpenBLAS detected %s",
                     p->blas_detected);
            break;
        case BLAS_KERNEL_BY_USER:
            snprintf(origin, sizeof origin, "OPENBLAS_CORETYPE");
            break;
        default:
            if (p->blas_rejected[0])
                snprintf(origin, sizeof origin, "OpenBLAS's choice; %s failed the self-check",
                         p->blas_rejected);
            else
                snprintf(origin, sizeof origin, "OpenBLAS's choice");
    }
    snprintf(buf, len, "%s | kernel %s (%s) | %d BLAS thread%s per rank%s | denormals %s",
             p->blas_library, p->blas_kernel, origin, p->blas_threads,
             p->blas_threads == 1 ? "" : "s",
             p->blas_threads_from_env ? " (from the environment)" : "",
             p->flush_denormals ? "flushed (FTZ+DAZ)" : "kept (IEEE)");
}

/* ---- memory ------------------------------------------------------------------ */

static long long meminfo_available(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char line[256];
    long long kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &kib) == 1) break;
    fclose(f);
    return kib * 1024;
}

/* The number in path, or -1 when it is missing, "max" or so large that it
 * means no limit (cgroup v1 writes 2^63 rounded down to a page). */
static long long cgroup_value(const char *path) {
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) return -1;
    long long value = -1;
    if (fscanf(f, "%lld", &value) != 1 || value >= (1LL << 62)) value = -1;
    fclose(f);
    return value;
}

long long platform_available_memory_from(const char *meminfo_path, const char *limit_path,
                                         const char *usage_path) {
    long long available = meminfo_available(meminfo_path);
    long long limit = cgroup_value(limit_path), used = cgroup_value(usage_path);
    if (available <= 0 || limit < 0 || used < 0) return available;
    long long left = limit > used ? limit - used : 0;
    return left < available ? left : available;
}

/* This process's memory cgroup from /proc/self/cgroup: "0::/path" (v2) or
 * "N:memory:/path" (v1). A container may show its own cgroup as the root of
 * the mount, so a missing directory falls back to the mount's root. */
static void own_memory_cgroup(char *limit, char *usage, size_t len) {
    limit[0] = usage[0] = '\0';
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f) return;
    char line[2048], dir[2100];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        int v1 = strstr(line, ":memory:/") != NULL;
        if (!v1 && strncmp(line, "0::/", 4) != 0) continue;
        const char *rel = strchr(strchr(line, ':') + 1, ':') + 1;
        const char *mount = v1 ? "/sys/fs/cgroup/memory" : "/sys/fs/cgroup";
        snprintf(dir, sizeof dir, "%s%s", mount, rel);
        if (access(dir, R_OK) != 0) snprintf(dir, sizeof dir, "%s", mount);
        snprintf(limit, len, "%s/%s", dir, v1 ? "memory.limit_in_bytes" : "memory.max");
        snprintf(usage, len, "%s/%s", dir, v1 ? "memory.usage_in_bytes" : "memory.current");
        if (v1 || access(limit, R_OK) == 0) break; /* v1's memory line wins over a bare 0:: */
    }
    fclose(f);
}

long long platform_available_memory(void) {
    char limit[2200], usage[2200];
    own_memory_cgroup(limit, usage, sizeof limit);
    return platform_available_memory_from("/proc/meminfo", limit[0] ? limit : NULL,
                                          usage[0] ? usage : NULL);
}
