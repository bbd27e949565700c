/* train_data.h: where `tspeft train` gets its micro-batches: one pre-tokenized JSONL file
 * (datasets/jsonl.h; rows are a function of the step and the seed) or one or more datasets of shards
 * read through the loader (datasets/loader.h; a seeded, resumable stream whose cursor goes into
 * every checkpoint). Format is detected by the file's magic ("TKSHARD\0"), never by its extension.
 *
 *   const char *specs[] = {"csr.shard", "math-*.shard:3"};            // see "Data specs" below
 *   tk_train_data_opts o = {.specs = specs, .n_specs = 2, .batch_size = 4, .grad_accum = 2,
 *                           .max_len = 512, .shuffle = 1, .seed = 42, .prefetch = 2, .vocab_size = V};
 *   tk_train_data *d = tk_train_data_open(&o, &err);
 *   for (step = 1; ...) {
 *       if (tk_train_data_step(d, step, &err)) ...;         // fills grad_accum micro-batches
 *       for (k...) { const tk_train_mb *mb = tk_train_data_mb(d, k); ... mb->text, mb->kinds }
 *       tk_train_data_targets(d);                            // the step's target positions
 *   }
 *   tk_train_data_free(d);
 *
 * Data specs. Each spec is PATH or PATH:WEIGHT (WEIGHT a number > 0, default 1; the suffix is taken
 * as a weight only when everything after the last ':' is a number). PATH is a file, a glob
 * (`data/boolq-*.shard`, sorted) or a directory (every regular file in it that starts with the shard
 * magic, sorted by name); a glob or a directory is ONE dataset. Several specs are mixed by weight
 * (loader.h "Order"). A JSONL file is always a single dataset on its own (one spec, no weight).
 *
 * Micro-batches. B = batch_size rows; JSONL and unpacked shards are right-padded to the longest row
 * of the batch (at most max_len); packed shards (pack = 1) fill rows of exactly max_len, several
 * records per row under the plain causal mask with continuous positions (what TRL's
 * ConstantLengthDataset does; the first label of each packed record is -100). kinds [B,T] is
 * TK_KIND_* per position: the shard's kinds; for JSONL, PROMPT where the label is -100 on a real
 * token, RESPONSE where the label is a target, PAD on padding.
 *
 * Images. Shard records may carry images; this trainer is text-only, so a batch with images is an
 * error naming the shard (and record), never silently trained on as text.
 *
 * Ownership: the data object owns every micro-batch (valid until the next step call); it copies
 * nothing of opts but the values (specs must outlive it). Failure: NULL / -1 with err naming the
 * file (and line, record or frame).
 */
#ifndef TK_TRAIN_TRAIN_DATA_H
#define TK_TRAIN_TRAIN_DATA_H

#include "../../datasets/jsonl.h"
#include "../../datasets/loader.h"
#include "../common.h"

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *const *specs; /* [n_specs] PATH or PATH:WEIGHT */
    size_t n_specs;
    size_t batch_size;        /* B rows per micro-batch */
    size_t grad_accum;        /* K micro-batches per step */
    size_t max_len;           /* truncation / packed row length */
    int shuffle;              /* seeded shuffle per epoch (JSONL and shards) */
    size_t shuffle_window;    /* shards: loader.h shuffle_window (0 = uniform) */
    int pack;                 /* shards: sequence packing */
    size_t prefetch;          /* shards: batches prepared ahead on a thread */
    uint64_t seed;
    uint32_t vocab_size;      /* every id and target must lie below it */
    int allow_images;         /* shards: batches may carry images (a vision tower is attached) */
} tk_train_data_opts;

typedef struct {
    const tk_batch *text;  /* input_ids, labels, attention_mask [B,T] */
    const uint8_t *kinds;  /* [B,T] TK_KIND_* */
    const tk_loader_batch *batch; /* shards: the loader's batch (its images); NULL for JSONL */
} tk_train_mb;

typedef struct tk_train_data tk_train_data;

tk_train_data *tk_train_data_open(const tk_train_data_opts *o, tk_err *err);
void tk_train_data_free(tk_train_data *d);

/* 1 when training from shards (then the cursor calls below apply), 0 for JSONL. */
int tk_train_data_is_shards(const tk_train_data *d);
/* The longest T a micro-batch can have (to size activations). */
size_t tk_train_data_max_T(const tk_train_data *d);
/* One line describing the data ("16 rows" / "2 datasets, 3 shards, 40 records"). */
const char *tk_train_data_describe(const tk_train_data *d);
/* The name to put in errors about the data (the JSONL path, or the first spec). */
const char *tk_train_data_name(const tk_train_data *d);

/* Fills the grad_accum micro-batches of optimizer step `step` (1-based). JSONL: rows are a function
 * of (step, seed). Shards: the next batches of the stream (the step number is not used). */
int tk_train_data_step(tk_train_data *d, int step, tk_err *err);
/* Fills the micro-batches of step 1 again (the loss of the first batches under the final
 * parameters), leaving the position in the stream unchanged. */
int tk_train_data_first_step(tk_train_data *d, tk_err *err);
const tk_train_mb *tk_train_data_mb(const tk_train_data *d, size_t k);
/* Of the micro-batches filled last: positions whose shifted label counts in the loss, and real
 * tokens (attention mask 1). */
size_t tk_train_data_targets(const tk_train_data *d);
size_t tk_train_data_tokens(const tk_train_data *d);

/* Shards only: the stream position after the last step (to checkpoint), and continuing from one
 * (a cursor from other shards, weights, seed or shuffle options is refused). */
void tk_train_data_get_cursor(const tk_train_data *d, tk_loader_cursor *c);
int tk_train_data_set_cursor(tk_train_data *d, const tk_loader_cursor *c, tk_err *err);
/* Shards: loader epochs completed, fractional (samples drawn / samples per epoch); JSONL: rows
 * used / rows. */
double tk_train_data_epoch(const tk_train_data *d, int steps_done);

#endif
