/* greedy.h: greedy decoding of several prompts at once (batched evaluation).
 *
 *   const int32_t *prompts[8]; size_t lens[8]; int32_t *outs[8]; long got[8]; size_t bad;
 *   if (tk_greedy_batch(m, prompts, lens, 8, max_new, eos, outs, got, &bad, &err) != 0) ...  // row bad failed
 *
 * Row b's output is what tk_llama_generate(m, prompts[b], lens[b], max_new, eos, outs[b], err) writes,
 * token for token: its prompt runs alone (the same KV step as tk_llama_generate), then every decoding
 * step runs the rows still going as one batch (tk_llama_step_rows, bit-identical per row); a row leaves
 * the batch after its eos or its max_new-th token.
 *
 * Memory: one KV cache of lens[b] + max_new positions per row (keys and values only; the prompt's pass
 * runs in a cache of its own, freed after the copy), and the batch's scratch.
 *
 * Ownership: outs[b] [max_new] belong to the caller. Failure: -1 with err set and *bad_row naming the
 * row (the first one whose prompt is empty or outside the vocabulary), or B on an allocation failure
 * of the batch.
 */
#ifndef TK_EVAL_GREEDY_H
#define TK_EVAL_GREEDY_H

#include "../model/llama.h"

int tk_greedy_batch(tk_llama *m, const int32_t *const *prompts, const size_t *lens, size_t B, size_t max_new,
                    int32_t eos, int32_t *const *outs, long *got, size_t *bad_row, tk_err *err);

#endif
