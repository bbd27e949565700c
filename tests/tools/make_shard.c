/* make_shard.c: a test helper that writes a shard (datasets/shard.h) from JSONL through the shard
 * writer, so that the e2e tests can make shards without the convert verb. Built beside tspeft as
 * BUILD/tests/make_shard.
 *
 *   make_shard OUT.shard IN.jsonl [--frame-target BYTES] [--vocab V]
 *
 * One JSON object per line: "input_ids" (required), "labels" (default: input_ids), "kinds" (default:
 * 1 prompt where the label is -100, else 2 response), "images" (a count of small encoded-image
 * payloads to attach, default 0) or "image_files" (a list of image files whose bytes are attached as
 * encoded payloads, in order) and "meta" (an object, default none). Prints the shard's totals.
 * Exit 1 with a one-line error on bad input.
 */
#include "common.h"
#include "datasets/shard.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int int_array(const cJSON *a, int32_t *out, size_t n) {
    if (!cJSON_IsArray(a) || (size_t)cJSON_GetArraySize(a) != n) return -1;
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a) {
        if (!cJSON_IsNumber(e)) return -1;
        out[i++] = (int32_t)e->valuedouble;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: make_shard OUT.shard IN.jsonl [--frame-target BYTES] [--vocab V]\n");
        return 2;
    }
    tk_shard_writer_opts wo = {0};
    for (int i = 3; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--frame-target") == 0) wo.frame_target = (size_t)strtoull(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--vocab") == 0) wo.vocab_size = (uint32_t)strtoul(argv[i + 1], NULL, 10);
        else {
            fprintf(stderr, "make_shard: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    tk_err err = {0};
    size_t len;
    char *text = tk_read_file(argv[2], &len, &err);
    if (!text) {
        fprintf(stderr, "make_shard: %s\n", err.msg);
        return 1;
    }
    tk_shard_writer *w = tk_shard_writer_open(argv[1], &wo, &err);
    if (!w) {
        fprintf(stderr, "make_shard: %s\n", err.msg);
        free(text);
        return 1;
    }
    int rc = 0, line_no = 0;
    static const uint8_t png_like[16] = {0x89, 'P', 'N', 'G', 13, 10, 26, 10, 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
    for (char *line = text, *next; line && *line && rc == 0; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = '\0';
        line_no++;
        if (strspn(line, " \t\r") == strlen(line)) continue;
        cJSON *o = cJSON_Parse(line);
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(o, "input_ids");
        size_t n = cJSON_IsArray(ids) ? (size_t)cJSON_GetArraySize(ids) : 0;
        int32_t *id = calloc(n + 1, sizeof *id), *lab = calloc(n + 1, sizeof *lab);
        uint8_t *kind = calloc(n + 1, 1);
        tk_shard_image im[8];
        char *files[8] = {0};
        char *meta = NULL;
        if (!o || n == 0 || !id || !lab || !kind || int_array(ids, id, n)) {
            fprintf(stderr, "make_shard: %s:%d: expected an object with a non-empty input_ids array\n", argv[2], line_no);
            rc = 1;
        } else {
            const cJSON *labels = cJSON_GetObjectItemCaseSensitive(o, "labels");
            const cJSON *kinds = cJSON_GetObjectItemCaseSensitive(o, "kinds");
            const cJSON *images = cJSON_GetObjectItemCaseSensitive(o, "images");
            const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "meta");
            if (labels ? int_array(labels, lab, n) : (memcpy(lab, id, n * sizeof *id), 0)) rc = 1;
            if (kinds) {
                int32_t *k32 = calloc(n, sizeof *k32);
                if (!k32 || int_array(kinds, k32, n)) rc = 1;
                for (size_t t = 0; k32 && t < n; t++) kind[t] = (uint8_t)k32[t];
                free(k32);
            } else {
                for (size_t t = 0; t < n; t++) kind[t] = lab[t] == TK_SHARD_LABEL_IGNORE ? TK_KIND_PROMPT : TK_KIND_RESPONSE;
            }
            size_t n_im = cJSON_IsNumber(images) ? (size_t)images->valuedouble : 0;
            if (n_im > 8) rc = 1;
            for (size_t k = 0; k < n_im && k < 8; k++)
                im[k] = (tk_shard_image){.kind = TK_IMAGE_ENCODED, .nbytes = sizeof png_like, .data = png_like};
            const cJSON *imf = cJSON_GetObjectItemCaseSensitive(o, "image_files");
            if (cJSON_IsArray(imf)) {
                n_im = (size_t)cJSON_GetArraySize(imf);
                if (n_im > 8) rc = 1;
                for (size_t k = 0; k < n_im && k < 8 && rc == 0; k++) {
                    const cJSON *e = cJSON_GetArrayItem(imf, (int)k);
                    size_t flen = 0;
                    if (!cJSON_IsString(e) || !(files[k] = tk_read_file(e->valuestring, &flen, &err))) rc = 1;
                    else im[k] = (tk_shard_image){.kind = TK_IMAGE_ENCODED, .nbytes = flen, .data = (const uint8_t *)files[k]};
                }
            }
            if (cJSON_IsObject(m)) meta = cJSON_PrintUnformatted(m);
            if (rc) {
                fprintf(stderr, "make_shard: %s:%d: labels/kinds must match input_ids, images <= 8\n", argv[2], line_no);
            } else {
                tk_shard_record r = {.n_tokens = n, .input_ids = id, .labels = lab, .kinds = kind,
                                     .meta_len = meta ? strlen(meta) : 0, .meta = meta, .n_images = n_im, .images = im};
                if (tk_shard_writer_add(w, &r, &err)) {
                    fprintf(stderr, "make_shard: %s:%d: %s\n", argv[2], line_no, err.msg);
                    rc = 1;
                }
            }
        }
        free(meta);
        for (int k = 0; k < 8; k++) free(files[k]);
        free(id);
        free(lab);
        free(kind);
        cJSON_Delete(o);
    }
    free(text);
    if (rc) {
        tk_shard_writer_abort(w);
        return 1;
    }
    tk_shard_stats st;
    if (tk_shard_writer_close(w, &st, &err)) {
        fprintf(stderr, "make_shard: %s\n", err.msg);
        return 1;
    }
    printf("%s: %llu records, %llu frames, %llu tokens, %llu images\n", argv[1], (unsigned long long)st.records,
           (unsigned long long)st.frames, (unsigned long long)st.tokens, (unsigned long long)st.images);
    return 0;
}
