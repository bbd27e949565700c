/* fuzz_common.h: what every fuzz target shares.
 *
 * Each tests/fuzz/fuzz_<target>.c defines tkf_target(): it writes the fuzzer's bytes where one
 * parser expects a file (a temporary file, or one file of a temporary directory whose other files
 * are a fixed, valid tiny model or adapter), calls the parser and returns its status. fuzz_common.c
 * turns that into LLVMFuzzerTestOneInput (libFuzzer), and replay_main.c runs it over a corpus
 * directory for ctest, checking each file's outcome against its name:
 *
 *   ok_*    must be accepted (status 0)
 *   any_*   may go either way (bit flips whose outcome the generator cannot know; inputs a parser
 *           accepts leniently today)
 *   other   must be rejected: status -1 and a one-line, non-empty message naming a file
 *
 *   int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
 *       tkf_write(tkf_path("model.safetensors"), data, size);
 *       tk_st_file *f = tk_st_open(tkf_path("model.safetensors"), err);
 *       ...
 *   }
 *
 * The fixture (tests/fuzz/make_corpus.py writes seeds for exactly this shape):
 *   tiny LLaMA: hidden 4, intermediate 6, 2 layers, 2 heads, 1 kv head (head dim 2), vocab 8,
 *   untied, F32 weights (tkf_tiny_model);
 *   adapter: DoRA r=2 on q_proj, v_proj, down_proj of every layer, modules_to_save
 *   [model.norm.weight], ts_peft with target_keep 0.5 (tkf_tiny_adapter_config), and its tensors
 *   including ts_tau and ts_lambda (tkf_tiny_adapter_tensors).
 *
 * Harness failures (a temporary file that cannot be written) abort: they are not parser results.
 * Every file lives under one mkdtemp directory per process, removed at exit.
 */
#ifndef TK_FUZZ_COMMON_H
#define TK_FUZZ_COMMON_H

#include "common.h"

#include <stddef.h>
#include <stdint.h>

/* Defined by each fuzz_<target>.c: 0 when the parser accepted the input, -1 (err set) when not. */
int tkf_target(const uint8_t *data, size_t size, tk_err *err);

/* The per-process temporary directory (created on first use). */
const char *tkf_root(void);
/* tkf_root()/rel in a static buffer (one of a few rotating buffers: at most 4 live at a time). */
const char *tkf_path(const char *rel);
/* Creates tkf_root()/rel as a directory (parents must exist); no error if it exists. */
const char *tkf_mkdir(const char *rel);
/* Writes n bytes to path (truncating); aborts on failure. */
void tkf_write(const char *path, const void *data, size_t n);
void tkf_write_str(const char *path, const char *text);

/* Fixture pieces, written into dir (which must exist). */
void tkf_tiny_config(const char *dir);          /* dir/config.json */
void tkf_tiny_weights(const char *dir);         /* dir/model.safetensors */
void tkf_tiny_model(const char *dir);           /* both */
void tkf_tiny_adapter_config(const char *dir);  /* dir/adapter_config.json */
void tkf_tiny_adapter_tensors(const char *dir); /* dir/adapter_model.safetensors */

/* Aborts with a message when cond is false: an invariant the parser promised was broken (the
 * fuzzer reports the abort as a crash). */
#define TKF_REQUIRE(cond)                                                                          \
    do {                                                                                           \
        if (!(cond)) tkf_broken(#cond, __FILE__, __LINE__);                                        \
    } while (0)
void tkf_broken(const char *cond, const char *file, int line) __attribute__((noreturn));

#endif
