/* beam.h: beam search over the KV-cached LLaMA (src/model/llama.h), with Hugging Face
 * transformers' semantics (generation/utils.py beam_search + BeamSearchScorer, as of 4.28, the
 * version LLM-Adapters pins), which LLM-Adapters' commonsense_evaluate.py runs with num_beams=4:
 *
 *   tk_beam_opts o = {.beams = 4, .max_new = 32, .eos = 2, .length_penalty = 1.0};
 *   long n = tk_beam_search(m, prompt, n_prompt, &o, out, &score, &err);  // out[0..n): new tokens
 *
 * The algorithm, step by step (nb beams, P prompt tokens, t tokens generated so far):
 *   * beam scores start at 0 for beam 0 and -1e9 for the others (all beams hold the prompt);
 *   * each step: cand(b, v) = beam_score[b] + log_softmax(logits_b)[v]; the top 2*nb candidates over
 *     all (b, v), best first (equal scores: the smaller b*V+v first; torch.topk leaves ties open);
 *   * walking them in that order: an EOS candidate of rank < nb becomes a finished hypothesis (the
 *     beam's tokens WITHOUT the eos, score = cand / (P + t)^length_penalty); an EOS candidate of rank
 *     >= nb is skipped; any other token extends its beam into the next step's beam list, until nb
 *     beams are filled;
 *   * the finished list keeps the nb best hypotheses (a new one enters while it has fewer than nb or
 *     when it beats the worst; the worst is then dropped);
 *   * the search is done when nb hypotheses are finished and the worst of them scores >= the best
 *     candidate score of this step / (P + t)^length_penalty (early_stopping=False);
 *   * after max_new tokens (and when not done), every running beam is offered to the finished list
 *     with score beam_score / (P + max_new)^length_penalty;
 *   * the answer is the best finished hypothesis (equal scores: the later one, as Python's stable
 *     sort followed by pop()).
 * Lengths include the prompt (HF 4.28; newer transformers divide by the generated length only).
 * With one beam this is greedy decoding (tk_llama_generate), minus a final eos.
 * Log-probabilities are computed and summed in double.
 *
 * Memory: nb KV caches of P + max_new positions; each step copies only the generated rows of beams
 * that fork (the prompt rows are shared content). Each step runs the beams one after another, or with
 * batch set as one batch of nb rows (the same logits, bit for bit: the products read each weight once
 * per step instead of once per beam).
 *
 * Ownership: out [max_new] belongs to the caller. Failure: -1 with err set (out of memory, prompt
 * outside the vocabulary or longer than the model's positions).
 */
#ifndef TK_EVAL_BEAM_H
#define TK_EVAL_BEAM_H

#include "../model/llama.h"

typedef struct {
    size_t beams;         /* >= 1 */
    size_t max_new;       /* >= 1: new tokens at most */
    int32_t eos;          /* end of sequence id; < 0: none */
    double length_penalty;/* exponent of the length normalisation (HF default 1.0) */
    int batch;            /* 1: each step runs the beams as one batch (tk_llama_step_rows, bit-identical
                             to 0: one beam after another) */
} tk_beam_opts;

/* Writes the best hypothesis' new tokens (no eos) into out and returns their count; *score
 * (optional) receives its normalised score. */
long tk_beam_search(tk_llama *m, const int32_t *prompt, size_t n_prompt, const tk_beam_opts *o,
                    int32_t *out, double *score, tk_err *err);

#endif
