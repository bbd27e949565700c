/* cmd_info.c: `tspeft info`: what a model directory and an adapter hold. */
#include "../model/llama.h"
#include "args.h"
#include "cli.h"

#include <stdio.h>

static const char *USAGE = "usage: tspeft info --model DIR [--adapter DIR]\n"
                           "Prints the model's shape and, with --adapter, every adapted module with its threshold.";

int tk_cmd_info(int argc, char **argv) {
    const char *model_dir = NULL, *adapter_dir = NULL;
    tk_opt opts[] = {
        {"model", TK_OPT_STR, &model_dir, "DIR", "Hugging Face LLaMA directory", 0},
        {"adapter", TK_OPT_STR, &adapter_dir, "DIR", "PEFT adapter directory (optional)", 0},
    };
    tk_err err = {0};
    int pr = tk_args_parse(opts, 2, argc, argv, USAGE, &err);
    if (pr == 1) return 0;
    if (pr < 0 || !model_dir) {
        if (pr == 0) tk_fail(&err, "info needs --model DIR");
        fprintf(stderr, "tspeft info: %s\n", err.msg);
        return 2;
    }
    tk_set_threads(1);
    tk_llama *m = tk_llama_open(model_dir, &err);
    if (!m) {
        fprintf(stderr, "tspeft info: %s\n", err.msg);
        return 1;
    }
    const tk_llama_config *c = &m->cfg;
    printf("model %s: %d layers, hidden %d, mlp %d, heads %d (kv %d, head dim %d), vocab %d, max positions %d,\n"
           "  rms eps %g, rope theta %g%s, %s embeddings\n",
           model_dir, c->n_layers, c->dim, c->hidden_dim, c->n_heads, c->n_kv_heads, c->head_dim, c->vocab_size,
           c->max_seq_len, c->norm_eps, c->rope_theta, c->rope_llama3 ? " (llama3 scaling)" : "",
           c->tie_embeddings ? "tied" : "untied");
    int status = 0;
    if (adapter_dir) {
        char path[4096];
        tk_peft_config pc;
        snprintf(path, sizeof path, "%s/adapter_config.json", adapter_dir);
        m->vit_targets = TK_VIT_IGNORE; /* the LLaMA's part; the tower's modules are counted below */
        if (tk_peft_config_load(&pc, path, &err) || tk_llama_attach(m, &pc, adapter_dir, 0, &err)) {
            fprintf(stderr, "tspeft info: %s\n", err.msg);
            status = 1;
        } else {
            char gate[96] = "off";
            if (pc.gate.enabled && pc.gate.rule == TK_GATE_RANDOM)
                snprintf(gate, sizeof gate, "random (keep %g)", (double)pc.gate.keep);
            else if (pc.gate.enabled)
                snprintf(gate, sizeof gate, "%s (lambda %g%s%s)", tk_gate_rule_name(pc.gate.rule), (double)pc.gate.lambda,
                         pc.gate.scope == TK_TAU_LAYER ? ", a threshold per layer" : "",
                         pc.gate.straight_through ? ", straight-through" : "");
            printf("adapter %s: %s r=%d, scale %g, dropout %g, %zu trainable values, gate %s\n", adapter_dir,
                   tk_adapter_kind_name(pc.kind), pc.r, tk_peft_scale(&pc), pc.dropout, m->params.total, gate);
            if (pc.kind != TK_ADAPTER_NONE && tk_peft_has_vit(&pc)) { /* not attached here: no tower */
                if (pc.vit_proj_mask) printf("  vision tower (%s): the targeted projections of every layer", pc.vit_prefix);
                else printf("  vision tower (%s): %d adapted modules", pc.vit_prefix, pc.n_vit_modules);
                printf(", not counted above (eval and generate use them with --vision-tower)\n");
            }
            if (pc.kind == TK_ADAPTER_ADALORA) {
                int total = 0, mods = 0;
                for (int l = 0; l < c->n_layers; l++)
                    for (int p = 0; p < TK_NPROJ; p++)
                        if (tk_peft_targets(&pc, l, p)) {
                            const tk_rank_entry *e = tk_peft_rank_find(&pc, l, p);
                            total += e ? tk_rank_count(e, pc.r) : pc.r;
                            mods++;
                        }
                printf("AdaLoRA: init_r %d, target_r %d, %s; %d ranks over %d modules (budget %d)\n", pc.ada.init_r,
                       pc.ada.target_r, pc.ada.n_rank ? "rank_pattern allocated" : "no rank_pattern (every module at init_r)",
                       total, mods, pc.ada.target_r * mods);
            }
            for (int l = 0; l < c->n_layers; l++)
                for (int p = 0; p < TK_NPROJ; p++) {
                    const tk_adapted_linear *L = &m->layers[l].proj[p];
                    if (L->kind == TK_ADAPTER_NONE) continue;
                    if (pc.kind == TK_ADAPTER_ADALORA) /* the final rank (rank_pattern) of init_r */
                        printf("  layers.%d.%s.%s  %zux%zu  rank %zu/%d  tau %.6g\n", l, tk_proj_block[p], tk_proj_short[p],
                               L->out, L->in, L->r, pc.r, L->tau);
                    else
                        printf("  layers.%d.%s.%s  %zux%zu  tau %.6g\n", l, tk_proj_block[p], tk_proj_short[p], L->out,
                               L->in, L->tau);
                }
        }
        tk_peft_config_free(&pc);
    }
    tk_llama_close(m);
    return status;
}
