/* data: loads a token source, splits it into training and validation streams,
 * and cuts per-rank micro-batches from them. See include/moesim/data.h.
 *
 * Every source is first read into a Corpus: one token buffer cut into
 * segments, each segment one category's run of tokens (a text file, a token
 * file, or one synthetic document). The split then works on segments:
 *   - text and token files: a category is one segment; its last
 *     val_fraction of tokens go to validation;
 *   - synthetic: a category (cluster) owns many documents; the last
 *     val_fraction of its documents go to validation, whole.
 * Rounding (split_count): floor(n * val_fraction), then clamped so that a
 * category with at least two units (tokens or documents) keeps at least one
 * unit in each split, so every category appears in both streams.
 * Streams keep the corpus order: text categories in sorted file-name order,
 * synthetic documents in generation order. */
#include "moesim/data.h"
#include "moesim/rng.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TEXT_VOCAB 256
#define SYNTH_VOCAB 256
#define SYNTH_DOC_TOKENS 256
#define SYNTH_SUCCESSORS 4 /* next-token choices per state in a cluster's chain */
#define SYNTH_MAX_CLUSTERS 65536

/* Hash domains keep training and validation positions independent. */
#define DOMAIN_TRAIN 0x747261696e000001ull
#define DOMAIN_VAL 0x76616c0000000002ull
#define DOMAIN_SYNTH_CHAIN 0x636861696e000003ull
#define DOMAIN_SYNTH_DOCS 0x646f637300000004ull

typedef struct Segment {
    size_t start; /* into Corpus.tokens */
    size_t len;
    size_t val_from; /* tokens [start, start+val_from) train, the rest validation */
    int32_t category;
} Segment;

typedef struct Corpus {
    uint16_t *tokens; /* [len] */
    size_t len;
    Segment *segments; /* [num_segments] */
    size_t num_segments;
} Corpus;

static void fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void fail(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void corpus_free(Corpus *c) {
    free(c->tokens);
    free(c->segments);
    memset(c, 0, sizeof *c);
}

/* ---------------------------------------------------------------- hashing */

/* Chained so that every argument passes through a full mix. */
static uint64_t hash4(uint64_t domain, uint64_t a, uint64_t b, uint64_t c) {
    return rng_mix64(rng_hash3(domain, a, b) ^ c);
}

/* xoshiro256** with explicit state, seeded from splitmix64: the synthetic
 * chains need long sequential streams. */
typedef struct Xoshiro {
    uint64_t s[4];
} Xoshiro;

static void xoshiro_seed(Xoshiro *r, uint64_t seed) {
    uint64_t z = seed;
    for (int i = 0; i < 4; i++) {
        z += 0x9e3779b97f4a7c15ull;
        r->s[i] = rng_mix64(z);
    }
}

static uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(Xoshiro *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* Uniform in [0, n) by Lemire's multiply-shift; the bias (< n / 2^32) is
 * irrelevant for n <= 65536. */
static uint32_t xoshiro_below(Xoshiro *r, uint32_t n) {
    return (uint32_t)(((xoshiro_next(r) >> 32) * (uint64_t)n) >> 32);
}

/* ------------------------------------------------------------------ split */

static size_t split_count(size_t n, double val_fraction) {
    /* The 1e-6 allowance makes e.g. 100 * 0.29 (28.999999999999996) give 29. */
    size_t nv = (size_t)floor((double)n * val_fraction + 1e-6);
    if (n >= 2) {
        if (nv == 0) nv = 1;
        if (nv >= n) nv = n - 1;
    } else {
        nv = 0;
    }
    return nv;
}

/* Builds ds->train and ds->val from the corpus segments. */
static int corpus_split(Dataset *ds, const Corpus *c, char *err, size_t errlen) {
    size_t train_len = 0, val_len = 0;
    for (size_t i = 0; i < c->num_segments; i++) {
        train_len += c->segments[i].val_from;
        val_len += c->segments[i].len - c->segments[i].val_from;
    }
    /* +1 so an empty stream still owns a valid (freeable) pointer */
    ds->train.tokens = malloc((train_len + 1) * sizeof *ds->train.tokens);
    ds->train.categories = malloc((train_len + 1) * sizeof *ds->train.categories);
    ds->val.tokens = malloc((val_len + 1) * sizeof *ds->val.tokens);
    ds->val.categories = malloc((val_len + 1) * sizeof *ds->val.categories);
    if (!ds->train.tokens || !ds->train.categories || !ds->val.tokens || !ds->val.categories) {
        fail(err, errlen, "%s:%d: out of memory splitting %zu tokens", __FILE__, __LINE__, c->len);
        return -1;
    }
    size_t ti = 0, vi = 0;
    for (size_t i = 0; i < c->num_segments; i++) {
        const Segment *s = &c->segments[i];
        const uint16_t *src = c->tokens + s->start;
        memcpy(ds->train.tokens + ti, src, s->val_from * sizeof *src);
        for (size_t j = 0; j < s->val_from; j++) ds->train.categories[ti + j] = s->category;
        ti += s->val_from;
        size_t nv = s->len - s->val_from;
        memcpy(ds->val.tokens + vi, src + s->val_from, nv * sizeof *src);
        for (size_t j = 0; j < nv; j++) ds->val.categories[vi + j] = s->category;
        vi += nv;
    }
    ds->train.len = train_len;
    ds->val.len = val_len;
    return 0;
}

/* -------------------------------------------------------------- file utils */

static const char *path_basename(const char *path) {
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--; /* "dir/" names "dir" */
    size_t i = n;
    while (i > 0 && path[i - 1] != '/') i--;
    return path + i;
}

static char *basename_dup(const char *path) {
    const char *b = path_basename(path);
    size_t n = strlen(b);
    while (n > 1 && b[n - 1] == '/') n--;
    return strndup(b, n);
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static void set_category_names(Dataset *ds, char **names, int n) {
    ds->category_names = names;
    ds->num_categories = n;
}

/* Reads a whole file into *buf (malloc'd, may be NULL when empty). */
static int read_file(const char *path, unsigned char **buf, size_t *len, char *err, size_t errlen) {
    *buf = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        fail(err, errlen,
             "cannot open data file %s: %s; check that it exists and is readable, or point "
             "--data-path elsewhere",
             path, strerror(errno));
        return -1;
    }
    size_t cap = 0, n = 0;
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0)
        cap = (size_t)st.st_size + 1;
    if (cap < 4096) cap = 4096;
    unsigned char *b = malloc(cap);
    if (!b) {
        fclose(f);
        fail(err, errlen, "%s:%d: out of memory reading %s", __FILE__, __LINE__, path);
        return -1;
    }
    for (;;) {
        if (n == cap) {
            unsigned char *nb = realloc(b, cap * 2);
            if (!nb) {
                free(b);
                fclose(f);
                fail(err, errlen, "%s:%d: out of memory reading %s", __FILE__, __LINE__, path);
                return -1;
            }
            b = nb;
            cap *= 2;
        }
        size_t got = fread(b + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    int saved = errno;
    fclose(f);
    if (bad) {
        free(b);
        fail(err, errlen, "cannot read data file %s: %s; check the file and its permissions", path,
             strerror(saved));
        return -1;
    }
    *buf = b;
    *len = n;
    return 0;
}

/* -------------------------------------------------------------- text source */

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void free_strings(char **v, size_t n) {
    if (!v) return;
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

/* Lists the usable files of a directory, sorted: regular files only (no
 * symlinks, so fortune's X.u8 -> X is not read twice), not hidden, not ending
 * in ".dat" (fortune's binary index files). */
static int list_text_dir(const char *dir, char ***out, size_t *count, char *err, size_t errlen) {
    *out = NULL;
    *count = 0;
    DIR *d = opendir(dir);
    if (!d) {
        fail(err, errlen, "cannot open data directory %s: %s; check --data-path", dir,
             strerror(errno));
        return -1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    size_t dirlen = strlen(dir);
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        if (name[0] == '.' || ends_with(name, ".dat")) continue;
        size_t plen = dirlen + 1 + strlen(name) + 1;
        char *full = malloc(plen);
        if (!full) goto oom;
        snprintf(full, plen, "%s%s%s", dir, (dirlen && dir[dirlen - 1] == '/') ? "" : "/", name);
        struct stat st;
        if (lstat(full, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
            free(full);
            errno = 0;
            continue;
        }
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 64;
            char **nn = realloc(names, ncap * sizeof *nn);
            if (!nn) {
                free(full);
                goto oom;
            }
            names = nn;
            cap = ncap;
        }
        names[n++] = full;
        errno = 0;
    }
    if (errno != 0) {
        fail(err, errlen, "cannot list data directory %s: %s; check --data-path", dir,
             strerror(errno));
        closedir(d);
        free_strings(names, n);
        return -1;
    }
    closedir(d);
    if (n == 0) {
        free(names);
        fail(err, errlen,
             "data directory %s holds no usable text files (regular, non-empty, not hidden, not "
             "*.dat, not symlinks); "
             "point --data-path at a directory of text files, or a single text file",
             dir);
        return -1;
    }
    qsort(names, n, sizeof *names, cmp_str);
    *out = names;
    *count = n;
    return 0;
oom:
    closedir(d);
    free_strings(names, n);
    fail(err, errlen, "%s:%d: out of memory listing %s", __FILE__, __LINE__, dir);
    return -1;
}

/* Byte-level text: one category per file. `paths` are read in order. */
static int load_text_files(Dataset *ds, Corpus *c, char **paths, size_t n, const Config *cfg,
                           char *err, size_t errlen) {
    char **names = calloc(n, sizeof *names);
    c->segments = calloc(n, sizeof *c->segments);
    if (!names || !c->segments) {
        free(names);
        fail(err, errlen, "%s:%d: out of memory", __FILE__, __LINE__);
        return -1;
    }
    set_category_names(ds, names, 0);
    unsigned char **bufs = calloc(n, sizeof *bufs);
    size_t *lens = calloc(n, sizeof *lens);
    int rc = -1;
    if (!bufs || !lens) {
        fail(err, errlen, "%s:%d: out of memory", __FILE__, __LINE__);
        goto done;
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (read_file(paths[i], &bufs[i], &lens[i], err, errlen) != 0) goto done;
        total += lens[i];
    }
    c->tokens = malloc((total + 1) * sizeof *c->tokens);
    if (!c->tokens) {
        fail(err, errlen, "%s:%d: out of memory for %zu tokens", __FILE__, __LINE__, total);
        goto done;
    }
    size_t pos = 0;
    int ncat = 0;
    for (size_t i = 0; i < n; i++) {
        if (lens[i] == 0) continue; /* a file that emptied since it was listed */
        names[ncat] = basename_dup(paths[i]);
        if (!names[ncat]) {
            fail(err, errlen, "%s:%d: out of memory", __FILE__, __LINE__);
            goto done;
        }
        ds->num_categories = ncat + 1;
        Segment *s = &c->segments[c->num_segments++];
        s->start = pos;
        s->len = lens[i];
        s->val_from = lens[i] - split_count(lens[i], cfg->val_fraction);
        s->category = ncat;
        for (size_t j = 0; j < lens[i]; j++) c->tokens[pos + j] = bufs[i][j];
        pos += lens[i];
        ncat++;
    }
    c->len = pos;
    if (ncat == 0) {
        fail(err, errlen, "data file %s is empty; point --data-path at a non-empty text file",
             cfg->data_path);
        goto done;
    }
    ds->vocab_size = TEXT_VOCAB;
    rc = 0;
done:
    if (bufs)
        for (size_t i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    free(lens);
    return rc;
}

static int load_text(Dataset *ds, Corpus *c, const Config *cfg, char *err, size_t errlen) {
    const char *path = cfg->data_path;
    struct stat st;
    if (stat(path, &st) != 0) {
        fail(err, errlen,
             "--data-path %s: %s; point --data-path at a text file, a directory of text files "
             "(e.g. /usr/share/games/fortunes), a .tok token file, or use --data-format synthetic",
             path, strerror(errno));
        return -1;
    }
    if (S_ISDIR(st.st_mode)) {
        char **paths = NULL;
        size_t n = 0;
        if (list_text_dir(path, &paths, &n, err, errlen) != 0) return -1;
        int rc = load_text_files(ds, c, paths, n, cfg, err, errlen);
        free_strings(paths, n);
        return rc;
    }
    if (!S_ISREG(st.st_mode)) {
        fail(err, errlen,
             "--data-path %s is neither a regular file nor a directory; point it at a text file or "
             "a directory of text files",
             path);
        return -1;
    }
    char *one = (char *)path;
    return load_text_files(ds, c, &one, 1, cfg, err, errlen);
}

/* ------------------------------------------------------------- token source */

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* Plain text starts with printable bytes, whitespace or UTF-8 sequences. */
static int looks_like_text(const unsigned char *p, size_t n) {
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] < 0x20 && p[i] != '\n' && p[i] != '\r' && p[i] != '\t') return 0;
    return 1;
}

static int load_tokens(Dataset *ds, Corpus *c, const Config *cfg, char *err, size_t errlen) {
    const char *path = cfg->data_path;
    FILE *f = fopen(path, "rb");
    if (!f) {
        fail(err, errlen,
             "--data-path %s: cannot open token file: %s; check the path, or use --data-format "
             "text for a text file",
             path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        fail(err, errlen,
             "--data-path %s is not a regular file; a token file is one file written by "
             "token_file_write or tools/make_tokens.py",
             path);
        return -1;
    }
    uint64_t file_bytes = (uint64_t)st.st_size;
    unsigned char h[MOESIM_TOKEN_HEADER_BYTES];
    size_t got = fread(h, 1, sizeof h, f);
    size_t magic_len = strlen(MOESIM_TOKEN_MAGIC);
    size_t cmp = got < magic_len ? got : magic_len;
    if (got == 0 || memcmp(h, MOESIM_TOKEN_MAGIC, cmp) != 0) {
        fclose(f);
        fail(err, errlen,
             "%s is not a moesim token file (expected magic %s at offset 0)%s; write token files "
             "with "
             "tools/make_tokens.py or token_file_write",
             path, MOESIM_TOKEN_MAGIC,
             looks_like_text(h, got) ? "; it looks like plain text: load it with --data-format text"
                                     : "");
        return -1;
    }
    if (got < sizeof h) {
        fclose(f);
        fail(err, errlen,
             "token file %s is truncated: it holds %llu bytes, fewer than the %d-byte header; "
             "rewrite it with tools/make_tokens.py",
             path, (unsigned long long)file_bytes, MOESIM_TOKEN_HEADER_BYTES);
        return -1;
    }
    uint32_t version = le32(h + 8);
    uint32_t vocab = le32(h + 12);
    uint64_t num_tokens = le64(h + 16);
    if (version != MOESIM_TOKEN_VERSION) {
        fclose(f);
        fail(err, errlen,
             "token file %s has version %u, this moesim reads version %u; rewrite it with "
             "tools/make_tokens.py",
             path, version, MOESIM_TOKEN_VERSION);
        return -1;
    }
    if (vocab < 1 || vocab > 65536) {
        fclose(f);
        fail(err, errlen,
             "token file %s declares vocab_size %u, outside 1..65536; rewrite it with a valid "
             "vocabulary size",
             path, vocab);
        return -1;
    }
    uint64_t max_tokens = (UINT64_MAX - MOESIM_TOKEN_HEADER_BYTES) / 2;
    if (num_tokens > max_tokens || file_bytes != MOESIM_TOKEN_HEADER_BYTES + 2 * num_tokens) {
        fclose(f);
        fail(err, errlen,
             "token file %s is truncated or corrupt: its header declares %llu tokens, so it should "
             "hold %llu bytes, "
             "but it holds %llu bytes; rewrite it with tools/make_tokens.py",
             path, (unsigned long long)num_tokens,
             num_tokens > max_tokens
                 ? (unsigned long long)UINT64_MAX
                 : (unsigned long long)(MOESIM_TOKEN_HEADER_BYTES + 2 * num_tokens),
             (unsigned long long)file_bytes);
        return -1;
    }
    if (num_tokens > SIZE_MAX / 2 - 1) {
        fclose(f);
        fail(err, errlen,
             "token file %s holds %llu tokens, too many for this machine's address space", path,
             (unsigned long long)num_tokens);
        return -1;
    }
    size_t n = (size_t)num_tokens;
    c->tokens = malloc((n + 1) * sizeof *c->tokens);
    c->segments = calloc(1, sizeof *c->segments);
    char **names = calloc(1, sizeof *names);
    if (names) names[0] = basename_dup(path);
    if (names) set_category_names(ds, names, names[0] ? 1 : 0);
    if (!c->tokens || !c->segments || !names || !names[0]) {
        fclose(f);
        fail(err, errlen, "%s:%d: out of memory for %zu tokens of %s", __FILE__, __LINE__, n, path);
        return -1;
    }
    size_t read_n = fread(c->tokens, sizeof *c->tokens, n, f);
    int bad = ferror(f);
    int saved = errno;
    fclose(f);
    if (read_n != n) {
        fail(err, errlen, "cannot read the %zu tokens of %s (%s); check the file", n, path,
             bad ? strerror(saved) : "file shrank while reading");
        return -1;
    }
    /* The file is little-endian; decode in place (a no-op on little-endian hosts). */
    unsigned char *bytes = (unsigned char *)c->tokens;
    for (size_t i = 0; i < n; i++) c->tokens[i] = (uint16_t)(bytes[2 * i] | bytes[2 * i + 1] << 8);
    for (size_t i = 0; i < n; i++) {
        if (c->tokens[i] >= vocab) {
            fail(err, errlen,
                 "token file %s: token %u at index %zu is not below its vocab_size %u; rewrite the "
                 "file with a "
                 "vocab_size larger than every token",
                 path, c->tokens[i], i, vocab);
            return -1;
        }
    }
    c->len = n;
    c->num_segments = 1;
    c->segments[0].start = 0;
    c->segments[0].len = n;
    c->segments[0].val_from = n - split_count(n, cfg->val_fraction);
    c->segments[0].category = 0;
    ds->vocab_size = (int)vocab;
    return 0;
}

int token_file_write(const char *path, const uint16_t *tokens, size_t n, int vocab_size, char *err,
                     size_t errlen) {
    if (vocab_size < 1 || vocab_size > 65536) {
        fail(err, errlen, "token_file_write %s: vocab_size %d is outside 1..65536", path,
             vocab_size);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] >= vocab_size) {
            fail(err, errlen,
                 "token_file_write %s: token %u at index %zu is not below vocab_size %d; pass a "
                 "larger vocab_size",
                 path, tokens[i], i, vocab_size);
            return -1;
        }
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        fail(err, errlen,
             "cannot create token file %s: %s; check that the directory exists and is writable",
             path, strerror(errno));
        return -1;
    }
    unsigned char h[MOESIM_TOKEN_HEADER_BYTES] = {0};
    memcpy(h, MOESIM_TOKEN_MAGIC, strlen(MOESIM_TOKEN_MAGIC));
    put_le32(h + 8, MOESIM_TOKEN_VERSION);
    put_le32(h + 12, (uint32_t)vocab_size);
    put_le64(h + 16, (uint64_t)n);
    int ok = fwrite(h, 1, sizeof h, f) == sizeof h;
    unsigned char chunk[8192];
    for (size_t i = 0; ok && i < n;) {
        size_t m = 0;
        for (; i < n && m + 2 <= sizeof chunk; i++, m += 2) {
            chunk[m] = (unsigned char)(tokens[i] & 0xff);
            chunk[m + 1] = (unsigned char)(tokens[i] >> 8);
        }
        ok = fwrite(chunk, 1, m, f) == m;
    }
    int saved = errno;
    if (fclose(f) != 0 && ok) {
        ok = 0;
        saved = errno;
    }
    if (!ok) {
        fail(err, errlen, "cannot write token file %s: %s; check free disk space and permissions",
             path, strerror(saved));
        remove(path);
        return -1;
    }
    return 0;
}

/* --------------------------------------------------------- synthetic source */

/* A cluster's sparse Markov chain: each state has SYNTH_SUCCESSORS next tokens,
 * chosen with probabilities threshold[k+1]-threshold[k] (out of 2^32). */
typedef struct Chain {
    uint8_t next[SYNTH_VOCAB][SYNTH_SUCCESSORS];
    uint32_t cumulative[SYNTH_VOCAB][SYNTH_SUCCESSORS]; /* upper bounds, last = UINT32_MAX */
} Chain;

static void chain_build(Chain *ch, uint64_t seed, int cluster) {
    Xoshiro r;
    xoshiro_seed(&r, hash4(DOMAIN_SYNTH_CHAIN, (uint64_t)seed, (uint64_t)cluster, 0));
    for (int s = 0; s < SYNTH_VOCAB; s++) {
        double w[SYNTH_SUCCESSORS], sum = 0;
        for (int k = 0; k < SYNTH_SUCCESSORS; k++) {
            /* distinct successors, so the chain has exactly 4 branches */
            int dup;
            do {
                ch->next[s][k] = (uint8_t)xoshiro_below(&r, SYNTH_VOCAB);
                dup = 0;
                for (int j = 0; j < k; j++) dup |= ch->next[s][j] == ch->next[s][k];
            } while (dup);
            w[k] = 0.05 + (double)(xoshiro_next(&r) >> 11) * 0x1.0p-53; /* no branch is negligible */
            sum += w[k];
        }
        double acc = 0;
        for (int k = 0; k < SYNTH_SUCCESSORS; k++) {
            acc += w[k] / sum;
            ch->cumulative[s][k] =
                k == SYNTH_SUCCESSORS - 1 ? UINT32_MAX : (uint32_t)(acc * 4294967295.0);
        }
    }
}

static int load_synthetic(Dataset *ds, Corpus *c, const Config *cfg, char *err, size_t errlen) {
    int clusters = cfg->synthetic_clusters;
    long total = cfg->synthetic_tokens;
    if (clusters < 1 || clusters > SYNTH_MAX_CLUSTERS) {
        fail(err, errlen,
             "--synthetic-clusters %d is outside 1..%d; choose a cluster count in that range",
             clusters, SYNTH_MAX_CLUSTERS);
        return -1;
    }
    if (total < 1) {
        fail(err, errlen, "--synthetic-tokens %ld must be positive; set it to e.g. 1000000", total);
        return -1;
    }
    size_t n = (size_t)total;
    size_t num_docs = (n + SYNTH_DOC_TOKENS - 1) / SYNTH_DOC_TOKENS;
    Chain *chains = malloc((size_t)clusters * sizeof *chains);
    size_t *docs_per_cluster = calloc((size_t)clusters, sizeof *docs_per_cluster);
    char **names = calloc((size_t)clusters, sizeof *names);
    c->tokens = malloc((n + 1) * sizeof *c->tokens);
    c->segments = calloc(num_docs, sizeof *c->segments);
    int rc = -1;
    if (names) set_category_names(ds, names, clusters);
    if (!chains || !docs_per_cluster || !names || !c->tokens || !c->segments) {
        fail(err, errlen, "%s:%d: out of memory for %zu synthetic tokens", __FILE__, __LINE__, n);
        goto done;
    }
    for (int k = 0; k < clusters; k++) {
        char name[32];
        snprintf(name, sizeof name, "cluster%d", k);
        names[k] = strdup(name);
        if (!names[k]) {
            fail(err, errlen, "%s:%d: out of memory", __FILE__, __LINE__);
            goto done;
        }
        chain_build(&chains[k], (uint64_t)cfg->seed, k);
    }
    Xoshiro r;
    xoshiro_seed(&r, hash4(DOMAIN_SYNTH_DOCS, (uint64_t)cfg->seed, 0, 0));
    for (size_t d = 0; d < num_docs; d++) {
        int k = (int)xoshiro_below(&r, (uint32_t)clusters);
        const Chain *ch = &chains[k];
        size_t start = d * SYNTH_DOC_TOKENS;
        size_t len = n - start < SYNTH_DOC_TOKENS ? n - start : SYNTH_DOC_TOKENS;
        unsigned state = xoshiro_below(&r, SYNTH_VOCAB);
        for (size_t t = 0; t < len; t++) {
            c->tokens[start + t] = (uint16_t)state;
            uint32_t u = (uint32_t)(xoshiro_next(&r) >> 32);
            int j = 0;
            while (j < SYNTH_SUCCESSORS - 1 && u > ch->cumulative[state][j]) j++;
            state = ch->next[state][j];
        }
        c->segments[d] = (Segment){.start = start, .len = len, .val_from = len, .category = k};
        docs_per_cluster[k]++;
    }
    /* Hold out the last split_count documents of every cluster, whole. */
    for (int k = 0; k < clusters; k++)
        docs_per_cluster[k] = split_count(docs_per_cluster[k], cfg->val_fraction);
    for (size_t d = num_docs; d-- > 0;) {
        Segment *s = &c->segments[d];
        if (docs_per_cluster[s->category] > 0) {
            docs_per_cluster[s->category]--;
            s->val_from = 0;
        }
    }
    c->len = n;
    c->num_segments = num_docs;
    ds->vocab_size = SYNTH_VOCAB;
    rc = 0;
done:
    free(chains);
    free(docs_per_cluster);
    return rc;
}

/* ------------------------------------------------------------------- load */

typedef enum { SOURCE_TEXT, SOURCE_TOKENS, SOURCE_SYNTHETIC } SourceKind;

static int choose_source(const Config *cfg, SourceKind *kind, char *err, size_t errlen) {
    const char *fmt = cfg->data_format;
    if (strcmp(fmt, "synthetic") == 0)
        *kind = SOURCE_SYNTHETIC;
    else if (strcmp(fmt, "tokens") == 0)
        *kind = SOURCE_TOKENS;
    else if (strcmp(fmt, "text") == 0)
        *kind = SOURCE_TEXT;
    else if (strcmp(fmt, "auto") == 0 || fmt[0] == '\0') {
        if (strcmp(cfg->data_path, "synthetic") == 0)
            *kind = SOURCE_SYNTHETIC;
        else if (ends_with(cfg->data_path, ".tok"))
            *kind = SOURCE_TOKENS;
        else
            *kind = SOURCE_TEXT;
    } else {
        fail(err, errlen,
             "--data-format %s is not one of auto, text, tokens, synthetic; pick one of those",
             fmt);
        return -1;
    }
    if (*kind != SOURCE_SYNTHETIC && cfg->data_path[0] == '\0') {
        fail(err, errlen,
             "--data-path is empty; point it at a text file or directory (e.g. "
             "/usr/share/games/fortunes), "
             "a .tok token file, or use --data-format synthetic");
        return -1;
    }
    return 0;
}

static int check_lengths(const Dataset *ds, const Config *cfg, SourceKind kind, char *err,
                         size_t errlen) {
    size_t need = (size_t)cfg->seq_length + 1;
    const char *what = ds->val.len < need ? "validation" : ds->train.len < need ? "training" : NULL;
    if (!what) return 0;
    size_t have = ds->val.len < need ? ds->val.len : ds->train.len;
    const char *path = kind == SOURCE_SYNTHETIC ? "the synthetic source" : cfg->data_path;
    fail(err, errlen,
         "--seq-length %d is larger than the data: the %s split of %s holds %zu tokens; lower "
         "--seq-length or use "
         "more data%s",
         cfg->seq_length, what, path, have,
         kind == SOURCE_SYNTHETIC ? " (raise --synthetic-tokens)" : " (or change --val-fraction)");
    return -1;
}

int dataset_load(Dataset *ds, const Config *cfg, char *err, size_t errlen) {
    memset(ds, 0, sizeof *ds);
    if (err && errlen) err[0] = '\0';
    SourceKind kind;
    if (choose_source(cfg, &kind, err, errlen) != 0) return -1;
    if (cfg->seq_length < 1) {
        fail(err, errlen, "--seq-length %d must be at least 1", cfg->seq_length);
        return -1;
    }
    if (!(cfg->val_fraction > 0.0 && cfg->val_fraction < 1.0)) {
        fail(err, errlen, "--val-fraction %g must be between 0 and 1 (exclusive); e.g. 0.1",
             cfg->val_fraction);
        return -1;
    }
    Corpus c = {0};
    int rc = kind == SOURCE_SYNTHETIC ? load_synthetic(ds, &c, cfg, err, errlen)
             : kind == SOURCE_TOKENS  ? load_tokens(ds, &c, cfg, err, errlen)
                                      : load_text(ds, &c, cfg, err, errlen);
    if (rc == 0) rc = corpus_split(ds, &c, err, errlen);
    corpus_free(&c);
    if (rc == 0) rc = check_lengths(ds, cfg, kind, err, errlen);
    if (rc != 0) dataset_free(ds);
    return rc;
}

void dataset_free(Dataset *ds) {
    if (!ds) return;
    if (ds->category_names)
        for (int i = 0; i < ds->num_categories; i++) free(ds->category_names[i]);
    free(ds->category_names);
    free(ds->train.tokens);
    free(ds->train.categories);
    free(ds->val.tokens);
    free(ds->val.categories);
    memset(ds, 0, sizeof *ds);
}

/* ---------------------------------------------------------------- batches */

/* Sequence b of rank `rank` is global sequence g = rank*B + b; its start is a
 * hash of (domain, seed, index, g), so it does not depend on P or B alone. */
static void stream_batch(const TokenStream *s, uint64_t domain, long seed, long index, int rank,
                         int B, int T, int *inputs, int *targets, int *categories) {
    uint64_t span = (uint64_t)(s->len - (size_t)T); /* dataset_load guarantees len >= T+1 */
    for (int b = 0; b < B; b++) {
        uint64_t g = (uint64_t)rank * (uint64_t)B + (uint64_t)b;
        size_t start = (size_t)(hash4(domain, (uint64_t)seed, (uint64_t)index, g) % span);
        const uint16_t *tok = s->tokens + start;
        const int32_t *cat = s->categories + start;
        int *in = inputs + (size_t)b * T, *tg = targets + (size_t)b * T,
            *ct = categories + (size_t)b * T;
        for (int t = 0; t < T; t++) {
            in[t] = tok[t];
            tg[t] = tok[t + 1];
            ct[t] = cat[t];
        }
    }
}

void dataset_train_batch(const Dataset *ds, long seed, long step, int rank, int B, int T,
                         int *inputs, int *targets, int *categories) {
    stream_batch(&ds->train, DOMAIN_TRAIN, seed, step, rank, B, T, inputs, targets, categories);
}

void dataset_val_batch(const Dataset *ds, long seed, long eval_batch, int rank, int B, int T,
                       int *inputs, int *targets, int *categories) {
    stream_batch(&ds->val, DOMAIN_VAL, seed, eval_batch, rank, B, T, inputs, targets, categories);
}
