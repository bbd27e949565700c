/* tokenizer.h: sentencepiece tokenizers (a LLaMA tokenizer.model) from C.
 *
 *   tk_err err = {0};
 *   tk_tokenizer *tok = tk_tok_open("tokenizer.model", &err);
 *   if (!tok) { fprintf(stderr, "tspeft: %s\n", err.msg); return 1; }
 *   tk_ids ids = {0};
 *   if (tk_tok_encode(tok, text, strlen(text), 1, 0, &ids, &err) != 0) ...  // appends BOS + text
 *   char *back = tk_tok_decode(tok, ids.ids, ids.n, NULL, &err);          // caller free()s
 *   free(back);
 *   tk_ids_free(&ids);
 *   tk_tok_free(tok);
 *
 * A thin extern "C" layer over Debian's libsentencepiece (text/sp_shim.cc, the only C++ in tspeft):
 * the library does every step, so ids equal Python sentencepiece's `sp.encode(text)` on the same
 * model (with [bos] / [eos] around when asked), for any UTF-8 text: whitespace runs, leading and
 * trailing spaces, newlines, CJK, emoji, combining accents, and the empty string (no ids). Decoding
 * equals `sp.decode(ids)`. Tests: tests/test_text_tokenizer.c, tests/e2e/test_tokenizer_golden.py.
 *
 * What a model does to text is fixed by the model file, not here: its normalizer (LLaMA: identity;
 * spm_train's default: nmt_nfkc, which also folds runs of spaces and strips leading/trailing ones),
 * the dummy-prefix space sentencepiece puts before the text at the start of EVERY encode call
 * (add_dummy_prefix), byte fallback for characters outside the vocabulary (else they become unk).
 * Because of the dummy prefix and the whitespace folding, encoding two strings separately and
 * concatenating the ids is generally NOT the encoding of the joined string: text/template.h
 * encodes a whole run of text at once and uses the offsets below to attribute tokens.
 *
 * Ownership: tk_tok_open returns a tokenizer the caller frees with tk_tok_free (NULL is fine).
 * tk_ids buffers grow as needed and belong to the caller (tk_ids_free). tk_tok_decode returns a
 * malloc'd string the caller free()s. tk_tok_id_to_piece returns a string owned by the tokenizer.
 * Failure: NULL / -1 with one line in err naming the model file and what was wrong; no C++
 * exception ever crosses into C. Threads: a tokenizer is read-only after open; encode and decode
 * may run on several threads at once.
 */
#ifndef TK_TEXT_TOKENIZER_H
#define TK_TEXT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../src/common.h"

typedef struct tk_tokenizer tk_tokenizer;

/* A growable id buffer. Encoders APPEND to it (set n = 0 to reuse it). Beside every id, the bytes
 * of the encoded text it came from: [begin[i], end[i]), offsets into the text passed to the call
 * that appended it. Sentencepiece reports these: the dummy-prefix piece and all but the last byte
 * piece of a byte-fallback character have begin == end; BOS is [0, 0) and EOS [len, len). */
typedef struct {
    int32_t *ids;    /* (cap) token ids, the first n valid */
    uint32_t *begin; /* (cap) source byte offsets, see above */
    uint32_t *end;   /* (cap) */
    size_t n;
    size_t cap;
} tk_ids;

/* Makes room for at least `extra` more ids (doubling). -1 with err on overflow or out of memory. */
int tk_ids_reserve(tk_ids *ids, size_t extra, tk_err *err);
/* Frees the arrays and zeroes *ids; NULL or an empty buffer is fine. */
void tk_ids_free(tk_ids *ids);

/* Loads a sentencepiece model file (tokenizer.model). Besides sentencepiece's own checks, the file
 * must be a complete ModelProto (pieces, trainer_spec, normalizer_spec): a truncated model is
 * refused even where protobuf would accept the prefix. Errors: "PATH: cannot open: ...",
 * "PATH: not a sentencepiece model: truncated or corrupt at byte N (...)", "PATH: cannot load
 * sentencepiece model: ...". */
tk_tokenizer *tk_tok_open(const char *path, tk_err *err);
void tk_tok_free(tk_tokenizer *tok);

/* The path the tokenizer was opened from (for messages); owned by the tokenizer. */
const char *tk_tok_path(const tk_tokenizer *tok);

/* Number of pieces; ids are 0 .. vocab_size-1. */
int32_t tk_tok_vocab_size(const tk_tokenizer *tok);
/* Special ids as the model defines them; -1 when the model has none (LLaMA: unk 0, bos 1, eos 2,
 * pad -1). */
int32_t tk_tok_bos_id(const tk_tokenizer *tok);
int32_t tk_tok_eos_id(const tk_tokenizer *tok);
int32_t tk_tok_pad_id(const tk_tokenizer *tok);
int32_t tk_tok_unk_id(const tk_tokenizer *tok);

/* Id of a piece (UTF-8, len bytes; pieces spell spaces as U+2581 "▁"). As sentencepiece (and
 * Python's piece_to_id) does, a string that is not a piece gives the unk id. */
int32_t tk_tok_piece_to_id(const tk_tokenizer *tok, const char *piece, size_t len);
/* The piece of an id (NUL-terminated, owned by the tokenizer), or NULL when id is out of range. */
const char *tk_tok_id_to_piece(const tk_tokenizer *tok, int32_t id);
/* 1 when id is a control piece (<s>, </s>, ...): decoding drops it. 0 otherwise or out of range. */
int tk_tok_is_control(const tk_tokenizer *tok, int32_t id);

/* Encodes text[0..len) (UTF-8; invalid bytes become U+FFFD as sentencepiece does; NUL bytes are
 * text) and APPENDS [bos] ids [eos] with their offsets to out. add_bos / add_eos on a model without
 * that piece is an error. len must fit in 31 bits. */
int tk_tok_encode(const tk_tokenizer *tok, const char *text, size_t len, int add_bos, int add_eos,
                  tk_ids *out, tk_err *err);

/* Decodes ids[0..n) to a malloc'd NUL-terminated UTF-8 string (control ids decode to nothing);
 * *len_out (optional) gets its length (the text may contain NUL from a <0x00> byte piece). An id
 * outside [0, vocab_size) is an error naming it. The caller free()s the result. */
char *tk_tok_decode(const tk_tokenizer *tok, const int32_t *ids, size_t n, size_t *len_out, tk_err *err);

#ifdef __cplusplus
}
#endif

#endif
