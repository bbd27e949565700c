/* fuzz_fmnist.h: the shared body of fuzz_fmnist_images.c and fuzz_fmnist_labels.c (one target per idx
 * file of datasets/convert_fashion_mnist.h).
 *
 * The input becomes one of the two idx files of the split "train", written under its .gz name (the
 * converter tries that first, and zlib's gzread reads a plain file unchanged, so raw and gzip'd inputs
 * both work); the other file is fixed and valid: 3 images of 4 x 4 pixels, labels 0, 9, 5. The
 * converter then writes PNGs and a LLaVA JSON into an output directory (emptied before each input);
 * an accepted input must
 * have produced the JSON and one PNG per item (3: the fixed file's count must match).
 */
#ifndef TK_FUZZ_FMNIST_H
#define TK_FUZZ_FMNIST_H

#include "datasets/convert_fashion_mnist.h"
#include "fuzz_common.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const uint8_t TKF_FMNIST_IMAGES[16 + 48] = {0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 4,
                                                   0,   16,  32,  48,  64,  80,  96,  112, 128, 144, 160, 176,
                                                   192, 208, 224, 240, 255, 0,   255, 0,   0,   255, 0,   255,
                                                   1,   2,   3,   4,   5,   6,   7,   8,   9,   10,  11,  12,
                                                   13,  14,  15,  16,  17,  18,  19,  20};
static const uint8_t TKF_FMNIST_LABELS[8 + 3] = {0, 0, 8, 1, 0, 0, 0, 3, 0, 9, 5};

/* input_is_images: 1 the input is train-images-idx3-ubyte(.gz), 0 train-labels-idx1-ubyte(.gz). */
static int tkf_fmnist(const uint8_t *data, size_t size, int input_is_images, tk_err *err) {
    const char *in = tkf_mkdir("fmnist_in");
    char img[600], lab[600], out[600], json[700];
    snprintf(img, sizeof img, "%s/train-images-idx3-ubyte.gz", in);
    snprintf(lab, sizeof lab, "%s/train-labels-idx1-ubyte.gz", in);
    if (input_is_images) {
        tkf_write(img, data, size);
        tkf_write(lab, TKF_FMNIST_LABELS, sizeof TKF_FMNIST_LABELS);
    } else {
        tkf_write(img, TKF_FMNIST_IMAGES, sizeof TKF_FMNIST_IMAGES);
        tkf_write(lab, data, size);
    }
    /* the same output directory each time, emptied of what an earlier input wrote (the fixed file
     * allows at most 3 items) */
    snprintf(out, sizeof out, "%s", tkf_path("fmnist_out"));
    snprintf(json, sizeof json, "%s/train.json", out);
    unlink(json);
    for (int i = 0; i < 3; i++) {
        snprintf(json, sizeof json, "%s/images/train_%05d.png", out, i);
        unlink(json);
    }
    tk_fmnist_opts o = {.input_dir = in, .out_dir = out, .split = "train"};
    tk_fmnist_stats st;
    memset(&st, 0, sizeof st);
    int rc = tk_convert_fashion_mnist(&o, &st, err);
    if (rc == 0) {
        struct stat sb;
        snprintf(json, sizeof json, "%s/train.json", out);
        TKF_REQUIRE(stat(json, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size > 2);
        TKF_REQUIRE(st.items == 3 && st.available == 3 && st.rows >= 1 && st.cols >= 1);
        size_t total = 0;
        for (int k = 0; k < TK_FMNIST_N_CLASSES; k++) total += st.per_class[k];
        TKF_REQUIRE(total == st.items);
        for (size_t i = 0; i < st.items; i++) {
            snprintf(json, sizeof json, "%s/images/train_%05zu.png", out, i);
            TKF_REQUIRE(stat(json, &sb) == 0 && S_ISREG(sb.st_mode));
        }
    }
    return rc;
}

#endif
