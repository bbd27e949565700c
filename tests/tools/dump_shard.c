/* dump_shard.c: prints every record of a shard as one JSON line (input_ids, labels, kinds, meta as
 * parsed JSON or null, images: kind and byte count) for the e2e tests, which have no Python shard
 * reader. Found beside tspeft as tests/dump_shard.
 *
 *   dump_shard FILE.shard > records.jsonl        exit 1 with one line on a bad shard
 */
#include "datasets/shard.h"

#include <stdio.h>

static void ints(const char *key, const int32_t *v, size_t n) {
    printf("\"%s\": [", key);
    for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", (int)v[i]);
    printf("]");
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: dump_shard FILE.shard\n");
        return 2;
    }
    tk_err err = {0};
    tk_shard_reader *r = tk_shard_reader_open(argv[1], &err);
    if (!r) {
        fprintf(stderr, "dump_shard: %s\n", err.msg);
        return 1;
    }
    uint64_t n = tk_shard_reader_count(r);
    for (uint64_t i = 0; i < n; i++) {
        tk_shard_record rec;
        if (tk_shard_reader_get(r, i, &rec, &err)) {
            fprintf(stderr, "dump_shard: %s\n", err.msg);
            tk_shard_reader_free(r);
            return 1;
        }
        printf("{");
        ints("input_ids", rec.input_ids, rec.n_tokens);
        printf(", ");
        ints("labels", rec.labels, rec.n_tokens);
        printf(", \"kinds\": [");
        for (size_t t = 0; t < rec.n_tokens; t++) printf(t ? ", %u" : "%u", (unsigned)rec.kinds[t]);
        printf("], \"meta\": %.*s, \"images\": [", rec.meta_len ? (int)rec.meta_len : 4, rec.meta_len ? rec.meta : "null");
        for (size_t k = 0; k < rec.n_images; k++)
            printf(k ? ", [%u, %llu]" : "[%u, %llu]", (unsigned)rec.images[k].kind, (unsigned long long)rec.images[k].nbytes);
        printf("]}\n");
    }
    tk_shard_reader_free(r);
    return 0;
}
