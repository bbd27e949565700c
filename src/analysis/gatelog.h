/* gatelog.h: the gate recorder. During training (or evaluation) it appends, per optimizer step, one
 * line of gate statistics per run to RUN_DIR/gates.jsonl, one line of training figures to
 * RUN_DIR/train_log.jsonl and, at chosen steps, a token view of one sample to RUN_DIR/tokens.jsonl.
 * Formats: docs/gates.md. Each line is flushed when written (a killed run keeps what it logged).
 *
 *   tk_gatelog_opts go = {.token_view_every = 0, .last_step = steps, .append = resuming};
 *   tk_gatelog *g = tk_gatelog_open("runs/x", m, &go, &err);          // NULL + err on failure
 *   per micro-batch, after tk_llama_forward (or backward):
 *       tk_gatelog_batch(g, m, acts, B, T, step, &err);   // S_i, r_i, kinds of the micro-batch
 *   per optimizer step, after the threshold update:
 *       tk_gatelog_step(g, m, &(tk_gatelog_step_info){step, loss, lr, gnorm, tokens, secs}, &err);
 *   at the end of a successful run:  tk_gatelog_finish(g, &err);   // NAME.part -> NAME
 *   tk_gatelog_close(g, keep_partial);                        // accepts NULL
 *
 * While the run goes on the logs are RUN_DIR/NAME.part (flushed per line), renamed to NAME by
 * tk_gatelog_finish: a failed run never replaces an earlier run's logs. tk_gatelog_close removes
 * unfinished .part files unless keep_partial (a run stopped by a signal after saving a checkpoint:
 * its resumption continues them).
 *
 * What is recorded per adapted module and step: the threshold tau that was applied in the step (the
 * one that decided S_i), lambda (with a target keep ratio), kept and seen token counts split by token
 * kind (prompt / response / image / other; "other" holds every token when acts->kinds is NULL), the
 * p10/p50/p90 of r_i (from the module's tk_gate_stats, so only in training) and a 26-bin log-scale
 * histogram of r_i (bin 0: r < 1e-4; bin j in 1..24: [10^(-4+(j-1)/4), 10^(-4+j/4)); bin 25: r >= 100).
 * Only tokens with attention mask 1 count. The recorder reads L->S, L->rr and L->stats; it changes
 * nothing in the model. Cost: O(tokens x modules) per micro-batch plus one selection per module and
 * step (about 1% of a tiny model's step, less on larger ones: docs/gates.md "Cost").
 *
 * Ownership: the recorder owns its files and buffers; m and acts are only read during each call.
 * Failure: -1 / NULL with err naming the file.
 */
#ifndef TK_ANALYSIS_GATELOG_H
#define TK_ANALYSIS_GATELOG_H

#include "../common.h"
#include "../model/llama.h"

#define TK_GATELOG_NKIND 4 /* prompt, response, image, other */
#define TK_GATELOG_NBIN 26
#define TK_GATELOG_VERSION 1

typedef struct {
    int token_view_every; /* also write a token view every N steps (0: only at last_step) */
    int last_step;        /* write a token view at this step (the run's last; 0: never) */
    int append;           /* continue existing logs (a resumed run); else they are started afresh */
} tk_gatelog_opts;

typedef struct {
    int step;          /* 1-based optimizer step */
    double loss;       /* the step's mean loss */
    double lr;         /* learning rate used */
    double grad_norm;  /* before clipping */
    double tokens;     /* non-pad tokens of the step */
    double seconds;    /* wall time of the step */
} tk_gatelog_step_info;

typedef struct tk_gatelog tk_gatelog;

/* Creates (or, with append, continues) run_dir/{gates,train_log,tokens}.jsonl(.part). run_dir must exist.
 * The module list is every adapted module of m in (layer, projection) order. */
tk_gatelog *tk_gatelog_open(const char *run_dir, const tk_llama *m, const tk_gatelog_opts *o, tk_err *err);
/* Accumulates one micro-batch [B,T] of the step (a new step number starts new counts). Writes the
 * token view of row 0 of the step's first micro-batch when the step is a token-view step. */
int tk_gatelog_batch(tk_gatelog *g, const tk_llama *m, const tk_llama_acts *a, size_t B, size_t T, int step,
                     tk_err *err);
/* Writes the step's lines (gates.jsonl only when the model has adapted modules) and starts new counts. */
int tk_gatelog_step(tk_gatelog *g, const tk_llama *m, const tk_gatelog_step_info *s, tk_err *err);
/* Closes the logs and renames NAME.part to NAME. */
int tk_gatelog_finish(tk_gatelog *g, tk_err *err);
void tk_gatelog_close(tk_gatelog *g, int keep_partial);
/* Wall time spent inside the recorder so far (its cost, reported by the trainer). */
double tk_gatelog_seconds(const tk_gatelog *g);

/* The histogram bin of r (shared with the reader). */
int tk_gatelog_bin(float r);
/* The element of rank k (0-based, ascending) of x[0..n), k < n: Wirth's selection, x is reordered. */
float tk_select_rank(float *x, size_t n, size_t k);
/* Lower edge of bin j >= 1 (10^(-4+(j-1)/4)); 0 for bin 0. */
double tk_gatelog_bin_lo(int j);

#endif
