/* text_golden.c: the C side of the tokenizer / template golden test (tests/text/make_golden.py).
 *
 *   text_golden MODEL REQUESTS.json OUT.json
 *
 * Opens MODEL with tk_tok_open (on failure: the error on one line on stderr, exit 1), runs every
 * request of REQUESTS.json through the C API and writes what it got to OUT.json; the Python side
 * compares that with python sentencepiece and the reference prompt implementations. Requests:
 *   {"encode":    [{"text": S, "bos": 0|1, "eos": 0|1}, ...],
 *    "decode":    [[id, ...], ...],
 *    "piece_to_id": [S, ...],
 *    "templates": [{"template": NAME, "mode": "train"|"eval", "system": S|null, "input": S|null,
 *                   "turns": [[user|null, assistant|null], ...], "train_on_inputs": 0|1,
 *                   "max_tokens": N}, ...]}
 * Output: vocab_size, bos, eos, pad, unk, pieces (every id's piece), is_control, and per request
 * {"ids", "begin", "end"} / {"text", "len", "bytes"} / id / {"text", "text_specials", "input_ids", "labels",
 * "kinds", "spans", "seg_kinds", "n_straddle", "n_dropped"}, or {"error": MSG} where the C API
 * refused. Exit 0 when every request ran (refusals included), 2 on bad usage or bad request files.
 */
#include "common.h"
#include "text/template.h"
#include "text/tokenizer.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static cJSON *int_array(const int32_t *v, size_t n) {
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; a && i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((double)v[i]));
    return a;
}

static cJSON *u32_array(const uint32_t *v, size_t n) {
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; a && i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((double)v[i]));
    return a;
}

static const char *str_or_null(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int int_or(const cJSON *o, const char *key, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? (int)v->valuedouble : cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

static cJSON *error_object(const char *msg) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", msg);
    return o;
}

static cJSON *run_encode(const tk_tokenizer *tok, const cJSON *req) {
    const char *text = str_or_null(req, "text");
    if (!text) return error_object("request has no text");
    tk_err err = {0};
    tk_ids ids = {0};
    if (tk_tok_encode(tok, text, strlen(text), int_or(req, "bos", 0), int_or(req, "eos", 0), &ids, &err) != 0) {
        tk_ids_free(&ids);
        return error_object(err.msg);
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "ids", int_array(ids.ids, ids.n));
    cJSON_AddItemToObject(o, "begin", u32_array(ids.begin, ids.n));
    cJSON_AddItemToObject(o, "end", u32_array(ids.end, ids.n));
    tk_ids_free(&ids);
    return o;
}

static cJSON *run_decode(const tk_tokenizer *tok, const cJSON *req) {
    size_t n = (size_t)cJSON_GetArraySize(req);
    int32_t *ids = calloc(n ? n : 1, sizeof *ids);
    if (!ids) return error_object("out of memory");
    size_t i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, req) ids[i++] = (int32_t)v->valuedouble;
    tk_err err = {0};
    size_t len = 0;
    char *text = tk_tok_decode(tok, ids, n, &len, &err);
    free(ids);
    if (!text) return error_object(err.msg);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "text", text); /* up to a NUL byte; "bytes" has everything */
    cJSON_AddNumberToObject(o, "len", (double)len);
    cJSON *bytes = cJSON_AddArrayToObject(o, "bytes");
    for (size_t k = 0; k < len; k++) cJSON_AddItemToArray(bytes, cJSON_CreateNumber((unsigned char)text[k]));
    free(text);
    return o;
}

static cJSON *run_template(const tk_tokenizer *tok, const cJSON *req) {
    tk_err err = {0};
    tk_template t;
    if (tk_template_from_name(str_or_null(req, "template"), &t, &err) != 0) return error_object(err.msg);
    const char *mode_s = str_or_null(req, "mode");
    tk_prompt_mode mode = mode_s && strcmp(mode_s, "eval") == 0 ? TK_PROMPT_EVAL : TK_PROMPT_TRAIN;
    const cJSON *jturns = cJSON_GetObjectItemCaseSensitive(req, "turns");
    size_t n_turns = (size_t)cJSON_GetArraySize(jturns);
    tk_turn *turns = calloc(n_turns ? n_turns : 1, sizeof *turns);
    if (!turns) return error_object("out of memory");
    size_t i = 0;
    const cJSON *jt;
    cJSON_ArrayForEach(jt, jturns) {
        const cJSON *u = cJSON_GetArrayItem(jt, 0), *a = cJSON_GetArrayItem(jt, 1);
        turns[i].user = cJSON_IsString(u) ? u->valuestring : NULL;
        turns[i].assistant = cJSON_IsString(a) ? a->valuestring : NULL;
        i++;
    }
    tk_dialog d = {.system = str_or_null(req, "system"), .input = str_or_null(req, "input"), .turns = turns,
                   .n_turns = n_turns};
    tk_template_opts opts = {.train_on_inputs = int_or(req, "train_on_inputs", 0),
                             .max_tokens = (size_t)int_or(req, "max_tokens", 0)};
    tk_segments segs = {0};
    tk_example ex = {0};
    tk_span *spans = NULL;
    char *plain = NULL, *specials = NULL;
    cJSON *o = NULL;
    if (tk_template_segments(&segs, t, mode, &d, &err) != 0) goto fail;
    spans = calloc(segs.n ? segs.n : 1, sizeof *spans);
    if (!spans) {
        tk_fail(&err, "out of memory");
        goto fail;
    }
    if (tk_encode_segments(&ex, spans, tok, segs.segs, segs.n, &opts, &err) != 0) goto fail;
    plain = tk_segments_render(&segs, 0, NULL, &err);
    specials = tk_segments_render(&segs, 1, NULL, &err);
    if (!plain || !specials) goto fail;
    o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "text", plain);
    cJSON_AddStringToObject(o, "text_specials", specials);
    cJSON_AddItemToObject(o, "input_ids", int_array(ex.input_ids, ex.n));
    cJSON_AddItemToObject(o, "labels", int_array(ex.labels, ex.n));
    cJSON *kinds = cJSON_AddArrayToObject(o, "kinds");
    for (size_t k = 0; k < ex.n; k++) cJSON_AddItemToArray(kinds, cJSON_CreateNumber(ex.kinds[k]));
    cJSON *jspans = cJSON_AddArrayToObject(o, "spans");
    cJSON *jsk = cJSON_AddArrayToObject(o, "seg_kinds");
    for (size_t k = 0; k < segs.n; k++) {
        cJSON *pair = cJSON_CreateArray();
        cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)spans[k].begin));
        cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)spans[k].end));
        cJSON_AddItemToArray(jspans, pair);
        cJSON_AddItemToArray(jsk, cJSON_CreateNumber(segs.segs[k].kind));
    }
    cJSON_AddNumberToObject(o, "n_straddle", (double)ex.n_straddle);
    cJSON_AddNumberToObject(o, "n_dropped", (double)ex.n_dropped);
fail:
    if (!o) o = error_object(err.msg);
    free(plain);
    free(specials);
    free(spans);
    free(turns);
    tk_example_free(&ex);
    tk_segments_free(&segs);
    return o;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: text_golden MODEL REQUESTS.json OUT.json\n");
        return 2;
    }
    tk_err err = {0};
    tk_tokenizer *tok = tk_tok_open(argv[1], &err);
    if (!tok) {
        fprintf(stderr, "text_golden: %s\n", err.msg);
        return 1;
    }
    size_t len = 0;
    char *buf = tk_read_file(argv[2], &len, &err);
    if (!buf) {
        fprintf(stderr, "text_golden: %s\n", err.msg);
        tk_tok_free(tok);
        return 2;
    }
    cJSON *req = cJSON_ParseWithLength(buf, len);
    free(buf);
    if (!req) {
        fprintf(stderr, "text_golden: %s: not JSON\n", argv[2]);
        tk_tok_free(tok);
        return 2;
    }
    cJSON *out = cJSON_CreateObject();
    int32_t V = tk_tok_vocab_size(tok);
    cJSON_AddNumberToObject(out, "vocab_size", V);
    cJSON_AddNumberToObject(out, "bos", tk_tok_bos_id(tok));
    cJSON_AddNumberToObject(out, "eos", tk_tok_eos_id(tok));
    cJSON_AddNumberToObject(out, "pad", tk_tok_pad_id(tok));
    cJSON_AddNumberToObject(out, "unk", tk_tok_unk_id(tok));
    cJSON *pieces = cJSON_AddArrayToObject(out, "pieces");
    cJSON *control = cJSON_AddArrayToObject(out, "is_control");
    int roundtrip_ok = 1;
    for (int32_t id = 0; id < V; id++) {
        const char *p = tk_tok_id_to_piece(tok, id);
        cJSON_AddItemToArray(pieces, cJSON_CreateString(p ? p : ""));
        cJSON_AddItemToArray(control, cJSON_CreateNumber(tk_tok_is_control(tok, id)));
        if (!p || tk_tok_piece_to_id(tok, p, strlen(p)) != id) roundtrip_ok = 0;
    }
    cJSON_AddBoolToObject(out, "piece_id_roundtrip", roundtrip_ok);
    cJSON_AddBoolToObject(out, "out_of_range_piece_is_null",
                          tk_tok_id_to_piece(tok, -1) == NULL && tk_tok_id_to_piece(tok, V) == NULL);

    const cJSON *item;
    cJSON *a = cJSON_AddArrayToObject(out, "encode");
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(req, "encode")) cJSON_AddItemToArray(a, run_encode(tok, item));
    a = cJSON_AddArrayToObject(out, "decode");
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(req, "decode")) cJSON_AddItemToArray(a, run_decode(tok, item));
    a = cJSON_AddArrayToObject(out, "piece_to_id");
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(req, "piece_to_id")) {
        const char *p = cJSON_IsString(item) ? item->valuestring : "";
        cJSON_AddItemToArray(a, cJSON_CreateNumber(tk_tok_piece_to_id(tok, p, strlen(p))));
    }
    a = cJSON_AddArrayToObject(out, "templates");
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(req, "templates")) cJSON_AddItemToArray(a, run_template(tok, item));
    cJSON_Delete(req);

    char *text = cJSON_PrintUnformatted(out);
    cJSON_Delete(out);
    tk_tok_free(tok);
    if (!text || tk_write_file_atomic(argv[3], text, strlen(text), &err) != 0) {
        fprintf(stderr, "text_golden: %s\n", text ? err.msg : "out of memory");
        free(text);
        return 2;
    }
    free(text);
    return 0;
}
