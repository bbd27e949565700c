/* convert_llava.h: LLaVA conversation JSON (+ an image folder) -> tokenized shards with image payloads.
 *
 *   tk_llava_convert_opts o = {.input = "llava_v1_5_mix665k.json", .image_folder = "data/images",
 *                              .tokenizer = "llava/tokenizer.model", .image_tokens = 576,
 *                              .out = "shards/llava"};   // template NULL: vicuna_v1
 *   tk_llava_convert_stats st;
 *   if (tk_convert_llava(&o, &st, &err) != 0) ...        // shards/llava-00000.shard, ...
 *
 * Input: a JSON array of records as LLaVA's training data has them:
 *   {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
 *    "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
 *                      {"from": "gpt", "value": "The bus is white and red."}, ...]}
 * "image" is optional (text-only records); "from" is human/user or gpt/assistant. As LLaVA's
 * preprocess does: leading turns not from the human are dropped, then turns must alternate human,
 * gpt; a turn holding <image> becomes "<image>\n" + its text with <image> removed and stripped
 * (preprocess_multimodal; ASCII whitespace only). A record with an image must hold exactly one
 * <image> (in a human turn), a record without one none.
 *
 * Each record is built with text/template.h (vicuna_v1 by default, i.e. LLaVA-1.5's
 * conv_vicuna_v1; llava_v1 and the others by name): loss on the gpt turns (and their </s>) only, from
 * the template's token spans. The <image> place becomes a run of image_tokens tokens of kind
 * TK_KIND_IMAGE with label -100; their input id is the tokenizer's unk id (LLaMA: 0), or 0 when the
 * model has none (the ids are never embedded: the projector's outputs replace them). The text after <image> starts a new encode call, as LLaVA's tokenizer_image_token
 * encodes each chunk separately. The image file's bytes (the original JPEG/PNG/...) are stored as the
 * record's one TK_IMAGE_ENCODED payload, after a full decode checked them (tk_image_decode, with
 * max_pixels). Meta: {"id": <as in the source>, "answer": <last gpt turn>, "task": "llava",
 * "image": <the record's image path, when it has one>}.
 *
 * Output: `out` ending in ".shard" is one shard file; otherwise shards OUT-00000.shard,
 * OUT-00001.shard, ... each closed once it holds shard_bytes of uncompressed records (existing files
 * with these names are replaced; others with the prefix are left alone). The parent directory is
 * created. Each shard appears atomically when complete (datasets/shard.h).
 *
 * Failure: -1 with one line in err naming the input (and record index and id) and what was wrong;
 * a missing, unreadable, truncated or corrupt image names the image and the record, unless
 * skip_bad_images, which counts and skips such records. Shards completed before a failure stay.
 */
#ifndef TK_DATASETS_CONVERT_LLAVA_H
#define TK_DATASETS_CONVERT_LLAVA_H

#include "../src/common.h"
#include "../text/template.h"

#include <stddef.h>
#include <stdint.h>

#define TK_LLAVA_DEFAULT_SHARD_BYTES ((size_t)1 << 30)
#define TK_LLAVA_MAX_IMAGE_TOKENS ((size_t)1 << 16)

typedef struct {
    const char *input;        /* LLaVA JSON file */
    const char *image_folder; /* image paths are relative to it (NULL: the JSON's directory) */
    const char *tokenizer;    /* sentencepiece tokenizer.model */
    size_t image_tokens;      /* tokens per image (e.g. 576 for CLIP ViT-L/14-336), 1..65536 */
    const char *out;          /* shard file (.shard) or prefix */
    const char *template_name; /* NULL: "vicuna_v1" */
    const char *system;       /* NULL: the template's default system prompt */
    size_t max_len;           /* > 0: keep the first max_len tokens (an image run may not be cut) */
    int skip_bad_images;      /* 1: skip records whose image is missing or broken (counted) */
    size_t max_pixels;        /* image decode limit; 0 = TK_IMAGE_DEFAULT_MAX_PIXELS */
    size_t shard_bytes;       /* 0 = TK_LLAVA_DEFAULT_SHARD_BYTES */
    void (*progress)(void *ctx, size_t done, size_t total);
    void *progress_ctx;
    size_t progress_every;    /* records between progress calls; 0 = 1000 */
    /* optional feature cache: when set, each image is stored as the frozen encoder's features
     * (TK_IMAGE_F16_FEATURES [image_tokens, dim]) instead of its file bytes, so training skips the
     * encoder. features(ctx, img, out, &dim) writes image_tokens x dim floats into out (capacity:
     * image_tokens * features_dim) and returns 0, or -1 with err set. */
    int (*features)(void *ctx, const void *img, float *out, size_t *dim, tk_err *err);
    void *features_ctx;
    size_t features_dim;
} tk_llava_convert_opts;

typedef struct {
    size_t records;       /* in the input */
    size_t written;       /* records written */
    size_t with_image;    /* of those, records with an image */
    size_t bad_images;    /* records skipped for a missing/broken image (skip_bad_images) */
    size_t truncated;     /* records cut by max_len */
    size_t no_target;     /* records left without any trained token (after truncation) */
    size_t shards;        /* shard files written */
    uint64_t tokens;      /* tokens written, image tokens included */
    uint64_t image_bytes; /* encoded image bytes stored */
} tk_llava_convert_stats;

int tk_convert_llava(const tk_llava_convert_opts *o, tk_llava_convert_stats *st, tk_err *err);

/* A template's segments with the one "<image>" of a text segment replaced by an image segment of
 * n_image positions (the text after it starts a new encode call, as LLaVA's tokenizer_image_token
 * does). *out is malloc'd (free()); its texts point into segs. -1 when there is no "<image>". */
int tk_llava_split_image(tk_segment **out, size_t *n_out, const tk_segments *segs, size_t n_image, tk_err *err);

#endif
