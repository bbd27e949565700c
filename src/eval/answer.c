/* answer.c: see answer.h. */
#include "answer.h"

#include <stdlib.h>
#include <string.h>

static const char MARK[] = "### Response:";

/* Python's str.strip() whitespace within ASCII. */
static int py_space(unsigned char c) { return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f); }

/* memmem without the GNU extension */
static const char *find(const char *s, size_t n, const char *pat, size_t m) {
    if (m == 0) return s;
    for (size_t i = 0; i + m <= n; i++)
        if (s[i] == pat[0] && memcmp(s + i, pat, m) == 0) return s + i;
    return NULL;
}

char *tk_answer_response(const char *decoded, size_t len, size_t *out_len, tk_err *err) {
    size_t m = sizeof MARK - 1;
    const char *a = find(decoded, len, MARK, m), *b;
    size_t n = 0;
    if (a) {
        a += m;
        const char *end = decoded + len;
        b = find(a, (size_t)(end - a), MARK, m);
        if (!b) b = end;
        while (a < b && py_space((unsigned char)*a)) a++;
        while (b > a && py_space((unsigned char)b[-1])) b--;
        n = (size_t)(b - a);
    }
    char *out = malloc(n + 1);
    if (!out) {
        tk_fail(err, "out of memory");
        return NULL;
    }
    if (n) memcpy(out, a, n);
    out[n] = '\0';
    if (out_len) *out_len = n;
    return out;
}

const char *tk_answer_extract(const char *text, size_t n, const char *const *alts, int n_alts, size_t *len) {
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < n_alts; k++) {
            size_t m = strlen(alts[k]);
            if (m && m <= n - i && memcmp(text + i, alts[k], m) == 0) {
                *len = m;
                return text + i;
            }
        }
    *len = 0;
    return NULL;
}

static const char *const ANSWERS[] = {"answer1", "answer2", "answer3", "answer4", "answer5"};

int tk_answer_pattern(const char **alts, int cap, const char *const *choices, int n_choices) {
    int n = 0;
    if (n_choices > 0 && strncmp(choices[0], "answer", 6) == 0) {
        for (int k = 0; k < 5 && n < cap; k++) alts[n++] = ANSWERS[k];
        return n;
    }
    for (int k = 0; k < n_choices && n < cap; k++) alts[n++] = choices[k];
    return n;
}
