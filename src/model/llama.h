/* llama.h: a Hugging Face LLaMA decoder in fp32 with TS-PEFT-gated adapters on its projections:
 * loading, training forward and backward, and KV-cached inference.
 *
 *   tk_err err = {0};
 *   tk_llama *m = tk_llama_open("hf_model_dir", &err);          // config.json + safetensors
 *   tk_llama_attach(m, &peft_cfg, "adapter_dir" or NULL, seed, &err);  // adapters, trainables
 *   tk_llama_acts *a = tk_llama_acts_alloc(m, B, T, &err);
 *   tk_llama_forward(m, a, ids, mask, B, T, 1, &rng, &err);     // logits in a->logits [B*T, V]
 *   double sum = tk_llama_loss(m, a, labels, B, T, 1.0f / n_targets, &count);  // seeds dlogits
 *   tk_llama_backward(m, a, B, T, &err);                        // grads ADD into m->params.grad
 *   ...
 *   tk_llama_acts_free(a); tk_llama_close(m);
 *
 * Ownership: tk_llama owns its weights (memory-mapped when stored as aligned F32), its adapters and
 * the trainable block (m->params). Failure: NULL / -1 with err naming the file and tensor.
 */
#ifndef TK_MODEL_LLAMA_H
#define TK_MODEL_LLAMA_H

#include "../common.h"
#include "../io/safetensors.h"
#include "../peft/adapter.h"
#include "../peft/peft_config.h"
#include "config.h"
#include "params.h"

typedef struct {
    float *attn_norm, *d_attn_norm; /* [C] */
    float *ffn_norm, *d_ffn_norm;   /* [C] */
    tk_adapted_linear proj[TK_NPROJ];
} tk_llama_layer;

enum { TK_VIT_REFUSE, TK_VIT_EXTRA, TK_VIT_IGNORE }; /* tk_llama.vit_targets */

typedef struct {
    tk_llama_config cfg;
    tk_st_set *files;  /* kept open: F32 weights point into the mapping */
    float *owned;      /* fp32 copies of tensors stored as F16/BF16 or unaligned */
    size_t owned_n;    /* floats in owned */
    void *packed_copies; /* packed copies of matrices that were read in place (tk_llama_pack_frozen) */
    float *embed, *d_embed;          /* [V,C] */
    float *final_norm, *d_final_norm;/* [C] */
    float *lm_head, *d_lm_head;      /* [V,C] (the embedding when tied) */
    const uint16_t *embed_bf16, *lm_head_bf16; /* [V,C] when kept BF16 (then embed/lm_head are NULL) */
    const float *lm_head_packed;     /* [V,C] in tk_linear_pack's panels (then lm_head is NULL) */
    const uint16_t *lm_head_packed_bf16; /* [V,C] the same panels of a BF16-resident lm_head */
    const uint16_t *lm_head_dot;     /* [V,C] in tk_bf16dot_pack's panels (--compute bf16; a tied head keeps embed) */
    void *dot_copies;                /* the tk_bf16dot_pack copies (tk_llama_pack_frozen with compute_bf16) */
    int compute_bf16;                /* frozen products in BF16 (set before tk_llama_pack_frozen) */
    int bf16;                        /* some frozen weights are BF16-resident */
    int packed;                      /* frozen matrices packed by tk_llama_pack_frozen */
    tk_llama_layer *layers;          /* [n_layers] */
    float *inv_freq;                 /* [D/2] */
    float *rope_cos, *rope_sin;      /* [rope_len, D/2], grown on demand */
    size_t rope_len;
    tk_peft_config peft;             /* the adapter attached (kind NONE before tk_llama_attach) */
    tk_params params;                /* the trainable block */
    /* optional, for parts outside the LLaMA (a LLaVA projector and vision tower; set together by
     * tk_mm_hook): extra_params registers their trainable tensors before tk_llama_attach allocates the
     * block; extra_init initialises them once it is allocated, before an adapter file is read;
     * extra_entries gives more entries for the adapter file (the tower modules' thresholds; e NULL: how
     * many) and extra_load reads them back from one. */
    int (*extra_params)(void *ctx, tk_params *P, tk_err *err);
    void (*extra_init)(void *ctx, uint64_t seed);
    size_t (*extra_entries)(void *ctx, tk_st_entry *e);
    int (*extra_load)(void *ctx, const tk_st_file *f, tk_err *err);
    void *extra_ctx;
    /* vision tower target modules in the adapter config: TK_VIT_REFUSE (an error naming the first),
     * TK_VIT_EXTRA (the extra adapts them: LLaVA with a tower) or TK_VIT_IGNORE (text-only use of a
     * LLaVA adapter: the tower's tensors are not read) */
    int vit_targets;
    tk_adapter_ws ws;                /* adapter scratch, sized by acts_alloc */
    size_t max_rank;
} tk_llama;

tk_llama *tk_llama_open(const char *dir, tk_err *err);
/* keep_bf16: matrices stored as BF16 in the files stay BF16 in memory (memory-mapped, converted block
 * by block for each product): half the memory of fp32, bit-identical results (BF16 -> fp32 is exact).
 * DoRA and merging need fp32 weights. */
tk_llama *tk_llama_open_ex(const char *dir, int keep_bf16, tk_err *err);
/* A model of the given shape with random weights (uniform, std 0.02; norms 1), nothing read from
 * disk: for benchmarks. bf16: keep the matrices BF16. */
tk_llama *tk_llama_random(const tk_llama_config *cfg, uint64_t seed, int bf16, tk_err *err);
void tk_llama_close(tk_llama *m);

/* One base tensor of the model: its HF name, data and gradient pointers and shape. */
typedef struct {
    char name[TK_NAME_MAX];
    float **data, **grad;
    const uint16_t **bf16; /* where a BF16-resident copy goes (NULL for norms, always fp32) */
    size_t rows, cols;     /* cols 0 for vectors */
} tk_llama_slot;
/* Fills slots (capacity: 3 + 9 * n_layers) with every base tensor; returns the count. */
size_t tk_llama_slots(tk_llama *m, tk_llama_slot *slots);

/* Attaches the adapters pc describes (kind NONE: no adapter), makes pc->save tensors trainable,
 * allocates the trainable block and fills it: from adapter_dir/adapter_model.safetensors when
 * adapter_dir is given (every expected tensor must be there with the right shape; ts_tau optional),
 * else with HF PEFT's initialisation (A Kaiming-uniform, B zero, DoRA magnitude = ||W0||_row)
 * drawn from seed. A trainable base tensor that is also adapted is an error. */
int tk_llama_attach(tk_llama *m, const tk_peft_config *pc, const char *adapter_dir, uint64_t seed,
                    tk_err *err);
/* With m->compute_bf16 (and AVX512-BF16), every frozen matrix below, and a tied lm_head that is not
 * trainable, is first put into tk_bf16dot_pack's panels (BF16, rounded to nearest even) in one block of
 * copies; the sources are released (their whole pages dropped from the resident set; a tied lm_head
 * keeps the embedding) and the model's frozen products compute in BF16 with fp32 accumulation.
 * Puts every frozen matrix (the base weights of LoRA, bottleneck and unadapted projections, and an
 * untied lm_head; not DoRA's, not trainable ones), fp32 or BF16-resident, into tk_linear_pack's
 * panels where tk_linear_packed_available(): in place where the model holds its own copy (converted
 * F16/BF16 checkpoints, random models), else (read in place from the mapping) in a copy, whose mapped
 * pages are then dropped from the resident set. Call after tk_llama_attach; afterwards the model
 * cannot be merged. Returns how many matrices were packed (0 on a second call), or -1 (err set)
 * when out of memory. */
int tk_llama_pack_frozen(tk_llama *m, tk_err *err);
/* --compute: "fp32" (0) or "bf16" (1) into *bf16; anything else fails naming the option. */
int tk_compute_parse(const char *s, int *bf16, tk_err *err);
/* The compute mode that runs for a request: bf16 only where tk_bf16dot_available(); a request that
 * cannot run prints one line saying so on stderr (unless quiet). Returns 1 for bf16, 0 for fp32. */
int tk_compute_resolve(int want_bf16, int quiet);
/* Writes out_dir/adapter_config.json and out_dir/adapter_model.safetensors (PEFT keys plus ts_tau,
 * and ts_lambda with a target keep ratio). out_dir must exist. */
int tk_llama_save_adapter(const tk_llama *m, const char *out_dir, tk_err *err);
/* Writes out_dir/config.json and out_dir/model.safetensors (F32): the base model with the adapter
 * folded in (LoRA: W0 + s B A; DoRA: mag * V / ||V||_row; trainable tensors as trained). Bottleneck
 * adapters cannot be merged (they add a non-linear branch) and give an error. The token gate cannot
 * be merged either: the merged model equals the UNGATED adapter; see tk_llama_gate_gap. */
int tk_llama_merge(const tk_llama *m, const char *model_dir, const char *out_dir, tk_err *err);
/* Turns every module's gate on or off (an ungated pass equals the merged model). */
void tk_llama_set_gated(tk_llama *m, int gated);
/* PEFT key prefix of a module: "base_model.model.model.layers.L.self_attn.q_proj". */
void tk_module_key(char *buf, size_t n, int layer, int proj);

/* Activations of one micro-batch, for training (B sequences of up to T positions). */
typedef struct tk_llama_acts tk_llama_acts;
struct tk_llama_acts {
    size_t Bmax, Tmax;
    float *logits;   /* [B*T, V]; overwritten by the loss gradient in tk_llama_loss */
    int32_t *targets;/* [B*T] shifted labels */
    uint8_t *valid;  /* [B*T] attention mask */
    const int32_t *ids;
    const uint8_t *kinds; /* [B*T] TK_KIND_* of each position (datasets/shard.h), set by the caller
                             before tk_llama_forward; NULL when unknown. Read by gate statistics. */
    const float *image_embeds; /* [B*T, C] or NULL: rows of TK_KIND_IMAGE positions replace the token
                                  embedding (visual tokens from the projector); other rows unread */
    float *d_image_embeds;     /* [B*T, C] or NULL: backward WRITES dLoss/d(image_embeds) on the
                                  TK_KIND_IMAGE rows (other rows untouched) */
    /* private: per-layer saved tensors and scratch */
    struct tk_llama_saved *saved;
    float *buf;      /* one block holding everything below */
    float *x_final, *xn_final, *rstd_final, *dres, *dxn, *datt, *dq, *dk, *dv, *dg, *du, *dh, *tmp;
    float *attn_scratch;
    int tiled;       /* attention kernel chosen at allocation: 1 tiled (no T x T matrix), 0 full */
    int recompute;   /* layers 0..recompute-1 keep only their input and are recomputed in backward */
    int fwd_mode;    /* the last forward's train argument (replayed by recomputation) */
};

/* Memory/speed options of the activations (docs/performance.md). */
typedef enum { TK_ATTN_AUTO, TK_ATTN_FULL, TK_ATTN_TILED } tk_attn_mode;
/* AUTO picks the tiled kernel from this many positions up: a full [B,H,T,T] matrix per layer grows
 * quadratically, but below this the full kernel's few large sgemm calls were faster, and far more
 * robust on a loaded machine, than the tiled kernel's many small ones (docs/performance.md). */
#define TK_ATTN_TILED_MIN_T 1024
typedef struct {
    tk_attn_mode attention; /* full: softmax weights [B,H,T,T] stored per layer; tiled: only [B,H,T] */
    int recompute;          /* the first N layers store only their input [B*T,C] and run their forward
                               again during backward (exact: identical gradients); < 0 or >= n_layers:
                               every layer */
} tk_llama_mem_opts;

tk_llama_acts *tk_llama_acts_alloc(tk_llama *m, size_t B, size_t T, tk_err *err);
/* As tk_llama_acts_alloc with explicit options (NULL: AUTO attention, no recomputation). */
tk_llama_acts *tk_llama_acts_alloc_ex(tk_llama *m, size_t B, size_t T, const tk_llama_mem_opts *o, tk_err *err);
/* Bytes tk_llama_acts_alloc_ex would take for the activation block (planning, benchmarks). */
size_t tk_llama_acts_bytes(tk_llama *m, size_t B, size_t T, const tk_llama_mem_opts *o);
/* Parses "auto|full|tiled" and "N|all" (command-line helpers); -1 with err on a bad value. */
int tk_attn_mode_parse(const char *s, tk_attn_mode *out, tk_err *err);
int tk_recompute_parse(const char *s, int *out, tk_err *err);
void tk_llama_acts_free(tk_llama *m, tk_llama_acts *a);

/* ids, mask [B,T] (mask NULL = all real). With train != 0 dropout is sampled from rng and gate
 * statistics (r_i) are recorded. ids must be in [0, V). */
int tk_llama_forward(tk_llama *m, tk_llama_acts *a, const int32_t *ids, const uint8_t *mask, size_t B,
                     size_t T, int train, tk_rng *rng, tk_err *err);
/* Shifted cross-entropy of the last forward against labels [B,T] (-100 ignored). Returns the sum of
 * token losses; *count receives the number of counted positions. With scale != 0, overwrites
 * a->logits with the gradient scale * dLoss_sum/dlogits (the backward pass's seed). */
double tk_llama_loss(tk_llama *m, tk_llama_acts *a, const int32_t *labels, size_t B, size_t T,
                     float scale, size_t *count);
/* Backward of the last forward from the seed tk_llama_loss left; gradients ADD into m->params.grad
 * and c_i are recorded for the gate. */
int tk_llama_backward(tk_llama *m, tk_llama_acts *a, size_t B, size_t T, tk_err *err);

/* Greedy decoding with a KV cache for one sequence. out receives up to max_new ids (stopping after
 * eos when eos >= 0); returns the number generated, or -1. */
long tk_llama_generate(tk_llama *m, const int32_t *prompt, size_t n_prompt, size_t max_new,
                       int32_t eos, int32_t *out, tk_err *err);

/* KV-cached inference, one sequence per cache (what tk_llama_generate and beam search run on):
 *
 *   tk_llama_kv *kv = tk_llama_kv_alloc(m, n_prompt + max_new, n_prompt, &err);
 *   tk_llama_step(m, kv, prompt, n_prompt, logits, &err);  // logits [V] of the last position
 *   tk_llama_step(m, kv, &next, 1, logits, &err);          // one more position, and so on
 *   tk_llama_kv_copy(beam_kv, kv, 0, &err);                // fork a sequence (beam search)
 *   tk_llama_kv_free(kv);
 *
 * A cache holds max_len positions (keys after RoPE, values, every layer) and the scratch of one pass
 * of up to min(max_chunk, 512) tokens: a step of more runs in passes of 512, so a long prompt needs
 * no [n_prompt, F] or [n_prompt, S] scratch. It belongs to the model it was allocated for (which must
 * outlive it) and is not thread-safe (steps use the model's shared adapter workspace). The gated
 * adapters apply as in training (docs/TSPEFT.md). Failure: NULL / -1 with err set; the cache is
 * unchanged. */
typedef struct tk_llama_kv tk_llama_kv;
tk_llama_kv *tk_llama_kv_alloc(tk_llama *m, size_t max_len, size_t max_chunk, tk_err *err);
/* attention: the kernel of passes of more than one token. FULL keeps [pass, S] softmax weights per
 * head; TILED none (slower at these lengths); AUTO (tk_llama_kv_alloc) is FULL while those weights
 * fit in 128 MiB for the whole pass, TILED beyond. Single tokens always take the full kernel. */
tk_llama_kv *tk_llama_kv_alloc_ex(tk_llama *m, size_t max_len, size_t max_chunk, tk_attn_mode attention,
                                  tk_err *err);
void tk_llama_kv_free(tk_llama_kv *kv); /* NULL is fine */
size_t tk_llama_kv_len(const tk_llama_kv *kv); /* positions filled */
int tk_llama_kv_tiled(const tk_llama_kv *kv);  /* passes of several tokens take the tiled kernel */
void tk_llama_kv_reset(tk_llama_kv *kv);       /* forget every position (len 0) */
/* dst takes src's positions from..len-1 and its length; dst's positions below `from` are kept (the
 * caller knows they equal src's: beams share their prompt, so a beam reorder copies only the
 * generated rows). from <= both lengths; the caches may differ in max_len and max_chunk. */
int tk_llama_kv_copy(tk_llama_kv *dst, const tk_llama_kv *src, size_t from, tk_err *err);
/* Runs ids[0..n) (1 <= n <= max_chunk) at positions len..len+n-1, appends their keys and values, and
 * writes the next-token logits [V] of the last one. */
int tk_llama_step(tk_llama *m, tk_llama_kv *kv, const int32_t *ids, size_t n, float *logits, tk_err *err);
/* The same, where positions whose kinds[i] is TK_KIND_IMAGE take embeds[i] ([n,C]) instead of their
 * id's embedding row (visual tokens); embeds or kinds NULL = tk_llama_step. */
int tk_llama_step_ex(tk_llama *m, tk_llama_kv *kv, const int32_t *ids, const float *embeds, const uint8_t *kinds,
                     size_t n, float *logits, tk_err *err);


/* Batched decoding: one new token for each of B sequences, each in its own cache (their lengths may
 * differ), with the projections run once over the B rows (the weights are read once per step instead
 * of once per sequence):
 *
 *   tk_llama_rows *r = tk_llama_rows_alloc(m, 16, max_len, &err);   // up to 16 rows, caches <= max_len
 *   tk_llama_kv *kvs[16];                                            // each filled by tk_llama_step
 *   tk_llama_step_rows(m, r, kvs, next, B, logits, &err);            // logits [B, V]
 *   tk_llama_rows_free(r);
 *
 * Row b runs ids[b] at position kv[b]'s length and appends its key and value there. Its logits are
 * bit-identical to tk_llama_step(m, kv[b], &ids[b], 1, ...) on that cache alone: every product
 * computes each row on its own (the same k order whatever the other rows; tests/test_step_rows.c),
 * and attention runs per row against its own cache. The caches must be distinct. Failure: -1 with
 * err set, the caches unchanged. */
typedef struct tk_llama_rows tk_llama_rows;
tk_llama_rows *tk_llama_rows_alloc(tk_llama *m, size_t rows, size_t max_len, tk_err *err);
void tk_llama_rows_free(tk_llama_rows *r); /* NULL is fine */
int tk_llama_step_rows(tk_llama *m, tk_llama_rows *r, tk_llama_kv *const *kv, const int32_t *ids, size_t B,
                       float *logits, tk_err *err);

#endif
