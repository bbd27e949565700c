/* fuzz_llama_open.c: tk_llama_open on a model directory whose config.json is the tiny model's and
 * whose model.safetensors is arbitrary bytes (missing tensors, wrong shapes and dtypes, F16/BF16
 * conversion, unaligned F32 data); then tk_llama_open_ex with BF16-resident weights on the same
 * directory, which must reach the same verdict.
 */
#include "fuzz_common.h"
#include "model/llama.h"

#include <stdio.h>

/* Touches every base weight, fp32 or BF16-resident. */
static void touch(const tk_llama *m) {
    volatile float sum = 0.0f;
    size_t VC = (size_t)m->cfg.vocab_size * (size_t)m->cfg.dim;
    for (size_t i = 0; i < VC; i++) {
        sum += m->embed ? m->embed[i] : (float)m->embed_bf16[i];
        sum += m->lm_head ? m->lm_head[i] : (float)m->lm_head_bf16[i];
    }
    for (int l = 0; l < m->cfg.n_layers; l++) {
        for (size_t i = 0; i < (size_t)m->cfg.dim; i++)
            sum += m->layers[l].attn_norm[i] + m->layers[l].ffn_norm[i];
        for (int p = 0; p < TK_NPROJ; p++) {
            const tk_adapted_linear *L = &m->layers[l].proj[p];
            TKF_REQUIRE(L->w0 != NULL || L->w0_bf16 != NULL);
            for (size_t i = 0; i < L->in * L->out; i++) sum += L->w0 ? L->w0[i] : (float)L->w0_bf16[i];
        }
    }
    for (size_t i = 0; i < (size_t)m->cfg.dim; i++) sum += m->final_norm[i];
    (void)sum;
}

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    static const char *dir;
    if (!dir) {
        dir = tkf_mkdir("model");
        tkf_tiny_config(dir);
    }
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    tkf_write(path, data, size);
    tk_llama *m = tk_llama_open(dir, err);
    if (m) touch(m);
    tk_err err16 = {0};
    tk_llama *m16 = tk_llama_open_ex(dir, 1, &err16);
    if (m16) touch(m16);
    TKF_REQUIRE((m == NULL) == (m16 == NULL));
    tk_llama_close(m16);
    if (!m) return -1;
    tk_llama_close(m);
    return 0;
}
