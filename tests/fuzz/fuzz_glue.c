/* fuzz_glue.c: tk_glue_load (datasets/glue.h) on an arbitrary GLUE TSV file. The status returned is
 * RTE's (header sentence1, sentence2, label; labels entailment / not_entailment). The same bytes are
 * then loaded as every other GLUE task (cola without a header, sst2, mrpc, qqp, stsb with scores,
 * mnli_m, mnli_mm, qnli, wnli): those outcomes are not returned, but held to the same rules (a
 * rejection is one non-empty line naming the file). Every accepted example has its texts (text_b
 * exactly for pair tasks), a label in range or -1 (unlabeled), an STS-B score in 0..5 or NaN, and
 * gets an instruction and a response.
 */
#include "datasets/glue.h"
#include "fuzz_common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const TASKS[] = {"rte", "cola", "sst2", "mrpc", "qqp", "stsb", "mnli_m", "mnli_mm", "qnli", "wnli"};

static int load_as(const tk_glue_task *t, const char *path, tk_err *err) {
    tk_glue_example *e = NULL;
    size_t n = 0;
    if (tk_glue_load(t, path, &e, &n, err) != 0) {
        TKF_REQUIRE(err->msg[0] != '\0' && strchr(err->msg, '\n') == NULL && strstr(err->msg, path) != NULL);
        return -1;
    }
    TKF_REQUIRE(e != NULL && n >= 1);
    for (size_t i = 0; i < n; i++) {
        TKF_REQUIRE(e[i].id && e[i].text_a);
        TKF_REQUIRE(e[i].label >= -1 && e[i].label < (t->n_labels ? t->n_labels : 1));
        if (t->n_labels == 0) TKF_REQUIRE(isnan(e[i].score) || (e[i].score >= 0.0f && e[i].score <= 5.0f));
        char *ins = tk_glue_instruction(t, &e[i]);
        TKF_REQUIRE(ins != NULL);
        free(ins);
        if (e[i].label >= 0 || (t->n_labels == 0 && !isnan(e[i].score))) {
            char *resp = tk_glue_response(t, &e[i]);
            TKF_REQUIRE(resp != NULL);
            free(resp);
        }
    }
    tk_glue_free(e, n);
    return 0;
}

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *path = tkf_path("dev.tsv");
    tkf_write(path, data, size);
    int rc = -1;
    for (size_t k = 0; k < sizeof TASKS / sizeof TASKS[0]; k++) {
        const tk_glue_task *t = tk_glue_task_find(TASKS[k]);
        TKF_REQUIRE(t != NULL);
        tk_err other = {0};
        int r = load_as(t, path, k == 0 ? err : &other);
        if (k == 0) rc = r;
    }
    return rc;
}
