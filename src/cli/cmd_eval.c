/* cmd_eval.c: `tspeft eval`: commonsense-reasoning (LLM-Adapters JSON) and GLUE (TSV) benchmarks
 * by generation and/or log-likelihood, with the adapter and its token gate applied
 * (docs/evaluation.md). */
#include "../eval/eval.h"
#include "cli.h"

#include <stdio.h>


#include "../../datasets/csr_tasks.h"
#include "../../datasets/glue.h"
#include "../../vision/projector.h"
#include "../eval/vqa.h"
#include "../../text/tokenizer.h"
#include "../eval/csr.h"
#include "../eval/nlu.h"
#include "../eval/report.h"
#include "../model/llama.h"
#include "args.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *USAGE =
    "usage: tspeft eval --model DIR [--adapter DIR] --tokenizer tokenizer.model --data PATH [--task NAME]\n"
    "                   [--data PATH [--task NAME] ...] [--mode gen|ll|both] [--limit N] [--beams N]\n"
    "                   [--max-new-tokens N] [--out results.json] [--samples FILE.jsonl] [--threads N]\n"
    "                   [--bf16-weights] [--eval-batch N] [--compute fp32|bf16]\n"
    "Benchmarks (docs/evaluation.md). Commonsense reasoning, LLM-Adapters JSON (boolq piqa social_i_qa\n"
    "hellaswag winogrande ARC-Easy ARC-Challenge openbookqa): --mode gen generates from LLM-Adapters'\n"
    "evaluation prompt (greedy, or --beams N beam search), takes the first match of the task's answer\n"
    "pattern and reports csr_gen_acc; --mode ll scores \"the correct answer is <choice>\" for every choice\n"
    "(lm-evaluation-harness style) and reports csr_ll_acc and csr_ll_acc_norm; the two protocols are not\n"
    "comparable. GLUE (cola sst2 mrpc qqp stsb mnli_m mnli_mm qnli rte wnli, a TSV file): log-likelihood\n"
    "over the label verbalizers with the task's metric. Give one --task per --data, or none: the task is\n"
    "then read from the path (e.g. .../boolq/test.json, .../RTE/dev.tsv). Prints a table; --out writes\n"
    "the results JSON (metrics + protocol) and, beside it, the per-sample JSONL (or --samples FILE).";

#define MAX_SETS 64

typedef struct {
    double last;
} progress_state;

static void fmt_time(char *buf, size_t n, double s) {
    if (!(s >= 0.0) || s > 1e7) {
        snprintf(buf, n, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

/* done/total, running metrics, samples/s, ETA; a line at most every 2 s, and the last one. */
static void on_progress(void *user, const tk_eval_progress *p) {
    progress_state *st = user;
    double now = tk_time();
    if (p->done != p->total && p->done != 1 && now - st->last < 2.0) return;
    st->last = now;
    double rate = p->seconds > 0.0 ? (double)p->done / p->seconds : 0.0;
    char eta[32];
    fmt_time(eta, sizeof eta, rate > 0.0 ? (double)(p->total - p->done) / rate : -1.0);
    fprintf(stderr, "eval %s %zu/%zu  %s  %.2f samples/s  ETA %s\n", p->task, p->done, p->total, p->running, rate, eta);
    fflush(stderr);
}

/* Pulls every --task / --data (also --task=X) out of argv, in order; the rest stays for the table
 * parser. Returns the new argc or -1. */
static int take_sets(int argc, char **argv, const char **tasks, int *nt, const char **datas, int *nd, tk_err *err) {
    int out = 0;
    *nt = *nd = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        int is_task = strncmp(a, "--task", 6) == 0 && (a[6] == '\0' || a[6] == '=');
        int is_data = strncmp(a, "--data", 6) == 0 && (a[6] == '\0' || a[6] == '=');
        if (!is_task && !is_data) {
            argv[out++] = argv[i];
            continue;
        }
        const char *v;
        if (a[6] == '=') v = a + 7;
        else if (i + 1 < argc) v = argv[++i];
        else return tk_fail(err, "%s needs a value", a);
        int *cnt = is_task ? nt : nd;
        if (*cnt >= MAX_SETS) return tk_fail(err, "at most %d datasets per run", MAX_SETS);
        (is_task ? tasks : datas)[(*cnt)++] = v;
    }
    return out;
}

/* GLUE task named by a path: a directory or file name that is a task name or alias (RTE/dev.tsv),
 * MNLI split by "mismatched"/"matched" in the file name. */
static const tk_glue_task *glue_from_path(const char *path) {
    char buf[4096], low[4096];
    snprintf(buf, sizeof buf, "%s", path);
    size_t n = strlen(buf);
    for (size_t i = 0; i <= n; i++) low[i] = (char)tolower((unsigned char)buf[i]);
    int mnli = strstr(low, "mnli") != NULL;
    if (mnli) return tk_glue_task_find(strstr(low, "mismatched") ? "mnli_mm" : "mnli_m");
    /* components from the last, extension stripped */
    while (n > 0) {
        while (n > 0 && buf[n - 1] == '/') buf[--n] = '\0';
        char *slash = strrchr(buf, '/');
        char *comp = slash ? slash + 1 : buf;
        char name[4096];
        snprintf(name, sizeof name, "%s", comp);
        char *dot = strchr(name, '.');
        if (dot) *dot = '\0';
        const tk_glue_task *t = name[0] ? tk_glue_task_find(name) : NULL;
        if (t) return t;
        if (!slash) break;
        *slash = '\0';
        n = strlen(buf);
    }
    return NULL;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

typedef struct {
    const char *data;
    const tk_csr_task *csr;
    const tk_glue_task *glue;
    int vqa; /* LLaVA-format shard: visual questions (src/eval/vqa.h) */
} eval_set;

static int resolve(eval_set *s, const char *task, const char *data, tk_err *err) {
    s->data = data;
    s->csr = NULL;
    s->glue = NULL;
    s->vqa = (task && strcmp(task, "vqa") == 0) || (!task && ends_with(data, ".shard"));
    if (s->vqa) return 0;
    if (task) {
        if ((s->csr = tk_csr_task_find(task)) || (s->glue = tk_glue_task_find(task))) return 0;
        return tk_fail(err, "--task %s: unknown task (commonsense: boolq piqa social_i_qa hellaswag winogrande "
                            "ARC-Easy ARC-Challenge openbookqa; GLUE: cola sst2 mrpc qqp stsb mnli_m mnli_mm qnli "
                            "rte wnli)", task);
    }
    if (ends_with(data, ".tsv")) s->glue = glue_from_path(data);
    else if (!(s->csr = tk_csr_task_from_path(data))) s->glue = glue_from_path(data);
    if (!s->csr && !s->glue)
        return tk_fail(err, "%s: cannot tell the task from the path; give --task NAME before or after it", data);
    return 0;
}

static int write_outputs(const char *out, const char *samples_path, const tk_eval_run *run, const tk_eval_result *res,
                         size_t n, const tk_strbuf *samples, tk_err *err) {
    char *json = tk_eval_results_json(run, res, n, err);
    if (!json) return -1;
    int rc = tk_write_file_atomic(out, json, strlen(json), err);
    free(json);
    if (rc) return -1;
    return tk_write_file_atomic(samples_path, samples->buf ? samples->buf : "", samples->len, err);
}

int tk_cmd_eval(int argc, char **argv) {
    if (tk_cli_is_image_task(argc, argv)) return tk_cmd_eval_image(argc, argv);
    const char *model_dir = NULL, *adapter_dir = NULL, *tok_path = NULL, *mode = "gen", *out = NULL,
               *samples_arg = NULL, *compute = "fp32";
    int compute_bf16 = 0;
    int limit = 0, beams = 1, max_new = 32, threads = 0, bf16 = 0, eos = -2, ll_batch = 8, eval_batch = 64;
    tk_mm_opts mo = {0};
    const char *projector = NULL;
    char proj_buf[4200];
    tk_mm *mm = NULL;
    tk_opt opts[] = {
        {"model", TK_OPT_STR, &model_dir, "DIR", "Hugging Face LLaMA directory", 0},
        {"adapter", TK_OPT_STR, &adapter_dir, "DIR", "PEFT adapter directory (optional; TS gates applied)", 0},
        {"tokenizer", TK_OPT_STR, &tok_path, "FILE", "sentencepiece tokenizer.model of the model", 0},
        {"task", TK_OPT_STR, NULL, "NAME", "task of the next/previous --data (repeatable; default: from the path)", 0},
        {"data", TK_OPT_STR, NULL, "PATH", "dataset: LLM-Adapters JSON (CSR) or GLUE TSV (repeatable)", 0},
        {"mode", TK_OPT_STR, &mode, "M", "commonsense protocol: gen (default), ll or both", 0},
        {"limit", TK_OPT_INT, &limit, "N", "only the first N examples of each dataset (default: all)", 0},
        {"beams", TK_OPT_INT, &beams, "N", "1: greedy (default); N > 1: beam search (LLM-Adapters uses 4)", 0},
        {"max-new-tokens", TK_OPT_INT, &max_new, "N", "new tokens per generation (default 32)", 0},
        {"eos", TK_OPT_INT, &eos, "ID", "end-of-sequence id (default: the tokenizer's; -1: none)", 0},
        {"ll-batch", TK_OPT_INT, &ll_batch, "N", "candidate sequences per log-likelihood forward (default 8)", 0},
        {"eval-batch", TK_OPT_INT, &eval_batch, "N",
         "records decoded together (default 64, fewer where their KV caches pass 1 GiB; 1: one at a time; "
         "results are identical)", 0},
        {"out", TK_OPT_STR, &out, "FILE", "results JSON (metrics + protocol settings)", 0},
        {"samples", TK_OPT_STR, &samples_arg, "FILE", "per-sample JSONL (default: --out with .samples.jsonl)", 0},
        {"threads", TK_OPT_INT, &threads, "T", "threads (default: all cores)", 0},
        {"bf16-weights", TK_OPT_FLAG, &bf16, NULL, "keep BF16 base matrices BF16 in memory (exact)", 0},
        {"compute", TK_OPT_STR, &compute, "P", "fp32 | bf16: frozen products in BF16, fp32 accumulation (AVX512-BF16; default fp32)", 0},
        {"vision-tower", TK_OPT_STR, &mo.tower, "DIR", "vqa: HF CLIP/SigLIP vision tower of the model", 0},
        {"projector", TK_OPT_STR, &projector, "FILE", "vqa: projector (default: ADAPTER/mm_projector.safetensors)", 0},
        {"vision-layer", TK_OPT_INT, &mo.layer, "L", "vqa: encoder hidden state used (default -2)", 0},
        {"vision-feature", TK_OPT_STR, &mo.feature, "F", "vqa: patch | cls_patch (default patch)", 0},
        {"image-preprocess", TK_OPT_STR, &mo.preprocess, "P", "vqa: clip | llava-pad | siglip (default clip)", 0},
        {"image-size", TK_OPT_INT, &mo.image_size, "S", "vqa: preprocess images to S pixels (default: the tower's)", 0},
        {"interpolate-pos", TK_OPT_FLAG, &mo.interpolate_pos, NULL, "vqa: interpolate the tower's position "
                                                                     "embeddings (bicubic) for --image-size", 0},
    };
    int n_opts = (int)(sizeof opts / sizeof opts[0]);
    const char *tasks[MAX_SETS], *datas[MAX_SETS];
    int nt = 0, nd = 0, status = 1;
    tk_err err = {0};
    tk_llama *m = NULL;
    tk_tokenizer *tok = NULL;
    tk_loglik *scorer = NULL;
    tk_eval_result *res = NULL;
    tk_strbuf samples = {0}, table = {0};
    char samples_buf[4200];
    eval_set sets[MAX_SETS];
    for (int i = 0; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            tk_args_help(opts, n_opts, USAGE);
            return 0;
        }
    int ac = take_sets(argc, argv, tasks, &nt, datas, &nd, &err);
    int pr = ac < 0 ? -1 : tk_args_parse(opts, n_opts, ac, argv, USAGE, &err);
    if (pr == 1) return 0;
    if (pr == 0 && (!model_dir || !tok_path || nd == 0))
        pr = tk_fail(&err, "eval needs --model DIR, --tokenizer FILE and at least one --data PATH (see --help)");
    if (pr == 0 && nt != 0 && nt != nd)
        pr = tk_fail(&err, "give one --task per --data (%d --task for %d --data), or none to read tasks from the paths",
                     nt, nd);
    if (pr == 0 && strcmp(mode, "gen") && strcmp(mode, "ll") && strcmp(mode, "both"))
        pr = tk_fail(&err, "--mode must be gen, ll or both, got \"%s\"", mode);
    if (pr == 0 && (limit < 0 || beams < 1 || beams > 64 || max_new < 1 || ll_batch < 1 || eos < -2))
        pr = tk_fail(&err, "--limit >= 0, --beams 1..64, --max-new-tokens >= 1, --ll-batch >= 1 and --eos >= -1");
    if (pr == 0 && (eval_batch < 1 || eval_batch > TK_EVAL_BATCH_MAX))
        pr = tk_fail(&err, "--eval-batch must be 1..%d, got %d", TK_EVAL_BATCH_MAX, eval_batch);
    if (pr == 0) pr = tk_compute_parse(compute, &compute_bf16, &err);
    if (pr < 0) {
        fprintf(stderr, "tspeft eval: %s\n", err.msg);
        return 2;
    }
    for (int i = 0; i < nd; i++)
        if (resolve(&sets[i], nt ? tasks[i] : NULL, datas[i], &err)) {
            fprintf(stderr, "tspeft eval: %s\n", err.msg);
            return 2;
        }
    tk_set_threads(threads);
    compute_bf16 = tk_compute_resolve(compute_bf16, 0);
    if (!(tok = tk_tok_open(tok_path, &err))) goto done;
    if (!(m = tk_llama_open_ex(model_dir, bf16, &err))) goto done;
    int32_t tv = tk_tok_vocab_size(tok);
    if ((int64_t)tv > (int64_t)m->cfg.vocab_size) {
        tk_fail(&err, "%s: the tokenizer has %d pieces but the model (%s) has vocab_size %d: not this model's tokenizer",
                tok_path, tv, model_dir, m->cfg.vocab_size);
        goto done;
    }
    int any_vqa = 0;
    const char *vqa_data = NULL; /* the first visual-question dataset, named in errors */
    for (int i = 0; i < nd; i++)
        if (sets[i].vqa && !any_vqa++) vqa_data = sets[i].data;
    if (any_vqa) { /* the vision tower and projector, registered before the adapter is attached */
        if (!mo.tower) {
            tk_fail(&err, "%s: visual questions (a .shard or --task vqa) need --vision-tower DIR", vqa_data);
            goto done;
        }
        if (!projector && adapter_dir) {
            snprintf(proj_buf, sizeof proj_buf, "%s/mm_projector.safetensors", adapter_dir);
            projector = proj_buf;
        }
        if (!projector) {
            tk_fail(&err, "visual questions need --projector FILE (or an --adapter directory holding mm_projector.safetensors)");
            goto done;
        }
        mo.projector = projector;
        if (!(mm = tk_mm_open(&mo, (size_t)m->cfg.dim, &err))) goto done;
        tk_mm_hook(mm, m);
    }
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = TK_ADAPTER_NONE;
    if (adapter_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/adapter_config.json", adapter_dir);
        if (tk_peft_config_load(&pc, path, &err)) goto done;
    }
    if (!mm) m->vit_targets = TK_VIT_IGNORE; /* text only: a LLaVA adapter's tower modules are not used */
    int rc = (mm && tk_mm_set_tower_training(mm, &pc, 0, 0.0f, 0, &err)) || tk_llama_attach(m, &pc, adapter_dir, 0, &err);
    tk_peft_config_free(&pc);
    m->compute_bf16 = compute_bf16;
    if (rc || tk_llama_pack_frozen(m, &err) < 0) goto done;
    if (mm && tk_mm_init_weights(mm, projector, 0, &err)) goto done;
    int do_gen = strcmp(mode, "ll") != 0, do_ll = strcmp(mode, "gen") != 0, any_glue = 0;
    for (int i = 0; i < nd; i++) any_glue |= sets[i].glue != NULL;
    if ((do_ll || any_glue) && !(scorer = tk_loglik_new(m, &err))) goto done;
    if (!(res = calloc((size_t)nd, sizeof *res))) {
        tk_fail(&err, "out of memory");
        goto done;
    }
    progress_state ps = {0};
    tk_eval_ctx ctx = {.m = m, .tok = tok, .gen = do_gen, .ll = do_ll, .beams = (size_t)beams,
                       .max_new = (size_t)max_new, .limit = (size_t)limit, .ll_batch = (size_t)ll_batch,
                       .eval_batch = (size_t)eval_batch,
                       .eos = eos == -2 ? tk_tok_eos_id(tok) : eos, .progress = on_progress, .user = &ps,
                       .scorer = scorer};
    fprintf(stderr, "tspeft eval: %s (%d layers, vocab %d)%s%s%s, %d dataset%s, mode %s (%s, %d new tokens)\n",
            model_dir, m->cfg.n_layers, m->cfg.vocab_size, adapter_dir ? " + " : "", adapter_dir ? adapter_dir : "",
            adapter_dir ? (m->peft.gate.enabled ? " (TS-gated)" : " (ungated)") : "", nd, nd == 1 ? "" : "s", mode,
            beams > 1 ? "beam search" : "greedy", max_new);
    for (int i = 0; i < nd; i++) {
        ps.last = 0.0;
        int r = sets[i].vqa   ? tk_eval_vqa(&ctx, mm, sets[i].data, &res[i], &samples, &err)
                : sets[i].csr ? tk_eval_csr(&ctx, sets[i].csr, sets[i].data, &res[i], &samples, &err)
                              : tk_eval_glue(&ctx, sets[i].glue, sets[i].data, &res[i], &samples, &err);
        if (r) goto done;
    }
    if (tk_eval_table(&table, res, (size_t)nd, &err)) goto done;
    fputs(table.buf, stdout);
    fflush(stdout);
    if (out) {
        const char *sp = samples_arg;
        if (!sp) {
            size_t L = strlen(out);
            int base = ends_with(out, ".json") ? (int)(L - 5) : (int)L;
            if (tk_pathf(samples_buf, sizeof samples_buf, &err, "%.*s.samples.jsonl", base, out)) goto done;
            sp = samples_buf;
        }
        tk_eval_run run = {.model = model_dir, .adapter = adapter_dir, .tokenizer = tok_path, .mode = mode,
                           .beams = (size_t)beams, .max_new = (size_t)max_new, .limit = (size_t)limit,
                           .ll_batch = (size_t)ll_batch, .eos = ctx.eos, .bf16_weights = bf16,
                           .compute_bf16 = compute_bf16,
                           .gated = adapter_dir && m->peft.gate.enabled};
        if (write_outputs(out, sp, &run, res, (size_t)nd, &samples, &err)) goto done;
        fprintf(stderr, "tspeft eval: wrote %s and %s\n", out, sp);
    }
    status = 0;
done:
    if (status) {
        tk_err_one_line(&err);
        fprintf(stderr, "tspeft eval: %s\n", err.msg);
    }
    tk_strbuf_free(&samples);
    tk_strbuf_free(&table);
    free(res);
    tk_loglik_free(scorer);
    tk_llama_close(m);
    tk_mm_free(mm);
    tk_tok_free(tok);
    return status;
}

