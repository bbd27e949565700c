/* checkpoint.c: see checkpoint.h. */
#include "checkpoint.h"

#include "../io/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

static int write_optimizer(const char *dir, const tk_llama *m, tk_err *err) {
    const tk_params *P = &m->params;
    tk_st_entry *e = calloc(2 * P->n + 1, sizeof *e);
    char(*names)[TK_NAME_MAX + 16] = calloc(2 * P->n + 1, sizeof *names);
    int rc = -1;
    if (!e || !names) {
        tk_fail(err, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < P->n; i++) {
        const tk_param *p = &P->items[i];
        for (int k = 0; k < 2; k++) {
            tk_st_entry *x = &e[2 * i + k];
            snprintf(names[2 * i + k], sizeof names[0], "%s.%s", p->name, k ? "exp_avg_sq" : "exp_avg");
            x->name = names[2 * i + k];
            x->dtype = TK_DT_F32;
            x->ndim = p->ndim;
            for (int d = 0; d < p->ndim; d++) x->shape[d] = p->shape[d];
            x->data = (k ? P->v : P->m) + p->offset;
        }
    }
    char path[4200];
    const char *meta[] = {"format", "pt", "optimizer", "adamw", NULL};
    if (tk_pathf(path, sizeof path, err, "%s/optimizer.safetensors", dir) == 0)
        rc = tk_st_write(path, e, 2 * P->n, meta, err);
done:
    free(e);
    free(names);
    return rc;
}

/* The shard loader's cursor, beside trainer_state.json (which names it). */
#define CURSOR_FILE "loader_cursor.json"

static int write_state(const char *dir, const tk_train_state *st, const cJSON *config, tk_err *err) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return tk_fail(err, "out of memory");
    char rng[64], rows[32];
    snprintf(rng, sizeof rng, "%016" PRIx64 "%016" PRIx64, st->rng[0], st->rng[1]);
    snprintf(rows, sizeof rows, "%" PRIu64, st->rows_used);
    cJSON_AddNumberToObject(root, "global_step", st->step);
    cJSON_AddStringToObject(root, "rng_state", rng);
    cJSON *cur = cJSON_AddObjectToObject(root, "loader_cursor");
    cJSON_AddStringToObject(cur, "rows_used", rows); /* a string: exact beyond 2^53 */
    if (st->has_cursor) { /* shards: the loader's own cursor, in its file beside this one */
        char samples[32];
        snprintf(samples, sizeof samples, "%" PRIu64, st->cursor.samples);
        cJSON_AddStringToObject(cur, "file", CURSOR_FILE);
        cJSON_AddStringToObject(cur, "samples", samples);
        cJSON_AddNumberToObject(cur, "epoch", st->epoch);
    }
    cJSON_AddNumberToObject(root, "first_loss", st->first_loss);
    cJSON_AddNumberToObject(root, "last_loss", st->last_loss);
    cJSON_AddNumberToObject(root, "tokens", st->tokens);
    cJSON_AddNumberToObject(root, "seconds", st->seconds);
    cJSON_AddNumberToObject(root, "skipped_steps", st->skipped);
    cJSON_AddItemToObject(root, "config", cJSON_Duplicate(config, 1));
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return tk_fail(err, "out of memory");
    char path[4200];
    int rc = tk_pathf(path, sizeof path, err, "%s/trainer_state.json", dir) ||
             tk_write_file_atomic(path, text, strlen(text), err);
    free(text);
    if (rc == 0 && st->has_cursor)
        rc = tk_pathf(path, sizeof path, err, "%s/%s", dir, CURSOR_FILE) || tk_loader_cursor_save(&st->cursor, path, err);
    return rc;
}

/* Removes a checkpoint directory (flat: files only). */
static void remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *de;
        char path[4400];
        while ((de = readdir(d)))
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
                snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
                remove(path);
            }
        closedir(d);
    }
    rmdir(dir);
}

static void fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* Step number of "checkpoint-<digits>", or -1. */
static long checkpoint_step(const char *name) {
    if (strncmp(name, "checkpoint-", 11) != 0 || !name[11]) return -1;
    char *end;
    long v = strtol(name + 11, &end, 10);
    return *end ? -1 : v;
}

/* The pid in a temporary name "<...>.tmp.<pid>" or ".staging.<pid>", or -1. */
static long temp_owner(const char *name) {
    const char *p = strstr(name, ".tmp.");
    if (p) p += 5;
    else if (strncmp(name, ".staging.", 9) == 0) p = name + 9;
    else return -1;
    char *end;
    long pid = strtol(p, &end, 10);
    return (*end || pid <= 0) ? -1 : pid;
}

void tk_checkpoint_clean_stale(const char *out_dir) {
    DIR *d = opendir(out_dir);
    if (!d) return;
    struct dirent *de;
    char path[4400], **doomed = NULL;
    size_t n = 0;
    while ((de = readdir(d))) {
        long pid = temp_owner(de->d_name);
        if (pid < 0 || pid == (long)getpid() || !(kill((pid_t)pid, 0) != 0 && errno == ESRCH)) continue;
        char **t = realloc(doomed, (n + 1) * sizeof *t);
        if (!t) break;
        doomed = t;
        if ((doomed[n] = strdup(de->d_name))) n++;
    }
    closedir(d);
    for (size_t i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", out_dir, doomed[i]);
        struct stat sb;
        if (lstat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
            /* a staging directory may hold temp files of its own */
            DIR *dd = opendir(path);
            if (dd) {
                struct dirent *e2;
                char inner[4800];
                while ((e2 = readdir(dd)))
                    if (strcmp(e2->d_name, ".") && strcmp(e2->d_name, "..")) {
                        snprintf(inner, sizeof inner, "%s/%s", path, e2->d_name);
                        remove(inner);
                    }
                closedir(dd);
            }
            rmdir(path);
        } else {
            remove(path);
        }
        free(doomed[i]);
    }
    free(doomed);
}

/* Keeps the newest keep_last checkpoints (0 keeps all). */
static void prune(const char *out_dir, int keep_last, long newest) {
    tk_checkpoint_clean_stale(out_dir);
    if (keep_last <= 0) return;
    DIR *d = opendir(out_dir);
    if (!d) return;
    struct dirent *de;
    char path[4400];
    long *steps = NULL;
    size_t n = 0;
    while ((de = readdir(d))) {
        long s = checkpoint_step(de->d_name);
        if (s < 0 || s > newest) continue;
        long *t = realloc(steps, (n + 1) * sizeof *t);
        if (!t) break;
        steps = t;
        steps[n++] = s;
    }
    closedir(d);
    for (size_t i = 0; i < n; i++) {
        size_t newer = 0;
        for (size_t j = 0; j < n; j++) newer += steps[j] > steps[i];
        if (newer >= (size_t)keep_last) {
            snprintf(path, sizeof path, "%s/checkpoint-%ld", out_dir, steps[i]);
            remove_dir(path);
        }
    }
    free(steps);
}

int tk_checkpoint_save(const char *out_dir, int keep_last, const tk_llama *m, const tk_train_state *st,
                       const cJSON *config, tk_err *err) {
    char tmp[4200], final[4200], latest[4200], name[64];
    snprintf(name, sizeof name, "checkpoint-%d", st->step);
    if (tk_pathf(final, sizeof final, err, "%s/%s", out_dir, name) ||
        tk_pathf(tmp, sizeof tmp, err, "%s.tmp.%ld", final, (long)getpid()) ||
        tk_pathf(latest, sizeof latest, err, "%s/latest", out_dir))
        return -1;
    remove_dir(tmp);
    if (mkdir(tmp, 0755) != 0) return tk_fail(err, "%s: cannot create: %s", tmp, strerror(errno));
    if (tk_llama_save_adapter(m, tmp, err) || write_optimizer(tmp, m, err) || write_state(tmp, st, config, err)) {
        remove_dir(tmp);
        return -1;
    }
    fsync_dir(tmp);
    remove_dir(final); /* an older checkpoint of the same step (a re-run) */
    if (rename(tmp, final) != 0) {
        int e = errno;
        remove_dir(tmp);
        return tk_fail(err, "%s: cannot rename into place: %s", final, strerror(e));
    }
    fsync_dir(out_dir);
    char text[80];
    snprintf(text, sizeof text, "%s\n", name);
    if (tk_write_file_atomic(latest, text, strlen(text), err)) return -1;
    prune(out_dir, keep_last, st->step);
    return 0;
}

int tk_checkpoint_resolve(const char *path, char *out, size_t n, tk_err *err) {
    char p[4200];
    struct stat sb;
    snprintf(p, sizeof p, "%s/trainer_state.json", path);
    if (stat(p, &sb) == 0) {
        snprintf(out, n, "%s", path);
        return 0;
    }
    snprintf(p, sizeof p, "%s/latest", path);
    size_t len;
    tk_err e2 = {0};
    char *text = tk_read_file(p, &len, &e2);
    if (!text)
        return tk_fail(err, "%s: neither a checkpoint (no trainer_state.json) nor a run directory (no latest)", path);
    while (len && (text[len - 1] == '\n' || text[len - 1] == ' ')) text[--len] = '\0';
    if (checkpoint_step(text) < 0) {
        tk_fail(err, "%s: does not name a checkpoint-<step> directory", p);
        free(text);
        return -1;
    }
    snprintf(out, n, "%s/%s", path, text);
    free(text);
    return 0;
}

static int parse_u64_hex(const char *s, uint64_t *a, uint64_t *b) {
    if (strlen(s) != 32) return -1;
    char buf[17];
    for (int k = 0; k < 2; k++) {
        memcpy(buf, s + 16 * k, 16);
        buf[16] = '\0';
        char *end;
        uint64_t v = strtoull(buf, &end, 16);
        if (*end) return -1;
        *(k ? b : a) = v;
    }
    return 0;
}

int tk_checkpoint_load(const char *dir, tk_llama *m, tk_train_state *st, cJSON **config, tk_err *err) {
    char path[4200];
    memset(st, 0, sizeof *st);
    *config = NULL;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    tk_st_file *f = tk_st_open(path, err);
    if (!f) return -1;
    for (size_t i = 0; i < m->params.n; i++) {
        const tk_param *p = &m->params.items[i];
        for (int k = 0; k < 2; k++) {
            char nm[TK_NAME_MAX + 16];
            snprintf(nm, sizeof nm, "%s.%s", p->name, k ? "exp_avg_sq" : "exp_avg");
            const tk_st_tensor *t = tk_st_find(f, nm);
            if (!t) {
                tk_st_close(f);
                return tk_fail(err, "%s: tensor '%s' is missing", path, nm);
            }
            if (tk_st_check_shape(f, t, p->ndim, p->shape, err) ||
                tk_st_read_f32(f, t, (k ? m->params.v : m->params.m) + p->offset, p->numel, err)) {
                tk_st_close(f);
                return -1;
            }
        }
    }
    tk_st_close(f);
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    size_t len;
    char *text = tk_read_file(path, &len, err);
    if (!text) return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    const cJSON *step = cJSON_GetObjectItemCaseSensitive(root, "global_step");
    const cJSON *rng = cJSON_GetObjectItemCaseSensitive(root, "rng_state");
    const cJSON *cur = cJSON_GetObjectItemCaseSensitive(root, "loader_cursor");
    const cJSON *rows = cJSON_GetObjectItemCaseSensitive(cur, "rows_used");
    const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(root, "config");
    if (!cJSON_IsObject(root) || !cJSON_IsNumber(step) || step->valuedouble < 1 || step->valuedouble > 1e9 ||
        !cJSON_IsString(rng) || parse_u64_hex(rng->valuestring, &st->rng[0], &st->rng[1]) ||
        !cJSON_IsString(rows) || !cJSON_IsObject(cfg)) {
        cJSON_Delete(root);
        return tk_fail(err, "%s: not a tspeft trainer state (global_step, rng_state, loader_cursor, config)", path);
    }
    st->step = (int)step->valuedouble;
    st->rows_used = strtoull(rows->valuestring, NULL, 10);
    const char *keys[] = {"first_loss", "last_loss", "tokens", "seconds"};
    double *dst[] = {&st->first_loss, &st->last_loss, &st->tokens, &st->seconds};
    for (int i = 0; i < 4; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, keys[i]);
        if (cJSON_IsNumber(v)) *dst[i] = v->valuedouble;
    }
    const cJSON *sk = cJSON_GetObjectItemCaseSensitive(root, "skipped_steps");
    if (cJSON_IsNumber(sk)) st->skipped = (int)sk->valuedouble;
    const cJSON *file = cJSON_GetObjectItemCaseSensitive(cur, "file");
    if (file) { /* a run from shards: the loader cursor */
        if (!cJSON_IsString(file) || strcmp(file->valuestring, CURSOR_FILE) != 0) {
            cJSON_Delete(root);
            return tk_fail(err, "%s: loader_cursor.file must be \"%s\"", path, CURSOR_FILE);
        }
        if (tk_pathf(path, sizeof path, err, "%s/%s", dir, CURSOR_FILE) || tk_loader_cursor_load(&st->cursor, path, err)) {
            cJSON_Delete(root);
            return -1;
        }
        st->has_cursor = 1;
        const cJSON *ep = cJSON_GetObjectItemCaseSensitive(cur, "epoch");
        if (cJSON_IsNumber(ep)) st->epoch = ep->valuedouble;
    }
    *config = cJSON_DetachItemFromObjectCaseSensitive(root, "config");
    cJSON_Delete(root);
    return 0;
}
