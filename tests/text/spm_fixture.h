/* spm_fixture.h: small sentencepiece models trained at test time, for the text/ C tests.
 *
 *   char dir[64], model[256];
 *   if (spm_fixture_dir(dir, sizeof dir) != 0) ...                      // fresh mkdtemp directory
 *   const char *args[] = {"--model_type=bpe", "--vocab_size=400", NULL};
 *   if (spm_fixture_train(dir, "llama", args, model, sizeof model) != 0) ...   // DIR/llama.model
 *   ...
 *   spm_fixture_cleanup(dir);                                            // removes DIR and its files
 *
 * The corpus (DIR/corpus.txt) is generated deterministically: English-like word sequences, accented,
 * CJK and emoji lines, and the prompt templates' fixed text. Training runs the `spm_train` CLI
 * (Debian package sentencepiece, installed by `make deps`); a missing CLI is an error printed here,
 * not a skip, because the package is a declared dependency. Functions print what failed and return -1.
 */
#ifndef TK_TESTS_SPM_FIXTURE_H
#define TK_TESTS_SPM_FIXTURE_H

#include <stddef.h>

int spm_fixture_dir(char *dir, size_t n);
/* extra_args: NULL-terminated "--key=value" strings added after the input and prefix arguments. */
int spm_fixture_train(const char *dir, const char *name, const char *const *extra_args, char *model_path, size_t n);
void spm_fixture_cleanup(const char *dir);

/* spm_train options reproducing LLaMA's tokenizer settings (BPE, byte fallback, identity
 * normalization, no whitespace folding, whitespace-only pieces, split digits, unk 0 bos 1 eos 2,
 * no pad), NULL-terminated; the vocabulary size is given separately. */
extern const char *const SPM_FIXTURE_LLAMA_ARGS[];

#endif
