/* csr_tasks.h: the eight commonsense-reasoning tasks of LLM-Adapters and their answer tokens.
 *
 *   const tk_csr_task *t = tk_csr_task_find("arc-e");          // -> ARC-Easy
 *   const tk_csr_task *u = tk_csr_task_from_path("data/piqa/test.json");
 *
 * choices are the gold answer tokens of the "answer" field, in order: boolq true/false; piqa
 * solution1-2; social_i_qa answer1-3; hellaswag ending1-4; winogrande option1-2; ARC-Easy,
 * ARC-Challenge and openbookqa answer1-5 (LLM-Adapters' commonsense_evaluate.py extraction patterns).
 * The table is static: nothing to free. Unknown names give NULL.
 */
#ifndef TK_DATASETS_CSR_TASKS_H
#define TK_DATASETS_CSR_TASKS_H

typedef struct {
    const char *name;
    const char *const *choices;
    int n_choices;
} tk_csr_task;

/* Case-insensitive, with aliases (siqa, arc-e, arc_easy, arc-c, arc_challenge, obqa, ...). */
const tk_csr_task *tk_csr_task_find(const char *name);
/* The task a path names (".../boolq/test.json", "piqa.json", "arc_easy_test.json"): path components
 * from the last one back, each without its extension, first as a whole name or alias, then by the
 * longest name or alias it starts with; NULL when none is a task (commonsense_170k.json). */
const tk_csr_task *tk_csr_task_from_path(const char *path);
/* Every task, for listings: *n receives the count. */
const tk_csr_task *tk_csr_tasks(int *n);
/* Index of answer in t->choices (case-insensitive), or -1. */
int tk_csr_choice_index(const tk_csr_task *t, const char *answer);

#endif
