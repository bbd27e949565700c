/* trainer.h: the `tspeft train` loop: micro-batches, gradient accumulation, the TS-PEFT threshold
 * step, clipping, AdamW with a schedule, progress lines, the first-step dump and the adapter output.
 *
 *   tk_train_opts o;  tk_train_opts_default(&o);  o.model_dir = ...;  o.peft = ...;
 *   if (tk_train_run(&o, &err) != 0) { fprintf(stderr, "tspeft: %s\n", err.msg); exit(1); }
 *
 * One optimizer step = grad_accum micro-batches of batch_size rows. Its loss is the sum of token
 * losses over all micro-batches divided by the step's count of target positions, so the gradient of
 * each micro-batch is scaled by that count before its backward (docs/formats.md "The loss").
 */
#ifndef TK_TRAIN_TRAINER_H
#define TK_TRAIN_TRAINER_H

#include "../common.h"
#include "../peft/peft_config.h"
#include "dist.h"
#include "optim.h"

typedef struct {
    const char *model_dir;   /* HF LLaMA directory */
    const char *adapter_dir; /* PEFT adapter to start from, or NULL for a new one from peft */
    const char *data_path;   /* training data: the only --data (or the first); see data_specs */
    const char *const *data_specs; /* [n_data] every --data: PATH[:WEIGHT], JSONL or shards (train_data.h);
                                      NULL: data_path alone */
    int n_data;
    int pack;                /* shards: sequence packing into rows of max_seq_len */
    int shuffle_window;      /* shards: 0 uniform shuffle, k > 0 frames shuffled in groups of k */
    int prefetch;            /* shards: batches prepared ahead on a thread (default 2) */
    const char *out_dir;     /* where the trained adapter goes, or NULL */
    const char *dump_dir;    /* first-step gradient dump, or NULL */
    const char *resume_dir;  /* checkpoint directory to continue from (tk_checkpoint_resolve'd), or NULL */
    int steps, batch_size, grad_accum, threads, max_seq_len, log_every, shuffle, quiet;
    int save_every;          /* checkpoint every N optimizer steps into out_dir/checkpoint-N (0: never) */
    int keep_checkpoints;    /* keep the newest K checkpoints (0: all) */
    int skip_nonfinite;      /* non-finite loss or gradient: 0 stop the run, 1 skip the step */
    int bf16_weights;        /* keep BF16 base matrices BF16 in memory (tk_llama_open_ex) */
    int compute_bf16;        /* frozen products in BF16 (--compute bf16, already checked against the CPU) */
    int attention;           /* tk_attn_mode (llama.h): 0 auto, full or tiled */
    int recompute;           /* recompute the first N layers in backward (-1: all; tk_llama_mem_opts) */
    int gate_log;            /* record gates.jsonl / train_log.jsonl / tokens.jsonl in out_dir (default 1) */
    int token_view_every;    /* also a token view every N steps (0: only at the last step) */
    uint64_t seed;
    float lr, weight_decay, max_grad_norm;
    tk_sched_kind sched;
    int warmup_steps;
    tk_peft_config peft;     /* adapter description (ignored for tensors when adapter_dir is set) */
    /* vision (LLaVA-style; docs/vision.md "Training"): NULL tower = text only */
    const char *vision_tower;    /* HF CLIP/SigLIP vision tower directory (frozen unless the adapter config
                                    targets its modules or tune_vision_tower) */
    int tune_vision_tower;       /* 1: every tower tensor trains; saved as out_dir/vision_tower */
    float vision_tower_lr;       /* the tower's (tensors and adapters) peak learning rate (LLaVA's
                                    mm_vision_tower_lr; 0: lr); it follows the same schedule */
    const char *projector;       /* projector weights to start from (mm_projector.safetensors or a LLaVA
                                    checkpoint); NULL: nn.Linear initialisation */
    const char *projector_type;  /* linear | mlp2x_gelu */
    const char *vision_feature;  /* patch | cls_patch */
    const char *image_preprocess;/* clip | llava-pad | siglip */
    int vision_layer;            /* hidden-state index (0: -2) */
    int image_size;              /* > 0: images preprocessed to this size (tk_mm_opts.image_size) */
    int interpolate_pos;         /* 1: bicubic position embeddings when image_size is not the tower's */
    int stage;                   /* 1: projector only (no adapter); 2: projector + adapter (default) */
    float mm_projector_lr;       /* the projector's peak learning rate (LLaVA's mm_projector_lr; 0: lr); it
                                    follows the same schedule */
    tk_dist *dist;           /* data-parallel communicator (dist.h), or NULL for one process. With P
                                ranks each optimizer step has P * grad_accum micro-batches; rank p runs
                                micro-batches p*K .. p*K+K-1; only rank 0 prints and writes files */
} tk_train_opts;

void tk_train_opts_default(tk_train_opts *o);
/* Returns 0 on success, -1 on failure (err set), or 128 + signal number when SIGINT/SIGTERM stopped the
 * run (a checkpoint was saved when out_dir is set; err says where). */
int tk_train_run(const tk_train_opts *o, tk_err *err);

#endif
