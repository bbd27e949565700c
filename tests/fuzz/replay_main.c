/* replay_main.c: runs a fuzz target over every file of corpus directories (or single files), the
 * way ctest uses the fuzz targets without clang or libFuzzer.
 *
 *   replay_safetensors [-v] tests/fuzz/corpus/safetensors [more dirs or files]
 *
 * Each input goes through LLVMFuzzerTestOneInput's checks (fuzz_common.c) and, through tkf_target,
 * is held to what its file name promises (fuzz_common.h): ok_* accepted; any_* either way; every
 * other name rejected with a non-empty one-line message that names a file of the fixture. -v prints
 * every input's outcome and message. Prints how many inputs ran; exits 1 when an expectation failed
 * or when no input ran at all (an empty corpus must not pass), 2 on bad usage.
 */
#include "fuzz_common.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct {
    size_t ran, accepted, rejected, failed;
    int verbose;
} tally;

static unsigned char *read_all(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0;
    unsigned char *buf = malloc(cap);
    while (buf) {
        if (n == cap) {
            unsigned char *b = realloc(buf, cap * 2);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return NULL;
    }
    *size = n;
    return buf;
}

static int starts(const char *s, const char *prefix) { return strncmp(s, prefix, strlen(prefix)) == 0; }

static void run_one(tally *t, const char *path) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t size = 0;
    unsigned char *data = read_all(path, &size);
    if (!data) {
        printf("FAIL %s: cannot read: %s\n", path, strerror(errno));
        t->failed++;
        return;
    }
    /* the libFuzzer entry point first (its invariants abort), then the outcome for the name */
    LLVMFuzzerTestOneInput(data, size);
    tk_err err = {0};
    int rc = tkf_target(data, size, &err);
    free(data);
    t->ran++;
    if (rc == 0) t->accepted++;
    else t->rejected++;
    const char *why = NULL;
    if (rc != 0 && rc != -1) why = "status is neither 0 nor -1";
    else if (starts(base, "ok_") && rc != 0) why = "a valid input was rejected";
    else if (!starts(base, "ok_") && !starts(base, "any_") && rc == 0) why = "a malformed input was accepted";
    else if (rc != 0 && err.msg[0] == '\0') why = "rejected without a message";
    else if (rc != 0 && strchr(err.msg, '\n')) why = "the message spans several lines";
    else if (rc != 0 && !starts(base, "any_") && !strstr(err.msg, tkf_root()))
        why = "the message names no file";
    if (why) {
        printf("FAIL %s: %s (status %d: %s)\n", base, why, rc, rc ? err.msg : "accepted");
        t->failed++;
    } else if (t->verbose) {
        printf("ok   %s: %s\n", base, rc ? err.msg : "accepted");
    }
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Runs every regular file of dir in name order (dot files skipped). */
static int run_dir(tally *t, const char *dir) {
    DIR *d = opendir(dir);
    if (!d) {
        printf("FAIL %s: cannot open: %s\n", dir, strerror(errno));
        t->failed++;
        return -1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **nn = realloc(names, cap * sizeof *nn);
            if (!nn) abort();
            names = nn;
        }
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        if (!(names[n] = malloc(len))) abort();
        snprintf(names[n], len, "%s/%s", dir, e->d_name);
        n++;
    }
    closedir(d);
    if (n) qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n; i++) {
        struct stat st;
        if (stat(names[i], &st) == 0 && S_ISREG(st.st_mode)) run_one(t, names[i]);
        free(names[i]);
    }
    free(names);
    return 0;
}

int main(int argc, char **argv) {
    const char *prog = strrchr(argv[0], '/');
    prog = prog ? prog + 1 : argv[0];
    tally t = {0};
    int given = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-v") == 0) {
            t.verbose = 1;
            continue;
        }
        struct stat st;
        given++;
        if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)) run_dir(&t, argv[i]);
        else run_one(&t, argv[i]);
    }
    if (!given) {
        fprintf(stderr, "usage: %s [-v] CORPUS_DIR_OR_FILE...\n", prog);
        return 2;
    }
    printf("%s: ran %zu inputs (%zu accepted, %zu rejected), %zu failed\n", prog, t.ran, t.accepted,
           t.rejected, t.failed);
    if (t.ran == 0) printf("FAIL: no input ran (empty corpus?)\n");
    return t.failed || t.ran == 0 ? 1 : 0;
}
