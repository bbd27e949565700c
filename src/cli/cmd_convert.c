/* cmd_convert.c: `tspeft convert`: dataset files -> shards (datasets/convert.h, docs/convert.md). */
#include "../../datasets/convert.h"
#include "args.h"
#include "cli.h"

#include <cJSON.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_INPUTS 256

typedef struct {
    double t0, last;
    int quiet;
} progress_state;

static void on_progress(void *ctx, size_t done, size_t total) {
    progress_state *p = ctx;
    double now = tk_time();
    if (p->quiet || (now - p->last < 1.0 && done != total)) return;
    p->last = now;
    double rate = done / (now - p->t0 + 1e-9);
    if (total) fprintf(stderr, "convert: %zu/%zu records  %.0f rec/s  eta %.0fs\n", done, total, rate,
                       rate > 0 ? (double)(total - done) / rate : 0.0);
    else fprintf(stderr, "convert: %zu records  %.0f rec/s\n", done, rate);
}

int tk_cmd_convert(int argc, char **argv) {
    tk_convert_opts o = {0};
    const char *config = NULL, *input = NULL, *overflow = "truncate";
    const char *inputs[MAX_INPUTS];
    int max_len = 0, per_shard = 0, limit = 0, image_tokens = 0, vocab = 0, json = 0, quiet = 0;
    int responses_only = 0, train_on_inputs = 0;
    tk_opt opts[] = {
        {"config", TK_OPT_STR, &config, "FILE", "JSON file of option defaults (keys = option names)", 0},
        {"format", TK_OPT_STR, &o.format, "NAME", "llm-adapters | alpaca | glue | jsonl | fashion-mnist | llava | image-folder", 0},
        {"input", TK_OPT_STR, &input, "PATH", "input file (fashion-mnist: the idx directory; image-folder: the folder of "
                                              "class folders); repeatable", 0},
        {"out", TK_OPT_STR, &o.out, "PATH", "X.shard: one shard; otherwise the prefix of X-00000.shard, ... "
                                            "(fashion-mnist: output directory)", 0},
        {"layout", TK_OPT_STR, &o.layout, "NAME", "fashion-mnist: llava (OUT/images/*.png + OUT/<split>.json, the default) | "
                                                  "image-folder (OUT/<class>/<split>_<index>.png)", 0},
        {"tokenizer", TK_OPT_STR, &o.tokenizer, "FILE", "sentencepiece tokenizer.model (text formats, llava)", 0},
        {"template", TK_OPT_STR, &o.template_name, "NAME", "alpaca (LLM-Adapters, default for text) | vicuna_v1 "
                                                           "(default for llava) | llava_v1 | llama2 | plain", 0},
        {"task", TK_OPT_STR, &o.task, "NAME", "CSR or GLUE task (default: the one the input path names, e.g. boolq/train.json, RTE/dev.tsv)", 0},
        {"responses-only", TK_OPT_FLAG, &responses_only, NULL,
         "labels on responses only (LLM-Adapters --train_on_inputs False); default: every token, as LLM-Adapters", 0},
        {"train-on-inputs", TK_OPT_FLAG, &train_on_inputs, NULL, "labels on every token (the default)", 0},
        {"max-len", TK_OPT_INT, &max_len, "N", "records longer than N tokens are truncated or dropped (default: no limit)", 0},
        {"overflow", TK_OPT_STR, &overflow, "MODE", "truncate (keep the first N tokens, LLM-Adapters' cutoff) | drop", 0},
        {"records-per-shard", TK_OPT_INT, &per_shard, "N", "records per shard file (default 100000)", 0},
        {"limit", TK_OPT_INT, &limit, "N", "only the first N records of each input (image-folder: of each class)", 0},
        {"vocab-size", TK_OPT_INT, &vocab, "V", "jsonl without --tokenizer: ids must be below V", 0},
        {"image-folder", TK_OPT_STR, &o.image_folder, "DIR", "llava: image paths are relative to it", 0},
        {"encoder", TK_OPT_STR, &o.encoder, "DIR", "llava: store the frozen vision tower's F16 features instead of the image "
                                                   "files (training then skips the encoder)", 0},
        {"image-tokens", TK_OPT_INT, &image_tokens, "N", "llava: tokens per image (the encoder's features, e.g. 576)", 0},
        {"split", TK_OPT_STR, &o.split, "NAME", "fashion-mnist: train | test (default train)", 0},
        {"skip-bad-images", TK_OPT_FLAG, &o.skip_bad_images, NULL, "llava, image-folder: skip (and count) missing or broken images", 0},
        {"json", TK_OPT_FLAG, &json, NULL, "print the summary as JSON on stdout", 0},
        {"quiet", TK_OPT_FLAG, &quiet, NULL, "no progress lines", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    void *cfg_json = NULL;
    int status = 1;
    for (int i = 0; i + 1 < argc; i++)
        if (strcmp(argv[i], "--config") == 0 && tk_args_apply_config(opts, n, argv[i + 1], &cfg_json, &err)) {
            fprintf(stderr, "tspeft convert: %s\n", err.msg);
            return 2;
        }
    int pr = tk_args_parse(opts, n, argc, argv,
                           "tspeft convert --format F --input PATH [--input PATH ...] --out OUT [options]\n\n"
                           "Converts dataset files into zstd shards that `tspeft train --data` reads (docs/convert.md).",
                           &err);
    if (pr == 1) {
        size_t nf;
        const tk_convert_format *f = tk_convert_formats(&nf);
        printf("\nformats:\n");
        for (size_t i = 0; i < nf; i++) printf("  %-14s %s\n", f[i].name, f[i].what);
        cJSON_Delete(cfg_json);
        return 0;
    }
    if (pr < 0) {
        status = 2;
        goto fail;
    }
    int n_in = tk_args_collect(opts, n, argc, argv, "input", inputs, MAX_INPUTS, &err);
    if (n_in < 0) {
        status = 2;
        goto fail;
    }
    if (n_in == 0 && input) inputs[n_in++] = input; /* from --config */
    const tk_convert_format *f = tk_convert_format_find(o.format);
    if (!f || n_in == 0 || !o.out) {
        if (!f && o.format) tk_fail(&err, "unknown --format \"%s\" (see --help)", o.format);
        else tk_fail(&err, "convert needs --format, --input and --out (see --help)");
        status = 2;
        goto fail;
    }
    if (max_len < 0 || per_shard < 0 || limit < 0 || image_tokens < 0 || vocab < 0) {
        tk_fail(&err, "--max-len, --records-per-shard, --limit, --image-tokens and --vocab-size must be >= 0");
        status = 2;
        goto fail;
    }
    if (strcmp(overflow, "truncate") != 0 && strcmp(overflow, "drop") != 0) {
        tk_fail(&err, "--overflow must be truncate or drop, not \"%s\"", overflow);
        status = 2;
        goto fail;
    }
    if (responses_only && train_on_inputs) {
        tk_fail(&err, "--responses-only and --train-on-inputs contradict each other");
        status = 2;
        goto fail;
    }
    if (o.layout && (strcmp(f->name, "fashion-mnist") != 0 ||
                     (strcmp(o.layout, "llava") != 0 && strcmp(o.layout, "image-folder") != 0))) {
        if (strcmp(f->name, "fashion-mnist") != 0) tk_fail(&err, "--layout is an option of --format fashion-mnist only");
        else tk_fail(&err, "--layout \"%s\": expected llava or image-folder", o.layout);
        status = 2;
        goto fail;
    }
    o.inputs = inputs;
    o.n_inputs = (size_t)n_in;
    o.responses_only = responses_only;
    o.max_len = (size_t)max_len;
    o.drop_long = strcmp(overflow, "drop") == 0;
    o.records_per_shard = (size_t)per_shard;
    o.limit = (size_t)limit;
    o.vocab_size = vocab;
    o.image_tokens = (size_t)image_tokens;
    progress_state ps = {tk_time(), 0.0, quiet};
    o.progress = on_progress;
    o.progress_ctx = &ps;
    tk_convert_stats st;
    memset(&st, 0, sizeof st);
    if (f->run(&o, &st, &err)) goto fail;
    double secs = tk_time() - ps.t0, in_bytes = 0;
    for (int i = 0; i < n_in; i++) { /* input throughput (files; a directory counts 0) */
        struct stat sb;
        if (stat(inputs[i], &sb) == 0 && S_ISREG(sb.st_mode)) in_bytes += (double)sb.st_size;
    }
    double ratio = tk_shard_stats_ratio(&st.bytes);
    if (json) {
        printf("{\"format\": \"%s\", \"records\": %zu, \"written\": %zu, \"tokens\": %llu, \"truncated\": %zu, "
               "\"dropped\": %zu, \"no_target\": %zu, \"shards\": %zu, \"images\": %zu, \"raw_bytes\": %llu, "
               "\"compressed_bytes\": %llu, \"file_bytes\": %llu, \"compression_ratio\": %.4f, \"seconds\": %.3f, "
               "\"input_bytes\": %.0f, \"input_mb_per_s\": %.3f, \"classes\": %zu, \"skipped_files\": %zu}\n",
               f->name, st.records, st.written, (unsigned long long)st.tokens, st.truncated, st.dropped, st.no_target,
               st.shards, st.images, (unsigned long long)st.bytes.raw_bytes, (unsigned long long)st.bytes.compressed_bytes,
               (unsigned long long)st.bytes.file_bytes, ratio, secs, in_bytes, in_bytes / 1e6 / (secs > 0 ? secs : 1e-9),
               st.classes, st.skipped);
    }
    if (!quiet) {
        fprintf(stderr, "convert: %s -> %s: %zu records read, %zu written (%llu tokens), %zu truncated, %zu dropped",
                f->name, o.out, st.records, st.written, (unsigned long long)st.tokens, st.truncated, st.dropped);
        if (st.no_target) fprintf(stderr, ", %zu without a trained token", st.no_target);
        if (st.shards && st.bytes.file_bytes)
            fprintf(stderr, "; %zu shard%s, %.1f MiB (%.2fx compression)", st.shards, st.shards == 1 ? "" : "s",
                    (double)st.bytes.file_bytes / 1048576.0, ratio);
        if (st.images) fprintf(stderr, "; %zu images", st.images);
        if (st.classes) fprintf(stderr, " in %zu classes", st.classes);
        if (st.skipped) fprintf(stderr, "; %zu files that are not images skipped", st.skipped);
        fprintf(stderr, "; %.1fs", secs);
        if (in_bytes > 0) fprintf(stderr, " (%.1f MB/s of input)", in_bytes / 1e6 / (secs > 0 ? secs : 1e-9));
        fprintf(stderr, "\n");
    }
    status = 0;
fail:
    if (status) fprintf(stderr, "tspeft convert: %s\n", err.msg);
    cJSON_Delete(cfg_json);
    return status;
}
