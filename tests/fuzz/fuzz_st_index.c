/* fuzz_st_index.c: tk_st_set_open on a directory whose model.safetensors.index.json is arbitrary
 * bytes; the directory also holds two valid shards (model-00001-of-00002.safetensors with the tiny
 * model's embedding, layer-0 and layer-1 tensors; model-00002-of-00002.safetensors with the rest)
 * and, under other names, a config.json and a copy of the unsharded weights, so an index may name
 * a file that is not a shard, a directory, or a missing file.
 */
#include "fuzz_common.h"
#include "io/safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Splits the tiny model's weights into two shards once per process. */
static const char *fixture(void) {
    static const char *dir;
    if (dir) return dir;
    const char *full = tkf_mkdir("full");
    tkf_tiny_model(full);
    dir = tkf_mkdir("sharded");
    tkf_mkdir("sharded/subdir");
    tkf_tiny_config(dir);
    tk_err err = {0};
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", full);
    tk_st_file *f = tk_st_open(path, &err);
    if (!f) {
        fprintf(stderr, "fuzz harness: %s\n", err.msg);
        abort();
    }
    size_t n = tk_st_count(f), k[2] = {0, 0};
    tk_st_entry *e[2] = {calloc(n, sizeof(tk_st_entry)), calloc(n, sizeof(tk_st_entry))};
    TKF_REQUIRE(e[0] && e[1]);
    for (size_t i = 0; i < n; i++) {
        const tk_st_tensor *t = tk_st_at(f, i);
        int s = strstr(t->name, "embed") || strstr(t->name, "layers.0.") ? 0 : 1;
        tk_st_entry *x = &e[s][k[s]++];
        *x = (tk_st_entry){.name = t->name, .dtype = t->dtype, .ndim = t->ndim,
                           .data = tk_st_data(f, t)};
        memcpy(x->shape, t->shape, sizeof x->shape);
    }
    for (int s = 0; s < 2; s++) {
        snprintf(path, sizeof path, "%s/model-0000%d-of-00002.safetensors", dir, s + 1);
        if (tk_st_write(path, e[s], k[s], NULL, &err) != 0) {
            fprintf(stderr, "fuzz harness: %s\n", err.msg);
            abort();
        }
        free(e[s]);
    }
    /* a valid single-file checkpoint under a name an index may point at */
    snprintf(path, sizeof path, "%s/other.safetensors", dir);
    tk_st_entry one = {.name = "model.norm.weight", .dtype = TK_DT_F32, .ndim = 1, .shape = {4},
                       .data = (const float[4]){1, 1, 1, 1}};
    if (tk_st_write(path, &one, 1, NULL, &err) != 0) abort();
    tk_st_close(f);
    return dir;
}

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *dir = fixture();
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    tkf_write(path, data, size);
    tk_st_set *s = tk_st_set_open(dir, err);
    if (!s) return -1;
    static const char *probe[] = {"model.embed_tokens.weight", "lm_head.weight",
                                  "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
                                  "absent", ""};
    for (size_t i = 0; i < sizeof probe / sizeof probe[0]; i++) {
        const tk_st_file *file = NULL;
        const tk_st_tensor *t = tk_st_set_find(s, probe[i], &file);
        TKF_REQUIRE((t == NULL) == (file == NULL));
        if (t) {
            TKF_REQUIRE(strcmp(t->name, probe[i]) == 0);
            float *out = malloc(t->numel * sizeof *out + 1);
            TKF_REQUIRE(out != NULL);
            if (tk_st_read_f32(file, t, out, t->numel, err) != 0) TKF_REQUIRE(0);
            free(out);
        }
    }
    tk_st_set_close(s);
    return 0;
}
