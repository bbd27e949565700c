/* fuzz_tokenizer.c: tk_tok_open on an arbitrary tokenizer.model (a serialized sentencepiece
 * ModelProto, text/tokenizer.h); when it loads: the special ids, piece <-> id and is_control for
 * every id (the first 4096), encoding a fixed text (ASCII, accents, CJK, emoji, tab, newline, digits,
 * invalid UTF-8) with BOS/EOS where the model has them and the empty text, decoding the result and
 * every id at once, and decoding an id past the vocabulary (must fail with a message).
 *
 * A model that loads but cannot encode or decode is a rejection (status -1, the shim's message names
 * the model file). libsentencepiece (and protobuf-lite inside it) is Debian's C++ build, not
 * instrumented: the fuzzer gets coverage feedback from the shim (text/sp_shim.cc) only, and ASan sees
 * the library's memory errors only when they touch the shim's allocations or crash outright.
 */
#include "fuzz_common.h"
#include "text/tokenizer.h"

#include <stdlib.h>
#include <string.h>

static const char TEXT[] = "Hello w\xc3\xb6rld, caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80\n"
                           "\t  numbers 12345 \xff\xfe (invalid) end  ";

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *path = tkf_path("tokenizer.model");
    tkf_write(path, data, size);
    tk_tokenizer *tok = tk_tok_open(path, err);
    if (!tok) return -1;
    int32_t V = tk_tok_vocab_size(tok);
    TKF_REQUIRE(V >= 1);
    int32_t specials[4] = {tk_tok_bos_id(tok), tk_tok_eos_id(tok), tk_tok_pad_id(tok), tk_tok_unk_id(tok)};
    for (int i = 0; i < 4; i++) TKF_REQUIRE(specials[i] >= -1 && specials[i] < V);
    int32_t n_check = V < 4096 ? V : 4096;
    for (int32_t id = 0; id < n_check; id++) {
        const char *p = tk_tok_id_to_piece(tok, id);
        TKF_REQUIRE(p != NULL);
        int32_t back = tk_tok_piece_to_id(tok, p, strlen(p));
        TKF_REQUIRE(back >= -1 && back < V);
        TKF_REQUIRE(tk_tok_is_control(tok, id) == 0 || tk_tok_is_control(tok, id) == 1);
    }
    TKF_REQUIRE(tk_tok_id_to_piece(tok, V) == NULL && tk_tok_id_to_piece(tok, -1) == NULL);

    int rc = 0;
    tk_ids ids = {0};
    int bos = specials[0] >= 0, eos = specials[1] >= 0;
    size_t len = sizeof TEXT - 1;
    if (tk_tok_encode(tok, TEXT, len, bos, eos, &ids, err) != 0) {
        rc = -1;
    } else {
        TKF_REQUIRE(ids.n >= (size_t)(bos + eos));
        for (size_t i = 0; i < ids.n; i++) {
            TKF_REQUIRE(ids.ids[i] >= 0 && ids.ids[i] < V);
            TKF_REQUIRE(ids.begin[i] <= ids.end[i] && ids.end[i] <= len);
        }
        size_t n_text = ids.n;
        if (tk_tok_encode(tok, "", 0, 0, 0, &ids, err) != 0) {
            rc = -1;
        } else {
            TKF_REQUIRE(ids.n == n_text); /* the empty text adds no ids */
        }
        size_t out_len = 0;
        char *s = rc == 0 ? tk_tok_decode(tok, ids.ids, ids.n, &out_len, err) : NULL;
        if (rc == 0 && !s) rc = -1;
        if (s) TKF_REQUIRE(s[out_len] == '\0' && strlen(s) <= out_len);
        free(s);
    }
    if (rc == 0) {
        int32_t *all = malloc((size_t)n_check * sizeof *all);
        TKF_REQUIRE(all != NULL);
        for (int32_t i = 0; i < n_check; i++) all[i] = i;
        size_t out_len = 0;
        char *s = tk_tok_decode(tok, all, (size_t)n_check, &out_len, err);
        if (!s) rc = -1;
        free(s);
        free(all);
    }
    if (rc == 0) {
        tk_err derr = {0};
        int32_t bad[2] = {0, V};
        char *s = tk_tok_decode(tok, bad, 2, NULL, &derr);
        TKF_REQUIRE(s == NULL && derr.msg[0] != '\0' && strstr(derr.msg, path) != NULL);
    }
    tk_ids_free(&ids);
    tk_tok_free(tok);
    return rc;
}
