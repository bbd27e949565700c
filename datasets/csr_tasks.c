/* csr_tasks.c: see csr_tasks.h. */
#include "csr_tasks.h"

#include <ctype.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>

static const char *const BOOLQ[] = {"true", "false"};
static const char *const PIQA[] = {"solution1", "solution2"};
static const char *const SIQA[] = {"answer1", "answer2", "answer3"};
static const char *const HELLA[] = {"ending1", "ending2", "ending3", "ending4"};
static const char *const WINO[] = {"option1", "option2"};
static const char *const ANS5[] = {"answer1", "answer2", "answer3", "answer4", "answer5"};

static const tk_csr_task TASKS[] = {
    {"boolq", BOOLQ, 2},   {"piqa", PIQA, 2},       {"social_i_qa", SIQA, 3},      {"hellaswag", HELLA, 4},
    {"winogrande", WINO, 2}, {"ARC-Easy", ANS5, 5}, {"ARC-Challenge", ANS5, 5}, {"openbookqa", ANS5, 5},
};

/* Normalized names (lowercase, no '-', '_', '.', ' ') -> task index. */
static const struct {
    const char *key;
    int task;
} ALIASES[] = {
    {"boolq", 0},        {"piqa", 1},          {"socialiqa", 2},    {"siqa", 2},
    {"hellaswag", 3},    {"hella", 3},         {"winogrande", 4},   {"wino", 4},
    {"arceasy", 5},      {"arce", 5},          {"arcchallenge", 6}, {"arcc", 6},
    {"openbookqa", 7},   {"obqa", 7},          {"openbook", 7},
};
#define N_ALIASES (sizeof ALIASES / sizeof ALIASES[0])

static void normalize(char *dst, size_t cap, const char *s, size_t len) {
    size_t j = 0;
    for (size_t i = 0; i < len && s[i] && j + 1 < cap; i++) {
        char c = s[i];
        if (c == '-' || c == '_' || c == '.' || c == ' ') continue;
        dst[j++] = (char)tolower((unsigned char)c);
    }
    dst[j] = '\0';
}

const tk_csr_task *tk_csr_task_find(const char *name) {
    if (!name) return NULL;
    char key[128];
    if (strlen(name) >= sizeof key) return NULL;
    normalize(key, sizeof key, name, strlen(name));
    for (size_t i = 0; i < N_ALIASES; i++)
        if (strcmp(key, ALIASES[i].key) == 0) return &TASKS[ALIASES[i].task];
    return NULL;
}

const tk_csr_task *tk_csr_task_from_path(const char *path) {
    if (!path) return NULL;
    size_t end = strlen(path);
    while (end > 0) {
        while (end > 0 && path[end - 1] == '/') end--;
        size_t begin = end;
        while (begin > 0 && path[begin - 1] != '/') begin--;
        if (begin == end) break;
        /* component [begin, end) without its extension (from the first '.' after a leading one) */
        const char *comp = path + begin;
        size_t len = end - begin;
        const char *dot = memchr(comp + 1, '.', len > 1 ? len - 1 : 0);
        if (dot) len = (size_t)(dot - comp);
        if (len > 0 && len < 128) {
            char key[128];
            normalize(key, sizeof key, comp, len);
            for (size_t i = 0; i < N_ALIASES; i++)
                if (strcmp(key, ALIASES[i].key) == 0) return &TASKS[ALIASES[i].task];
            size_t best = 0;
            int best_task = -1;
            for (size_t i = 0; i < N_ALIASES; i++) {
                size_t kl = strlen(ALIASES[i].key);
                if (kl > best && strncmp(key, ALIASES[i].key, kl) == 0) {
                    best = kl;
                    best_task = ALIASES[i].task;
                }
            }
            if (best_task >= 0) return &TASKS[best_task];
        }
        end = begin;
    }
    return NULL;
}

int tk_csr_choice_index(const tk_csr_task *t, const char *answer) {
    if (!t || !answer) return -1;
    for (int i = 0; i < t->n_choices; i++)
        if (strcasecmp(t->choices[i], answer) == 0) return i;
    return -1;
}

const tk_csr_task *tk_csr_tasks(int *n) {
    *n = (int)(sizeof TASKS / sizeof TASKS[0]);
    return TASKS;
}
