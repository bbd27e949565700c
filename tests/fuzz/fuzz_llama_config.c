/* fuzz_llama_config.c: tk_llama_config_load on an arbitrary config.json; when it loads, tk_llama_open
 * on the directory holding it and the tiny model's (fixed) model.safetensors, so every config the
 * parser accepts also meets the loader that sizes tensors from it.
 */
#include "fuzz_common.h"
#include "model/llama.h"

#include <stdio.h>

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    static const char *dir;
    if (!dir) {
        dir = tkf_mkdir("model");
        tkf_tiny_weights(dir);
    }
    char path[600];
    snprintf(path, sizeof path, "%s/config.json", dir);
    tkf_write(path, data, size);
    tk_llama_config cfg;
    if (tk_llama_config_load(&cfg, path, err) != 0) return -1;
    TKF_REQUIRE(cfg.dim >= 1 && cfg.n_layers >= 1 && cfg.n_heads >= 1 && cfg.n_kv_heads >= 1);
    TKF_REQUIRE(cfg.n_heads % cfg.n_kv_heads == 0 && cfg.head_dim >= 2 && cfg.head_dim % 2 == 0);
    tk_llama *m = tk_llama_open(dir, err);
    if (!m) return -1;
    tk_llama_close(m);
    return 0;
}
