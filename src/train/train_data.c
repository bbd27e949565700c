/* train_data.c: see train_data.h. */
#include "train_data.h"

#include "optim.h"

#include <dirent.h>
#include <errno.h>
#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const unsigned char SHARD_MAGIC[8] = {'T', 'K', 'S', 'H', 'A', 'R', 'D', 0};

/* One dataset of shards: its files (owned strings) and weight. */
typedef struct {
    char **paths; /* [n] */
    size_t n;
    double weight;
    const char *spec;
} shard_set;

/* Row order of a JSONL file: file order, wrapping; with shuffle, a fresh seeded permutation per
 * epoch. */
typedef struct {
    size_t n, epoch; /* epoch whose permutation perm holds (SIZE_MAX: none yet) */
    size_t *perm;    /* [n] */
    uint64_t seed;
    int shuffle;
} row_order;

struct tk_train_data {
    tk_train_data_opts o;
    char desc[256];
    /* JSONL */
    tk_jsonl_data *jsonl;
    const char *jsonl_path;
    row_order ro;
    size_t *rows;       /* [B] */
    tk_batch *jb;       /* [K] */
    uint8_t **jkinds;   /* [K] [B*T] */
    size_t *jkinds_cap; /* [K] */
    /* shards */
    shard_set sets[TK_LOADER_MAX_SOURCES];
    size_t n_sets;
    tk_loader *L;
    tk_loader_batch *lb; /* [K] */
    tk_loader_cursor start;
    /* the micro-batches handed out */
    tk_train_mb *mb; /* [K] */
    size_t targets, tokens;
};

/* ---- specs ------------------------------------------------------------------------------------- */

/* 1 if path starts with the shard magic, 0 if not, -1 (err set) if it cannot be read. */
static int is_shard(const char *path, tk_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return tk_fail(err, "%s: cannot open: %s", path, strerror(errno));
    unsigned char m[8];
    size_t got = fread(m, 1, sizeof m, f);
    fclose(f);
    return got == sizeof m && memcmp(m, SHARD_MAGIC, sizeof m) == 0;
}

/* Splits "PATH:WEIGHT" into path (copied into buf) and weight; a suffix that is not a number is part
 * of the path. */
static int split_spec(const char *spec, char *buf, size_t n, double *weight, tk_err *err) {
    const char *colon = strrchr(spec, ':');
    *weight = 1.0;
    size_t len = strlen(spec);
    if (colon && colon[1]) {
        char *end;
        errno = 0;
        double w = strtod(colon + 1, &end);
        if (*end == '\0' && errno == 0) {
            if (!(w > 0.0) || !isfinite(w))
                return tk_fail(err, "--data %s: weight %s (expected a number > 0)", spec, colon + 1);
            *weight = w;
            len = (size_t)(colon - spec);
        }
    }
    if (len == 0) return tk_fail(err, "--data %s: no path before the weight", spec);
    if (len >= n) return tk_fail(err, "--data %.200s...: path too long", spec);
    memcpy(buf, spec, len);
    buf[len] = '\0';
    return 0;
}

static int push_path(shard_set *s, const char *path, tk_err *err) {
    char **p = realloc(s->paths, (s->n + 1) * sizeof *p);
    if (!p) return tk_fail(err, "out of memory");
    s->paths = p;
    if (!(s->paths[s->n] = strdup(path))) return tk_fail(err, "out of memory");
    s->n++;
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Every regular file of dir that is a shard, sorted by name. */
static int list_dir(shard_set *s, const char *dir, tk_err *err) {
    DIR *d = opendir(dir);
    if (!d) return tk_fail(err, "%s: cannot open directory: %s", dir, strerror(errno));
    struct dirent *de;
    int rc = 0;
    char path[4200];
    while (rc == 0 && (de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        struct stat st;
        if (snprintf(path, sizeof path, "%s/%s", dir, de->d_name) >= (int)sizeof path) continue;
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        int k = is_shard(path, err);
        if (k < 0) rc = -1;
        else if (k) rc = push_path(s, path, err);
    }
    closedir(d);
    if (rc) return -1;
    if (s->n == 0) return tk_fail(err, "--data %s: the directory holds no shard (no file starts with TKSHARD)", dir);
    qsort(s->paths, s->n, sizeof *s->paths, cmp_str);
    return 0;
}

/* Every match of pattern; each must be a shard. */
static int list_glob(shard_set *s, const char *pattern, tk_err *err) {
    glob_t g;
    memset(&g, 0, sizeof g);
    int r = glob(pattern, GLOB_ERR, NULL, &g);
    if (r == GLOB_NOMATCH) {
        globfree(&g);
        return tk_fail(err, "--data %s: no file matches", pattern);
    }
    if (r != 0) {
        globfree(&g);
        return tk_fail(err, "--data %s: cannot expand the pattern (%s)", pattern,
                       r == GLOB_NOSPACE ? "out of memory" : "read error");
    }
    int rc = 0;
    for (size_t i = 0; i < g.gl_pathc && rc == 0; i++) { /* glob sorts its matches */
        int k = is_shard(g.gl_pathv[i], err);
        if (k == 0) rc = tk_fail(err, "%s: not a shard (no TKSHARD magic); a glob names shards only", g.gl_pathv[i]);
        else if (k < 0) rc = -1;
        else rc = push_path(s, g.gl_pathv[i], err);
    }
    globfree(&g);
    return rc;
}

/* Resolves o->specs: one JSONL file (*jsonl receives its path) or shard sets. */
static int resolve(tk_train_data *d, tk_err *err) {
    const tk_train_data_opts *o = &d->o;
    if (o->n_specs == 0) return tk_fail(err, "no --data given");
    if (o->n_specs > TK_LOADER_MAX_SOURCES)
        return tk_fail(err, "%zu --data datasets (at most %d; a glob or directory of shards is one dataset)", o->n_specs,
                       TK_LOADER_MAX_SOURCES);
    for (size_t i = 0; i < o->n_specs; i++) {
        shard_set *s = &d->sets[d->n_sets++];
        s->spec = o->specs[i];
        char path[4096];
        if (split_spec(o->specs[i], path, sizeof path, &s->weight, err)) return -1;
        struct stat st;
        if (stat(path, &st) == 0) {
            if (S_ISDIR(st.st_mode)) {
                if (list_dir(s, path, err)) return -1;
                continue;
            }
            int k = is_shard(path, err);
            if (k < 0) return -1;
            if (k == 0) { /* JSONL: a dataset on its own */
                if (o->n_specs > 1 || s->weight != 1.0 || strcmp(path, o->specs[i]) != 0)
                    return tk_fail(err, "--data %s: not a shard (no TKSHARD magic), so read as JSONL; JSONL is one "
                                        "dataset on its own (mixing and weights need shards)", o->specs[i]);
                d->jsonl_path = o->specs[i];
                d->n_sets = 0;
                free(s->paths);
                s->paths = NULL;
                return 0;
            }
            if (push_path(s, path, err)) return -1;
        } else if (strpbrk(path, "*?[")) {
            if (list_glob(s, path, err)) return -1;
        } else {
            return tk_fail(err, "--data %s: cannot open: %s", path, strerror(errno));
        }
    }
    return 0;
}

/* ---- JSONL ------------------------------------------------------------------------------------- */

static size_t row_at(row_order *ro, size_t k) {
    size_t epoch = k / ro->n, i = k % ro->n;
    if (!ro->shuffle) return i;
    if (epoch != ro->epoch) { /* Fisher-Yates from a seed of (run seed, epoch) */
        tk_rng rng;
        tk_rng_seed(&rng, ro->seed * 0x9e3779b97f4a7c15ull + epoch);
        for (size_t j = 0; j < ro->n; j++) ro->perm[j] = j;
        for (size_t j = ro->n - 1; j > 0; j--) {
            size_t r = (size_t)(tk_rng_u64(&rng) % (j + 1)), t = ro->perm[j];
            ro->perm[j] = ro->perm[r];
            ro->perm[r] = t;
        }
        ro->epoch = epoch;
    }
    return ro->perm[i];
}

/* kinds of a JSONL batch: PROMPT (label -100 on a real token), RESPONSE (a target label), PAD. */
static int jsonl_kinds(uint8_t **kinds, size_t *cap, const tk_batch *b, tk_err *err) {
    size_t n = b->B * b->T;
    if (n > *cap) {
        uint8_t *k = realloc(*kinds, n);
        if (!k) return tk_fail(err, "out of memory");
        *kinds = k;
        *cap = n;
    }
    for (size_t i = 0; i < n; i++)
        (*kinds)[i] = !b->attention_mask[i] ? TK_KIND_PAD
                      : b->labels[i] == TK_SHARD_LABEL_IGNORE ? TK_KIND_PROMPT
                                                              : TK_KIND_RESPONSE;
    return 0;
}

static int jsonl_step(tk_train_data *d, int step, tk_err *err) {
    size_t B = d->o.batch_size, K = d->o.grad_accum;
    for (size_t k = 0; k < K; k++) {
        size_t first = ((size_t)(step - 1) * K + k) * B;
        for (size_t b = 0; b < B; b++) d->rows[b] = row_at(&d->ro, first + b);
        if (tk_batch_make(&d->jb[k], d->jsonl, d->rows, B, err) ||
            jsonl_kinds(&d->jkinds[k], &d->jkinds_cap[k], &d->jb[k], err))
            return -1;
        d->mb[k].text = &d->jb[k];
        d->mb[k].kinds = d->jkinds[k];
    }
    return 0;
}

/* ---- shards ------------------------------------------------------------------------------------ */

/* The shard of source s holding record rec (its shards concatenated), found by opening them in turn
 * (only on the error path). Writes the shard's path and the record's index in it. */
static void locate(const tk_train_data *d, size_t s, uint64_t rec, const char **path, uint64_t *local) {
    const shard_set *set = &d->sets[s];
    *path = set->paths[0];
    *local = rec;
    for (size_t i = 0; i < set->n; i++) {
        tk_err e = {0};
        tk_shard_reader *r = tk_shard_reader_open(set->paths[i], &e);
        if (!r) return;
        uint64_t n = tk_shard_reader_count(r);
        tk_shard_reader_free(r);
        *path = set->paths[i];
        if (*local < n) return;
        *local -= n;
    }
}

static int shard_next(tk_train_data *d, tk_err *err) {
    for (size_t k = 0; k < d->o.grad_accum; k++) {
        tk_loader_batch *b = &d->lb[k];
        if (tk_loader_next(d->L, b, err)) return -1;
        if (b->n_images > 0 && !d->o.allow_images) {
            const tk_loader_sample *sm = &b->samples[b->images[0].sample];
            const char *path;
            uint64_t local;
            locate(d, sm->source, sm->record, &path, &local);
            return tk_fail(err, "%s: record %llu has %zu image(s) but this model is text-only (image training is "
                                "possible only with --vision-tower); remove image records or attach a vision tower",
                           path, (unsigned long long)local, (size_t)b->n_images);
        }
        d->mb[k].text = &b->text;
        d->mb[k].kinds = b->kinds;
        d->mb[k].batch = b;
    }
    return 0;
}

static int open_shards(tk_train_data *d, tk_err *err) {
    tk_loader_source src[TK_LOADER_MAX_SOURCES];
    size_t files = 0;
    for (size_t s = 0; s < d->n_sets; s++) {
        src[s].paths = (const char *const *)d->sets[s].paths;
        src[s].n_paths = d->sets[s].n;
        src[s].weight = d->sets[s].weight;
        files += d->sets[s].n;
    }
    tk_loader_opts lo = {.batch_size = d->o.batch_size,
                         .max_len = d->o.max_len,
                         .pack = d->o.pack,
                         .shuffle = d->o.shuffle,
                         .shuffle_window = d->o.shuffle_window,
                         .cache_bytes = (size_t)64 << 20,
                         .seed = d->o.seed,
                         .prefetch = d->o.prefetch,
                         .vocab_size = d->o.vocab_size};
    if (!(d->L = tk_loader_open(src, d->n_sets, &lo, err))) return -1;
    tk_loader_get_cursor(d->L, &d->start);
    if (!(d->lb = calloc(d->o.grad_accum, sizeof *d->lb))) return tk_fail(err, "out of memory");
    snprintf(d->desc, sizeof d->desc, "%zu dataset%s, %zu shard%s, %llu records%s", d->n_sets, d->n_sets == 1 ? "" : "s",
             files, files == 1 ? "" : "s", (unsigned long long)tk_loader_epoch_samples(d->L), d->o.pack ? ", packed" : "");
    return 0;
}

/* ---- public ------------------------------------------------------------------------------------ */

tk_train_data *tk_train_data_open(const tk_train_data_opts *o, tk_err *err) {
    if (o->batch_size < 1 || o->grad_accum < 1 || o->max_len < 1) {
        tk_fail(err, "data: batch size, gradient accumulation and maximum length must be >= 1");
        return NULL;
    }
    tk_train_data *d = calloc(1, sizeof *d);
    if (!d) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    d->o = *o;
    if (!(d->mb = calloc(o->grad_accum, sizeof *d->mb)) || resolve(d, err)) goto fail;
    if (d->jsonl_path) {
        if (o->pack || o->shuffle_window) {
            tk_fail(err, "%s: --pack and --shuffle-window apply to shards only (this file is JSONL)", d->jsonl_path);
            goto fail;
        }
        if (!(d->jsonl = tk_jsonl_load(d->jsonl_path, (int)o->vocab_size, o->max_len, err))) goto fail;
        d->jb = calloc(o->grad_accum, sizeof *d->jb);
        d->jkinds = calloc(o->grad_accum, sizeof *d->jkinds);
        d->jkinds_cap = calloc(o->grad_accum, sizeof *d->jkinds_cap);
        d->rows = calloc(o->batch_size, sizeof *d->rows);
        d->ro.perm = calloc(d->jsonl->n_rows, sizeof *d->ro.perm);
        if (!d->jb || !d->jkinds || !d->jkinds_cap || !d->rows || !d->ro.perm) {
            tk_fail(err, "out of memory");
            goto fail;
        }
        d->ro.n = d->jsonl->n_rows;
        d->ro.epoch = SIZE_MAX;
        d->ro.seed = o->seed;
        d->ro.shuffle = o->shuffle;
        snprintf(d->desc, sizeof d->desc, "%zu rows", d->jsonl->n_rows);
    } else if (open_shards(d, err)) {
        goto fail;
    }
    return d;
fail:
    tk_train_data_free(d);
    return NULL;
}

void tk_train_data_free(tk_train_data *d) {
    if (!d) return;
    tk_loader_free(d->L);
    for (size_t k = 0; k < d->o.grad_accum; k++) {
        if (d->lb) tk_loader_batch_free(&d->lb[k]);
        if (d->jb) tk_batch_free(&d->jb[k]);
        if (d->jkinds) free(d->jkinds[k]);
    }
    for (size_t s = 0; s < TK_LOADER_MAX_SOURCES; s++) {
        for (size_t i = 0; i < d->sets[s].n; i++) free(d->sets[s].paths[i]);
        free(d->sets[s].paths);
    }
    free(d->lb);
    free(d->jb);
    free(d->jkinds);
    free(d->jkinds_cap);
    free(d->rows);
    free(d->ro.perm);
    free(d->mb);
    tk_jsonl_free(d->jsonl);
    free(d);
}

int tk_train_data_is_shards(const tk_train_data *d) { return d->L != NULL; }

size_t tk_train_data_max_T(const tk_train_data *d) { return d->jsonl ? d->jsonl->max_len : d->o.max_len; }

const char *tk_train_data_describe(const tk_train_data *d) { return d->desc; }

const char *tk_train_data_name(const tk_train_data *d) { return d->jsonl_path ? d->jsonl_path : d->o.specs[0]; }

static void count(tk_train_data *d) {
    d->targets = d->tokens = 0;
    for (size_t k = 0; k < d->o.grad_accum; k++) {
        const tk_batch *b = d->mb[k].text;
        d->targets += tk_batch_count_targets(b);
        for (size_t i = 0; i < b->B * b->T; i++) d->tokens += b->attention_mask[i];
    }
}

int tk_train_data_step(tk_train_data *d, int step, tk_err *err) {
    TK_ASSERT(step >= 1);
    if (d->jsonl ? jsonl_step(d, step, err) : shard_next(d, err)) return -1;
    count(d);
    return 0;
}

int tk_train_data_first_step(tk_train_data *d, tk_err *err) {
    if (d->jsonl) return tk_train_data_step(d, 1, err);
    tk_loader_cursor here;
    tk_loader_get_cursor(d->L, &here);
    if (tk_loader_set_cursor(d->L, &d->start, err) || shard_next(d, err)) return -1;
    count(d);
    return tk_loader_set_cursor(d->L, &here, err);
}

const tk_train_mb *tk_train_data_mb(const tk_train_data *d, size_t k) {
    TK_ASSERT(k < d->o.grad_accum);
    return &d->mb[k];
}

size_t tk_train_data_targets(const tk_train_data *d) { return d->targets; }
size_t tk_train_data_tokens(const tk_train_data *d) { return d->tokens; }

void tk_train_data_get_cursor(const tk_train_data *d, tk_loader_cursor *c) {
    TK_ASSERT(d->L != NULL);
    tk_loader_get_cursor(d->L, c);
}

int tk_train_data_set_cursor(tk_train_data *d, const tk_loader_cursor *c, tk_err *err) {
    TK_ASSERT(d->L != NULL);
    return tk_loader_set_cursor(d->L, c, err);
}

double tk_train_data_epoch(const tk_train_data *d, int steps_done) {
    if (d->jsonl)
        return (double)steps_done * (double)d->o.grad_accum * (double)d->o.batch_size / (double)d->jsonl->n_rows;
    tk_loader_cursor c;
    tk_loader_get_cursor(d->L, &c);
    return (double)c.samples / (double)tk_loader_epoch_samples(d->L);
}
