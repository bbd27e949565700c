/* svg.c: the SVG writer (svg.h). */
#include "svg.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tk_svg {
    char *buf;
    size_t n, cap;
    int oom;
};

static void put(tk_svg *s, const char *text, size_t len) {
    if (!s || s->oom) return;
    if (s->n + len + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 8192;
        while (cap < s->n + len + 1) cap *= 2;
        char *b = realloc(s->buf, cap);
        if (!b) {
            s->oom = 1;
            return;
        }
        s->buf = b;
        s->cap = cap;
    }
    memcpy(s->buf + s->n, text, len);
    s->n += len;
    s->buf[s->n] = 0;
}

static void putf(tk_svg *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(tk_svg *s, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        put(s, tmp, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) {
        s->oom = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    put(s, big, (size_t)n);
    free(big);
}

char *tk_svg_escape(char *out, size_t n, const char *text) {
    size_t o = 0;
    if (n == 0) return out;
    for (const char *p = text ? text : ""; *p; p++) {
        const char *rep = NULL;
        switch (*p) {
        case '&': rep = "&amp;"; break;
        case '<': rep = "&lt;"; break;
        case '>': rep = "&gt;"; break;
        case '"': rep = "&quot;"; break;
        case '\'': rep = "&apos;"; break;
        default: break;
        }
        size_t len = rep ? strlen(rep) : 1;
        if ((unsigned char)*p < 0x20 && *p != '\t' && *p != '\n') continue; /* not allowed in XML 1.0 */
        if (o + len + 1 > n) break;
        if (rep) memcpy(out + o, rep, len);
        else out[o] = *p;
        o += len;
    }
    out[o] = 0;
    return out;
}

tk_svg *tk_svg_open(double width, double height) {
    tk_svg *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    putf(s, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
            "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n"
            "<rect x=\"0\" y=\"0\" width=\"%.0f\" height=\"%.0f\" fill=\"#ffffff\"/>\n",
         width, height, width, height, width, height);
    return s;
}

void tk_svg_free(tk_svg *s) {
    if (!s) return;
    free(s->buf);
    free(s);
}

int tk_svg_save(tk_svg *s, const char *path, tk_err *err) {
    if (!s) return tk_fail(err, "%s: out of memory for the picture", path);
    put(s, "</svg>\n", 7);
    int rc = s->oom ? tk_fail(err, "%s: out of memory for the picture", path)
                    : tk_write_file_atomic(path, s->buf, s->n, err);
    tk_svg_free(s);
    return rc;
}

static void attrs(tk_svg *s, const char *cls) {
    if (cls) {
        char e[128];
        putf(s, " class=\"%s\"", tk_svg_escape(e, sizeof e, cls));
    }
}

static void close_with_title(tk_svg *s, const char *tag, const char *title) {
    if (!title) {
        put(s, "/>\n", 3);
        return;
    }
    char e[512];
    putf(s, "><title>%s</title></%s>\n", tk_svg_escape(e, sizeof e, title), tag);
}

void tk_svg_rect(tk_svg *s, double x, double y, double w, double h, const char *fill, const char *cls,
                 const char *title) {
    putf(s, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\"", x, y, w > 0 ? w : 0, h > 0 ? h : 0,
         fill);
    attrs(s, cls);
    close_with_title(s, "rect", title);
}

void tk_svg_line(tk_svg *s, double x1, double y1, double x2, double y2, const char *stroke, double width,
                 const char *cls) {
    putf(s, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"%s\" stroke-width=\"%.2f\"", x1, y1, x2, y2,
         stroke, width);
    attrs(s, cls);
    put(s, "/>\n", 3);
}

void tk_svg_polyline_dashed(tk_svg *s, const double *xs, const double *ys, size_t n, const char *stroke, double width,
                            const char *dash, const char *cls, const char *title) {
    put(s, "<polyline points=\"", 18);
    for (size_t i = 0; i < n; i++) putf(s, "%s%.2f,%.2f", i ? " " : "", xs[i], ys[i]);
    putf(s, "\" fill=\"none\" stroke=\"%s\" stroke-width=\"%.2f\" stroke-linejoin=\"round\"", stroke, width);
    if (dash) {
        char e[64];
        putf(s, " stroke-dasharray=\"%s\"", tk_svg_escape(e, sizeof e, dash));
    }
    attrs(s, cls);
    close_with_title(s, "polyline", title);
}

void tk_svg_polyline(tk_svg *s, const double *xs, const double *ys, size_t n, const char *stroke, double width,
                     const char *cls, const char *title) {
    tk_svg_polyline_dashed(s, xs, ys, n, stroke, width, NULL, cls, title);
}

void tk_svg_text(tk_svg *s, double x, double y, double size, const char *anchor, const char *fmt, ...) {
    char raw[1024], e[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    putf(s, "<text x=\"%.2f\" y=\"%.2f\" font-size=\"%.1f\" text-anchor=\"%s\" fill=\"#222222\">%s</text>\n", x, y,
         size, anchor ? anchor : "start", tk_svg_escape(e, sizeof e, raw));
}

void tk_svg_raw(tk_svg *s, const char *markup) { put(s, markup, strlen(markup)); }

double tk_svg_px(const tk_svg_box *b, double x) {
    double a = b->x0, c = b->x1, v = x;
    if (b->log_x) {
        a = log10(a);
        c = log10(c);
        v = log10(v > 0 ? v : b->x0);
    }
    return b->x + (c > a ? (v - a) / (c - a) : 0.5) * b->w;
}

double tk_svg_py(const tk_svg_box *b, double y) {
    return b->y + b->h - (b->y1 > b->y0 ? (y - b->y0) / (b->y1 - b->y0) : 0.5) * b->h;
}

/* A "nice" tick step (1, 2 or 5 x 10^k) giving about n ticks over span. */
static double nice_step(double span, int n) {
    if (!(span > 0)) return 1.0;
    double raw = span / n, p = pow(10.0, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1.0 : f < 3.5 ? 2.0 : f < 7.5 ? 5.0 : 10.0) * p;
}

void tk_svg_axes(tk_svg *s, const tk_svg_box *b, const char *xlabel, const char *ylabel) {
    putf(s, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"none\" stroke=\"#888888\" "
            "stroke-width=\"1\" class=\"frame\"/>\n", b->x, b->y, b->w, b->h);
    if (b->log_x) {
        for (double d = ceil(log10(b->x0) - 1e-9); d <= log10(b->x1) + 1e-9; d += 1.0) {
            double px = tk_svg_px(b, pow(10.0, d));
            tk_svg_line(s, px, b->y + b->h, px, b->y + b->h + 4, "#888888", 1, "tick");
            tk_svg_text(s, px, b->y + b->h + 16, 10, "middle", "1e%d", (int)d);
        }
    } else {
        double st = nice_step(b->x1 - b->x0, 5);
        for (double v = ceil(b->x0 / st) * st; v <= b->x1 + 1e-9 * st; v += st) {
            double px = tk_svg_px(b, v);
            tk_svg_line(s, px, b->y + b->h, px, b->y + b->h + 4, "#888888", 1, "tick");
            tk_svg_text(s, px, b->y + b->h + 16, 10, "middle", "%g", fabs(v) < 1e-12 * st ? 0.0 : v);
        }
    }
    double st = nice_step(b->y1 - b->y0, 4);
    for (double v = ceil(b->y0 / st) * st; v <= b->y1 + 1e-9 * st; v += st) {
        double py = tk_svg_py(b, v);
        tk_svg_line(s, b->x - 4, py, b->x, py, "#888888", 1, "tick");
        tk_svg_line(s, b->x, py, b->x + b->w, py, "#eeeeee", 1, "grid");
        tk_svg_text(s, b->x - 6, py + 3.5, 10, "end", "%g", fabs(v) < 1e-12 * st ? 0.0 : v);
    }
    if (xlabel) tk_svg_text(s, b->x + b->w / 2, b->y + b->h + 32, 12, "middle", "%s", xlabel);
    if (ylabel) {
        char e[256];
        putf(s, "<text transform=\"translate(%.2f,%.2f) rotate(-90)\" font-size=\"12\" text-anchor=\"middle\" "
                "fill=\"#222222\">%s</text>\n", b->x - 40, b->y + b->h / 2, tk_svg_escape(e, sizeof e, ylabel));
    }
}

void tk_svg_color(double t, char out[8]) {
    /* viridis at 9 stops, linearly interpolated */
    static const unsigned char v[9][3] = {{68, 1, 84},    {71, 45, 123},  {59, 82, 139},  {44, 114, 142}, {33, 145, 140},
                                          {39, 173, 129}, {92, 200, 99},  {170, 220, 50}, {253, 231, 37}};
    if (!(t >= 0)) t = 0;
    if (t > 1) t = 1;
    double f = t * 8;
    int i = (int)f;
    if (i > 7) i = 7;
    double u = f - i;
    int c[3];
    for (int k = 0; k < 3; k++) c[k] = (int)lround(v[i][k] + u * (v[i + 1][k] - v[i][k]));
    snprintf(out, 8, "#%02x%02x%02x", c[0], c[1], c[2]);
}

const char *tk_svg_series_color(size_t i) {
    static const char *const c[10] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                      "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
    return c[i % 10];
}
