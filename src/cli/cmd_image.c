/* cmd_image.c: `tspeft train --task image-classification` and `tspeft eval --task image-classification`
 * (vision/classify.h): options -> tk_cls_opts. tk_cmd_train / tk_cmd_eval hand over when argv holds
 * --task image-classification. */
#include "../../vision/classify.h"
#include "args.h"
#include "cli.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TK_IMAGE_TASK "image-classification"

int tk_cli_is_image_task(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--task=" TK_IMAGE_TASK) == 0) return 1;
        if (strcmp(argv[i], "--task") == 0 && i + 1 < argc && strcmp(argv[i + 1], TK_IMAGE_TASK) == 0) return 1;
    }
    return 0;
}

static const char *TRAIN_USAGE =
    "usage: tspeft train --task image-classification --model TOWER --data SHARDS [--data ...] --steps N\n"
    "                    --batch-size B --lr X [--out DIR] [--target-modules LIST] [--tune-vision-tower]\n"
    "Image classification on a Hugging Face CLIP / SigLIP vision tower (docs/vision.md \"Image\n"
    "classification\"): a linear classifier on the pooled output (CLIP: the class token after\n"
    "post_layernorm; SigLIP: its attention-pooling head) is trained with, optionally, adapters on the\n"
    "tower's projections (LoRA / DoRA / bottleneck, TS-gated unless --gate off; --target-modules q_proj,\n"
    "k_proj, v_proj, out_proj, fc1, fc2, all, or full names vision_model.encoder.layers.L.self_attn.q_proj)\n"
    "and, with --tune-vision-tower, the whole tower (learning rate --vision-tower-lr). Data: shards whose\n"
    "records hold one image and meta {\"label\", \"n_classes\"} (tspeft convert --format image-folder).\n"
    "OUT gets the adapter in PEFT's layout (the classifier as modules_to_save), gates.jsonl and\n"
    "train_log.jsonl, and with --tune-vision-tower the tower as OUT/vision_tower.";

/* The tower's short names mean tower modules here (the tower is the whole model). LIST: names split
 * at commas and blanks, or @FILE: the names in FILE, split at commas, blanks and newlines, with #
 * comments (tspeft train's @FILE). */
static int tower_targets(tk_peft_config *pc, const char *list, tk_err *err) {
    char *buf = NULL;
    const char *where = "--target-modules";
    if (list[0] == '@') {
        size_t len;
        if (!(buf = tk_read_file(list + 1, &len, err))) return tk_err_prefix(err, "--target-modules");
        where = list + 1;
        for (char *c = buf, *hash = NULL; *c; c++) { /* # to the end of the line is a comment */
            if (*c == '#') hash = c;
            if (*c == '\n') hash = NULL;
            if (hash || *c == '\n' || *c == '\r') *c = ' ';
        }
    } else if (!(buf = strdup(list))) {
        return tk_fail(err, "out of memory");
    }
    int rc = -1;
    pc->target_mask = 0;
    pc->n_modules = 0;
    for (char *sv = NULL, *tok = strtok_r(buf, ", \t", &sv); tok; tok = strtok_r(NULL, ", \t", &sv)) {
        char name[8300];
        if (strlen(tok) > 8000) {
            tk_fail(err, "%s: a module name of %zu characters", where, strlen(tok));
            goto done;
        }
        if (!strchr(tok, '.') || strncmp(tok, "encoder.", 8) == 0 || strncmp(tok, "self_attn.", 10) == 0 ||
            strncmp(tok, "mlp.", 4) == 0)
            snprintf(name, sizeof name, "vision_model.%s", tok);
        else
            snprintf(name, sizeof name, "%s", tok);
        if (tk_peft_add_target(pc, name, err)) {
            tk_err_prefix(err, where);
            goto done;
        }
        if (pc->target_mask || pc->n_modules) {
            tk_fail(err, "%s: \"%s\" names a LLaMA module; image classification adapts the vision tower (q_proj, "
                    "k_proj, v_proj, out_proj, fc1, fc2, all)", where, tok);
            goto done;
        }
    }
    if (!tk_peft_has_vit(pc)) {
        tk_fail(err, "%s: empty list", where);
        goto done;
    }
    rc = 0;
done:
    free(buf);
    return rc;
}

/* tk_args_parse, then the repeatable --data specs into specs[64], which o->data then points at: 1
 * (--help printed), 0, or -1 with err (a usage error). */
static int parse_with_data(tk_opt *opts, int n, int argc, char **argv, const char *usage, const char **specs,
                           tk_cls_opts *o, tk_err *err) {
    int pr = tk_args_parse(opts, n, argc, argv, usage, err);
    if (pr != 0) return pr;
    int n_data = tk_args_collect(opts, n, argc, argv, "data", specs, 64, err);
    if (n_data < 0) return -1;
    o->data = specs;
    o->n_data = n_data == 0 && specs[0] ? 1 : n_data;
    return 0;
}

int tk_cmd_train_image(int argc, char **argv) {
    tk_cls_opts o;
    tk_cls_opts_default(&o);
    const char *task = NULL, *sched = "constant", *type = "lora", *targets = "q_proj,v_proj", *gate_s = "on";
    const char *rule = "prox", *config = NULL;
    const char *data_specs[64];
    int r = 8, rslora = 0;
    float alpha = 16.0f, dropout = 0.0f, bn_scaling = 1.0f, keep = 0.0f;
    tk_gate_config g = tk_gate_config_default();
    tk_opt opts[] = {
        {"config", TK_OPT_STR, &config, "FILE", "JSON file of option defaults (keys = option names)", 0},
        {"task", TK_OPT_STR, &task, "NAME", "image-classification", 0},
        {"model", TK_OPT_STR, &o.model_dir, "DIR", "Hugging Face CLIP / SigLIP vision tower directory", 0},
        {"data", TK_OPT_STR, &data_specs[0], "SHARDS", "image-classification shards (file, directory, glob); repeatable", 0},
        {"out", TK_OPT_STR, &o.out_dir, "DIR", "write the adapter (PEFT layout), gates.jsonl, train_log.jsonl here", 0},
        {"steps", TK_OPT_INT, &o.steps, "N", "optimizer steps (default 100)", 0},
        {"batch-size", TK_OPT_INT, &o.batch_size, "B", "images per step (default 16)", 0},
        {"lr", TK_OPT_FLOAT, &o.lr, "X", "learning rate of the classifier and the adapters (default 1e-3)", 0},
        {"vision-tower-lr", TK_OPT_FLOAT, &o.tower_lr, "X", "learning rate of the tower with --tune-vision-tower (default --lr)", 0},
        {"tune-vision-tower", TK_OPT_FLAG, &o.tune_tower, NULL, "train the whole tower too (written to OUT/vision_tower)", 0},
        {"lr-scheduler", TK_OPT_STR, &sched, "NAME", "constant | linear | cosine (default constant)", 0},
        {"warmup-steps", TK_OPT_INT, &o.warmup_steps, "N", "linear learning-rate warm-up steps (default 0)", 0},
        {"weight-decay", TK_OPT_FLOAT, &o.weight_decay, "X", "AdamW weight decay (default 0)", 0},
        {"max-grad-norm", TK_OPT_FLOAT, &o.max_grad_norm, "X", "global-norm clipping, 0 = off (default 1.0)", 0},
        {"image-preprocess", TK_OPT_STR, &o.preprocess, "P", "clip | siglip (default: the tower's kind)", 0},
        {"limit", TK_OPT_INT, &o.limit, "N", "use only the first N records of each shard (default all)", 0},
        {"threads", TK_OPT_INT, &o.threads, "T", "OpenMP and BLAS threads (default: all cores)", 0},
        {"seed", TK_OPT_U64, &o.seed, "S", "seed of the initialisation, shuffling and dropout (default 42)", 0},
        {"log-every", TK_OPT_INT, &o.log_every, "N", "progress line every N steps (default 10)", 0},
        {"quiet", TK_OPT_FLAG, &o.quiet, NULL, "no progress lines", 0},
        {"adapter-type", TK_OPT_STR, &type, "T", "lora | dora | bottleneck | none (default lora)", 0},
        {"r", TK_OPT_INT, &r, "N", "LoRA rank or bottleneck size (default 8)", 0},
        {"alpha", TK_OPT_FLOAT, &alpha, "X", "lora_alpha (default 16)", 0},
        {"dropout", TK_OPT_FLOAT, &dropout, "P", "adapter dropout (default 0)", 0},
        {"rslora", TK_OPT_FLAG, &rslora, NULL, "scale alpha/sqrt(r) (rsLoRA)", 0},
        {"bottleneck-scaling", TK_OPT_FLOAT, &bn_scaling, "X", "bottleneck adapter output scaling (default 1)", 0},
        {"target-modules", TK_OPT_STR, &targets, "LIST", "tower projections: q_proj,k_proj,v_proj,out_proj,fc1,fc2, all, full names or @FILE (default q_proj,v_proj)", 0},
        {"gate", TK_OPT_STR, &gate_s, "on|off|random", "TS-PEFT token gate on the tower's adapters; random: the chance control, each token's update kept with probability --keep (default on)", 0},
        {"keep", TK_OPT_FLOAT, &keep, "P", "--gate random: probability in (0,1] that a token's update is applied in a module", 0},
        {"ts-rule", TK_OPT_STR, &rule, "R", "threshold rule: prox | surrogate | importance | scaled | energy (default prox)", 0},
        {"ts-lambda", TK_OPT_FLOAT, &g.lambda, "X", "sparsity weight lambda (default 0.05)", 0},
        {"ts-eta-tau", TK_OPT_FLOAT, &g.eta_tau, "X", "threshold step size eta_tau (default 0.05)", 0},
        {"ts-tau0", TK_OPT_FLOAT, &g.tau0, "X", "initial threshold (default 0)", 0},
        {"ts-target-keep", TK_OPT_FLOAT, &g.target_keep, "RHO", "target keep ratio in (0,1]; lambda becomes a dual (default off)", 0},
        {"ts-eta-lambda", TK_OPT_FLOAT, &g.eta_lambda, "X", "dual step size with a target keep ratio (default 0.05)", 0},
        {"ts-warmup-steps", TK_OPT_INT, &g.warmup_steps, "N", "steps with tau frozen at tau0 (default 0)", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    void *json = NULL;
    int status = 1;
    data_specs[0] = NULL;
    for (int i = 0; i + 1 < argc; i++)
        if (strcmp(argv[i], "--config") == 0 && tk_args_apply_config(opts, n, argv[i + 1], &json, &err)) goto fail;
    int pr = parse_with_data(opts, n, argc, argv, TRAIN_USAGE, data_specs, &o, &err);
    if (pr == 1) return 0;
    if (pr < 0) {
        status = 2;
        goto fail;
    }
    if (!o.model_dir || o.n_data == 0) {
        tk_fail(&err, "train --task image-classification needs --model TOWER and --data SHARDS (see --help)");
        status = 2;
        goto fail;
    }
    if (tk_opt_seen(opts, n, "vision-tower-lr") && !o.tune_tower) {
        tk_fail(&err, "--vision-tower-lr sets the tower's learning rate under --tune-vision-tower");
        status = 2;
        goto fail;
    }
    if (tk_sched_parse(sched, &o.sched)) {
        tk_fail(&err, "--lr-scheduler: \"%s\" is not constant, linear or cosine", sched);
        status = 2;
        goto fail;
    }
    tk_peft_config *pc = &o.peft;
    if (strcmp(type, "lora") == 0) pc->kind = TK_ADAPTER_LORA;
    else if (strcmp(type, "dora") == 0) pc->kind = TK_ADAPTER_DORA;
    else if (strcmp(type, "bottleneck") == 0) pc->kind = TK_ADAPTER_BOTTLENECK;
    else if (strcmp(type, "none") == 0) pc->kind = TK_ADAPTER_NONE;
    else {
        tk_fail(&err, "--adapter-type: \"%s\" is not lora, dora, bottleneck or none", type);
        status = 2;
        goto fail;
    }
    if (r < 1 || !(dropout >= 0.0f && dropout < 1.0f)) {
        tk_fail(&err, "--r must be >= 1 and --dropout in [0, 1)");
        status = 2;
        goto fail;
    }
    pc->r = r;
    pc->alpha = alpha;
    pc->dropout = dropout;
    pc->use_rslora = rslora;
    pc->bottleneck_scaling = bn_scaling;
    if (pc->kind != TK_ADAPTER_NONE && tower_targets(pc, targets, &err)) {
        status = 2;
        goto fail;
    }
    int gate = 1;
    tk_gate_rule rv;
    if (tk_cli_gate_mode(gate_s, tk_opt_seen(opts, n, "keep"), keep, &gate, &err)) {
        status = 2;
        goto fail;
    }
    if (tk_gate_rule_parse(rule, &rv) || rv == TK_GATE_RANDOM) {
        tk_fail(&err, "--ts-rule: \"%s\" is not prox, surrogate, importance, scaled or energy (the chance control is "
                      "--gate random)", rule);
        status = 2;
        goto fail;
    }
    pc->gate = g;
    pc->gate.enabled = gate && pc->kind != TK_ADAPTER_NONE;
    pc->gate.rule = gate == 2 ? TK_GATE_RANDOM : rv;
    if (gate == 2) pc->gate.keep = keep;
    if (!(pc->gate.eta_tau > 0.0f) || pc->gate.lambda < 0.0f || pc->gate.tau0 < 0.0f || pc->gate.target_keep < 0.0f ||
        pc->gate.target_keep > 1.0f || pc->gate.warmup_steps < 0 || pc->gate.eta_lambda < 0.0f) {
        tk_fail(&err, "gate options out of range: need eta_tau > 0, lambda >= 0, tau0 >= 0, target keep in (0,1]");
        status = 2;
        goto fail;
    }
    if (tk_cls_train(&o, &err)) goto fail;
    status = 0;
fail:
    if (status) fprintf(stderr, "tspeft train: %s\n", err.msg);
    tk_peft_config_free(&o.peft);
    cJSON_Delete(json);
    return status;
}

static const char *EVAL_USAGE =
    "usage: tspeft eval --task image-classification --model TOWER --adapter DIR --data SHARDS [--data ...]\n"
    "                   [--out results.json] [--batch-size B] [--threads N]\n"
    "Top-1 accuracy of an image classifier trained by `tspeft train --task image-classification` (its\n"
    "adapter directory: classifier, tower adapters, TS gates applied) on image-classification shards.\n"
    "Prints a table; --out R.json writes the results JSON and, beside it, R.samples.jsonl: one line per\n"
    "image in data order, {index, label, pred, correct, keep}. With --tune-vision-tower runs, give the\n"
    "trained tower (OUT/vision_tower) as --model.";

int tk_cmd_eval_image(int argc, char **argv) {
    tk_cls_opts o;
    tk_cls_opts_default(&o);
    o.batch_size = 64;
    const char *task = NULL, *out = NULL;
    const char *data_specs[64];
    data_specs[0] = NULL;
    tk_opt opts[] = {
        {"task", TK_OPT_STR, &task, "NAME", "image-classification", 0},
        {"model", TK_OPT_STR, &o.model_dir, "DIR", "Hugging Face CLIP / SigLIP vision tower directory", 0},
        {"adapter", TK_OPT_STR, &o.adapter_dir, "DIR", "the trained classifier (adapter directory)", 0},
        {"data", TK_OPT_STR, &data_specs[0], "SHARDS", "image-classification shards (file, directory, glob); repeatable", 0},
        {"out", TK_OPT_STR, &out, "FILE", "write the results JSON", 0},
        {"batch-size", TK_OPT_INT, &o.batch_size, "B", "images per forward pass (default 64)", 0},
        {"image-preprocess", TK_OPT_STR, &o.preprocess, "P", "clip | siglip (default: the tower's kind)", 0},
        {"limit", TK_OPT_INT, &o.limit, "N", "only the first N records of each shard", 0},
        {"threads", TK_OPT_INT, &o.threads, "T", "OpenMP and BLAS threads (default: all cores)", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    int status = 1;
    char *text = NULL, *lines = NULL, samples_path[4200];
    tk_cls_eval_result res = {0};
    int pr = parse_with_data(opts, n, argc, argv, EVAL_USAGE, data_specs, &o, &err);
    if (pr == 1) return 0;
    if (pr < 0) {
        status = 2;
        goto fail;
    }
    if (!o.model_dir || !o.adapter_dir || o.n_data == 0) {
        tk_fail(&err, "eval --task image-classification needs --model TOWER, --adapter DIR and --data SHARDS");
        status = 2;
        goto fail;
    }
    if (tk_cls_eval(&o, &res, &err)) goto fail;
    printf("%-22s %8s %10s %10s\n", "task", "n", "top1_acc", "keep");
    printf("%-22s %8zu %9.2f%% %9.2f%%\n", TK_IMAGE_TASK, res.n, 100.0 * res.top1, 100.0 * res.keep);
    printf("top1_acc: the share of images whose highest logit is their label; keep: the share of image tokens\n"
           "the tower's gated adapters applied their update to (100%% without gates).\n");
    if (out) {
        cJSON *root = cJSON_CreateObject();
        cJSON_AddNumberToObject(root, "tspeft_eval", 1);
        cJSON_AddStringToObject(root, "model", o.model_dir);
        cJSON_AddStringToObject(root, "adapter", o.adapter_dir);
        cJSON *proto = cJSON_AddObjectToObject(root, "protocol");
        cJSON_AddStringToObject(proto, "task", TK_IMAGE_TASK);
        cJSON_AddStringToObject(proto, "image_preprocess", o.preprocess ? o.preprocess : "tower");
        cJSON_AddNumberToObject(proto, "limit", o.limit);
        cJSON *tasks = cJSON_AddArrayToObject(root, "tasks");
        cJSON *t = cJSON_CreateObject();
        cJSON_AddItemToArray(tasks, t);
        cJSON_AddStringToObject(t, "task", TK_IMAGE_TASK);
        cJSON_AddStringToObject(t, "kind", TK_IMAGE_TASK);
        cJSON_AddStringToObject(t, "data", data_specs[0]);
        cJSON_AddNumberToObject(t, "n", (double)res.n);
        cJSON_AddNumberToObject(t, "n_classes", res.n_classes);
        cJSON_AddNumberToObject(t, "seconds", res.seconds);
        cJSON *m = cJSON_AddObjectToObject(t, "metrics");
        cJSON_AddNumberToObject(m, "top1_acc", res.top1);
        cJSON_AddNumberToObject(m, "keep", res.keep);
        text = cJSON_Print(root);
        cJSON_Delete(root);
        /* beside OUT, as tspeft eval names it: OUT without .json + .samples.jsonl; one line per image in
         * data order. Written first, removed again if OUT cannot be written: both or neither. */
        size_t L = strlen(out);
        int base = L >= 5 && strcmp(out + L - 5, ".json") == 0 ? (int)(L - 5) : (int)L;
        if (!text) {
            tk_fail(&err, "out of memory");
            goto fail;
        }
        if (tk_pathf(samples_path, sizeof samples_path, &err, "%.*s.samples.jsonl", base, out)) goto fail;
        if (!(lines = malloc(res.n * 160 + 1))) {
            tk_fail(&err, "out of memory");
            goto fail;
        }
        size_t len = 0;
        for (size_t i = 0; i < res.n; i++) {
            const tk_cls_sample *sm = &res.samples[i];
            len += (size_t)snprintf(lines + len, 160, "{\"index\": %zu, \"label\": %d, \"pred\": %d, \"correct\": %d, "
                                    "\"keep\": %.6g}\n", i, sm->label, sm->pred, sm->label == sm->pred, (double)sm->keep);
        }
        if (tk_write_file_atomic(samples_path, lines, len, &err)) goto fail;
        if (tk_write_file_atomic(out, text, strlen(text), &err)) {
            remove(samples_path);
            goto fail;
        }
    }
    status = 0;
fail:
    if (status) fprintf(stderr, "tspeft eval: %s\n", err.msg);
    free(text);
    free(lines);
    tk_cls_eval_result_free(&res);
    tk_peft_config_free(&o.peft);
    return status;
}
