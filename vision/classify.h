/* classify.h: image classification on a CLIP / SigLIP tower: `tspeft train --task image-classification`
 * and `tspeft eval --task image-classification` (docs/vision.md "Image classification").
 *
 *   tk_cls_opts o;  tk_cls_opts_default(&o);  o.model_dir = "tower";  o.data = specs;  o.n_data = 1; ...
 *   if (tk_cls_train(&o, &err)) ...            // OUT/adapter_model.safetensors, adapter_config.json, ...
 *   tk_cls_eval_result r;
 *   if (tk_cls_eval(&o, &r, &err)) ...         // top-1 accuracy of o.adapter_dir on o.data
 *   ... r.samples[i].pred ...;  tk_cls_eval_result_free(&r);
 *
 * Model: logits = classifier(pooler_output(tower(pixels))), pooler_output as vit_train.h (CLIP: the
 * class token after post_layernorm; SigLIP: the attention-pooling head's output, or the mean of the
 * patches without a head), classifier an nn.Linear(C, n_classes) initialised as nn.Linear (weight and
 * bias U(-1/sqrt(C), 1/sqrt(C))). Loss: mean cross-entropy over the batch.
 * Trained: the classifier always (PEFT's modules_to_save = ["classifier"], saved as
 * base_model.model.classifier.weight / .bias), the tower's adapters (peft: targets under
 * "vision_model."; vit_peft.h), and with tune_tower the whole tower (its own learning rate
 * tower_lr; written as a tower directory OUT/vision_tower). The TS gate of the tower's adapters is
 * the LLM's: r_i per image token and module, c_i from the backward, tk_gate_update per step.
 *
 * Data: shards (a file, a directory of shards or a glob; several specs concatenate) whose records
 * are images to classify: one encoded image payload each and meta {"label": int, "n_classes": int}
 * (the contract of `tspeft convert --format image-folder`: T = 1, input_ids [0], labels [-100],
 * kinds [3], meta also "task", "id", "answer"). Every record must agree on n_classes; labels lie in
 * [0, n_classes). Images are decoded and preprocessed per batch (o.preprocess: clip | siglip;
 * default the tower's kind) to the tower's image_size.
 *
 * Outputs of training (out_dir): adapter_config.json (target_modules: the tower modules' full names,
 * modules_to_save ["classifier"], task_type null, ts_peft), adapter_model.safetensors (PEFT keys,
 * ts_tau per gated module), gates.jsonl (tower modules, gatelog.h's format with "tower": true),
 * train_log.jsonl, and with tune_tower vision_tower/. Written after the last step; a failure leaves
 * no partial file.
 * Failure: -1 with one line in err (naming the file, record or option).
 */
#ifndef TK_VISION_CLASSIFY_H
#define TK_VISION_CLASSIFY_H

#include "common.h"
#include "peft/peft_config.h"
#include "train/optim.h"

typedef struct {
    const char *model_dir;       /* HF CLIP / SigLIP tower directory */
    const char *const *data;     /* [n_data] shard specs */
    int n_data;
    const char *out_dir;         /* training: where the adapter goes (NULL: nothing written) */
    const char *adapter_dir;     /* eval: the trained adapter (NULL: fails) */
    const char *results;         /* eval: results JSON path (NULL: none) */
    const char *preprocess;      /* "clip" | "siglip" (NULL: the tower's kind) */
    int steps, batch_size, threads, log_every, quiet, tune_tower, limit;
    float lr, tower_lr, weight_decay, max_grad_norm;
    tk_sched_kind sched;
    int warmup_steps;
    uint64_t seed;
    tk_peft_config peft;         /* kind NONE: no adapter (the classifier, and the tower with tune_tower) */
} tk_cls_opts;

void tk_cls_opts_default(tk_cls_opts *o);
int tk_cls_train(const tk_cls_opts *o, tk_err *err);

/* One evaluated image, in data order: its label, the argmax of its logits (the lowest class index
 * on a tie) and the share of its tower-token updates (its tokens x the adapted modules) the gates
 * applied (1 without gates). */
typedef struct {
    int label, pred;
    float keep;
} tk_cls_sample;

typedef struct {
    size_t n, correct;
    double top1, seconds, keep; /* keep: the tower modules' kept share of image tokens (gated; else 1) */
    int n_classes;
    tk_cls_sample *samples;     /* [n], owned: tk_cls_eval_result_free */
} tk_cls_eval_result;
int tk_cls_eval(const tk_cls_opts *o, tk_cls_eval_result *r, tk_err *err);
void tk_cls_eval_result_free(tk_cls_eval_result *r);

#endif
