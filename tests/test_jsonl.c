/* test_jsonl.c: pre-tokenized JSONL loading, batching and target counting (datasets/jsonl.c).
 *
 * Writes small files into a fresh mkdtemp directory under /tmp, loads them and checks every value;
 * malformed files must fail with one line naming the path and the line. Prints each check; exits 1
 * if any fails.
 */
#include "common.h"
#include "datasets/jsonl.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int n_fail = 0;
static int n_pass = 0;

static void check(int ok, const char *what) {
    printf("  %-66s %s\n", what, ok ? "ok" : "FAIL");
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
    }
}

/* Files written by the test, removed at the end. */
typedef struct {
    char dir[64];
    char paths[64][256];
    int n;
} scratch;

static const char *write_file(scratch *s, const char *name, const char *content) {
    TK_ASSERT(s->n < 64);
    char joined[256];
    snprintf(joined, sizeof joined, "%s/%s", s->dir, name);
    char *path = s->paths[s->n++];
    memcpy(path, joined, sizeof joined);
    FILE *f = fopen(path, "wb");
    TK_ASSERT(f != NULL);
    size_t len = strlen(content);
    TK_ASSERT(fwrite(content, 1, len, f) == len);
    TK_ASSERT(fclose(f) == 0);
    return path;
}

static int ints_equal(const int32_t *got, const int32_t *want, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i]) return 0;
    return 1;
}

static int bytes_equal(const uint8_t *got, const uint8_t *want, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i]) return 0;
    return 1;
}

/* Row 0 has everything, then a blank line and a whitespace-only line, row 1 has ids only (with a CR
 * line ending), row 2 has a mask and an extra key, no final newline. */
static const char *GOOD = "{\"input_ids\": [1, 2, 3, 4], \"labels\": [-100, -100, 3, 4], \"attention_mask\": [1, 1, 1, 1]}\n"
                          "\n"
                          "   \t\n"
                          "{\"input_ids\": [5, 6]}\r\n"
                          "{\"input_ids\": [7, 8, 9], \"attention_mask\": [1, 1, 0], \"extra\": \"ignored\"}";

static void test_good(scratch *s) {
    printf("good file: labels and mask optional, blank lines skipped\n");
    tk_err err = {0};
    const char *path = write_file(s, "good.jsonl", GOOD);
    tk_jsonl_data *d = tk_jsonl_load(path, 10, 0, &err);
    check(d != NULL, "loads");
    if (d == NULL) {
        printf("  error: %s\n", err.msg);
        return;
    }
    check(d->n_rows == 3, "3 rows (blank lines skipped)");
    check(d->max_len == 4, "max_len 4");
    if (d->n_rows != 3) {
        tk_jsonl_free(d);
        return;
    }
    const int32_t ids0[] = {1, 2, 3, 4}, lab0[] = {-100, -100, 3, 4};
    const uint8_t ones[] = {1, 1, 1, 1}, mask2[] = {1, 1, 0};
    const int32_t ids1[] = {5, 6}, ids2[] = {7, 8, 9};
    check(d->rows[0].len == 4 && ints_equal(d->rows[0].input_ids, ids0, 4), "row 0 input_ids");
    check(ints_equal(d->rows[0].labels, lab0, 4), "row 0 labels with -100");
    check(bytes_equal(d->rows[0].attention_mask, ones, 4), "row 0 attention_mask");
    check(d->rows[1].len == 2 && ints_equal(d->rows[1].input_ids, ids1, 2), "row 1 input_ids (CRLF line)");
    check(ints_equal(d->rows[1].labels, ids1, 2), "row 1 labels default to input_ids");
    check(bytes_equal(d->rows[1].attention_mask, ones, 2), "row 1 mask defaults to all 1");
    check(d->rows[2].len == 3 && ints_equal(d->rows[2].input_ids, ids2, 3), "row 2 input_ids (no final newline)");
    check(ints_equal(d->rows[2].labels, ids2, 3), "row 2 labels default to input_ids");
    check(bytes_equal(d->rows[2].attention_mask, mask2, 3), "row 2 explicit mask with a 0");

    printf("batch: right padding to the longest selected row\n");
    tk_batch b = {0};
    const size_t sel[] = {1, 0, 2};
    int rc = tk_batch_make(&b, d, sel, 3, &err);
    check(rc == 0 && b.B == 3 && b.T == 4, "B=3 T=4");
    const int32_t want_ids[] = {5, 6, 0, 0, 1, 2, 3, 4, 7, 8, 9, 0};
    const int32_t want_lab[] = {5, 6, -100, -100, -100, -100, 3, 4, 7, 8, 9, -100};
    const uint8_t want_mask[] = {1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0};
    check(rc == 0 && ints_equal(b.input_ids, want_ids, 12), "input_ids padded with 0");
    check(rc == 0 && ints_equal(b.labels, want_lab, 12), "labels padded with -100");
    check(rc == 0 && bytes_equal(b.attention_mask, want_mask, 12), "attention_mask padded with 0");
    /* Targets (t < T-1 with labels[t+1] != -100): row 1 -> {6} = 1, row 0 -> {3, 4} = 2,
     * row 2 -> {8, 9} = 2. */
    size_t targets = tk_batch_count_targets(&b);
    printf("  count_targets = %zu (want 5)\n", targets);
    check(targets == 5, "count_targets skips -100 and the first position");

    printf("batch: buffer reuse, growth and bad indices\n");
    int32_t *old_ids = b.input_ids;
    size_t old_cap = b.cap;
    const size_t one[] = {1};
    rc = tk_batch_make(&b, d, one, 1, &err);
    check(rc == 0 && b.B == 1 && b.T == 2 && b.input_ids == old_ids && b.cap == old_cap,
          "smaller batch reuses the buffers");
    check(tk_batch_count_targets(&b) == 1, "count_targets of row 1 alone = 1");
    const size_t many[] = {0, 0, 0, 0, 1};
    rc = tk_batch_make(&b, d, many, 5, &err);
    check(rc == 0 && b.B == 5 && b.T == 4 && b.cap >= 20, "larger batch grows the buffers");
    check(rc == 0 && b.labels[4 * 4 + 2] == -100 && b.input_ids[4 * 4 + 1] == 6, "grown batch filled");
    check(tk_batch_count_targets(&b) == 4 * 2 + 1, "count_targets of 4x row 0 + row 1 = 9");
    const size_t bad[] = {0, 3};
    size_t B_before = b.B;
    rc = tk_batch_make(&b, d, bad, 2, &err);
    printf("  error: %s\n", err.msg);
    check(rc == -1 && strstr(err.msg, "found 3") != NULL && b.B == B_before, "row index 3 of 3 rejected");
    rc = tk_batch_make(&b, d, bad, 0, &err);
    check(rc == -1, "empty row selection rejected");
    tk_batch_free(&b);
    check(b.input_ids == NULL && b.cap == 0, "tk_batch_free clears the batch");
    tk_batch_free(&b);
    tk_batch_free(NULL);
    tk_jsonl_free(d);
    tk_jsonl_free(NULL);
}

static void test_truncation(scratch *s) {
    printf("truncation: rows longer than max_len keep their first max_len tokens\n");
    tk_err err = {0};
    const char *path = write_file(s, "trunc.jsonl", GOOD);
    tk_jsonl_data *d = tk_jsonl_load(path, 10, 2, &err);
    check(d != NULL && d->n_rows == 3, "loads with max_len 2");
    if (d == NULL || d->n_rows != 3) {
        tk_jsonl_free(d);
        return;
    }
    const int32_t ids0[] = {1, 2}, lab0[] = {-100, -100}, ids2[] = {7, 8};
    const uint8_t mask2[] = {1, 1};
    check(d->max_len == 2, "max_len 2 after truncation");
    check(d->rows[0].len == 2 && ints_equal(d->rows[0].input_ids, ids0, 2), "row 0 ids truncated");
    check(ints_equal(d->rows[0].labels, lab0, 2), "row 0 labels truncated");
    check(d->rows[1].len == 2, "row 1 (already 2) untouched");
    check(d->rows[2].len == 2 && ints_equal(d->rows[2].input_ids, ids2, 2), "row 2 ids truncated");
    check(bytes_equal(d->rows[2].attention_mask, mask2, 2), "row 2 mask truncated");
    tk_batch b = {0};
    const size_t sel[] = {0};
    check(tk_batch_make(&b, d, sel, 1, &err) == 0 && tk_batch_count_targets(&b) == 0,
          "row 0 truncated to its two -100 labels has no targets");
    tk_batch_free(&b);
    tk_jsonl_free(d);

    /* Tokens beyond max_len are still validated: the file is malformed either way. */
    path = write_file(s, "trunc_bad.jsonl", "{\"input_ids\": [1, 2, 99]}\n");
    d = tk_jsonl_load(path, 10, 2, &err);
    check(d == NULL && strstr(err.msg, "input_ids[2]") != NULL, "an invalid id past max_len is still an error");
    tk_jsonl_free(d);

    /* A one-token row has no target. */
    path = write_file(s, "single.jsonl", "{\"input_ids\": [3]}\n");
    d = tk_jsonl_load(path, 10, 0, &err);
    check(d != NULL && d->n_rows == 1 && d->max_len == 1, "one-token row loads");
    if (d != NULL) {
        check(tk_batch_make(&b, d, sel, 1, &err) == 0 && b.T == 1 && tk_batch_count_targets(&b) == 0,
              "T=1 batch has no targets");
        tk_batch_free(&b);
    }
    tk_jsonl_free(d);
}

/* A malformed file must fail with one line starting "PATH:LINE:" that mentions `what`. */
static void expect_fail(scratch *s, const char *name, const char *content, int vocab, size_t line,
                        const char *what) {
    tk_err err = {0};
    const char *path = write_file(s, name, content);
    tk_jsonl_data *d = tk_jsonl_load(path, vocab, 0, &err);
    char prefix[320];
    snprintf(prefix, sizeof prefix, "%s:%zu: ", path, line);
    int ok = d == NULL && strncmp(err.msg, prefix, strlen(prefix)) == 0 && strstr(err.msg, what) != NULL &&
             strchr(err.msg, '\n') == NULL;
    printf("  [%s] %s\n", name, err.msg);
    char label[160];
    snprintf(label, sizeof label, "%s fails at line %zu mentioning \"%s\"", name, line, what);
    check(ok, label);
    tk_jsonl_free(d);
}

static void test_malformed(scratch *s) {
    printf("malformed files: one-line errors naming path and line\n");
    const char *ok1 = "{\"input_ids\": [1, 2]}\n";
    char buf[512];
    snprintf(buf, sizeof buf, "%s{\"input_ids\": [1, 2}\n", ok1);
    expect_fail(s, "invalid_json.jsonl", buf, 10, 2, "invalid JSON");
    snprintf(buf, sizeof buf, "%s\n{\"labels\": [1, 2]}\n", ok1);
    expect_fail(s, "missing_ids.jsonl", buf, 10, 3, "missing \"input_ids\"");
    expect_fail(s, "label_len.jsonl", "{\"input_ids\": [1, 2, 3], \"labels\": [1, 2]}\n", 10, 1,
                "found 2, expected 3");
    expect_fail(s, "mask_len.jsonl", "{\"input_ids\": [1, 2], \"attention_mask\": [1, 1, 1]}\n", 10, 1,
                "found 3, expected 2");
    expect_fail(s, "id_range.jsonl", "{\"input_ids\": [1, 10]}\n", 10, 1, "input_ids[1] out of range (found 10");
    expect_fail(s, "id_negative.jsonl", "{\"input_ids\": [-1]}\n", 10, 1, "out of range (found -1");
    expect_fail(s, "id_float.jsonl", "{\"input_ids\": [1, 3.5]}\n", 10, 1, "not an integer (found 3.5");
    expect_fail(s, "id_string.jsonl", "{\"input_ids\": [\"7\"]}\n", 10, 1, "not a number (found a string");
    expect_fail(s, "id_huge.jsonl", "{\"input_ids\": [1e300]}\n", 10, 1, "out of range");
    expect_fail(s, "label_range.jsonl", "{\"input_ids\": [1, 2], \"labels\": [1, -5]}\n", 10, 1,
                "labels[1] out of range (found -5");
    expect_fail(s, "mask_value.jsonl", "{\"input_ids\": [1, 2], \"attention_mask\": [1, 2]}\n", 10, 1,
                "expected 0 or 1");
    expect_fail(s, "labels_null.jsonl", "{\"input_ids\": [1, 2], \"labels\": null}\n", 10, 1,
                "not an array (found null");
    expect_fail(s, "ids_empty.jsonl", "{\"input_ids\": []}\n", 10, 1, "empty");
    expect_fail(s, "not_object.jsonl", "[1, 2, 3]\n", 10, 1, "not a JSON object (found an array");
    expect_fail(s, "trailing.jsonl", "{\"input_ids\": [1]} x\n", 10, 1, "trailing characters");
    expect_fail(s, "two_objects.jsonl", "{\"input_ids\": [1]}{\"input_ids\": [2]}\n", 10, 1, "trailing characters");
    expect_fail(s, "empty.jsonl", "", 10, 1, "no rows");
    expect_fail(s, "blank_only.jsonl", "\n  \n", 10, 2, "no rows");

    printf("missing file and bad arguments\n");
    tk_err err = {0};
    char missing[256];
    snprintf(missing, sizeof missing, "%s/does_not_exist.jsonl", s->dir);
    tk_jsonl_data *d = tk_jsonl_load(missing, 10, 0, &err);
    printf("  [missing] %s\n", err.msg);
    check(d == NULL && strstr(err.msg, missing) != NULL, "nonexistent file fails naming the path");
    const char *path = write_file(s, "vocab.jsonl", ok1);
    d = tk_jsonl_load(path, 0, 0, &err);
    check(d == NULL && strstr(err.msg, path) != NULL, "vocab_size 0 rejected");

    /* labels may hold -100 anywhere, and -100 is never a valid input id. */
    path = write_file(s, "ignore.jsonl", "{\"input_ids\": [1, 2], \"labels\": [-100, -100]}\n");
    d = tk_jsonl_load(path, 10, 0, &err);
    check(d != NULL && d->rows[0].labels[1] == -100, "all -100 labels accepted");
    tk_jsonl_free(d);
    expect_fail(s, "ids_ignore.jsonl", "{\"input_ids\": [-100]}\n", 10, 1, "out of range (found -100");
}

int main(void) {
    scratch *s = calloc(1, sizeof *s);
    TK_ASSERT(s != NULL);
    snprintf(s->dir, sizeof s->dir, "/tmp/tspeft_jsonl_XXXXXX");
    TK_ASSERT(mkdtemp(s->dir) != NULL);
    test_good(s);
    test_truncation(s);
    test_malformed(s);
    for (int i = 0; i < s->n; i++) unlink(s->paths[i]);
    rmdir(s->dir);
    free(s);
    printf("test_jsonl: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
