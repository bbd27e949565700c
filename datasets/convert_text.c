/* convert_text.c: the text formats of `tspeft convert` (convert.h): LLM-Adapters and Alpaca
 * instruction data, GLUE TSV files and pre-tokenized JSONL. */
#include "convert.h"

#include "../text/template.h"
#include "csr_tasks.h"
#include "glue.h"
#include "instruct.h"
#include "jsonl.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const tk_convert_opts *o;
    tk_convert_stats *st;
    tk_tokenizer *tok;
    tk_template tmpl;
    tk_shard_sink sink;
    tk_example ex;
    size_t total; /* records expected (progress) */
} text_ctx;

static void progress(text_ctx *c, int last) {
    if (c->o->progress && (last || c->st->records % 1000 == 0)) c->o->progress(c->o->progress_ctx, c->st->records, c->total);
}

static int open_ctx(text_ctx *c, const tk_convert_opts *o, tk_convert_stats *st, tk_err *err) {
    memset(c, 0, sizeof *c);
    memset(st, 0, sizeof *st);
    c->o = o;
    c->st = st;
    if (o->n_inputs < 1) return tk_fail(err, "--format %s needs at least one --input", o->format);
    if (!o->out) return tk_fail(err, "--out is required");
    if (!o->tokenizer) return tk_fail(err, "--format %s needs --tokenizer (a sentencepiece tokenizer.model)", o->format);
    if (tk_template_from_name(o->template_name ? o->template_name : "alpaca", &c->tmpl, err)) return -1;
    if (!(c->tok = tk_tok_open(o->tokenizer, err))) return -1;
    tk_shard_sink_init(&c->sink, o->out, o->records_per_shard, (uint32_t)tk_tok_vocab_size(c->tok), st);
    return 0;
}

static int close_ctx(text_ctx *c, int ok, tk_err *err) {
    int rc = ok ? tk_shard_sink_close(&c->sink, err) : -1;
    if (!ok) tk_shard_sink_abort(&c->sink);
    if (ok && rc == 0) progress(c, 1);
    tk_example_free(&c->ex);
    tk_tok_free(c->tok);
    return rc;
}

/* One instruction example through the template; meta (consumed) goes with it. */
static int add_instruction(text_ctx *c, const char *instruction, const char *input, const char *output, cJSON *meta,
                           tk_err *err) {
    const tk_convert_opts *o = c->o;
    c->st->records++;
    char *user = NULL;
    tk_turn turn = {instruction, output};
    tk_dialog d = {.turns = &turn, .n_turns = 1};
    if (c->tmpl == TK_TEMPLATE_ALPACA) {
        d.input = input;
    } else if (input && *input) { /* chat templates: the input follows the instruction */
        size_t n = strlen(instruction) + strlen(input) + 2;
        if (!(user = malloc(n))) {
            cJSON_Delete(meta);
            return tk_fail(err, "out of memory");
        }
        snprintf(user, n, "%s\n%s", instruction, input);
        turn.user = user;
    }
    tk_template_opts to = {.train_on_inputs = !o->responses_only, .max_tokens = o->drop_long ? 0 : o->max_len};
    int rc = tk_template_build(&c->ex, c->tok, c->tmpl, TK_PROMPT_TRAIN, &d, &to, err);
    free(user);
    if (rc) {
        cJSON_Delete(meta);
        return -1;
    }
    if (o->max_len && o->drop_long && c->ex.n > o->max_len) {
        c->st->dropped++;
        cJSON_Delete(meta);
        progress(c, 0);
        return 0;
    }
    if (c->ex.n_dropped) c->st->truncated++;
    int targets = 0;
    for (size_t i = 1; i < c->ex.n; i++) targets |= c->ex.labels[i] != TK_IGNORE_INDEX;
    if (!targets) c->st->no_target++;
    char *m = meta ? cJSON_PrintUnformatted(meta) : NULL;
    cJSON_Delete(meta);
    if (meta && !m) return tk_fail(err, "out of memory");
    tk_shard_record rec = {.n_tokens = c->ex.n, .input_ids = c->ex.input_ids, .labels = c->ex.labels,
                           .kinds = c->ex.kinds, .meta_len = m ? strlen(m) : 0, .meta = m};
    rc = c->ex.n ? tk_shard_sink_add(&c->sink, &rec, err) : 0;
    free(m);
    progress(c, 0);
    return rc;
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static cJSON *meta_new(const char *task, const char *path, size_t i) {
    cJSON *m = cJSON_CreateObject();
    if (!m) return NULL;
    char id[512];
    snprintf(id, sizeof id, "%s:%zu", base_name(path), i);
    if (task) cJSON_AddStringToObject(m, "task", task);
    cJSON_AddStringToObject(m, "id", id);
    return m;
}

static int instruct_format(const tk_convert_opts *o, tk_convert_stats *st, int csr, tk_err *err) {
    text_ctx c;
    if (open_ctx(&c, o, st, err)) return close_ctx(&c, 0, err);
    int ok = 1;
    for (size_t f = 0; ok && f < o->n_inputs; f++) {
        const char *path = o->inputs[f];
        const tk_csr_task *task = NULL;
        if (csr) {
            /* an unknown --task (commonsense_170k, a math set) is only a name: no answer choices */
            task = o->task ? tk_csr_task_find(o->task) : tk_csr_task_from_path(path);
        }
        tk_instruct *r;
        size_t n_all, n;
        if (tk_instruct_load(path, &r, &n_all, err)) {
            ok = 0;
            break;
        }
        n = o->limit && n_all > o->limit ? o->limit : n_all;
        c.total += n;
        const char *task_name = task ? task->name : (o->task ? o->task : NULL);
        for (size_t i = 0; ok && i < n; i++) {
            cJSON *m = meta_new(task_name, path, i);
            if (m && r[i].answer[0]) cJSON_AddStringToObject(m, "answer", r[i].answer);
            if (m && task) {
                cJSON *ch = cJSON_AddArrayToObject(m, "choices");
                for (int k = 0; k < task->n_choices; k++) cJSON_AddItemToArray(ch, cJSON_CreateString(task->choices[k]));
            }
            if (!m) {
                ok = !tk_fail(err, "out of memory");
                break;
            }
            if (add_instruction(&c, r[i].instruction, r[i].input, r[i].output, m, err)) {
                char where[4200];
                snprintf(where, sizeof where, "%s: record %zu", path, i);
                tk_err_prefix(err, where);
                ok = 0;
            }
        }
        tk_instruct_free(r, n_all);
    }
    return close_ctx(&c, ok, err);
}

int tk_convert_llm_adapters(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err) {
    return instruct_format(o, st, 1, err);
}

int tk_convert_alpaca(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err) {
    return instruct_format(o, st, 0, err);
}

int tk_convert_glue(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err) {
    const tk_glue_task *t = o->task ? tk_glue_task_find(o->task) : NULL;
    /* no --task: the one every input's path names (glue/RTE/train.tsv) */
    for (size_t f = 0; !o->task && f < o->n_inputs; f++) {
        const tk_glue_task *u = tk_glue_task_from_path(o->inputs[f]);
        if (!u || (t && u != t)) {
            t = NULL;
            break;
        }
        t = u;
    }
    if (!t) return tk_fail(err, "--format glue needs --task cola|sst2|mrpc|qqp|stsb|mnli_m|mnli_mm|qnli|rte|wnli%s%s%s",
                           o->task ? " (not \"" : " (the input paths do not name one task)", o->task ? o->task : "",
                           o->task ? "\")" : "");
    text_ctx c;
    if (open_ctx(&c, o, st, err)) return close_ctx(&c, 0, err);
    int ok = 1;
    for (size_t f = 0; ok && f < o->n_inputs; f++) {
        const char *path = o->inputs[f];
        tk_glue_example *e;
        size_t n_all, n;
        if (tk_glue_load(t, path, &e, &n_all, err)) {
            ok = 0;
            break;
        }
        n = o->limit && n_all > o->limit ? o->limit : n_all;
        c.total += n;
        for (size_t i = 0; ok && i < n; i++) {
            if (e[i].label < 0 && !(t->n_labels == 0 && isfinite(e[i].score))) {
                ok = !tk_fail(err, "%s: example %zu (id %s) has no label: an unlabeled test split cannot be trained on",
                              path, i, e[i].id);
                break;
            }
            char *ins = tk_glue_instruction(t, &e[i]), *resp = tk_glue_response(t, &e[i]);
            cJSON *m = meta_new(t->name, path, i);
            if (!ins || !resp || !m) {
                free(ins);
                free(resp);
                cJSON_Delete(m);
                ok = !tk_fail(err, "out of memory");
                break;
            }
            cJSON_ReplaceItemInObject(m, "id", cJSON_CreateString(e[i].id));
            cJSON_AddStringToObject(m, "answer", resp);
            if (t->n_labels) {
                cJSON_AddNumberToObject(m, "label", e[i].label);
                cJSON *ch = cJSON_AddArrayToObject(m, "choices");
                for (int k = 0; k < t->n_labels; k++) cJSON_AddItemToArray(ch, cJSON_CreateString(t->verbalizers[k]));
            } else {
                cJSON_AddNumberToObject(m, "score", e[i].score);
            }
            if (add_instruction(&c, ins, "", resp, m, err)) {
                char where[4200];
                snprintf(where, sizeof where, "%s: example %zu", path, i);
                tk_err_prefix(err, where);
                ok = 0;
            }
            free(ins);
            free(resp);
        }
        tk_glue_free(e, n_all);
    }
    return close_ctx(&c, ok, err);
}

int tk_convert_jsonl(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err) {
    memset(st, 0, sizeof *st);
    if (o->n_inputs < 1) return tk_fail(err, "--format jsonl needs at least one --input");
    if (!o->out) return tk_fail(err, "--out is required");
    int32_t vocab = o->vocab_size;
    if (o->tokenizer) {
        tk_tokenizer *tok = tk_tok_open(o->tokenizer, err);
        if (!tok) return -1;
        vocab = tk_tok_vocab_size(tok);
        tk_tok_free(tok);
    }
    tk_shard_sink sink;
    tk_shard_sink_init(&sink, o->out, o->records_per_shard, vocab > 0 ? (uint32_t)vocab : 0, st);
    int32_t *ids = NULL, *labels = NULL;
    uint8_t *kinds = NULL;
    size_t cap = 0;
    int ok = 1;
    for (size_t f = 0; ok && f < o->n_inputs; f++) {
        tk_jsonl_data *d = tk_jsonl_load(o->inputs[f], vocab > 0 ? vocab : INT32_MAX, 0, err);
        if (!d) {
            ok = 0;
            break;
        }
        size_t n = o->limit && d->n_rows > o->limit ? o->limit : d->n_rows;
        for (size_t i = 0; ok && i < n; i++) {
            const tk_row *r = &d->rows[i];
            st->records++;
            if (r->len > cap) {
                cap = r->len;
                free(ids);
                free(labels);
                free(kinds);
                ids = malloc(cap * sizeof *ids);
                labels = malloc(cap * sizeof *labels);
                kinds = malloc(cap);
                if (!ids || !labels || !kinds) {
                    ok = !tk_fail(err, "out of memory");
                    break;
                }
            }
            size_t k = 0; /* real tokens only (attention_mask 1) */
            for (size_t t = 0; t < r->len; t++) {
                if (!r->attention_mask[t]) continue;
                ids[k] = r->input_ids[t];
                labels[k] = r->labels[t];
                kinds[k] = r->labels[t] == TK_SHARD_LABEL_IGNORE ? TK_KIND_PROMPT : TK_KIND_RESPONSE;
                k++;
            }
            if (o->max_len && k > o->max_len) {
                if (o->drop_long) {
                    st->dropped++;
                    continue;
                }
                k = o->max_len;
                st->truncated++;
            }
            if (k == 0) continue;
            int targets = 0;
            for (size_t t = 1; t < k; t++) targets |= labels[t] != TK_SHARD_LABEL_IGNORE;
            if (!targets) st->no_target++;
            tk_shard_record rec = {.n_tokens = k, .input_ids = ids, .labels = labels, .kinds = kinds};
            if (tk_shard_sink_add(&sink, &rec, err)) {
                char where[4200];
                snprintf(where, sizeof where, "%s: line %zu", o->inputs[f], i + 1);
                tk_err_prefix(err, where);
                ok = 0;
            }
            if (o->progress && st->records % 1000 == 0) o->progress(o->progress_ctx, st->records, 0);
        }
        tk_jsonl_free(d);
    }
    free(ids);
    free(labels);
    free(kinds);
    if (!ok) {
        tk_shard_sink_abort(&sink);
        return -1;
    }
    if (tk_shard_sink_close(&sink, err)) return -1;
    if (o->progress) o->progress(o->progress_ctx, st->records, st->records);
    return 0;
}
