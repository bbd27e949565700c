/* test_text_tokenizer.c: the sentencepiece C API (text/tokenizer.h, text/sp_shim.cc).
 *
 * Trains two small models with spm_train into a fresh temporary directory (tests/text/spm_fixture.c):
 * "llama" (LLaMA's settings: BPE, byte fallback, identity normalization, no whitespace folding) and
 * "nfkc" (unigram with spm_train's defaults plus a pad id). Checks special ids, piece <-> id over the
 * whole vocabulary, encode (appending, BOS/EOS, empty text, growth, offsets, NUL and invalid UTF-8),
 * exact decode round trips on the identity model, decode errors, concurrent encoding, and that
 * missing, empty, truncated (at a byte and at a protobuf field boundary), garbage and directory models
 * are refused with one line naming the file. Ids against Python sentencepiece:
 * tests/e2e/test_tokenizer_golden.py. Prints each check; exits 1 if any fails.
 */
#include "common.h"
#include "tests/text/spm_fixture.h"
#include "text/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int n_fail = 0;
static int n_pass = 0;

static void check(int ok, const char *what) {
    printf("  %-78s %s\n", what, ok ? "ok" : "FAIL");
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
    }
}

static int one_line_naming(const char *msg, const char *path) {
    return msg[0] && strchr(msg, '\n') == NULL && strstr(msg, path) != NULL;
}

static void test_vocab(const tk_tokenizer *tok, const char *name, int32_t want_vocab, int32_t want_pad) {
    char what[160];
    printf("%s: vocabulary and special ids\n", name);
    int32_t V = tk_tok_vocab_size(tok);
    snprintf(what, sizeof what, "vocab size %d (asked for %d)", (int)V, (int)want_vocab);
    check(V == want_vocab, what);
    snprintf(what, sizeof what, "unk 0, bos 1, eos 2, pad %d (got %d %d %d %d)", (int)want_pad,
             (int)tk_tok_unk_id(tok), (int)tk_tok_bos_id(tok), (int)tk_tok_eos_id(tok), (int)tk_tok_pad_id(tok));
    check(tk_tok_unk_id(tok) == 0 && tk_tok_bos_id(tok) == 1 && tk_tok_eos_id(tok) == 2 &&
              tk_tok_pad_id(tok) == want_pad,
          what);
    int roundtrip = 1;
    for (int32_t id = 0; id < V; id++) {
        const char *p = tk_tok_id_to_piece(tok, id);
        if (!p || tk_tok_piece_to_id(tok, p, strlen(p)) != id) roundtrip = 0;
    }
    check(roundtrip, "piece_to_id(id_to_piece(id)) == id for every id");
    check(tk_tok_id_to_piece(tok, -1) == NULL && tk_tok_id_to_piece(tok, V) == NULL,
          "id_to_piece of -1 and vocab_size is NULL");
    check(strcmp(tk_tok_id_to_piece(tok, 1), "<s>") == 0 && strcmp(tk_tok_id_to_piece(tok, 2), "</s>") == 0,
          "id_to_piece(1) = <s>, id_to_piece(2) = </s>");
    const char *np = "definitely not a piece";
    check(tk_tok_piece_to_id(tok, np, strlen(np)) == tk_tok_unk_id(tok), "a non-piece maps to unk (as sentencepiece)");
    check(tk_tok_is_control(tok, 1) && tk_tok_is_control(tok, 2) && !tk_tok_is_control(tok, V - 1) &&
              !tk_tok_is_control(tok, V),
          "BOS/EOS are control pieces, the last piece and out-of-range ids are not");
}

/* Tokens with a non-empty source must tile the text left to right (identity normalization). */
static int offsets_tile(const tk_ids *ids, size_t from, size_t len) {
    size_t cursor = 0;
    for (size_t i = from; i < ids->n; i++) {
        if (ids->begin[i] > ids->end[i] || ids->end[i] > len) return 0;
        if (ids->begin[i] == ids->end[i]) continue;
        if (ids->begin[i] != cursor) return 0;
        cursor = ids->end[i];
    }
    return cursor == len;
}

static void test_encode_llama(const tk_tokenizer *tok) {
    tk_err err = {0};
    tk_ids ids = {0};
    char what[200];
    printf("llama: encode and decode\n");

    check(tk_tok_encode(tok, "", 0, 0, 0, &ids, &err) == 0 && ids.n == 0, "empty text: no ids");
    check(tk_tok_encode(tok, NULL, 0, 1, 1, &ids, &err) == 0 && ids.n == 2 && ids.ids[0] == 1 && ids.ids[1] == 2 &&
              ids.begin[0] == 0 && ids.end[1] == 0,
          "empty text with BOS and EOS: [1, 2], offsets [0,0)");
    ids.n = 0;

    const char *hello = "Hello world";
    check(tk_tok_encode(tok, hello, strlen(hello), 1, 0, &ids, &err) == 0 && ids.n >= 3 && ids.ids[0] == 1,
          "'Hello world' with BOS starts with 1");
    size_t first = ids.n;
    check(tk_tok_encode(tok, hello, strlen(hello), 0, 1, &ids, &err) == 0 && ids.n == 2 * first &&
              memcmp(ids.ids + 1, ids.ids + first, (first - 1) * sizeof(int32_t)) == 0 && ids.ids[ids.n - 1] == 2,
          "a second encode appends (same ids, then EOS)");
    const char *p = tk_tok_id_to_piece(tok, ids.ids[1]);
    check(p && strncmp(p, "\xe2\x96\x81", 3) == 0, "the first piece carries the dummy-prefix space U+2581");
    ids.n = 0;

    /* Exact round trips: identity normalization, byte fallback, no whitespace folding. (Not for a
     * literal U+2581 in the text: sentencepiece writes spaces as U+2581, so it decodes to a space.) */
    static const char *const texts[] = {
        "Hello world", "hello  world", "  leading spaces", "trailing spaces  ", "   both   ", "a\nb\r\nc\n",
        "tabs\tand\ttabs", "café naïve e\xcc\x81", "日本語のテキスト",
        "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧",
        "ｆｕｌｌｗｉｄｔｈ", "\xc2\xa0nbsp\xe3\x80\x80ideographic", "<s> </s> as text",
        "### Response:\n                the answer"};
    size_t nt = sizeof texts / sizeof texts[0];
    int all_round = 1, all_tile = 1;
    for (size_t i = 0; i < nt; i++) {
        ids.n = 0;
        size_t len = strlen(texts[i]);
        if (tk_tok_encode(tok, texts[i], len, 0, 0, &ids, &err) != 0) {
            all_round = 0;
            continue;
        }
        if (!offsets_tile(&ids, 0, len)) all_tile = 0;
        size_t dlen = 0;
        char *back = tk_tok_decode(tok, ids.ids, ids.n, &dlen, &err);
        if (!back || dlen != len || memcmp(back, texts[i], len) != 0) {
            printf("    round trip failed: '%s' -> '%s'\n", texts[i], back ? back : err.msg);
            all_round = 0;
        }
        free(back);
    }
    snprintf(what, sizeof what, "decode(encode(s)) == s for %zu texts (whitespace runs, CJK, emoji, NBSP)", nt);
    check(all_round, what);
    check(all_tile, "token offsets tile each text left to right (empty spans aside)");

    /* NUL bytes are text; invalid UTF-8 is accepted (sentencepiece maps it to U+FFFD). */
    ids.n = 0;
    const char nul[] = {'a', '\0', 'b'};
    size_t dlen = 0;
    char *back = NULL;
    int ok = tk_tok_encode(tok, nul, 3, 0, 0, &ids, &err) == 0 && ids.n >= 2;
    if (ok) back = tk_tok_decode(tok, ids.ids, ids.n, &dlen, &err);
    check(ok && back && dlen == 3 && memcmp(back, nul, 3) == 0, "\"a\\0b\" encodes and decodes to its 3 bytes");
    free(back);
    ids.n = 0;
    check(tk_tok_encode(tok, "\xff\xfe x \xc3", 6, 0, 0, &ids, &err) == 0 && ids.n > 0,
          "invalid UTF-8 encodes without error");

    /* Growth past the initial capacity, offsets within the text. */
    size_t big = 20000;
    char *text = malloc(big + 1);
    TK_ASSERT(text != NULL);
    for (size_t i = 0; i < big; i++) text[i] = "the cat  sat\n"[i % 13];
    text[big] = '\0';
    ids.n = 0;
    ok = tk_tok_encode(tok, text, big, 1, 1, &ids, &err) == 0;
    snprintf(what, sizeof what, "20000 bytes: %zu ids (buffer grew to %zu), offsets tile the text", ids.n, ids.cap);
    check(ok && ids.n > 1000 && ids.cap >= ids.n && ids.ids[0] == 1 && ids.ids[ids.n - 1] == 2 &&
              offsets_tile(&ids, 1, big),
          what);
    back = ok ? tk_tok_decode(tok, ids.ids, ids.n, &dlen, &err) : NULL;
    check(back && dlen == big && memcmp(back, text, big) == 0, "... and decodes back exactly (BOS/EOS dropped)");
    free(back);

    /* Concurrent encoding gives the same ids as serial. */
    size_t serial_n = ids.n;
    int32_t *serial = malloc(serial_n * sizeof *serial);
    TK_ASSERT(serial != NULL);
    memcpy(serial, ids.ids, serial_n * sizeof *serial);
    int same = 1;
#pragma omp parallel for reduction(&& : same)
    for (int t = 0; t < 8; t++) {
        tk_ids mine = {0};
        tk_err e2 = {0};
        same = same && tk_tok_encode(tok, text, big, 1, 1, &mine, &e2) == 0 && mine.n == serial_n &&
               memcmp(mine.ids, serial, serial_n * sizeof *serial) == 0;
        tk_ids_free(&mine);
    }
    check(same, "8 concurrent encodes of the same text equal the serial result");
    free(serial);
    free(text);

    /* Errors. */
    int32_t bad[] = {5, 100000};
    err.msg[0] = '\0';
    back = tk_tok_decode(tok, bad, 2, NULL, &err);
    check(back == NULL && strstr(err.msg, "100000") && strstr(err.msg, "position 1") &&
              strstr(err.msg, tk_tok_path(tok)),
          "decode of an out-of-range id fails naming the model, the id and its position");
    int32_t neg = -1;
    check(tk_tok_decode(tok, &neg, 1, NULL, &err) == NULL, "decode of id -1 fails");
    back = tk_tok_decode(tok, NULL, 0, &dlen, &err);
    check(back && dlen == 0 && back[0] == '\0', "decode of no ids is the empty string");
    free(back);
    check(tk_tok_encode(tok, NULL, 5, 0, 0, &ids, &err) == -1, "encode of NULL text with a length fails");
    tk_ids_free(&ids);
    check(ids.ids == NULL && ids.n == 0 && ids.cap == 0, "tk_ids_free zeroes the buffer");
    tk_ids_free(&ids);
}

static void test_nfkc(const tk_tokenizer *tok) {
    tk_err err = {0};
    tk_ids a = {0}, b = {0};
    printf("nfkc: the model's normalizer is applied (as in python)\n");
    const char *spaced = "  hello    world  ";
    const char *plain = "hello world";
    check(tk_tok_encode(tok, spaced, strlen(spaced), 0, 0, &a, &err) == 0 &&
              tk_tok_encode(tok, plain, strlen(plain), 0, 0, &b, &err) == 0 && a.n == b.n &&
              memcmp(a.ids, b.ids, a.n * sizeof(int32_t)) == 0,
          "whitespace runs fold and ends strip: '  hello    world  ' == 'hello world'");
    a.n = b.n = 0;
    const char *wide = "ｈｅｌｌｏ";
    check(tk_tok_encode(tok, wide, strlen(wide), 0, 0, &a, &err) == 0 &&
              tk_tok_encode(tok, "hello", 5, 0, 0, &b, &err) == 0 && a.n == b.n &&
              memcmp(a.ids, b.ids, a.n * sizeof(int32_t)) == 0 && a.end[a.n - 1] == strlen(wide),
          "fullwidth folds to ASCII (NFKC), offsets still index the original bytes");
    a.n = 0;
    check(tk_tok_encode(tok, "   ", 3, 0, 0, &a, &err) == 0 && a.n == 0, "whitespace-only text: no ids");
    tk_ids_free(&a);
    tk_ids_free(&b);
}

static int write_bytes(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = len ? fwrite(data, 1, len, f) : 0;
    return fclose(f) == 0 && w == len ? 0 : -1;
}

static uint64_t read_varint(const unsigned char *b, size_t n, size_t *i) {
    uint64_t v = 0;
    for (int s = 0; *i < n && s < 64; s += 7) {
        unsigned char c = b[(*i)++];
        v |= (uint64_t)(c & 0x7f) << s;
        if (!(c & 0x80)) break;
    }
    return v;
}

static void test_bad_models(const char *dir, const char *good) {
    printf("malformed models: one line naming the file\n");
    tk_err err = {0};
    size_t len = 0;
    char *data = tk_read_file(good, &len, &err);
    TK_ASSERT(data != NULL);
    /* End of the last top-level pieces field: a valid protobuf prefix that protobuf accepts. */
    size_t i = 0, pieces_end = 0;
    while (i < len) {
        uint64_t key = read_varint((const unsigned char *)data, len, &i);
        if ((key & 7) != 2) break;
        uint64_t l = read_varint((const unsigned char *)data, len, &i);
        i += (size_t)l;
        if ((key >> 3) == 1) pieces_end = i;
    }
    struct {
        const char *name;
        size_t len;
        const char *expect;
    } cases[] = {
        {"truncated_half.model", len / 2, "truncated"},
        {"truncated_pieces.model", pieces_end, "truncated"},
        {"truncated_3.model", 3, "not a sentencepiece model"},
        {"empty.model", 0, "empty"},
        {"garbage.model", 0, "not a sentencepiece model"},
    };
    char path[512], what[300];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        snprintf(path, sizeof path, "%s/%s", dir, cases[c].name);
        int w;
        if (strcmp(cases[c].name, "garbage.model") == 0) {
            const char *g = "this is not a sentencepiece model\n";
            w = write_bytes(path, g, strlen(g));
        } else {
            w = write_bytes(path, data, cases[c].len);
        }
        TK_ASSERT(w == 0);
        err.msg[0] = '\0';
        tk_tokenizer *t = tk_tok_open(path, &err);
        snprintf(what, sizeof what, "%s: %.200s", cases[c].name, err.msg);
        check(t == NULL && one_line_naming(err.msg, path) && strstr(err.msg, cases[c].expect), what);
        tk_tok_free(t);
    }
    free(data);
    snprintf(path, sizeof path, "%s/no_such.model", dir);
    tk_tokenizer *t = tk_tok_open(path, &err);
    snprintf(what, sizeof what, "missing: %.200s", err.msg);
    check(t == NULL && one_line_naming(err.msg, path) && strstr(err.msg, "cannot open"), what);
    snprintf(path, sizeof path, "%s/subdir.model", dir);
    TK_ASSERT(mkdir(path, 0700) == 0);
    t = tk_tok_open(path, &err);
    snprintf(what, sizeof what, "a directory: %.200s", err.msg);
    check(t == NULL && one_line_naming(err.msg, path), what);
    rmdir(path);
    check(tk_tok_open(NULL, &err) == NULL, "NULL path is refused");
    tk_tok_free(NULL);
    check(1, "tk_tok_free(NULL) is a no-op");
}

int main(void) {
    char dir[64], llama[256], nfkc[256];
    if (spm_fixture_dir(dir, sizeof dir) != 0) return 1;
    const char *largs[16];
    size_t k = 0;
    for (; SPM_FIXTURE_LLAMA_ARGS[k]; k++) largs[k] = SPM_FIXTURE_LLAMA_ARGS[k];
    largs[k++] = "--vocab_size=400";
    largs[k] = NULL;
    const char *nargs[] = {"--model_type=unigram", "--vocab_size=300", "--pad_id=3", "--hard_vocab_limit=false",
                           NULL};
    if (spm_fixture_train(dir, "llama", largs, llama, sizeof llama) != 0 ||
        spm_fixture_train(dir, "nfkc", nargs, nfkc, sizeof nfkc) != 0) {
        spm_fixture_cleanup(dir);
        printf("test_text_tokenizer: cannot train the test tokenizers\n");
        return 1;
    }
    tk_err err = {0};
    tk_tokenizer *tl = tk_tok_open(llama, &err);
    if (!tl) printf("  %s\n", err.msg);
    check(tl != NULL, "open the llama-style model");
    tk_tokenizer *tn = tk_tok_open(nfkc, &err);
    if (!tn) printf("  %s\n", err.msg);
    check(tn != NULL, "open the nfkc unigram model");
    if (tl) {
        check(strcmp(tk_tok_path(tl), llama) == 0, "tk_tok_path is the opened path");
        test_vocab(tl, "llama", 400, -1);
        test_encode_llama(tl);
    }
    if (tn) {
        test_vocab(tn, "nfkc", tk_tok_vocab_size(tn), 3);
        test_nfkc(tn);
    }
    test_bad_models(dir, nfkc);
    tk_tok_free(tl);
    tk_tok_free(tn);
    spm_fixture_cleanup(dir);
    printf("test_text_tokenizer: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
