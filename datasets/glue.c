/* glue.c: see glue.h. */
#include "glue.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const V_COLA[] = {"unacceptable", "acceptable"};
static const char *const V_SST2[] = {"negative", "positive"};
static const char *const V_MRPC[] = {"not_equivalent", "equivalent"};
static const char *const V_QQP[] = {"not_duplicate", "duplicate"};
static const char *const V_MNLI[] = {"entailment", "neutral", "contradiction"};
static const char *const V_ENT[] = {"entailment", "not_entailment"};
static const char *const V_WNLI[] = {"not_entailment", "entailment"};

enum { T_COLA, T_SST2, T_MRPC, T_QQP, T_STSB, T_MNLI_M, T_MNLI_MM, T_QNLI, T_RTE, T_WNLI, T_COUNT };

static const tk_glue_task TASKS[T_COUNT] = {
    {"cola", 2, V_COLA, TK_GLUE_MCC},
    {"sst2", 2, V_SST2, TK_GLUE_ACC},
    {"mrpc", 2, V_MRPC, TK_GLUE_ACC_F1},
    {"qqp", 2, V_QQP, TK_GLUE_ACC_F1},
    {"stsb", 0, NULL, TK_GLUE_PEARSON_SPEARMAN},
    {"mnli_m", 3, V_MNLI, TK_GLUE_ACC},
    {"mnli_mm", 3, V_MNLI, TK_GLUE_ACC},
    {"qnli", 2, V_ENT, TK_GLUE_ACC},
    {"rte", 2, V_ENT, TK_GLUE_ACC},
    {"wnli", 2, V_WNLI, TK_GLUE_ACC},
};

/* Normalized (lowercase; no '-', '_', '.', ' ') names -> task. */
static const struct {
    const char *key;
    int task;
} ALIASES[] = {
    {"cola", T_COLA},        {"sst2", T_SST2},           {"sst", T_SST2},           {"mrpc", T_MRPC},
    {"qqp", T_QQP},          {"stsb", T_STSB},           {"sts", T_STSB},           {"mnlim", T_MNLI_M},
    {"mnli", T_MNLI_M},      {"mnlimatched", T_MNLI_M},  {"mnlimm", T_MNLI_MM},     {"mnlimismatched", T_MNLI_MM},
    {"qnli", T_QNLI},        {"rte", T_RTE},             {"wnli", T_WNLI},
};

/* Column layout per task: names in the header (NULL = none). */
typedef struct {
    const char *a, *b, *label;
    int label_words; /* 1: the label column holds verbalizer words; 0: an index; 2: a float score */
} layout;

static const layout LAYOUTS[T_COUNT] = {
    [T_COLA] = {"sentence", NULL, "label", 0},
    [T_SST2] = {"sentence", NULL, "label", 0},
    [T_MRPC] = {"#1 String", "#2 String", "Quality", 0},
    [T_QQP] = {"question1", "question2", "is_duplicate", 0},
    [T_STSB] = {"sentence1", "sentence2", "score", 2},
    [T_MNLI_M] = {"sentence1", "sentence2", "gold_label", 1},
    [T_MNLI_MM] = {"sentence1", "sentence2", "gold_label", 1},
    [T_QNLI] = {"question", "sentence", "label", 1},
    [T_RTE] = {"sentence1", "sentence2", "label", 1},
    [T_WNLI] = {"sentence1", "sentence2", "label", 0},
};

static int task_index(const tk_glue_task *t) {
    if (t < TASKS || t >= TASKS + T_COUNT) return -1;
    return (int)(t - TASKS);
}

const tk_glue_task *tk_glue_task_find(const char *name) {
    if (!name) return NULL;
    char key[64];
    size_t j = 0;
    for (size_t i = 0; name[i]; i++) {
        char c = name[i];
        if (c == '-' || c == '_' || c == '.' || c == ' ') continue;
        if (j + 1 >= sizeof key) return NULL;
        key[j++] = (char)tolower((unsigned char)c);
    }
    key[j] = '\0';
    for (size_t i = 0; i < sizeof ALIASES / sizeof ALIASES[0]; i++)
        if (strcmp(key, ALIASES[i].key) == 0) return &TASKS[ALIASES[i].task];
    return NULL;
}

const tk_glue_task *tk_glue_task_from_path(const char *path) {
    if (!path) return NULL;
    size_t len = strlen(path);
    char *low = malloc(len + 1);
    if (!low) return NULL;
    for (size_t i = 0; i <= len; i++) low[i] = (char)tolower((unsigned char)path[i]);
    const tk_glue_task *t = NULL;
    if (strstr(low, "mnli")) {
        t = &TASKS[strstr(low, "mismatched") ? T_MNLI_MM : T_MNLI_M];
    } else {
        size_t end = len;
        while (!t && end > 0) {
            while (end > 0 && low[end - 1] == '/') end--;
            size_t begin = end;
            while (begin > 0 && low[begin - 1] != '/') begin--;
            if (begin == end) break;
            char *dot = memchr(low + begin + 1, '.', end - begin - 1);
            size_t stop = dot ? (size_t)(dot - low) : end;
            char save = low[stop];
            low[stop] = '\0';
            t = tk_glue_task_find(low + begin);
            low[stop] = save;
            end = begin;
        }
    }
    free(low);
    return t;
}

int tk_glue_label_index(const tk_glue_task *t, const char *word) {
    if (!t || !word) return -1;
    for (int i = 0; i < t->n_labels; i++)
        if (strcmp(t->verbalizers[i], word) == 0) return i;
    return -1;
}

void tk_glue_free(tk_glue_example *e, size_t n) {
    if (!e) return;
    for (size_t i = 0; i < n; i++) {
        free(e[i].id);
        free(e[i].text_a);
        free(e[i].text_b);
    }
    free(e);
}

/* Splits line[0..len) on TAB in place (the TABs become NULs); fields[] gets up to cap pointers.
 * Returns the field count (which may exceed cap: only the first cap are stored). */
static size_t split_tabs(char *line, size_t len, char **fields, size_t cap) {
    size_t nf = 0, s = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || line[i] == '\t') {
            if (nf < cap) fields[nf] = line + s;
            nf++;
            if (i < len) line[i] = '\0';
            s = i + 1;
        }
    }
    return nf;
}

static int find_col(char **hdr, size_t nh, const char *name) {
    if (!name) return -1;
    for (size_t i = 0; i < nh; i++)
        if (strcmp(hdr[i], name) == 0) return (int)i;
    return -1;
}

#define MAX_COLS 64

int tk_glue_load(const tk_glue_task *t, const char *tsv_path, tk_glue_example **out, size_t *n, tk_err *err) {
    *out = NULL;
    *n = 0;
    int ti = task_index(t);
    if (ti < 0) return tk_fail(err, "%s: unknown GLUE task", tsv_path);
    const layout *L = &LAYOUTS[ti];
    size_t len = 0;
    char *buf = tk_read_file(tsv_path, &len, err);
    if (!buf) return -1;
    if (memchr(buf, '\0', len)) {
        free(buf);
        return tk_fail(err, "%s: NUL byte in the file (not a TSV text file)", tsv_path);
    }
    size_t p = 0;
    if (len >= 3 && (unsigned char)buf[0] == 0xEF && (unsigned char)buf[1] == 0xBB && (unsigned char)buf[2] == 0xBF)
        p = 3;
    tk_glue_example *ex = NULL;
    size_t count = 0, cap = 0, line_no = 0;
    char *hdr[MAX_COLS];
    size_t nh = 0;
    int have_header = 0, cola_raw = 0;
    int ca = -1, cb = -1, cl = -1, cid = -1;
    int rc = -1;
    while (p < len) {
        size_t e = p;
        while (e < len && buf[e] != '\n') e++;
        line_no++;
        size_t ll = e - p;
        if (ll > 0 && buf[p + ll - 1] == '\r') ll--;
        char *line = buf + p;
        p = e + 1;
        if (ll == 0) continue;
        line[ll] = '\0';
        char *f[MAX_COLS];
        size_t nf = split_tabs(line, ll, f, MAX_COLS);
        if (nf > MAX_COLS) {
            tk_fail(err, "%s: line %zu: %zu tab-separated fields (at most %d expected)", tsv_path, line_no, nf,
                    MAX_COLS);
            goto done;
        }
        if (!have_header && !cola_raw) {
            /* the first non-blank line: the header, except CoLA's train/dev files (no header) */
            if (ti == T_COLA && strcmp(f[0], "index") != 0) {
                cola_raw = 1;
                nh = 4;
                ca = 3;
                cl = 1;
            } else {
                have_header = 1;
                nh = nf;
                for (size_t i = 0; i < nf; i++) hdr[i] = f[i];
                ca = find_col(hdr, nh, L->a);
                cb = find_col(hdr, nh, L->b);
                cl = find_col(hdr, nh, L->label);
                cid = find_col(hdr, nh, ti == T_QQP ? "id" : "index");
                if (ca < 0 || (L->b && cb < 0)) {
                    tk_fail(err, "%s: line %zu: header has no \"%s\" column (GLUE %s; first field \"%.40s\")",
                            tsv_path, line_no, ca < 0 ? L->a : L->b, t->name, f[0]);
                    goto done;
                }
                continue;
            }
        }
        if (nf != nh) {
            tk_fail(err, "%s: line %zu: %zu tab-separated fields, expected %zu%s", tsv_path, line_no, nf, nh,
                    cola_raw ? " (CoLA: source, label, mark, sentence)" : " (as the header)");
            goto done;
        }
        if (count == cap) {
            size_t nc = cap ? cap * 2 : 1024;
            tk_glue_example *q = realloc(ex, nc * sizeof *ex);
            if (!q) {
                tk_fail(err, "%s: out of memory", tsv_path);
                goto done;
            }
            memset(q + cap, 0, (nc - cap) * sizeof *q);
            ex = q;
            cap = nc;
        }
        tk_glue_example *x = &ex[count++];
        x->label = -1;
        x->score = ti == T_STSB ? NAN : 0.0f;
        if (cl >= 0) {
            const char *lab = f[cl];
            if (L->label_words == 2) {
                char *endp = NULL;
                double v = strtod(lab, &endp);
                if (!*lab || *endp || !isfinite(v) || v < 0.0 || v > 5.0) {
                    tk_fail(err, "%s: line %zu: bad score \"%.40s\" (expected a number from 0 to 5)", tsv_path,
                            line_no, lab);
                    goto done;
                }
                x->score = (float)v;
            } else if (L->label_words == 1) {
                x->label = tk_glue_label_index(t, lab);
                if (x->label < 0) {
                    tk_fail(err, "%s: line %zu: bad label \"%.40s\" (expected %s%s%s%s%s)", tsv_path, line_no, lab,
                            t->verbalizers[0], t->n_labels > 1 ? " or " : "", t->n_labels > 1 ? t->verbalizers[1] : "",
                            t->n_labels > 2 ? " or " : "", t->n_labels > 2 ? t->verbalizers[2] : "");
                    goto done;
                }
            } else {
                if (!(lab[0] >= '0' && lab[0] < '0' + t->n_labels && lab[1] == '\0')) {
                    tk_fail(err, "%s: line %zu: bad label \"%.40s\" (expected 0 or 1)", tsv_path, line_no, lab);
                    goto done;
                }
                x->label = lab[0] - '0';
            }
        }
        char idbuf[32];
        const char *id = cid >= 0 ? f[cid] : idbuf;
        if (cid < 0) snprintf(idbuf, sizeof idbuf, "%zu", count - 1);
        x->id = strdup(id);
        x->text_a = strdup(f[ca]);
        x->text_b = cb >= 0 ? strdup(f[cb]) : NULL;
        if (!x->id || !x->text_a || (cb >= 0 && !x->text_b)) {
            tk_fail(err, "%s: out of memory", tsv_path);
            goto done;
        }
    }
    if (count == 0) {
        tk_fail(err, "%s: no examples%s", tsv_path, have_header ? " after the header" : " (empty file)");
        goto done;
    }
    rc = 0;
done:
    free(buf);
    if (rc) {
        tk_glue_free(ex, count);
        return -1;
    }
    *out = ex;
    *n = count;
    return 0;
}

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (k < 0) return NULL;
    char *s = malloc((size_t)k + 1);
    if (!s) return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)k + 1, fmt, ap);
    va_end(ap);
    return s;
}

char *tk_glue_instruction(const tk_glue_task *t, const tk_glue_example *e) {
    int ti = task_index(t);
    const char *a = e->text_a ? e->text_a : "", *b = e->text_b ? e->text_b : "";
    switch (ti) {
    case T_COLA:
        return xasprintf("Please determine whether the following sentence is grammatically acceptable, sentence: "
                         "%s\n\nAnswer format: unacceptable/acceptable", a);
    case T_SST2:
        return xasprintf("Please classify the sentiment of the following sentence, sentence: %s\n\nAnswer format: "
                         "negative/positive", a);
    case T_MRPC:
        return xasprintf("Please determine whether the two sentences are semantically equivalent, sentence1: %s "
                         "sentence2: %s\n\nAnswer format: not_equivalent/equivalent", a, b);
    case T_QQP:
        return xasprintf("Please determine whether the two questions are duplicates of each other, question1: %s "
                         "question2: %s\n\nAnswer format: not_duplicate/duplicate", a, b);
    case T_STSB:
        return xasprintf("Please rate the semantic similarity of the two sentences from 0.0 (unrelated) to 5.0 "
                         "(equivalent), sentence1: %s sentence2: %s\n\nAnswer format: a number from 0.0 to 5.0", a, b);
    case T_MNLI_M:
    case T_MNLI_MM:
        return xasprintf("Please determine whether the premise entails the hypothesis, contradicts it, or neither, "
                         "premise: %s hypothesis: %s\n\nAnswer format: entailment/neutral/contradiction", a, b);
    case T_QNLI:
        return xasprintf("Please determine whether the sentence contains the answer to the question, question: %s "
                         "sentence: %s\n\nAnswer format: entailment/not_entailment", a, b);
    case T_RTE:
        return xasprintf("Please determine whether the first sentence entails the second, sentence1: %s "
                         "sentence2: %s\n\nAnswer format: entailment/not_entailment", a, b);
    case T_WNLI:
        return xasprintf("Please determine whether the first sentence entails the second, sentence1: %s "
                         "sentence2: %s\n\nAnswer format: not_entailment/entailment", a, b);
    default:
        return NULL;
    }
}

char *tk_glue_response(const tk_glue_task *t, const tk_glue_example *e) {
    if (t->n_labels == 0) {
        if (!isfinite(e->score)) return strdup("");
        double s = e->score < 0.0f ? 0.0 : e->score > 5.0f ? 5.0 : (double)e->score;
        return xasprintf("%.1f", round(s * 5.0) / 5.0);
    }
    if (e->label < 0 || e->label >= t->n_labels) return strdup("");
    return strdup(t->verbalizers[e->label]);
}
