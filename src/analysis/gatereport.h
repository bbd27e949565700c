/* gatereport.h: reads a run's gate logs (gatelog.h: gates.jsonl, train_log.jsonl, tokens.jsonl),
 * summarises them (keep ratio per module and token kind over the last K steps, thresholds, r
 * quantiles, discarded fraction, selectivity) and draws the report pictures as SVG (svg.h). docs/gates.md.
 *
 *   tk_gaterun *r = tk_gaterun_load("runs/x", &err);        // NULL + err naming the file and line
 *   tk_gatesum sum;  tk_gatesum_compute(&sum, r, 10, &err);  // window: last 10 logged steps (0: all)
 *   sum.sel.interior_share ...                               // selectivity (gatelog.h tk_gatesel)
 *   tk_gaterun_plots(r, &sum, "runs/x/report", tok, &err);   // SVGs + tokens.html; tok may be NULL
 *   tk_gatesum_free(&sum); tk_gaterun_free(r);
 *
 * Steps logged twice (a resumed run re-logs the steps after its checkpoint) keep the last line.
 * Ownership: the caller frees what load/compute return with the matching free (accepting NULL).
 */
#ifndef TK_ANALYSIS_GATEREPORT_H
#define TK_ANALYSIS_GATEREPORT_H

#include "../common.h"
#include "../peft/peft_config.h"
#include "gatelog.h"

#include <stddef.h>

typedef struct {
    int step;
    double loss, lr, grad_norm, tokens_per_s, keep;
} tk_train_rec;

typedef struct {
    size_t M;                 /* modules */
    char **names;             /* [M] "model.layers.3.self_attn.q_proj", or a vision tower module
                                 "vision_model.encoder.layers.1.mlp.fc1" (also under "vision_tower.") */
    int *layer, *proj;        /* [M]; proj: 0..TK_NPROJ-1 LLaMA, TK_NPROJ + j tower projection j */
    int n_layers, gated, with_lambda;
    int tower_layers;         /* the header's "tower_layers" (0: none; tower modules then count n_layers) */
    size_t M_tower;           /* modules with proj >= TK_NPROJ */
    int has_n_tower;          /* some step line has "n_tower" (a LLaVA run that adapts the tower) */
    double target_keep;       /* 0: none */
    size_t S;                 /* logged steps, ascending */
    int *step;                /* [S] */
    double *n;                /* [S,K] tokens per kind ("n": the LLaMA's modules see them) */
    double *n_tower;          /* [S,K] tokens per kind the tower's modules see ("n_tower"; "n" in a line
                                 without it): use tk_gaterun_seen */
    double *tau;              /* [S,M] applied in the step */
    double *lambda;           /* [S,M] (with_lambda) */
    double *kept;             /* [S,M,K] */
    double *q;                /* [S,M,3] p10 p50 p90 (NAN: not recorded) */
    double *hist;             /* [S,M,NB] */
    size_t n_train;
    tk_train_rec *train;      /* [n_train] ascending step */
    /* the last token view (NULL ids: none) */
    int view_step;
    size_t view_len, view_modules;
    int *view_ids;            /* [view_len] */
    int *view_kept;           /* [view_len] */
    int *view_kind;           /* [view_len] column 0..3, -1 unknown */
} tk_gaterun;

tk_gaterun *tk_gaterun_load(const char *run_dir, tk_err *err);
/* The tokens per kind [K] module m saw at logged step s: "n_tower" for a tower module, else "n". */
const double *tk_gaterun_seen(const tk_gaterun *r, size_t s, size_t m);
/* The short name of proj index p ("q_proj", ..., "down_proj"; tower: "v.q_proj", ..., "v.fc2"). */
const char *tk_gaterun_proj_name(int p);
#define TK_GATERUN_NPROJ (TK_NPROJ + TK_VIT_NPROJ)
void tk_gaterun_free(tk_gaterun *r);

typedef struct {
    int window;               /* steps averaged (the last `window` logged steps) */
    int first_step, last_step;
    double *keep;             /* [M] kept / seen in the window (each module its own tokens) */
    double *keep_kind;        /* [M,K] (NAN where the module saw no tokens of the kind) */
    double *tau;              /* [M] tau applied at the last logged step */
    double *q;                /* [M,3] r quantiles at the last logged step */
    double kind_tokens[TK_GATELOG_NKIND]; /* tokens per kind in the window ("n") */
    double kind_keep[TK_GATELOG_NKIND];   /* over the modules that count "n" (NAN: no tokens) */
    double tower_tokens[TK_GATELOG_NKIND]; /* the tower's tokens per kind in the window (has_n_tower) */
    double tower_keep[TK_GATELOG_NKIND];  /* over the tower's modules, when has_n_tower (else NAN) */
    double keep_window;       /* kept / seen over all modules and kinds in the window */
    double discarded_run;     /* 1 - kept / seen over every module and logged step */
    double discarded_window;
    size_t *order;            /* [M] module indices by keep, descending (ties: module order) */
    double *kind_spread;      /* [M] max - min of keep_kind over the kinds with tokens (NAN: none) */
    tk_gatesel sel;           /* selectivity over the window (gatelog.h) */
} tk_gatesum;

/* window <= 0 or larger than the run: every logged step. */
int tk_gatesum_compute(tk_gatesum *s, const tk_gaterun *r, int window, tk_err *err);
void tk_gatesum_free(tk_gatesum *s);

/* The report pictures in out_dir (created when missing): keep_heatmap.svg (+ keep_heatmap_<kind>.svg
 * per token kind present when there is more than one), tau.svg, r_hist.svg, loss.svg (when
 * train_log.jsonl has steps), tokens.html (when tokens.jsonl has a view). decode: piece for an id, or
 * NULL (ids shown); ctx is passed to it. *n_written counts the files. */
typedef const char *(*tk_piece_fn)(void *ctx, int id);
int tk_gaterun_plots(const tk_gaterun *r, const tk_gatesum *s, const char *out_dir, tk_piece_fn decode, void *ctx,
                     int *n_written, tk_err *err);

extern const char *const tk_gate_kind_names[TK_GATELOG_NKIND];

#endif
