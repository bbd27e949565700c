/* cmd_generate.c: `tspeft generate`: greedy decoding with a KV cache from token ids, with the
 * adapter (and its token gate) applied. */
#include "../model/llama.h"
#include "args.h"
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *USAGE =
    "usage: tspeft generate --model DIR [--adapter DIR] --ids 1,2,3 [--max-new-tokens N] [--eos ID]\n"
    "Greedy decoding with a KV cache; prints the generated ids on one line. The gated adapter is applied\n"
    "exactly as in training.";

/* Parses "1,2,3" (or spaces) into ids; returns the count or -1. */
static long parse_ids(const char *s, int32_t **out, tk_err *err) {
    size_t cap = 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids) return tk_fail(err, "out of memory");
    while (*s) {
        while (*s == ',' || *s == ' ') s++;
        if (!*s) break;
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v > 2147483647L) {
            free(ids);
            return tk_fail(err, "--ids: \"%s\" is not a list of non-negative integers", s);
        }
        if (n == cap) {
            int32_t *t = realloc(ids, 2 * cap * sizeof *ids);
            if (!t) {
                free(ids);
                return tk_fail(err, "out of memory");
            }
            ids = t;
            cap *= 2;
        }
        ids[n++] = (int32_t)v;
        s = end;
    }
    *out = ids;
    return (long)n;
}

int tk_cmd_generate(int argc, char **argv) {
    const char *model_dir = NULL, *adapter_dir = NULL, *ids_arg = NULL;
    int max_new = 32, eos = -1, threads = 0, bf16 = 0;
    tk_opt opts[] = {
        {"model", TK_OPT_STR, &model_dir, "DIR", "Hugging Face LLaMA directory", 0},
        {"adapter", TK_OPT_STR, &adapter_dir, "DIR", "PEFT adapter directory (optional)", 0},
        {"ids", TK_OPT_STR, &ids_arg, "LIST", "prompt token ids, comma-separated", 0},
        {"max-new-tokens", TK_OPT_INT, &max_new, "N", "tokens to generate (default 32)", 0},
        {"eos", TK_OPT_INT, &eos, "ID", "stop after this id (default: none)", 0},
        {"threads", TK_OPT_INT, &threads, "T", "threads (default: all cores)", 0},
        {"bf16-weights", TK_OPT_FLAG, &bf16, NULL, "keep BF16 base matrices BF16 in memory", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    tk_llama *m = NULL;
    int32_t *ids = NULL, *out = NULL;
    int status = 1;
    int pr = tk_args_parse(opts, n, argc, argv, USAGE, &err);
    if (pr == 1) return 0;
    if (pr < 0 || !model_dir || !ids_arg) {
        if (pr == 0) tk_fail(&err, "generate needs --model DIR and --ids LIST (see --help)");
        fprintf(stderr, "tspeft generate: %s\n", err.msg);
        return 2;
    }
    if (max_new < 1) {
        tk_fail(&err, "--max-new-tokens must be >= 1");
        goto done;
    }
    tk_set_threads(threads);
    long np = parse_ids(ids_arg, &ids, &err);
    if (np < 0) goto done;
    if (!(m = tk_llama_open_ex(model_dir, bf16, &err))) goto done;
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = TK_ADAPTER_NONE;
    if (adapter_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/adapter_config.json", adapter_dir);
        if (tk_peft_config_load(&pc, path, &err)) goto done;
    }
    int rc = tk_llama_attach(m, &pc, adapter_dir, 0, &err);
    tk_peft_config_free(&pc);
    if (rc) goto done;
    if (!(out = malloc((size_t)max_new * sizeof *out))) {
        tk_fail(&err, "out of memory");
        goto done;
    }
    long got = tk_llama_generate(m, ids, (size_t)np, (size_t)max_new, eos, out, &err);
    if (got < 0) goto done;
    for (long i = 0; i < got; i++) printf("%s%d", i ? " " : "", out[i]);
    printf("\n");
    status = 0;
done:
    if (status) fprintf(stderr, "tspeft generate: %s\n", err.msg);
    free(ids);
    free(out);
    tk_llama_close(m);
    return status;
}
