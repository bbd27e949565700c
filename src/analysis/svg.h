/* svg.h: a small SVG writer for the report pictures (tspeft gates, examples): rectangles, lines,
 * polylines and text into an in-memory document written atomically on close.
 *
 *   tk_svg *s = tk_svg_open(640, 480);                       // NULL when out of memory
 *   tk_svg_rect(s, 10, 10, 50, 20, "#ff0000", "cell", "q_proj: 0.52");   // class and <title> optional
 *   tk_svg_text(s, 320, 20, 14, "middle", "Keep ratio (%s)", "all tokens");
 *   tk_svg_axes(s, &box, 0, 100, 0, 1, "step", "tau");     // frame, ticks and labels
 *   if (tk_svg_save(s, "out/x.svg", &err)) ...;              // writes and frees (also on failure)
 *
 * Coordinates are SVG user units (pixels), y downwards. Text is XML-escaped. tk_svg_save and
 * tk_svg_free accept NULL. Failure: -1 with err naming the file (an allocation failure during
 * drawing is reported by tk_svg_save).
 */
#ifndef TK_ANALYSIS_SVG_H
#define TK_ANALYSIS_SVG_H

#include "../common.h"

#include <stddef.h>

typedef struct tk_svg tk_svg;

/* A plot area in pixels and the data range mapped onto it. */
typedef struct {
    double x, y, w, h;          /* pixel box */
    double x0, x1, y0, y1;      /* data range: x0 at the left edge, y0 at the bottom */
    int log_x;                  /* x mapped as log10 (x0, x1 > 0) */
} tk_svg_box;

tk_svg *tk_svg_open(double width, double height);
void tk_svg_free(tk_svg *s);
int tk_svg_save(tk_svg *s, const char *path, tk_err *err);

void tk_svg_rect(tk_svg *s, double x, double y, double w, double h, const char *fill, const char *cls,
                 const char *title);
void tk_svg_line(tk_svg *s, double x1, double y1, double x2, double y2, const char *stroke, double width,
                 const char *cls);
/* xs, ys [n] in pixels. */
void tk_svg_polyline(tk_svg *s, const double *xs, const double *ys, size_t n, const char *stroke, double width,
                     const char *cls, const char *title);
/* The same, dashed: dash is an SVG stroke-dasharray ("5,3"); NULL: solid. */
void tk_svg_polyline_dashed(tk_svg *s, const double *xs, const double *ys, size_t n, const char *stroke, double width,
                            const char *dash, const char *cls, const char *title);
void tk_svg_text(tk_svg *s, double x, double y, double size, const char *anchor, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* Raw markup appended as is (the caller escapes). */
void tk_svg_raw(tk_svg *s, const char *markup);

/* Data to pixels inside a box. */
double tk_svg_px(const tk_svg_box *b, double x);
double tk_svg_py(const tk_svg_box *b, double y);
/* Frame, about 5 ticks per axis with labels, axis titles (NULL: none). */
void tk_svg_axes(tk_svg *s, const tk_svg_box *b, const char *xlabel, const char *ylabel);

/* A colour for t in [0,1] on a perceptually ordered scale (viridis), as "#rrggbb" into out[8]. */
void tk_svg_color(double t, char out[8]);
/* A distinct colour for series i (a 10-colour cycle). */
const char *tk_svg_series_color(size_t i);
/* Appends text to an escaped buffer: XML-escapes &, <, >, ", ' into out (capacity n, always
 * NUL-terminated). Returns out. */
char *tk_svg_escape(char *out, size_t n, const char *text);

#endif
