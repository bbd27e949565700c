/* instruct.c: see instruct.h. */
#include "instruct.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tk_instruct_free(tk_instruct *r, size_t n) {
    if (!r) return;
    for (size_t i = 0; i < n; i++) {
        free(r[i].instruction);
        free(r[i].input);
        free(r[i].output);
        free(r[i].answer);
    }
    free(r);
}

/* "record I" or "line L" for messages. */
typedef struct {
    const char *path;
    int jsonl;
    size_t where;
} loc;

static int loc_fail(const loc *l, tk_err *err, const char *what) {
    return tk_fail(err, "%s: %s %zu: %s", l->path, l->jsonl ? "line" : "record", l->where, what);
}

/* Copies field `key` of o into *dst. required: 1 must be present and a string; 0 optional ("" when
 * missing/null). allow_number: a JSON number is kept as its JSON text. */
static int get_field(char **dst, const cJSON *o, const char *key, int required, int allow_number, const loc *l,
                     tk_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    char msg[128];
    const char *s = NULL;
    char *printed = NULL;
    if (!v || cJSON_IsNull(v)) {
        if (required) {
            snprintf(msg, sizeof msg, "missing \"%s\"", key);
            return loc_fail(l, err, msg);
        }
        s = "";
    } else if (cJSON_IsString(v)) {
        s = v->valuestring;
    } else if (allow_number && cJSON_IsNumber(v)) {
        printed = cJSON_PrintUnformatted(v);
        if (!printed) return tk_fail(err, "%s: out of memory", l->path);
        s = printed;
    } else {
        snprintf(msg, sizeof msg, "\"%s\" must be a string", key);
        return loc_fail(l, err, msg);
    }
    *dst = strdup(s);
    free(printed);
    if (!*dst) return tk_fail(err, "%s: out of memory", l->path);
    return 0;
}

static int from_object(tk_instruct *r, const cJSON *o, const loc *l, tk_err *err) {
    if (!cJSON_IsObject(o)) return loc_fail(l, err, "not a JSON object");
    const cJSON *ans = cJSON_GetObjectItemCaseSensitive(o, "answer");
    int has_answer = ans && !cJSON_IsNull(ans);
    if (get_field(&r->instruction, o, "instruction", 1, 0, l, err) ||
        get_field(&r->input, o, "input", 0, 0, l, err) ||
        get_field(&r->output, o, "output", !has_answer, 0, l, err) ||
        get_field(&r->answer, o, "answer", 0, 1, l, err))
        return -1;
    return 0;
}

static int grow(tk_instruct **a, size_t *cap, size_t need, tk_err *err, const char *path) {
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap * 2 : 256;
    while (nc < need) nc *= 2;
    if (nc > SIZE_MAX / sizeof **a) return tk_fail(err, "%s: too many records", path);
    tk_instruct *p = realloc(*a, nc * sizeof **a);
    if (!p) return tk_fail(err, "%s: out of memory", path);
    memset(p + *cap, 0, (nc - *cap) * sizeof *p);
    *a = p;
    *cap = nc;
    return 0;
}

/* 1-based line and column of byte offset off. */
static void line_col(const char *buf, size_t off, size_t *line, size_t *col) {
    size_t ln = 1, last = 0;
    for (size_t i = 0; i < off; i++)
        if (buf[i] == '\n') {
            ln++;
            last = i + 1;
        }
    *line = ln;
    *col = off - last + 1;
}

int tk_instruct_load(const char *path, tk_instruct **out, size_t *n, tk_err *err) {
    *out = NULL;
    *n = 0;
    size_t len = 0;
    char *buf = tk_read_file(path, &len, err);
    if (!buf) return -1;
    size_t p = 0;
    if (len >= 3 && (unsigned char)buf[0] == 0xEF && (unsigned char)buf[1] == 0xBB && (unsigned char)buf[2] == 0xBF)
        p = 3;
    size_t q = p;
    while (q < len && (buf[q] == ' ' || buf[q] == '\t' || buf[q] == '\r' || buf[q] == '\n')) q++;
    if (q == len) {
        free(buf);
        return tk_fail(err, "%s: empty file (expected a JSON array or JSON lines of records)", path);
    }
    tk_instruct *recs = NULL;
    size_t count = 0, cap = 0;
    int rc = -1;
    if (buf[q] == '[') {
        const char *end = NULL;
        cJSON *root = cJSON_ParseWithLengthOpts(buf + p, len - p, &end, 0);
        if (!root) {
            size_t off = end ? (size_t)(end - buf) : p, line, col;
            if (off > len) off = len;
            line_col(buf, off, &line, &col);
            tk_fail(err, "%s: line %zu, column %zu: invalid JSON", path, line, col);
            goto done;
        }
        if (!cJSON_IsArray(root)) {
            cJSON_Delete(root);
            tk_fail(err, "%s: expected a JSON array of records", path);
            goto done;
        }
        {
            size_t off = end ? (size_t)(end - buf) : len;
            while (off < len && (buf[off] == ' ' || buf[off] == '\t' || buf[off] == '\r' || buf[off] == '\n')) off++;
            if (off < len) {
                size_t line, col;
                line_col(buf, off, &line, &col);
                cJSON_Delete(root);
                tk_fail(err, "%s: line %zu, column %zu: unexpected data after the JSON array", path, line, col);
                goto done;
            }
        }
        size_t total = (size_t)cJSON_GetArraySize(root);
        if (total == 0) {
            cJSON_Delete(root);
            tk_fail(err, "%s: empty array (no records)", path);
            goto done;
        }
        if (grow(&recs, &cap, total, err, path)) {
            cJSON_Delete(root);
            goto done;
        }
        const cJSON *o;
        cJSON_ArrayForEach(o, root) {
            loc l = {path, 0, count};
            count++;
            if (from_object(&recs[count - 1], o, &l, err)) {
                cJSON_Delete(root);
                goto done;
            }
        }
        cJSON_Delete(root);
    } else {
        size_t line_no = 0, s = p;
        while (s < len) {
            size_t e = s;
            while (e < len && buf[e] != '\n') e++;
            line_no++;
            size_t t = s;
            while (t < e && (buf[t] == ' ' || buf[t] == '\t' || buf[t] == '\r')) t++;
            if (t < e) {
                loc l = {path, 1, line_no};
                const char *pend = NULL;
                cJSON *o = cJSON_ParseWithLengthOpts(buf + s, e - s, &pend, 0);
                if (o && pend) {
                    const char *z = pend;
                    while (z < buf + e && (*z == ' ' || *z == '\t' || *z == '\r')) z++;
                    if (z < buf + e) {
                        cJSON_Delete(o);
                        o = NULL;
                        pend = z;
                    }
                }
                if (!o) {
                    char msg[96];
                    snprintf(msg, sizeof msg, "invalid JSON at column %zu",
                             pend && pend >= buf + s ? (size_t)(pend - (buf + s)) + 1 : (size_t)1);
                    loc_fail(&l, err, msg);
                    goto done;
                }
                if (grow(&recs, &cap, count + 1, err, path)) {
                    cJSON_Delete(o);
                    goto done;
                }
                count++;
                int bad = from_object(&recs[count - 1], o, &l, err);
                cJSON_Delete(o);
                if (bad) goto done;
            }
            s = e + 1;
        }
        if (count == 0) {
            tk_fail(err, "%s: no records", path);
            goto done;
        }
    }
    rc = 0;
done:
    free(buf);
    if (rc) {
        tk_instruct_free(recs, count);
        return -1;
    }
    *out = recs;
    *n = count;
    return 0;
}
