/* prompt.h: LLM-Adapters' evaluation prompt as token ids (text/template.h, template alpaca, mode
 * EVAL: commonsense_evaluate.py's generate_prompt, ids [bos] + encode(prompt)), alone for
 * generation or followed by a scored continuation for log-likelihoods.
 *
 *   tk_example ex = {0};
 *   char *text = NULL;
 *   tk_eval_prompt(&ex, &text, tok, instruction, input, &err);        // ids in ex.input_ids[0..ex.n)
 *   size_t begin;
 *   tk_eval_prompt_continuation(&ex, &begin, tok, instruction, input, "the correct answer is true", &err);
 *   tk_example_free(&ex); free(text);
 *
 * The continuation is encoded in the same sentencepiece call as the prompt (one run of text), and
 * the tokens it owns follow text/template.h's attribution (a token is the continuation's when its
 * last source byte is): so the scored ids are exactly the ids of prompt + continuation, never a
 * re-tokenized prefix. This is lm-evaluation-harness' context/continuation split done on byte
 * offsets instead of on token counts (lm-eval encodes context + continuation, then takes the
 * context's token count off the front).
 *
 * Ownership: ex is refilled (tk_example_free); *text is malloc'd (caller frees). input may be NULL
 * or "" (no input). Failure: -1 with err (tokenizer failure, empty continuation span).
 */
#ifndef TK_EVAL_PROMPT_H
#define TK_EVAL_PROMPT_H

#include "../../text/template.h"
#include "../common.h"

int tk_eval_prompt(tk_example *ex, char **text, const tk_tokenizer *tok, const char *instruction,
                   const char *input, tk_err *err);
/* *begin: index of the continuation's first token in ex (1 <= begin < ex->n). */
int tk_eval_prompt_continuation(tk_example *ex, size_t *begin, const tk_tokenizer *tok, const char *instruction,
                                const char *input, const char *continuation, tk_err *err);

#endif
