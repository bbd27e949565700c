/* convert.c: the format table of `tspeft convert` and the shard sink (see convert.h). */
#include "convert.h"

#include "convert_fashion_mnist.h"
#include "convert_image_folder.h"
#include "convert_llava.h"
#include "../src/train/multimodal.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

int tk_convert_llm_adapters(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err);
int tk_convert_alpaca(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err);
int tk_convert_glue(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err);
int tk_convert_jsonl(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err);

static int one_input(const tk_convert_opts *o, const char *fmt, tk_err *err) {
    if (o->n_inputs != 1) return tk_fail(err, "--format %s takes exactly one --input", fmt);
    return 0;
}

static int run_fashion_mnist(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err) {
    if (one_input(o, "fashion-mnist", err)) return -1;
    tk_fmnist_opts f = {.input_dir = o->inputs[0], .out_dir = o->out, .split = o->split, .limit = o->limit,
                        .progress = o->progress, .progress_ctx = o->progress_ctx};
    if (o->layout && strcmp(o->layout, "image-folder") == 0) f.image_folder = 1;
    else if (o->layout && strcmp(o->layout, "llava") != 0)
        return tk_fail(err, "--layout \"%s\": expected llava (PNGs + LLaVA JSON) or image-folder (OUT/<class>/*.png)",
                       o->layout);
    tk_fmnist_stats fs;
    if (tk_convert_fashion_mnist(&f, &fs, err)) return -1;
    st->records = fs.available;
    st->written = st->images = fs.items;
    return 0;
}

static int run_llava(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err) {
    if (one_input(o, "llava", err)) return -1;
    if (!o->tokenizer) return tk_fail(err, "--format llava needs --tokenizer");
    if (o->image_tokens == 0) return tk_fail(err, "--format llava needs --image-tokens N (the encoder's features per image)");
    if (o->drop_long) return tk_fail(err, "--format llava: --overflow drop is not supported (records are truncated)");
    tk_llava_convert_opts l = {.input = o->inputs[0], .image_folder = o->image_folder, .tokenizer = o->tokenizer,
                               .image_tokens = o->image_tokens, .out = o->out, .template_name = o->template_name,
                               .max_len = o->max_len, .skip_bad_images = o->skip_bad_images,
                               .progress = o->progress, .progress_ctx = o->progress_ctx};
    tk_mm *mm = NULL;
    if (o->encoder) { /* feature cache: the tower's default LLaVA selection (hidden state -2, patches) */
        tk_mm_opts mo = {.tower = o->encoder};
        if (!(mm = tk_mm_open(&mo, 1, err))) return -1;
        if (tk_mm_tokens(mm) != o->image_tokens) {
            tk_fail(err, "--encoder %s gives %zu features per image but --image-tokens is %zu", o->encoder,
                    tk_mm_tokens(mm), o->image_tokens);
            tk_mm_free(mm);
            return -1;
        }
        l.features = tk_mm_image_features;
        l.features_ctx = mm;
        l.features_dim = tk_mm_feature_dim(mm);
    }
    tk_llava_convert_stats ls;
    int rc = tk_convert_llava(&l, &ls, err);
    tk_mm_free(mm);
    if (rc) return -1;
    st->records = ls.records;
    st->written = ls.written;
    st->truncated = ls.truncated;
    st->no_target = ls.no_target;
    st->shards = ls.shards;
    st->tokens = ls.tokens;
    st->images = ls.with_image;
    return 0;
}

static int run_image_folder(const tk_convert_opts *o, tk_convert_stats *st, tk_err *err) {
    if (one_input(o, "image-folder", err)) return -1;
    tk_imgfolder_opts f = {.input_dir = o->inputs[0], .out = o->out, .records_per_shard = o->records_per_shard,
                           .limit = o->limit, .skip_bad_images = o->skip_bad_images, .progress = o->progress,
                           .progress_ctx = o->progress_ctx};
    return tk_convert_image_folder(&f, st, err);
}

static const tk_convert_format FORMATS[] = {
    {"llm-adapters", "LLM-Adapters JSON (instruction/input/output/answer): CSR tasks, commonsense_170k, math", tk_convert_llm_adapters},
    {"alpaca", "Alpaca JSON or JSONL (instruction/input/output)", tk_convert_alpaca},
    {"glue", "a GLUE task's TSV file (--task cola|sst2|mrpc|qqp|stsb|mnli_m|mnli_mm|qnli|rte|wnli)", tk_convert_glue},
    {"jsonl", "pre-tokenized JSONL (input_ids, labels, attention_mask)", tk_convert_jsonl},
    {"fashion-mnist", "Fashion-MNIST idx directory -> PNG images + LLaVA JSON in --out", run_fashion_mnist},
    {"llava", "LLaVA conversation JSON + --image-folder -> shards with image payloads", run_llava},
    {"image-folder", "one sub-folder of images per class (torchvision ImageFolder) -> image-classification shards", run_image_folder},
};

const tk_convert_format *tk_convert_formats(size_t *n) {
    *n = sizeof FORMATS / sizeof FORMATS[0];
    return FORMATS;
}

const tk_convert_format *tk_convert_format_find(const char *name) {
    for (size_t i = 0; name && i < sizeof FORMATS / sizeof FORMATS[0]; i++)
        if (strcmp(name, FORMATS[i].name) == 0) return &FORMATS[i];
    return NULL;
}

/* ---- shard sink ---- */

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

void tk_shard_sink_init(tk_shard_sink *s, const char *out, size_t per_shard, uint32_t vocab_size,
                        tk_convert_stats *st) {
    memset(s, 0, sizeof *s);
    s->out = out;
    s->per_shard = per_shard ? per_shard : TK_CONVERT_DEFAULT_RECORDS_PER_SHARD;
    s->vocab_size = vocab_size;
    s->st = st;
}

/* Rolling output: shard i is written (atomically, by the shard writer) to the hidden staging name
 * DIR/.BASE-0000i.shard.part and renamed to OUT-0000i.shard only when the whole conversion succeeded,
 * so a failed run leaves neither a partial dataset nor a damaged earlier one. */
static int sink_path(char *out, size_t n, const tk_shard_sink *s, size_t i, int staged, tk_err *err) {
    if (!staged) return tk_pathf(out, n, err, "%s-%05zu.shard", s->out, i);
    const char *slash = strrchr(s->out, '/');
    int dir_len = slash ? (int)(slash - s->out + 1) : 0;
    return tk_pathf(out, n, err, "%.*s.%s-%05zu.shard.part", dir_len, s->out, slash ? slash + 1 : s->out, i);
}

static int finish_current(tk_shard_sink *s, tk_err *err) {
    if (!s->w) return 0;
    tk_shard_stats fs;
    int rc = tk_shard_writer_close(s->w, &fs, err);
    s->w = NULL;
    if (rc) return -1;
    tk_shard_stats_add(&s->st->bytes, &fs);
    s->st->shards++;
    return 0;
}

int tk_shard_sink_add(tk_shard_sink *s, const tk_shard_record *rec, tk_err *err) {
    int single = ends_with(s->out, ".shard");
    if (s->w && !single && s->in_current >= s->per_shard && finish_current(s, err)) return -1;
    if (!s->w) {
        char path[4200];
        if (single) snprintf(path, sizeof path, "%s", s->out);
        else if (sink_path(path, sizeof path, s, s->index, 1, err)) return -1;
        if (s->index == 0 && tk_mkdir_parent(path, err)) return -1;
        tk_shard_writer_opts wo = {.vocab_size = s->vocab_size};
        if (!(s->w = tk_shard_writer_open(path, &wo, err))) return -1;
        s->index++;
        s->in_current = 0;
    }
    if (tk_shard_writer_add(s->w, rec, err)) return -1;
    s->in_current++;
    s->st->written++;
    s->st->tokens += rec->n_tokens;
    return 0;
}

static void remove_staged(tk_shard_sink *s) {
    char path[4200];
    if (!s->out) return; /* never initialized */
    for (size_t i = 0; !ends_with(s->out, ".shard") && i < s->index; i++)
        if (sink_path(path, sizeof path, s, i, 1, NULL) == 0) remove(path);
}

int tk_shard_sink_close(tk_shard_sink *s, tk_err *err) {
    if (finish_current(s, err)) {
        remove_staged(s);
        return -1;
    }
    if (ends_with(s->out, ".shard") || s->index == 0) return 0;
    char from[4200], to[4200];
    for (size_t i = 0; i < s->index; i++) {
        if (sink_path(from, sizeof from, s, i, 1, err) || sink_path(to, sizeof to, s, i, 0, err)) {
            remove_staged(s);
            return -1;
        }
        if (rename(from, to) != 0) {
            tk_fail(err, "%s: cannot rename to %s: %s", from, to, strerror(errno));
            remove_staged(s);
            return -1;
        }
    }
    /* shards of an earlier, longer conversion to the same OUT would otherwise join this dataset */
    for (size_t i = s->index;; i++) {
        struct stat sb;
        if (sink_path(to, sizeof to, s, i, 0, NULL) || stat(to, &sb) != 0 || !S_ISREG(sb.st_mode)) break;
        if (remove(to) != 0) return tk_fail(err, "%s: cannot remove this stale shard of an earlier conversion: %s", to,
                                            strerror(errno));
    }
    return 0;
}

void tk_shard_sink_abort(tk_shard_sink *s) {
    tk_shard_writer_abort(s->w);
    s->w = NULL;
    remove_staged(s);
}
