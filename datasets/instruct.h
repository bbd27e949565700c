/* instruct.h: instruction data in the LLM-Adapters / Alpaca schema.
 *
 *   tk_instruct *r; size_t n;
 *   if (tk_instruct_load("boolq/train.json", &r, &n, &err) != 0) ...;
 *   ... r[i].instruction, r[i].input, r[i].output, r[i].answer ...
 *   tk_instruct_free(r, n);
 *
 * Input: a JSON array of objects, or JSONL (one object per line; blank lines skipped), detected by
 * the first non-space byte ('[' = array). Fields: "instruction" (string, required), "input"
 * (string, optional: ""), "output" (string, required unless the record has an "answer": evaluation
 * sets may omit it: ""), "answer" (string, optional: ""; LLM-Adapters' gold answer token; numbers are
 * accepted and printed as JSON writes them, as the math sets store them). Other fields are ignored.
 *
 * Ownership: *out is malloc'd with every string; tk_instruct_free releases it (NULL is fine).
 * A UTF-8 BOM is skipped; an empty file or array, a non-object record and data after the array are
 * errors. Failure: -1 with one line naming the file and the record and what was wrong, *out NULL:
 * "PATH: record I: \"output\" must be a string" (I: the 0-based array index, data[I] in Python),
 * "PATH: line L: missing \"instruction\"" (JSONL, 1-based line), "PATH: line L, column C: invalid
 * JSON" (an array that does not parse).
 */
#ifndef TK_DATASETS_INSTRUCT_H
#define TK_DATASETS_INSTRUCT_H

#include "../src/common.h"

#include <stddef.h>

typedef struct {
    char *instruction, *input, *output, *answer; /* never NULL; input/output/answer may be "" */
} tk_instruct;

int tk_instruct_load(const char *path, tk_instruct **out, size_t *n, tk_err *err);
void tk_instruct_free(tk_instruct *r, size_t n);

#endif
