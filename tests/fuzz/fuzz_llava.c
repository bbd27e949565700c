/* fuzz_llava.c: tk_convert_llava on an arbitrary LLaVA conversation JSON (datasets/convert_llava.h),
 * converting into one shard with 4 image tokens per image and the vicuna_v1 template. Fixed beside it:
 * the tokenizer (the committed seed tests/fuzz/corpus/tokenizer/ok_llama_bpe_byte_fallback.model, a
 * LLaMA-style BPE with byte fallback, so any text encodes) and an image folder holding ok.png (8 x 8),
 * broken.png (a PNG cut inside its pixel data), notes.txt and a directory sub/. A record may name those,
 * a missing file, or any absolute path (the converter allows them, as LLaVA data sets use paths).
 * An accepted input must have written the shard: it opens, holds stats.written records, and every
 * record reads back with exactly 4 image tokens (label -100) per image payload.
 */
#include "datasets/convert_llava.h"
#include "datasets/shard.h"
#include "fuzz_common.h"
#include "vision/image.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef TKF_CORPUS_DIR
#error "TKF_CORPUS_DIR (tests/fuzz/corpus) must be defined by the build"
#endif

enum { TKF_IMAGE_TOKENS = 4 };

static const char *fixture(void) {
    static char folder[600];
    if (folder[0]) return folder;
    snprintf(folder, sizeof folder, "%s", tkf_mkdir("llava_images"));
    tkf_mkdir("llava_images/sub");
    uint8_t px[8 * 8 * 3];
    for (size_t i = 0; i < sizeof px; i++) px[i] = (uint8_t)(i * 7);
    tk_err err = {0};
    size_t n = 0;
    uint8_t *png = tk_image_encode_png(&n, px, 8, 8, 3, &err);
    TKF_REQUIRE(png != NULL && n > 40);
    char path[700];
    snprintf(path, sizeof path, "%s/ok.png", folder);
    tkf_write(path, png, n);
    snprintf(path, sizeof path, "%s/broken.png", folder);
    tkf_write(path, png, n - 20);
    free(png);
    snprintf(path, sizeof path, "%s/notes.txt", folder);
    tkf_write_str(path, "not an image\n");
    return folder;
}

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *folder = fixture();
    const char *input = tkf_path("llava.json");
    tkf_write(input, data, size);
    char out[600];
    snprintf(out, sizeof out, "%s", tkf_path("out.shard"));
    unlink(out);
    tk_llava_convert_opts o = {.input = input,
                               .image_folder = folder,
                               .tokenizer = TKF_CORPUS_DIR "/tokenizer/ok_llama_bpe_byte_fallback.model",
                               .image_tokens = TKF_IMAGE_TOKENS,
                               .out = out,
                               .max_pixels = (size_t)1 << 16};
    tk_llava_convert_stats st;
    memset(&st, 0, sizeof st);
    int rc = tk_convert_llava(&o, &st, err);
    if (rc != 0) return rc;
    TKF_REQUIRE(st.written >= 1 && st.written <= st.records && st.shards == 1 && st.with_image <= st.written);
    tk_err rerr = {0};
    tk_shard_reader *r = tk_shard_reader_open(out, &rerr);
    if (!r) fprintf(stderr, "fuzz harness: the converter's shard does not open: %s\n", rerr.msg);
    TKF_REQUIRE(r != NULL && tk_shard_reader_count(r) == st.written);
    size_t with_image = 0;
    for (uint64_t i = 0; i < st.written; i++) {
        tk_shard_record rec;
        if (tk_shard_reader_get(r, i, &rec, &rerr) != 0)
            fprintf(stderr, "fuzz harness: the converter's record %llu does not read: %s\n", (unsigned long long)i,
                    rerr.msg);
        TKF_REQUIRE(rerr.msg[0] == '\0');
        size_t image_tokens = 0;
        for (size_t t = 0; t < rec.n_tokens; t++) {
            if (rec.kinds[t] == TK_KIND_IMAGE) {
                image_tokens++;
                TKF_REQUIRE(rec.labels[t] == TK_SHARD_LABEL_IGNORE);
            }
        }
        TKF_REQUIRE(rec.n_images <= 1 && image_tokens == TKF_IMAGE_TOKENS * rec.n_images);
        with_image += rec.n_images;
    }
    TKF_REQUIRE(with_image == st.with_image);
    tk_shard_reader_free(r);
    return 0;
}
