/* template.c: prompt templates, segments, and their tokenization with spans (see template.h).
 *
 * Template text sources (byte-exact; tests/test_text_template.c asserts the rendered bytes):
 *   LLM-Adapters (github.com/AGI-Edgerunners/LLM-Adapters):
 *     finetune.py, generate_prompt(data_point): the TRAINING prompt. Its f-string lines are indented
 *       by 16 spaces, blank lines inside it hold the same 16 spaces, the first line ends with
 *       "the request. " (with input) or "the request.  " (without; two spaces), and the output
 *       follows "### Response:\n" + 16 spaces directly.
 *     commonsense_evaluate.py, generate_prompt(instruction, input=None): the EVALUATION prompt. Same
 *       16-space indentation, but its blank lines are empty, the first line ends "the request."
 *       (with input) or "the request. " (without; one space), and it ends after "### Response:\n"
 *       + 16 spaces.
 *   LLaVA (github.com/haotian-liu/LLaVA) llava/conversation.py: conv_vicuna_v1 / conv_llava_v1
 *     (SeparatorStyle.TWO, roles "USER"/"ASSISTANT", sep " ", sep2 "</s>") and get_prompt().
 *   LLaMA-2 (github.com/meta-llama/llama) llama/generation.py chat_completion: B_INST "[INST]",
 *     E_INST "[/INST]", B_SYS "<<SYS>>\n", E_SYS "\n<</SYS>>\n\n", one encode(bos, eos) per round of
 *     f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ".
 */
#include "template.h"

#include <stdlib.h>
#include <string.h>

/* ---- template strings ------------------------------------------------------------------------ */

#define IND16 "                " /* the 16-space indentation of LLM-Adapters' f-strings */

/* finetune.py (training): text before the instruction, between the fields, before the output. */
static const char ALPACA_TRAIN_HEAD_INPUT[] =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n" IND16 "### Instruction:\n" IND16;
static const char ALPACA_TRAIN_HEAD[] =
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.  \n\n" IND16 "### Instruction:\n" IND16;
static const char ALPACA_TRAIN_TO_INPUT[] = "\n" IND16 "\n" IND16 "### Input:\n" IND16;
static const char ALPACA_TRAIN_TO_RESPONSE[] = "\n" IND16 "\n" IND16 "### Response:\n" IND16;

/* commonsense_evaluate.py (evaluation). */
static const char ALPACA_EVAL_HEAD_INPUT[] =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n" IND16 "### Instruction:\n" IND16;
static const char ALPACA_EVAL_HEAD[] =
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request. \n\n" IND16 "### Instruction:\n" IND16;
static const char ALPACA_EVAL_TO_INPUT[] = "\n\n" IND16 "### Input:\n" IND16;
static const char ALPACA_EVAL_TO_RESPONSE[] = "\n\n" IND16 "### Response:\n" IND16;

/* LLaVA conversation.py. */
static const char VICUNA_V1_SYSTEM[] = "A chat between a curious user and an artificial intelligence assistant. "
                                       "The assistant gives helpful, detailed, and polite answers to the user's "
                                       "questions.";
static const char LLAVA_V1_SYSTEM[] = "A chat between a curious human and an artificial intelligence assistant. "
                                      "The assistant gives helpful, detailed, and polite answers to the human's "
                                      "questions.";

/* ---- small helpers --------------------------------------------------------------------------- */

const char *tk_kind_name(int kind) {
    switch (kind) {
    case TK_KIND_PAD: return "pad";
    case TK_KIND_PROMPT: return "prompt";
    case TK_KIND_RESPONSE: return "response";
    case TK_KIND_IMAGE: return "image";
    default: return "?";
    }
}

static const char *const TEMPLATE_NAMES[] = {"plain", "alpaca", "vicuna_v1", "llava_v1", "llama2"};
#define N_TEMPLATES (sizeof TEMPLATE_NAMES / sizeof TEMPLATE_NAMES[0])

const char *tk_template_name(tk_template t) {
    return (unsigned)t < N_TEMPLATES ? TEMPLATE_NAMES[t] : "?";
}

int tk_template_from_name(const char *name, tk_template *out, tk_err *err) {
    for (size_t i = 0; name && i < N_TEMPLATES; i++) {
        if (strcmp(name, TEMPLATE_NAMES[i]) == 0) {
            *out = (tk_template)i;
            return 0;
        }
    }
    return tk_fail(err, "unknown prompt template '%s' (expected plain, alpaca, vicuna_v1, llava_v1 or llama2)",
                   name ? name : "(null)");
}

static int is_ascii_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

/* ---- examples -------------------------------------------------------------------------------- */

void tk_example_free(tk_example *ex) {
    if (!ex) return;
    free(ex->input_ids);
    free(ex->labels);
    free(ex->kinds);
    memset(ex, 0, sizeof *ex);
}

static int example_reserve(tk_example *ex, size_t extra, tk_err *err) {
    if (extra > SIZE_MAX - ex->n) return tk_fail(err, "example: %zu + %zu tokens overflow", ex->n, extra);
    size_t need = ex->n + extra;
    if (need <= ex->cap && ex->input_ids && ex->labels && ex->kinds) return 0;
    size_t cap = ex->cap > 64 ? ex->cap : 64;
    while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    size_t b32;
    if (tk_mul_size(cap, sizeof(int32_t), &b32) != 0) return tk_fail(err, "example: %zu tokens do not fit", cap);
    int32_t *a = realloc(ex->input_ids, b32);
    if (!a) return tk_fail(err, "example: out of memory for %zu tokens", cap);
    ex->input_ids = a;
    int32_t *l = realloc(ex->labels, b32);
    if (!l) return tk_fail(err, "example: out of memory for %zu tokens", cap);
    ex->labels = l;
    uint8_t *k = realloc(ex->kinds, cap);
    if (!k) return tk_fail(err, "example: out of memory for %zu tokens", cap);
    ex->kinds = k;
    ex->cap = cap;
    return 0;
}

/* Appends one token; capacity must have been reserved. */
static void example_push(tk_example *ex, int32_t id, tk_kind kind, int train_on_inputs) {
    int trained = kind == TK_KIND_RESPONSE || (kind == TK_KIND_PROMPT && train_on_inputs);
    ex->input_ids[ex->n] = id;
    ex->labels[ex->n] = trained ? id : TK_IGNORE_INDEX;
    ex->kinds[ex->n] = (uint8_t)kind;
    ex->n++;
}

int tk_example_pad(tk_example *ex, size_t len, int32_t pad_id, tk_err *err) {
    if (!ex) return tk_fail(err, "tk_example_pad: NULL example");
    if (ex->n > len) return tk_fail(err, "example of %zu tokens is longer than the padded length %zu", ex->n, len);
    if (example_reserve(ex, len - ex->n, err) != 0) return -1;
    while (ex->n < len) {
        ex->input_ids[ex->n] = pad_id;
        ex->labels[ex->n] = TK_IGNORE_INDEX;
        ex->kinds[ex->n] = TK_KIND_PAD;
        ex->n++;
    }
    return 0;
}

/* ---- tokenizing segments --------------------------------------------------------------------- */

static int check_segment(const tk_segment *s, size_t i, tk_err *err) {
    switch (s->type) {
    case TK_SEG_TEXT:
    case TK_SEG_BOS:
    case TK_SEG_EOS:
        if (s->kind != TK_KIND_PROMPT && s->kind != TK_KIND_RESPONSE)
            return tk_fail(err, "segment %zu: kind %s (%d) where prompt or response was expected", i,
                           tk_kind_name(s->kind), (int)s->kind);
        if (s->type == TK_SEG_TEXT && !s->text && s->len)
            return tk_fail(err, "segment %zu: NULL text of %zu bytes", i, s->len);
        return 0;
    case TK_SEG_IMAGE:
        if (s->kind != TK_KIND_IMAGE)
            return tk_fail(err, "segment %zu: an image segment of kind %s (%d)", i, tk_kind_name(s->kind),
                           (int)s->kind);
        return 0;
    default: return tk_fail(err, "segment %zu: unknown segment type %d", i, (int)s->type);
    }
}

/* Encodes the text run segs[i0..i1) (one sentencepiece call over the concatenated bytes) and appends
 * its tokens to ex, attributing each to the segment holding its last source byte. */
static int encode_run(tk_example *ex, tk_span *spans, const tk_tokenizer *tok, const tk_segment *segs, size_t i0,
                      size_t i1, int train_on_inputs, tk_ids *scratch, char **joined, size_t *joined_cap,
                      size_t **bnd, size_t *bnd_cap, tk_err *err) {
    size_t nrun = i1 - i0;
    /* Boundaries: segment i0+r holds run bytes [bnd[r], bnd[r+1]). */
    if (nrun + 1 > *bnd_cap) {
        size_t *nb = realloc(*bnd, (nrun + 1) * sizeof **bnd);
        if (!nb) return tk_fail(err, "templates: out of memory for %zu segment bounds", nrun + 1);
        *bnd = nb;
        *bnd_cap = nrun + 1;
    }
    size_t total = 0;
    for (size_t r = 0; r < nrun; r++) {
        (*bnd)[r] = total;
        if (segs[i0 + r].len > SIZE_MAX - total) return tk_fail(err, "templates: text length overflow");
        total += segs[i0 + r].len;
    }
    (*bnd)[nrun] = total;
    const char *text;
    if (nrun == 1) {
        text = segs[i0].text;
    } else {
        if (total + 1 > *joined_cap) {
            char *nj = realloc(*joined, total + 1);
            if (!nj) return tk_fail(err, "templates: out of memory for %zu bytes of text", total + 1);
            *joined = nj;
            *joined_cap = total + 1;
        }
        for (size_t r = 0; r < nrun; r++)
            if (segs[i0 + r].len) memcpy(*joined + (*bnd)[r], segs[i0 + r].text, segs[i0 + r].len);
        text = *joined;
    }
    scratch->n = 0;
    if (tk_tok_encode(tok, text, total, 0, 0, scratch, err) != 0) return -1;
    if (example_reserve(ex, scratch->n, err) != 0) return -1;

    size_t r = 0; /* run segment the current token belongs to; never moves backwards */
    if (spans) spans[i0].begin = ex->n;
    for (size_t t = 0; t < scratch->n; t++) {
        size_t b = scratch->begin[t], e = scratch->end[t];
        size_t anchor = e > b ? e - 1 : b;
        if (total > 0 && anchor >= total) anchor = total - 1;
        size_t k = r;
        while (k + 1 < nrun && (*bnd)[k + 1] <= anchor) k++;
        if (b < (*bnd)[k]) ex->n_straddle++;
        while (r < k) {
            if (spans) {
                spans[i0 + r].end = ex->n;
                spans[i0 + r + 1].begin = ex->n;
            }
            r++;
        }
        example_push(ex, scratch->ids[t], segs[i0 + k].kind, train_on_inputs);
    }
    while (r + 1 < nrun) {
        if (spans) {
            spans[i0 + r].end = ex->n;
            spans[i0 + r + 1].begin = ex->n;
        }
        r++;
    }
    if (spans) spans[i1 - 1].end = ex->n;
    return 0;
}

int tk_encode_segments(tk_example *ex, tk_span *spans, const tk_tokenizer *tok, const tk_segment *segs,
                       size_t n_segs, const tk_template_opts *opts, tk_err *err) {
    if (!ex || !tok || (!segs && n_segs)) return tk_fail(err, "tk_encode_segments: NULL argument");
    tk_template_opts o = {0};
    if (opts) o = *opts;
    for (size_t i = 0; i < n_segs; i++)
        if (check_segment(&segs[i], i, err) != 0) return -1;
    ex->n = 0;
    ex->n_dropped = 0;
    ex->n_straddle = 0;
    tk_ids scratch = {0};
    char *joined = NULL;
    size_t joined_cap = 0, bnd_cap = 0;
    size_t *bnd = NULL;
    int rc = 0;
    size_t i = 0;
    while (i < n_segs && rc == 0) {
        const tk_segment *s = &segs[i];
        if (s->type == TK_SEG_TEXT) {
            size_t j = i + 1;
            while (j < n_segs && segs[j].type == TK_SEG_TEXT && !segs[j].fresh) j++;
            rc = encode_run(ex, spans, tok, segs, i, j, o.train_on_inputs, &scratch, &joined, &joined_cap, &bnd,
                            &bnd_cap, err);
            i = j;
            continue;
        }
        size_t start = ex->n;
        if (s->type == TK_SEG_IMAGE) {
            rc = example_reserve(ex, s->n_image, err);
            for (size_t k = 0; rc == 0 && k < s->n_image; k++) example_push(ex, TK_IMAGE_TOKEN_ID, TK_KIND_IMAGE, 0);
        } else {
            int32_t id = s->type == TK_SEG_BOS ? tk_tok_bos_id(tok) : tk_tok_eos_id(tok);
            if (id < 0) {
                rc = tk_fail(err, "%s: segment %zu needs a %s token and the model has none", tk_tok_path(tok), i,
                             s->type == TK_SEG_BOS ? "BOS" : "EOS");
            } else if ((rc = example_reserve(ex, 1, err)) == 0) {
                example_push(ex, id, s->kind, o.train_on_inputs);
            }
        }
        if (spans) {
            spans[i].begin = start;
            spans[i].end = ex->n;
        }
        i++;
    }
    tk_ids_free(&scratch);
    free(joined);
    free(bnd);
    if (rc != 0) return -1;
    if (o.max_tokens > 0 && ex->n > o.max_tokens) {
        ex->n_dropped = ex->n - o.max_tokens;
        ex->n = o.max_tokens;
        for (size_t k = 0; spans && k < n_segs; k++) {
            if (spans[k].begin > ex->n) spans[k].begin = ex->n;
            if (spans[k].end > ex->n) spans[k].end = ex->n;
        }
    }
    return 0;
}

/* ---- building segments ----------------------------------------------------------------------- */

void tk_segments_free(tk_segments *s) {
    if (!s) return;
    free(s->segs);
    free(s->buf);
    memset(s, 0, sizeof *s);
}

/* Opens a new segment at the end of s; TEXT segments then grow with seg_add. */
static int seg_open(tk_segments *s, tk_seg_type type, tk_kind kind, int fresh, tk_err *err) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 16;
        tk_segment *ns = realloc(s->segs, cap * sizeof *ns);
        if (!ns) return tk_fail(err, "templates: out of memory for %zu segments", cap);
        s->segs = ns;
        s->cap = cap;
    }
    tk_segment *g = &s->segs[s->n++];
    memset(g, 0, sizeof *g);
    g->type = type;
    g->kind = kind;
    g->fresh = fresh;
    return 0;
}

/* Appends bytes to the last segment (a TEXT segment) and to s->buf. */
static int seg_add(tk_segments *s, const char *str, size_t len, tk_err *err) {
    TK_ASSERT(s->n > 0 && s->segs[s->n - 1].type == TK_SEG_TEXT);
    if (len == 0) return 0;
    if (len > SIZE_MAX - s->buf_len - 1) return tk_fail(err, "templates: text length overflow");
    if (s->buf_len + len + 1 > s->buf_cap) {
        size_t cap = s->buf_cap ? s->buf_cap : 256;
        while (cap < s->buf_len + len + 1) cap = cap > SIZE_MAX / 2 ? s->buf_len + len + 1 : cap * 2;
        char *nb = realloc(s->buf, cap);
        if (!nb) return tk_fail(err, "templates: out of memory for %zu bytes of text", cap);
        s->buf = nb;
        s->buf_cap = cap;
    }
    memcpy(s->buf + s->buf_len, str, len);
    s->buf_len += len;
    s->buf[s->buf_len] = '\0';
    s->segs[s->n - 1].len += len;
    return 0;
}

static int seg_str(tk_segments *s, const char *str, tk_err *err) { return seg_add(s, str, str ? strlen(str) : 0, err); }

/* Strips ASCII whitespace from both ends of the bytes added to the last segment since buf offset
 * mark (Python's str.strip() on that part, for ASCII). */
static void seg_strip_since(tk_segments *s, size_t mark) {
    TK_ASSERT(mark <= s->buf_len);
    size_t b = mark, e = s->buf_len;
    while (b < e && is_ascii_space(s->buf[b])) b++;
    while (e > b && is_ascii_space(s->buf[e - 1])) e--;
    size_t removed = (s->buf_len - mark) - (e - b);
    memmove(s->buf + mark, s->buf + b, e - b);
    s->buf_len = mark + (e - b);
    s->buf[s->buf_len] = '\0';
    s->segs[s->n - 1].len -= removed;
}

/* Points every TEXT segment at its bytes: they lie back to back in buf, in segment order. */
static void seg_finish(tk_segments *s) {
    size_t off = 0;
    for (size_t i = 0; i < s->n; i++) {
        tk_segment *g = &s->segs[i];
        if (g->type != TK_SEG_TEXT) continue;
        g->text = s->buf ? s->buf + off : "";
        off += g->len;
    }
    TK_ASSERT(off == s->buf_len);
}

static int nonempty(const char *x) { return x && x[0]; }

static int build_alpaca(tk_segments *s, tk_prompt_mode mode, const tk_dialog *d, tk_err *err) {
    if (d->n_turns != 1) return tk_fail(err, "alpaca template: %zu turns, expected exactly 1", d->n_turns);
    const tk_turn *t = &d->turns[0];
    int has_input = nonempty(d->input);
    int train = mode == TK_PROMPT_TRAIN;
    if (seg_open(s, TK_SEG_BOS, TK_KIND_PROMPT, 0, err) || seg_open(s, TK_SEG_TEXT, TK_KIND_PROMPT, 1, err))
        return -1;
    const char *head = train ? (has_input ? ALPACA_TRAIN_HEAD_INPUT : ALPACA_TRAIN_HEAD)
                             : (has_input ? ALPACA_EVAL_HEAD_INPUT : ALPACA_EVAL_HEAD);
    if (seg_str(s, head, err) || seg_str(s, t->user, err)) return -1;
    if (has_input && (seg_str(s, train ? ALPACA_TRAIN_TO_INPUT : ALPACA_EVAL_TO_INPUT, err) ||
                      seg_str(s, d->input, err)))
        return -1;
    if (seg_str(s, train ? ALPACA_TRAIN_TO_RESPONSE : ALPACA_EVAL_TO_RESPONSE, err)) return -1;
    if (!train) return 0;
    /* finetune.py: tokenize(full_prompt) = [bos] + encode(prompt + output), then EOS appended. */
    if (seg_open(s, TK_SEG_TEXT, TK_KIND_RESPONSE, 0, err) || seg_str(s, t->assistant, err) ||
        seg_open(s, TK_SEG_EOS, TK_KIND_RESPONSE, 0, err))
        return -1;
    return 0;
}

/* LLaVA get_prompt, SeparatorStyle.TWO: system + sep, then per message role + ": " + message + sep
 * (user: sep " ", assistant: sep2 "</s>"), or role + ":" alone for an empty / absent message. */
static int build_vicuna(tk_segments *s, tk_prompt_mode mode, const tk_dialog *d, const char *def_system,
                        tk_err *err) {
    const char *system = d->system ? d->system : def_system;
    int after_eos = 0;
    for (size_t i = 0; i < d->n_turns; i++) {
        const tk_turn *t = &d->turns[i];
        int last = i + 1 == d->n_turns;
        const char *answer = (mode == TK_PROMPT_EVAL && last) ? NULL : t->assistant;
        if (i == 0) {
            if (seg_open(s, TK_SEG_BOS, TK_KIND_PROMPT, 0, err)) return -1;
        }
        /* A new encode call after "</s>" (HF's legacy LLaMA tokenizer encodes text after a special
         * token as a new chunk, with the dummy prefix); after an empty answer the text goes on. */
        if (seg_open(s, TK_SEG_TEXT, TK_KIND_PROMPT, i == 0 || after_eos, err)) return -1;
        after_eos = 0;
        if (i == 0 && (seg_str(s, system, err) || seg_str(s, " ", err))) return -1;
        if (nonempty(t->user)) {
            if (seg_str(s, "USER: ", err) || seg_str(s, t->user, err) || seg_str(s, " ", err)) return -1;
        } else if (seg_str(s, "USER:", err)) {
            return -1;
        }
        if (seg_str(s, "ASSISTANT:", err)) return -1;
        if (nonempty(answer)) {
            if (seg_open(s, TK_SEG_TEXT, TK_KIND_RESPONSE, 0, err) || seg_str(s, " ", err) ||
                seg_str(s, answer, err) || seg_open(s, TK_SEG_EOS, TK_KIND_RESPONSE, 0, err))
                return -1;
            after_eos = 1;
        }
    }
    return 0;
}

/* Meta's chat_completion: per round [bos] + encode(f"[INST] {u.strip()} [/INST] {a.strip()} ") + [eos];
 * the system prompt joins the first user message before the strip; the generation prompt ends with
 * [bos] + encode(f"[INST] {u.strip()} [/INST]"). */
static int build_llama2(tk_segments *s, tk_prompt_mode mode, const tk_dialog *d, tk_err *err) {
    for (size_t i = 0; i < d->n_turns; i++) {
        const tk_turn *t = &d->turns[i];
        int last = i + 1 == d->n_turns;
        int gen = mode == TK_PROMPT_EVAL && last;
        if (seg_open(s, TK_SEG_BOS, TK_KIND_PROMPT, 0, err) || seg_open(s, TK_SEG_TEXT, TK_KIND_PROMPT, 1, err) ||
            seg_str(s, "[INST] ", err))
            return -1;
        size_t mark = s->buf_len;
        if (i == 0 && nonempty(d->system)) {
            if (seg_str(s, "<<SYS>>\n", err) || seg_str(s, d->system, err) || seg_str(s, "\n<</SYS>>\n\n", err))
                return -1;
        }
        if (seg_str(s, t->user, err)) return -1;
        seg_strip_since(s, mark);
        if (seg_str(s, " [/INST]", err)) return -1;
        if (gen) break;
        if (seg_open(s, TK_SEG_TEXT, TK_KIND_RESPONSE, 0, err) || seg_str(s, " ", err)) return -1;
        mark = s->buf_len;
        if (seg_str(s, t->assistant, err)) return -1;
        seg_strip_since(s, mark);
        if (seg_str(s, " ", err) || seg_open(s, TK_SEG_EOS, TK_KIND_RESPONSE, 0, err)) return -1;
    }
    return 0;
}

static int build_plain(tk_segments *s, tk_prompt_mode mode, const tk_dialog *d, tk_err *err) {
    if (seg_open(s, TK_SEG_BOS, TK_KIND_PROMPT, 0, err)) return -1;
    for (size_t i = 0; i < d->n_turns; i++) {
        const tk_turn *t = &d->turns[i];
        int gen = mode == TK_PROMPT_EVAL && i + 1 == d->n_turns;
        if (nonempty(t->user) && (seg_open(s, TK_SEG_TEXT, TK_KIND_PROMPT, 0, err) || seg_str(s, t->user, err)))
            return -1;
        if (gen) break;
        if (seg_open(s, TK_SEG_TEXT, TK_KIND_RESPONSE, 0, err) || seg_str(s, t->assistant, err)) return -1;
    }
    if (mode == TK_PROMPT_TRAIN && seg_open(s, TK_SEG_EOS, TK_KIND_RESPONSE, 0, err)) return -1;
    return 0;
}

int tk_template_segments(tk_segments *out, tk_template t, tk_prompt_mode mode, const tk_dialog *d, tk_err *err) {
    if (!out || !d) return tk_fail(err, "tk_template_segments: NULL argument");
    if ((unsigned)t >= N_TEMPLATES) return tk_fail(err, "unknown prompt template %d", (int)t);
    if (mode != TK_PROMPT_TRAIN && mode != TK_PROMPT_EVAL) return tk_fail(err, "unknown prompt mode %d", (int)mode);
    if (d->n_turns == 0 || !d->turns)
        return tk_fail(err, "%s template: the dialog has no turns", tk_template_name(t));
    if (mode == TK_PROMPT_TRAIN && t != TK_TEMPLATE_ALPACA) {
        for (size_t i = 0; i < d->n_turns; i++)
            if (!d->turns[i].assistant)
                return tk_fail(err, "%s template: turn %zu has no answer (a training example needs every answer)",
                               tk_template_name(t), i);
    }
    out->n = 0;
    out->buf_len = 0;
    int rc;
    switch (t) {
    case TK_TEMPLATE_ALPACA: rc = build_alpaca(out, mode, d, err); break;
    case TK_TEMPLATE_VICUNA_V1: rc = build_vicuna(out, mode, d, VICUNA_V1_SYSTEM, err); break;
    case TK_TEMPLATE_LLAVA_V1: rc = build_vicuna(out, mode, d, LLAVA_V1_SYSTEM, err); break;
    case TK_TEMPLATE_LLAMA2: rc = build_llama2(out, mode, d, err); break;
    default: rc = build_plain(out, mode, d, err); break;
    }
    if (rc != 0) {
        out->n = 0;
        out->buf_len = 0;
        return -1;
    }
    seg_finish(out);
    return 0;
}

char *tk_segments_render(const tk_segments *s, int with_specials, size_t *len_out, tk_err *err) {
    if (!s) {
        tk_fail(err, "tk_segments_render: NULL segments");
        return NULL;
    }
    size_t total = 0;
    for (size_t i = 0; i < s->n; i++) {
        const tk_segment *g = &s->segs[i];
        size_t add = g->type == TK_SEG_TEXT ? g->len
                     : !with_specials       ? 0
                     : g->type == TK_SEG_BOS ? 3
                     : g->type == TK_SEG_EOS ? 4
                                             : 7;
        if (add > SIZE_MAX - total - 1) {
            tk_fail(err, "templates: rendered text length overflow");
            return NULL;
        }
        total += add;
    }
    char *out = malloc(total + 1);
    if (!out) {
        tk_fail(err, "templates: out of memory for %zu bytes of text", total + 1);
        return NULL;
    }
    size_t at = 0;
    for (size_t i = 0; i < s->n; i++) {
        const tk_segment *g = &s->segs[i];
        const char *p = NULL;
        size_t len = 0;
        if (g->type == TK_SEG_TEXT) {
            p = g->text;
            len = g->len;
        } else if (with_specials) {
            p = g->type == TK_SEG_BOS ? "<s>" : g->type == TK_SEG_EOS ? "</s>" : "<image>";
            len = strlen(p);
        }
        if (len) memcpy(out + at, p, len);
        at += len;
    }
    TK_ASSERT(at == total);
    out[at] = '\0';
    if (len_out) *len_out = at;
    return out;
}

int tk_template_build(tk_example *ex, const tk_tokenizer *tok, tk_template t, tk_prompt_mode mode,
                      const tk_dialog *d, const tk_template_opts *opts, tk_err *err) {
    tk_segments s = {0};
    int rc = tk_template_segments(&s, t, mode, d, err);
    if (rc == 0) rc = tk_encode_segments(ex, NULL, tok, s.segs, s.n, opts, err);
    tk_segments_free(&s);
    return rc;
}

char *tk_template_render(tk_template t, tk_prompt_mode mode, const tk_dialog *d, int with_specials,
                         size_t *len_out, tk_err *err) {
    tk_segments s = {0};
    char *out = NULL;
    if (tk_template_segments(&s, t, mode, d, err) == 0) out = tk_segments_render(&s, with_specials, len_out, err);
    tk_segments_free(&s);
    return out;
}
