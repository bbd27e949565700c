/* template.h: prompt templates -> token ids, labels (loss mask) and token kinds.
 *
 *   tk_turn turn = {"What is 2+2?", "4"};                     // user, assistant
 *   tk_dialog d = {.turns = &turn, .n_turns = 1};             // system NULL: the template's default
 *   tk_template_opts o = {.train_on_inputs = 0, .max_tokens = 256};
 *   tk_example ex = {0};
 *   if (tk_template_build(&ex, tok, TK_TEMPLATE_ALPACA, TK_PROMPT_TRAIN, &d, &o, &err) != 0) ...
 *   // ex.input_ids[0..ex.n), ex.labels (-100 = not trained), ex.kinds (tk_kind)
 *   tk_example_free(&ex);
 *
 * A template turns a dialog into SEGMENTS (tk_segment): pieces of text, each a prompt or a response,
 * and special tokens (BOS, EOS) and image placeholders. tk_encode_segments tokenizes them and
 * records which tokens each segment produced (tk_span); the loss mask follows from the spans.
 *
 * Templates (TK_PROMPT_TRAIN: the training example; TK_PROMPT_EVAL: the generation prompt, which
 * ends where the model's answer starts and has no response):
 *   alpaca     LLM-Adapters (AGI-Edgerunners/LLM-Adapters). TRAIN is finetune.py's generate_prompt,
 *              byte for byte, tokenized as finetune.py does: [bos] + encode(prompt + output) +
 *              [eos]; EVAL is commonsense_evaluate.py's generate_prompt, whose whitespace differs:
 *              after "completes the request." training has 1 space (with an input) or 2 (without),
 *              evaluation 0 or 1; training's blank lines hold the 16-space indentation,
 *              evaluation's are empty. EVAL ids: [bos] + encode(prompt). One turn; the input
 *              field is tk_dialog.input (NULL or "" = none, as Python's `if data_point["input"]`).
 *   vicuna_v1  LLaVA-1.5 conversations (LLaVA conversation.py conv_vicuna_v1, SeparatorStyle.TWO,
 *              what LLaVA-1.5 trains (--version v1) and evaluates (--conv-mode vicuna_v1) with):
 *              "{system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT: {a2}</s>", EVAL
 *              ending "... USER: {un} ASSISTANT:". System default: "A chat between a curious user
 *              and an artificial intelligence assistant. The assistant gives helpful, detailed, and
 *              polite answers to the user's questions."
 *   llava_v1   the same format with conv_llava_v1's system prompt ("... a curious human ... the
 *              human's questions.").
 *   llama2     LLaMA-2 chat as Meta's chat_completion encodes it: per round
 *              [bos] + encode("[INST] {u} [/INST] {a} ") + [eos], the first user message prefixed by
 *              "<<SYS>>\n{system}\n<</SYS>>\n\n" when a system prompt is given (default: none); user
 *              content (with the system block) and answers are stripped of ASCII whitespace at both
 *              ends as Meta's .strip() does (Python also strips other Unicode spaces; we do not).
 *              EVAL ends with [bos] + encode("[INST] {u} [/INST]").
 *   plain      text only: [bos] + user + assistant (+ user + assistant ...) + [eos], no separators;
 *              a NULL user adds nothing (pretraining-style text: turns[0].assistant).
 * The byte-exact strings and their sources are in template.c; tests/test_text_template.c asserts
 * them and tests/e2e/test_tokenizer_golden.py compares the ids with Python references.
 *
 * Kinds and labels: BOS and prompt text are TK_KIND_PROMPT; response text and the EOS after it are
 * TK_KIND_RESPONSE; image placeholders TK_KIND_IMAGE; tk_example_pad adds TK_KIND_PAD. labels[i] is
 * input_ids[i] for response tokens, and for prompt tokens only when train_on_inputs (LLM-Adapters'
 * default, train_on_inputs=True: labels == input_ids everywhere); otherwise -100. Image and pad
 * positions are always -100. (The loss shifts: labels[t+1] is the target at position t.)
 *
 * How segments are tokenized (the contract). Consecutive text segments form a RUN, encoded with ONE
 * sentencepiece call on their concatenated bytes; sentencepiece reports the source bytes of every
 * token, and each token is attributed to the segment that holds its LAST source byte (a token with
 * an empty source, the dummy prefix or a leading byte-fallback piece, to the segment at its
 * position). Spans come from that single tokenization, never from re-tokenizing a prefix and
 * matching lengths (what LLM-Adapters does for train_on_inputs=False, and LLaVA for its rounds).
 * So within a run, the concatenated spans ARE the tokenization of the whole run text: ids never
 * depend on where the segment boundaries are. A run ends at a BOS/EOS/image segment, and at a text
 * segment marked `fresh`, which starts a new encode call (with sentencepiece's dummy-prefix space
 * again): the templates do this exactly where their reference encodes separately (each LLaMA-2
 * round; Vicuna rounds after "</s>", which Hugging Face's legacy LLaMA tokenizer, the one LLaVA's
 * masking arithmetic assumes, encodes as a new chunk; text after <image>, as LLaVA's
 * tokenizer_image_token does). Across a run break the ids are deliberately NOT those of encoding
 * the rendered text in one call.
 * Why not one encode call per segment: sentencepiece adds the dummy prefix at the start of every
 * call and (with remove_extra_whitespaces, spm_train's default) strips leading and trailing spaces
 * per call, so segment-by-segment ids differ from the whole text's wherever a boundary touches
 * whitespace, e.g. "### Response:\n                " | "true", where the whole text has one piece
 * "▁true" spanning the boundary. What is NOT achievable: splitting such a token. A token whose
 * source starts in an earlier segment and ends in a later one (a "straddling" token, counted in
 * tk_example.n_straddle) belongs wholly to the later one: "▁true" is a response token. The earlier
 * segment's span then ends before it and may be empty.
 * Compared with the original masking code (tests/e2e/test_tokenizer_golden.py measures both):
 * LLaVA's preprocess_v1 arithmetic gives the same labels on a LLaMA-style tokenizer. LLM-Adapters'
 * prefix-length mask (train_on_inputs=False) agrees wherever the user prompt's ids are a prefix of
 * the full ids covering the whole user prompt, and can be off elsewhere: the user prompt encoded
 * alone ends in its own whitespace pieces while the full text may merge the last space into the
 * answer's first word ("▁true"); where the counts then differ it masks the answer's first token
 * (it does with the test's LLaMA-style tokenizer, whose spaces are single pieces); with a
 * whitespace-stripping model it trains the lone "▁" before the answer, a prompt token here.
 *
 * Truncation: max_tokens > 0 keeps the first max_tokens tokens (n_dropped counts the rest). With
 * the EOS last this is exactly LLM-Adapters' cutoff_len rule (EOS only when it fits).
 *
 * Ownership: examples and segment lists own their arrays (tk_example_free, tk_segments_free) and
 * can be refilled; segment texts point into the tk_segments (or the caller's memory, for hand-made
 * segments). Dialog strings are borrowed, NUL-terminated UTF-8. Failure: -1 with one line in err.
 */
#ifndef TK_TEXT_TEMPLATE_H
#define TK_TEXT_TEMPLATE_H

#include "tokenizer.h"

#include <stddef.h>
#include <stdint.h>

#define TK_IGNORE_INDEX (-100)  /* labels: position not trained (Hugging Face / PyTorch convention) */
#define TK_IMAGE_TOKEN_ID (-200) /* input_ids placeholder of one image position (LLaVA's IMAGE_TOKEN_INDEX) */

#include "../src/token_kind.h" /* tk_kind: TK_KIND_PAD / PROMPT / RESPONSE / IMAGE */

/* "pad", "prompt", "response", "image" ("?" otherwise). */
const char *tk_kind_name(int kind);

typedef enum {
    TK_SEG_TEXT = 0,  /* text, tokenized */
    TK_SEG_BOS = 1,   /* the model's BOS id */
    TK_SEG_EOS = 2,   /* the model's EOS id */
    TK_SEG_IMAGE = 3, /* n_image positions of TK_IMAGE_TOKEN_ID, kind TK_KIND_IMAGE */
} tk_seg_type;

typedef struct {
    tk_seg_type type;
    tk_kind kind;     /* TEXT/BOS/EOS: TK_KIND_PROMPT or TK_KIND_RESPONSE; IMAGE: TK_KIND_IMAGE */
    const char *text; /* TEXT: len bytes of UTF-8 (need not be NUL-terminated) */
    size_t len;
    int fresh;        /* TEXT: start a new encode call here even after another text segment */
    size_t n_image;   /* IMAGE: number of placeholder positions */
} tk_segment;

/* Token range [begin, end) of one segment in an example. */
typedef struct {
    size_t begin, end;
} tk_span;

typedef struct {
    int32_t *input_ids; /* (cap) the first n valid */
    int32_t *labels;    /* (cap) TK_IGNORE_INDEX where not trained */
    uint8_t *kinds;     /* (cap) tk_kind */
    size_t n, cap;
    size_t n_dropped;   /* tokens cut by max_tokens */
    size_t n_straddle;  /* tokens whose source spans a segment boundary (see the contract above) */
} tk_example;

void tk_example_free(tk_example *ex);
/* Right-pads ex to len tokens with pad_id (label -100, kind TK_KIND_PAD); -1 when ex is longer. */
int tk_example_pad(tk_example *ex, size_t len, int32_t pad_id, tk_err *err);

typedef struct {
    int train_on_inputs; /* 1: prompt tokens are trained too (LLM-Adapters' default); 0: responses only */
    size_t max_tokens;   /* > 0: keep only the first max_tokens tokens */
} tk_template_opts;

/* Tokenizes segs[0..n_segs) into ex (replacing its contents) as described above. spans (optional,
 * n_segs entries) receives each segment's token range, clipped by truncation. */
int tk_encode_segments(tk_example *ex, tk_span *spans, const tk_tokenizer *tok, const tk_segment *segs,
                       size_t n_segs, const tk_template_opts *opts, tk_err *err);

typedef enum {
    TK_TEMPLATE_PLAIN = 0,
    TK_TEMPLATE_ALPACA = 1,
    TK_TEMPLATE_VICUNA_V1 = 2,
    TK_TEMPLATE_LLAVA_V1 = 3,
    TK_TEMPLATE_LLAMA2 = 4,
} tk_template;

typedef enum {
    TK_PROMPT_TRAIN = 0, /* the full example: prompts, responses, EOS */
    TK_PROMPT_EVAL = 1,  /* the generation prompt: up to where the last answer would start */
} tk_prompt_mode;

/* Template names: "plain", "alpaca", "vicuna_v1", "llava_v1", "llama2". -1 with err when unknown. */
int tk_template_from_name(const char *name, tk_template *out, tk_err *err);
const char *tk_template_name(tk_template t);

typedef struct {
    const char *user;      /* the human turn (alpaca: the instruction); NULL = "" */
    const char *assistant; /* the answer; may be NULL only where the template allows (see below) */
} tk_turn;

typedef struct {
    const char *system;  /* NULL: the template's default; "" = an empty system prompt */
    const char *input;   /* alpaca only: the input field; NULL or "" = none */
    const tk_turn *turns;
    size_t n_turns;      /* >= 1; alpaca exactly 1 */
} tk_dialog;
/* In TK_PROMPT_TRAIN every assistant must be non-NULL, except alpaca's, where NULL is "" (that is
 * LLM-Adapters' user_prompt). In TK_PROMPT_EVAL the last turn's assistant is ignored. */

/* A list of segments with the text they point into. */
typedef struct {
    tk_segment *segs; /* (cap) the first n valid; texts point into buf */
    size_t n, cap;
    char *buf;        /* (buf_cap) segment texts, back to back */
    size_t buf_len, buf_cap;
} tk_segments;

void tk_segments_free(tk_segments *s);

/* Builds the segments of a dialog (replacing out's contents). */
int tk_template_segments(tk_segments *out, tk_template t, tk_prompt_mode mode, const tk_dialog *d, tk_err *err);

/* Concatenates the segments' bytes into a malloc'd NUL-terminated string (*len_out optional).
 * with_specials: BOS as "<s>", EOS as "</s>", each image as "<image>"; otherwise they add nothing.
 * (alpaca without specials is LLM-Adapters' generate_prompt; vicuna_v1 with specials is "<s>" +
 * LLaVA's Conversation.get_prompt().) The caller free()s it. */
char *tk_segments_render(const tk_segments *s, int with_specials, size_t *len_out, tk_err *err);

/* tk_template_segments + tk_encode_segments. */
int tk_template_build(tk_example *ex, const tk_tokenizer *tok, tk_template t, tk_prompt_mode mode,
                      const tk_dialog *d, const tk_template_opts *opts, tk_err *err);

/* tk_template_segments + tk_segments_render. */
char *tk_template_render(tk_template t, tk_prompt_mode mode, const tk_dialog *d, int with_specials,
                         size_t *len_out, tk_err *err);

#endif
