/* eval_tool.c: the C side of the evaluation unit tests (tests/e2e/test_eval_units.py and
 * tests/parity/test_eval_parity.py), found beside tspeft as BUILD/tests/eval_tool.
 *
 *   eval_tool REQUESTS.json OUT.json
 *
 * Runs every request through src/eval and src/model and writes what it got to OUT.json. Requests:
 *   {"metrics":  [{"pred": [int], "gold": [int], "x": [num], "y": [num]}, ...],
 *    "extract":  [{"text": S, "alts": [S, ...]}, ...],
 *    "response": [S, ...],
 *    "pattern":  [[choice, ...], ...],
 *    "model": DIR, "adapter": DIR or absent,
 *    "generate": [{"ids": [int], "max_new": N, "eos": E, "beams": K}, ...],  K = 0: tk_llama_generate
 *    "loglik":   [{"seqs": [[int], ...], "begins": [int, ...]}, ...]}
 * Output, per request list: metrics {"acc","f1","mcc","pearson","spearman"} (NaN as null), extract
 * S or null, response S, pattern [S], generate {"ids": [int], "score": x} or {"error": MSG}, loglik
 * {"lp": [x], "greedy": [0|1]} or {"error": MSG}. Exit 0 when every request ran, 1 when the model
 * could not be loaded, 2 on bad usage or a bad request file.
 */
#include "common.h"
#include "src/eval/answer.h"
#include "src/eval/beam.h"
#include "src/eval/loglik.h"
#include "src/eval/metrics.h"
#include "src/model/llama.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t arr_len(const cJSON *a) { return cJSON_IsArray(a) ? (size_t)cJSON_GetArraySize(a) : 0; }

static int *ints(const cJSON *a, size_t *n) {
    *n = arr_len(a);
    int *v = calloc(*n + 1, sizeof *v);
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, a) v[i++] = (int)it->valuedouble;
    return v;
}

static double *nums(const cJSON *a, size_t *n) {
    *n = arr_len(a);
    double *v = calloc(*n + 1, sizeof *v);
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, a) v[i++] = it->valuedouble;
    return v;
}

static int32_t *ids32(const cJSON *a, size_t *n) {
    *n = arr_len(a);
    int32_t *v = calloc(*n + 1, sizeof *v);
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, a) v[i++] = (int32_t)it->valuedouble;
    return v;
}

static cJSON *error_object(const char *msg) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", msg);
    return o;
}

static cJSON *run_metrics(const cJSON *req) {
    size_t np, ng, nx, ny;
    int *p = ints(cJSON_GetObjectItemCaseSensitive(req, "pred"), &np);
    int *g = ints(cJSON_GetObjectItemCaseSensitive(req, "gold"), &ng);
    double *x = nums(cJSON_GetObjectItemCaseSensitive(req, "x"), &nx);
    double *y = nums(cJSON_GetObjectItemCaseSensitive(req, "y"), &ny);
    cJSON *o = cJSON_CreateObject();
    size_t n = np < ng ? np : ng, m = nx < ny ? nx : ny;
    cJSON_AddNumberToObject(o, "acc", tk_metric_accuracy(p, g, n));
    cJSON_AddNumberToObject(o, "f1", tk_metric_f1(p, g, n));
    cJSON_AddNumberToObject(o, "mcc", tk_metric_mcc(p, g, n));
    cJSON_AddNumberToObject(o, "pearson", tk_metric_pearson(x, y, m));
    double rho;
    tk_err err = {0};
    if (tk_metric_spearman(&rho, x, y, m, &err) == 0) cJSON_AddNumberToObject(o, "spearman", rho);
    free(p);
    free(g);
    free(x);
    free(y);
    return o;
}

static cJSON *run_extract(const cJSON *req) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(req, "text"), *a = cJSON_GetObjectItemCaseSensitive(req, "alts");
    const char *alts[64];
    int n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, a) if (n < 64 && cJSON_IsString(it)) alts[n++] = it->valuestring;
    size_t len;
    const char *text = cJSON_IsString(t) ? t->valuestring : "";
    const char *hit = tk_answer_extract(text, strlen(text), alts, n, &len);
    if (!hit) return cJSON_CreateNull();
    char *s = calloc(len + 1, 1);
    memcpy(s, hit, len);
    cJSON *o = cJSON_CreateString(s);
    free(s);
    return o;
}

static cJSON *run_generate(tk_llama *m, const cJSON *req) {
    size_t n;
    int32_t *ids = ids32(cJSON_GetObjectItemCaseSensitive(req, "ids"), &n);
    const cJSON *mn = cJSON_GetObjectItemCaseSensitive(req, "max_new"), *e = cJSON_GetObjectItemCaseSensitive(req, "eos"),
                *bm = cJSON_GetObjectItemCaseSensitive(req, "beams");
    size_t max_new = cJSON_IsNumber(mn) ? (size_t)mn->valuedouble : 8;
    int32_t eos = cJSON_IsNumber(e) ? (int32_t)e->valuedouble : -1;
    size_t beams = cJSON_IsNumber(bm) ? (size_t)bm->valuedouble : 0;
    int32_t *out = calloc(max_new + 1, sizeof *out);
    tk_err err = {0};
    double score = 0.0;
    long got;
    if (beams == 0) got = tk_llama_generate(m, ids, n, max_new, eos, out, &err);
    else {
        tk_beam_opts o = {.beams = beams, .max_new = max_new, .eos = eos, .length_penalty = 1.0};
        got = tk_beam_search(m, ids, n, &o, out, &score, &err);
    }
    cJSON *r;
    if (got < 0) r = error_object(err.msg);
    else {
        r = cJSON_CreateObject();
        cJSON *a = cJSON_AddArrayToObject(r, "ids");
        for (long i = 0; i < got; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(out[i]));
        cJSON_AddNumberToObject(r, "score", score);
    }
    free(ids);
    free(out);
    return r;
}

static cJSON *run_loglik(tk_loglik *ll, const cJSON *req) {
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(req, "seqs");
    size_t B = arr_len(s), nb;
    int32_t **seqs = calloc(B + 1, sizeof *seqs);
    size_t *lens = calloc(B + 1, sizeof *lens);
    int *begins_i = ints(cJSON_GetObjectItemCaseSensitive(req, "begins"), &nb);
    size_t *begins = calloc(B + 1, sizeof *begins);
    double *lp = calloc(B + 1, sizeof *lp);
    int *greedy = calloc(B + 1, sizeof *greedy);
    size_t b = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, s) {
        seqs[b] = ids32(it, &lens[b]);
        begins[b] = b < nb ? (size_t)begins_i[b] : 1;
        b++;
    }
    tk_err err = {0};
    cJSON *r;
    if (tk_loglik_score(ll, (const int32_t *const *)seqs, lens, begins, B, lp, greedy, &err)) r = error_object(err.msg);
    else {
        r = cJSON_CreateObject();
        cJSON *a = cJSON_AddArrayToObject(r, "lp"), *g = cJSON_AddArrayToObject(r, "greedy");
        for (size_t i = 0; i < B; i++) {
            cJSON_AddItemToArray(a, cJSON_CreateNumber(lp[i]));
            cJSON_AddItemToArray(g, cJSON_CreateNumber(greedy[i]));
        }
    }
    for (size_t i = 0; i < B; i++) free(seqs[i]);
    free(seqs);
    free(lens);
    free(begins_i);
    free(begins);
    free(lp);
    free(greedy);
    return r;
}

static tk_llama *load_model(const cJSON *root, tk_err *err) {
    const cJSON *md = cJSON_GetObjectItemCaseSensitive(root, "model"), *ad = cJSON_GetObjectItemCaseSensitive(root, "adapter");
    const char *adapter = cJSON_IsString(ad) ? ad->valuestring : NULL;
    tk_llama *m = tk_llama_open(md->valuestring, err);
    if (!m) return NULL;
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = TK_ADAPTER_NONE;
    if (adapter) {
        char path[4096];
        snprintf(path, sizeof path, "%s/adapter_config.json", adapter);
        if (tk_peft_config_load(&pc, path, err)) {
            tk_llama_close(m);
            return NULL;
        }
    }
    int rc = tk_llama_attach(m, &pc, adapter, 0, err);
    tk_peft_config_free(&pc);
    if (rc) {
        tk_llama_close(m);
        return NULL;
    }
    return m;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: eval_tool REQUESTS.json OUT.json\n");
        return 2;
    }
    tk_err err = {0};
    size_t len;
    char *text = tk_read_file(argv[1], &len, &err);
    if (!text) {
        fprintf(stderr, "eval_tool: %s\n", err.msg);
        return 2;
    }
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(root)) {
        fprintf(stderr, "eval_tool: %s: not a JSON object\n", argv[1]);
        cJSON_Delete(root);
        return 2;
    }
    cJSON *out = cJSON_CreateObject();
    const cJSON *it;
    cJSON *a = cJSON_AddArrayToObject(out, "metrics");
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(root, "metrics")) cJSON_AddItemToArray(a, run_metrics(it));
    a = cJSON_AddArrayToObject(out, "extract");
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(root, "extract")) cJSON_AddItemToArray(a, run_extract(it));
    a = cJSON_AddArrayToObject(out, "response");
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(root, "response")) {
        const char *s = cJSON_IsString(it) ? it->valuestring : "";
        char *r = tk_answer_response(s, strlen(s), NULL, &err);
        cJSON_AddItemToArray(a, cJSON_CreateString(r ? r : ""));
        free(r);
    }
    a = cJSON_AddArrayToObject(out, "pattern");
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(root, "pattern")) {
        const char *ch[16], *alts[16];
        int n = 0;
        const cJSON *c;
        cJSON_ArrayForEach(c, it) if (n < 16 && cJSON_IsString(c)) ch[n++] = c->valuestring;
        int k = tk_answer_pattern(alts, 16, ch, n);
        cJSON *p = cJSON_CreateArray();
        for (int i = 0; i < k; i++) cJSON_AddItemToArray(p, cJSON_CreateString(alts[i]));
        cJSON_AddItemToArray(a, p);
    }
    int status = 0;
    if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(root, "model"))) {
        tk_llama *m = load_model(root, &err);
        if (!m) {
            fprintf(stderr, "eval_tool: %s\n", err.msg);
            status = 1;
        } else {
            a = cJSON_AddArrayToObject(out, "generate");
            cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(root, "generate")) cJSON_AddItemToArray(a, run_generate(m, it));
            tk_loglik *ll = tk_loglik_new(m, &err);
            a = cJSON_AddArrayToObject(out, "loglik");
            cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(root, "loglik")) cJSON_AddItemToArray(a, run_loglik(ll, it));
            tk_loglik_free(ll);
            tk_llama_close(m);
        }
    }
    char *s = cJSON_Print(out);
    if (!s || tk_write_file_atomic(argv[2], s, strlen(s), &err)) {
        fprintf(stderr, "eval_tool: %s\n", s ? err.msg : "out of memory");
        status = 2;
    }
    free(s);
    cJSON_Delete(out);
    cJSON_Delete(root);
    return status;
}
