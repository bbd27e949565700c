/* csr.h: commonsense-reasoning evaluation of one LLM-Adapters dataset (datasets/instruct.h records,
 * datasets/csr_tasks.h task), by generation (LLM-Adapters' protocol) and/or by log-likelihood
 * multiple choice (lm-evaluation-harness' protocol). docs/evaluation.md states both exactly.
 *
 *   tk_eval_result res = {0};
 *   if (tk_eval_csr(&ctx, tk_csr_task_find("boolq"), "boolq/test.json", &res, &samples, &err)) ...
 *
 * Per example (the first ctx->limit when set):
 *   prompt   [bos] + encode(generate_prompt(instruction, input))        (src/eval/prompt.h)
 *   gen      greedy (ctx->beams == 1) or beam search, ctx->max_new tokens, stop at ctx->eos; the
 *            output is decode(prompt + new tokens).split("### Response:")[1].strip(), the prediction
 *            the first match of the task's answer pattern in it ("" when none; src/eval/answer.h),
 *            correct when it equals the record's "answer" field.
 *   ll       every choice c of the task is scored as the continuation "the correct answer is " + c
 *            (the LLM-Adapters training output for that answer) after the prompt; acc: the choice
 *            with the largest summed log-probability is the gold answer; acc_norm: the same with the
 *            sum divided by the continuation's length in characters (Unicode code points).
 * Metrics added to res: csr_gen_acc and/or csr_ll_acc, csr_ll_acc_norm. Samples: one JSONL line per
 * example and protocol, {"task", "id", "protocol", "prompt", "generation", "extracted", "gold",
 * "correct"} (+ "loglik", "choice_norm", "correct_norm" for ll; "generation" is then the chosen
 * continuation and "extracted" the chosen answer token), so the mean of "correct" over a task's
 * lines of one protocol is its accuracy. A NUL byte in a generation is written as U+2400.
 *
 * Failure: -1 with err naming the file and record (unreadable data, a gold answer that is not one of
 * the task's choices, a prompt longer than the model's positions, ...).
 */
#ifndef TK_EVAL_CSR_H
#define TK_EVAL_CSR_H

#include "eval.h"
#include "../../datasets/csr_tasks.h"

int tk_eval_csr(const tk_eval_ctx *ctx, const tk_csr_task *task, const char *path, tk_eval_result *res,
                tk_strbuf *samples, tk_err *err);


#endif
