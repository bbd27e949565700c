/* checkpoint.h: resumable training checkpoints, in Hugging Face Trainer's layout.
 *
 *   OUT/checkpoint-<step>/adapter_config.json, adapter_model.safetensors   the adapter (PEFT layout,
 *                                                    ts_tau and ts_lambda included)
 *   OUT/checkpoint-<step>/optimizer.safetensors      AdamW moments: <param>.exp_avg, <param>.exp_avg_sq
 *   OUT/checkpoint-<step>/trainer_state.json         step, RNG state, loader cursor, running figures
 *                                                    and the effective configuration of the run
 *   OUT/checkpoint-<step>/loader_cursor.json         training from shards only: the shard loader's
 *                                                    cursor (tk_loader_cursor_save, datasets/loader.h)
 *   OUT/latest                                       the name of the newest COMPLETE checkpoint
 *
 * Saving is crash-safe: the checkpoint is written into OUT/checkpoint-<step>.tmp.<pid>, every file
 * flushed, the directory renamed into place, and only then is `latest` replaced (atomically). A kill
 * at any moment leaves `latest` naming a complete checkpoint; a failed save (full disk) removes its
 * partial directory and reports, leaving earlier checkpoints untouched. The last keep_last complete
 * checkpoints are kept.
 *
 *   tk_train_state st = {...};
 *   tk_checkpoint_save("runs/x", 3, model, &st, config_json, &err);
 *   char dir[4096]; tk_checkpoint_resolve("runs/x", dir, sizeof dir, &err);   // follows `latest`
 *   tk_checkpoint_load(dir, model, &st, &config, &err);   // model already attached to dir's adapter
 */
#ifndef TK_TRAIN_CHECKPOINT_H
#define TK_TRAIN_CHECKPOINT_H

#include "../../datasets/loader.h"
#include "../common.h"
#include "../model/llama.h"

#include <cJSON.h>
#include <stdint.h>

typedef struct {
    int step;           /* optimizer steps completed */
    uint64_t rng[2];    /* dropout RNG */
    uint64_t rows_used; /* loader cursor: rows consumed so far (row order is a function of it) */
    int has_cursor;     /* training from shards: cursor is saved as loader_cursor.json */
    tk_loader_cursor cursor; /* the shard loader's position after the last completed step */
    double epoch;       /* loader epochs completed, fractional (information) */
    double first_loss, last_loss, tokens, seconds;
    int skipped;        /* steps skipped for non-finite loss or gradient */
} tk_train_state;

/* config: the effective configuration (a JSON object, not consumed). */
int tk_checkpoint_save(const char *out_dir, int keep_last, const tk_llama *m, const tk_train_state *st,
                       const cJSON *config, tk_err *err);
/* Removes what a killed process left in out_dir: checkpoint-*.tmp.<pid> and .staging.<pid>
 * directories and *.tmp.<pid> files whose process no longer exists. */
void tk_checkpoint_clean_stale(const char *out_dir);
/* path is a checkpoint directory, or a run directory holding `latest`. Writes the checkpoint
 * directory into out. */
int tk_checkpoint_resolve(const char *path, char *out, size_t n, tk_err *err);
/* Loads the optimizer moments into m->params and the trainer state; *config receives the saved
 * configuration (caller deletes). The adapter itself is loaded by tk_llama_attach(m, pc, dir). */
int tk_checkpoint_load(const char *dir, tk_llama *m, tk_train_state *st, cJSON **config, tk_err *err);

#endif
