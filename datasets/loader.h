/* loader.h: training batches from shards (datasets/shard.h): weighted mixing of several datasets,
 * seeded shuffling per epoch, right-padded or packed rows, background prefetch, resumable cursor.
 *
 *   const char *a[] = {"csr-0.shard", "csr-1.shard"}, *b[] = {"math.shard"};
 *   tk_loader_source src[2] = {{a, 2, 3.0}, {b, 1, 1.0}};            // 3:1 mix
 *   tk_loader_opts o = {.batch_size = 8, .max_len = 512, .shuffle = 1, .seed = 42, .prefetch = 4};
 *   tk_err err = {0};
 *   tk_loader *L = tk_loader_open(src, 2, &o, &err);
 *   tk_loader_batch batch = {0};
 *   for (step...) {
 *       if (tk_loader_next(L, &batch, &err) != 0) ...;   // batch.text is a tk_batch (jsonl.h)
 *       ...
 *       tk_loader_cursor c; tk_loader_get_cursor(L, &c);  // save beside the checkpoint
 *   }
 *   tk_loader_batch_free(&batch); tk_loader_free(L);
 *   // resume: tk_loader_open(same sources and seed), tk_loader_set_cursor(L, &saved, &err)
 *
 * Order. The stream of samples is infinite and a pure function of (sources, seed, shuffle options)
 * and the cursor; batch_size, max_len, pack and prefetch never change which sample comes next.
 * Each sample first picks a source (probability weight / sum of weights, from a seeded RNG whose
 * state is in the cursor), then takes the next record of that source's current pass. Every pass
 * over a source (a source epoch) is a fresh permutation of all its records, derived from
 * (seed, source, source epoch). The loader epoch counts blocks of N samples, N = the records of all
 * sources together; with one source it equals that source's epoch. Batches run across epoch
 * boundaries (no sample is dropped, no batch is short).
 *
 * Rows. pack = 0: one record per row, truncated to max_len from the right, rows right-padded to the
 * longest in the batch (T <= max_len), as tk_batch_make does. pack = 1: T = max_len; records are
 * laid into rows in sample order, a record going into the current row when it fits and starting
 * the next row otherwise (a record longer than max_len is truncated and fills a row); a sample that
 * does not fit in the last row starts the next batch. Packed records are NOT isolated by the
 * attention mask: attention_mask is 1 on every real token, so under a plain causal mask a token
 * attends to the earlier records of its row. position_ids (restarting at 0 per record) and
 * segment_ids (1, 2, ... per record in a row) are given so that a consumer can build the
 * block-diagonal causal mask and reset RoPE positions; the label of each record's first token is
 * set to -100 so that no loss term predicts one record from the previous one.
 *
 * Prefetch. With prefetch > 0 a background thread prepares up to that many batches ahead (reading
 * and decompressing the shards; it owns the readers). It produces exactly the batches the caller's
 * thread would, in the same order, so the result never depends on timing. An error is reported by
 * tk_loader_next at the batch where it happened, and again on every later call.
 *
 * Ownership: the loader copies its options and the source descriptions; a batch owns its arrays
 * (tk_loader_next swaps buffers with the loader's queue, so keep one batch and pass it every time).
 * The loader is used from one thread. Failure: NULL / -1 with err naming the shard (and frame).
 */
#ifndef TK_DATASETS_LOADER_H
#define TK_DATASETS_LOADER_H

#include "../src/common.h"
#include "jsonl.h"
#include "shard.h"

#include <stddef.h>
#include <stdint.h>

#define TK_LOADER_MAX_SOURCES 16
#define TK_LOADER_MAX_PREFETCH 64

typedef struct {
    const char *const *paths; /* [n_paths] shards, read as one dataset in this order */
    size_t n_paths;
    double weight;            /* > 0: relative share of the samples */
} tk_loader_source;

typedef struct {
    size_t batch_size;     /* B >= 1 rows */
    size_t max_len;        /* >= 1: the longest row (pack = 0), the row length (pack = 1) */
    int pack;              /* 0 right padding, 1 sequence packing */
    int shuffle;           /* 0 file order, 1 a new permutation per source epoch */
    size_t shuffle_window; /* 0: uniform permutation of each source; k > 0: frames in random order and
                              records shuffled within each group of k frames (each frame decompressed
                              once per pass; readers cache k frames) */
    size_t cache_bytes;    /* decompressed frames each shard reader may keep (LRU), in bytes; at
                              least one frame, and at least shuffle_window frames. A uniform shuffle
                              decompresses one frame per sample unless the shard fits in this cache */
    uint64_t seed;
    size_t prefetch;       /* batches prepared ahead on a background thread; 0 = none */
    uint32_t vocab_size;   /* > 0: every id and label (other than -100) must lie below it */
} tk_loader_opts;

/* Where one source stands. */
typedef struct {
    uint64_t epoch;    /* passes completed over this source */
    uint64_t position; /* records already taken from the current pass */
} tk_loader_source_pos;

/* The whole sample order state: a plain struct, copied by value, saved with the checkpoint. */
typedef struct {
    uint64_t fingerprint; /* of the sources' sizes, weights, seed and shuffle options */
    uint64_t epoch;       /* loader epochs completed */
    uint64_t position;    /* samples drawn in the current loader epoch */
    uint64_t samples;     /* samples drawn in all */
    uint64_t batches;     /* batches produced */
    uint64_t rng;         /* state of the source-choice RNG (splitmix64) */
    uint32_t n_sources;
    tk_loader_source_pos source[TK_LOADER_MAX_SOURCES]; /* [n_sources] */
} tk_loader_cursor;

/* One record placed in a batch. */
typedef struct {
    uint32_t source;    /* index into the loader's sources */
    uint64_t record;    /* index within the source (its shards concatenated) */
    uint64_t epoch;     /* the source epoch it was drawn in */
    uint32_t row;       /* batch row */
    uint32_t start;     /* first column */
    uint32_t len;       /* tokens placed */
    uint32_t truncated; /* tokens cut off at max_len */
} tk_loader_sample;

/* An image of a sample, in the order of the sample's image-token runs. */
typedef struct {
    uint32_t sample;      /* index into samples */
    uint32_t row;
    tk_shard_image image; /* image.data points into the batch's arena */
} tk_loader_image;

typedef struct {
    tk_batch text;          /* B, T; input_ids [B,T] pad 0; labels [B,T] pad -100; attention_mask [B,T] */
    uint8_t *kinds;         /* [B,T] TK_KIND_*, pad 0 */
    int32_t *position_ids;  /* [B,T] 0,1,.. per record; pad 0 */
    int32_t *segment_ids;   /* [B,T] 1,2,.. per record within a row; pad 0 */
    size_t n_samples;
    tk_loader_sample *samples; /* [n_samples] in sample order */
    size_t n_images;
    tk_loader_image *images;   /* [n_images] */
    tk_loader_cursor cursor;   /* the position after this batch */
    /* storage (managed by the loader) */
    size_t samples_cap, images_cap;
    uint8_t *arena; /* [arena_cap] image bytes */
    size_t arena_len, arena_cap;
} tk_loader_batch;

typedef struct tk_loader tk_loader;

/* Opens every shard (validated at open), checks options, starts the prefetch thread. NULL on
 * failure. */
tk_loader *tk_loader_open(const tk_loader_source *sources, size_t n_sources, const tk_loader_opts *opts,
                          tk_err *err);
void tk_loader_free(tk_loader *L);

/* The next batch into b (reusing or swapping b's buffers). */
int tk_loader_next(tk_loader *L, tk_loader_batch *b, tk_err *err);
void tk_loader_batch_free(tk_loader_batch *b);

/* Records of source s; samples per loader epoch (all sources' records). */
uint64_t tk_loader_source_records(const tk_loader *L, size_t s);
uint64_t tk_loader_epoch_samples(const tk_loader *L);

/* The position after the last batch tk_loader_next returned (the start, before the first). */
void tk_loader_get_cursor(const tk_loader *L, tk_loader_cursor *out);
/* Continues from c (saved by a loader over the same sources, weights, seed and shuffle options):
 * the next batch starts with the sample that followed c. Discards batches prepared ahead. */
int tk_loader_set_cursor(tk_loader *L, const tk_loader_cursor *c, tk_err *err);

/* Cursor as a small JSON object (64-bit values as hex strings); malloc'd, caller frees. NULL on
 * failure. */
char *tk_loader_cursor_to_json(const tk_loader_cursor *c, tk_err *err);
/* Parses what tk_loader_cursor_to_json wrote; what names the source in errors (a path). */
int tk_loader_cursor_from_json(tk_loader_cursor *c, const char *text, size_t len, const char *what, tk_err *err);
/* The same through a file (written atomically). */
int tk_loader_cursor_save(const tk_loader_cursor *c, const char *path, tk_err *err);
int tk_loader_cursor_load(tk_loader_cursor *c, const char *path, tk_err *err);

#endif
