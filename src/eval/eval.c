/* eval.c: the shared helpers of eval.h (byte buffer, result metrics). */
#include "eval.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tk_strbuf_append(tk_strbuf *s, const char *p, size_t n, tk_err *err) {
    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + n + 1) {
            if (cap > ((size_t)-1) / 2) return tk_fail(err, "output buffer overflow");
            cap *= 2;
        }
        char *b = realloc(s->buf, cap);
        if (!b) return tk_fail(err, "out of memory (%zu bytes of output)", cap);
        s->buf = b;
        s->cap = cap;
    }
    if (n) memcpy(s->buf + s->len, p, n);
    s->len += n;
    s->buf[s->len] = '\0';
    return 0;
}

int tk_strbuf_printf(tk_strbuf *s, tk_err *err, const char *fmt, ...) {
    char small[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) return tk_fail(err, "formatting failed");
    if ((size_t)n < sizeof small) return tk_strbuf_append(s, small, (size_t)n, err);
    char *big = malloc((size_t)n + 1);
    if (!big) return tk_fail(err, "out of memory");
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    int rc = tk_strbuf_append(s, big, (size_t)n, err);
    free(big);
    return rc;
}

void tk_strbuf_free(tk_strbuf *s) {
    if (!s) return;
    free(s->buf);
    *s = (tk_strbuf){0};
}

void tk_eval_result_add(tk_eval_result *r, const char *name, double value) {
    TK_ASSERT(r->n_metrics < TK_EVAL_MAX_METRICS);
    snprintf(r->names[r->n_metrics], sizeof r->names[0], "%s", name);
    r->values[r->n_metrics++] = value;
}
