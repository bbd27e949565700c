/* config.c: parse and validate a Hugging Face LLaMA config.json. */
#include "config.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Reads an integer key; missing keys take def (def < 0 means required). */
static int get_int(const cJSON *root, const char *key, int def, int lo, int hi, int *out,
                   const char *path, tk_err *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || cJSON_IsNull(it)) {
        if (def < 0) return tk_fail(err, "%s: missing required key \"%s\"", path, key);
        *out = def;
        return 0;
    }
    double v = it->valuedouble;
    if (!cJSON_IsNumber(it) || v != floor(v) || v < lo || v > hi)
        return tk_fail(err, "%s: \"%s\" must be an integer in [%d, %d]", path, key, lo, hi);
    *out = (int)v;
    return 0;
}

static int get_float(const cJSON *root, const char *key, double def, double lo, double hi,
                     float *out, const char *path, tk_err *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || cJSON_IsNull(it)) {
        *out = (float)def;
        return 0;
    }
    if (!cJSON_IsNumber(it) || !(it->valuedouble >= lo && it->valuedouble <= hi))
        return tk_fail(err, "%s: \"%s\" must be a number in [%g, %g]", path, key, lo, hi);
    *out = (float)it->valuedouble;
    return 0;
}

/* rope_parameters (new transformers) or rope_scaling (older): default or llama3. */
static int parse_rope(tk_llama_config *cfg, const cJSON *root, const char *path, tk_err *err) {
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    if (!rp || cJSON_IsNull(rp)) rp = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if (get_float(root, "rope_theta", 10000.0, 1e-3, 1e12, &cfg->rope_theta, path, err)) return -1;
    if (!rp || cJSON_IsNull(rp)) return 0;
    if (!cJSON_IsObject(rp)) return tk_fail(err, "%s: rope_parameters must be an object", path);
    if (cJSON_GetObjectItemCaseSensitive(rp, "rope_theta") &&
        get_float(rp, "rope_theta", 10000.0, 1e-3, 1e12, &cfg->rope_theta, path, err))
        return -1;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(rp, "rope_type");
    if (!type) type = cJSON_GetObjectItemCaseSensitive(rp, "type");
    const char *t = cJSON_IsString(type) ? type->valuestring : "default";
    if (strcmp(t, "default") == 0) return 0;
    if (strcmp(t, "llama3") != 0)
        return tk_fail(err, "%s: rope_type \"%s\" is not supported (expected default or llama3)",
                       path, t);
    cfg->rope_llama3 = 1;
    if (get_float(rp, "factor", 8.0, 1.0, 1e6, &cfg->rope_factor, path, err) ||
        get_float(rp, "low_freq_factor", 1.0, 1e-6, 1e6, &cfg->rope_low_freq_factor, path, err) ||
        get_float(rp, "high_freq_factor", 4.0, 1e-6, 1e6, &cfg->rope_high_freq_factor, path, err) ||
        get_int(rp, "original_max_position_embeddings", 8192, 1, 1 << 24,
                &cfg->rope_original_max_pos, path, err))
        return -1;
    if (cfg->rope_high_freq_factor <= cfg->rope_low_freq_factor)
        return tk_fail(err, "%s: llama3 rope needs high_freq_factor > low_freq_factor", path);
    return 0;
}

int tk_llama_config_load(tk_llama_config *cfg, const char *path, tk_err *err) {
    memset(cfg, 0, sizeof *cfg);
    size_t len = 0;
    char *text = tk_read_file(path, &len, err);
    if (!text) return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return tk_fail(err, "%s: not a JSON object", path);
    }
    int rc = -1;
    const int big = 1 << 24;
    /* A llava-hf LlavaConfig holds the language model under "text_config", where transformers'
     * LlamaConfig defaults (LLaMA-7B's shape) fill the keys it leaves out. */
    cJSON *whole = root;
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    int llava_hf = cJSON_IsObject(tc);
    if (llava_hf) root = (cJSON *)tc;
    if (get_int(root, "hidden_size", llava_hf ? 4096 : -1, 1, big, &cfg->dim, path, err) ||
        get_int(root, "intermediate_size", llava_hf ? 11008 : -1, 1, big, &cfg->hidden_dim, path, err) ||
        get_int(root, "num_hidden_layers", llava_hf ? 32 : -1, 1, 4096, &cfg->n_layers, path, err) ||
        get_int(root, "num_attention_heads", llava_hf ? 32 : -1, 1, 4096, &cfg->n_heads, path, err) ||
        get_int(root, "num_key_value_heads", cfg->n_heads, 1, 4096, &cfg->n_kv_heads, path, err) ||
        get_int(root, "vocab_size", llava_hf ? 32000 : -1, 1, 1 << 28, &cfg->vocab_size, path, err) ||
        get_int(root, "max_position_embeddings", 2048, 1, big, &cfg->max_seq_len, path, err) ||
        get_float(root, "rms_norm_eps", 1e-6, 0.0, 1.0, &cfg->norm_eps, path, err) ||
        parse_rope(cfg, root, path, err))
        goto done;
    if (cfg->dim % cfg->n_heads != 0 &&
        !cJSON_GetObjectItemCaseSensitive(root, "head_dim")) {
        tk_fail(err, "%s: hidden_size %d is not divisible by num_attention_heads %d", path,
                cfg->dim, cfg->n_heads);
        goto done;
    }
    if (get_int(root, "head_dim", cfg->dim / cfg->n_heads, 2, big, &cfg->head_dim, path, err))
        goto done;
    if (cfg->head_dim % 2 != 0) {
        tk_fail(err, "%s: head_dim %d must be even for RoPE", path, cfg->head_dim);
        goto done;
    }
    if (cfg->n_heads % cfg->n_kv_heads != 0) {
        tk_fail(err, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                path, cfg->n_heads, cfg->n_kv_heads);
        goto done;
    }
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
    cfg->tie_embeddings = cJSON_IsTrue(tie);
    const char *bias_keys[] = {"attention_bias", "mlp_bias"};
    for (int i = 0; i < 2; i++) {
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, bias_keys[i]))) {
            tk_fail(err, "%s: \"%s\": true is not supported (LLaMA has no biases)", path,
                    bias_keys[i]);
            goto done;
        }
    }
    rc = 0;
done:
    cJSON_Delete(whole);
    return rc;
}

void tk_llama_inv_freq(const tk_llama_config *cfg, float *inv_freq) {
    int D = cfg->head_dim;
    for (int j = 0; j < D / 2; j++) {
        /* transformers: 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)) */
        float expo = (float)(2 * j) / (float)D;
        float f = (float)(1.0 / pow((double)cfg->rope_theta, (double)expo));
        if (cfg->rope_llama3) {
            double low_wl = cfg->rope_original_max_pos / cfg->rope_low_freq_factor;
            double high_wl = cfg->rope_original_max_pos / cfg->rope_high_freq_factor;
            double wl = 2.0 * M_PI / f;
            if (wl > low_wl) {
                f = f / cfg->rope_factor;
            } else if (wl >= high_wl) {
                double smooth = (cfg->rope_original_max_pos / wl - cfg->rope_low_freq_factor) /
                                (cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
                f = (float)((1.0 - smooth) * f / cfg->rope_factor + smooth * f);
            }
        }
        inv_freq[j] = f;
    }
}
