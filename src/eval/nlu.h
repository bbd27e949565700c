/* nlu.h: GLUE evaluation of one task's TSV file (datasets/glue.h) by log-likelihood over the label
 * verbalizers, with the task's GLUE metric. docs/evaluation.md states the protocol exactly.
 *
 *   tk_eval_result res = {0};
 *   if (tk_eval_glue(&ctx, tk_glue_task_find("rte"), "RTE/dev.tsv", &res, &samples, &err)) ...
 *
 * Per example (the first ctx->limit when set): the prompt is LLM-Adapters' evaluation prompt with
 * the converter's instruction (tk_glue_instruction) and no input; each candidate continuation is the
 * converter's training response for one label (tk_glue_response with that label), scored as the
 * summed log-probability of its tokens (src/eval/loglik.h); the prediction is the argmax (first
 * maximum). STS-B (regression, no labels): the candidates are the responses of the scores 0.0, 0.1,
 * ..., 5.0 (identical response texts merged, each text standing for the mean of its scores) and the
 * prediction is the probability-weighted mean score, sum_k softmax(loglik)_k * score_k.
 * Metrics (res, names as in the results JSON): CoLA nlu_mcc; SST-2, QNLI, RTE, WNLI, MNLI-m/-mm nlu_acc;
 * MRPC, QQP nlu_acc and nlu_f1 (positive label 1); STS-B nlu_pearson and nlu_spearman.
 * Samples: one JSONL line per example {"task", "id", "protocol": "ll", "prompt", "generation" (the
 * chosen continuation), "extracted" (its verbalizer; STS-B: the predicted score), "gold", "correct"
 * (null for STS-B), "label"/"pred" (STS-B: "gold_score"/"pred_score"), "loglik"}.
 *
 * Failure: -1 with err naming the file and example (unreadable TSV, an unlabeled split, ...).
 */
#ifndef TK_EVAL_NLU_H
#define TK_EVAL_NLU_H

#include "eval.h"
#include "../../datasets/glue.h"

int tk_eval_glue(const tk_eval_ctx *ctx, const tk_glue_task *task, const char *path, tk_eval_result *res,
                 tk_strbuf *samples, tk_err *err);


#endif
