/* fuzz_image.c: tk_image_load (vision/image.h: stb_image's JPEG, PNG, BMP, GIF and PNM decoders) on an
 * arbitrary file, with a limit of 2^20 pixels so that no input makes the fuzzer allocate more than a
 * few MiB of pixels. tk_image_info must agree: it fails whenever the load fails on the header, and
 * when the load succeeds it reported the same format and size. An accepted image is at least 1 x 1
 * and within the limit; every pixel is read; images up to 4096 pixels go through
 * tk_image_encode_png and back through tk_image_decode unchanged (PNG is lossless).
 */
#include "fuzz_common.h"
#include "vision/image.h"

#include <stdlib.h>
#include <string.h>

#define TKF_MAX_PIXELS ((size_t)1 << 20)

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *path = tkf_path("image.bin");
    tkf_write(path, data, size);
    tk_image_format fmt = TK_IMAGE_FORMAT_UNKNOWN;
    size_t w = 0, h = 0;
    tk_err ierr = {0};
    int info = tk_image_info(&fmt, &w, &h, data, size, path, TKF_MAX_PIXELS, &ierr);
    if (info != 0) TKF_REQUIRE(ierr.msg[0] != '\0' && strstr(ierr.msg, path) != NULL);
    tk_image *img = tk_image_load(path, TKF_MAX_PIXELS, err);
    if (!img) return -1;
    TKF_REQUIRE(info == 0 && fmt != TK_IMAGE_FORMAT_UNKNOWN && fmt == tk_image_sniff(data, size));
    TKF_REQUIRE(img->w == w && img->h == h && w >= 1 && h >= 1 && w * h <= TKF_MAX_PIXELS);
    TKF_REQUIRE(img->rgb != NULL);
    volatile uint8_t sum = 0;
    for (size_t i = 0; i < w * h * 3; i++) sum ^= img->rgb[i];
    (void)sum;
    if (w * h <= 4096) {
        tk_err perr = {0};
        size_t n = 0;
        uint8_t *png = tk_image_encode_png(&n, img->rgb, w, h, 3, &perr);
        TKF_REQUIRE(png != NULL && n > 0);
        tk_image *back = tk_image_decode(png, n, "round trip", 0, &perr);
        TKF_REQUIRE(back != NULL && back->w == w && back->h == h);
        TKF_REQUIRE(memcmp(back->rgb, img->rgb, w * h * 3) == 0);
        tk_image_free(back);
        free(png);
    }
    tk_image_free(img);
    return 0;
}
