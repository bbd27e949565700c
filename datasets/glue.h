/* glue.h: the nine GLUE tasks from their original TSV files, with label verbalizers and prompts.
 *
 *   const tk_glue_task *t = tk_glue_task_find("rte");
 *   tk_glue_example *e; size_t n;
 *   if (tk_glue_load(t, "RTE/dev.tsv", &e, &n, &err) != 0) ...;
 *   char *instr = tk_glue_instruction(t, &e[0]), *resp = tk_glue_response(t, &e[0]);  // free() both
 *   tk_glue_free(e, n);
 *
 * Files and columns (GLUE's distribution; columns found by header name, tabs separate, no quoting):
 *   cola     train/dev.tsv have NO header: source, label, original label, sentence; test.tsv has
 *            "index sentence" (unlabeled)                     label 0/1   metric MCC
 *   sst2     sentence, label                                  0/1         accuracy
 *   mrpc     "#1 String", "#2 String", label "Quality"        0/1         accuracy and F1
 *   qqp      question1, question2, is_duplicate               0/1         accuracy and F1
 *   stsb     sentence1, sentence2, score (0..5, float)        regression  Pearson and Spearman
 *   mnli_m / mnli_mm  sentence1, sentence2, gold_label        entailment/neutral/contradiction  accuracy
 *            (dev_matched.tsv / dev_mismatched.tsv; the task name only says which split it reports)
 *   qnli     question, sentence, label                        entailment/not_entailment  accuracy
 *   rte      sentence1, sentence2, label                      entailment/not_entailment  accuracy
 *   wnli     sentence1, sentence2, label                      0/1         accuracy
 * A file without the label column (a test split) loads with label -1 / score NAN. Labels are mapped
 * to indices in the order of the verbalizers below. Every data line must have as many fields as the
 * header (MNLI's and QQP's real files do); an unknown label is an error naming the line.
 *
 * Verbalizers (T5's; the response a model is trained to give, docs/convert.md), by label index:
 * cola unacceptable/acceptable; sst2 negative/positive; mrpc not_equivalent/equivalent; qqp
 * not_duplicate/duplicate; mnli entailment/neutral/contradiction; qnli and rte entailment/not_entailment;
 * wnli not_entailment/entailment (the file's 0/1). stsb: the score clamped to 0..5, rounded to the
 * nearest 0.2 and printed with one decimal ("3.8"), as T5 does; an unlabeled example gives "".
 * A UTF-8 BOM (MRPC's files) and CR line ends are accepted, blank lines skipped; CoLA is read without
 * a header unless its first field is "index" (test.tsv). Columns: at most 64.
 *
 * Ownership: the task table is static; examples are malloc'd (tk_glue_free); tk_glue_instruction
 * and tk_glue_response return malloc'd strings (NULL when out of memory). Failure: -1 with one line
 * naming the file and line and what was wrong.
 */
#ifndef TK_DATASETS_GLUE_H
#define TK_DATASETS_GLUE_H

#include "../src/common.h"

#include <stddef.h>

typedef enum { TK_GLUE_ACC, TK_GLUE_ACC_F1, TK_GLUE_MCC, TK_GLUE_PEARSON_SPEARMAN } tk_glue_metric;

typedef struct {
    const char *name;               /* cola sst2 mrpc qqp stsb mnli_m mnli_mm qnli rte wnli */
    int n_labels;                   /* 0 for STS-B (regression) */
    const char *const *verbalizers; /* [n_labels] label index -> answer word */
    tk_glue_metric metric;
} tk_glue_task;

typedef struct {
    char *id, *text_a, *text_b; /* text_b NULL for single-sentence tasks; id: the index (qqp: id) column, else
                                 * the 0-based example number */
    int label;                  /* index into verbalizers; -1 when unlabeled */
    float score;                /* STS-B: the gold score (NAN when unlabeled); else 0 */
} tk_glue_example;

/* Case-insensitive with aliases (sst-2, sts-b, mnli = mnli_m, mnli-mm, ...); NULL when unknown. */
const tk_glue_task *tk_glue_task_find(const char *name);
int tk_glue_load(const tk_glue_task *t, const char *tsv_path, tk_glue_example **out, size_t *n, tk_err *err);
void tk_glue_free(tk_glue_example *e, size_t n);
char *tk_glue_instruction(const tk_glue_task *t, const tk_glue_example *e);
char *tk_glue_response(const tk_glue_task *t, const tk_glue_example *e);
/* The task a path names, or NULL: a path holding "mnli" is mnli_mm when it holds "mismatched", else
 * mnli_m; otherwise the first path component, from the last one back and without its extension,
 * that is a task name or alias ("glue/RTE/train.tsv" -> rte, "SST-2/dev.tsv" -> sst2). */
const tk_glue_task *tk_glue_task_from_path(const char *path);
/* Label index of a verbalizer (exact match), or -1. */
int tk_glue_label_index(const tk_glue_task *t, const char *word);

#endif
