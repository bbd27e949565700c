/* main.c: `tspeft <verb> [options]`. */
#include "blas_core.h"
#include "cli.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    int (*run)(int, char **);
    const char *what;
} verbs[] = {
    {"convert", tk_cmd_convert, "dataset files (LLM-Adapters, Alpaca, GLUE, JSONL, LLaVA, Fashion-MNIST) -> shards"},
    {"train", tk_cmd_train, "fine-tune a LLaMA with (TS-gated) LoRA, DoRA, Adapter or full tensors"},
    {"generate", tk_cmd_generate, "greedy decoding with a KV cache from token ids"},
    {"gates", tk_cmd_gates, "where the TS-PEFT gates opened in a run: tables, JSON/CSV, SVG pictures"},
    {"select", tk_cmd_select, "pick target modules for a budget by learned keep ratio, weight norms or at random"},
    {"eval", tk_cmd_eval, "benchmarks: commonsense reasoning (generation or log-likelihood) and GLUE"},
    {"merge", tk_cmd_merge, "fold an adapter into the base weights (reports the gated-vs-merged gap)"},
    {"bench", tk_cmd_bench, "training-step speed and memory of a synthetic LLaMA, beside the sgemm peak"},
    {"info", tk_cmd_info, "describe a model directory and an adapter"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: tspeft <verb> [options]   (tspeft <verb> --help for a verb's options)\n\nverbs:\n");
    for (size_t i = 0; i < sizeof verbs / sizeof verbs[0]; i++) fprintf(f, "  %-10s %s\n", verbs[i].name, verbs[i].what);
}

int main(int argc, char **argv) {
    tk_blas_core_fix(argv); /* returns unless it restarts the program with OpenBLAS's AVX kernels */
    /* A file-size limit (ulimit -f) must surface as a write error (EFBIG), not kill the process. */
    signal(SIGXFSZ, SIG_IGN);
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof verbs / sizeof verbs[0]; i++)
        if (strcmp(argv[1], verbs[i].name) == 0) return verbs[i].run(argc - 2, argv + 2);
    fprintf(stderr, "tspeft: unknown verb \"%s\"\n", argv[1]);
    usage(stderr);
    return 2;
}
