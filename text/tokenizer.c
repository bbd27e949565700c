/* tokenizer.c: the growable id buffer of text/tokenizer.h (the sentencepiece calls are in sp_shim.cc). */
#include "tokenizer.h"

#include <stdlib.h>
#include <string.h>

int tk_ids_reserve(tk_ids *ids, size_t extra, tk_err *err) {
    if (!ids) return tk_fail(err, "tk_ids_reserve: NULL buffer");
    if (extra > SIZE_MAX - ids->n) return tk_fail(err, "token buffer: %zu + %zu ids overflow", ids->n, extra);
    size_t need = ids->n + extra;
    if (need <= ids->cap && ids->ids && ids->begin && ids->end) return 0;
    size_t cap = ids->cap > 16 ? ids->cap : 16;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    size_t b32;
    if (tk_mul_size(cap, sizeof(int32_t), &b32) != 0)
        return tk_fail(err, "token buffer: %zu ids do not fit in memory", cap);
    /* Each array is replaced as soon as it grows; cap changes only when all three did, so a failure
     * leaves a consistent (if partly larger) buffer. */
    int32_t *a = realloc(ids->ids, b32);
    if (!a) return tk_fail(err, "token buffer: out of memory for %zu ids", cap);
    ids->ids = a;
    uint32_t *b = realloc(ids->begin, b32);
    if (!b) return tk_fail(err, "token buffer: out of memory for %zu ids", cap);
    ids->begin = b;
    uint32_t *e = realloc(ids->end, b32);
    if (!e) return tk_fail(err, "token buffer: out of memory for %zu ids", cap);
    ids->end = e;
    ids->cap = cap;
    return 0;
}

void tk_ids_free(tk_ids *ids) {
    if (!ids) return;
    free(ids->ids);
    free(ids->begin);
    free(ids->end);
    memset(ids, 0, sizeof *ids);
}
