/* prompt.c: see prompt.h. */
#include "prompt.h"

#include <stdlib.h>
#include <string.h>

int tk_eval_prompt(tk_example *ex, char **text, const tk_tokenizer *tok, const char *instruction,
                   const char *input, tk_err *err) {
    tk_turn turn = {instruction, NULL};
    tk_dialog d = {.system = NULL, .input = input, .turns = &turn, .n_turns = 1};
    tk_template_opts o = {.train_on_inputs = 1, .max_tokens = 0};
    if (tk_template_build(ex, tok, TK_TEMPLATE_ALPACA, TK_PROMPT_EVAL, &d, &o, err)) return -1;
    if (text && !(*text = tk_template_render(TK_TEMPLATE_ALPACA, TK_PROMPT_EVAL, &d, 0, NULL, err))) return -1;
    return 0;
}

int tk_eval_prompt_continuation(tk_example *ex, size_t *begin, const tk_tokenizer *tok, const char *instruction,
                                const char *input, const char *continuation, tk_err *err) {
    tk_turn turn = {instruction, NULL};
    tk_dialog d = {.system = NULL, .input = input, .turns = &turn, .n_turns = 1};
    tk_template_opts o = {.train_on_inputs = 1, .max_tokens = 0};
    tk_segments s = {0};
    tk_segment *segs = NULL;
    tk_span *spans = NULL;
    int rc = -1;
    if (tk_template_segments(&s, TK_TEMPLATE_ALPACA, TK_PROMPT_EVAL, &d, err)) goto done;
    segs = calloc(s.n + 1, sizeof *segs);
    spans = calloc(s.n + 1, sizeof *spans);
    if (!segs || !spans) {
        tk_fail(err, "out of memory");
        goto done;
    }
    memcpy(segs, s.segs, s.n * sizeof *segs);
    segs[s.n] = (tk_segment){.type = TK_SEG_TEXT, .kind = TK_KIND_RESPONSE, .text = continuation,
                             .len = strlen(continuation)};
    if (tk_encode_segments(ex, spans, tok, segs, s.n + 1, &o, err)) goto done;
    if (spans[s.n].begin >= spans[s.n].end || spans[s.n].begin < 1) {
        tk_fail(err, "the continuation \"%s\" encodes to no token of its own", continuation);
        goto done;
    }
    *begin = spans[s.n].begin;
    rc = 0;
done:
    free(segs);
    free(spans);
    tk_segments_free(&s);
    return rc;
}
