/* bench_loader.c: `tspeft bench --loader SHARDS`: how fast the shard loader delivers training batches
 * (seeded shuffle, zstd decompression, right padding, prefetch on its thread), to compare with the
 * step time of the model it feeds: the loader must never be what a step waits for. */
#include "../../datasets/loader.h"
#include "cli.h"

#include <glob.h>
#include <stdio.h>
#include <string.h>

int tk_bench_loader(const char *spec, size_t B, size_t T, size_t batches, size_t prefetch, int threads, tk_err *err) {
    (void)threads;
    glob_t g;
    memset(&g, 0, sizeof g);
    if (glob(spec, 0, NULL, &g) != 0 || g.gl_pathc == 0) {
        globfree(&g);
        return tk_fail(err, "%s: no shard matches", spec);
    }
    tk_loader_source src = {(const char *const *)g.gl_pathv, g.gl_pathc, 1.0};
    tk_loader_opts o = {.batch_size = B, .max_len = T, .shuffle = 1, .seed = 1, .prefetch = prefetch,
                        .cache_bytes = (size_t)64 << 20};
    tk_loader *L = tk_loader_open(&src, 1, &o, err);
    if (!L) {
        globfree(&g);
        return -1;
    }
    tk_loader_batch b = {0};
    int rc = -1;
    double t0 = tk_time(), tokens = 0;
    size_t samples = 0;
    for (size_t i = 0; i < batches; i++) {
        if (tk_loader_next(L, &b, err)) goto done;
        samples += b.n_samples;
        for (size_t k = 0; k < b.text.B * b.text.T; k++) tokens += b.text.attention_mask[k];
    }
    double s = tk_time() - t0;
    printf("loader: %zu shard(s), %llu records; %zu batches of %zu rows (<= %zu tokens), shuffled, prefetch %zu\n",
           g.gl_pathc, (unsigned long long)tk_loader_epoch_samples(L), batches, B, T, prefetch);
    printf("  %.0f samples/s, %.0f tokens/s delivered (%.3f ms per batch)\n", samples / s, tokens / s, 1e3 * s / batches);
    rc = 0;
done:
    tk_loader_batch_free(&b);
    tk_loader_free(L);
    globfree(&g);
    return rc;
}
