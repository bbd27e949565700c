/* convert_fashion_mnist.h: Fashion-MNIST idx files -> PNG images + a LLaVA conversation JSON.
 *
 *   tk_fmnist_opts o = {.input_dir = "/usr/share/datasets/fashion-mnist", .out_dir = "data/fmnist",
 *                       .split = "test", .limit = 1000};
 *   tk_fmnist_stats st;
 *   if (tk_convert_fashion_mnist(&o, &st, &err) != 0) ...
 *   // data/fmnist/images/test_00000.png ... and data/fmnist/test.json
 *
 * Input: the four files as Zalando (and Debian's dataset-fashion-mnist) ship them, gzip'd or not:
 * {train,t10k}-images-idx3-ubyte[.gz] and {train,t10k}-labels-idx1-ubyte[.gz] (split "train" reads
 * train-*, split "test" t10k-*; the .gz name is tried first). The idx headers are checked: magic
 * 0x00000803 (images: u8, 3 dims) and 0x00000801 (labels: u8, 1 dim), big-endian counts, rows and
 * columns 1..4096, equal image and label counts, every label 0..9, the data at least as long as the
 * header says (the first `limit` items when limit > 0, all of them otherwise, with no bytes left over).
 *
 * Output: OUT/images/<split>_<index, 5+ digits>.png (8-bit grayscale PNG, stb_image_write) and
 * OUT/<split>.json, LLaVA's conversation schema (an array; written last and atomically, so a
 * finished JSON means every image it names exists):
 *   {"id": "fashion-mnist-test-00000", "image": "images/test_00000.png",
 *    "conversations": [{"from": "human", "value": "<image>\nWhat item of clothing is this?"},
 *                      {"from": "gpt", "value": "Ankle boot"}]}
 * The question is tk_fmnist_questions[index % TK_FMNIST_N_QUESTIONS]; the answer the class name.
 *
 * With image_folder = 1 the layout is torchvision's ImageFolder instead (no JSON):
 * OUT/<folder name>/<split>_<index, 5+ digits>.png, the folder names tk_fmnist_folders (the class
 * names with '/' as '_': "T-shirt_top"), for `tspeft convert --format image-folder`. That converter
 * numbers classes in sorted folder order, which is not Fashion-MNIST's label order (Ankle boot is 0).
 *
 * Ownership: nothing returned needs freeing. Failure: -1 with one line in err naming the file and
 * what was wrong; images written before the failure are left in OUT/images, the JSON is not written.
 * In the image-folder layout the images this run wrote are removed again (and the class folders and
 * OUT when that leaves them empty), so a failed run leaves no partial class folder.
 */
#ifndef TK_DATASETS_CONVERT_FASHION_MNIST_H
#define TK_DATASETS_CONVERT_FASHION_MNIST_H

#include "../src/common.h"

#include <stddef.h>

#define TK_FMNIST_N_CLASSES 10
#define TK_FMNIST_N_QUESTIONS 5
#define TK_FMNIST_MAX_SIDE 4096

/* "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
 * "Ankle boot" (label 0..9). */
extern const char *const tk_fmnist_classes[TK_FMNIST_N_CLASSES];
extern const char *const tk_fmnist_questions[TK_FMNIST_N_QUESTIONS];
/* The class names as folder names: "T-shirt_top", "Trouser", ... "Ankle boot". */
extern const char *const tk_fmnist_folders[TK_FMNIST_N_CLASSES];

typedef struct {
    const char *input_dir; /* directory holding the idx files */
    const char *out_dir;   /* created if missing (with OUT/images) */
    const char *split;     /* "train" or "test"; NULL = "train" */
    size_t limit;          /* > 0: only the first `limit` items */
    int image_folder;      /* 1: OUT/<class folder>/<split>_<index>.png, no JSON (see above) */
    /* optional progress: called every `progress_every` items (0 = 1000) and at the end */
    void (*progress)(void *ctx, size_t done, size_t total);
    void *progress_ctx;
    size_t progress_every;
} tk_fmnist_opts;

typedef struct {
    size_t items;          /* images written */
    size_t rows, cols;     /* image size from the idx header */
    size_t available;      /* items the idx files declare */
    size_t per_class[TK_FMNIST_N_CLASSES];
} tk_fmnist_stats;

int tk_convert_fashion_mnist(const tk_fmnist_opts *o, tk_fmnist_stats *st, tk_err *err);

#endif
