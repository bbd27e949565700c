/* test_text_template.c: prompt templates, segments, spans and loss masks (text/template.h).
 *
 * Part 1 (no tokenizer): the rendered bytes of every template, asserted against literal strings:
 * LLM-Adapters' training prompt (finetune.py) and evaluation prompt (commonsense_evaluate.py), with
 * and without an input field, LLaVA's vicuna_v1 / llava_v1 get_prompt(), LLaMA-2 chat, plain.
 * Part 2 (a LLaMA-style BPE tokenizer trained with spm_train, tests/text/spm_fixture.c): ids equal the
 * reference tokenization ([bos] + encode(whole text) + [eos] for one run; one encode per run after
 * BOS/EOS/<image>/fresh), labels follow kinds and train_on_inputs, spans tile the example, a token
 * straddling a segment boundary belongs to the later segment (and separate per-segment encodes would
 * differ: the reason the run is encoded whole), truncation, padding, image placeholders, errors.
 * Python references: tests/e2e/test_tokenizer_golden.py. Prints each check; exits 1 if any fails.
 */
#include "common.h"
#include "tests/text/spm_fixture.h"
#include "text/template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_fail = 0;
static int n_pass = 0;

static void check(int ok, const char *what) {
    printf("  %-78s %s\n", what, ok ? "ok" : "FAIL");
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
    }
}

/* Prints where two strings first differ (for a failing byte-exact check). */
static int same_bytes(const char *got, const char *want) {
    if (got && strcmp(got, want) == 0) return 1;
    if (!got) {
        printf("    got NULL\n");
        return 0;
    }
    size_t i = 0;
    while (got[i] && got[i] == want[i]) i++;
    printf("    first difference at byte %zu: got \"%.40s\" want \"%.40s\"\n", i, got + i, want + i);
    return 0;
}

static char *render(tk_template t, tk_prompt_mode mode, const tk_dialog *d, int specials) {
    tk_err err = {0};
    char *s = tk_template_render(t, mode, d, specials, NULL, &err);
    if (!s) printf("    render failed: %s\n", err.msg);
    return s;
}

/* ---- part 1: bytes --------------------------------------------------------------------------- */

/* LLM-Adapters finetune.py generate_prompt, with data_point = {instruction: "Name a color.",
 * input: "", output: "Blue."}: the first line ends "request." + TWO spaces, the f-string lines are
 * indented by 16 spaces and the blank line inside holds 16 spaces. */
static const char WANT_TRAIN_NOINPUT[] =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                Name a color.\n"
    "                \n"
    "                ### Response:\n"
    "                Blue.";

/* ... with input: the first line ends "request." + ONE space. */
static const char WANT_TRAIN_INPUT[] =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Translate.\n"
    "                \n"
    "                ### Input:\n"
    "                Bonjour\n"
    "                \n"
    "                ### Response:\n"
    "                Hello";

/* LLM-Adapters commonsense_evaluate.py generate_prompt(instruction): "request." + ONE space, EMPTY
 * blank lines, ends with 16 spaces after "### Response:\n". */
static const char WANT_EVAL_NOINPUT[] =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Name a color.\n"
    "\n"
    "                ### Response:\n"
    "                ";

/* ... generate_prompt(instruction, input): "request." and NO space. */
static const char WANT_EVAL_INPUT[] =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "                ### Instruction:\n"
    "                Translate.\n"
    "\n"
    "                ### Input:\n"
    "                Bonjour\n"
    "\n"
    "                ### Response:\n"
    "                ";

/* LLaVA conv_vicuna_v1.get_prompt() for two rounds, with "<s>" for the tokenizer's BOS. */
static const char WANT_VICUNA[] =
    "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: What is shown? ASSISTANT: A cat.</s>"
    "USER: Its color? ASSISTANT: Black.</s>";
static const char WANT_VICUNA_EVAL[] =
    "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: What is shown? ASSISTANT: A cat.</s>"
    "USER: Its color? ASSISTANT:";
static const char WANT_LLAVA_V1[] =
    "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: What is shown? ASSISTANT: A cat.</s>"
    "USER: Its color? ASSISTANT: Black.</s>";

/* Meta's chat_completion text for [system, user, assistant, user, assistant]: the system block joins
 * the first user message BEFORE .strip(), so that message keeps its leading spaces (they are inside
 * the content) and loses only its trailing ones; answers are stripped at both ends. */
static const char WANT_LLAMA2[] = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n  What is shown? [/INST] A cat. </s>"
                                  "<s>[INST] Its color? [/INST] Black. </s>";
static const char WANT_LLAMA2_EVAL[] = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n  What is shown? [/INST] A cat. </s>"
                                       "<s>[INST] Its color? [/INST]";

static void test_render(void) {
    printf("rendered bytes\n");
    tk_turn color = {"Name a color.", "Blue."};
    tk_turn translate = {"Translate.", "Hello"};
    tk_dialog d_noinput = {.input = "", .turns = &color, .n_turns = 1};
    tk_dialog d_null_input = {.input = NULL, .turns = &color, .n_turns = 1};
    tk_dialog d_input = {.input = "Bonjour", .turns = &translate, .n_turns = 1};
    char *s;

    s = render(TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d_noinput, 0);
    check(same_bytes(s, WANT_TRAIN_NOINPUT), "alpaca train, no input = finetune.py generate_prompt");
    free(s);
    s = render(TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d_null_input, 0);
    check(same_bytes(s, WANT_TRAIN_NOINPUT), "alpaca train, NULL input = the same");
    free(s);
    s = render(TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d_input, 0);
    check(same_bytes(s, WANT_TRAIN_INPUT), "alpaca train, with input = finetune.py generate_prompt");
    free(s);
    s = render(TK_TEMPLATE_ALPACA, TK_PROMPT_EVAL, &d_noinput, 0);
    check(same_bytes(s, WANT_EVAL_NOINPUT), "alpaca eval, no input = commonsense_evaluate.py generate_prompt");
    free(s);
    s = render(TK_TEMPLATE_ALPACA, TK_PROMPT_EVAL, &d_input, 0);
    check(same_bytes(s, WANT_EVAL_INPUT), "alpaca eval, with input = commonsense_evaluate.py generate_prompt");
    free(s);
    s = render(TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d_noinput, 1);
    check(s && strncmp(s, "<s>Below", 8) == 0 && strcmp(s + strlen(s) - 9, "Blue.</s>") == 0,
          "alpaca train with specials: <s> ... output</s>");
    free(s);
    tk_turn no_output = {"Name a color.", NULL};
    tk_dialog d_user = {.turns = &no_output, .n_turns = 1};
    s = render(TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d_user, 0);
    check(s && strlen(s) == strlen(WANT_TRAIN_NOINPUT) - 5 && strncmp(s, WANT_TRAIN_NOINPUT, strlen(s)) == 0,
          "alpaca train, NULL output = LLM-Adapters' user_prompt (output \"\")");
    free(s);
    char *tr = render(TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d_noinput, 0);
    char *ev = render(TK_TEMPLATE_ALPACA, TK_PROMPT_EVAL, &d_noinput, 0);
    check(tr && ev && strstr(tr, "request.  \n\n") && strstr(ev, "request. \n\n") && !strstr(ev, "request.  ") &&
              strstr(tr, "Name a color.\n                \n") && strstr(ev, "Name a color.\n\n"),
          "train vs eval whitespace: 2 vs 1 space after 'request.', 16-space vs empty blank line");
    free(tr);
    free(ev);

    tk_turn conv[2] = {{"What is shown?", "A cat."}, {"Its color?", "Black."}};
    tk_dialog dv = {.turns = conv, .n_turns = 2};
    s = render(TK_TEMPLATE_VICUNA_V1, TK_PROMPT_TRAIN, &dv, 1);
    check(same_bytes(s, WANT_VICUNA), "vicuna_v1 train = <s> + LLaVA conv_vicuna_v1.get_prompt()");
    free(s);
    s = render(TK_TEMPLATE_VICUNA_V1, TK_PROMPT_EVAL, &dv, 1);
    check(same_bytes(s, WANT_VICUNA_EVAL), "vicuna_v1 eval ends 'USER: ... ASSISTANT:' (last answer ignored)");
    free(s);
    s = render(TK_TEMPLATE_LLAVA_V1, TK_PROMPT_TRAIN, &dv, 1);
    check(same_bytes(s, WANT_LLAVA_V1), "llava_v1 train = <s> + LLaVA conv_llava_v1.get_prompt()");
    free(s);
    dv.system = "";
    s = render(TK_TEMPLATE_VICUNA_V1, TK_PROMPT_TRAIN, &dv, 0);
    check(s && strncmp(s, " USER: What is shown? ASSISTANT: A cat.USER:", 44) == 0,
          "vicuna_v1 with system \"\": ' USER: ...' (as get_prompt), no </s> without specials");
    free(s);

    tk_turn lconv[2] = {{"  What is shown?\n", " A cat.  "}, {"Its color?", "Black."}};
    tk_dialog dl = {.system = "Be brief.", .turns = lconv, .n_turns = 2};
    s = render(TK_TEMPLATE_LLAMA2, TK_PROMPT_TRAIN, &dl, 1);
    check(same_bytes(s, WANT_LLAMA2), "llama2 train: per-round <s>[INST] ... [/INST] answer </s>, contents stripped");
    free(s);
    s = render(TK_TEMPLATE_LLAMA2, TK_PROMPT_EVAL, &dl, 1);
    check(same_bytes(s, WANT_LLAMA2_EVAL), "llama2 eval ends '<s>[INST] user [/INST]'");
    free(s);
    dl.system = NULL;
    s = render(TK_TEMPLATE_LLAMA2, TK_PROMPT_TRAIN, &dl, 0);
    check(same_bytes(s, "[INST] What is shown? [/INST] A cat. [INST] Its color? [/INST] Black. "),
          "llama2 without a system prompt: no <<SYS>> block, the user message stripped at both ends");
    free(s);
    tk_turn sysonly = {"", "ok"};
    tk_dialog ds = {.system = "S", .turns = &sysonly, .n_turns = 1};
    s = render(TK_TEMPLATE_LLAMA2, TK_PROMPT_TRAIN, &ds, 0);
    check(same_bytes(s, "[INST] <<SYS>>\nS\n<</SYS>> [/INST] ok "),
          "llama2 empty user: the strip reaches into E_SYS as Meta's .strip() does");
    free(s);

    tk_turn plain[2] = {{NULL, "Some text."}, {" more", " text"}};
    tk_dialog dp = {.turns = plain, .n_turns = 2};
    s = render(TK_TEMPLATE_PLAIN, TK_PROMPT_TRAIN, &dp, 1);
    check(same_bytes(s, "<s>Some text. more text</s>"), "plain: <s> + texts + </s>, no separators");
    free(s);
}

/* ---- part 2: tokens -------------------------------------------------------------------------- */

static int ids_equal(const int32_t *a, const int32_t *b, size_t n) {
    return n == 0 || memcmp(a, b, n * sizeof *a) == 0;
}

/* [bos]? + encode(text) appended to want. */
static void enc(const tk_tokenizer *tok, const char *text, int bos, int eos, tk_ids *want) {
    tk_err err = {0};
    TK_ASSERT(tk_tok_encode(tok, text, strlen(text), bos, eos, want, &err) == 0);
}

/* Spans tile [0, n) in order and every token has its segment's kind; labels follow kinds. */
static int consistent(const tk_example *ex, const tk_span *spans, const tk_segment *segs, size_t n_segs,
                      int train_on_inputs) {
    size_t at = 0;
    for (size_t i = 0; i < n_segs; i++) {
        if (spans[i].begin != at || spans[i].end < spans[i].begin) return 0;
        for (size_t t = spans[i].begin; t < spans[i].end; t++)
            if (ex->kinds[t] != (uint8_t)segs[i].kind) return 0;
        at = spans[i].end;
    }
    if (at != ex->n) return 0;
    for (size_t t = 0; t < ex->n; t++) {
        int trained = ex->kinds[t] == TK_KIND_RESPONSE || (ex->kinds[t] == TK_KIND_PROMPT && train_on_inputs);
        if (ex->labels[t] != (trained ? ex->input_ids[t] : TK_IGNORE_INDEX)) return 0;
    }
    return 1;
}

static void test_alpaca_tokens(const tk_tokenizer *tok) {
    printf("alpaca tokens (LLM-Adapters: [bos] + encode(prompt + output) + [eos])\n");
    tk_err err = {0};
    tk_turn turn = {"Name a color.", "the cat"};
    tk_dialog d = {.turns = &turn, .n_turns = 1};
    char *text = tk_template_render(TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d, 0, NULL, &err);
    TK_ASSERT(text != NULL);
    tk_ids want = {0};
    enc(tok, text, 1, 1, &want);

    for (int toi = 1; toi >= 0; toi--) {
        tk_segments segs = {0};
        tk_example ex = {0};
        tk_template_opts o = {.train_on_inputs = toi};
        TK_ASSERT(tk_template_segments(&segs, TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d, &err) == 0);
        tk_span *spans = calloc(segs.n, sizeof *spans);
        TK_ASSERT(spans != NULL);
        int rc = tk_encode_segments(&ex, spans, tok, segs.segs, segs.n, &o, &err);
        char what[160];
        snprintf(what, sizeof what, "train_on_inputs=%d: ids = [bos] + encode(whole prompt) + [eos] (%zu tokens)",
                 toi, want.n);
        check(rc == 0 && ex.n == want.n && ids_equal(ex.input_ids, want.ids, want.n), what);
        check(rc == 0 && consistent(&ex, spans, segs.segs, segs.n, toi),
              "spans tile the example; kinds per segment; labels from kinds");
        if (toi) {
            check(rc == 0 && ids_equal(ex.labels, ex.input_ids, ex.n),
                  "train_on_inputs=1: labels == input_ids everywhere");
        } else {
            /* Segments: BOS, prompt text, response text, EOS. */
            size_t r0 = spans[2].begin, r1 = spans[2].end;
            size_t len = 0;
            char *resp = rc == 0 && r1 > r0 ? tk_tok_decode(tok, ex.input_ids + r0, r1 - r0, &len, &err) : NULL;
            check(resp && strcmp(resp, "the cat") == 0, "the response span decodes to the output 'the cat'");
            const char *piece = rc == 0 ? tk_tok_id_to_piece(tok, ex.input_ids[r0]) : NULL;
            check(ex.n_straddle == 1 && piece && strcmp(piece, "\xe2\x96\x81the") == 0,
                  "its first token '▁the' straddles the boundary (space from the prompt) and is a response token");
            check(ex.labels[ex.n - 1] == 2 && ex.kinds[ex.n - 1] == TK_KIND_RESPONSE && ex.labels[0] == TK_IGNORE_INDEX,
                  "EOS is a trained response token, BOS is masked");
            free(resp);
        }
        free(spans);
        tk_example_free(&ex);
        tk_segments_free(&segs);
    }
    free(text);

    /* Why one encode per run: encoding the two segments separately gives different ids. */
    tk_ids sep = {0};
    enc(tok, "### Response:\n                ", 0, 0, &sep);
    enc(tok, "the cat", 0, 0, &sep);
    tk_ids whole = {0};
    enc(tok, "### Response:\n                the cat", 0, 0, &whole);
    check(sep.n != whole.n || !ids_equal(sep.ids, whole.ids, sep.n),
          "(separate encodes of prompt | response differ from the whole text: dummy prefix, '▁the')");
    tk_ids_free(&sep);
    tk_ids_free(&whole);

    /* Evaluation prompt: [bos] + encode(eval prompt), all prompt, no EOS. */
    tk_example ex = {0};
    char *etext = tk_template_render(TK_TEMPLATE_ALPACA, TK_PROMPT_EVAL, &d, 0, NULL, &err);
    want.n = 0;
    enc(tok, etext, 1, 0, &want);
    int rc = tk_template_build(&ex, tok, TK_TEMPLATE_ALPACA, TK_PROMPT_EVAL, &d, NULL, &err);
    int all_prompt = 1;
    for (size_t t = 0; rc == 0 && t < ex.n; t++)
        if (ex.kinds[t] != TK_KIND_PROMPT) all_prompt = 0;
    check(rc == 0 && ex.n == want.n && ids_equal(ex.input_ids, want.ids, want.n) && all_prompt,
          "eval prompt: [bos] + encode(commonsense_evaluate prompt), all prompt tokens, no EOS");
    free(etext);

    /* Truncation = LLM-Adapters' cutoff_len: keep the first max_tokens (EOS only when it fits). */
    tk_template_opts o = {.train_on_inputs = 1, .max_tokens = 20};
    rc = tk_template_build(&ex, tok, TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d, &o, &err);
    check(rc == 0 && ex.n == 20 && ex.n_dropped > 0 && ex.input_ids[19] != 2, "max_tokens 20: 20 tokens, rest dropped");
    size_t full = ex.n + ex.n_dropped;
    o.max_tokens = full - 1;
    rc = tk_template_build(&ex, tok, TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d, &o, &err);
    check(rc == 0 && ex.n_dropped == 1 && ex.input_ids[ex.n - 1] != 2, "max_tokens = length - 1: only the EOS goes");
    o.max_tokens = full;
    rc = tk_template_build(&ex, tok, TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d, &o, &err);
    check(rc == 0 && ex.n_dropped == 0 && ex.input_ids[ex.n - 1] == 2, "max_tokens = length: nothing dropped");

    /* Padding. */
    size_t n = ex.n;
    check(tk_example_pad(&ex, n + 3, 0, &err) == 0 && ex.n == n + 3 && ex.kinds[n] == TK_KIND_PAD &&
              ex.labels[n + 2] == TK_IGNORE_INDEX && ex.input_ids[n + 1] == 0,
          "tk_example_pad: 3 pad tokens, kind pad, label -100");
    check(tk_example_pad(&ex, 2, 0, &err) == -1 && strstr(err.msg, "longer"), "padding to a shorter length fails");
    tk_example_free(&ex);
    tk_ids_free(&want);
}

static void test_chat_tokens(const tk_tokenizer *tok) {
    printf("vicuna_v1 / llama2 tokens (one encode per round, as the references)\n");
    tk_err err = {0};
    tk_turn conv[2] = {{"What is shown?", "A cat."}, {"Its color?", "Black."}};
    tk_dialog d = {.turns = conv, .n_turns = 2};
    tk_example ex = {0};
    tk_template_opts o = {0};

    /* Vicuna: [bos] + encode(system ... ASSISTANT: A cat.) + [eos] + encode(USER: ... Black.) + [eos]. */
    tk_ids want = {0};
    enc(tok,
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: What is shown? ASSISTANT: A cat.",
        1, 1, &want);
    enc(tok, "USER: Its color? ASSISTANT: Black.", 0, 1, &want);
    int rc = tk_template_build(&ex, tok, TK_TEMPLATE_VICUNA_V1, TK_PROMPT_TRAIN, &d, &o, &err);
    check(rc == 0 && ex.n == want.n && ids_equal(ex.input_ids, want.ids, want.n),
          "vicuna_v1: [bos] + encode(round 1) + [eos] + encode(round 2) + [eos]");
    size_t trained = 0, eos_trained = 0;
    for (size_t t = 0; rc == 0 && t < ex.n; t++) {
        if (ex.labels[t] != TK_IGNORE_INDEX) trained++;
        if (ex.input_ids[t] == 2 && ex.labels[t] == 2) eos_trained++;
    }
    check(rc == 0 && eos_trained == 2 && trained > 2 && trained < ex.n / 2,
          "vicuna_v1 responses only: both </s> and the answers trained, the rest masked");

    /* LLaMA-2: per round [bos] + encode("[INST] u [/INST] a ") + [eos]. */
    want.n = 0;
    enc(tok, "[INST] What is shown? [/INST] A cat. ", 1, 1, &want);
    enc(tok, "[INST] Its color? [/INST] Black. ", 1, 1, &want);
    rc = tk_template_build(&ex, tok, TK_TEMPLATE_LLAMA2, TK_PROMPT_TRAIN, &d, &o, &err);
    check(rc == 0 && ex.n == want.n && ids_equal(ex.input_ids, want.ids, want.n),
          "llama2: Meta's chat_completion ids (two BOS, two EOS)");
    want.n = 0;
    enc(tok, "[INST] What is shown? [/INST] A cat. ", 1, 1, &want);
    enc(tok, "[INST] Its color? [/INST]", 1, 0, &want);
    rc = tk_template_build(&ex, tok, TK_TEMPLATE_LLAMA2, TK_PROMPT_EVAL, &d, &o, &err);
    check(rc == 0 && ex.n == want.n && ids_equal(ex.input_ids, want.ids, want.n),
          "llama2 eval: last round [bos] + encode('[INST] u [/INST]')");
    tk_example_free(&ex);
    tk_ids_free(&want);
}

static void test_segments(const tk_tokenizer *tok) {
    printf("hand-made segments: runs, fresh, image placeholders, errors\n");
    tk_err err = {0};
    tk_example ex = {0};
    tk_span spans[8];
    tk_template_opts o = {0};
    tk_ids want = {0};

    /* Boundary before a space: nothing straddles; the spans split exactly there. */
    tk_segment a[] = {{.type = TK_SEG_BOS, .kind = TK_KIND_PROMPT},
                      {.type = TK_SEG_TEXT, .kind = TK_KIND_PROMPT, .text = "Hello", .len = 5},
                      {.type = TK_SEG_TEXT, .kind = TK_KIND_RESPONSE, .text = " world", .len = 6},
                      {.type = TK_SEG_EOS, .kind = TK_KIND_RESPONSE}};
    enc(tok, "Hello world", 1, 1, &want);
    int rc = tk_encode_segments(&ex, spans, tok, a, 4, &o, &err);
    size_t a_total = ex.n;
    tk_ids hello = {0};
    enc(tok, "Hello", 0, 0, &hello);
    check(rc == 0 && ex.n == want.n && ids_equal(ex.input_ids, want.ids, want.n) && ex.n_straddle == 0 &&
              spans[1].end - spans[1].begin == hello.n && consistent(&ex, spans, a, 4, 0),
          "'Hello' | ' world': ids of the whole text, span of 'Hello' = its own tokens, no straddle");

    /* Empty segments get empty spans in place. */
    tk_segment b[] = {{.type = TK_SEG_TEXT, .kind = TK_KIND_PROMPT, .text = "", .len = 0},
                      {.type = TK_SEG_TEXT, .kind = TK_KIND_PROMPT, .text = "Hello", .len = 5},
                      {.type = TK_SEG_TEXT, .kind = TK_KIND_RESPONSE, .text = "", .len = 0},
                      {.type = TK_SEG_TEXT, .kind = TK_KIND_RESPONSE, .text = " world", .len = 6}};
    want.n = 0;
    enc(tok, "Hello world", 0, 0, &want);
    rc = tk_encode_segments(&ex, spans, tok, b, 4, &o, &err);
    check(rc == 0 && ex.n == want.n && ids_equal(ex.input_ids, want.ids, want.n) && spans[0].end == 0 &&
              spans[2].begin == spans[2].end && consistent(&ex, spans, b, 4, 0),
          "empty segments: empty spans, ids unchanged");

    /* fresh: a new encode call (dummy prefix again). */
    tk_segment c[] = {{.type = TK_SEG_TEXT, .kind = TK_KIND_PROMPT, .text = "ab", .len = 2},
                      {.type = TK_SEG_TEXT, .kind = TK_KIND_RESPONSE, .text = "cd", .len = 2, .fresh = 1}};
    want.n = 0;
    enc(tok, "ab", 0, 0, &want);
    enc(tok, "cd", 0, 0, &want);
    rc = tk_encode_segments(&ex, spans, tok, c, 2, &o, &err);
    check(rc == 0 && ex.n == want.n && ids_equal(ex.input_ids, want.ids, want.n) && consistent(&ex, spans, c, 2, 0),
          "fresh segment: encode('ab') + encode('cd')");

    /* Image placeholders: -200, kind image, never trained; text after them is a new encode. */
    tk_segment im[] = {{.type = TK_SEG_BOS, .kind = TK_KIND_PROMPT},
                       {.type = TK_SEG_TEXT, .kind = TK_KIND_PROMPT, .text = "USER: ", .len = 6},
                       {.type = TK_SEG_IMAGE, .kind = TK_KIND_IMAGE, .n_image = 3},
                       {.type = TK_SEG_TEXT, .kind = TK_KIND_PROMPT, .text = "\nWhat?", .len = 6}};
    want.n = 0;
    enc(tok, "USER: ", 1, 0, &want);
    size_t before = want.n;
    enc(tok, "\nWhat?", 0, 0, &want);
    tk_template_opts all = {.train_on_inputs = 1};
    rc = tk_encode_segments(&ex, spans, tok, im, 4, &all, &err);
    int img_ok = rc == 0 && ex.n == want.n + 3 && ids_equal(ex.input_ids, want.ids, before) &&
                 ids_equal(ex.input_ids + before + 3, want.ids + before, want.n - before);
    for (size_t t = before; img_ok && t < before + 3; t++)
        img_ok = ex.input_ids[t] == TK_IMAGE_TOKEN_ID && ex.kinds[t] == TK_KIND_IMAGE &&
                 ex.labels[t] == TK_IGNORE_INDEX;
    check(img_ok && spans[2].begin == before && spans[2].end == before + 3,
          "image: 3 positions of -200 (kind image, label -100), then encode('\\nWhat?') anew");

    /* Truncation clips spans. */
    tk_template_opts cut = {.max_tokens = 2};
    rc = tk_encode_segments(&ex, spans, tok, a, 4, &cut, &err);
    check(rc == 0 && ex.n == 2 && ex.n_dropped == a_total - 2 && spans[3].begin == 2 && spans[3].end == 2 &&
              spans[1].end <= 2,
          "max_tokens 2: spans clipped to the kept tokens");

    /* Errors. */
    tk_segment bad_kind[] = {{.type = TK_SEG_TEXT, .kind = TK_KIND_IMAGE, .text = "x", .len = 1}};
    check(tk_encode_segments(&ex, NULL, tok, bad_kind, 1, &o, &err) == -1 && strstr(err.msg, "segment 0"),
          "a text segment of kind image is refused");
    tk_segment null_text[] = {{.type = TK_SEG_TEXT, .kind = TK_KIND_PROMPT, .text = NULL, .len = 3}};
    check(tk_encode_segments(&ex, NULL, tok, null_text, 1, &o, &err) == -1, "NULL text with a length is refused");
    tk_turn two[2] = {{"a", "b"}, {"c", "d"}};
    tk_dialog d2 = {.turns = two, .n_turns = 2};
    check(tk_template_build(&ex, tok, TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d2, &o, &err) == -1 &&
              strstr(err.msg, "exactly 1"),
          "alpaca with two turns is refused");
    tk_turn noans = {"q", NULL};
    tk_dialog dn = {.turns = &noans, .n_turns = 1};
    check(tk_template_build(&ex, tok, TK_TEMPLATE_VICUNA_V1, TK_PROMPT_TRAIN, &dn, &o, &err) == -1 &&
              strstr(err.msg, "no answer"),
          "vicuna_v1 training example without an answer is refused");
    check(tk_template_build(&ex, tok, TK_TEMPLATE_VICUNA_V1, TK_PROMPT_EVAL, &dn, &o, &err) == 0,
          "... but is a valid generation prompt");
    tk_dialog empty = {0};
    check(tk_template_build(&ex, tok, TK_TEMPLATE_PLAIN, TK_PROMPT_TRAIN, &empty, &o, &err) == -1,
          "a dialog without turns is refused");
    tk_template t;
    check(tk_template_from_name("alpaca", &t, &err) == 0 && t == TK_TEMPLATE_ALPACA &&
              tk_template_from_name("llama2", &t, &err) == 0 && t == TK_TEMPLATE_LLAMA2 &&
              strcmp(tk_template_name(TK_TEMPLATE_LLAVA_V1), "llava_v1") == 0,
          "template names round trip");
    check(tk_template_from_name("chatml", &t, &err) == -1 && strstr(err.msg, "chatml"),
          "unknown template name refused");
    tk_example_free(&ex);
    tk_ids_free(&want);
    tk_ids_free(&hello);
}

int main(void) {
    test_render();

    char dir[64], model[256];
    if (spm_fixture_dir(dir, sizeof dir) != 0) return 1;
    const char *args[16];
    size_t k = 0;
    for (; SPM_FIXTURE_LLAMA_ARGS[k]; k++) args[k] = SPM_FIXTURE_LLAMA_ARGS[k];
    args[k++] = "--vocab_size=400";
    args[k] = NULL;
    if (spm_fixture_train(dir, "llama", args, model, sizeof model) != 0) {
        spm_fixture_cleanup(dir);
        printf("test_text_template: cannot train the test tokenizer\n");
        return 1;
    }
    tk_err err = {0};
    tk_tokenizer *tok = tk_tok_open(model, &err);
    check(tok != NULL, "open the llama-style test tokenizer");
    if (tok) {
        test_alpaca_tokens(tok);
        test_chat_tokens(tok);
        test_segments(tok);
    } else {
        printf("  %s\n", err.msg);
    }
    tk_tok_free(tok);
    spm_fixture_cleanup(dir);
    printf("test_text_template: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
