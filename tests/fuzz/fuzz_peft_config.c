/* fuzz_peft_config.c: tk_peft_config_load on an arbitrary adapter_config.json; when it loads (and
 * asks for a rank the tiny model can hold: r <= 64), tk_llama_attach of that configuration to the
 * tiny model with the fixed adapter tensors (DoRA r=2 on q_proj, v_proj, down_proj, norm trained),
 * so layer selections, targets and modules_to_save the parser accepts meet the loader.
 */
#include "fuzz_common.h"
#include "model/llama.h"

#include <stdio.h>

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    static const char *model, *adapter;
    if (!model) {
        model = tkf_mkdir("model");
        tkf_tiny_model(model);
        adapter = tkf_mkdir("adapter");
        tkf_tiny_adapter_tensors(adapter);
    }
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_config.json", adapter);
    tkf_write(path, data, size);
    tk_peft_config pc;
    int rc = tk_peft_config_load(&pc, path, err);
    if (rc == 0 && pc.r <= 64) {
        tk_err oerr = {0};
        tk_llama *m = tk_llama_open(model, &oerr);
        if (!m) {
            fprintf(stderr, "fuzz harness: the fixed model does not open: %s\n", oerr.msg);
            TKF_REQUIRE(m != NULL);
        }
        rc = tk_llama_attach(m, &pc, adapter, 0, err);
        tk_llama_close(m);
    }
    tk_peft_config_free(&pc);
    return rc;
}
