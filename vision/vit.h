/* vit.h: the CLIP / SigLIP vision transformers of LLaVA-style models, in fp32: loading and the
 * inference forward (the training forward and backward: vit_train.h).
 *
 *   tk_err err = {0};
 *   tk_vit *m = tk_vit_open("clip-vit-large-patch14-336", NULL, &err);  // config.json + safetensors
 *   tk_vit_ws *ws = tk_vit_ws_alloc(m, 8, &err);                        // up to 8 images per pass
 *   tk_vit_select sel = {.layer = -2, .feature = TK_VIT_FEATURE_PATCH}; // LLaVA's default
 *   float *out = malloc(B * tk_vit_out_tokens(m, sel.feature) * m->cfg.hidden * sizeof(float));
 *   tk_vit_forward(m, ws, out, pixels, B, &sel, &err);                  // pixels [B,3,S,S]
 *   tk_vit_ws_free(ws); tk_vit_close(m);
 *
 * Architecture (HF CLIPVisionTransformer / SiglipVisionTransformer):
 *   CLIP:   x = [class_embedding; conv(pixels)] + position_embedding   (T = N + 1 tokens)
 *           x = pre_layrnorm(x)
 *   SigLIP: x = conv(pixels) + conv bias + position_embedding           (T = N tokens, no class token)
 *   every layer: x += out_proj(attn(layer_norm1(x)));  x += fc2(act(fc1(layer_norm2(x))))
 *   attention is bidirectional (no mask), softmax(q k^T / sqrt(D)) v per head.
 * hidden_states[0] is x before the first layer, hidden_states[l] the output of layer l (as HF's
 * output_hidden_states); none of them has post_layernorm applied (CLIP's last_hidden_state is
 * hidden_states[-1]; SigLIP's is post_layernorm(hidden_states[-1]): select .post_norm = 1 for it).
 * SigLIP's attention-pooling head (vision_model.head.*) is loaded where the checkpoint has it
 * (cfg.use_head); LLaVA-style models take the patch features, the image-classification task the
 * pooled vector (vit_train.h).
 *
 * Ownership: tk_vit owns its weights (one fp32 block; F16/BF16 files are widened on load); the
 * workspace belongs to the model it was allocated for. Weights are read-only after loading; one
 * workspace per concurrent caller. Failure: NULL / -1 with err naming the file and tensor or key.
 * Threads: the caller sets them (tk_set_threads); matmuls are cblas_sgemm, other loops OpenMP.
 */
#ifndef TK_VISION_VIT_H
#define TK_VISION_VIT_H

#include "common.h"
#include "io/safetensors.h"
#include "model/params.h"
#include "ops/ops.h"

#include <stddef.h>
#include <stdint.h>

typedef enum { TK_VIT_CLIP, TK_VIT_SIGLIP } tk_vit_kind;

typedef struct {
    tk_vit_kind kind;
    int hidden;     /* C: hidden_size */
    int inter;      /* F: intermediate_size */
    int n_layers;   /* L: num_hidden_layers */
    int n_heads;    /* H: num_attention_heads (D = C / H) */
    int image_size; /* S: image_size (pixels per side) */
    int patch_size; /* P: patch_size (N = (S / P)^2 patches) */
    int channels;   /* num_channels (3) */
    float eps;      /* layer_norm_eps */
    tk_gelu_kind act; /* hidden_act: quick_gelu, gelu, gelu_pytorch_tanh / gelu_new */
    int use_head;   /* SigLIP's attention-pooling head (vision_model.head.*) is part of the model */
} tk_vit_config;

/* HF's defaults of CLIPVisionConfig (ViT-B/32 shape, quick_gelu, eps 1e-5) or SiglipVisionConfig
 * (ViT-B/16 shape, gelu_pytorch_tanh, eps 1e-6). use_head is 0: tk_vit_config_load sets it from
 * SigLIP's vision_use_head (default true), and tk_vit_open_set clears it when the checkpoint has no
 * head. */
void tk_vit_config_default(tk_vit_config *cfg, tk_vit_kind kind);
/* Reads a config.json: a CLIPVisionConfig / SiglipVisionConfig (model_type clip_vision_model /
 * siglip_vision_model), or any config with a "vision_config" object (CLIPConfig, SiglipConfig,
 * llava-hf's LlavaConfig). Missing keys take HF's defaults for the model_type; an original LLaVA config
 * (mm_vision_tower, no vision_config) gives an error telling to open the tower's own directory. */
int tk_vit_config_load(tk_vit_config *cfg, const char *path, tk_err *err);
/* Checks ranges and divisibility (C % H, S % P); -1 with err naming `where`. */
int tk_vit_config_check(const tk_vit_config *cfg, const char *where, tk_err *err);

typedef struct {
    float *ln1_w, *ln1_b;         /* [C] layer_norm1 */
    float *q_w, *k_w, *v_w, *o_w; /* [C,C] self_attn.{q,k,v,out}_proj.weight */
    float *q_b, *k_b, *v_b, *o_b; /* [C] their biases */
    float *ln2_w, *ln2_b;         /* [C] layer_norm2 */
    float *fc1_w, *fc1_b;         /* [F,C], [F] mlp.fc1 */
    float *fc2_w, *fc2_b;         /* [C,F], [C] mlp.fc2 */
} tk_vit_layer;

typedef struct {
    tk_vit_config cfg;
    size_t n_patches;         /* N = (S / P)^2 at the size the tower runs at (image_size below) */
    size_t n_tokens;          /* T = N + 1 (CLIP) or N (SigLIP) */
    int image_size;           /* S the tower runs at: cfg.image_size unless tk_vit_set_image_size chose
                               * another (vision/pos_interp.h) */
    size_t n_pos;             /* rows of pos: the checkpoint's T (cfg.image_size) */
    struct tk_pos_interp *pos_map; /* NULL, or the bicubic map from pos's grid to image_size's */
    float *pos_run;           /* [T, C] pos_map applied to pos (NULL when pos_map is) */
    float *patch_w;           /* [C, 3*P*P]: the conv weight [C,3,P,P] read as a matrix */
    float *patch_b;           /* [C] SigLIP's conv bias; NULL for CLIP (bias=False) */
    float *cls;               /* [C] CLIP class_embedding; NULL for SigLIP */
    float *pos;               /* [n_pos, C] position_embedding.weight */
    float *pre_w, *pre_b;     /* [C] CLIP pre_layrnorm; NULL for SigLIP */
    tk_vit_layer *layers;     /* [L] */
    float *post_w, *post_b;   /* [C] post_layernorm */
    /* SigLIP's attention-pooling head (cfg.use_head; NULL otherwise): one learned query (probe)
     * attends over post_layernorm(last hidden state) through nn.MultiheadAttention (in_proj packs
     * q, k, v), then y = a + fc2(act(fc1(layernorm(a)))); pooler_output = y. */
    float *head_probe;              /* [C] head.probe ([1,1,C] in the file) */
    float *head_in_w, *head_in_b;   /* [3C,C], [3C] head.attention.in_proj_{weight,bias} */
    float *head_out_w, *head_out_b; /* [C,C], [C] head.attention.out_proj */
    float *head_ln_w, *head_ln_b;   /* [C] head.layernorm */
    float *head_fc1_w, *head_fc1_b; /* [F,C], [F] head.mlp.fc1 */
    float *head_fc2_w, *head_fc2_b; /* [C,F], [C] head.mlp.fc2 */
    float *block;             /* owns every tensor above */
} tk_vit;

/* One weight of the encoder: its name after the prefix ("encoder.layers.3.mlp.fc1.weight"), where
 * its pointer lives, and its shape as stored in HF files. */
typedef struct {
    char name[TK_NAME_MAX];
    float **data;
    int ndim;
    int64_t shape[4];
} tk_vit_slot;
/* Capacity tk_vit_slots needs. */
size_t tk_vit_slot_capacity(const tk_vit_config *cfg);
/* Fills slots with every weight of m's kind (the table that drives allocation, loading and the
 * random constructor); returns the count. */
size_t tk_vit_slots(tk_vit *m, tk_vit_slot *slots);

/* Opens dir/config.json and dir's safetensors (model.safetensors or a sharded index). prefix: the
 * tensor name prefix ("vision_model.", "vision_tower.vision_model.", "model.vision_tower.vision_model.",
 * "model.vision_tower.vision_tower.vision_model."), or NULL to try those four in order. Every tensor
 * of the tower must be present with the config's shape; other tensors (a text tower, a LLaMA, SigLIP's
 * pooling head) are ignored. */
tk_vit *tk_vit_open(const char *dir, const char *prefix, tk_err *err);
/* The same from a config and an already opened checkpoint (e.g. a whole LLaVA checkpoint); where
 * names the checkpoint in messages. The weights are copied: set may be closed afterwards. */
tk_vit *tk_vit_open_set(const tk_vit_config *cfg, const tk_st_set *set, const char *where,
                        const char *prefix, tk_err *err);
/* A tower of cfg's shape with every tensor zero (gradient accumulators of the same layout). */
tk_vit *tk_vit_zeros(const tk_vit_config *cfg, tk_err *err);
/* Writes m as dir/config.json (a CLIPVisionConfig / SiglipVisionConfig) and dir/model.safetensors
 * (F32, names under "vision_model."), readable by tk_vit_open and transformers. The safetensors file
 * is written to a temporary name and renamed, so a failure leaves no partial file. */
int tk_vit_save(const tk_vit *m, const char *dir, tk_err *err);
/* Random weights of the given shape (linear/conv/embeddings uniform with std 0.02, biases 0, norms
 * weight 1 bias 0), nothing read: for tests, benchmarks and the demo. */
tk_vit *tk_vit_random(const tk_vit_config *cfg, uint64_t seed, tk_err *err);
void tk_vit_close(tk_vit *m); /* NULL is fine */

/* Feature selection, as LLaVA's mm_vision_select_feature / llava-hf's vision_feature_select_strategy. */
typedef enum {
    TK_VIT_FEATURE_PATCH,     /* "patch" / "default": the N patch tokens (CLIP drops the class token) */
    TK_VIT_FEATURE_CLS_PATCH, /* "cls_patch" / "full": every token (CLIP N + 1; SigLIP N) */
} tk_vit_feature;
/* Parses "patch", "default", "cls_patch" or "full"; -1 otherwise. */
int tk_vit_feature_parse(const char *s, tk_vit_feature *out);

typedef struct {
    int layer;              /* hidden_states index in [-(L+1), L]; LLaVA's mm_vision_select_layer -2 */
    tk_vit_feature feature;
    int post_norm;          /* apply post_layernorm to the selected state (SigLIP last_hidden_state) */
    int pooled;             /* pooler_output [B,C] instead (vit_train.h; tk_vit_forward refuses it) */
} tk_vit_select;

/* Tokens per image of the output: N or T. */
size_t tk_vit_out_tokens(const tk_vit *m, tk_vit_feature feature);

/* Activations of up to Bmax images per pass. */
typedef struct tk_vit_ws tk_vit_ws;
tk_vit_ws *tk_vit_ws_alloc(const tk_vit *m, size_t Bmax, tk_err *err);
void tk_vit_ws_free(tk_vit_ws *ws); /* NULL is fine */

/* The tower's kernels, shared by the inference forward (vit.c) and the training forward (vit_train.c).
 * y [R,O] = x [R,I] w [O,I]^T + b [O] (y += that when accumulate). */
void tk_vit_linear_bias(float *y, const float *x, const float *w, const float *b, size_t R, size_t I, size_t O,
                        int accumulate);
/* patches [B*N, K] from pixels [B,ch,S,S]: row (b, py, px), column (c, ky, kx), the order of the conv
 * weight [C,ch,P,P] flattened, so the conv is patches w^T. */
void tk_vit_im2col(float *patches, const float *pixels, size_t B, size_t ch, size_t S, size_t P);
/* Bidirectional multi-head attention of one image: att [T,C] = softmax(q k^T / sqrt(D)) v per head,
 * q, k, v [T,C] (head h in columns h*D..h*D+D-1); probs [H,T,T] is written with the softmax weights
 * (the training forward keeps them for the backward; inference uses it as scratch). */
void tk_vit_attention_forward(float *att, float *probs, const float *q, const float *k, const float *v,
                              size_t T, size_t H, size_t D);
/* out [B, tk_vit_out_tokens(m, sel->feature), C] = the selected hidden state of pixels [B,3,S,S]
 * (the preprocessed images, fp32). B may exceed the workspace's Bmax: the images then run in chunks
 * of Bmax. Only the layers up to the selected one run. -1 on a bad selection (err set). */
int tk_vit_forward(const tk_vit *m, tk_vit_ws *ws, float *out, const float *pixels, size_t B,
                   const tk_vit_select *sel, tk_err *err);

/* For benchmarks: runs n_images random images through the encoder (LLaVA's selection), batch
 * images per pass, and writes the seconds the passes took (allocation and input generation excluded)
 * into *seconds. Images per second = n_images / *seconds. */
int tk_vit_run_images(const tk_vit *m, size_t n_images, size_t batch, const tk_vit_select *sel,
                      uint64_t seed, double *seconds, tk_err *err);

#endif
