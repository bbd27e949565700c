/* cmd_select.c: `tspeft select RUN_DIR --criterion C --budget K%`: ranks a run's adapted modules by
 * importance and writes the top K% as a target-module list that `tspeft train --target-modules @FILE`
 * reads (docs/gates.md "Module selection").
 *
 * Criteria (higher score = more important):
 *   keep      the module's learned keep ratio over the last --last logged steps (gates.jsonl)
 *   ba_norm   ||B A||_F of the run's adapter (lora_B lora_A, or adapter_up adapter_down), unscaled:
 *             ||B A||_F^2 = <B^T B, A A^T>_F, two rank-sized sgemm products
 *   a_b_norm  ||A||_F * ||B||_F
 *   random    a seeded permutation (--seed)
 * Shapes: A [R,I], B [O,R], R the rank.
 */
#include "../analysis/gatereport.h"
#include "../io/safetensors.h"
#include "../ops/blas.h"
#include "../peft/peft_config.h"
#include "../train/optim.h"
#include "args.h"
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *USAGE =
    "usage: tspeft select RUN_DIR --criterion keep|ba_norm|a_b_norm|random --budget 25% [--seed S]\n"
    "                     [--last K] [--out modules.txt|modules.json]\n"
    "Ranks the adapted modules of a run (a short probe run of `tspeft train --target-modules all`) and\n"
    "writes the most important K% as a target-module list: one full module name per line, or JSON with\n"
    "--out *.json. Train on them with `tspeft train --target-modules @modules.txt`.";

typedef struct {
    char name[96];
    int layer, proj;
    double score;
} module;

/* "25%", "25" (percent) or "0.25" (fraction). */
static int parse_budget(const char *s, double *frac) {
    char *end;
    double v = strtod(s, &end);
    if (end == s) return -1;
    if (*end == '%') {
        end++;
        v /= 100.0;
    } else if (v > 1.0) {
        v /= 100.0;
    }
    if (*end || !(v > 0.0 && v <= 1.0)) return -1;
    *frac = v;
    return 0;
}

/* The adapter's modules (those with a lora_A or adapter_down tensor), in (layer, projection) order. */
static int modules_from_adapter(const tk_st_file *f, module **out, size_t *n, tk_err *err) {
    uint8_t *mask = calloc(TK_MAX_LAYERS, 1);
    if (!mask) return tk_fail(err, "out of memory");
    size_t k = 0;
    int max_layer = -1;
    for (size_t i = 0; i < tk_st_count(f); i++) {
        const char *nm = tk_st_at(f, i)->name;
        int l, used = 0;
        char blk[16], pr[16], what[32];
        if (sscanf(nm, "base_model.model.model.layers.%d.%15[a-z_].%15[a-z_].%31[a-zA-Z_.]%n", &l, blk, pr, what, &used) != 4 ||
            nm[used] != 0 || l < 0 || l >= TK_MAX_LAYERS)
            continue;
        int p = tk_proj_parse(pr);
        if (p < 0 || (strcmp(what, "lora_A.weight") != 0 && strcmp(what, "adapter_down.weight") != 0)) continue;
        if (!(mask[l] & (1u << p))) k++;
        mask[l] |= (uint8_t)(1u << p);
        if (l > max_layer) max_layer = l;
    }
    module *mods = calloc(k ? k : 1, sizeof *mods);
    if (!mods) {
        free(mask);
        return tk_fail(err, "out of memory");
    }
    size_t j = 0;
    for (int l = 0; l <= max_layer; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            if (mask[l] & (1u << p)) {
                tk_module_name(mods[j].name, sizeof mods[j].name, l, p);
                mods[j].layer = l;
                mods[j++].proj = p;
            }
    free(mask);
    *out = mods;
    *n = k;
    if (k == 0) return tk_fail(err, "%s: no lora_A / adapter_down tensors (not an adapter with modules)", tk_st_path(f));
    return 0;
}

/* A [rows, cols] tensor as fp32 (malloc'd). */
static float *load_matrix(const tk_st_file *f, const char *key, size_t *rows, size_t *cols, tk_err *err) {
    const tk_st_tensor *t = tk_st_find(f, key);
    if (!t) {
        tk_fail(err, "%s: tensor %s is missing", tk_st_path(f), key);
        return NULL;
    }
    if (t->ndim != 2 || t->shape[0] < 1 || t->shape[1] < 1) {
        tk_fail(err, "%s: tensor %s must be 2-d", tk_st_path(f), key);
        return NULL;
    }
    *rows = (size_t)t->shape[0];
    *cols = (size_t)t->shape[1];
    float *w = malloc(t->numel * sizeof(float));
    if (!w) {
        tk_fail(err, "out of memory for %s", key);
        return NULL;
    }
    if (tk_st_read_f32(f, t, w, t->numel, err)) {
        free(w);
        return NULL;
    }
    return w;
}

/* ||B A||_F (ba) or ||A||_F ||B||_F of one module. */
static int weight_score(const tk_st_file *f, const char *name, int ba, double *score, tk_err *err) {
    char ka[200], kb[200];
    snprintf(ka, sizeof ka, "base_model.model.%s.lora_A.weight", name);
    snprintf(kb, sizeof kb, "base_model.model.%s.lora_B.weight", name);
    if (!tk_st_find(f, ka)) {
        snprintf(ka, sizeof ka, "base_model.model.%s.adapter_down.weight", name);
        snprintf(kb, sizeof kb, "base_model.model.%s.adapter_up.weight", name);
    }
    size_t R, I, O, R2;
    float *A = load_matrix(f, ka, &R, &I, err), *B = A ? load_matrix(f, kb, &O, &R2, err) : NULL;
    int rc = -1;
    if (!A || !B) goto done;
    if (R2 != R) {
        tk_fail(err, "%s: %s is [%zu, %zu] but %s has rank %zu", tk_st_path(f), kb, O, R2, ka, R);
        goto done;
    }
    if (!ba) {
        double na = 0, nb = 0;
        for (size_t i = 0; i < R * I; i++) na += (double)A[i] * A[i];
        for (size_t i = 0; i < O * R; i++) nb += (double)B[i] * B[i];
        *score = sqrt(na) * sqrt(nb);
        rc = 0;
        goto done;
    }
    float *g1 = calloc(R * R, sizeof(float)), *g2 = calloc(R * R, sizeof(float));
    if (!g1 || !g2) {
        free(g1);
        free(g2);
        tk_fail(err, "out of memory");
        goto done;
    }
    /* g1 [R,R] = B^T B;  g2 [R,R] = A A^T;  ||B A||_F^2 = sum_ij g1_ij g2_ij */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, tk_blas_dim(R), tk_blas_dim(R), tk_blas_dim(O), 1.0f, B,
                tk_blas_dim(R), B, tk_blas_dim(R), 0.0f, g1, tk_blas_dim(R));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tk_blas_dim(R), tk_blas_dim(R), tk_blas_dim(I), 1.0f, A,
                tk_blas_dim(I), A, tk_blas_dim(I), 0.0f, g2, tk_blas_dim(R));
    double ss = 0;
    for (size_t i = 0; i < R * R; i++) ss += (double)g1[i] * g2[i];
    *score = sqrt(ss > 0 ? ss : 0);
    free(g1);
    free(g2);
    rc = 0;
done:
    free(A);
    free(B);
    return rc;
}

static int file_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

int tk_cmd_select(int argc, char **argv) {
    const char *run_dir = NULL, *criterion = NULL, *budget_s = NULL, *out = NULL;
    uint64_t seed = 0;
    int last = 10;
    tk_opt opts[] = {
        {"criterion", TK_OPT_STR, &criterion, "C", "keep | ba_norm | a_b_norm | random", 0},
        {"budget", TK_OPT_STR, &budget_s, "K%", "share of the run's modules to select, e.g. 25% or 0.25", 0},
        {"seed", TK_OPT_U64, &seed, "S", "seed of the random criterion (default 0)", 0},
        {"last", TK_OPT_INT, &last, "K", "keep criterion: mean over the last K logged steps, 0 = all (default 10)", 0},
        {"out", TK_OPT_STR, &out, "FILE", "write the list here (.json: JSON with scores); default: stdout", 0},
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
    double budget = 0;
    if (pr == 0 && (!run_dir || !criterion || !budget_s))
        pr = tk_fail(&err, "select needs RUN_DIR, --criterion and --budget (see --help)");
    if (pr == 0 && strcmp(criterion, "keep") && strcmp(criterion, "ba_norm") && strcmp(criterion, "a_b_norm") &&
        strcmp(criterion, "random"))
        pr = tk_fail(&err, "--criterion: \"%s\" is not keep, ba_norm, a_b_norm or random", criterion);
    if (pr == 0 && parse_budget(budget_s, &budget))
        pr = tk_fail(&err, "--budget: \"%s\" is not a share in (0, 100%%] such as 25%% or 0.25", budget_s);
    if (pr < 0) {
        fprintf(stderr, "tspeft select: %s\n", err.msg);
        return 2;
    }
    tk_set_threads(1);
    int status = 1;
    module *mods = NULL;
    size_t M = 0;
    tk_gaterun *r = NULL;
    tk_gatesum sum = {0};
    tk_st_file *f = NULL;
    char path[4200];
    if (tk_pathf(path, sizeof path, &err, "%s/gates.jsonl", run_dir)) goto done;
    int use_log = strcmp(criterion, "keep") == 0 || (strcmp(criterion, "random") == 0 && file_exists(path));
    if (use_log) { /* the modules (and their keep ratios) from the gate log */
        if (!(r = tk_gaterun_load(run_dir, &err)) || tk_gatesum_compute(&sum, r, last, &err)) goto done;
        if (r->S == 0) {
            tk_fail(&err, "%s: no step lines: the probe run logged no steps", path);
            goto done;
        }
        if (!r->gated && strcmp(criterion, "keep") == 0) {
            tk_fail(&err, "%s: the run was not gated (--gate off): every keep ratio is 1; train the probe with the gate on",
                    path);
            goto done;
        }
        M = r->M;
        if (!(mods = calloc(M, sizeof *mods))) {
            tk_fail(&err, "out of memory");
            goto done;
        }
        for (size_t m = 0; m < M; m++) {
            snprintf(mods[m].name, sizeof mods[m].name, "%s", r->names[m]);
            mods[m].layer = r->layer[m];
            mods[m].proj = r->proj[m];
            mods[m].score = sum.keep[m];
        }
    } else { /* the modules (and their weights) from the adapter */
        if (tk_pathf(path, sizeof path, &err, "%s/adapter_model.safetensors", run_dir) || !(f = tk_st_open(path, &err)) ||
            modules_from_adapter(f, &mods, &M, &err))
            goto done;
        for (size_t m = 0; m < M && strcmp(criterion, "random") != 0; m++)
            if (weight_score(f, mods[m].name, strcmp(criterion, "ba_norm") == 0, &mods[m].score, &err)) goto done;
    }
    if (strcmp(criterion, "random") == 0) {
        tk_rng rng;
        tk_rng_seed(&rng, seed);
        for (size_t m = 0; m < M; m++) mods[m].score = tk_rng_uniform(&rng);
    }
    /* rank: score descending, ties in module order (stable insertion sort) */
    for (size_t i = 1; i < M; i++) {
        module x = mods[i];
        size_t j = i;
        while (j > 0 && !(mods[j - 1].score >= x.score)) {
            mods[j] = mods[j - 1];
            j--;
        }
        mods[j] = x;
    }
    size_t k = (size_t)llround(budget * (double)M);
    if (k < 1) k = 1;
    if (k > M) k = M;
    FILE *fo = stdout;
    char tmp[4300];
    if (out) {
        snprintf(tmp, sizeof tmp, "%s.tmp", out);
        if (!(fo = fopen(tmp, "w"))) {
            tk_fail(&err, "%s: cannot write", tmp);
            goto done;
        }
    }
    size_t olen = out ? strlen(out) : 0;
    if (out && olen > 5 && strcmp(out + olen - 5, ".json") == 0) {
        fprintf(fo, "{\n  \"criterion\": \"%s\",\n  \"budget\": %.9g,\n  \"selected\": %zu,\n  \"total\": %zu,\n",
                criterion, budget, k, M);
        fputs("  \"target_modules\": [", fo);
        for (size_t i = 0; i < k; i++) fprintf(fo, "%s\"%s\"", i ? ", " : "", mods[i].name);
        fputs("],\n  \"ranking\": [\n", fo);
        for (size_t i = 0; i < M; i++)
            fprintf(fo, "    {\"module\": \"%s\", \"score\": %.9g}%s\n", mods[i].name, mods[i].score, i + 1 < M ? "," : "");
        fputs("  ]\n}\n", fo);
    } else {
        fprintf(fo, "# tspeft select %s: criterion %s, budget %.4g%% = %zu of %zu modules (highest score first)\n",
                run_dir, criterion, 100.0 * budget, k, M);
        for (size_t i = 0; i < k; i++) fprintf(fo, "%s\n", mods[i].name);
    }
    if (out) {
        int bad_write = ferror(fo) != 0;
        if (fclose(fo) != 0 || bad_write || rename(tmp, out) != 0) {
            remove(tmp);
            tk_fail(&err, "%s: write failed", out);
            goto done;
        }
    }
    fprintf(stderr, "tspeft select: %zu of %zu modules by %s%s%s\n", k, M, criterion, out ? " -> " : "", out ? out : "");
    status = 0;
done:
    if (status) fprintf(stderr, "tspeft select: %s\n", err.msg);
    free(mods);
    tk_st_close(f);
    tk_gatesum_free(&sum);
    tk_gaterun_free(r);
    return status;
}
