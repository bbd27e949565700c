/* vqa.h: visual question answering on LLaVA-format shards (tspeft convert --format llava): each
 * record's prompt (up to its first response token, images spliced through the vision tower and
 * projector) is answered
 *   vqa_em      by greedy generation (KV cache), exact match with the gold answer (meta "answer")
 *               after normalising both: ASCII whitespace trimmed, lower case, one trailing '.' removed;
 *   vqa_mc_acc  by multiple choice: the candidate (meta "choices", else every distinct answer of the
 *               dataset, in order of first appearance) whose tokens, followed by EOS, have the highest
 *               summed log-probability after the prompt.
 * The two are different protocols and are reported under different names.
 * Failure: -1 with err naming the shard and record.
 */
#ifndef TK_EVAL_VQA_H
#define TK_EVAL_VQA_H

#include "../train/multimodal.h"
#include "eval.h"

int tk_eval_vqa(const tk_eval_ctx *ctx, tk_mm *mm, const char *path, tk_eval_result *res, tk_strbuf *samples,
                tk_err *err);

#endif
