/* loglik.h: log-likelihood of continuations, lm-evaluation-harness style, through the training
 * forward (tk_llama_forward, train = 0: no dropout, no gate statistics, no gradient).
 *
 *   tk_loglik *ll = tk_loglik_new(m, &err);
 *   const int32_t *seqs[3] = {...};          // context + continuation tokens of each candidate
 *   size_t lens[3], begins[3];                // continuation = seqs[b][begins[b] .. lens[b])
 *   double lp[3];
 *   if (tk_loglik_score(ll, seqs, lens, begins, 3, lp, NULL, &err) != 0) ...
 *   tk_loglik_free(ll);
 *
 * The B sequences run as one right-padded batch (pad id 0, attention mask 0 on pads; causal
 * attention means a real token never sees a pad, so each score equals the sequence run alone).
 * lp[b] = sum_{t = begin}^{len-1} log softmax(logits[t-1])[seq[t]], in double from fp32 logits.
 * greedy[b] (optional) = 1 when every continuation token is the argmax of its position (lm-eval's
 * is_greedy). The gated adapters apply as in training.
 *
 * Memory: activations for the largest batch seen (grown on demand: B x T training activations,
 * including the [B, H, T, T] attention probabilities of every layer).
 *
 * Ownership: the scorer borrows the model (which must outlive it) and owns its activations. Failure:
 * -1 with err set (empty continuation, token outside the vocabulary, out of memory, sequence longer
 * than the model's positions).
 */
#ifndef TK_EVAL_LOGLIK_H
#define TK_EVAL_LOGLIK_H

#include "../model/llama.h"

typedef struct tk_loglik tk_loglik;

tk_loglik *tk_loglik_new(tk_llama *m, tk_err *err);
void tk_loglik_free(tk_loglik *ll); /* NULL is fine */
/* seqs[b] [lens[b]]; 1 <= begins[b] < lens[b]. out [B], greedy [B] or NULL. */
int tk_loglik_score(tk_loglik *ll, const int32_t *const *seqs, const size_t *lens, const size_t *begins,
                    size_t B, double *out, int *greedy, tk_err *err);

#endif
