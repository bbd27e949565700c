/* jsonl.c: see jsonl.h.
 *
 * Legend: B = rows in a batch, T = longest selected row, len = tokens in one row.
 *
 * The file is untrusted: every line is parsed with an explicit length, every array is walked by its
 * links (never by an int count), every number is checked to be a finite integer in range before it
 * is converted, and all sizes are size_t with overflow-checked products. Errors are one line,
 * "PATH:LINE: what was wrong (found X, expected Y)", with 1-based line numbers.
 *
 * Memory: each row is one tk_calloc block holding input_ids [len], then labels [len], then
 * attention_mask [len]; row.input_ids is the block's base and the only pointer freed. The rows array
 * itself grows with realloc and is released with free.
 */
#include "datasets/jsonl.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TK_LABEL_IGNORE (-100)

/* Where the loader is, for error messages. */
typedef struct {
    const char *path;
    size_t line; /* 1-based */
    tk_err *err;
} jsonl_ctx;

static const char *json_type_name(const cJSON *x) {
    if (x == NULL) return "nothing";
    if (cJSON_IsNull(x)) return "null";
    if (cJSON_IsBool(x)) return "a boolean";
    if (cJSON_IsNumber(x)) return "a number";
    if (cJSON_IsString(x)) return "a string";
    if (cJSON_IsArray(x)) return "an array";
    if (cJSON_IsObject(x)) return "an object";
    return "an invalid value";
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; }

/* Describes the byte at s (or the end of the line when s == end) as "'c'", "byte 0xNN" or
 * "end of line", for error messages. */
static void describe_char(char *out, size_t cap, const char *s, const char *end) {
    if (s >= end) {
        snprintf(out, cap, "end of line");
        return;
    }
    unsigned char c = (unsigned char)*s;
    if (c >= 0x20 && c < 0x7f) {
        snprintf(out, cap, "'%c'", (char)c);
    } else {
        snprintf(out, cap, "byte 0x%02x", c);
    }
}

/* What one integer array may contain. */
typedef enum { ARR_IDS, ARR_LABELS, ARR_MASK } arr_kind;

static const char *arr_expected(arr_kind kind, int vocab, char *buf, size_t cap) {
    switch (kind) {
    case ARR_IDS:
        snprintf(buf, cap, "an integer in [0, %d)", vocab);
        break;
    case ARR_LABELS:
        snprintf(buf, cap, "an integer in [0, %d) or -100", vocab);
        break;
    case ARR_MASK:
        snprintf(buf, cap, "0 or 1");
        break;
    }
    return buf;
}

/* Looks up key in obj. Absent is fine when optional (returns 0 with *out NULL); present means an
 * array, whose element count is stored in *n. */
static int get_array(const jsonl_ctx *c, const cJSON *obj, const char *key, int optional,
                     const cJSON **out, size_t *n) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(obj, key);
    *out = NULL;
    *n = 0;
    if (a == NULL) {
        if (optional) return 0;
        return tk_fail(c->err, "%s:%zu: missing \"%s\" (found no such key, expected an array of token ids)",
                       c->path, c->line, key);
    }
    if (!cJSON_IsArray(a)) {
        return tk_fail(c->err, "%s:%zu: \"%s\" is not an array (found %s, expected an array of integers)",
                       c->path, c->line, key, json_type_name(a));
    }
    size_t count = 0;
    for (const cJSON *e = a->child; e != NULL; e = e->next) count++;
    *out = a;
    *n = count;
    return 0;
}

/* Validates every element of arr (all of them, even past `keep`) and stores the first `keep` into
 * out (int32_t [keep] for ids and labels, uint8_t [keep] for the mask). */
static int read_array(const jsonl_ctx *c, const cJSON *arr, const char *key, arr_kind kind, int vocab,
                      void *out, size_t keep) {
    char expected[64];
    size_t i = 0;
    for (const cJSON *e = arr->child; e != NULL; e = e->next, i++) {
        if (!cJSON_IsNumber(e)) {
            return tk_fail(c->err, "%s:%zu: %s[%zu] is not a number (found %s, expected %s)", c->path,
                           c->line, key, i, json_type_name(e), arr_expected(kind, vocab, expected, sizeof expected));
        }
        double x = e->valuedouble;
        if (!isfinite(x) || x != floor(x)) {
            return tk_fail(c->err, "%s:%zu: %s[%zu] is not an integer (found %.17g, expected %s)", c->path,
                           c->line, key, i, x, arr_expected(kind, vocab, expected, sizeof expected));
        }
        int ok;
        switch (kind) {
        case ARR_IDS:
            ok = x >= 0.0 && x < (double)vocab;
            break;
        case ARR_LABELS:
            ok = (x >= 0.0 && x < (double)vocab) || x == (double)TK_LABEL_IGNORE;
            break;
        case ARR_MASK:
        default:
            ok = x == 0.0 || x == 1.0;
            break;
        }
        if (!ok) {
            return tk_fail(c->err, "%s:%zu: %s[%zu] out of range (found %.17g, expected %s)", c->path,
                           c->line, key, i, x, arr_expected(kind, vocab, expected, sizeof expected));
        }
        if (i < keep) {
            /* x is an integer within int32 range (checked above), so the conversion is exact. */
            if (kind == ARR_MASK) {
                ((uint8_t *)out)[i] = (uint8_t)x;
            } else {
                ((int32_t *)out)[i] = (int32_t)x;
            }
        }
    }
    return 0;
}

/* Parses one non-blank line [s, end) into row. */
static int parse_row(const jsonl_ctx *c, const char *s, const char *end, int vocab, size_t max_len,
                     tk_row *row) {
    const char *parse_end = NULL;
    cJSON *obj = cJSON_ParseWithLengthOpts(s, (size_t)(end - s), &parse_end, 0);
    if (obj == NULL) {
        const char *at = parse_end != NULL && parse_end >= s && parse_end <= end ? parse_end : s;
        char found[32];
        describe_char(found, sizeof found, at, end);
        return tk_fail(c->err, "%s:%zu: invalid JSON at column %zu (found %s, expected one JSON object per line)",
                       c->path, c->line, (size_t)(at - s) + 1, found);
    }
    const char *rest = parse_end != NULL ? parse_end : end;
    while (rest < end && is_space(*rest)) rest++;
    if (rest < end) {
        char found[32];
        describe_char(found, sizeof found, rest, end);
        cJSON_Delete(obj);
        return tk_fail(c->err, "%s:%zu: trailing characters at column %zu (found %s, expected end of line)",
                       c->path, c->line, (size_t)(rest - s) + 1, found);
    }
    if (!cJSON_IsObject(obj)) {
        int rc = tk_fail(c->err, "%s:%zu: line is not a JSON object (found %s, expected an object with \"input_ids\")",
                         c->path, c->line, json_type_name(obj));
        cJSON_Delete(obj);
        return rc;
    }

    const cJSON *ids = NULL, *labels = NULL, *mask = NULL;
    size_t n = 0, n_labels = 0, n_mask = 0;
    int rc = get_array(c, obj, "input_ids", 0, &ids, &n);
    if (rc == 0 && n == 0) {
        rc = tk_fail(c->err, "%s:%zu: \"input_ids\" is empty (found 0 ids, expected at least 1)", c->path,
                     c->line);
    }
    if (rc == 0) rc = get_array(c, obj, "labels", 1, &labels, &n_labels);
    if (rc == 0 && labels != NULL && n_labels != n) {
        rc = tk_fail(c->err, "%s:%zu: \"labels\" has a different length from \"input_ids\" (found %zu, expected %zu)",
                     c->path, c->line, n_labels, n);
    }
    if (rc == 0) rc = get_array(c, obj, "attention_mask", 1, &mask, &n_mask);
    if (rc == 0 && mask != NULL && n_mask != n) {
        rc = tk_fail(c->err,
                     "%s:%zu: \"attention_mask\" has a different length from \"input_ids\" (found %zu, expected %zu)",
                     c->path, c->line, n_mask, n);
    }

    size_t keep = (max_len > 0 && n > max_len) ? max_len : n;
    unsigned char *block = NULL;
    if (rc == 0) {
        /* One block: input_ids [keep] int32, labels [keep] int32, attention_mask [keep] uint8. */
        block = tk_calloc(keep, 2 * sizeof(int32_t) + sizeof(uint8_t));
        if (block == NULL) {
            rc = tk_fail(c->err, "%s:%zu: out of memory for a row of %zu tokens", c->path, c->line, keep);
        }
    }
    int32_t *row_ids = (int32_t *)block;
    int32_t *row_labels = row_ids != NULL ? row_ids + keep : NULL;
    uint8_t *row_mask = row_labels != NULL ? (uint8_t *)(row_labels + keep) : NULL;
    if (rc == 0) rc = read_array(c, ids, "input_ids", ARR_IDS, vocab, row_ids, keep);
    if (rc == 0) {
        if (labels != NULL) {
            rc = read_array(c, labels, "labels", ARR_LABELS, vocab, row_labels, keep);
        } else {
            memcpy(row_labels, row_ids, keep * sizeof(int32_t));
        }
    }
    if (rc == 0) {
        if (mask != NULL) {
            rc = read_array(c, mask, "attention_mask", ARR_MASK, vocab, row_mask, keep);
        } else {
            memset(row_mask, 1, keep);
        }
    }
    cJSON_Delete(obj);
    if (rc != 0) {
        tk_free(block);
        return rc;
    }
    row->len = keep;
    row->input_ids = row_ids;
    row->labels = row_labels;
    row->attention_mask = row_mask;
    return 0;
}

tk_jsonl_data *tk_jsonl_load(const char *path, int vocab_size, size_t max_len, tk_err *err) {
    if (path == NULL) {
        tk_fail(err, "jsonl: no path given (found NULL, expected a file path)");
        return NULL;
    }
    if (vocab_size <= 0) {
        tk_fail(err, "%s: invalid vocabulary size (found %d, expected > 0)", path, vocab_size);
        return NULL;
    }
    size_t len = 0;
    char *buf = tk_read_file(path, &len, err);
    if (buf == NULL) return NULL;

    tk_jsonl_data *d = tk_calloc(1, sizeof *d);
    if (d == NULL) {
        free(buf);
        tk_fail(err, "%s: out of memory", path);
        return NULL;
    }
    size_t cap = 0;
    jsonl_ctx c = {path, 0, err};
    const char *p = buf, *file_end = buf + len;
    /* A UTF-8 byte-order mark is not part of the first line's JSON. */
    if (len >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0) p += 3;
    int rc = 0;
    while (p < file_end) {
        c.line++;
        const char *nl = memchr(p, '\n', (size_t)(file_end - p));
        const char *end = nl != NULL ? nl : file_end;
        const char *s = p;
        p = nl != NULL ? nl + 1 : file_end;
        while (s < end && is_space(*s)) s++;
        if (s == end) continue; /* blank line */
        if (d->n_rows == cap) {
            size_t new_cap = cap == 0 ? 64 : cap * 2;
            size_t bytes;
            tk_row *grown = NULL;
            if (new_cap > cap && tk_mul_size(new_cap, sizeof(tk_row), &bytes) == 0) {
                grown = realloc(d->rows, bytes);
            }
            if (grown == NULL) {
                rc = tk_fail(err, "%s:%zu: out of memory for %zu rows", path, c.line, new_cap);
                break;
            }
            d->rows = grown;
            cap = new_cap;
        }
        rc = parse_row(&c, s, end, vocab_size, max_len, &d->rows[d->n_rows]);
        if (rc != 0) break;
        if (d->rows[d->n_rows].len > d->max_len) d->max_len = d->rows[d->n_rows].len;
        d->n_rows++;
    }
    free(buf);
    if (rc == 0 && d->n_rows == 0) {
        if (c.line == 0) {
            rc = tk_fail(err, "%s:1: no rows (found an empty file, expected at least one JSON object line)", path);
        } else {
            rc = tk_fail(err, "%s:%zu: no rows (found only blank lines, expected at least one JSON object line)",
                         path, c.line);
        }
    }
    if (rc != 0) {
        tk_jsonl_free(d);
        return NULL;
    }
    return d;
}

void tk_jsonl_free(tk_jsonl_data *d) {
    if (d == NULL) return;
    for (size_t i = 0; i < d->n_rows; i++) tk_free(d->rows[i].input_ids); /* the row's one block */
    free(d->rows);
    tk_free(d);
}

int tk_batch_make(tk_batch *b, const tk_jsonl_data *d, const size_t *rows, size_t n, tk_err *err) {
    TK_ASSERT(b != NULL && d != NULL);
    if (n == 0 || rows == NULL) {
        return tk_fail(err, "batch: no rows selected (found %zu, expected at least 1)", n);
    }
    size_t T = 0;
    for (size_t i = 0; i < n; i++) {
        if (rows[i] >= d->n_rows) {
            return tk_fail(err, "batch: rows[%zu] out of range (found %zu, expected < %zu rows)", i, rows[i],
                           d->n_rows);
        }
        if (d->rows[rows[i]].len > T) T = d->rows[rows[i]].len;
    }
    size_t BT;
    if (T == 0 || tk_mul_size(n, T, &BT) != 0) {
        return tk_fail(err, "batch: invalid size (found B=%zu T=%zu, expected 0 < B*T <= SIZE_MAX)", n, T);
    }
    if (BT > b->cap || b->input_ids == NULL || b->labels == NULL || b->attention_mask == NULL) {
        /* Allocate the new buffers first so that a failure leaves b as it was. */
        int32_t *ids = tk_calloc(BT, sizeof(int32_t));
        int32_t *labels = tk_calloc(BT, sizeof(int32_t));
        uint8_t *mask = tk_calloc(BT, sizeof(uint8_t));
        if (ids == NULL || labels == NULL || mask == NULL) {
            tk_free(ids);
            tk_free(labels);
            tk_free(mask);
            return tk_fail(err, "batch: out of memory for B=%zu T=%zu", n, T);
        }
        tk_batch_free(b);
        b->input_ids = ids;
        b->labels = labels;
        b->attention_mask = mask;
        b->cap = BT;
    }
    b->B = n;
    b->T = T;
    for (size_t i = 0; i < n; i++) {
        const tk_row *r = &d->rows[rows[i]];
        int32_t *ids = b->input_ids + i * T;
        int32_t *labels = b->labels + i * T;
        uint8_t *mask = b->attention_mask + i * T;
        memcpy(ids, r->input_ids, r->len * sizeof(int32_t));
        memcpy(labels, r->labels, r->len * sizeof(int32_t));
        memcpy(mask, r->attention_mask, r->len);
        for (size_t t = r->len; t < T; t++) {
            ids[t] = 0;
            labels[t] = TK_LABEL_IGNORE;
            mask[t] = 0;
        }
    }
    return 0;
}

void tk_batch_free(tk_batch *b) {
    if (b == NULL) return;
    tk_free(b->input_ids);
    tk_free(b->labels);
    tk_free(b->attention_mask);
    memset(b, 0, sizeof *b);
}

size_t tk_batch_count_targets(const tk_batch *b) {
    TK_ASSERT(b != NULL);
    size_t count = 0;
    if (b->T < 2) return 0;
    for (size_t i = 0; i < b->B; i++) {
        const int32_t *labels = b->labels + i * b->T;
        for (size_t t = 0; t + 1 < b->T; t++) count += labels[t + 1] != TK_LABEL_IGNORE;
    }
    return count;
}
