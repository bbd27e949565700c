/* gatelog.h: the gate recorder. During training (or evaluation) it appends, per optimizer step, one
 * line of gate statistics per run to RUN_DIR/gates.jsonl, one line of training figures to
 * RUN_DIR/train_log.jsonl and, at chosen steps, a token view of one sample to RUN_DIR/tokens.jsonl.
 * Formats: docs/gates.md. Each line is flushed when written (a killed run keeps what it logged).
 *
 *   tk_gatelog_opts go = {.token_view_every = 0, .last_step = steps, .append = resuming};
 *   tk_gatelog *g = tk_gatelog_open("runs/x", m, &go, &err);          // NULL + err on failure
 *   per micro-batch, after tk_llama_forward (or backward):
 *       tk_gatelog_batch(g, m, acts, B, T, step, &err);   // S_i, r_i, kinds of the micro-batch
 *       tk_gatelog_tower_batch(g, rows, step, &err);       // with go.tower: the tower's rows
 *   per optimizer step, after the threshold update:
 *       tk_gatelog_step(g, m, &(tk_gatelog_step_info){step, loss, lr, gnorm, tokens, secs}, &err);
 *   at the end of a successful run:  tk_gatelog_finish(g, &err);   // NAME.part -> NAME
 *   tk_gatelog_close(g, keep_partial);                        // accepts NULL
 *   tk_gatesel sel; int found;                                // selectivity over the last 10 steps
 *   tk_gatesel_read(&sel, "runs/x/gates.jsonl", TK_GATELOG_WINDOW, &found, &err);
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
 * Only tokens with attention mask 1 count. With tower modules (o->tower) each step line also holds
 * "n_tower", the tower's rows of the step (all image tokens), to which the tower modules' kept counts,
 * quantiles and histograms refer; the LLaMA's modules refer to "n". The token view covers the LLaMA's
 * modules only. The recorder reads L->S, L->rr and L->stats; it changes nothing in the model. Cost: O(tokens x modules) per micro-batch plus one selection per module and
 * step (about 1% of a tiny model's step, less on larger ones: docs/gates.md "Cost").
 *
 * Ownership: the recorder owns its files and buffers; m and acts are only read during each call.
 * tk_gatesel_json returns a cJSON object the caller deletes.
 * Failure: -1 / NULL with err naming the file.
 */
#ifndef TK_ANALYSIS_GATELOG_H
#define TK_ANALYSIS_GATELOG_H

#include "../common.h"
#include "../model/llama.h"

#include <cJSON.h>

#define TK_GATELOG_NKIND 4 /* prompt, response, image, other */
#define TK_GATELOG_NBIN 26
#define TK_GATELOG_VERSION 1
#define TK_GATELOG_WINDOW 10 /* the summaries' default window: the last 10 logged steps */

/* The vision tower's adapted modules (a LLaVA run that adapts the tower): recorded after the LLaMA's,
 * each with its own token counts (a tower module sees images x tokens per image, all of kind image). */
typedef struct {
    size_t n;                         /* adapted tower modules */
    tk_adapted_linear *const *mods;   /* [n] */
    const int *layer, *proj;          /* [n] tower layer and projection (TK_VIT_Q .. TK_VIT_FC2) */
    int n_layers;                     /* the tower's layer count */
    const char *prefix;               /* the config's tower prefix, e.g. "vision_tower.vision_model." */
} tk_gatelog_tower;

typedef struct {
    int token_view_every; /* also write a token view every N steps (0: only at last_step) */
    int last_step;        /* write a token view at this step (the run's last; 0: never) */
    int append;           /* continue existing logs (a resumed run); else they are started afresh */
    const tk_gatelog_tower *tower; /* NULL: no tower modules (the struct is copied at open; the arrays
                                      are borrowed for the recorder's life) */
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
 * The module list is every adapted module of m in (layer, projection) order, then o->tower's modules
 * in their order (named o->tower->prefix + "encoder.layers.L.<block>.<proj>"). */
tk_gatelog *tk_gatelog_open(const char *run_dir, const tk_llama *m, const tk_gatelog_opts *o, tk_err *err);
/* Accumulates one micro-batch [B,T] of the step (a new step number starts new counts). Writes the
 * token view of row 0 of the step's first micro-batch when the step is a token-view step. */
int tk_gatelog_batch(tk_gatelog *g, const tk_llama *m, const tk_llama_acts *a, size_t B, size_t T, int step,
                     tk_err *err);
/* After each micro-batch (after tk_gatelog_batch of the same step): the tower's last forward covered
 * `rows` rows (images x tokens per image); reads mods[k]->S[0..rows) and ->rr[0..rows). Every row
 * counts as an image token. */
int tk_gatelog_tower_batch(tk_gatelog *g, size_t rows, int step, tk_err *err);
/* Writes the step's lines (gates.jsonl only when there are adapted modules) and starts new counts.
 * The quantiles come from each module's L->stats, so call it before the stats are reset. */
int tk_gatelog_step(tk_gatelog *g, const tk_llama *m, const tk_gatelog_step_info *s, tk_err *err);
/* Closes the logs and renames NAME.part to NAME. */
int tk_gatelog_finish(tk_gatelog *g, tk_err *err);
void tk_gatelog_close(tk_gatelog *g, int keep_partial);
/* Wall time spent inside the recorder so far (its cost, reported by the trainer). */
double tk_gatelog_seconds(const tk_gatelog *g);

/* ---- selectivity: do the gates choose tokens, or switch whole modules on and off? ---------------
 * (docs/gates.md "Selectivity"). From the counts of a window of logged steps, n_m[K] tokens per kind
 * seen by module m (the same for every module, except the vision tower's modules of a LLaVA run, which
 * see the tower's rows) and kept[M,K]:
 *   keep_m       = sum_j kept[m][j] / tokens_m (tokens_m = sum_j n_m[j]); module m is interior when
 *                  LO <= keep_m <= HI (a module without tokens in the window counts in none of the three)
 *   interior_share = sum over interior m of tokens_m / sum over m of tokens_m
 *   spread_m     = max_j - min_j of kept[m][j] / n_m[j] over the kinds j with n_m[j] > 0
 *   kind_spread_mean = sum_m tokens_m spread_m / sum_m tokens_m;  kind_spread_max = max_m spread_m
 *   kind_spread_overall = max_j - min_j of sum_m kept[m][j] / sum_m n_m[j]
 * A module whose keep is 0 or 1 makes no choice among tokens: it is a switch. A dense run has keep 1
 * everywhere: interior_share 0 and every spread 0. Every figure is over token decisions, so the tower's
 * modules count with their own (image) tokens; one kind each, their spread is 0. */
#define TK_GATESEL_LO 0.05
#define TK_GATESEL_HI 0.95

typedef struct {
    int gated;                  /* the run's gates were on (gates.jsonl header) */
    int steps;                  /* logged steps in the window */
    int first_step, last_step;  /* the window's first and last step numbers */
    size_t modules;             /* M */
    size_t interior_modules;    /* LO <= keep <= HI */
    size_t modules_open;        /* keep > HI */
    size_t modules_closed;      /* keep < LO */
    double interior_share;      /* NAN: no tokens in the window */
    double kind_spread_mean, kind_spread_max, kind_spread_overall; /* NAN: no tokens */
    unsigned kinds;             /* bit j: kind j had tokens in the window */
} tk_gatesel;

/* Fills the figures of s (modules .. kinds) from window sums n [K] (every module's) and kept [M,K];
 * gated and the window fields are the caller's. spread [M] (may be NULL) receives spread_m (NAN: no
 * tokens). */
void tk_gatesel_compute(tk_gatesel *s, const double *n, const double *kept, size_t M, double *spread);
/* The same with each module's own window sums n [M,K]. */
void tk_gatesel_compute_own(tk_gatesel *s, const double *n, const double *kept, size_t M, double *spread);
/* Reads the last `window` logged steps (window <= 0: every step; a step logged twice counts its last
 * line) of a gates log (RUN_DIR/gates.jsonl, or gates.jsonl.part while the run goes on) into s,
 * reading the file from its end: the cost is the window's lines, not the run's. *found = 0 and 0
 * returned when the file does not exist or has no step line; -1 with err naming the file and byte
 * offset of a malformed line. */
int tk_gatesel_read(tk_gatesel *s, const char *path, int window, int *found, tk_err *err);
/* s as a JSON object (the "selectivity" of `tspeft gates --format json` and train_summary.json):
 * {"window": {"steps", "first_step", "last_step"}, "gated", "interior_range": [LO, HI],
 *  "interior_share", "interior_modules", "modules_open", "modules_closed", "modules",
 *  "kind_spread_mean", "kind_spread_max", "kind_spread_overall", "kinds": [names]}; NAN as null.
 * The caller owns the result (cJSON_Delete); NULL when out of memory. */
cJSON *tk_gatesel_json(const tk_gatesel *s);

/* A vision tower module name, "<prefix>encoder.layers.L.<block>.<proj>" with prefix
 * "vision_tower.vision_model.", "model.vision_tower.vision_model." or "vision_model.": 1 with *layer
 * and *proj (0 .. TK_VIT_NPROJ-1: vision/vit_train.h's TK_VIT_Q .. TK_VIT_FC2), else 0. */
int tk_gatelog_tower_module(const char *name, int *layer, int *proj);
/* The largest module list a gates log may hold. */
#define TK_GATELOG_MAX_MODULES ((size_t)TK_MAX_LAYERS * (TK_NPROJ + TK_VIT_NPROJ))

/* The histogram bin of r (shared with the reader). */
int tk_gatelog_bin(float r);
/* The element of rank k (0-based, ascending) of x[0..n), k < n: Wirth's selection, x is reordered. */
float tk_select_rank(float *x, size_t n, size_t k);
/* Lower edge of bin j >= 1 (10^(-4+(j-1)/4)); 0 for bin 0. */
double tk_gatelog_bin_lo(int j);

#endif
