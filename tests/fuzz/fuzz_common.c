/* fuzz_common.c: see fuzz_common.h. */
#define _XOPEN_SOURCE 700 /* nftw */
#include "fuzz_common.h"

#include "io/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- fixture shape (make_corpus.py mirrors these numbers) ------------------------------------- */
enum { TKF_C = 4, TKF_F = 6, TKF_L = 2, TKF_H = 2, TKF_G = 1, TKF_D = 2, TKF_V = 8, TKF_R = 2 };

void tkf_broken(const char *cond, const char *file, int line) {
    fprintf(stderr, "fuzz harness: %s:%d: invariant broken: %s\n", file, line, cond);
    abort();
}

/* ---- the temporary directory ------------------------------------------------------------------ */

static char g_root[256];

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

static void remove_root(void) {
    if (g_root[0]) nftw(g_root, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

const char *tkf_root(void) {
    if (!g_root[0]) {
        const char *t = getenv("TMPDIR");
        if (!t || !*t || strlen(t) > 180) t = "/tmp";
        snprintf(g_root, sizeof g_root, "%s/tkfuzz.XXXXXX", t);
        if (!mkdtemp(g_root)) {
            fprintf(stderr, "fuzz harness: mkdtemp %s: %s\n", g_root, strerror(errno));
            abort();
        }
        atexit(remove_root);
    }
    return g_root;
}

const char *tkf_path(const char *rel) {
    static char bufs[4][512];
    static int next;
    char *b = bufs[next++ & 3];
    if (snprintf(b, 512, "%s/%s", tkf_root(), rel) >= 512) {
        fprintf(stderr, "fuzz harness: path too long: %s\n", rel);
        abort();
    }
    return b;
}

const char *tkf_mkdir(const char *rel) {
    const char *p = tkf_path(rel);
    if (mkdir(p, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "fuzz harness: mkdir %s: %s\n", p, strerror(errno));
        abort();
    }
    return p;
}

void tkf_write(const char *path, const void *data, size_t n) {
    /* unlink, then create: truncating a file in place makes ext4 flush it on close (auto_da_alloc),
     * which cut the fuzzers' speed threefold */
    if (unlink(path) != 0 && errno != ENOENT) {
        fprintf(stderr, "fuzz harness: cannot remove %s: %s\n", path, strerror(errno));
        abort();
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "fuzz harness: cannot create %s: %s\n", path, strerror(errno));
        abort();
    }
    const unsigned char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            fprintf(stderr, "fuzz harness: writing %s: %s\n", path, strerror(errno));
            abort();
        }
        p += w;
        n -= (size_t)w;
    }
    if (close(fd) != 0) {
        fprintf(stderr, "fuzz harness: closing %s: %s\n", path, strerror(errno));
        abort();
    }
}

void tkf_write_str(const char *path, const char *text) { tkf_write(path, text, strlen(text)); }

static char *join(const char *dir, const char *name) {
    static char b[2][512];
    static int next;
    char *p = b[next++ & 1];
    if (snprintf(p, 512, "%s/%s", dir, name) >= 512) abort();
    return p;
}

/* ---- the tiny model --------------------------------------------------------------------------- */

void tkf_tiny_config(const char *dir) {
    tkf_write_str(join(dir, "config.json"),
                  "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\",\n"
                  " \"hidden_size\": 4, \"intermediate_size\": 6, \"num_hidden_layers\": 2,\n"
                  " \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"vocab_size\": 8,\n"
                  " \"max_position_embeddings\": 32, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0,\n"
                  " \"tie_word_embeddings\": false, \"torch_dtype\": \"float32\"}\n");
}

/* Entries of a safetensors file under construction; values are a fixed small pattern. */
typedef struct {
    tk_st_entry e[64];
    char names[64][128];
    float vals[4096];
    size_t n, used;
} st_builder;

static void add(st_builder *b, const char *name, int64_t rows, int64_t cols, float start) {
    TKF_REQUIRE(b->n < 64);
    size_t numel = (size_t)rows * (size_t)(cols ? cols : 1);
    TKF_REQUIRE(b->used + numel <= sizeof b->vals / sizeof b->vals[0]);
    float *v = b->vals + b->used;
    for (size_t i = 0; i < numel; i++) v[i] = start + 0.01f * (float)((i * 7) % 13) - 0.06f;
    snprintf(b->names[b->n], sizeof b->names[b->n], "%s", name);
    tk_st_entry *e = &b->e[b->n++];
    *e = (tk_st_entry){.name = b->names[b->n - 1], .dtype = TK_DT_F32, .ndim = cols ? 2 : 1,
                       .shape = {rows, cols}, .data = v};
    b->used += numel;
}

static void finish(st_builder *b, const char *path) {
    tk_err err = {0};
    const char *meta[] = {"format", "pt", NULL};
    if (tk_st_write(path, b->e, b->n, meta, &err) != 0) {
        fprintf(stderr, "fuzz harness: %s\n", err.msg);
        abort();
    }
}

static const char *const proj_block[7] = {"self_attn", "self_attn", "self_attn", "self_attn",
                                          "mlp",       "mlp",       "mlp"};
static const char *const proj_name[7] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                         "gate_proj", "up_proj", "down_proj"};
static const int64_t proj_out[7] = {TKF_H * TKF_D, TKF_G * TKF_D, TKF_G * TKF_D, TKF_C,
                                    TKF_F,         TKF_F,         TKF_C};
static const int64_t proj_in[7] = {TKF_C, TKF_C, TKF_C, TKF_H * TKF_D, TKF_C, TKF_C, TKF_F};

void tkf_tiny_weights(const char *dir) {
    static st_builder b;
    memset(&b, 0, sizeof b);
    char nm[128];
    add(&b, "model.embed_tokens.weight", TKF_V, TKF_C, 0.0f);
    for (int l = 0; l < TKF_L; l++) {
        snprintf(nm, sizeof nm, "model.layers.%d.input_layernorm.weight", l);
        add(&b, nm, TKF_C, 0, 1.0f);
        for (int p = 0; p < 7; p++) {
            snprintf(nm, sizeof nm, "model.layers.%d.%s.%s.weight", l, proj_block[p], proj_name[p]);
            add(&b, nm, proj_out[p], proj_in[p], 0.01f * (float)p);
        }
        snprintf(nm, sizeof nm, "model.layers.%d.post_attention_layernorm.weight", l);
        add(&b, nm, TKF_C, 0, 1.0f);
    }
    add(&b, "model.norm.weight", TKF_C, 0, 1.0f);
    add(&b, "lm_head.weight", TKF_V, TKF_C, 0.02f);
    finish(&b, join(dir, "model.safetensors"));
}

void tkf_tiny_model(const char *dir) {
    tkf_tiny_config(dir);
    tkf_tiny_weights(dir);
}

/* ---- the tiny adapter ------------------------------------------------------------------------- */

void tkf_tiny_adapter_config(const char *dir) {
    tkf_write_str(join(dir, "adapter_config.json"),
                  "{\"base_model_name_or_path\": \"tiny\", \"task_type\": \"CAUSAL_LM\",\n"
                  " \"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"lora_dropout\": 0.0,\n"
                  " \"use_rslora\": false, \"use_dora\": true, \"bias\": \"none\",\n"
                  " \"fan_in_fan_out\": false, \"inference_mode\": true,\n"
                  " \"target_modules\": [\"q_proj\", \"v_proj\", \"down_proj\"],\n"
                  " \"layers_to_transform\": null, \"modules_to_save\": [\"model.norm.weight\"],\n"
                  " \"ts_peft\": {\"rule\": \"prox\", \"lambda\": 0.05, \"eta_tau\": 0.05, \"tau0\": 0.0,\n"
                  "             \"target_keep\": 0.5, \"eta_lambda\": 0.05, \"beta\": 0.01,\n"
                  "             \"warmup_steps\": 0}}\n");
}

void tkf_tiny_adapter_tensors(const char *dir) {
    static st_builder b;
    memset(&b, 0, sizeof b);
    static const int targets[3] = {0, 2, 6}; /* q_proj, v_proj, down_proj */
    char nm[128], key[96];
    for (int l = 0; l < TKF_L; l++) {
        for (int k = 0; k < 3; k++) {
            int p = targets[k];
            snprintf(key, sizeof key, "base_model.model.model.layers.%d.%s.%s", l, proj_block[p],
                     proj_name[p]);
            snprintf(nm, sizeof nm, "%s.lora_A.weight", key);
            add(&b, nm, TKF_R, proj_in[p], 0.0f);
            snprintf(nm, sizeof nm, "%s.lora_B.weight", key);
            add(&b, nm, proj_out[p], TKF_R, 0.01f);
            snprintf(nm, sizeof nm, "%s.lora_magnitude_vector", key);
            add(&b, nm, proj_out[p], 0, 1.0f);
            snprintf(nm, sizeof nm, "%s.ts_tau", key);
            add(&b, nm, 1, 0, 0.2f);
            snprintf(nm, sizeof nm, "%s.ts_lambda", key);
            add(&b, nm, 1, 0, 0.11f);
        }
    }
    add(&b, "base_model.model.model.norm.weight", TKF_C, 0, 1.0f);
    finish(&b, join(dir, "adapter_model.safetensors"));
}

/* ---- libFuzzer entry -------------------------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    tk_err err = {0};
    int rc = tkf_target(data, size, &err);
    TKF_REQUIRE(rc == 0 || rc == -1);
    if (rc != 0) {
        /* a rejection always explains itself on one line */
        TKF_REQUIRE(err.msg[0] != '\0');
        TKF_REQUIRE(memchr(err.msg, '\0', sizeof err.msg) != NULL);
    }
    return 0;
}
