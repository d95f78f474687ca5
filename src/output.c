#include "moesim/output.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int output_make_dirs(const char *dir, const char *key, const char *value, char *err,
                     size_t errlen) {
    char prefix[MOESIM_PATH_MAX];
    snprintf(prefix, sizeof prefix, "%s", dir);
    /* Each prefix in turn; EEXIST covers both an existing directory and a
     * race with another process making the same one. */
    for (char *slash = prefix + 1;; slash++) {
        slash = strchr(slash, '/');
        if (slash) *slash = '\0';
        if (prefix[0] && mkdir(prefix, 0777) != 0 && errno != EEXIST)
            return fail(err, errlen,
                        "cannot create the directory %s for --%s %s (%s); create it or "
                        "choose another --%s",
                        prefix, key, value, strerror(errno), key);
        if (!slash) break;
        *slash = '/';
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return fail(err, errlen, "--%s %s: %s is not a directory; choose another --%s", key, value,
                    dir, key);
    return 0;
}

int output_make_parent_dirs(const char *path, char *err, size_t errlen) {
    char dir[MOESIM_PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    return output_make_dirs(dirname(dir), "out", path, err, errlen);
}

static void lock_path_of(char *buf, size_t len, const char *path) {
    snprintf(buf, len, "%s.lock", path);
}

/* Who holds the lock, as its holder wrote it ("pid 123 on host since ..."). */
static void read_holder(const char *lock_path, char *buf, size_t len) {
    snprintf(buf, len, "another run");
    FILE *f = fopen(lock_path, "r");
    if (!f) return;
    char line[256];
    if (fgets(line, sizeof line, f) && line[0]) {
        line[strcspn(line, "\n")] = '\0';
        snprintf(buf, len, "another run (%s)", line);
    }
    fclose(f);
}

static void write_holder(int fd) {
    char host[256] = "?", started[32] = "";
    gethostname(host, sizeof host - 1);
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(started, sizeof started, "%Y-%m-%dT%H:%M:%SZ", &tm);
    char line[400];
    int n = snprintf(line, sizeof line, "pid %ld on %s since %s\n", (long)getpid(), host, started);
    if (ftruncate(fd, 0) == 0 && n > 0) {
        ssize_t written = pwrite(fd, line, (size_t)n, 0);
        (void)written; /* the holder's description is a courtesy, not the lock */
    }
}

/* The lock file may be unlinked by its previous holder between our open and
 * our flock; a lock on a removed file protects nothing, so retry until the
 * file we locked is the one at the path. */
static int take_lock(OutputLock *lock, const char *path, char *err, size_t errlen) {
    lock_path_of(lock->path, sizeof lock->path, path);
    for (int attempt = 0; attempt < 100; attempt++) {
        int fd = open(lock->path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0)
            return fail(err, errlen, "cannot create the lock file %s for --out %s (%s)", lock->path,
                        path, strerror(errno));
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            int busy = errno == EWOULDBLOCK;
            int saved = errno;
            close(fd);
            if (!busy)
                return fail(err, errlen, "cannot lock %s for --out %s (%s)", lock->path, path,
                            strerror(saved));
            char holder[320];
            read_holder(lock->path, holder, sizeof holder);
            return fail(err, errlen,
                        "%s holds --out %s and is writing it; two runs cannot share one "
                        "record: wait for that run to finish or choose another --out",
                        holder, path);
        }
        struct stat held, current;
        if (fstat(fd, &held) == 0 && stat(lock->path, &current) == 0 &&
            held.st_dev == current.st_dev && held.st_ino == current.st_ino) {
            lock->fd = fd;
            write_holder(fd);
            return 0;
        }
        close(fd);
    }
    return fail(err, errlen, "cannot lock %s for --out %s: it keeps being replaced", lock->path,
                path);
}

/* A file with content at path is a record (or something else) we must not
 * destroy; an empty one holds nothing to lose. */
static int refuse_existing(const char *path, char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) != 0 || st.st_size == 0) return 0;
    return fail(err, errlen,
                "--out %s already exists and moesim does not replace a run record unasked: "
                "pass --overwrite 1 to replace it, or choose another --out",
                path);
}

int output_claim(OutputLock *lock, const char *path, int overwrite, char *err, size_t errlen) {
    lock->fd = -1;
    lock->path[0] = '\0';
    if (output_make_parent_dirs(path, err, errlen) != 0) return -1;
    if (take_lock(lock, path, err, errlen) != 0) return -1;
    if (!overwrite && refuse_existing(path, err, errlen) != 0) {
        output_release(lock);
        return -1;
    }
    return 0;
}

void output_release(OutputLock *lock) {
    if (lock->fd < 0) return;
    /* Unlink before unlocking: a run that opened the old file and then gets
     * the lock sees that its file is gone and retries (take_lock). */
    unlink(lock->path);
    close(lock->fd);
    lock->fd = -1;
}

int output_is_locked(const char *path) {
    char lock_path[MOESIM_PATH_MAX + 8];
    lock_path_of(lock_path, sizeof lock_path, path);
    int fd = open(lock_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    int locked = flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    close(fd);
    return locked;
}
