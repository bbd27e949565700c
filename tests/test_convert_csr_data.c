/* test_convert_csr_data.c: the readers on the real LLM-Adapters commonsense files (not in the repo).
 *
 * Data: $TSPEFT_CSR_DATA, /work/shared/data/csr or ../../shared/data/csr (from tests/); exit 77
 * (skipped) when none holds a README.md. Every file the README's table lists is loaded with
 * tk_instruct_load and checked against that table (record count) and against the README's schema:
 * the task named by the path (tk_csr_task_from_path), every gold answer one of the task's choices,
 * output == "the correct answer is <answer>" at its end, input "". Exits 1 if any check fails.
 */
#include "common.h"
#include "datasets/csr_tasks.h"
#include "src/eval/answer.h"
#include "datasets/instruct.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int n_fail = 0, n_pass = 0;

static void check(int ok, const char *what, const char *detail) {
    printf("  %-70s %s%s%s\n", what, ok ? "ok" : "FAIL", ok || !detail ? "" : ": ", ok || !detail ? "" : detail);
    if (ok) n_pass++;
    else n_fail++;
}

static const char *find_data(void) {
    static char buf[1024];
    const char *env = getenv("TSPEFT_CSR_DATA");
    const char *cands[] = {env, "/work/shared/data/csr", "../../shared/data/csr", "../shared/data/csr"};
    for (size_t i = 0; i < sizeof cands / sizeof cands[0]; i++) {
        if (!cands[i] || !*cands[i]) continue;
        snprintf(buf, sizeof buf, "%s/README.md", cands[i]);
        if (access(buf, R_OK) == 0) {
            snprintf(buf, sizeof buf, "%s", cands[i]);
            return buf;
        }
    }
    return NULL;
}

int main(void) {
    const char *dir = find_data();
    if (!dir) {
        printf("test_convert_csr_data: SKIP (no LLM-Adapters data: set TSPEFT_CSR_DATA or provide /work/shared/data/csr)\n");
        return 77;
    }
    printf("data: %s\n", dir);
    char path[2048];
    snprintf(path, sizeof path, "%s/README.md", dir);
    tk_err err = {0};
    size_t len = 0;
    char *readme = tk_read_file(path, &len, &err);
    if (!readme) {
        printf("cannot read %s: %s\n", path, err.msg);
        return 1;
    }
    /* table rows: "| NAME/SPLIT.json | COUNT |" */
    int files = 0;
    for (char *line = strtok(readme, "\n"); line; line = strtok(NULL, "\n")) {
        char file[256];
        long want = -1;
        if (sscanf(line, "| %255s | %ld |", file, &want) != 2 || !strstr(file, ".json")) continue;
        files++;
        snprintf(path, sizeof path, "%s/%s", dir, file);
        printf("%s\n", file);
        tk_instruct *r = NULL;
        size_t n = 0;
        int rc = tk_instruct_load(path, &r, &n, &err);
        char detail[1200];
        snprintf(detail, sizeof detail, "%s", rc ? err.msg : "");
        check(rc == 0, "loads", detail);
        if (rc) continue;
        snprintf(detail, sizeof detail, "%zu records, README says %ld", n, want);
        check((long)n == want, "record count as the README's table", detail);
        const tk_csr_task *t = tk_csr_task_from_path(path);
        check(t != NULL, "task from the path", path);
        size_t bad_answer = 0, bad_output = 0, bad_input = 0, bad_extract = 0, first_bad = n;
        const char *alts[16];
        int na = t ? tk_answer_pattern(alts, 16, t->choices, t->n_choices) : 0;
        for (size_t i = 0; i < n; i++) {
            int a_ok = t && tk_csr_choice_index(t, r[i].answer) >= 0;
            char tail[128];
            snprintf(tail, sizeof tail, "the correct answer is %s", r[i].answer);
            size_t lo = strlen(r[i].output), lt = strlen(tail);
            int o_ok = lo >= lt && strcmp(r[i].output + lo - lt, tail) == 0;
            int i_ok = r[i].input[0] == '\0' && r[i].instruction[0] != '\0';
            bad_answer += !a_ok;
            bad_output += !o_ok;
            bad_input += !i_ok;
            /* the evaluation's answer extraction (first match of the task's pattern) on the gold output
             * recovers the gold answer */
            size_t ml = 0;
            const char *hit = na ? tk_answer_extract(r[i].output, strlen(r[i].output), alts, na, &ml) : NULL;
            int e_ok = hit && ml == strlen(r[i].answer) && strncmp(hit, r[i].answer, ml) == 0;
            bad_extract += !e_ok;
            if ((!a_ok || !o_ok || !i_ok || !e_ok) && first_bad == n) first_bad = i;
        }
        snprintf(detail, sizeof detail, "%zu bad answers, %zu bad outputs, %zu bad inputs, %zu extraction misses, "
                 "first at record %zu", bad_answer, bad_output, bad_input, bad_extract, first_bad);
        check(bad_answer == 0 && bad_output == 0 && bad_input == 0 && bad_extract == 0,
              "answers in the task's choices, outputs end with them, inputs empty, extraction recovers them", detail);
        tk_instruct_free(r, n);
    }
    free(readme);
    check(files > 0, "the README lists data files", NULL);
    printf("test_convert_csr_data: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
