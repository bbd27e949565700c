/* cmd_train.c: `tspeft train`: options -> tk_train_opts (trainer.h). */
#include "../../vision/projector.h"
#include "../model/llama.h"
#include "../train/checkpoint.h"
#include "../train/train_data.h"
#include "../train/trainer.h"
#include "args.h"
#include "cli.h"

#include <cJSON.h>
#include <stdio.h>
#include <string.h>

static const char *USAGE =
    "usage: tspeft train --model DIR [--adapter DIR] --data PATH[:W] [--data PATH[:W] ...] --steps N --batch-size B\n"
    "                    --lr X [--grad-accum K] [--out DIR] [--dump DIR] [--threads T] [--seed S] [--config FILE]\n"
    "Trains a PEFT adapter (LoRA, DoRA or bottleneck Adapter, TS-PEFT-gated unless --gate off) on a\n"
    "Hugging Face LLaMA. With --adapter, the adapter's adapter_config.json fixes its type, rank and\n"
    "targets, and its ts_peft object the gate; --gate and --ts-* options still override the gate.\n"
    "Data (docs/shards.md \"Training from shards\"): each --data is a pre-tokenized JSONL file or a dataset of\n"
    "shards (told apart by the file's magic, not its name): a shard, a glob ('data/csr-*.shard') or a directory\n"
    "of shards; repeat --data to mix datasets, PATH:W giving dataset PATH the weight W (default 1), e.g.\n"
    "--data boolq.shard --data 'math-*.shard:3'. Rows are right-padded to the longest of the batch (at most\n"
    "--max-seq-len); --pack instead fills rows of exactly --max-seq-len with several records under the plain\n"
    "causal mask and continuous positions (records are not isolated from each other, as in TRL's\n"
    "ConstantLengthDataset; the first label of each packed record is ignored). --resume continues the\n"
    "shard stream exactly from the checkpoint's loader cursor.";

int tk_cli_gate_mode(const char *gate_s, int keep_seen, float keep, int *gate, tk_err *err) {
    if (strcmp(gate_s, "on") == 0 || strcmp(gate_s, "1") == 0 || strcmp(gate_s, "true") == 0) *gate = 1;
    else if (strcmp(gate_s, "off") == 0 || strcmp(gate_s, "0") == 0 || strcmp(gate_s, "false") == 0) *gate = 0;
    else if (strcmp(gate_s, "random") == 0) *gate = 2;
    else return tk_fail(err, "--gate: \"%s\" is not on, off or random", gate_s);
    if (keep_seen && !(keep > 0.0f && keep <= 1.0f)) return tk_fail(err, "--keep: %g is not in (0, 1]", (double)keep);
    if ((*gate == 2) != keep_seen)
        return tk_fail(err, *gate == 2 ? "--gate random needs --keep P (the probability that a token's update is applied)"
                                       : "--keep is the keep probability of --gate random");
    return 0;
}

int tk_cmd_train(int argc, char **argv) {
    if (tk_cli_is_image_task(argc, argv)) return tk_cmd_train_image(argc, argv);
    return tk_cmd_train_dist(argc, argv, NULL);
}

int tk_cmd_train_dist(int argc, char **argv, tk_dist *dist) {
    tk_train_opts o;
    tk_train_opts_default(&o);
    o.dist = dist;
    const char *config = NULL, *sched = "constant", *type = "lora", *targets = "q_proj,v_proj";
    const char *layers = NULL, *save = NULL, *act = "tanh", *rule = "prox", *resume = NULL, *nonfinite = "stop";
    const char *attention = "auto", *recompute = "0", *gate_s = "on", *scope = "module", *compute = "fp32";
    char resume_dir[4096];
    const char *data_specs[TK_LOADER_MAX_SOURCES + 1];
    int n_data = 0;
    int r = 8, rslora = 0, gate = 1;
    float keep = 0.0f;
    float alpha = 16.0f, dropout = 0.0f, bn_scaling = 1.0f;
    tk_gate_config g = tk_gate_config_default();
    tk_peft_config ada_defaults;
    tk_peft_config_default(&ada_defaults);
    tk_adalora_config ada = ada_defaults.ada; /* AdaLoraConfig's defaults */
    tk_opt opts[] = {
        {"config", TK_OPT_STR, &config, "FILE", "JSON file of option defaults (keys = option names)", 0},
        {"model", TK_OPT_STR, &o.model_dir, "DIR", "Hugging Face LLaMA directory (config.json + safetensors)", 0},
        {"adapter", TK_OPT_STR, &o.adapter_dir, "DIR", "PEFT adapter directory to start from", 0},
        {"data", TK_OPT_STR, &o.data_path, "PATH[:W]", "JSONL file, or shards (file, glob, directory) with weight W; repeatable", 0},
        {"pack", TK_OPT_FLAG, &o.pack, NULL, "shards: pack records into rows of --max-seq-len (plain causal mask)", 0},
        {"shuffle-window", TK_OPT_INT, &o.shuffle_window, "K", "shards: 0 uniform shuffle, K: frames shuffled in groups of K (default 0)", 0},
        {"prefetch", TK_OPT_INT, &o.prefetch, "N", "shards: batches prepared ahead on a thread (default 2)", 0},
        {"out", TK_OPT_STR, &o.out_dir, "DIR", "write the trained adapter here (PEFT layout)", 0},
        {"vision-tower", TK_OPT_STR, &o.vision_tower, "DIR", "HF CLIP/SigLIP vision tower: train on image shards (LLaVA)", 0},
        {"projector", TK_OPT_STR, &o.projector, "FILE", "projector to start from (mm_projector.safetensors or a LLaVA checkpoint)", 0},
        {"projector-type", TK_OPT_STR, &o.projector_type, "T", "linear | mlp2x_gelu (default mlp2x_gelu)", 0},
        {"stage", TK_OPT_INT, &o.stage, "N", "with --vision-tower: 1 projector only, 2 projector + adapter (default 2)", 0},
        {"mm-projector-lr", TK_OPT_FLOAT, &o.mm_projector_lr, "X", "with --vision-tower: the projector's learning rate (LLaVA's; default --lr)", 0},
        {"tune-vision-tower", TK_OPT_FLAG, &o.tune_vision_tower, NULL, "with --vision-tower: train every tower tensor too (written to OUT/vision_tower)", 0},
        {"vision-tower-lr", TK_OPT_FLOAT, &o.vision_tower_lr, "X", "with --vision-tower: the tower's learning rate, its tensors and adapters (LLaVA's; default --lr)", 0},
        {"vision-layer", TK_OPT_INT, &o.vision_layer, "L", "encoder hidden state used (default -2, LLaVA's)", 0},
        {"vision-feature", TK_OPT_STR, &o.vision_feature, "F", "patch | cls_patch (default patch)", 0},
        {"image-preprocess", TK_OPT_STR, &o.image_preprocess, "P", "clip | llava-pad | siglip (default clip)", 0},
        {"image-size", TK_OPT_INT, &o.image_size, "S", "preprocess images to S pixels (default: the tower's image_size)", 0},
        {"interpolate-pos", TK_OPT_FLAG, &o.interpolate_pos, NULL, "interpolate the tower's position embeddings "
                                                                    "(bicubic) when --image-size is not its own", 0},
        {"dump", TK_OPT_STR, &o.dump_dir, "DIR", "write DIR/step1.safetensors: first step's loss, logits, gradients, gate", 0},
        {"steps", TK_OPT_INT, &o.steps, "N", "optimizer steps (default 100)", 0},
        {"batch-size", TK_OPT_INT, &o.batch_size, "B", "rows per micro-batch (default 1)", 0},
        {"grad-accum", TK_OPT_INT, &o.grad_accum, "K", "micro-batches per optimizer step (default 1)", 0},
        {"lr", TK_OPT_FLOAT, &o.lr, "X", "peak learning rate (default 2e-4)", 0},
        {"lr-scheduler", TK_OPT_STR, &sched, "NAME", "constant | linear | cosine (default constant)", 0},
        {"warmup-steps", TK_OPT_INT, &o.warmup_steps, "N", "linear learning-rate warm-up steps (default 0)", 0},
        {"weight-decay", TK_OPT_FLOAT, &o.weight_decay, "X", "AdamW weight decay, never on norms or tau (default 0)", 0},
        {"max-grad-norm", TK_OPT_FLOAT, &o.max_grad_norm, "X", "global-norm clipping, 0 = off (default 1.0)", 0},
        {"max-seq-len", TK_OPT_INT, &o.max_seq_len, "N", "truncate rows to N tokens (default: the model's)", 0},
        {"shuffle", TK_OPT_FLAG, &o.shuffle, NULL, "seeded shuffle of the rows every epoch (default: file order)", 0},
        {"bf16-weights", TK_OPT_FLAG, &o.bf16_weights, NULL, "keep BF16 base matrices BF16 in memory (half the RAM; exact)", 0},
        {"compute", TK_OPT_STR, &compute, "P", "fp32 | bf16: frozen products in BF16, fp32 accumulation (AVX512-BF16; default fp32)", 0},
        {"attention", TK_OPT_STR, &attention, "K", "auto | full | tiled (no T x T matrix; auto: tiled from 1024 positions)", 0},
        {"recompute", TK_OPT_STR, &recompute, "N", "recompute the first N layers (or all) in backward: less memory, exact (default 0)", 0},
        {"threads", TK_OPT_INT, &o.threads, "T", "OpenMP and BLAS threads (default: all cores)", 0},
        {"seed", TK_OPT_U64, &o.seed, "S", "seed for adapter init, dropout and shuffling (default 42)", 0},
        {"log-every", TK_OPT_INT, &o.log_every, "N", "progress line every N steps (default 1)", 0},
        {"quiet", TK_OPT_FLAG, &o.quiet, NULL, "no progress lines", 0},
        {"save-every", TK_OPT_INT, &o.save_every, "N", "checkpoint every N steps into OUT/checkpoint-N (default 0: never)", 0},
        {"keep-checkpoints", TK_OPT_INT, &o.keep_checkpoints, "K", "keep the newest K checkpoints, 0 = all (default 3)", 0},
        {"resume", TK_OPT_STR, &resume, "DIR", "continue from a checkpoint, or from the newest one in a run directory", 0},
        {"gate-log", TK_OPT_FLAG, &o.gate_log, "on|off", "record gates.jsonl, train_log.jsonl, tokens.jsonl in --out (default on; docs/gates.md)", 0},
        {"token-view-every", TK_OPT_INT, &o.token_view_every, "N", "token view of one sample every N steps too (default 0: last step only)", 0},
        {"nonfinite", TK_OPT_STR, &nonfinite, "POLICY", "non-finite loss or gradient: stop | skip the step (default stop)", 0},
        {"adapter-type", TK_OPT_STR, &type, "T", "new adapter: lora | dora | bottleneck | adalora (default lora)", 0},
        {"init-r", TK_OPT_INT, &ada.init_r, "N", "new AdaLoRA adapter: initial rank of every module (default 12)", 0},
        {"target-r", TK_OPT_INT, &ada.target_r, "N", "new AdaLoRA adapter: target average rank (default 8)", 0},
        {"tinit", TK_OPT_INT, &ada.tinit, "N", "AdaLoRA: steps before the rank budget starts to shrink (default 0)", 0},
        {"tfinal", TK_OPT_INT, &ada.tfinal, "N", "AdaLoRA: final steps at the target budget (default 0)", 0},
        {"delta-t", TK_OPT_INT, &ada.delta_t, "N", "AdaLoRA: deltaT, steps between two maskings (default 1)", 0},
        {"beta1", TK_OPT_FLOAT, &ada.beta1, "X", "AdaLoRA: EMA factor of the sensitivity, in (0,1) (default 0.85)", 0},
        {"beta2", TK_OPT_FLOAT, &ada.beta2, "X", "AdaLoRA: EMA factor of the uncertainty, in (0,1) (default 0.85)", 0},
        {"orth-reg-weight", TK_OPT_FLOAT, &ada.orth_reg_weight, "X", "AdaLoRA: weight of the orthogonal regulariser (default 0.5)", 0},
        {"total-step", TK_OPT_INT, &ada.total_step, "N", "AdaLoRA: the schedule's total steps (default: --steps)", 0},
        {"r", TK_OPT_INT, &r, "N", "new adapter: LoRA rank or bottleneck size (default 8)", 0},
        {"alpha", TK_OPT_FLOAT, &alpha, "X", "new adapter: lora_alpha (default 16)", 0},
        {"dropout", TK_OPT_FLOAT, &dropout, "P", "adapter dropout (default 0)", 0},
        {"rslora", TK_OPT_FLAG, &rslora, NULL, "new adapter: scale alpha/sqrt(r) (rsLoRA)", 0},
        {"target-modules", TK_OPT_STR, &targets, "LIST", "new adapter: q_proj,...,down_proj, all, full names (model.layers.3.mlp.up_proj) or @FILE (default q_proj,v_proj)", 0},
        {"layers", TK_OPT_STR, &layers, "LIST", "new adapter: layers to adapt, e.g. 0,2,4-7 (default all)", 0},
        {"train-tensors", TK_OPT_STR, &save, "LIST", "new adapter: base tensors trained in full (modules_to_save)", 0},
        {"bottleneck-act", TK_OPT_STR, &act, "F", "new bottleneck adapter: tanh | relu (default tanh)", 0},
        {"bottleneck-scaling", TK_OPT_FLOAT, &bn_scaling, "X", "new bottleneck adapter: output scaling (default 1)", 0},
        {"gate", TK_OPT_STR, &gate_s, "on|off|random", "TS-PEFT token gate; random: the chance control, each token's update kept with probability --keep (default on for a new adapter)", 0},
        {"keep", TK_OPT_FLOAT, &keep, "P", "--gate random: probability in (0,1] that a token's update is applied in a module", 0},
        {"ts-rule", TK_OPT_STR, &rule, "R", "threshold rule: prox | surrogate | importance | scaled | energy (default prox; docs/tspeft.md)", 0},
        {"ts-tau-scope", TK_OPT_STR, &scope, "S", "module: a threshold per module | layer: one shared by a layer's modules (default module)", 0},
        {"ts-straight-through", TK_OPT_FLAG, &g.straight_through, "on|off", "gated-off tokens still pass gradient to their adapter (default off)", 0},
        {"ts-trust-region", TK_OPT_FLOAT, &g.trust, "D", "prox-type rules: a step moves the kept share by at most D, 0 = off (default 0)", 0},
        {"ts-lambda", TK_OPT_FLOAT, &g.lambda, "X", "sparsity weight lambda (default 0.05)", 0},
        {"ts-eta-tau", TK_OPT_FLOAT, &g.eta_tau, "X", "threshold step size eta_tau (default 0.05)", 0},
        {"ts-tau0", TK_OPT_FLOAT, &g.tau0, "X", "initial threshold (default 0)", 0},
        {"ts-target-keep", TK_OPT_FLOAT, &g.target_keep, "RHO", "target keep ratio in (0,1]; lambda becomes a dual (default off)", 0},
        {"ts-eta-lambda", TK_OPT_FLOAT, &g.eta_lambda, "X", "dual step size with a target keep ratio (default 0.05)", 0},
        {"ts-beta", TK_OPT_FLOAT, &g.beta, "X", "surrogate rule temperature (default 0.01)", 0},
        {"ts-warmup-steps", TK_OPT_INT, &g.warmup_steps, "N", "steps with tau frozen at tau0 (default 0)", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    void *json = NULL;
    int status = 1;
    /* --config first, so that the command line overrides it */
    for (int i = 0; i + 1 < argc; i++)
        if (strcmp(argv[i], "--config") == 0 && tk_args_apply_config(opts, n, argv[i + 1], &json, &err)) goto fail;
    int pr = tk_args_parse(opts, n, argc, argv, USAGE, &err);
    if (pr == 1) return 0;
    if (pr < 0) {
        status = 2;
        goto fail;
    }
    /* --data may be repeated (the parser keeps the last): collect every one given on the command
     * line; a --config "data" key counts only when the command line has none */
    n_data = tk_args_collect(opts, n, argc, argv, "data", data_specs,
                             (int)(sizeof data_specs / sizeof data_specs[0]), &err);
    if (n_data < 0) {
        status = 2;
        goto fail;
    }
    if (n_data > 0) {
        o.data_specs = data_specs;
        o.n_data = n_data;
        o.data_path = data_specs[0];
    }
    if (!o.model_dir || !o.data_path) {
        tk_fail(&err, "train needs --model DIR and --data FILE (see --help)");
        status = 2;
        goto fail;
    }
    /* the gate's mode and rule, checked before anything is read or written */
    if (tk_cli_gate_mode(gate_s, tk_opt_seen(opts, n, "keep"), keep, &gate, &err)) {
        status = 2;
        goto fail;
    }
    tk_gate_rule rule_v = TK_GATE_PROX;
    tk_tau_scope scope_v = TK_TAU_MODULE;
    if (tk_gate_rule_parse(rule, &rule_v) || rule_v == TK_GATE_RANDOM) {
        tk_fail(&err, "--ts-rule: \"%s\" is not prox, surrogate, importance, scaled or energy (the chance control is --gate random)", rule);
        status = 2;
        goto fail;
    }
    if (tk_tau_scope_parse(scope, &scope_v)) {
        tk_fail(&err, "--ts-tau-scope: \"%s\" is not module or layer", scope);
        status = 2;
        goto fail;
    }
    if (!(o.mm_projector_lr >= 0.0f)) {
        tk_fail(&err, "--mm-projector-lr: %g is not >= 0", (double)o.mm_projector_lr);
        status = 2;
        goto fail;
    }
    if (!(g.trust >= 0.0f && g.trust <= 1.0f)) {
        tk_fail(&err, "--ts-trust-region: %g is not in [0, 1]", (double)g.trust);
        status = 2;
        goto fail;
    }
    if (tk_sched_parse(sched, &o.sched)) {
        tk_fail(&err, "--lr-scheduler: \"%s\" is not constant, linear or cosine", sched);
        goto fail;
    }
    tk_attn_mode amode;
    if (tk_attn_mode_parse(attention, &amode, &err) || tk_recompute_parse(recompute, &o.recompute, &err) ||
        tk_compute_parse(compute, &o.compute_bf16, &err)) {
        status = 2;
        goto fail;
    }
    o.compute_bf16 = tk_compute_resolve(o.compute_bf16, dist && dist->rank != 0);
    o.attention = (int)amode;
    if (strcmp(nonfinite, "stop") == 0) o.skip_nonfinite = 0;
    else if (strcmp(nonfinite, "skip") == 0) o.skip_nonfinite = 1;
    else {
        tk_fail(&err, "--nonfinite: \"%s\" is not stop or skip", nonfinite);
        goto fail;
    }
    if (resume) {
        if (o.adapter_dir) {
            tk_fail(&err, "--resume and --adapter exclude each other (a checkpoint holds its adapter)");
            goto fail;
        }
        if (tk_checkpoint_resolve(resume, resume_dir, sizeof resume_dir, &err)) goto fail;
        o.resume_dir = o.adapter_dir = resume_dir;
    }
    tk_peft_config *pc = &o.peft;
    /* LLaVA stage 1 trains no adapter: a stage-1 run or checkpoint has an adapter_config without targets */
    const int stage1 = o.vision_tower && o.stage == 1;
    if (stage1 && o.adapter_dir && !resume) {
        tk_fail(&err, "--stage 1 trains the projector alone: --adapter %s would not be used (start stage 2 from it)",
                o.adapter_dir);
        goto fail;
    }
    tk_proj_kind pk; /* checked here so that a contradicting --projector-type fails before --out is made */
    if (o.projector && !resume && tk_projector_kind_of(o.projector, o.projector_type, &pk, &err)) goto fail;
    if (o.adapter_dir && !(stage1 && resume)) {
        const char *fixed[] = {"adapter-type", "r", "alpha", "rslora", "target-modules", "layers", "train-tensors",
                               "bottleneck-act", "bottleneck-scaling", "init-r", "target-r"};
        for (size_t i = 0; i < sizeof fixed / sizeof fixed[0] && !resume; i++)
            if (tk_opt_seen(opts, n, fixed[i])) {
                tk_fail(&err, "--%s cannot change an existing adapter (%s/adapter_config.json decides it)", fixed[i], o.adapter_dir);
                goto fail;
            }
        char path[4096];
        snprintf(path, sizeof path, "%s/adapter_config.json", o.adapter_dir);
        if (tk_peft_config_load(pc, path, &err)) goto fail;
        if (tk_opt_seen(opts, n, "dropout") && !resume) pc->dropout = dropout;
    } else {
        tk_peft_config_default(pc);
        if (strcmp(type, "lora") == 0) pc->kind = TK_ADAPTER_LORA;
        else if (strcmp(type, "dora") == 0) pc->kind = TK_ADAPTER_DORA;
        else if (strcmp(type, "bottleneck") == 0) pc->kind = TK_ADAPTER_BOTTLENECK;
        else if (strcmp(type, "adalora") == 0) pc->kind = TK_ADAPTER_ADALORA;
        else if (strcmp(type, "none") == 0) pc->kind = TK_ADAPTER_NONE;
        else {
            tk_fail(&err, "--adapter-type: \"%s\" is not lora, dora, bottleneck, adalora or none", type);
            goto fail;
        }
        if (strcmp(act, "tanh") == 0) pc->act = TK_ACT_TANH;
        else if (strcmp(act, "relu") == 0) pc->act = TK_ACT_RELU;
        else {
            tk_fail(&err, "--bottleneck-act: \"%s\" is not tanh or relu", act);
            goto fail;
        }
        pc->r = r;
        pc->alpha = alpha;
        pc->dropout = dropout;
        pc->use_rslora = rslora;
        pc->bottleneck_scaling = bn_scaling;
        if (r < 1) {
            tk_fail(&err, "--r must be >= 1");
            goto fail;
        }
        if (pc->kind == TK_ADAPTER_ADALORA) {
            if (tk_opt_seen(opts, n, "r")) {
                tk_fail(&err, "--r: AdaLoRA's rank is --init-r (and --target-r)");
                status = 2;
                goto fail;
            }
            if (ada.init_r < 1 || ada.init_r > TK_ADALORA_MAX_R || ada.target_r < 0) {
                tk_fail(&err, "--init-r must be in [1, %d] and --target-r >= 0", TK_ADALORA_MAX_R);
                status = 2;
                goto fail;
            }
            if (ada.target_r > ada.init_r) {
                tk_fail(&err, "--target-r (%d) is larger than --init-r (%d)", ada.target_r, ada.init_r);
                status = 2;
                goto fail;
            }
            pc->ada = ada;
            pc->r = ada.init_r;
        } else {
            const char *only[] = {"init-r", "target-r", "tinit", "tfinal", "delta-t", "beta1", "beta2", "orth-reg-weight", "total-step"};
            for (size_t i = 0; i < sizeof only / sizeof only[0]; i++)
                if (tk_opt_seen(opts, n, only[i])) {
                    tk_fail(&err, "--%s is an AdaLoRA option (--adapter-type adalora)", only[i]);
                    status = 2;
                    goto fail;
                }
        }
        if (tk_peft_parse_target_list(pc, targets, &err) || (layers && tk_peft_parse_layers(pc, layers, &err)) ||
            (save && tk_peft_parse_save(pc, save, &err)))
            goto fail;
        pc->gate = g;
        pc->gate.enabled = gate && pc->kind != TK_ADAPTER_NONE;
        pc->gate.rule = rule_v;
        pc->gate.scope = scope_v;
    }
    if (!(pc->dropout >= 0.0f && pc->dropout < 1.0f)) {
        tk_fail(&err, "--dropout must be in [0, 1)");
        goto fail;
    }
    /* gate overrides apply to loaded adapters too; a resumed run takes everything from its checkpoint
     * (the same command line can be repeated with --resume added) */
    if (o.adapter_dir && !resume) {
        const char *names[] = {"ts-lambda", "ts-eta-tau", "ts-tau0", "ts-target-keep", "ts-eta-lambda", "ts-beta", "ts-warmup-steps"};
        float *fdst[] = {&pc->gate.lambda, &pc->gate.eta_tau, &pc->gate.tau0, &pc->gate.target_keep, &pc->gate.eta_lambda, &pc->gate.beta};
        float *fsrc[] = {&g.lambda, &g.eta_tau, &g.tau0, &g.target_keep, &g.eta_lambda, &g.beta};
        for (int i = 0; i < 6; i++)
            if (tk_opt_seen(opts, n, names[i])) *fdst[i] = *fsrc[i];
        if (tk_opt_seen(opts, n, names[6])) pc->gate.warmup_steps = g.warmup_steps;
        if (tk_opt_seen(opts, n, "ts-trust-region")) pc->gate.trust = g.trust;
        if (tk_opt_seen(opts, n, "ts-straight-through")) pc->gate.straight_through = g.straight_through;
        if (tk_opt_seen(opts, n, "ts-tau-scope")) pc->gate.scope = scope_v;
        if (tk_opt_seen(opts, n, "ts-rule")) pc->gate.rule = rule_v;
        if (tk_opt_seen(opts, n, "gate")) {
            pc->gate.enabled = gate != 0;
            if (gate != 2 && pc->gate.rule == TK_GATE_RANDOM) pc->gate.rule = rule_v;
        }
    }
    if (pc->kind == TK_ADAPTER_ADALORA) { /* the schedule, checked before anything is written */
        tk_adalora_config *a = &pc->ada;
        if (o.adapter_dir && !resume) { /* schedule options override a loaded AdaLoRA adapter's */
            if (tk_opt_seen(opts, n, "tinit")) a->tinit = ada.tinit;
            if (tk_opt_seen(opts, n, "tfinal")) a->tfinal = ada.tfinal;
            if (tk_opt_seen(opts, n, "delta-t")) a->delta_t = ada.delta_t;
            if (tk_opt_seen(opts, n, "beta1")) a->beta1 = ada.beta1;
            if (tk_opt_seen(opts, n, "beta2")) a->beta2 = ada.beta2;
            if (tk_opt_seen(opts, n, "orth-reg-weight")) a->orth_reg_weight = ada.orth_reg_weight;
            if (tk_opt_seen(opts, n, "total-step")) a->total_step = ada.total_step;
        }
        if (a->tinit < 0 || a->tfinal < 0 || a->delta_t < 1 || a->total_step < 0) {
            tk_fail(&err, "--tinit and --tfinal must be >= 0, --delta-t >= 1, --total-step >= 1");
            status = 2;
            goto fail;
        }
        if (!(a->beta1 > 0.0f && a->beta1 < 1.0f) || !(a->beta2 > 0.0f && a->beta2 < 1.0f)) {
            tk_fail(&err, "--beta1 and --beta2 must be in (0, 1)");
            status = 2;
            goto fail;
        }
        if (!(a->orth_reg_weight >= 0.0f)) {
            tk_fail(&err, "--orth-reg-weight must be >= 0");
            status = 2;
            goto fail;
        }
        int total = a->total_step > 0 ? a->total_step : o.steps;
        int from_file = o.adapter_dir && !tk_opt_seen(opts, n, "tinit") && !tk_opt_seen(opts, n, "tfinal") &&
                        !tk_opt_seen(opts, n, "total-step");
        if ((long)a->tinit + a->tfinal >= total && from_file) {
            tk_fail(&err, "%s/adapter_config.json: tinit (%d) + tfinal (%d) must be below %s (%d): the schedule leaves "
                          "no budgeting phase", o.adapter_dir, a->tinit, a->tfinal,
                    a->total_step > 0 ? "total_step" : "the run's --steps", total);
            goto fail;
        }
        if ((long)a->tinit + a->tfinal >= total) {
            tk_fail(&err, "--tinit (%d) + --tfinal (%d) must be below the total steps (%d, %s): the schedule leaves no "
                          "budgeting phase", a->tinit, a->tfinal, total, a->total_step > 0 ? "--total-step" : "--steps");
            status = 2;
            goto fail;
        }
    }
    if (gate == 2 && !resume) { /* the chance control: a random gate at the given keep probability */
        pc->gate.rule = TK_GATE_RANDOM;
        pc->gate.keep = keep;
    }
    if (!(pc->gate.eta_tau > 0.0f) || pc->gate.lambda < 0.0f || pc->gate.tau0 < 0.0f || !(pc->gate.beta > 0.0f) ||
        pc->gate.target_keep < 0.0f || pc->gate.target_keep > 1.0f || pc->gate.warmup_steps < 0 || pc->gate.eta_lambda < 0.0f) {
        tk_fail(&err, "gate options out of range: need eta_tau > 0, lambda >= 0, tau0 >= 0, beta > 0, target keep in (0,1]");
        goto fail;
    }
    int rc = tk_train_run(&o, &err);
    if (rc > 128) { /* stopped by a signal after saving */
        fprintf(stderr, "tspeft train: %s\n", err.msg);
        status = rc;
        goto out;
    }
    if (rc) goto fail;
    status = 0;
fail:
    if (status) {
        if (dist && dist->size > 1) fprintf(stderr, "tspeft train (rank %d): %s\n", dist->rank, err.msg);
        else fprintf(stderr, "tspeft train: %s\n", err.msg);
    }
out:
    tk_peft_config_free(&o.peft);
    tk_peft_config_free(&ada_defaults);
    cJSON_Delete(json);
    return status;
}
