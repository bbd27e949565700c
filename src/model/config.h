/* config.h: the LLaMA hyper-parameters read from a Hugging Face config.json.
 *
 *   tk_llama_config cfg;
 *   if (tk_llama_config_load(&cfg, "model_dir/config.json", &err) != 0) ...
 *
 * Failure: -1 with err naming the file and the key that was missing or out of range.
 */
#ifndef TK_MODEL_CONFIG_H
#define TK_MODEL_CONFIG_H

#include "../common.h"

typedef struct {
    int dim;         /* C: hidden_size */
    int hidden_dim;  /* F: intermediate_size */
    int n_layers;    /* num_hidden_layers */
    int n_heads;     /* H: num_attention_heads */
    int n_kv_heads;  /* G: num_key_value_heads */
    int head_dim;    /* D: head_dim, default C / H */
    int vocab_size;  /* V */
    int max_seq_len; /* max_position_embeddings */
    float norm_eps;  /* rms_norm_eps */
    float rope_theta;
    int tie_embeddings;
    /* rope scaling: "default" (factor 0) or "llama3" */
    int rope_llama3;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_pos;
} tk_llama_config;

int tk_llama_config_load(tk_llama_config *cfg, const char *path, tk_err *err);
/* Fills inv_freq [D/2] with HF's inverse frequencies, llama3 scaling applied when configured. */
void tk_llama_inv_freq(const tk_llama_config *cfg, float *inv_freq);

#endif
