/* cmd_merge.c: `tspeft merge`: fold an adapter into the base weights and write an HF directory.
 * A TS-gated adapter cannot be merged exactly (the gate is per token); with --data the command
 * measures how far the merged (= ungated) model's logits are from the gated model's. */
#include "../../datasets/jsonl.h"
#include "../model/llama.h"
#include "args.h"
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *USAGE =
    "usage: tspeft merge --model DIR --adapter DIR --out DIR [--data FILE.jsonl] [--rows N]\n"
    "Writes DIR/config.json + DIR/model.safetensors (F32) with the adapter folded in: LoRA W0 + s B A,\n"
    "DoRA mag * V/||V||, trained tensors as trained. The TS-PEFT gate cannot be folded into weights: the\n"
    "merged model equals the ungated adapter. With --data, the first N rows are run gated and ungated and\n"
    "the logit difference is reported.";

/* Max and mean |gated - ungated| logits over the real positions of the first rows of d. */
static int gate_gap(tk_llama *m, const tk_jsonl_data *d, int n_rows, tk_err *err) {
    size_t B = (size_t)(n_rows < (int)d->n_rows ? n_rows : (int)d->n_rows);
    size_t *rows = calloc(B, sizeof *rows);
    tk_batch b = {0};
    tk_llama_acts *a = NULL;
    float *gated = NULL;
    int rc = -1;
    if (!rows) return tk_fail(err, "out of memory");
    for (size_t i = 0; i < B; i++) rows[i] = i;
    if (tk_batch_make(&b, d, rows, B, err) || !(a = tk_llama_acts_alloc(m, b.B, b.T, err))) goto done;
    size_t V = (size_t)m->cfg.vocab_size, N = b.B * b.T;
    if (!(gated = malloc(N * V * sizeof(float)))) {
        tk_fail(err, "out of memory");
        goto done;
    }
    tk_llama_set_gated(m, 1);
    if (tk_llama_forward(m, a, b.input_ids, b.attention_mask, b.B, b.T, 0, NULL, err)) goto done;
    memcpy(gated, a->logits, N * V * sizeof(float));
    tk_llama_set_gated(m, 0);
    if (tk_llama_forward(m, a, b.input_ids, b.attention_mask, b.B, b.T, 0, NULL, err)) goto done;
    double mx = 0.0, sum = 0.0, ref = 0.0;
    size_t cnt = 0;
    for (size_t i = 0; i < N; i++) {
        if (!b.attention_mask[i]) continue;
        for (size_t v = 0; v < V; v++) {
            double dd = fabs((double)gated[i * V + v] - a->logits[i * V + v]);
            if (dd > mx) mx = dd;
            sum += dd;
            ref += fabs((double)gated[i * V + v]);
        }
        cnt += V;
    }
    printf("gate gap on %zu rows: max |logit(gated) - logit(merged)| = %.4g, mean = %.4g (mean |logit| %.4g)\n", B, mx,
           cnt ? sum / cnt : 0.0, cnt ? ref / cnt : 0.0);
    rc = 0;
done:
    free(rows);
    free(gated);
    tk_batch_free(&b);
    tk_llama_acts_free(m, a);
    return rc;
}

int tk_cmd_merge(int argc, char **argv) {
    const char *model_dir = NULL, *adapter_dir = NULL, *out_dir = NULL, *data = NULL;
    int n_rows = 8, threads = 0;
    tk_opt opts[] = {
        {"model", TK_OPT_STR, &model_dir, "DIR", "Hugging Face LLaMA directory", 0},
        {"adapter", TK_OPT_STR, &adapter_dir, "DIR", "PEFT adapter directory", 0},
        {"out", TK_OPT_STR, &out_dir, "DIR", "output model directory (created)", 0},
        {"data", TK_OPT_STR, &data, "FILE", "JSONL rows to measure the gated-vs-merged logit gap on", 0},
        {"rows", TK_OPT_INT, &n_rows, "N", "rows of --data to use (default 8)", 0},
        {"threads", TK_OPT_INT, &threads, "T", "threads (default: all cores)", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    int pr = tk_args_parse(opts, n, argc, argv, USAGE, &err);
    if (pr == 1) return 0;
    if (pr < 0 || !model_dir || !adapter_dir || !out_dir) {
        if (pr == 0) tk_fail(&err, "merge needs --model DIR --adapter DIR --out DIR");
        fprintf(stderr, "tspeft merge: %s\n", err.msg);
        return 2;
    }
    tk_set_threads(threads);
    int status = 1;
    tk_llama *m = NULL;
    tk_jsonl_data *d = NULL;
    tk_peft_config pc;
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_config.json", adapter_dir);
    if (tk_peft_config_load(&pc, path, &err)) goto done;
    if (!(m = tk_llama_open(model_dir, &err)) || tk_llama_attach(m, &pc, adapter_dir, 0, &err)) goto done;
    if (data && (n_rows < 1 || !(d = tk_jsonl_load(data, m->cfg.vocab_size, (size_t)m->cfg.max_seq_len, &err))))
        goto done;
    if (mkdir(out_dir, 0755) != 0 && errno != EEXIST) {
        tk_fail(&err, "%s: cannot create directory: %s", out_dir, strerror(errno));
        goto done;
    }
    if (tk_llama_merge(m, model_dir, out_dir, &err)) goto done;
    printf("merged %s into %s\n", adapter_dir, out_dir);
    if (pc.gate.enabled)
        printf("note: %s is TS-gated; the gate is per token and cannot be folded into weights, so the merged "
               "model equals the UNGATED adapter\n",
               adapter_dir);
    if (d && gate_gap(m, d, n_rows, &err)) goto done;
    status = 0;
done:
    if (status) fprintf(stderr, "tspeft merge: %s\n", err.msg);
    tk_peft_config_free(&pc);
    tk_jsonl_free(d);
    tk_llama_close(m);
    return status;
}
