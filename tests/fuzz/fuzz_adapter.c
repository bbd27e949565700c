/* fuzz_adapter.c: tk_llama_attach with an adapter directory whose adapter_config.json is fixed (DoRA
 * r=2 on q_proj, v_proj, down_proj of the tiny model, model.norm.weight trained, ts_peft with a
 * target keep ratio) and whose adapter_model.safetensors is arbitrary bytes: missing tensors, wrong
 * shapes and dtypes, NaN/Inf in weights, ts_tau and ts_lambda.
 */
#include "fuzz_common.h"
#include "model/llama.h"

#include <math.h>
#include <stdio.h>

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    static const char *model, *adapter;
    static tk_peft_config pc;
    if (!model) {
        model = tkf_mkdir("model");
        tkf_tiny_model(model);
        adapter = tkf_mkdir("adapter");
        tkf_tiny_adapter_config(adapter);
        char path[600];
        snprintf(path, sizeof path, "%s/adapter_config.json", adapter);
        tk_err cerr = {0};
        if (tk_peft_config_load(&pc, path, &cerr) != 0) {
            fprintf(stderr, "fuzz harness: the fixed adapter config does not load: %s\n", cerr.msg);
            TKF_REQUIRE(0);
        }
    }
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", adapter);
    tkf_write(path, data, size);
    tk_err oerr = {0};
    tk_llama *m = tk_llama_open(model, &oerr);
    if (!m) {
        fprintf(stderr, "fuzz harness: the fixed model does not open: %s\n", oerr.msg);
        TKF_REQUIRE(m != NULL);
    }
    int rc = tk_llama_attach(m, &pc, adapter, 0, err);
    if (rc == 0) {
        /* what was accepted is usable: finite parameters, finite non-negative thresholds */
        for (size_t i = 0; i < m->params.total; i++) TKF_REQUIRE(isfinite(m->params.data[i]));
        for (int l = 0; l < m->cfg.n_layers; l++)
            for (int p = 0; p < TK_NPROJ; p++) {
                const tk_adapted_linear *L = &m->layers[l].proj[p];
                if (L->kind == TK_ADAPTER_NONE) continue;
                TKF_REQUIRE(isfinite(L->tau) && L->tau >= 0.0f);
                TKF_REQUIRE(isfinite(L->lambda) && L->lambda >= 0.0f);
            }
    }
    tk_llama_close(m);
    return rc;
}
