/* convert.h: `tspeft convert`: dataset files -> zstd shards (datasets/shard.h), one row per format.
 *
 *   tk_convert_opts o = {.format = "llm-adapters", .inputs = paths, .n_inputs = 1,
 *                        .tokenizer = "tokenizer.model", .out = "shards/boolq-train"};
 *   tk_convert_stats st;
 *   const tk_convert_format *f = tk_convert_format_find(o.format);
 *   if (!f || f->run(&o, &st, &err) != 0) ...;
 *
 * Formats (docs/convert.md):
 *   llm-adapters  LLM-Adapters JSON (instruction / input / output / answer): commonsense tasks,
 *                 commonsense_170k, math sets; the task (for metadata) from --task or the path
 *   alpaca        Alpaca JSON or JSONL (instruction / input / output)
 *   glue          a GLUE task's TSV (--task cola|sst2|mrpc|qqp|stsb|mnli_m|mnli_mm|qnli|rte|wnli)
 *   jsonl         pre-tokenized JSONL (input_ids, labels, optional attention_mask) as `train` reads it
 *   fashion-mnist Fashion-MNIST idx files -> PNG images + LLaVA JSON (no shards; then --format llava)
 *   llava         LLaVA conversation JSON + image folder -> shards with image payloads
 *   image-folder  one sub-folder of images per class (torchvision's ImageFolder) -> image-classification
 *                 shards: one image token and payload per record (datasets/convert_image_folder.h)
 * Text records: the template's training example (LLM-Adapters' prompt by default), labels on every
 * token (LLM-Adapters' train_on_inputs default) or on responses only, kinds PROMPT/RESPONSE, and meta
 * {"task", "id", "answer", "choices", "label", "score"} for evaluation and analysis.
 *
 * Output: `out` ending in ".shard" is one file (records_per_shard ignored); otherwise OUT-00000.shard,
 * OUT-00001.shard, ... with records_per_shard records each. They are written under hidden staging names
 * (DIR/.BASE-00000.shard.part, which the trainer's directory scan skips) and renamed into place only
 * when the whole conversion succeeded; OUT-NNNNN.shard files numbered past the last one written (left
 * by an earlier, longer conversion to the same OUT) are then removed. Long records (max_len) are
 * truncated from the right or dropped, and counted.
 * Failure: -1 with one line naming the input (and record) and what was wrong; no shard of the failed
 * run is left behind and existing files at the output names are untouched (the text formats and
 * jsonl; llava and fashion-mnist keep their own rules, see their headers).
 */
#ifndef TK_DATASETS_CONVERT_H
#define TK_DATASETS_CONVERT_H

#include "../src/common.h"
#include "shard.h"

#include <stddef.h>
#include <stdint.h>

#define TK_CONVERT_DEFAULT_RECORDS_PER_SHARD 100000

typedef struct {
    const char *format;
    const char *const *inputs; /* [n_inputs] input files (fashion-mnist: one directory) */
    size_t n_inputs;
    const char *out;           /* shard file (.shard) or prefix; fashion-mnist: output directory */
    const char *tokenizer;     /* sentencepiece model (text formats and llava) */
    const char *template_name; /* NULL: "alpaca" (LLM-Adapters) for text, "vicuna_v1" for llava */
    const char *task;          /* CSR / GLUE task name; NULL: from the path (llm-adapters) */
    int responses_only;        /* 1: labels only on responses (LLM-Adapters' train_on_inputs=False) */
    size_t max_len;            /* > 0: records longer than this are truncated or dropped */
    int drop_long;             /* 1: drop records over max_len instead of truncating */
    size_t records_per_shard;  /* 0: TK_CONVERT_DEFAULT_RECORDS_PER_SHARD */
    size_t limit;              /* > 0: only the first `limit` records of each input */
    int32_t vocab_size;        /* jsonl without a tokenizer: ids must lie below it (0: no check) */
    /* vision formats */
    const char *image_folder;
    const char *encoder;       /* llava: store the frozen encoder's F16 features (a CLIP/SigLIP tower dir) */
    size_t image_tokens;
    const char *split;
    int skip_bad_images;
    const char *layout;        /* fashion-mnist: "llava" (default: PNGs + LLaVA JSON) or "image-folder" */
    /* progress: called now and then with records done so far (total 0 when unknown) */
    void (*progress)(void *ctx, size_t done, size_t total);
    void *progress_ctx;
} tk_convert_opts;

typedef struct {
    size_t records;      /* read from the inputs */
    size_t written;      /* written to shards */
    size_t truncated;    /* cut to max_len */
    size_t dropped;      /* over max_len and dropped */
    size_t no_target;    /* written records with no trained label (after truncation) */
    size_t shards;       /* shard files written */
    uint64_t tokens;     /* tokens written */
    tk_shard_stats bytes; /* summed over the shards: raw / compressed / file bytes */
    size_t images;       /* fashion-mnist: images written; llava: records with an image */
    size_t skipped;      /* image-folder: files that are not images, skipped */
    size_t classes;      /* image-folder: class folders */
} tk_convert_stats;

typedef struct {
    const char *name;
    const char *what;
    int (*run)(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err);
} tk_convert_format;

const tk_convert_format *tk_convert_formats(size_t *n);
const tk_convert_format *tk_convert_format_find(const char *name);

/* ---- shared by the format implementations ---- */

/* Shards written in sequence under one name (the `out` rule above). */
typedef struct {
    const char *out;
    size_t per_shard, in_current, index;
    uint32_t vocab_size;
    tk_shard_writer *w;
    tk_convert_stats *st;
} tk_shard_sink;

void tk_shard_sink_init(tk_shard_sink *s, const char *out, size_t per_shard, uint32_t vocab_size,
                        tk_convert_stats *st);
int tk_shard_sink_add(tk_shard_sink *s, const tk_shard_record *rec, tk_err *err);
int tk_shard_sink_close(tk_shard_sink *s, tk_err *err);
void tk_shard_sink_abort(tk_shard_sink *s);

#endif
