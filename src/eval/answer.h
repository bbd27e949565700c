/* answer.h: LLM-Adapters' answer extraction for commonsense-reasoning generations
 * (AGI-Edgerunners/LLM-Adapters commonsense_evaluate.py).
 *
 *   size_t rlen;
 *   char *resp = tk_answer_response(decoded, len, &rlen, &err);  // text after "### Response:", stripped
 *   const char *alts[] = {"true", "false"};
 *   size_t n;
 *   const char *hit = tk_answer_extract(resp, rlen, alts, 2, &n);  // n bytes at hit, or NULL
 *   free(resp);
 *
 * What LLM-Adapters does, and what these functions reproduce:
 *   outputs = tokenizer.batch_decode(sequences, skip_special_tokens=True)   (prompt + generation)
 *   output = o.split("### Response:")[1].strip()
 *   pred = re.findall(r'true|false', output)[0] if any match else ""
 * tk_answer_response is the split-and-strip: the text between the first "### Response:" and the
 * next one (or the end), with leading and trailing whitespace removed (Python's str.strip() on the
 * ASCII whitespace set " \t\n\v\f\r" plus \x1c-\x1f; non-ASCII Unicode spaces are kept, which can
 * only change the stored text, never the extracted answer). Text without "### Response:" gives "" (Python
 * would raise IndexError; a generation cannot remove the prompt's marker, so this only happens for
 * a non-LLM-Adapters prompt).
 * tk_answer_extract is re.findall(alternation)[0] for literal alternatives: the leftmost position at
 * which any alternative matches, and at that position the FIRST alternative in list order that
 * matches there (regex alternation is ordered, not longest-match); case-sensitive, byte-exact, no
 * word boundaries ("untrue" contains "true").
 *
 * The patterns (tk_answer_pattern): boolq true|false; piqa solution1|solution2; social_i_qa, ARC-*,
 * openbookqa answer1|...|answer5 (five alternatives even where a task has fewer choices, as
 * LLM-Adapters); hellaswag ending1|...|ending4; winogrande option1|option2.
 *
 * Ownership: tk_answer_response returns a malloc'd string the caller free()s; tk_answer_extract
 * returns a pointer into its input and tk_answer_pattern static strings. Failure: NULL with err
 * (out of memory only).
 */
#ifndef TK_EVAL_ANSWER_H
#define TK_EVAL_ANSWER_H

#include "../common.h"

#include <stddef.h>

/* *out_len receives the length (the text may hold NUL bytes, from a <0x00> byte piece). */
char *tk_answer_response(const char *decoded, size_t len, size_t *out_len, tk_err *err);
/* First match of alts[0] | alts[1] | ... in text[0..n) (NUL bytes are text); *len receives its
 * length. NULL (and *len 0) when nothing matches. */
const char *tk_answer_extract(const char *text, size_t n, const char *const *alts, int n_alts, size_t *len);
/* LLM-Adapters' alternatives for a task whose choices are choices[0..n) (the answer tokens): the
 * answer1..answer5 family when the choices are answerK, else the choices themselves. Writes up to cap
 * pointers into alts and returns the count. */
int tk_answer_pattern(const char **alts, int cap, const char *const *choices, int n_choices);

#endif
