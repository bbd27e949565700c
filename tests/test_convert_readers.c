/* test_convert_readers.c: the dataset readers the converter and `tspeft eval` share:
 * datasets/instruct.c (LLM-Adapters / Alpaca JSON array or JSONL), datasets/csr_tasks.c (task names,
 * aliases, task from a path, answer tokens) and datasets/glue.c (the nine GLUE TSV layouts, labels,
 * verbalizers, prompts, STS-B responses).
 *
 * Writes small files into a fresh mkdtemp directory, loads them and checks every field against the
 * values written; malformed files must fail with one line naming the path and the record or line.
 * The real LLM-Adapters files are checked by test_convert_csr_data.c. Exits 1 if any check fails.
 */
#include "common.h"
#include "datasets/csr_tasks.h"
#include "datasets/glue.h"
#include "datasets/instruct.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int n_fail = 0, n_pass = 0;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    printf("  %-88s %s\n", what, ok ? "ok" : "FAIL");
    if (ok) n_pass++;
    else n_fail++;
}

static char g_dir[64];
static char g_paths[64][256];
static int g_n;

static const char *write_file(const char *name, const char *content) {
    TK_ASSERT(g_n < 64);
    char *path = g_paths[g_n++];
    snprintf(path, 256, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "wb");
    TK_ASSERT(f != NULL);
    size_t len = strlen(content);
    TK_ASSERT(fwrite(content, 1, len, f) == len);
    TK_ASSERT(fclose(f) == 0);
    return path;
}

static int streq(const char *a, const char *b) { return a && b && strcmp(a, b) == 0; }

/* The load must fail with one line that names the path and contains every needle. */
static void expect_error(int rc, const tk_err *err, const char *path, const char *needle, const char *what) {
    int ok = rc != 0 && strstr(err->msg, path) && strstr(err->msg, needle) && !strchr(err->msg, '\n');
    check(ok, "%s -> \"%s\"", what, strstr(err->msg, path) ? strstr(err->msg, path) + strlen(path) : err->msg);
}

/* ---- instruct ---- */

static void test_instruct(void) {
    printf("instruct: JSON array and JSONL\n");
    tk_err err = {0};
    tk_instruct *r = NULL;
    size_t n = 0;
    const char *arr = write_file("a.json", "\xEF\xBB\xBF [\n {\"instruction\": \"Q1 \\u00e9\", \"input\": \"\", \"output\": "
                                           "\"the correct answer is true\", \"answer\": \"true\", \"extra\": 1},\n"
                                           " {\"instruction\": \"Q2\", \"input\": null, \"output\": \"o2\"},\n"
                                           " {\"instruction\": \"Q3\", \"input\": \"ctx\", \"answer\": 4.5}\n]\n");
    int rc = tk_instruct_load(arr, &r, &n, &err);
    check(rc == 0 && n == 3, "array with BOM: 3 records (%s)", rc ? err.msg : "");
    if (rc == 0 && n == 3) {
        check(streq(r[0].instruction, "Q1 \xC3\xA9") && streq(r[0].input, "") &&
                  streq(r[0].output, "the correct answer is true") && streq(r[0].answer, "true"),
              "record 0: all four fields, \\u escapes decoded");
        check(streq(r[1].input, "") && streq(r[1].output, "o2") && streq(r[1].answer, ""),
              "record 1: null input and missing answer are \"\"");
        check(streq(r[2].input, "ctx") && streq(r[2].output, "") && streq(r[2].answer, "4.5"),
              "record 2: no output with an answer is \"\"; numeric answer kept as its JSON text");
    }
    tk_instruct_free(r, n);

    const char *jl = write_file("b.jsonl", "{\"instruction\": \"i1\", \"output\": \"o1\"}\r\n\n   \n"
                                           "{\"instruction\": \"i2\", \"input\": \"x\", \"output\": \"o2\"}");
    rc = tk_instruct_load(jl, &r, &n, &err);
    check(rc == 0 && n == 2 && streq(r[0].instruction, "i1") && streq(r[1].input, "x") && streq(r[1].output, "o2"),
          "JSONL: CRLF, blank lines, no final newline (%s)", rc ? err.msg : "");
    tk_instruct_free(r, rc == 0 ? n : 0);

    struct {
        const char *name, *text, *needle;
    } bad[] = {
        {"b1.json", "[{\"instruction\": \"x\", \"output\": \"y\"}, {\"instruction\": \"x\", \"output\": 7}]",
         ": record 1: \"output\" must be a string"},
        {"b2.json", "[{\"instruction\": \"x\", \"output\": \"y\"},\n {\"output\": \"y\"}]", ": record 1: missing \"instruction\""},
        {"b3.json", "[{\"instruction\": \"x\", \"output\": \"y\"},\n {\"instruction\": \"x\",, }]", ": line 2, column"},
        {"b4.json", "[{\"instruction\": \"x\", \"output\": \"y\"}] [", "unexpected data after the JSON array"},
        {"b5.json", "[{\"instruction\": \"x\", \"output\": \"y\"}, 3]", ": record 1: not a JSON object"},
        {"b6.json", "[]", "empty array"},
        {"b7.json", " \n ", "empty file"},
        {"b8.jsonl", "{\"instruction\": \"x\", \"output\": \"y\"}\n\n{\"instruction\": \"x\"}\n", ": line 3: missing \"output\""},
        {"b9.jsonl", "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\", \"output\": \"y\"} junk\n",
         ": line 2: invalid JSON at column 37"},
        {"b10.jsonl", "{\"instruction\": [1], \"output\": \"y\"}\n", ": line 1: \"instruction\" must be a string"},
        {"b11.json", "{\"instruction\": \"x\", \"output\": \"y\"", ": line 1: invalid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *p = write_file(bad[i].name, bad[i].text);
        tk_instruct sentinel;
        r = &sentinel; /* must come back NULL */
        rc = tk_instruct_load(p, &r, &n, &err);
        expect_error(rc, &err, p, bad[i].needle, bad[i].name);
        if (rc && r) check(0, "%s: *out is NULL after a failure", bad[i].name);
    }
    rc = tk_instruct_load("/nonexistent/x.json", &r, &n, &err);
    expect_error(rc, &err, "/nonexistent/x.json", "", "missing file");
}

/* ---- csr tasks ---- */

static void test_csr(void) {
    printf("csr_tasks: names, aliases, paths, choices\n");
    struct {
        const char *name, *want;
    } names[] = {
        {"boolq", "boolq"},           {"BoolQ", "boolq"},           {"piqa", "piqa"},
        {"social_i_qa", "social_i_qa"}, {"SIQA", "social_i_qa"},    {"social-iqa", "social_i_qa"},
        {"hellaswag", "hellaswag"},   {"HellaSwag", "hellaswag"},   {"winogrande", "winogrande"},
        {"ARC-Easy", "ARC-Easy"},     {"arc-e", "ARC-Easy"},        {"arc_easy", "ARC-Easy"},
        {"ARC-Challenge", "ARC-Challenge"}, {"arc-c", "ARC-Challenge"}, {"ARC_challenge", "ARC-Challenge"},
        {"openbookqa", "openbookqa"}, {"OBQA", "openbookqa"},       {"rte", NULL},
        {"arc", NULL},                {"", NULL},                   {"boolqq", NULL},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const tk_csr_task *t = tk_csr_task_find(names[i].name);
        check(names[i].want ? t && streq(t->name, names[i].want) : t == NULL, "find(\"%s\") -> %s", names[i].name,
              t ? t->name : "NULL");
    }
    struct {
        const char *path, *want;
    } paths[] = {
        {"/data/csr/boolq/test.json", "boolq"},      {"ARC-Challenge/train.json", "ARC-Challenge"},
        {"data/arc_easy_test.json", "ARC-Easy"},     {"x/openbookqa/", "openbookqa"},
        {"hellaswag.json", "hellaswag"},             {"/d/social_i_qa/test.json", "social_i_qa"},
        {"/d/commonsense_170k.json", NULL},          {"/d/math_10k.json", NULL},
        {"test.json", NULL},                         {"", NULL},
    };
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        const tk_csr_task *t = tk_csr_task_from_path(paths[i].path);
        check(paths[i].want ? t && streq(t->name, paths[i].want) : t == NULL, "from_path(\"%s\") -> %s", paths[i].path,
              t ? t->name : "NULL");
    }
    /* choices: generated independently of the table as PREFIX1..PREFIXk */
    struct {
        const char *task, *prefix;
        int k;
    } ch[] = {{"piqa", "solution", 2}, {"siqa", "answer", 3}, {"hellaswag", "ending", 4}, {"winogrande", "option", 2},
              {"arc-e", "answer", 5}, {"arc-c", "answer", 5}, {"obqa", "answer", 5}};
    for (size_t i = 0; i < sizeof ch / sizeof ch[0]; i++) {
        const tk_csr_task *t = tk_csr_task_find(ch[i].task);
        int ok = t && t->n_choices == ch[i].k;
        for (int j = 0; ok && j < ch[i].k; j++) {
            char want[32];
            snprintf(want, sizeof want, "%s%d", ch[i].prefix, j + 1);
            ok = streq(t->choices[j], want) && tk_csr_choice_index(t, want) == j;
        }
        check(ok, "%s: choices %s1..%s%d", ch[i].task, ch[i].prefix, ch[i].prefix, ch[i].k);
    }
    const tk_csr_task *b = tk_csr_task_find("boolq");
    int nt = 0;
    const tk_csr_task *all = tk_csr_tasks(&nt);
    int listed = nt == 8;
    for (int i = 0; listed && i < nt; i++) listed = tk_csr_task_find(all[i].name) == &all[i];
    check(listed, "tk_csr_tasks: 8 tasks, each found by its name");
    check(b && b->n_choices == 2 && streq(b->choices[0], "true") && streq(b->choices[1], "false") &&
              tk_csr_choice_index(b, "FALSE") == 1 && tk_csr_choice_index(b, "maybe") == -1,
          "boolq: true/false, choice_index case-insensitive, -1 for others");
}

/* ---- glue ---- */

typedef struct {
    const char *task, *file, *text;
    size_t n;
    const char *id0, *a0, *b0; /* first example */
    int label0, label_last;     /* -1: unlabeled */
    float score0;               /* STS-B */
} glue_case;

static void test_glue(void) {
    printf("glue: layouts, labels, verbalizers, prompts\n");
    struct {
        const char *name, *want;
    } names[] = {{"CoLA", "cola"}, {"SST-2", "sst2"}, {"MRPC", "mrpc"}, {"QQP", "qqp"}, {"STS-B", "stsb"},
                 {"MNLI", "mnli_m"}, {"mnli-m", "mnli_m"}, {"MNLI-mm", "mnli_mm"}, {"mnli_mismatched", "mnli_mm"},
                 {"QNLI", "qnli"}, {"RTE", "rte"}, {"WNLI", "wnli"}, {"boolq", NULL}, {"glue", NULL}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const tk_glue_task *t = tk_glue_task_find(names[i].name);
        check(names[i].want ? t && streq(t->name, names[i].want) : t == NULL, "find(\"%s\") -> %s", names[i].name,
              t ? t->name : "NULL");
    }
    struct {
        const char *path, *want;
    } gpaths[] = {{"glue/RTE/train.tsv", "rte"}, {"SST-2/dev.tsv", "sst2"}, {"/d/STS-B/test.tsv", "stsb"},
                  {"/d/MNLI/dev_matched.tsv", "mnli_m"}, {"/d/MNLI/dev_mismatched.tsv", "mnli_mm"},
                  {"cola.tsv", "cola"}, {"/d/glue/train.tsv", NULL}, {"", NULL}};
    for (size_t i = 0; i < sizeof gpaths / sizeof gpaths[0]; i++) {
        const tk_glue_task *t = tk_glue_task_from_path(gpaths[i].path);
        check(gpaths[i].want ? t && streq(t->name, gpaths[i].want) : t == NULL, "from_path(\"%s\") -> %s",
              gpaths[i].path, t ? t->name : "NULL");
    }
    const glue_case cases[] = {
        {"cola", "cola_train.tsv", "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n", 2,
         "0", "Our friends won't buy this analysis.", NULL, 1, 0, 0},
        {"cola", "cola_test.tsv", "index\tsentence\n0\tBill whistled past the house.\n", 1, "0",
         "Bill whistled past the house.", NULL, -1, -1, 0},
        {"sst2", "sst2.tsv", "sentence\tlabel\nhide new secretions \t0\nthe greatest musicians \t1\n", 2, "0",
         "hide new secretions ", NULL, 0, 1, 0},
        {"mrpc", "mrpc.tsv",
         "\xEF\xBB\xBFQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t702876\t702977\tAmrozi accused.\tReferring to him.\r\n"
         "0\t2108705\t2108831\tYucaipa owned.\tYucaipa bought.\r\n",
         2, "0", "Amrozi accused.", "Referring to him.", 1, 0, 0},
        {"qqp", "qqp.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n133273\t213221\t213222\tHow?\tWhy?\t0\n"
                           "7\t1\t2\tA?\tB?\t1\n", 2, "133273", "How?", "Why?", 0, 1, 0},
        {"stsb", "stsb.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                             "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\tAn air plane is taking off.\t5.000\n"
                             "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA man sings.\t0.1\n",
         2, "0", "A plane takes off.", "An air plane is taking off.", -1, -1, 5.0f},
        {"mnli_m", "mnli_dev.tsv",
         "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
         "sentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
         "0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThe new rights are nice.\tEveryone loves them.\tneutral\t"
         "entailment\tneutral\tneutral\tneutral\tneutral\n"
         "1\t91383\t91383c\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThis site includes.\tThe site has nothing.\tcontradiction\t"
         "contradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n",
         2, "0", "The new rights are nice.", "Everyone loves them.", 1, 2, 0},
        {"mnli_mm", "mnli_test.tsv",
         "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
         "sentence1\tsentence2\n0\t1\t1n\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tHello.\tHi.\n",
         1, "0", "Hello.", "Hi.", -1, -1, 0},
        {"qnli", "qnli.tsv", "index\tquestion\tsentence\tlabel\n0\tWhat came into force?\tThe law.\tentailment\n"
                             "1\tWhere?\tNowhere.\tnot_entailment\n", 2, "0", "What came into force?", "The law.", 0, 1, 0},
        {"rte", "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\tNo weapons found.\tWeapons found.\tnot_entailment\n"
                           "1\tA dog.\tAn animal.\tentailment\n", 2, "0", "No weapons found.", "Weapons found.", 1, 0, 0},
        {"wnli", "wnli.tsv", "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin.\tThe pin had a hole.\t1\n", 1, "0",
         "I stuck a pin.", "The pin had a hole.", 1, 1, 0},
    };
    /* label index -> verbalizer, independent of the table: Hugging Face glue's label names */
    const char *hf[][3] = {{"unacceptable", "acceptable"}, {"negative", "positive"}, {"not_equivalent", "equivalent"},
                           {"not_duplicate", "duplicate"}, {"entailment", "neutral", "contradiction"},
                           {"entailment", "not_entailment"}, {"not_entailment", "entailment"}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const glue_case *gc = &cases[c];
        const tk_glue_task *t = tk_glue_task_find(gc->task);
        const char *p = write_file(gc->file, gc->text);
        tk_err err = {0};
        tk_glue_example *e = NULL;
        size_t n = 0;
        int rc = tk_glue_load(t, p, &e, &n, &err);
        int ok = rc == 0 && n == gc->n && streq(e[0].id, gc->id0) && streq(e[0].text_a, gc->a0) &&
                 (gc->b0 ? streq(e[0].text_b, gc->b0) : e[0].text_b == NULL) && e[0].label == gc->label0 &&
                 e[n - 1].label == gc->label_last;
        if (ok && t->n_labels == 0) ok = gc->label0 >= 0 || fabsf(e[0].score - gc->score0) < 1e-6f;
        check(ok, "%s %s: %zu examples, id/text_a/text_b/label (%s)", gc->task, gc->file, n, rc ? err.msg : "");
        if (rc == 0 && t->n_labels > 0 && gc->label0 >= 0) {
            const char *const *want = NULL;
            if (streq(t->name, "cola")) want = hf[0];
            else if (streq(t->name, "sst2")) want = hf[1];
            else if (streq(t->name, "mrpc")) want = hf[2];
            else if (streq(t->name, "qqp")) want = hf[3];
            else if (!strncmp(t->name, "mnli", 4)) want = hf[4];
            else if (streq(t->name, "wnli")) want = hf[6];
            else want = hf[5];
            char *resp = tk_glue_response(t, &e[0]);
            check(streq(resp, want[gc->label0]), "%s: response of label %d is \"%s\"", gc->task, gc->label0, resp);
            free(resp);
        }
        if (rc == 0) {
            char *ins = tk_glue_instruction(t, &e[0]);
            int has = ins && strstr(ins, gc->a0) && (!gc->b0 || strstr(ins, gc->b0)) && strstr(ins, "\n\nAnswer format: ");
            for (int k = 0; has && k < t->n_labels; k++) has = strstr(ins, t->verbalizers[k]) != NULL;
            check(has, "%s: instruction holds the text(s) and every answer word", gc->task);
            free(ins);
            if (gc->label0 < 0 && t->n_labels > 0) {
                char *resp = tk_glue_response(t, &e[0]);
                check(streq(resp, "") && (t->n_labels || isnan(e[0].score)), "%s: unlabeled response is \"\"", gc->task);
                free(resp);
            }
        }
        tk_glue_free(e, rc == 0 ? n : 0);
    }

    /* STS-B: round(score * 5) / 5 with one decimal, clamped */
    const tk_glue_task *sts = tk_glue_task_find("stsb");
    float scores[] = {0.0f, 0.1f, 0.3f, 2.5f, 3.79f, 4.75f, 5.0f, 7.0f, -1.0f, NAN};
    for (size_t i = 0; i < sizeof scores / sizeof scores[0]; i++) {
        tk_glue_example x = {.label = -1, .score = scores[i]};
        char want[16] = "";
        if (!isnan(scores[i])) {
            double s = scores[i] < 0 ? 0 : scores[i] > 5 ? 5 : scores[i];
            snprintf(want, sizeof want, "%.1f", floor(s * 5.0 + 0.5) / 5.0);
        }
        char *got = tk_glue_response(sts, &x);
        check(streq(got, want), "stsb response(%g) = \"%s\"", (double)scores[i], got ? got : "(null)");
        free(got);
    }

    struct {
        const char *task, *name, *text, *needle;
    } bad[] = {
        {"rte", "g1.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", ": line 3: 3 tab-separated fields, expected 4"},
        {"rte", "g2.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tyes\n", ": line 2: bad label \"yes\""},
        {"sst2", "g3.tsv", "sentence\tlabel\ngood\t2\n", ": line 2: bad label \"2\""},
        {"cola", "g4.tsv", "gj04\t1\t\tok\ngj04\t1\tok\n", ": line 2: 3 tab-separated fields, expected 4"},
        {"stsb", "g5.tsv", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t5.5\n", ": line 2: bad score \"5.5\""},
        {"stsb", "g6.tsv", "index\tsentence1\tsentence2\tscore\n0\ta\tb\tx\n", ": line 2: bad score"},
        {"qqp", "g7.tsv", "id\tq1\tq2\tis_duplicate\n", ": line 1: header has no \"question1\" column"},
        {"mnli_m", "g8.tsv", "index\tsentence1\tsentence2\tgold_label\n0\ta\tb\t-\n", ": line 2: bad label \"-\""},
        {"rte", "g9.tsv", "index\tsentence1\tsentence2\tlabel\n", "no examples after the header"},
        {"rte", "g10.tsv", "", "no examples"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *p = write_file(bad[i].name, bad[i].text);
        tk_err err = {0};
        tk_glue_example *e = NULL;
        size_t n = 0;
        int rc = tk_glue_load(tk_glue_task_find(bad[i].task), p, &e, &n, &err);
        expect_error(rc, &err, p, bad[i].needle, bad[i].name);
        if (rc && e) check(0, "%s: *out is NULL after a failure", bad[i].name);
    }
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/tk_readers_XXXXXX");
    TK_ASSERT(mkdtemp(g_dir) != NULL);
    test_instruct();
    test_csr();
    test_glue();
    for (int i = 0; i < g_n; i++) unlink(g_paths[i]);
    rmdir(g_dir);
    printf("test_convert_readers: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
