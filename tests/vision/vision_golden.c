/* vision_golden.c: the C side of tests/parity/test_vision_pil.py (built as BUILD/tests/vision_golden).
 *
 *   vision_golden decode IN OUT                 decoded RGB
 *   vision_golden resize IN W H OUT             PIL-BICUBIC resize of the decoded image
 *   vision_golden pixels MODE SIZE IN OUT       uint8 image before rescaling (MODE: clip, llava-pad, siglip)
 *   vision_golden tensor MODE SIZE IN OUT       float32 tensor [3][S][S], little-endian
 *
 * Image outputs: uint32 w, uint32 h (little-endian), then h*w*3 bytes. Errors: one line on stderr,
 * exit 1 (the Python test also uses this to check error messages).
 */
#include "common.h"
#include "vision/image.h"
#include "vision/preprocess.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int write_all(const char *path, const void *a, size_t na, const void *b, size_t nb, tk_err *err) {
    FILE *f = fopen(path, "wb");
    if (!f) return tk_fail(err, "%s: cannot create", path);
    int ok = fwrite(a, 1, na, f) == na && (nb == 0 || fwrite(b, 1, nb, f) == nb);
    ok = (fclose(f) == 0) && ok;
    return ok ? 0 : tk_fail(err, "%s: write failed", path);
}

static int write_image(const char *path, const tk_image *img, tk_err *err) {
    uint32_t hdr[2] = {(uint32_t)img->w, (uint32_t)img->h};
    return write_all(path, hdr, sizeof hdr, img->rgb, img->w * img->h * 3, err);
}

static size_t parse_size(const char *s) {
    char *end;
    unsigned long v = strtoul(s, &end, 10);
    return (*s && !*end) ? (size_t)v : 0;
}

int main(int argc, char **argv) {
    tk_err err = {0};
    int rc = 1;
    tk_image *img = NULL, *out = NULL;
    float *t = NULL;
    if (argc == 4 && strcmp(argv[1], "decode") == 0) {
        img = tk_image_load(argv[2], 0, &err);
        rc = img ? write_image(argv[3], img, &err) : -1;
    } else if (argc == 6 && strcmp(argv[1], "resize") == 0) {
        img = tk_image_load(argv[2], 0, &err);
        out = img ? tk_image_resize_bicubic(img, parse_size(argv[3]), parse_size(argv[4]), &err) : NULL;
        rc = out ? write_image(argv[5], out, &err) : -1;
    } else if (argc == 6 && (strcmp(argv[1], "pixels") == 0 || strcmp(argv[1], "tensor") == 0)) {
        tk_preproc_mode mode;
        tk_preproc p;
        if (tk_preproc_mode_from_name(argv[2], &mode, &err) == 0) {
            tk_preproc_init(&p, mode, parse_size(argv[3]));
            img = tk_image_load(argv[4], 0, &err);
            if (img && argv[1][0] == 'p') {
                out = tk_preprocess_pixels(img, &p, &err);
                rc = out ? write_image(argv[5], out, &err) : -1;
            } else if (img) {
                t = malloc(tk_preproc_numel(&p) * sizeof *t);
                rc = !t ? tk_fail(&err, "out of memory") : tk_preprocess(t, img, &p, &err);
                if (rc == 0) rc = write_all(argv[5], t, tk_preproc_numel(&p) * sizeof *t, NULL, 0, &err);
            }
        }
    } else {
        fprintf(stderr, "usage: vision_golden decode IN OUT | resize IN W H OUT | pixels|tensor MODE SIZE IN OUT\n");
        return 2;
    }
    if (rc != 0) {
        tk_err_one_line(&err);
        fprintf(stderr, "vision_golden: %s\n", err.msg);
    }
    tk_image_free(img);
    tk_image_free(out);
    free(t);
    return rc == 0 ? 0 : 1;
}
