/* cmd_gates.c: `tspeft gates RUN_DIR`: where the gates opened, from the run's gate logs
 * (src/analysis/gatereport.h): a terminal summary, or JSON / CSV of the same numbers, and the report
 * pictures (SVG, tokens.html). docs/gates.md. */
#include "../../text/tokenizer.h"
#include "../analysis/gatereport.h"
#include "../peft/peft_config.h"
#include "args.h"
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *USAGE =
    "usage: tspeft gates RUN_DIR [--format table|json|csv] [--last K] [--out DIR] [--plots on|off]\n"
    "                    [--tokenizer tokenizer.model]\n"
    "Summarises where the TS-PEFT gates opened in a training run (RUN_DIR = the --out directory of\n"
    "`tspeft train`, holding gates.jsonl): keep ratio per layer and module, by token kind, thresholds,\n"
    "the most and least kept modules, the fraction of token updates discarded and the selectivity (do\n"
    "the gates choose tokens or switch whole modules); writes SVG pictures and a token view\n"
    "(tokens.html) into --out (default RUN_DIR/report).";

/* JSON number or null. */
static void jnum(FILE *f, double v) {
    if (isnan(v) || isinf(v)) fputs("null", f);
    else fprintf(f, "%.9g", v);
}

static int print_json(FILE *f, const char *run_dir, const tk_gaterun *r, const tk_gatesum *s, int top, tk_err *err) {
    cJSON *sel = tk_gatesel_json(&s->sel);
    char *sel_text = sel ? cJSON_PrintUnformatted(sel) : NULL;
    cJSON_Delete(sel);
    if (!sel_text) return tk_fail(err, "out of memory");
    fprintf(f, "{\n  \"run_dir\": \"");
    for (const char *p = run_dir; *p; p++) {
        if (*p == '"' || *p == '\\') fputc('\\', f);
        if ((unsigned char)*p >= 0x20) fputc(*p, f);
    }
    fprintf(f, "\",\n  \"gated\": %s,\n  \"logged_steps\": %zu,\n", r->gated ? "true" : "false", r->S);
    fprintf(f, "  \"window\": {\"steps\": %d, \"first_step\": %d, \"last_step\": %d},\n", s->window, s->first_step,
            s->last_step);
    fputs("  \"keep_window\": ", f);
    jnum(f, s->keep_window);
    fputs(",\n  \"discarded_fraction_window\": ", f);
    jnum(f, s->discarded_window);
    fputs(",\n  \"discarded_fraction_run\": ", f);
    jnum(f, s->discarded_run);
    fputs(",\n  \"kinds\": {", f);
    for (int j = 0; j < TK_GATELOG_NKIND; j++) {
        fprintf(f, "%s\"%s\": {\"tokens\": %.0f, \"keep\": ", j ? ", " : "", tk_gate_kind_names[j], s->kind_tokens[j]);
        jnum(f, s->kind_keep[j]);
        fputc('}', f);
    }
    if (r->has_n_tower) { /* the vision tower's modules, with their own tokens */
        fputs("},\n  \"tower_kinds\": {", f);
        for (int j = 0; j < TK_GATELOG_NKIND; j++) {
            fprintf(f, "%s\"%s\": {\"tokens\": %.0f, \"keep\": ", j ? ", " : "", tk_gate_kind_names[j], s->tower_tokens[j]);
            jnum(f, s->tower_keep[j]);
            fputc('}', f);
        }
    }
    fprintf(f, "},\n  \"selectivity\": %s", sel_text);
    free(sel_text);
    fputs(",\n  \"modules\": [\n", f);
    for (size_t m = 0; m < r->M; m++) {
        fprintf(f, "    {\"module\": \"%s\", \"layer\": %d, \"proj\": \"%s\", \"keep\": ", r->names[m], r->layer[m],
                tk_gaterun_proj_name(r->proj[m]));
        jnum(f, s->keep[m]);
        for (int j = 0; j < TK_GATELOG_NKIND; j++) {
            fprintf(f, ", \"keep_%s\": ", tk_gate_kind_names[j]);
            jnum(f, s->keep_kind[m * TK_GATELOG_NKIND + j]);
        }
        fputs(", \"tau\": ", f);
        jnum(f, s->tau[m]);
        static const char *const qn[3] = {"r_p10", "r_p50", "r_p90"};
        for (int j = 0; j < 3; j++) {
            fprintf(f, ", \"%s\": ", qn[j]);
            jnum(f, s->q[m * 3 + j]);
        }
        fputs(", \"kind_spread\": ", f);
        jnum(f, s->kind_spread[m]);
        fprintf(f, "}%s\n", m + 1 < r->M ? "," : "");
    }
    fputs("  ],\n  \"most_kept\": [", f);
    for (int i = 0; i < top && (size_t)i < r->M; i++) fprintf(f, "%s\"%s\"", i ? ", " : "", r->names[s->order[i]]);
    fputs("],\n  \"least_kept\": [", f);
    for (int i = 0; i < top && (size_t)i < r->M; i++) fprintf(f, "%s\"%s\"", i ? ", " : "", r->names[s->order[r->M - 1 - i]]);
    fputs("]\n}\n", f);
    return 0;
}

static void cnum(FILE *f, double v) {
    if (!isnan(v)) fprintf(f, "%.9g", v);
}

static void print_csv(FILE *f, const tk_gaterun *r, const tk_gatesum *s) {
    fputs("module,layer,proj,keep,keep_prompt,keep_response,keep_image,keep_other,tau,r_p10,r_p50,r_p90,kind_spread\n", f);
    for (size_t m = 0; m < r->M; m++) {
        fprintf(f, "%s,%d,%s,", r->names[m], r->layer[m], tk_gaterun_proj_name(r->proj[m]));
        cnum(f, s->keep[m]);
        for (int j = 0; j < TK_GATELOG_NKIND; j++) {
            fputc(',', f);
            cnum(f, s->keep_kind[m * TK_GATELOG_NKIND + j]);
        }
        fputc(',', f);
        cnum(f, s->tau[m]);
        for (int j = 0; j < 3; j++) {
            fputc(',', f);
            cnum(f, s->q[m * 3 + j]);
        }
        fputc(',', f);
        cnum(f, s->kind_spread[m]);
        fputc('\n', f);
    }
}

static void cell(FILE *f, double v, int width) {
    if (isnan(v)) fprintf(f, "%*s", width, "-");
    else fprintf(f, "%*.3f", width, v);
}

/* Do the gates choose tokens, or only switch whole modules on and off? (docs/gates.md "Selectivity") */
static void print_selectivity(FILE *f, const tk_gatesel *g) {
    fprintf(f, "\nselectivity over the last %d logged steps (do the gates choose tokens, or switch whole modules?):\n",
            g->steps);
    if (!g->gated)
        fputs("  dense (ungated) run: every module applies its update to every token; nothing is selected\n", f);
    fputs("  interior share     ", f);
    cell(f, g->interior_share, 6);
    fprintf(f, "  share of token decisions made in modules whose keep lies in [%.2f, %.2f]\n"
               "                             (%zu of %zu modules; %zu keep more, %zu less: on / off switches)\n",
            TK_GATESEL_LO, TK_GATESEL_HI, g->interior_modules, g->modules, g->modules_open, g->modules_closed);
    int nk = 0;
    for (int j = 0; j < TK_GATELOG_NKIND; j++) nk += (g->kinds >> j) & 1;
    fputs("  kind spread, mean  ", f);
    cell(f, g->kind_spread_mean, 6);
    fprintf(f, "  per module, max - min keep over the token kinds present (%d), mean over modules%s\n", nk,
            nk < 2 ? " (one kind: no spread)" : "");
    fputs("  kind spread, max   ", f);
    cell(f, g->kind_spread_max, 6);
    fputs("  the largest spread of one module\n", f);
    fputs("  kind spread, all   ", f);
    cell(f, g->kind_spread_overall, 6);
    fputs("  max - min of the keep by kind over all modules\n", f);
}

static void print_table(FILE *f, const char *run_dir, const tk_gaterun *r, const tk_gatesum *s, int top) {
    fprintf(f, "%s: %zu %s modules, %zu logged steps; keep ratios are means over the last %d logged steps (%d-%d)\n\n",
            run_dir, r->M, r->gated ? "gated" : "ungated (dense)", r->S, s->window, s->first_step, s->last_step);
    int n_llm = 0, n_tower = 0;
    for (size_t m = 0; m < r->M; m++) *(r->proj[m] < TK_NPROJ ? &n_llm : &n_tower) += 1;
    for (int blk = 0; blk < 2; blk++) { /* the LLaMA's modules, then the vision tower's in their own block */
        if (!(blk ? n_tower : n_llm)) continue;
        int p0 = blk ? TK_NPROJ : 0, p1 = blk ? TK_GATERUN_NPROJ : TK_NPROJ;
        int rows = blk && r->tower_layers ? r->tower_layers : r->n_layers;
        fprintf(f, "%skeep ratio (kept / seen tokens), %slayer x module:\n%-8s", blk && n_llm ? "\n" : "",
                blk ? "vision tower, " : "", "layer");
        int w = blk ? 11 : 10;
        for (int p = p0; p < p1; p++) fprintf(f, "%*s", w, tk_gaterun_proj_name(p));
        fputc('\n', f);
        for (int l = 0; l < rows; l++) {
            fprintf(f, "%-8d", l);
            for (int p = p0; p < p1; p++) {
                double v = NAN;
                for (size_t m = 0; m < r->M; m++)
                    if (r->layer[m] == l && r->proj[m] == p) v = s->keep[m];
                cell(f, v, w);
            }
            fputc('\n', f);
        }
    }
    int present[TK_GATELOG_NKIND], np = 0;
    for (int j = 0; j < TK_GATELOG_NKIND; j++) np += (present[j] = s->kind_tokens[j] > 0 || s->tower_tokens[j] > 0);
    fprintf(f, "\nkeep ratio by token kind (module type averaged over layers):\n%-12s%10s", "module", "all");
    for (int j = 0; j < TK_GATELOG_NKIND; j++)
        if (present[j]) fprintf(f, "%10s", tk_gate_kind_names[j]);
    fputc('\n', f);
    for (int p = 0; p <= TK_GATERUN_NPROJ; p++) {
        double all = 0, n = 0, kj[TK_GATELOG_NKIND] = {0};
        for (size_t m = 0; m < r->M; m++) {
            if (p < TK_GATERUN_NPROJ && r->proj[m] != p) continue;
            all += s->keep[m];
            for (int j = 0; j < TK_GATELOG_NKIND; j++) kj[j] += s->keep_kind[m * TK_GATELOG_NKIND + j];
            n++;
        }
        if (n == 0) continue;
        fprintf(f, "%-12s", p < TK_GATERUN_NPROJ ? tk_gaterun_proj_name(p) : "all");
        cell(f, all / n, 10);
        for (int j = 0; j < TK_GATELOG_NKIND; j++)
            if (present[j]) cell(f, kj[j] / n, 10);
        fputc('\n', f);
    }
    fprintf(f, "%-12s%10s", "tokens", "");
    for (int j = 0; j < TK_GATELOG_NKIND; j++)
        if (present[j]) fprintf(f, "%10.0f", s->kind_tokens[j]);
    fputc('\n', f);
    if (r->has_n_tower) { /* the tower's modules see their own tokens: images x tokens per image */
        fprintf(f, "%-12s%10s", "tower tokens", "");
        for (int j = 0; j < TK_GATELOG_NKIND; j++)
            if (present[j]) fprintf(f, "%10.0f", s->tower_tokens[j]);
        fputc('\n', f);
    }
    if (np == 1 && present[3]) fputs("(token kinds were not recorded: the data had none)\n", f);
    int n = top < (int)r->M ? top : (int)r->M;
    fprintf(f, "\nmost kept (keep, final tau):\n");
    for (int i = 0; i < n; i++) {
        size_t m = s->order[i];
        fprintf(f, "  %-48s %.3f  %.4g\n", r->names[m], s->keep[m], s->tau[m]);
    }
    fprintf(f, "least kept:\n");
    for (int i = 0; i < n; i++) {
        size_t m = s->order[r->M - 1 - i];
        fprintf(f, "  %-48s %.3f  %.4g\n", r->names[m], s->keep[m], s->tau[m]);
    }
    fprintf(f, "\ntoken updates discarded: %.1f%% over the whole run, %.1f%% over the last %d logged steps\n",
            100.0 * s->discarded_run, 100.0 * s->discarded_window, s->window);
    print_selectivity(f, &s->sel);
}

static const char *piece_of(void *ctx, int id) {
    tk_tokenizer *tok = ctx;
    return id >= 0 && id < tk_tok_vocab_size(tok) ? tk_tok_id_to_piece(tok, id) : NULL;
}

int tk_cmd_gates(int argc, char **argv) {
    const char *run_dir = NULL, *format = "table", *out = NULL, *tokenizer = NULL;
    int last = TK_GATELOG_WINDOW, plots = 1, top = 5;
    tk_opt opts[] = {
        {"format", TK_OPT_STR, &format, "F", "table | json | csv (default table)", 0},
        {"last", TK_OPT_INT, &last, "K", "average keep ratios over the last K logged steps, 0 = all (default 10)", 0},
        {"out", TK_OPT_STR, &out, "DIR", "pictures go here (default RUN_DIR/report)", 0},
        {"plots", TK_OPT_FLAG, &plots, "on|off", "write the SVG pictures and tokens.html (default on)", 0},
        {"tokenizer", TK_OPT_STR, &tokenizer, "FILE", "sentencepiece model: the token view shows text pieces, not ids", 0},
        {"top", TK_OPT_INT, &top, "N", "how many most / least kept modules to list (default 5)", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    if (argc > 0 && strncmp(argv[0], "--", 2) != 0) {
        run_dir = argv[0];
        argc--;
        argv++;
    }
    int pr = tk_args_parse(opts, n, argc, argv, USAGE, &err);
    if (pr == 1) return 0;
    if (pr == 0 && !run_dir) tk_fail(&err, "gates needs RUN_DIR (the --out directory of tspeft train); see --help");
    if (pr == 0 && run_dir && strcmp(format, "table") && strcmp(format, "json") && strcmp(format, "csv"))
        tk_fail(&err, "--format: \"%s\" is not table, json or csv", format), pr = -1;
    if (pr == 0 && (last < 0 || top < 0)) tk_fail(&err, "--last and --top must be >= 0"), pr = -1;
    if (pr < 0 || !run_dir) {
        fprintf(stderr, "tspeft gates: %s\n", err.msg);
        return 2;
    }
    int status = 1;
    tk_gaterun *r = NULL;
    tk_gatesum s = {0};
    tk_tokenizer *tok = NULL;
    char outdir[4096];
    if (!(r = tk_gaterun_load(run_dir, &err)) || tk_gatesum_compute(&s, r, last, &err)) goto done;
    if (r->S == 0) {
        tk_fail(&err, "%s/gates.jsonl: no step lines yet", run_dir);
        goto done;
    }
    if (tokenizer && !(tok = tk_tok_open(tokenizer, &err))) goto done;
    if (strcmp(format, "json") == 0) {
        if (print_json(stdout, run_dir, r, &s, top, &err)) goto done;
    }
    else if (strcmp(format, "csv") == 0) print_csv(stdout, r, &s);
    else print_table(stdout, run_dir, r, &s, top);
    if (plots) {
        int nw = 0;
        if (out) snprintf(outdir, sizeof outdir, "%s", out);
        else if (tk_pathf(outdir, sizeof outdir, &err, "%s/report", run_dir)) goto done;
        if (tk_gaterun_plots(r, &s, outdir, tok ? piece_of : NULL, tok, &nw, &err)) goto done;
        fprintf(stderr, "tspeft gates: %d pictures written to %s\n", nw, outdir);
    }
    status = 0;
done:
    if (status) fprintf(stderr, "tspeft gates: %s\n", err.msg);
    tk_tok_free(tok);
    tk_gatesum_free(&s);
    tk_gaterun_free(r);
    return status;
}
