/* loader.c: see loader.h.
 *
 * Legend: B = rows per batch, T = row length, S = sources, N = records of all sources together.
 *
 * Determinism. produce() builds one batch from a cursor and returns the cursor after it; it reads
 * nothing else that changes (the permutations are pure functions of seed, source and source epoch;
 * readers only cache). The caller's thread runs it directly (prefetch = 0) or the producer thread
 * runs it into a ring of slots that the caller takes in order (prefetch > 0), so both paths give the
 * same batches. The cursor the caller sees is the one stored in the last batch it took.
 *
 * Threads. While the producer thread runs it alone touches the readers, the permutations and the
 * staging buffers; the caller's thread touches only `consumed` and the slot at the head of the ring,
 * under the mutex. set_cursor stops and joins the thread before touching anything.
 */
#include "datasets/loader.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ULL(x) ((unsigned long long)(x))

/* ---- random numbers ---- */

/* splitmix64: one step of the generator whose whole state is *s. */
static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t mix64(uint64_t x) { return splitmix64(&x); }

/* Uniform in [0, n), n >= 1, without modulo bias (rejection of the short last block). */
static uint64_t rand_below(uint64_t *s, uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    for (;;) {
        uint64_t r = splitmix64(s);
        if (r < limit) return r % n;
    }
}

/* Uniform in [0, 1) with 53 random bits. */
static double rand_unit(uint64_t *s) { return (double)(splitmix64(s) >> 11) * 0x1.0p-53; }

/* ---- state ---- */

typedef struct {
    tk_shard_reader **readers; /* [n_paths] */
    size_t n_paths;
    uint64_t *starts; /* [n_paths + 1] first record of each shard within the source */
    uint64_t records;
    double weight;
    uint64_t *perm; /* [records] the order of the pass perm_epoch (shuffle only) */
    uint64_t perm_epoch;
    int perm_valid;
} source_state;

typedef struct {
    tk_loader_batch b;
    int rc;
    tk_err err;
} queue_slot;

struct tk_loader {
    tk_loader_opts o;
    size_t n_src;
    source_state src[TK_LOADER_MAX_SOURCES];
    double cum[TK_LOADER_MAX_SOURCES]; /* [n_src] cumulative normalized weights, last = 1 */
    uint64_t epoch_len;                /* N */
    uint64_t fingerprint;
    tk_loader_cursor consumed; /* after the last batch handed out */
    tk_loader_cursor produced; /* where produce() continues; the producer's while it runs */
    /* producer staging (pack = 0): tokens of the batch's records, back to back */
    int32_t *st_ids, *st_labels; /* [st_ids_cap], [st_labels_cap] */
    uint8_t *st_kinds;           /* [st_kinds_cap] */
    size_t st_ids_cap, st_labels_cap, st_kinds_cap;
    /* prefetch ring */
    queue_slot *q; /* [qcap] */
    size_t qcap, qhead, qcount;
    int stop, running;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t can_put, can_take;
};

/* Grows a tk_calloc'd array to hold need elements (contents are kept). */
static int grow(void **buf, size_t *cap, size_t need, size_t size) {
    if (need <= *cap && *buf != NULL) return 0;
    size_t n = *cap ? *cap : 16;
    while (n < need) n = n > SIZE_MAX / 2 ? need : n * 2;
    size_t bytes;
    if (tk_mul_size(n, size, &bytes) != 0) return -1;
    void *p = tk_calloc(n, size);
    if (p == NULL) return -1;
    if (*buf != NULL && *cap > 0) memcpy(p, *buf, *cap * size);
    tk_free(*buf);
    *buf = p;
    *cap = n;
    return 0;
}

/* ---- the order of samples ---- */

static uint64_t perm_seed(uint64_t seed, size_t s, uint64_t epoch, uint64_t salt) {
    uint64_t h = mix64(seed ^ 0x5348415244ull);
    h = mix64(h ^ ((uint64_t)s + 1) * 0xD6E8FEB86659FD93ull);
    h = mix64(h ^ (epoch + 1) * 0xA0761D6478BD642Full);
    return mix64(h ^ salt);
}

static void shuffle_u64(uint64_t *a, size_t n, uint64_t *rng) {
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)rand_below(rng, i);
        uint64_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

/* Builds src->perm for source epoch `epoch`. */
static int perm_build(tk_loader *L, size_t s, uint64_t epoch, tk_err *err) {
    source_state *src = &L->src[s];
    if (src->perm == NULL) {
        src->perm = tk_calloc((size_t)src->records, sizeof(uint64_t));
        if (src->perm == NULL)
            return tk_fail(err, "loader: out of memory for the order of %llu records", ULL(src->records));
    }
    uint64_t rng = perm_seed(L->o.seed, s, epoch, 1);
    if (L->o.shuffle_window == 0) {
        for (uint64_t i = 0; i < src->records; i++) src->perm[i] = i;
        shuffle_u64(src->perm, (size_t)src->records, &rng);
    } else {
        /* Frames (over all shards of the source) in random order; records shuffled within each
         * group of shuffle_window consecutive frames of that order. */
        size_t nf = 0;
        for (size_t k = 0; k < src->n_paths; k++) nf += (size_t)tk_shard_reader_frame_count(src->readers[k]);
        uint64_t *frames = tk_calloc(nf, sizeof(uint64_t)); /* (shard << 40 | frame) */
        if (frames == NULL) return tk_fail(err, "loader: out of memory for %zu frames", nf);
        size_t i = 0;
        for (size_t k = 0; k < src->n_paths; k++) {
            uint64_t n = tk_shard_reader_frame_count(src->readers[k]);
            for (uint64_t f = 0; f < n; f++) frames[i++] = (uint64_t)k << 40 | f;
        }
        shuffle_u64(frames, nf, &rng);
        size_t out = 0;
        for (size_t g = 0; g < nf; g += L->o.shuffle_window) {
            size_t group_start = out;
            for (size_t j = g; j < nf && j < g + L->o.shuffle_window; j++) {
                size_t k = (size_t)(frames[j] >> 40);
                uint64_t first, count;
                tk_shard_reader_frame_records(src->readers[k], frames[j] & ((1ull << 40) - 1), &first, &count);
                for (uint64_t r = 0; r < count; r++) src->perm[out++] = src->starts[k] + first + r;
            }
            shuffle_u64(src->perm + group_start, out - group_start, &rng);
        }
        TK_ASSERT(out == src->records);
        tk_free(frames);
    }
    src->perm_epoch = epoch;
    src->perm_valid = 1;
    return 0;
}

/* Draws the next sample at *cur (advancing it): its source, record and source epoch. */
static int draw(tk_loader *L, tk_loader_cursor *cur, size_t *s_out, uint64_t *rec_out, uint64_t *epoch_out,
                tk_err *err) {
    double u = rand_unit(&cur->rng);
    size_t s = 0;
    while (s + 1 < L->n_src && u >= L->cum[s]) s++;
    source_state *src = &L->src[s];
    tk_loader_source_pos *pos = &cur->source[s];
    uint64_t rec = pos->position;
    if (L->o.shuffle) {
        if (!src->perm_valid || src->perm_epoch != pos->epoch) {
            if (perm_build(L, s, pos->epoch, err) != 0) return -1;
        }
        rec = src->perm[pos->position];
    }
    *s_out = s;
    *rec_out = rec;
    *epoch_out = pos->epoch;
    if (++pos->position == src->records) {
        pos->epoch++;
        pos->position = 0;
    }
    cur->samples++;
    if (++cur->position == L->epoch_len) {
        cur->epoch++;
        cur->position = 0;
    }
    return 0;
}

/* Reads record rec of source s. */
static int fetch(tk_loader *L, size_t s, uint64_t rec, tk_shard_record *out, tk_err *err) {
    source_state *src = &L->src[s];
    size_t lo = 0, hi = src->n_paths; /* starts[lo] <= rec < starts[hi] */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (src->starts[mid] <= rec) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    uint64_t local = rec - src->starts[lo];
    if (tk_shard_reader_get(src->readers[lo], local, out, err) != 0) return -1;
    uint32_t V = L->o.vocab_size;
    if (V > 0) {
        for (size_t t = 0; t < out->n_tokens; t++) {
            int32_t id = out->input_ids[t], lab = out->labels[t];
            if ((uint32_t)id >= V || (lab != TK_SHARD_LABEL_IGNORE && (uint32_t)lab >= V))
                return tk_fail(err, "%s: record %llu, token %zu: id %d label %d (expected < vocab size %u)",
                               tk_shard_reader_path(src->readers[lo]), ULL(local), t, id, lab, V);
        }
    }
    return 0;
}

/* ---- batches ---- */

void tk_loader_batch_free(tk_loader_batch *b) {
    if (b == NULL) return;
    tk_batch_free(&b->text);
    tk_free(b->kinds);
    tk_free(b->position_ids);
    tk_free(b->segment_ids);
    tk_free(b->samples);
    tk_free(b->images);
    tk_free(b->arena);
    memset(b, 0, sizeof *b);
}

/* Sizes b for B x T and fills it with padding. */
static int batch_shape(tk_loader_batch *b, size_t B, size_t T, tk_err *err) {
    size_t BT;
    if (tk_mul_size(B, T, &BT) != 0) return tk_fail(err, "loader: batch %zu x %zu too large", B, T);
    if (BT > b->text.cap || b->text.input_ids == NULL) {
        int32_t *ids = tk_calloc(BT, sizeof(int32_t)), *labels = tk_calloc(BT, sizeof(int32_t));
        int32_t *pos = tk_calloc(BT, sizeof(int32_t)), *seg = tk_calloc(BT, sizeof(int32_t));
        uint8_t *mask = tk_calloc(BT, 1), *kinds = tk_calloc(BT, 1);
        if (!ids || !labels || !pos || !seg || !mask || !kinds) {
            tk_free(ids);
            tk_free(labels);
            tk_free(pos);
            tk_free(seg);
            tk_free(mask);
            tk_free(kinds);
            return tk_fail(err, "loader: out of memory for a %zu x %zu batch", B, T);
        }
        tk_batch_free(&b->text);
        tk_free(b->kinds);
        tk_free(b->position_ids);
        tk_free(b->segment_ids);
        b->text.input_ids = ids;
        b->text.labels = labels;
        b->text.attention_mask = mask;
        b->text.cap = BT;
        b->kinds = kinds;
        b->position_ids = pos;
        b->segment_ids = seg;
    }
    b->text.B = B;
    b->text.T = T;
    for (size_t i = 0; i < BT; i++) {
        b->text.input_ids[i] = 0;
        b->text.labels[i] = TK_SHARD_LABEL_IGNORE;
        b->text.attention_mask[i] = 0;
        b->kinds[i] = TK_KIND_PAD;
        b->position_ids[i] = 0;
        b->segment_ids[i] = 0;
    }
    return 0;
}

/* Appends a sample and copies its images into the arena (data pointers are set by images_fix). */
static int batch_add_sample(tk_loader_batch *b, const tk_loader_sample *smp, const tk_shard_record *rec, tk_err *err) {
    if (grow((void **)&b->samples, &b->samples_cap, b->n_samples + 1, sizeof(tk_loader_sample)) != 0 ||
        grow((void **)&b->images, &b->images_cap, b->n_images + rec->n_images, sizeof(tk_loader_image)) != 0)
        return tk_fail(err, "loader: out of memory for the batch's samples");
    uint32_t idx = (uint32_t)b->n_samples;
    b->samples[b->n_samples++] = *smp;
    for (size_t i = 0; i < rec->n_images; i++) {
        const tk_shard_image *im = &rec->images[i];
        if (b->arena_len > SIZE_MAX - im->nbytes ||
            grow((void **)&b->arena, &b->arena_cap, b->arena_len + im->nbytes, 1) != 0)
            return tk_fail(err, "loader: out of memory for %zu image bytes", im->nbytes);
        memcpy(b->arena + b->arena_len, im->data, im->nbytes);
        tk_loader_image *o = &b->images[b->n_images++];
        o->sample = idx;
        o->row = smp->row;
        o->image = *im;
        o->image.data = (const uint8_t *)(uintptr_t)b->arena_len; /* an offset until images_fix */
        b->arena_len += im->nbytes;
    }
    return 0;
}

static void images_fix(tk_loader_batch *b) {
    for (size_t i = 0; i < b->n_images; i++)
        b->images[i].image.data = b->arena + (size_t)(uintptr_t)b->images[i].image.data;
}

/* Writes len tokens at (row, col) as the row's segment-th record; packed: its first label becomes -100
 * (see loader.h). */
static void place(tk_loader_batch *b, size_t row, size_t col, const int32_t *ids, const int32_t *labels,
                  const uint8_t *kinds, size_t len, int32_t segment, int packed) {
    size_t T = b->text.T, at = row * T + col;
    for (size_t t = 0; t < len; t++) {
        b->text.input_ids[at + t] = ids[t];
        b->text.labels[at + t] = labels[t];
        b->text.attention_mask[at + t] = 1;
        b->kinds[at + t] = kinds[t];
        b->position_ids[at + t] = (int32_t)t;
        b->segment_ids[at + t] = segment;
    }
    if (packed) b->text.labels[at] = TK_SHARD_LABEL_IGNORE;
}

/* One batch from *cur_io into b; advances *cur_io only on success. */
static int produce(tk_loader *L, tk_loader_cursor *cur_io, tk_loader_batch *b, tk_err *err) {
    tk_loader_cursor cur = *cur_io;
    size_t B = L->o.batch_size, maxT = L->o.max_len;
    b->n_samples = 0;
    b->n_images = 0;
    b->arena_len = 0;
    tk_shard_record rec;
    if (!L->o.pack) {
        /* Stage every record's (truncated) tokens, then lay the rows out at the longest. */
        size_t used = 0, T = 0;
        for (size_t i = 0; i < B; i++) {
            size_t s;
            uint64_t r, e;
            if (draw(L, &cur, &s, &r, &e, err) != 0 || fetch(L, s, r, &rec, err) != 0) return -1;
            size_t len = rec.n_tokens < maxT ? rec.n_tokens : maxT;
            if (grow((void **)&L->st_ids, &L->st_ids_cap, used + len, sizeof(int32_t)) != 0 ||
                grow((void **)&L->st_labels, &L->st_labels_cap, used + len, sizeof(int32_t)) != 0 ||
                grow((void **)&L->st_kinds, &L->st_kinds_cap, used + len, 1) != 0)
                return tk_fail(err, "loader: out of memory staging %zu tokens", used + len);
            memcpy(L->st_ids + used, rec.input_ids, len * sizeof(int32_t));
            memcpy(L->st_labels + used, rec.labels, len * sizeof(int32_t));
            memcpy(L->st_kinds + used, rec.kinds, len);
            tk_loader_sample smp = {(uint32_t)s, r, e, (uint32_t)i, 0, (uint32_t)len, (uint32_t)(rec.n_tokens - len)};
            if (batch_add_sample(b, &smp, &rec, err) != 0) return -1;
            used += len;
            if (len > T) T = len;
        }
        if (batch_shape(b, B, T, err) != 0) return -1;
        size_t at = 0;
        for (size_t i = 0; i < B; i++) {
            size_t len = b->samples[i].len;
            place(b, i, 0, L->st_ids + at, L->st_labels + at, L->st_kinds + at, len, 1, 0);
            at += len;
        }
    } else {
        if (batch_shape(b, B, maxT, err) != 0) return -1;
        size_t row = 0, col = 0;
        int32_t segment = 0;
        while (row < B) {
            tk_loader_cursor peek = cur;
            size_t s;
            uint64_t r, e;
            if (draw(L, &peek, &s, &r, &e, err) != 0 || fetch(L, s, r, &rec, err) != 0) return -1;
            size_t len = rec.n_tokens < maxT ? rec.n_tokens : maxT;
            if (col + len > maxT) {
                row++;
                col = 0;
                segment = 0;
                if (row == B) break; /* this sample starts the next batch */
            }
            cur = peek;
            tk_loader_sample smp = {(uint32_t)s, r, e, (uint32_t)row, (uint32_t)col, (uint32_t)len,
                                    (uint32_t)(rec.n_tokens - len)};
            if (batch_add_sample(b, &smp, &rec, err) != 0) return -1;
            place(b, row, col, rec.input_ids, rec.labels, rec.kinds, len, ++segment, 1);
            col += len;
            if (col == maxT) {
                row++;
                col = 0;
                segment = 0;
            }
        }
    }
    images_fix(b);
    cur.batches++;
    b->cursor = cur;
    *cur_io = cur;
    return 0;
}

/* ---- prefetch thread ---- */

static void *producer_main(void *arg) {
    tk_loader *L = arg;
    pthread_mutex_lock(&L->mu);
    while (!L->stop) {
        if (L->qcount == L->qcap) {
            pthread_cond_wait(&L->can_put, &L->mu);
            continue;
        }
        queue_slot *slot = &L->q[(L->qhead + L->qcount) % L->qcap];
        pthread_mutex_unlock(&L->mu);
        slot->err.msg[0] = 0;
        slot->rc = produce(L, &L->produced, &slot->b, &slot->err);
        pthread_mutex_lock(&L->mu);
        L->qcount++;
        pthread_cond_signal(&L->can_take);
        if (slot->rc != 0) break; /* the error stays at the head of what is left */
    }
    pthread_mutex_unlock(&L->mu);
    return NULL;
}

static void producer_stop(tk_loader *L) {
    if (!L->running) return;
    pthread_mutex_lock(&L->mu);
    L->stop = 1;
    pthread_cond_broadcast(&L->can_put);
    pthread_mutex_unlock(&L->mu);
    pthread_join(L->thread, NULL);
    L->running = 0;
}

static int producer_start(tk_loader *L, tk_err *err) {
    if (L->o.prefetch == 0) return 0;
    L->stop = 0;
    L->qhead = 0;
    L->qcount = 0;
    int rc = pthread_create(&L->thread, NULL, producer_main, L);
    if (rc != 0) return tk_fail(err, "loader: cannot start the prefetch thread: %s", strerror(rc));
    L->running = 1;
    return 0;
}

/* ---- open, next, free ---- */

void tk_loader_free(tk_loader *L) {
    if (L == NULL) return;
    producer_stop(L);
    for (size_t i = 0; i < L->qcap; i++) tk_loader_batch_free(&L->q[i].b);
    free(L->q);
    for (size_t s = 0; s < L->n_src; s++) {
        source_state *src = &L->src[s];
        for (size_t k = 0; k < src->n_paths; k++) tk_shard_reader_free(src->readers[k]);
        free(src->readers);
        free(src->starts);
        tk_free(src->perm);
    }
    tk_free(L->st_ids);
    tk_free(L->st_labels);
    tk_free(L->st_kinds);
    pthread_mutex_destroy(&L->mu);
    pthread_cond_destroy(&L->can_put);
    pthread_cond_destroy(&L->can_take);
    free(L);
}

static uint64_t fnv(uint64_t h, uint64_t v) {
    for (int i = 0; i < 8; i++) {
        h ^= (v >> (8 * i)) & 0xff;
        h *= 0x100000001B3ull;
    }
    return h;
}

/* Frames reader r keeps: cache_bytes worth of its average frame, at least the shuffle window, at
 * least 1, at most all of them. */
static size_t cache_frames(const tk_shard_reader *r, const tk_loader_opts *o) {
    tk_shard_stats st;
    tk_shard_reader_stats(r, &st);
    uint64_t n = 1;
    if (st.frames > 0 && st.raw_bytes > 0) {
        uint64_t avg = st.raw_bytes / st.frames + 1;
        n = o->cache_bytes / avg;
    }
    if (o->shuffle && o->shuffle_window > n) n = o->shuffle_window;
    if (n > st.frames) n = st.frames;
    return n < 1 ? 1 : (size_t)n;
}

static void cursor_start(const tk_loader *L, tk_loader_cursor *c) {
    memset(c, 0, sizeof *c);
    c->fingerprint = L->fingerprint;
    c->rng = mix64(L->o.seed ^ 0x4D4958ull); /* "MIX" */
    c->n_sources = (uint32_t)L->n_src;
}

tk_loader *tk_loader_open(const tk_loader_source *sources, size_t n_sources, const tk_loader_opts *opts,
                          tk_err *err) {
    TK_ASSERT(opts != NULL);
    if (n_sources == 0 || n_sources > TK_LOADER_MAX_SOURCES || sources == NULL) {
        tk_fail(err, "loader: %zu sources (expected 1..%d)", n_sources, TK_LOADER_MAX_SOURCES);
        return NULL;
    }
    const tk_loader_opts *o = opts;
    if (o->batch_size == 0 || o->batch_size > UINT32_MAX || o->max_len == 0 || o->max_len > INT32_MAX) {
        tk_fail(err, "loader: batch size %zu, max length %zu (expected 1..%u and 1..%d)", o->batch_size, o->max_len,
                UINT32_MAX, INT32_MAX);
        return NULL;
    }
    if (o->prefetch > TK_LOADER_MAX_PREFETCH || o->vocab_size > (uint32_t)INT32_MAX || (o->pack != 0 && o->pack != 1) ||
        (o->shuffle != 0 && o->shuffle != 1)) {
        tk_fail(err, "loader: prefetch %zu, vocab %u, pack %d, shuffle %d (expected <= %d, <= %d, 0/1, 0/1)", o->prefetch,
                o->vocab_size, o->pack, o->shuffle, TK_LOADER_MAX_PREFETCH, INT32_MAX);
        return NULL;
    }
    tk_loader *L = calloc(1, sizeof *L);
    if (L == NULL) {
        tk_fail(err, "loader: out of memory");
        return NULL;
    }
    L->o = *o;
    pthread_mutex_init(&L->mu, NULL);
    pthread_cond_init(&L->can_put, NULL);
    pthread_cond_init(&L->can_take, NULL);
    double wsum = 0;
    uint64_t h = 0xCBF29CE484222325ull;
    h = fnv(h, 0x314441304B54ull); /* format of the order: version 1 */
    h = fnv(h, o->seed);
    h = fnv(h, (uint64_t)o->shuffle);
    h = fnv(h, (uint64_t)o->shuffle_window);
    h = fnv(h, n_sources);
    for (size_t s = 0; s < n_sources; s++) {
        const tk_loader_source *in = &sources[s];
        source_state *src = &L->src[s];
        L->n_src = s + 1; /* so that free releases what is opened */
        if (!(in->weight > 0) || !isfinite(in->weight) || in->n_paths == 0 || in->paths == NULL) {
            tk_fail(err, "loader: source %zu: weight %g with %zu shards (expected a finite weight > 0 and shards)", s,
                    in->weight, in->n_paths);
            tk_loader_free(L);
            return NULL;
        }
        src->readers = calloc(in->n_paths, sizeof *src->readers);
        src->starts = calloc(in->n_paths + 1, sizeof *src->starts);
        if (src->readers == NULL || src->starts == NULL) {
            tk_fail(err, "loader: out of memory");
            tk_loader_free(L);
            return NULL;
        }
        src->weight = in->weight;
        uint64_t wbits;
        memcpy(&wbits, &in->weight, sizeof wbits);
        h = fnv(h, wbits);
        h = fnv(h, in->n_paths);
        for (size_t k = 0; k < in->n_paths; k++) {
            tk_shard_reader *r = tk_shard_reader_open(in->paths[k], err);
            if (r == NULL) {
                tk_loader_free(L);
                return NULL;
            }
            src->readers[k] = r;
            src->n_paths = k + 1;
            if (tk_shard_reader_set_cache(r, cache_frames(r, o), err) != 0) {
                tk_loader_free(L);
                return NULL;
            }
            uint32_t sv = tk_shard_reader_vocab_size(r);
            if (o->vocab_size > 0 && sv > o->vocab_size) {
                tk_fail(err, "%s: tokenized for a vocabulary of %u (expected at most the model's %u)", in->paths[k], sv,
                        o->vocab_size);
                tk_loader_free(L);
                return NULL;
            }
            src->starts[k + 1] = src->starts[k] + tk_shard_reader_count(r);
            h = fnv(h, tk_shard_reader_count(r));
            h = fnv(h, tk_shard_reader_frame_count(r));
        }
        src->records = src->starts[in->n_paths];
        if (src->records == 0) {
            tk_fail(err, "%s: source %zu has no records (expected at least 1)", in->paths[0], s);
            tk_loader_free(L);
            return NULL;
        }
        L->epoch_len += src->records;
        wsum += in->weight;
    }
    double acc = 0;
    for (size_t s = 0; s < n_sources; s++) {
        acc += L->src[s].weight;
        L->cum[s] = acc / wsum;
    }
    L->cum[n_sources - 1] = 1.0;
    L->fingerprint = h;
    cursor_start(L, &L->consumed);
    L->produced = L->consumed;
    if (o->prefetch > 0) {
        L->q = calloc(o->prefetch, sizeof *L->q);
        if (L->q == NULL) {
            tk_fail(err, "loader: out of memory");
            tk_loader_free(L);
            return NULL;
        }
        L->qcap = o->prefetch;
    }
    if (producer_start(L, err) != 0) {
        tk_loader_free(L);
        return NULL;
    }
    return L;
}

static void batch_swap(tk_loader_batch *a, tk_loader_batch *b) {
    tk_loader_batch t = *a;
    *a = *b;
    *b = t;
}

int tk_loader_next(tk_loader *L, tk_loader_batch *b, tk_err *err) {
    TK_ASSERT(L != NULL && b != NULL);
    if (!L->running) {
        if (produce(L, &L->produced, b, err) != 0) return -1;
        L->consumed = b->cursor;
        return 0;
    }
    pthread_mutex_lock(&L->mu);
    while (L->qcount == 0) pthread_cond_wait(&L->can_take, &L->mu);
    queue_slot *slot = &L->q[L->qhead];
    if (slot->rc != 0) {
        tk_fail(err, "%s", slot->err.msg);
        pthread_mutex_unlock(&L->mu);
        return -1;
    }
    batch_swap(&slot->b, b);
    L->qhead = (L->qhead + 1) % L->qcap;
    L->qcount--;
    pthread_cond_signal(&L->can_put);
    pthread_mutex_unlock(&L->mu);
    L->consumed = b->cursor;
    return 0;
}

uint64_t tk_loader_source_records(const tk_loader *L, size_t s) {
    TK_ASSERT(L != NULL && s < L->n_src);
    return L->src[s].records;
}

uint64_t tk_loader_epoch_samples(const tk_loader *L) { return L->epoch_len; }

void tk_loader_get_cursor(const tk_loader *L, tk_loader_cursor *out) {
    TK_ASSERT(L != NULL && out != NULL);
    *out = L->consumed;
}

int tk_loader_set_cursor(tk_loader *L, const tk_loader_cursor *c, tk_err *err) {
    TK_ASSERT(L != NULL && c != NULL);
    if (c->fingerprint != L->fingerprint || c->n_sources != L->n_src)
        return tk_fail(err, "loader: the cursor belongs to another data mix (fingerprint %016llx with %u sources, "
                            "expected %016llx with %zu: same shards, weights, seed and shuffle options)",
                       ULL(c->fingerprint), c->n_sources, ULL(L->fingerprint), L->n_src);
    if (c->position >= L->epoch_len || c->samples / L->epoch_len != c->epoch || c->samples % L->epoch_len != c->position)
        return tk_fail(err, "loader: cursor at epoch %llu position %llu after %llu samples (expected samples = epoch x %llu + position)",
                       ULL(c->epoch), ULL(c->position), ULL(c->samples), ULL(L->epoch_len));
    for (size_t s = 0; s < L->n_src; s++) {
        if (c->source[s].position >= L->src[s].records)
            return tk_fail(err, "loader: cursor source %zu at position %llu (expected < %llu records)", s,
                           ULL(c->source[s].position), ULL(L->src[s].records));
    }
    producer_stop(L);
    L->consumed = *c;
    for (size_t s = L->n_src; s < TK_LOADER_MAX_SOURCES; s++) L->consumed.source[s] = (tk_loader_source_pos){0, 0};
    L->produced = L->consumed;
    return producer_start(L, err);
}

/* ---- cursor files ---- */

#define CURSOR_FORMAT "tspeft-loader-cursor"
#define MAX_EXACT 9007199254740992.0 /* 2^53: larger counts do not survive a JSON number */

static int add_hex(cJSON *o, const char *key, uint64_t v) {
    char buf[24];
    snprintf(buf, sizeof buf, "%016llx", ULL(v));
    return cJSON_AddStringToObject(o, key, buf) != NULL;
}

static int add_count(cJSON *o, const char *key, uint64_t v) {
    return (double)v < MAX_EXACT && cJSON_AddNumberToObject(o, key, (double)v) != NULL;
}

char *tk_loader_cursor_to_json(const tk_loader_cursor *c, tk_err *err) {
    TK_ASSERT(c != NULL);
    if (c->n_sources == 0 || c->n_sources > TK_LOADER_MAX_SOURCES) {
        tk_fail(err, "loader cursor: %u sources (expected 1..%d)", c->n_sources, TK_LOADER_MAX_SOURCES);
        return NULL;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = NULL;
    int ok = o != NULL && cJSON_AddStringToObject(o, "format", CURSOR_FORMAT) && cJSON_AddNumberToObject(o, "version", 1) &&
             add_hex(o, "fingerprint", c->fingerprint) && add_count(o, "epoch", c->epoch) &&
             add_count(o, "position", c->position) && add_count(o, "samples", c->samples) &&
             add_count(o, "batches", c->batches) && add_hex(o, "rng", c->rng) &&
             (arr = cJSON_AddArrayToObject(o, "sources")) != NULL;
    for (uint32_t s = 0; ok && s < c->n_sources; s++) {
        cJSON *e = cJSON_CreateObject();
        ok = e != NULL && cJSON_AddItemToArray(arr, e) && add_count(e, "epoch", c->source[s].epoch) &&
             add_count(e, "position", c->source[s].position);
    }
    char *text = ok ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (text == NULL) tk_fail(err, "loader cursor: cannot encode (out of memory or a count above 2^53)");
    return text;
}

static int get_count(const cJSON *o, const char *key, uint64_t *out, const char *what, tk_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble >= MAX_EXACT ||
        v->valuedouble != floor(v->valuedouble))
        return tk_fail(err, "%s: \"%s\" is missing or not a count (expected an integer in [0, 2^53))", what, key);
    *out = (uint64_t)v->valuedouble;
    return 0;
}

static int get_hex(const cJSON *o, const char *key, uint64_t *out, const char *what, tk_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    const char *s = cJSON_IsString(v) ? v->valuestring : NULL;
    if (s == NULL || strlen(s) != 16 || strspn(s, "0123456789abcdef") != 16)
        return tk_fail(err, "%s: \"%s\" is missing or malformed (expected 16 lowercase hex digits)", what, key);
    *out = strtoull(s, NULL, 16);
    return 0;
}

int tk_loader_cursor_from_json(tk_loader_cursor *c, const char *text, size_t len, const char *what, tk_err *err) {
    TK_ASSERT(c != NULL && text != NULL && what != NULL);
    tk_loader_cursor out = {0};
    cJSON *o = cJSON_ParseWithLength(text, len);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return tk_fail(err, "%s: not a JSON object (expected a loader cursor)", what);
    }
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(o, "format");
    const cJSON *ver = cJSON_GetObjectItemCaseSensitive(o, "version");
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(o, "sources");
    int rc = 0;
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, CURSOR_FORMAT) != 0 || !cJSON_IsNumber(ver) ||
        ver->valuedouble != 1) {
        rc = tk_fail(err, "%s: not a version 1 loader cursor (expected \"format\": \"%s\", \"version\": 1)", what,
                     CURSOR_FORMAT);
    } else if (get_hex(o, "fingerprint", &out.fingerprint, what, err) || get_count(o, "epoch", &out.epoch, what, err) ||
               get_count(o, "position", &out.position, what, err) || get_count(o, "samples", &out.samples, what, err) ||
               get_count(o, "batches", &out.batches, what, err) || get_hex(o, "rng", &out.rng, what, err)) {
        rc = -1;
    } else if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) < 1 || cJSON_GetArraySize(arr) > TK_LOADER_MAX_SOURCES) {
        rc = tk_fail(err, "%s: \"sources\" must be an array of 1..%d entries", what, TK_LOADER_MAX_SOURCES);
    } else {
        const cJSON *e;
        cJSON_ArrayForEach(e, arr) {
            if (!cJSON_IsObject(e) || get_count(e, "epoch", &out.source[out.n_sources].epoch, what, err) ||
                get_count(e, "position", &out.source[out.n_sources].position, what, err)) {
                if (!cJSON_IsObject(e)) tk_fail(err, "%s: sources[%u] is not an object", what, out.n_sources);
                rc = -1;
                break;
            }
            out.n_sources++;
        }
    }
    cJSON_Delete(o);
    if (rc == 0) *c = out;
    return rc;
}

int tk_loader_cursor_save(const tk_loader_cursor *c, const char *path, tk_err *err) {
    char *text = tk_loader_cursor_to_json(c, err);
    if (text == NULL) return -1;
    int rc = tk_write_file_atomic(path, text, strlen(text), err);
    free(text);
    return rc;
}

int tk_loader_cursor_load(tk_loader_cursor *c, const char *path, tk_err *err) {
    size_t len;
    char *text = tk_read_file(path, &len, err);
    if (text == NULL) return -1;
    int rc = tk_loader_cursor_from_json(c, text, len, path, err);
    free(text);
    return rc;
}
