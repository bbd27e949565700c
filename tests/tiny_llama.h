/* tiny_llama.h: the small random LLaMA with LoRA on every projection that the model-level C tests
 * share (test_recompute.c, test_kv_passes.c): dim 32, ffn 48, 4 heads over 2 key/value heads of
 * width 8, vocabulary 64; LoRA r = 4, alpha 8, with a random adapter state (B starts at zero, which
 * would make every branch, and every gate ratio r_i, zero).
 */
#ifndef TK_TESTS_TINY_LLAMA_H
#define TK_TESTS_TINY_LLAMA_H

#include "model/llama.h"

/* layers, max_seq_len, BF16-resident weights or not, the weights' seed (the adapter's init and the
 * random state take seed + 4 and seed - 4), LoRA dropout and the gate on or off. NULL with err set. */
static tk_llama *tiny_llama(int layers, int max_seq_len, int bf16, uint64_t seed, float dropout, int gate,
                            tk_err *err) {
    tk_llama_config c = {0};
    c.dim = 32;
    c.hidden_dim = 48;
    c.n_layers = layers;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 8;
    c.vocab_size = 64;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.max_seq_len = max_seq_len;
    tk_llama *m = tk_llama_random(&c, seed, bf16, err);
    if (!m) return NULL;
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = TK_ADAPTER_LORA;
    pc.r = 4;
    pc.alpha = 8.0f;
    pc.dropout = dropout;
    pc.target_mask = (1u << TK_NPROJ) - 1;
    pc.gate.enabled = gate;
    int rc = tk_llama_attach(m, &pc, NULL, seed + 4, err);
    tk_peft_config_free(&pc);
    if (rc) {
        tk_llama_close(m);
        return NULL;
    }
    tk_rng rng;
    tk_rng_seed(&rng, seed - 4);
    for (size_t i = 0; i < m->params.total; i++) m->params.data[i] += 0.05f * (2.0f * tk_rng_uniform(&rng) - 1.0f);
    return m;
}

#endif
